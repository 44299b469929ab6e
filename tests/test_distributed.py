"""Distributed pretraining on CPU: 2 processes over gloo, launched by torchrun like a real job.

Every run is tiny (1 layer, d_model 32, 20 steps): what is tested is the plumbing, i.e. gradients
averaged across ranks, FSDP sharding and gathering, full-state checkpoints, and exact resume with the
samplers and RNG states of every rank. docs/distributed.md describes the same launches.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import shared_file
from llmkit.config import load_config
from llmkit.models import load_model
from llmkit.train import pretrain as pretrain_recipe
from llmkit.train.pretrain import PretrainConfig, pretrain
from llmkit.train.sampler import WindowSampler

BATCH, BLOCK, WORLD = 4, 32, 2
TIMEOUT = 120  # seconds per torchrun launch; a run takes ~4 s


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """~100 KB of tinyshakespeare, a char tokenizer, and its tokenized shards (shared by every run)."""
    from llmkit.data.tokenized import prepare_tokens
    from llmkit.tokenizer import Tokenizer, train_char

    shakespeare = shared_file("en/tinyshakespeare.txt")
    root = tmp_path_factory.mktemp("dist-corpus")
    text = root / "shakespeare.txt"
    text.write_text(shakespeare.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    train_char([text.read_text(encoding="utf-8")]).save(root / "tok")
    prepare_tokens([str(text)], Tokenizer.load(root / "tok"), root / "data", val_fraction=0.1)
    (root / "empty.yaml").write_text("{}\n")
    return {"text": text, "tok": root / "tok", "data": root / "data", "config": root / "empty.yaml"}


def overrides(corpus: dict[str, Path], out_dir: Path, **extra) -> list[str]:
    """A 1-layer model that trains 20 steps in about a second; `train__lr=...` sets `train.lr`."""
    base = {
        "out_dir": out_dir, "data.inputs": f"[{corpus['text']}]", "data.tokenizer": corpus["tok"],
        "data.prepared": corpus["data"],
        "model.n_layer": 1, "model.d_model": 32, "model.n_head": 2, "model.block_size": BLOCK,
        "model.dropout": 0.1,  # dropout draws from the torch RNG: exact resume must restore it per rank
        "train.batch_size": BATCH, "train.max_steps": 20, "train.decay_steps": 20, "train.warmup_steps": 2,
        "train.lr": 1e-2, "train.min_lr": 1e-3, "train.eval_interval": 20, "train.eval_batches": 2,
        "train.log_interval": 1, "train.checkpoint_interval": 10,
        "train.progress": False, "track.enabled": False,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def torchrun(corpus: dict[str, Path], args: list[str], nproc: int = WORLD) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m llmkit pretrain ...` (a free loopback port per run)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llmkit", "pretrain", "--config", str(corpus["config"]), *args]
    # own session, so that a hung run can be killed with its workers (killing torchrun alone orphans them)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            pytest.fail(f"torchrun did not finish in {TIMEOUT} s\n--- stdout\n{_text(stdout)[-3000:]}\n"
                        f"--- stderr\n{_text(stderr)[-6000:]}")
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def summaries(stdout: str) -> list[dict]:
    """The JSON summaries on stdout. Every rank prints one, and two ranks' lines may share a line."""
    decoder, found = json.JSONDecoder(), []
    for line in stdout.splitlines():
        i = line.find("{")
        while i != -1:
            obj, end = decoder.raw_decode(line, i)
            found.append(obj)
            i = line.find("{", end)
    return found


def loss_rows(out_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def eval_rows(out_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return dict(load_model(model_dir).state_dict())


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """2-process DDP, 20 steps, checkpoints at 10 and 20: the uninterrupted reference for the tests below."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, torchrun(corpus, overrides(corpus, out))


@pytest.fixture(scope="module")
def fsdp_run(corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The same run as `ddp_run`, sharded with FSDP2."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    return out, torchrun(corpus, overrides(corpus, out, train__strategy="fsdp"))


def test_ddp_two_processes_trains_and_saves(ddp_run):
    out, proc = ddp_run
    summary = summaries(proc.stdout)[-1]
    # two processes, each with its own micro-batch: tokens/step = batch * accum * block * world
    if "tokens_per_step" in summary:
        tokens, world = summary["tokens_per_step"], summary["world_size"]
    else:  # read rank 0's log line "model: ... 256 tokens/step on 2 process(es), ..."
        m = re.search(r"(\d+) tokens/step on (\d+) process", proc.stderr)
        assert m, proc.stderr[-2000:]
        tokens, world = int(m.group(1)), int(m.group(2))
    assert (tokens, world) == (BATCH * 1 * BLOCK * WORLD, WORLD)
    assert summary["step"] == 20 and not summary["stopped_by_signal"]
    assert Path(summary["final_model"]) == out / "final"

    model = load_model(out / "final")
    assert model.config.n_layer == 1 and model.config.d_model == 32
    assert model.lm_head.weight is model.tok_emb.weight  # tied embeddings survive the round trip

    rows = loss_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 21))  # rank 0 alone writes metrics, once per step
    losses = [r["loss"] for r in rows]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses

    state = json.loads((out / "checkpoints" / "step-000020" / "state.json").read_text())
    assert state["world_size"] == WORLD
    samplers = state["data"]
    assert len(samplers) == WORLD and samplers[0] != samplers[1]  # one data stream per rank, both saved
    assert all(s["batches_drawn"] == 20 for s in samplers)


class _BothRanksSampler:
    """One process drawing what the two DDP ranks draw: rank 0's micro-batch then rank 1's, as one batch.

    Stands in for `WindowSampler` in a single-process run with batch_size 2B: the mean loss over the
    2B windows is the mean of the two ranks' mean losses, i.e. what DDP's all-reduce averages.
    """

    def __init__(self, split, batch_size, block_size, seed, rank=0):
        assert rank == 0 and batch_size % WORLD == 0
        self.streams = [WindowSampler(split, batch_size // WORLD, block_size, seed, r) for r in range(WORLD)]

    def next_batch(self):
        xs, ys = zip(*(s.next_batch() for s in self.streams))
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self) -> dict:
        return {"ranks": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        for s, st in zip(self.streams, state["ranks"]):
            s.load_state_dict(st)


def _in_process(corpus, out_dir: Path, resume: bool = False, **extra) -> dict:
    cfg = load_config(PretrainConfig, None, overrides(corpus, out_dir, **extra))
    return pretrain(cfg, resume=resume)


def test_ddp_averages_gradients_across_ranks(corpus, tmp_path, monkeypatch):
    """2-process DDP == one process that sees both ranks' batches; != either rank on its own.

    What can be checked: the samplers are seeded by (seed, rank), so rank 1 draws a stream no
    single-process run draws; a plain 1-process run with grad_accum=2 sees stream (seed, 0) twice as long
    and is *not* the same computation as DDP. So the reference replays both ranks' streams in one process
    (`_BothRanksSampler`, batch 2B, same grad_accum, same optimizer, schedule and clipping: the trainer's
    own code): if DDP averages the ranks' gradients, both runs end with the same weights up to float
    rounding (tolerance `tol`). Dropout is off, since the reference cannot replay the per-rank dropout masks.

    The test can fail: the negative control is what rank 0 would compute if gradients were not
    synchronised (its own stream only), and it must sit far outside the tolerance. Not checkable here: a
    sum instead of a mean over ranks, which AdamW (scale-invariant up to eps) and clipping hide.
    grad_accum=2 also exercises DDP's no_sync() on the first micro-batch.
    """
    common = dict(model__dropout=0.0, train__grad_accum=2, train__max_steps=10, train__decay_steps=10)
    ddp_out = tmp_path / "ddp"
    torchrun(corpus, overrides(corpus, ddp_out, **common))
    ddp = weights(ddp_out / "final")

    solo = _in_process(corpus, tmp_path / "rank0-alone", **common)
    monkeypatch.setattr(pretrain_recipe, "WindowSampler", _BothRanksSampler)
    both = _in_process(corpus, tmp_path / "both-ranks", train__batch_size=WORLD * BATCH, **common)
    assert solo["step"] == both["step"] == 10

    tol = 1e-5
    to_reference = max_diff(ddp, weights(tmp_path / "both-ranks" / "final"))
    to_rank0_alone = max_diff(ddp, weights(tmp_path / "rank0-alone" / "final"))
    assert to_reference < tol, f"DDP differs from the two-stream reference by {to_reference:.3g}"
    assert to_rank0_alone > 100 * tol, f"rank 0 alone is only {to_rank0_alone:.3g} away: test cannot tell"


def test_fsdp_two_processes_trains_checkpoints_and_loads(ddp_run, fsdp_run):
    out, proc = fsdp_run
    assert summaries(proc.stdout)[-1]["step"] == 20
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000010", "step-000020"]

    # the final model loads in this plain (non-distributed) process, tied embeddings intact
    model = load_model(out / "final")
    assert model.lm_head.weight is model.tok_emb.weight
    # FSDP's reduce-scatter averages exactly what DDP's all-reduce averages: same run, same weights
    assert max_diff(weights(out / "final"), weights(ddp_run[0] / "final")) < 1e-4
    fsdp_losses, ddp_losses = [r["loss"] for r in loss_rows(out)], [r["loss"] for r in loss_rows(ddp_run[0])]
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-4)

    # checkpoints hold *full* tensors, not rank 0's shard: model and AdamW moments at full shape
    ckpt = out / "checkpoints" / "step-000020"
    tensors = load_file(str(ckpt / "model.safetensors"))
    full = model.state_dict()
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in full.items()}
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]
    assert set(optim["state"]) >= {"tok_emb.weight", "blocks.0.attn.qkv.weight"}
    for name, st in optim["state"].items():
        assert not hasattr(st["exp_avg"], "device_mesh"), f"{name}: DTensor in checkpoint"
        assert tuple(st["exp_avg"].shape) == tuple(full[name].shape), name


def test_fsdp_checkpoint_resumes_in_one_process(corpus, fsdp_run, tmp_path, caplog):
    """A full-state checkpoint from 2 FSDP processes continues in 1 process (data order then differs)."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(fsdp_run[0] / "checkpoints", out / "checkpoints")
    with caplog.at_level("INFO", logger="llmkit.train.loop"):
        summary = _in_process(corpus, out, resume=True, train__max_steps=24, train__decay_steps=24)
    assert "written by 2 processes, now 1" in caplog.text
    assert "at step 20" in caplog.text
    assert summary["step"] == 24 and summary["final_model"]
    assert [r["step"] for r in loss_rows(out)] == [21, 22, 23, 24]
    assert all(r["loss"] < 3.5 for r in loss_rows(out))  # trained weights and optimizer, not a fresh model


def test_resume_two_processes_matches_uninterrupted_run(corpus, ddp_run, tmp_path):
    """Stop at step 10, `--resume` to 20: steps 11..20 reproduce the uninterrupted run bit for bit.

    decay_steps is fixed at 20 in both, so the LR schedule does not depend on max_steps; dropout is on,
    so the per-rank torch RNG states must come back from the checkpoint, as must each rank's sampler.
    """
    out = tmp_path / "run"
    torchrun(corpus, overrides(corpus, out, train__max_steps=10))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000010"]
    proc = torchrun(corpus, ["--resume", *overrides(corpus, out, train__max_steps=20)])
    assert re.search(r"resumed from \S+step-000010 at step 10", proc.stderr), proc.stderr[-2000:]
    assert summaries(proc.stdout)[-1]["step"] == 20

    resumed, reference = loss_rows(out), loss_rows(ddp_run[0])
    assert [r["step"] for r in resumed] == list(range(1, 21))  # 1..10 before the stop, 11..20 after
    assert [r["loss"] for r in resumed[10:]] == [r["loss"] for r in reference[10:]]
    assert eval_rows(out)[-1]["val_loss"] == eval_rows(ddp_run[0])[-1]["val_loss"]
    final, ref_final = weights(out / "final"), weights(ddp_run[0] / "final")
    assert all(torch.equal(final[k], ref_final[k]) for k in ref_final)
