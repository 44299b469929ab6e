"""Quick (smoke) runs of the lab's augment, activation, lora-lr, mixing, sampling and checkpointing claims:
each returns a well-formed Result (finite values, one per seed, an allowed verdict, PNG plots). Numbers
from quick runs are not evidence; the full runs are `llmkit lab run ID`."""

from __future__ import annotations

import importlib
import math

import pytest

from conftest import shared_file
from llmkit.lab.claim import Claim, ExperimentContext, Result

MODULES = ["augment", "activation", "lora_lr", "mixing", "sampling", "checkpointing"]
IDS = {"augment": "augment", "activation": "activation", "lora_lr": "lora-lr", "mixing": "mixing",
       "sampling": "sampling", "checkpointing": "checkpointing"}
VERDICTS = {"holds", "partly holds", "does not hold", "modelled", "not measured"}
SEEDS = [0, 1]


@pytest.fixture(autouse=True)
def _needs_data():
    for rel in ("en/tinyshakespeare.txt", "en/wiki_demo.txt", "en/c4_demo.jsonl", "instruct/alpaca_en_demo.json"):
        shared_file(rel)


@pytest.mark.parametrize("module", MODULES)
def test_quick_run_is_well_formed(module, tmp_path):
    if module == "augment":
        from pathlib import Path

        if not Path("/usr/share/wordnet/data.noun").is_file():
            pytest.skip("WordNet 3.0 (apt-get install wordnet-base) is not installed")
    claim = importlib.import_module(f"llmkit.lab.experiments.{module}").CLAIM
    assert isinstance(claim, Claim) and claim.id == IDS[module]
    assert claim.guide_zh and claim.guide_en and claim.claimed and claim.section.startswith("§")
    assert 0 < claim.minutes <= 10
    result = claim.run(ExperimentContext(seeds=SEEDS, quick=True, out_dir=tmp_path))
    assert isinstance(result, Result)
    assert result.verdict in VERDICTS
    assert result.summary and result.setup
    assert result.measurements
    for m in result.measurements:
        assert len(m.values) == len(SEEDS), m.name
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values), (m.name, m.values)
    assert any(m.claimed for m in result.measurements)  # the guide's figure sits beside a measured one
    assert result.plots
    for p in result.plots:
        path = tmp_path / p
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p


def test_text_metrics():
    from llmkit.lab.experiments.sampling import bleu, distinct_n, self_bleu

    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == 2 / 3
    assert bleu("the cat sat on the mat".split(), ["the cat sat on the mat".split()]) == pytest.approx(1.0)
    assert bleu("x y z w".split(), ["a b c d".split()]) < 0.2
    assert self_bleu([["a b c d e", "a b c d e"]]) == pytest.approx(1.0)


def test_spot_cost_model():
    from llmkit.lab.experiments.checkpointing import PRICE_ON_DEMAND, PRICE_SPOT, break_even_rate, spot_saving

    no_preempt = spot_saving(0.0, 1000, 0.1, 0.0)
    assert no_preempt == pytest.approx(1 - PRICE_SPOT / PRICE_ON_DEMAND)
    assert spot_saving(1.0, 1000, 0.1, 1.0) < spot_saving(0.1, 1000, 0.1, 1.0)  # more preemptions cost more
    assert spot_saving(0.1, 10, 0.1, 1.0) < spot_saving(0.1, 1000, 0.1, 1.0)  # frequent checkpoints cost time
    rate = break_even_rate(0.6, 1000, 0.1, 1.0)
    assert spot_saving(rate, 1000, 0.1, 1.0) == pytest.approx(0.6)


def test_spike_count():
    from llmkit.lab.experiments.activation import count_spikes

    flat = [1.0] * 50
    assert count_spikes(flat) == 0
    assert count_spikes(flat[:30] + [2.0] + flat[30:]) == 1
