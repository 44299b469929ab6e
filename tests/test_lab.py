"""`llmkit lab`: the claim catalog, `lab list`, real quick runs through run_claims, docs regeneration, failures."""

import argparse
import json
import pkgutil
from pathlib import Path

import pytest

from llmkit.lab import experiments
from llmkit.lab.catalog import ORDER, all_claims, get
from llmkit.lab.claim import VERDICTS
from llmkit.lab.run import NOT_RUN, add_lab_arguments, list_claims, render_docs, run_claims

MINE = ["dedup", "encdec-params", "heads", "int8", "kv-cache", "trainable-params", "hardware"]


@pytest.fixture
def small_encdec():
    """encdec-params counts published configs: a full (non-quick) run takes well under a second."""


def test_catalog_finds_every_module_in_guide_order():
    modules = [m.name for m in pkgutil.iter_modules(experiments.__path__) if not m.name.startswith("_")]
    claims = all_claims()
    ids = [c.id for c in claims]
    assert len(ids) == len(set(ids)) == len(modules)
    assert set(MINE) <= set(ids)
    known = [i for i in ids if i in ORDER]
    assert known == sorted(known, key=ORDER.index) and ids[:len(known)] == known
    for c in claims:
        assert c.guide_zh and c.guide_en and c.claimed and 0 < c.minutes <= 20, c.id


def test_get_unknown_id_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError, match="nope") as e:
        get(["int8", "nope"])
    assert "int8" in str(e.value) and "kv-cache" in str(e.value)
    assert [c.id for c in get(["hardware", "dedup"])] == ["dedup", "hardware"]  # catalog order
    with pytest.raises(ValueError, match="nope"):
        run_claims(["nope"], quick=True, out_dir="unused", docs=None)


def test_lab_list_and_run_arguments(capsys):
    parser = argparse.ArgumentParser()
    add_lab_arguments(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lab", "list"])
    args.func(args)
    out = capsys.readouterr().out
    assert out == list_claims() + "\n"
    for cid in MINE:
        assert cid in out
    assert "§2.2" in out and "-75% size" in out
    args = parser.parse_args(["lab", "run", "int8", "kv-cache", "--seeds", "5", "--quick", "--out", "x"])
    assert args.ids == ["int8", "kv-cache"] and args.seeds == 5 and args.quick and args.out == "x"
    assert parser.parse_args(["lab", "run", "--all"]).all


def test_quick_runs_write_results_and_full_runs_regenerate_docs(tmp_path, small_encdec, capsys):
    out, docs = tmp_path / "lab", tmp_path / "docs" / "claims.md"
    results = run_claims(["hardware", "encdec-params"], seeds=2, quick=True, out_dir=out, docs=docs)
    assert list(results) == ["encdec-params", "hardware"]
    assert not docs.exists()  # quick runs are not evidence: the page is left alone
    stored = json.loads((out / "encdec-params" / "result.json").read_text(encoding="utf-8"))
    assert stored["quick"] and stored["seeds"] == [0, 1] and stored["machine"]["cpu_count"] >= 1
    assert stored["machine"]["gpu"] and stored["machine"]["torch"]
    assert stored["guide_zh"].startswith("Encoder-Decoder架构") and stored["measurements"][0]["values"]
    hw = results["hardware"]
    if hw.verdict == "not measured":  # no GPU: never a guessed number
        assert "no GPU" in hw.summary.lower() or "No GPU" in hw.summary

    # a full run of one claim regenerates the page: its row, every other claim "not run yet"
    res = run_claims(["encdec-params"], seeds=3, quick=False, out_dir=out, docs=docs)["encdec-params"]
    assert res.verdict in ("holds", "partly holds", "does not hold") and res.seconds > 0
    text = docs.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| ") and "[encdec-params]" in line)
    assert "+30% parameters" in row and f"**{res.verdict}**" in row and "`llmkit lab run encdec-params`" in row
    assert res.measurements[0].text() in row and "参数量" in row
    assert text.count(NOT_RUN) >= 2 and "llmkit lab run --all" in text
    assert sum(line.startswith("| ") for line in text.splitlines()) == len(all_claims()) + 1  # header + rows
    assert (docs.parent / "claims" / "encdec-params-published_pairs.png").is_file()
    assert "](claims/encdec-params-published_pairs.png)" in text
    committed = json.loads((docs.parent / "claims" / "results" / "encdec-params.json").read_text(encoding="utf-8"))
    assert committed["verdict"] == res.verdict and committed["seeds"] == [0, 1, 2] and not committed["quick"]
    assert committed["plots"] == ["encdec-params-published_pairs.png"] and committed["git"]["sha"]
    assert committed["machine"]["cpu_count"] >= 1 and committed["date"]
    # the page is a function of the committed results alone: the working directory can go
    import shutil

    shutil.rmtree(out)
    assert render_docs(docs) == text
    # the quick hardware result stays in the working directory: it is never committed nor shown as evidence
    assert NOT_RUN in next(line for line in text.splitlines() if "[hardware]" in line)
    assert not (docs.parent / "claims" / "results" / "hardware.json").exists()


def test_a_failing_experiment_is_not_measured_and_the_others_still_run(tmp_path, small_encdec, monkeypatch):
    broken = get(["hardware"])[0]

    def boom(ctx):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(broken, "run", boom)
    docs = tmp_path / "claims.md"
    results = run_claims(["hardware", "encdec-params"], seeds=1, out_dir=tmp_path / "lab", docs=docs)
    assert results["hardware"].verdict == "not measured"
    assert "RuntimeError: simulated failure" in results["hardware"].summary
    assert results["encdec-params"].verdict != "not measured"
    stored = json.loads((tmp_path / "lab" / "hardware" / "result.json").read_text(encoding="utf-8"))
    assert stored["verdict"] == "not measured" and "simulated failure" in stored["summary"]
    assert "simulated failure" in docs.read_text(encoding="utf-8")


def test_the_committed_page_is_what_the_committed_results_render_to():
    """docs/claims.md is generated from docs/claims/results/*.json; editing either alone fails here."""
    root = Path(__file__).resolve().parents[1]
    docs = root / "docs" / "claims.md"
    results = root / "docs" / "claims" / "results"
    stored = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in results.glob("*.json")}
    assert set(stored) == {c.id for c in all_claims()}  # every claim has a committed result (or a placeholder)
    for cid, d in stored.items():
        assert d["verdict"] in VERDICTS, cid
        assert not d.get("quick"), cid  # a quick run is never committed as evidence
        if d.get("machine"):  # measured in this revision: provenance and at least 3 seeds (or a stated reason)
            assert d["git"]["sha"] and d["date"] and d["seeds"], cid
        for plot in d.get("plots", []):
            assert (docs.parent / "claims" / plot).is_file(), (cid, plot)
    assert render_docs(docs, results) == docs.read_text(encoding="utf-8")


def test_quick_run_never_replaces_a_full_result(tmp_path, small_encdec):
    out = tmp_path / "lab"
    run_claims(["encdec-params"], seeds=2, out_dir=out, docs=None)
    run_claims(["encdec-params"], seeds=1, quick=True, out_dir=out, docs=None)
    assert not json.loads((out / "encdec-params" / "result.json").read_text())["quick"]
    assert json.loads((out / "encdec-params" / "result.quick.json").read_text())["quick"]


@pytest.mark.slow
def test_the_whole_lab_in_full(tmp_path):
    results = run_claims(None, seeds=3, quick=False, out_dir=tmp_path / "lab", docs=tmp_path / "claims.md")
    assert set(results) == {c.id for c in all_claims()}
    for cid, r in results.items():
        assert r.verdict in VERDICTS, cid
        assert not r.summary.startswith("the experiment failed"), (cid, r.summary)
    assert NOT_RUN not in (tmp_path / "claims.md").read_text(encoding="utf-8")


# -- moe (§5: dynamic routing; MoE below dense at equal active parameters, experts kept evenly loaded) -----------
DENSE = [1.872, 1.868, 1.864]
MOE_BETTER = [1.852, 1.853, 1.850]                 # lower by 0.014-0.020 nats on every seed
MOE_CLOSE = [1.866, 1.862, 1.858]                  # lower by 0.006 only: inside the 0.01 margin
MOE_ONE_SEED = [1.812, 1.868, 1.866]               # mean gain 0.019, carried by one seed
MOE_WORSE = [1.880, 1.875, 1.879]
EVEN, UNEVEN, COLLAPSED = [0.11, 0.12, 0.10], [0.45, 0.50, 0.40], [0.86, 0.90, 0.81]


@pytest.mark.parametrize("moe, moe_cv, free_cv, ratio, expected", [
    (MOE_BETTER, EVEN, COLLAPSED, 1.006, "holds"),
    (MOE_BETTER, UNEVEN, COLLAPSED, 1.006, "partly holds"),      # lower loss, load above the 0.3 bound
    (MOE_BETTER, EVEN, [0.09, 0.10, 0.08], 1.006, "partly holds"),  # even without the router losses too
    (MOE_CLOSE, EVEN, COLLAPSED, 1.006, "partly holds"),         # balanced, but not lower beyond the margin
    (MOE_ONE_SEED, EVEN, COLLAPSED, 1.006, "partly holds"),      # mean beyond the margin on 1 of 3 seeds only
    (MOE_WORSE, UNEVEN, COLLAPSED, 1.006, "does not hold"),
    (MOE_CLOSE, EVEN, [0.10, 0.09, 0.11], 1.006, "does not hold"),  # the loss does not do the balancing
    (MOE_BETTER, EVEN, COLLAPSED, 1.5, "not measured"),          # not at equal active parameters
    ([], [], [], 1.0, "not measured"),
])
def test_moe_verdicts(moe, moe_cv, free_cv, ratio, expected):
    from llmkit.lab.experiments import moe as moe_claim

    decided, reason = moe_claim.verdict(DENSE, moe, moe_cv, free_cv, ratio)
    assert decided == expected, reason
    assert decided in VERDICTS and reason


def test_moe_verdict_reason_states_the_figures():
    from llmkit.lab.experiments import moe as moe_claim

    _, reason = moe_claim.verdict(DENSE, MOE_BETTER, EVEN, COLLAPSED)
    assert "dense 1.868" in reason and "MoE 1.852" in reason and "3/3 seeds" in reason
    assert "0.110 with router losses vs 0.857 without" in reason


def test_moe_quick_run_is_well_formed(tmp_path):
    """One seed of the quick run (seconds): every contestant trains through pretrain, figures are finite,
    MoE and dense have equal active parameters, plots are PNGs. Numbers from it are not evidence."""
    import math

    from conftest import shared_file
    from llmkit.lab.claim import ExperimentContext, Result
    from llmkit.lab.experiments import moe as moe_claim

    shared_file("en/tinyshakespeare.txt")
    claim = get(["moe"])[0]
    assert claim is moe_claim.CLAIM and claim.section == "§5" and claim.guide_zh == "轻量化推理:模型蒸馏、动态路由架构"
    result = claim.run(ExperimentContext(seeds=[0], quick=True, out_dir=tmp_path / "moe"))
    assert isinstance(result, Result) and result.verdict in VERDICTS and result.verdict != "not measured"
    by_name = {m.name: m for m in result.measurements}
    for m in result.measurements:
        assert len(m.values) == 1 and all(math.isfinite(v) for v in m.values), m.name
    assert abs(by_name["MoE / dense active parameters per token"].values[0] - 1) < moe_claim.MAX_ACTIVE_GAP
    assert by_name["MoE / dense total parameters"].values[0] > 2
    assert all(0 <= v for k, m in by_name.items() if k.startswith("expert load CV") for v in m.values)
    assert "Quick run (not evidence)" in result.summary and "| dense, d_ff 256 |" in result.details
    for p in result.plots:
        assert (tmp_path / "moe" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
