"""Composable layouts (`train.parallel: {dp, fsdp, tp}`) on CPU: gloo processes launched by torchrun.

What must hold: every layout trains the same model as one process that sees the same batches (fp rounding
aside), and a distributed checkpoint written under one layout resumes under another with the same
continuation. The runs are tiny (2 layers, d_model 32, 20 steps, dropout 0 so that layouts can be compared).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import test_distributed
from llmkit.config import load_config
from llmkit.models import DecoderConfig
from llmkit.models.io import build_model
from llmkit.runtime import DistInfo
from llmkit.train import mesh
from llmkit.train.loop import replay_source
from llmkit.train.pretrain import PretrainConfig, pretrain
from test_distributed import loss_rows, max_diff, overrides, torchrun, weights

corpus = test_distributed.corpus  # the fixture: ~100 KB of tinyshakespeare, a char tokenizer, its shards

TOL = 1e-4  # as tests/test_distributed.py: 20 AdamW steps at lr 1e-2 magnify reduction-order rounding


def layout_overrides(corpus, out: Path, **extra) -> list[str]:
    model = {"model__n_layer": 2, "model__d_ff": 64, "model__n_kv_head": 2, "model__dropout": 0.0}
    return overrides(corpus, out, **{**model, **extra})


def run_here(corpus, out: Path, resume: bool = False, **extra) -> dict:
    cfg = load_config(PretrainConfig, corpus["config"], layout_overrides(corpus, out, **extra))
    return pretrain(cfg, resume=resume)


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory) -> Path:
    """The reference: one process, `train.parallel` with every degree 1 (data rank 0's batches)."""
    out = tmp_path_factory.mktemp("one") / "run"
    run_here(corpus, out, train__parallel__tp=1)
    return out


@pytest.fixture(scope="module")
def fsdp2(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    torchrun(corpus, layout_overrides(corpus, out, train__parallel__fsdp=2), nproc=2)
    return out


def test_tensor_parallel_equals_one_process(corpus, one_process, tmp_path):
    """tp=2: heads, MLP units and the vocabulary split over 2 processes, sequence parallel between the
    sub-layers; the one data-parallel rank sees rank 0's batches, as the single process does."""
    out = tmp_path / "tp2"
    torchrun(corpus, layout_overrides(corpus, out, train__parallel__tp=2), nproc=2)
    assert max_diff(weights(out / "final"), weights(one_process / "final")) < TOL
    ours, ref = loss_rows(out), loss_rows(one_process)
    assert [r["step"] for r in ours] == [r["step"] for r in ref]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, ref)) < TOL
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.3  # it trains


def test_parallel_fsdp_equals_ddp(corpus, fsdp2, tmp_path):
    """Through the mesh, fsdp=2 averages gradients exactly as DDP does (which tests/test_distributed.py checks
    against one process seeing both ranks' batches)."""
    ddp = tmp_path / "ddp"
    torchrun(corpus, layout_overrides(corpus, ddp), nproc=2)
    assert max_diff(weights(fsdp2 / "final"), weights(ddp / "final")) < TOL


def test_bf16_gathers_in_bf16_and_keeps_fp32_master_weights(corpus, tmp_path):
    """train.precision bf16 under fsdp 2 (FSDP's mixed-precision policy: bf16 gathers, fp32 reductions): the
    run tracks DDP under bf16 autocast within bf16 rounding, and the saved (master) weights stay fp32."""
    fsdp, ddp = tmp_path / "fsdp-bf16", tmp_path / "ddp-bf16"
    torchrun(corpus, layout_overrides(corpus, fsdp, train__parallel__fsdp=2, train__precision="bf16"), nproc=2)
    torchrun(corpus, layout_overrides(corpus, ddp, train__precision="bf16"), nproc=2)
    ours, ref = loss_rows(fsdp), loss_rows(ddp)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, ref)) < 0.02  # bf16 rounding, not equality
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.3
    assert all(v.dtype == torch.float32 for v in weights(fsdp / "final").values())


def test_fsdp_times_tp_equals_fsdp(corpus, fsdp2, tmp_path):
    """fsdp 2 x tp 2 on 4 processes (HSDP replicas too: dp 2 x tp 2) train what fsdp 2 on 2 processes does:
    same data-parallel ranks, same batches."""
    for name, extra in (("fsdp_tp", {"train__parallel__fsdp": 2, "train__parallel__tp": 2}),
                        ("dp_tp", {"train__parallel__dp": 2, "train__parallel__tp": 2})):
        out = tmp_path / name
        torchrun(corpus, layout_overrides(corpus, out, **extra), nproc=4)
        assert max_diff(weights(out / "final"), weights(fsdp2 / "final")) < TOL, name
        assert abs(loss_rows(out)[-1]["loss"] - loss_rows(fsdp2)[-1]["loss"]) < TOL, name


def test_checkpoint_reshards_to_another_layout(corpus, fsdp2, tmp_path):
    """Stopped at step 10 under fsdp 2 (2 processes), resumed under fsdp 2 x tp 2 (4 processes): weights,
    AdamW moments and data order carry over, so steps 11-20 equal the uninterrupted fsdp 2 run."""
    out = tmp_path / "reshard"
    torchrun(corpus, layout_overrides(corpus, out, train__parallel__fsdp=2, train__max_steps=10), nproc=2)
    shards = out / "checkpoints" / "step-000010" / "shards"
    assert (shards / ".metadata").is_file() and not (shards.parent / "model.safetensors").exists()
    torchrun(corpus, [*layout_overrides(corpus, out, train__parallel__fsdp=2, train__parallel__tp=2), "--resume"],
             nproc=4)
    resumed = {r["step"]: r["loss"] for r in loss_rows(out)}
    reference = {r["step"]: r["loss"] for r in loss_rows(fsdp2)}
    assert sorted(resumed) == sorted(reference)
    assert max(abs(resumed[s] - reference[s]) for s in range(11, 21)) < TOL
    assert max_diff(weights(out / "final"), weights(fsdp2 / "final")) < TOL


def test_one_process_distributed_checkpoint_resumes_exactly(corpus, one_process, tmp_path):
    out = tmp_path / "resume"
    run_here(corpus, out, train__parallel__tp=1, train__max_steps=10)
    run_here(corpus, out, resume=True, train__parallel__tp=1)
    assert max_diff(weights(out / "final"), weights(one_process / "final")) == 0.0


def test_activation_checkpointing_changes_nothing_and_resumes(corpus, one_process, tmp_path):
    """Checkpoint-wrapped blocks: the same weights, and checkpoint names without the wrapper's prefix (a run
    with it resumes one without)."""
    out = tmp_path / "ac"
    run_here(corpus, out, train__parallel__activation_checkpointing="true", train__max_steps=10)
    run_here(corpus, out, resume=True, train__parallel__tp=1)
    assert max_diff(weights(out / "final"), weights(one_process / "final")) < 1e-6


def test_full_and_distributed_checkpoints_do_not_mix(corpus, tmp_path):
    out = tmp_path / "mixed"
    run_here(corpus, out, train__max_steps=10)
    with pytest.raises(ValueError, match="full checkpoint and this run sets train.parallel"):
        run_here(corpus, out, resume=True, train__parallel__tp=1)
    shutil.rmtree(out)
    run_here(corpus, out, train__parallel__tp=1, train__max_steps=10)
    with pytest.raises(ValueError, match="distributed checkpoint and this run does not set"):
        run_here(corpus, out, resume=True)


# -- pieces, in one process ------------------------------------------------------------------------------
def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64, block_size=16,
                        positions="rope", qkv_bias=True, **kw)
    return build_model(cfg)


def test_split_qkv_keeps_the_function_and_fuses_back():
    model = tiny()
    x = torch.randint(0, 50, (2, 10))
    before, state = model(x)[0], {k: v.clone() for k, v in model.state_dict().items()}
    mesh.split_qkv(model)
    assert "blocks.0.attn.qkv.k.bias" in model.state_dict()
    assert torch.allclose(model(x)[0], before, atol=1e-6)
    fused = mesh.fuse_qkv_state(model.state_dict())
    assert fused.keys() == state.keys()
    assert all(torch.equal(fused[k], state[k]) for k in state)


def test_parallel_config_and_model_checks():
    assert mesh.ParallelConfig(tp=2).resolve(8).as_dict() == {"pp": 1, "dp": 1, "fsdp": 4, "tp": 2}
    assert mesh.ParallelConfig(dp=2, tp=2).resolve(8).fsdp == 2
    resolved = mesh.ParallelConfig(pp=2, schedule="interleaved-1f1b").resolve(8)
    assert (resolved.fsdp, resolved.microbatches, resolved.stages_per_rank) == (4, 2, 2)
    with pytest.raises(ValueError, match="pp x dp x tp = 6 does not divide the 8"):
        mesh.ParallelConfig(dp=3, tp=2).resolve(8)
    with pytest.raises(ValueError, match="= 12, but there are 8 processes"):
        mesh.ParallelConfig(dp=3, fsdp=2, tp=2).resolve(8)
    with pytest.raises(ValueError, match="stages_per_rank: 2 needs schedule interleaved-1f1b"):
        mesh.ParallelConfig(pp=2, stages_per_rank=2).resolve(2)
    with pytest.raises(ValueError, match="4 pipeline stages need at least as many blocks, the model has 2"):
        mesh.check_model(tiny(tie_embeddings=False), mesh.ParallelConfig(pp=4))
    with pytest.raises(ValueError, match="tp=8 does not divide model.n_head"):
        mesh.check_model(tiny(), mesh.ParallelConfig(tp=8))
    with pytest.raises(ValueError, match="tp=4 does not divide the key/value heads"):
        mesh.check_model(tiny(), mesh.ParallelConfig(tp=4))
    mesh.check_model(tiny(), mesh.ParallelConfig(tp=2))


def test_replay_source_maps_data_ranks_across_layouts():
    info = lambda rank, world: DistInfo(rank=rank, world_size=world)  # noqa: E731
    fsdp2, fsdp2_tp2 = {"dp": 1, "fsdp": 2, "tp": 1}, {"dp": 1, "fsdp": 2, "tp": 2}
    assert replay_source(None, None, 2, info(1, 2)) == 1  # plain DDP, same world
    assert replay_source(None, None, 2, info(1, 4)) is None  # plain DDP, other world: restart the data
    assert [replay_source(fsdp2, fsdp2_tp2, 2, info(r, 4)) for r in range(4)] == [0, 0, 1, 1]
    assert [replay_source(fsdp2_tp2, fsdp2, 4, info(r, 2)) for r in range(2)] == [0, 2]
    assert replay_source({"dp": 1, "fsdp": 4, "tp": 1}, fsdp2_tp2, 4, info(0, 4)) is None  # 4 data ranks -> 2
    assert replay_source(None, fsdp2, 2, info(0, 2)) is None



def test_pipeline_with_tied_embeddings_equals_one_process_and_reshards(corpus, one_process, tmp_path):
    """pp 2 x tp 2 on a tied model: the first stage's embedding and the last stage's head are two copies whose
    gradients are summed once per step (the embedding's, a pending sum over the vocabulary shards under tp,
    laid out as the head's first); equal to one process (tied), and its step-10 checkpoint (AdamW state
    stored under tok_emb.weight) resumes in one process to the same end."""
    out = tmp_path / "pp2-tied"
    torchrun(corpus, layout_overrides(corpus, out, train__parallel__pp=2, train__parallel__tp=2), nproc=4)
    assert max_diff(weights(out / "final"), weights(one_process / "final")) < TOL
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(loss_rows(out), loss_rows(one_process))) < TOL
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-000010", resumed / "checkpoints" / "step-000010")
    run_here(corpus, resumed, resume=True, train__parallel__tp=1)
    assert max_diff(weights(resumed / "final"), weights(one_process / "final")) < TOL


# -- pipeline parallel, 4 blocks, untied embeddings ------------------------------------------------------
def pipeline_overrides(corpus, out: Path, **extra) -> list[str]:
    return layout_overrides(corpus, out, model__n_layer=4, model__tie_embeddings=False, **extra)


@pytest.fixture(scope="module")
def one_untied(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-untied") / "run"
    cfg = load_config(PretrainConfig, corpus["config"], pipeline_overrides(corpus, out, train__parallel__tp=1))
    pretrain(cfg)
    return out


def test_pipeline_two_stages_equals_one_process(corpus, one_untied, tmp_path):
    """pp=2, 1F1B over 2 micro-batches: blocks 0-1 and the embeddings on one process, 2-3 and the head on the
    other; with activation checkpointing (recomputation changes no number)."""
    out = tmp_path / "pp2"
    torchrun(corpus, pipeline_overrides(corpus, out, train__parallel__pp=2,
                                        train__parallel__activation_checkpointing="true"), nproc=2)
    assert max_diff(weights(out / "final"), weights(one_untied / "final")) < TOL
    ours, ref = loss_rows(out), loss_rows(one_untied)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, ref)) < TOL


def test_interleaved_pipeline_with_tensor_parallel_reshards_to_one_process(corpus, one_untied, tmp_path):
    """pp 2 x tp 2, interleaved 1F1B (2 stages per process, 4 micro-batches) equals one process; its step-10
    checkpoint then resumes in one process without any parallelism and ends where the reference does."""
    out = tmp_path / "pp2tp2"
    torchrun(corpus, pipeline_overrides(corpus, out, train__parallel__pp=2, train__parallel__tp=2,
                                        train__parallel__schedule="interleaved-1f1b",
                                        train__parallel__microbatches=4), nproc=4)
    assert max_diff(weights(out / "final"), weights(one_untied / "final")) < TOL
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-000010", resumed / "checkpoints" / "step-000010")
    cfg = load_config(PretrainConfig, corpus["config"], pipeline_overrides(corpus, resumed, train__parallel__tp=1))
    pretrain(cfg, resume=True)
    assert max_diff(weights(resumed / "final"), weights(one_untied / "final")) < TOL


def test_pipeline_with_fsdp_reshards_to_fsdp(corpus, tmp_path):
    """pp 2 x fsdp 2 (GPipe) for 10 steps, resumed as fsdp 2 without stages: equal to fsdp 2 throughout."""
    ref, out = tmp_path / "fsdp2", tmp_path / "pp2fsdp2"
    torchrun(corpus, pipeline_overrides(corpus, ref, train__parallel__fsdp=2), nproc=2)
    torchrun(corpus, pipeline_overrides(corpus, out, train__parallel__pp=2, train__parallel__fsdp=2,
                                        train__parallel__schedule="gpipe", train__max_steps=10), nproc=4)
    torchrun(corpus, [*pipeline_overrides(corpus, out, train__parallel__fsdp=2), "--resume"], nproc=2)
    ours, theirs = {r["step"]: r["loss"] for r in loss_rows(out)}, {r["step"]: r["loss"] for r in loss_rows(ref)}
    assert sorted(ours) == sorted(theirs)
    assert max(abs(ours[s] - theirs[s]) for s in theirs) < TOL
    assert max_diff(weights(out / "final"), weights(ref / "final")) < TOL
