"""Elastic, fault-tolerant training: a worker SIGKILLed mid-run, torchrun restarts the group, the run
resumes from its newest checkpoint and ends where an uninterrupted run ends.

The kill comes from outside, as in real life (an OOM kill, a lost node): the test finds torchrun's worker
processes in /proc and SIGKILLs rank 0 (the process that writes checkpoints and metrics.jsonl) once a
checkpoint exists and a few steps past it are logged. torchrun (`--max-restarts 1`) restarts both
workers with the same command line, without `--resume`; `loop.open_run` resumes because
TORCHELASTIC_RESTART_COUNT > 0. docs/distributed.md, "Elastic and fault-tolerant runs", describes it.

The second test kills a process while it writes checkpoints, to check that a half-written checkpoint is
never taken for a whole one; the third checks when `open_run` resumes on its own under torchelastic.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import test_distributed
from llmkit.train import loop
from llmkit.train.checkpoint import (
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from test_distributed import eval_rows, loss_rows, max_diff, overrides, weights

corpus = test_distributed.corpus  # the fixture: ~100 KB of tinyshakespeare, a char tokenizer, its shards

WORLD = 2
STEPS = 60
KILL_AFTER = 10  # kill once a checkpoint at or past this step exists
TIMEOUT = 120  # seconds per torchrun launch (~10 s each on an idle 2-core machine, 20-35 s on a busy one)


def _elastic_overrides(corpus: dict[str, Path], out: Path) -> list[str]:
    """2 layers, d_model 64 (~10 ms a step), 60 steps, a checkpoint every 5, dropout on."""
    return overrides(corpus, out, model__n_layer=2, model__d_model=64, train__max_steps=STEPS,
                     train__decay_steps=STEPS, train__checkpoint_interval=5, train__eval_interval=30,
                     train__keep_checkpoints=2)


def _launch(corpus: dict[str, Path], args: list[str], log_dir: Path) -> subprocess.Popen:
    """`torchrun --nnodes 1:1 --nproc_per_node 2 --max-restarts 1` with a c10d rendezvous on a free port;
    stdout and stderr go to files (a pipe nobody reads while the test polls would fill and block)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("TORCHELASTIC_")}
    env["OMP_NUM_THREADS"] = "1"
    # Without this a restarted group reuses the agent's store, still holding the dead group's addresses:
    # gloo's init then hangs in about half the restarts (pytorch/pytorch#135712; docs/distributed.md).
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:1", "--nproc_per_node", str(WORLD),
           "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
           "-m", "llmkit", "pretrain", "--config", str(corpus["config"]), *args]
    log_dir.mkdir(parents=True, exist_ok=True)
    # own session, so that a hung torchrun can be killed (its workers have sessions of their own: _finish)
    return subprocess.Popen(cmd, env=env, stdout=open(log_dir / "stdout", "w"), stderr=open(log_dir / "stderr", "w"),
                            start_new_session=True)


def _finish(popen: subprocess.Popen, log_dir: Path) -> str:
    """Wait for torchrun; fail unless it exits 0. Returns its stderr (the workers' logs with it)."""
    try:
        popen.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        for pid in _workers(popen.pid).values():
            os.kill(pid, signal.SIGKILL)
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s\n{(log_dir / 'stderr').read_text()[-6000:]}")
    stderr = (log_dir / "stderr").read_text()
    if popen.returncode != 0:
        pytest.fail(f"torchrun exited {popen.returncode}\n--- stderr\n{stderr[-6000:]}")
    return stderr


def _workers(torchrun_pid: int) -> dict[int, int]:
    """{global rank: pid} of torchrun's live worker processes (its children that carry RANK)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # fields after "(comm)": state, ppid, ...
            if ppid != torchrun_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError):  # exited meanwhile
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def _logged_steps(out: Path) -> list[int]:
    try:
        return [r["step"] for r in loss_rows(out)]
    except (OSError, ValueError):  # not there yet, or a line half-written as we read it
        return []


def test_killed_worker_restarts_and_matches_uninterrupted_run(corpus, tmp_path):
    # the uninterrupted reference: the same command, nothing killed
    ref_out = tmp_path / "reference"
    t0 = time.monotonic()
    _finish(_launch(corpus, _elastic_overrides(corpus, ref_out), tmp_path / "ref-logs"), tmp_path / "ref-logs")
    t_ref = time.monotonic() - t0

    out, logs = tmp_path / "run", tmp_path / "run-logs"
    t0 = time.monotonic()
    popen = _launch(corpus, _elastic_overrides(corpus, out), logs)
    # kill rank 0 once a checkpoint exists and a few steps past it are logged (they will be replayed)
    killed_at, deadline = None, time.monotonic() + TIMEOUT
    while killed_at is None and popen.poll() is None and time.monotonic() < deadline:
        ckpts = [s for s, _ in list_checkpoints(out / "checkpoints")]
        logged = _logged_steps(out)
        if ckpts and max(ckpts) >= KILL_AFTER and logged and logged[-1] >= max(ckpts) + 2 and logged[-1] < STEPS:
            pid = _workers(popen.pid).get(0)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed_at = (max(ckpts), logged[-1])
        time.sleep(0.005)
    stderr = _finish(popen, logs)
    t_run = time.monotonic() - t0
    assert killed_at is not None, f"the run ended before a checkpoint and later steps were seen\n{stderr[-3000:]}"

    # torchrun saw the failure and restarted the group, which resumed on its own (no --resume given)
    assert re.search(r"failed \(exitcode: -9\) local_rank: 0", stderr), stderr[-3000:]
    assert "torchelastic job 'none' started again (restart 1 of this agent): resuming" in stderr, stderr[-3000:]
    m = re.search(r"resumed from \S+step-(\d+) at step (\d+)", stderr)
    assert m, stderr[-3000:]
    resumed = int(m.group(2))
    ckpt_seen, logged_seen = killed_at
    assert ckpt_seen <= resumed < STEPS and resumed % 5 == 0, (killed_at, resumed)

    # one history: every step once in metrics.jsonl, although steps past the checkpoint were logged twice
    assert [r["step"] for r in loss_rows(out)] == list(range(1, STEPS + 1))
    assert [r["step"] for r in eval_rows(out)] == [30, 60]
    # exact resume at the same world size: the restarted run ends where the uninterrupted one ends
    assert [r["loss"] for r in loss_rows(out)] == [r["loss"] for r in loss_rows(ref_out)]
    assert eval_rows(out)[-1]["val_loss"] == eval_rows(ref_out)[-1]["val_loss"]
    diff = max_diff(weights(out / "final"), weights(ref_out / "final"))
    assert diff <= 1e-6, f"final weights differ from the uninterrupted run's by {diff:.3g}"
    print(f"killed rank 0 with checkpoint {ckpt_seen} on disk and step {logged_seen} logged; resumed at "
          f"{resumed}; max |weight diff| {diff:.3g}; reference run {t_ref:.1f} s, killed run {t_run:.1f} s")


# -- a kill while a checkpoint is being written --------------------------------------------------------------
_WRITER = textwrap.dedent("""
    import sys, torch
    from llmkit.train.checkpoint import save_checkpoint
    root, step = sys.argv[1], int(sys.argv[2])
    while True:  # checkpoints back to back (~16 MB each) until killed
        step += 1
        model = {"w": torch.full((2048, 2048), float(step))}
        save_checkpoint(root, step, model, {"optimizer": {}}, {"ranks": []}, {"data": [step]}, keep=2)
""")


def test_checkpoint_killed_while_written_is_never_loaded(tmp_path):
    """SIGKILL a process that writes checkpoints back to back: what it leaves is either whole checkpoints
    (loaded, contents of their own step) or a temporary directory that nothing loads and the next save
    removes. Repeated until a kill has landed mid-write (a temporary directory left), at most 5 times."""
    root = tmp_path / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    mid_write, step = 0, 0
    for attempt in range(5):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(step)], env=env)
        deadline = time.monotonic() + 60
        while [s for s, _ in list_checkpoints(root)][-1:] <= [step] and time.monotonic() < deadline:
            time.sleep(0.01)  # until it has written one more checkpoint
        time.sleep(0.02 + 0.03 * attempt)
        writer.kill()
        assert writer.wait() == -signal.SIGKILL
        left = list(root.glob(".step-*.tmp-*"))
        mid_write += bool(left)

        latest = load_latest_checkpoint(root)
        assert latest is not None and latest.step == list_checkpoints(root)[-1][0] > step
        verify_checkpoint(latest.path)
        assert torch.equal(latest.model["w"], torch.full((2048, 2048), float(latest.step)))
        assert latest.state["data"] == [latest.step]
        step = latest.step
        # the next save (here, or the resumed run's) clears what the killed writer left
        save_checkpoint(root, step + 1, {"w": torch.full((2048, 2048), float(step + 1))}, {"optimizer": {}},
                        {"ranks": []}, {"data": [step + 1]}, keep=2)
        step += 1
        assert not list(root.glob(".step-*.tmp-*"))
        if mid_write:
            break
    assert mid_write, "no kill landed while a checkpoint was being written"
    print(f"a kill landed mid-write at attempt {attempt + 1}; the newest whole checkpoint was step {step - 1}")


# -- when a start under torchelastic resumes on its own ------------------------------------------------------
def _start(out: Path, monkeypatch, run_id: str, restart: int, resume: bool = False):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
    return loop.open_run(out, resume)


def _checkpoint(out: Path, step: int) -> None:
    save_checkpoint(out / "checkpoints", step, {"w": torch.zeros(2)}, {"optimizer": {}}, {"ranks": []},
                    {"data": [{}]})


def test_open_run_resumes_a_restarted_job_only(tmp_path, monkeypatch, caplog):
    """The decisions of `loop.open_run` under torchelastic, one process (the environment set by hand)."""
    out = tmp_path / "run"
    # first attempt, fresh out_dir: starts at step 0 and records the job
    assert _start(out, monkeypatch, "none", 0) is None
    assert (out / loop.ELASTIC_MARKER).read_text().strip() == "none"
    _checkpoint(out, 10)
    # torchrun restarts it (same command line, no --resume): it resumes, and says so
    with caplog.at_level("WARNING", logger="llmkit.train.loop"):
        assert _start(out, monkeypatch, "none", 1).step == 10
    assert "torchelastic job 'none' started again (restart 1 of this agent): resuming" in caplog.text
    # another launch (restart count 0) without --resume over those checkpoints is refused, and so are its
    # restarts: the refusal removed the marker, so no restart continues a run it refused to start over
    with pytest.raises(FileExistsError, match="pass --resume"):
        _start(out, monkeypatch, "none", 0)
    assert not (out / loop.ELASTIC_MARKER).exists()
    with pytest.raises(FileExistsError, match="pass --resume"):
        _start(out, monkeypatch, "none", 1)
    # an explicit --resume takes the run over, and its restarts resume
    assert _start(out, monkeypatch, "none", 0, resume=True).step == 10
    assert _start(out, monkeypatch, "none", 1).step == 10
    # a job with its own --rdzv-id resumes even where this agent counted no restart (another node failed, or
    # nodes joined or left); a job with another id does not
    assert _start(out, monkeypatch, "job-7", 0, resume=True).step == 10
    assert _start(out, monkeypatch, "job-7", 0).step == 10
    with pytest.raises(FileExistsError):
        _start(out, monkeypatch, "job-8", 1)
    # outside torchrun nothing changes
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    with pytest.raises(FileExistsError):
        loop.open_run(out, False)
    assert loop.open_run(out, True).step == 10
