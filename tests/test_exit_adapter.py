"""Trained early exits for self-speculative decoding (llmkit.distill.exit_adapter, `llmkit distill-exit`):
the adapter brings the exit closer to the full model than the bare exit, the model itself is untouched, the
draft it makes gives the model's own greedy tokens, confidence-based stopping drafts less with the same
output, exact resume, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from llmkit.config import load_config
from llmkit.data.tokenized import file_sha256
from llmkit.distill.exit_adapter import (
    ExitConfig,
    _ExitPoint,
    exit_logits,
    new_adapter,
    train_exit_adapter,
)
from llmkit.infer.exit_draft import load_exit_adapter
from llmkit.infer.generate import SamplingParams, stream_tokens
from llmkit.infer.speculative import ModelDrafter, SubsetHead, make_draft, speculative_generate
from llmkit.models import load_model
from llmkit.tokenizer import Tokenizer

LAYERS = 1  # of 4


@pytest.fixture(scope="module")
def trained(shakespeare_small, tmp_path_factory) -> Path:
    """A 4-layer character model pretrained for 300 steps: its last layer has learned more than its first."""
    from llmkit.train.pretrain import PretrainConfig, pretrain

    text, tok = shakespeare_small
    out = tmp_path_factory.mktemp("exit-base")
    cfg = load_config(PretrainConfig, None, tiny_overrides(
        out, text, tok, **{"model.n_layer": 4, "model.d_model": 64, "model.n_head": 4, "model.block_size": 64,
                           "model.dropout": 0.0, "train.max_steps": 300, "train.lr": 3e-3, "train.batch_size": 8,
                           "train.eval_interval": 300, "train.checkpoint_interval": 300, "train.log_interval": 50}))
    pretrain(cfg)
    return out / "final"


def _exit_config(model_dir: Path, text: Path, out: Path, **extra) -> ExitConfig:
    overrides = {"model": model_dir, "layers": LAYERS, "out_dir": out, "data.inputs": f"[{text}]",
                 "train.max_steps": 80, "train.block_size": 64, "train.batch_size": 8, "train.lr": 3e-3,
                 "train.warmup_steps": 5, "train.eval_interval": 40, "train.checkpoint_interval": 40,
                 "train.log_interval": 10, "train.progress": False, "track.enabled": False, "draft_vocab": "null",
                 **extra}
    return load_config(ExitConfig, None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def adapter(trained, shakespeare_small, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("exit")
    before = file_sha256(trained / "model.safetensors")
    summary = train_exit_adapter(_exit_config(trained, shakespeare_small[0], out))
    assert file_sha256(trained / "model.safetensors") == before  # the model itself does not change
    return Path(summary["adapter"]), summary


def test_the_trained_exit_agrees_with_the_model_more_than_the_bare_exit(adapter):
    adapter_dir, s = adapter
    assert s["step"] == 80 and not s["stopped_by_signal"]
    assert s["exit_kl"] < 0.7 * s["baseline_exit_kl"], s
    assert s["exit_top1"] > s["baseline_exit_top1"] + 0.05, s
    meta = json.loads((adapter_dir / "exit_adapter.json").read_text())
    assert meta["layers"] == LAYERS and meta["n_layer"] == 4 and meta["metrics"]["exit_top1"] == s["exit_top1"]


def test_the_exit_draft_gives_the_models_greedy_tokens_and_is_accepted_more(trained, adapter, shakespeare_small):
    model = load_model(trained).eval()
    tok = Tokenizer.load(trained)
    block, layers, vocab = load_exit_adapter(model, adapter[0], trained)
    assert vocab is None  # draft_vocab: null in _exit_config
    trained_draft = make_draft(model, "layers", layers, exit_adapter=block)
    bare_draft = make_draft(model, "layers", layers)
    assert trained_draft.config.n_layer == LAYERS + 1 and trained_draft.blocks[0] is model.blocks[0]
    text = shakespeare_small[0].read_text()
    greedy = SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=False)
    drafted, accepted = {"trained": 0, "bare": 0}, {"trained": 0, "bare": 0}
    for i, start in enumerate((1000, 50_000, 120_000)):
        prompt = tok.encode(text[start:start + 40])
        plain = list(stream_tokens(model, prompt, greedy))
        for name, draft in (("trained", trained_draft), ("bare", bare_draft)):
            out, _ = speculative_generate(model, prompt, greedy, ModelDrafter(draft), num_draft=4)
            assert out == plain, name
            # a small character model's greedy text loops ("the the the"), which any exit drafts right;
            # sampled text tells the exits apart: acceptance is min(1, p/q), the overlap of the distributions
            sampled = SamplingParams(max_new_tokens=60, temperature=1.0, seed=i, stop_at_eos=False)
            _, stats = speculative_generate(model, prompt, sampled, ModelDrafter(draft), num_draft=4)
            drafted[name] += stats.drafted
            accepted[name] += stats.accepted
    rate = {name: accepted[name] / drafted[name] for name in drafted}
    assert rate["trained"] > rate["bare"] + 0.1, rate


def test_confidence_exit_drafts_less_and_keeps_the_output(trained, adapter):
    model = load_model(trained).eval()
    block, layers, _ = load_exit_adapter(model, adapter[0])
    draft = make_draft(model, "layers", layers, exit_adapter=block)
    prompt = Tokenizer.load(trained).encode("ROMEO:\nWhat light through yonder")
    for temperature in (0.0, 0.8):
        params = SamplingParams(max_new_tokens=30, temperature=temperature, seed=3, stop_at_eos=False)
        always, s_always = speculative_generate(model, prompt, params, ModelDrafter(draft), num_draft=4)
        confident, s_conf = speculative_generate(model, prompt, params, ModelDrafter(draft, min_confidence=0.3),
                                                 num_draft=4)
        assert len(confident) == len(always) == 30
        assert 0 < s_conf.drafted < s_always.drafted, (s_conf, s_always)
        if temperature == 0:
            assert confident == always == list(stream_tokens(model, prompt, params))
            # what it skipped was mostly what verification would have rejected
            assert s_conf.acceptance_rate >= s_always.acceptance_rate
    with pytest.raises(ValueError, match="min_confidence"):
        ModelDrafter(draft, min_confidence=1.0)


def test_an_adapter_refuses_other_weights_and_bad_layers(trained, adapter, shakespeare_small, tmp_path):
    from llmkit.models import save_model

    other = load_model(trained)
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight.add_(0.01)
    save_model(other, tmp_path / "other", Tokenizer.load(trained))
    with pytest.raises(ValueError, match="trained on other weights"):
        load_exit_adapter(other, adapter[0], tmp_path / "other")
    with pytest.raises(ValueError, match="1 <= K < n_layer=4"):
        train_exit_adapter(_exit_config(trained, shakespeare_small[0], tmp_path / "bad", layers=4))


def test_a_stopped_run_resumes_to_the_same_adapter(trained, shakespeare_small, tmp_path):
    text = shakespeare_small[0]
    common = {"train.max_steps": 20, "train.decay_steps": 20, "train.checkpoint_interval": 10,
              "train.eval_interval": 20}
    whole = train_exit_adapter(_exit_config(trained, text, tmp_path / "whole", **common))
    train_exit_adapter(_exit_config(trained, text, tmp_path / "split", **{**common, "train.max_steps": 10}))
    resumed = train_exit_adapter(_exit_config(trained, text, tmp_path / "split", **common), resume=True)
    assert resumed["step"] == 20
    from safetensors.torch import load_file

    a = load_file(str(Path(whole["adapter"]) / "exit_adapter.safetensors"))
    b = load_file(str(Path(resumed["adapter"]) / "exit_adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_distill_exit_then_generate_with_the_exit_draft(trained, shakespeare_small, tmp_path, capsys):
    from llmkit.cli import main

    config = tmp_path / "exit.yaml"
    config.write_text(f"model: {trained}\nlayers: {LAYERS}\ndata:\n  inputs: [{shakespeare_small[0]}]\n"
                      "train:\n  max_steps: 10\n  block_size: 64\n  progress: false\ntrack:\n  enabled: false\n")
    assert main(["distill-exit", "--config", str(config), f"out_dir={tmp_path / 'run'}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 10 and Path(summary["adapter"]).is_dir()

    base = ["generate", "--model", str(trained), "--prompt", "KING:\nMy lord", "--temperature", "0",
            "--max-new-tokens", "30", "--device", "cpu", "--raw"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--speculative", "draft", "--draft-model", f"exit:{summary['adapter']}",
                        "--draft-confidence", "0.3"]) == 0
    got = capsys.readouterr()
    assert got.out == plain
    assert json.loads(got.err.strip().splitlines()[-1])["draft_forwards"] > 0
    assert main(["distill-exit", "--config", str(config), "layerz=1"]) == 2
    assert "layerz" in capsys.readouterr().err


def test_identity_init_starts_as_the_bare_exit_and_last_block_init_does_not(trained):
    model = load_model(trained).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    point = _ExitPoint(model, LAYERS)
    with torch.no_grad():
        model(x)
        bare = model.head(point.hidden)
        identity = exit_logits(model, new_adapter(model, "identity"), point, LAYERS)
        copied = exit_logits(model, new_adapter(model, "last_block"), point, LAYERS)
    point.remove()
    assert torch.allclose(identity, bare, atol=1e-5)
    assert not torch.allclose(copied, bare, atol=1e-2)
    with pytest.raises(ValueError, match="init"):
        new_adapter(model, "zeros")


def test_a_subset_head_drafts_only_its_tokens_and_keeps_the_greedy_output(trained, adapter, shakespeare_small,
                                                                          tmp_path):
    model = load_model(trained).eval()
    V = model.config.vocab_size
    ids = torch.tensor([0, 3, 5, 7, 11, 20, 31, 40])
    head = SubsetHead(model.lm_head, ids, V)
    h = torch.randn(3, model.config.d_model)
    full, sub = model.lm_head(h), head(h)
    assert torch.allclose(sub[:, ids], full[:, ids], atol=1e-6)
    outside = torch.ones(V, dtype=torch.bool)
    outside[ids] = False
    assert torch.isinf(sub[:, outside]).all()

    # an adapter trained with draft_vocab keeps the most frequent ids and drafts only them
    s = train_exit_adapter(_exit_config(trained, shakespeare_small[0], tmp_path / "vocab", draft_vocab=12,
                                        **{"train.max_steps": 20}))
    block, layers, vocab = load_exit_adapter(model, s["adapter"], trained)
    text = shakespeare_small[0].read_text()
    tok = Tokenizer.load(trained)
    counts = torch.bincount(torch.tensor(tok.encode(text[:180_000])), minlength=V)
    assert vocab.numel() == 12 and set(vocab.tolist()) <= set(counts.argsort(descending=True)[:16].tolist())
    draft = make_draft(model, "layers", layers, exit_adapter=block, draft_vocab=vocab)
    prompt = tok.encode(text[5000:5040])
    greedy = SamplingParams(max_new_tokens=30, temperature=0, stop_at_eos=False)
    drafter = ModelDrafter(draft)
    proposals = []
    original = drafter.propose

    def record(*args, **kw):
        drafts, q = original(*args, **kw)
        proposals.extend(drafts)
        return drafts, q

    drafter.propose = record
    out, stats = speculative_generate(model, prompt, greedy, drafter, num_draft=4)
    assert out == list(stream_tokens(model, prompt, greedy))
    assert proposals and set(proposals) <= set(vocab.tolist())


def test_shared_prepared_shards_are_retokenized_for_other_inputs(trained, shakespeare_small, tmp_path):
    from llmkit.data.tokenized import read_meta

    text = shakespeare_small[0]
    other = tmp_path / "other.txt"
    other.write_text(text.read_text()[100_000:160_000])
    shards = tmp_path / "shards"
    one = {"train.max_steps": 1, "train.eval_interval": 1, "data.prepared": shards}
    train_exit_adapter(_exit_config(trained, text, tmp_path / "a", **one))
    assert read_meta(shards)["sources"][0]["sha256"] == file_sha256(text)
    train_exit_adapter(_exit_config(trained, other, tmp_path / "b", **one))
    assert read_meta(shards)["sources"][0]["sha256"] == file_sha256(other)
