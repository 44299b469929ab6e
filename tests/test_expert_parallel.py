"""Expert parallelism on CPU: a mixture-of-experts model's experts sharded over 2 processes (gloo, torchrun).

The claim under test: sharding the experts and exchanging tokens by all-to-all changes where the experts
run, not what is computed. So a 2-process run with `train.expert_parallel: true` must end with the weights
of one process that sees both ranks' batches (the reference of tests/test_distributed.py), router losses
included, and its checkpoints must hold every expert.
"""

from __future__ import annotations

import re

import torch
from safetensors.torch import load_file

import test_distributed
from llmkit.models import load_model
from llmkit.train import pretrain as pretrain_recipe
from test_distributed import (
    WORLD,
    _BothRanksSampler,
    _in_process,
    loss_rows,
    max_diff,
    overrides,
    torchrun,
    weights,
)

corpus = test_distributed.corpus  # the fixture: ~100 KB of tinyshakespeare, a char tokenizer, its shards

MOE = dict(model__dropout=0.0, model__d_ff=48, model__activation="swiglu", model__bias="false", train__grad_accum=2, train__max_steps=8, train__decay_steps=8,
           train__checkpoint_interval=4,
           # aux loss large enough to matter: it must be computed over both ranks' tokens to match
           model__moe="{experts: 4, top_k: 2, router_aux_loss: 0.1, router_z_loss: 0.01}")


def test_expert_parallel_equals_one_process_that_sees_both_batches(corpus, tmp_path, monkeypatch):
    ep_out = tmp_path / "ep"
    proc = torchrun(corpus, overrides(corpus, ep_out, train__expert_parallel="true", **MOE))
    assert re.search(r"experts sharded over 2 processes: 2 of 4 per process", proc.stderr), proc.stderr[-2000:]
    ep = weights(ep_out / "final")

    monkeypatch.setattr(pretrain_recipe, "WindowSampler", _BothRanksSampler)
    both = _in_process(corpus, tmp_path / "both-ranks", train__batch_size=WORLD * 4, **MOE)
    monkeypatch.undo()
    solo = _in_process(corpus, tmp_path / "rank0-alone", **MOE)
    assert both["step"] == solo["step"] == 8

    tol = 1e-5
    to_reference = max_diff(ep, weights(tmp_path / "both-ranks" / "final"))
    to_rank0_alone = max_diff(ep, weights(tmp_path / "rank0-alone" / "final"))
    assert to_reference < tol, f"expert-parallel differs from the one-process reference by {to_reference:.3g}"
    assert to_rank0_alone > 100 * tol, f"rank 0 alone is only {to_rank0_alone:.3g} away: test cannot tell"
    # the logged loss is the mean over both ranks: what the one process sees (router losses included)
    ep_losses, ref_losses = [r["loss"] for r in loss_rows(ep_out)], [r["loss"] for r in loss_rows(tmp_path / "both-ranks")]
    assert len(ep_losses) == len(ref_losses) == 8
    assert max(abs(a - b) for a, b in zip(ep_losses, ref_losses)) < 1e-4

    # the checkpoint and the final model hold all 4 experts, gathered from both processes
    tensors = load_file(str(ep_out / "checkpoints" / "step-000008" / "model.safetensors"))
    assert tuple(tensors["blocks.0.mlp.gate"].shape) == (4, 48, 32)
    optim = torch.load(ep_out / "checkpoints" / "step-000008" / "optimizer.pt", weights_only=True)["optimizer"]
    assert tuple(optim["state"]["blocks.0.mlp.down"]["exp_avg"].shape) == (4, 32, 48)
    assert load_model(ep_out / "final").blocks[0].mlp.gate.shape == (4, 48, 32)


def test_expert_parallel_resumes_exactly(corpus, tmp_path):
    """Stopped at step 4 and resumed to 8: the same losses and weights as the uninterrupted run."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    torchrun(corpus, overrides(corpus, whole, train__expert_parallel="true", **MOE))
    torchrun(corpus, overrides(corpus, split, train__expert_parallel="true", **{**MOE, "train__max_steps": 4}))
    proc = torchrun(corpus, ["--resume", *overrides(corpus, split, train__expert_parallel="true", **MOE)])
    assert re.search(r"resumed from \S+step-000004 at step 4", proc.stderr), proc.stderr[-2000:]
    assert [r["loss"] for r in loss_rows(split)][4:] == [r["loss"] for r in loss_rows(whole)][4:]
    a, b = weights(split / "final"), weights(whole / "final")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_expert_parallel_refuses_what_it_cannot_shard(corpus, tmp_path):
    import pytest

    with pytest.raises(ValueError, match="no mixture-of-experts layers"):
        _in_process(corpus, tmp_path / "dense", train__expert_parallel="true", train__max_steps=1)
    with pytest.raises(ValueError, match="needs train.strategy ddp"):
        _in_process(corpus, tmp_path / "fsdp", train__expert_parallel="true", train__strategy="fsdp",
                    train__max_steps=1, **{k: v for k, v in MOE.items() if k.startswith("model")})
