import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# `make test` fills this with `llmkit samples fetch` (copied from a local mirror, else downloaded) before
# pytest starts, so a fresh clone runs every test; LLMKIT_SAMPLES points elsewhere.
SAMPLES = Path(os.environ.get("LLMKIT_SAMPLES", REPO / "data" / "samples"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def shared_file(rel: str) -> Path:
    """A sample corpus file (`SAMPLES/rel`, e.g. "en/tinyshakespeare.txt"); a missing one skips the test."""
    path = SAMPLES / rel
    if not path.is_file():
        pytest.skip(f"sample file {path} is missing: run `llmkit samples fetch` (make test does)")
    return path


# Under CI=true a skipped test fails the run: whatever a test needs, the setup must install, so a skip
# means a user's machine would silently run less than CI claims to have checked.
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if IN_CI and _skipped and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if IN_CI and _skipped:
        terminalreporter.section("skips fail the run under CI=true", sep="=", red=True, bold=True)
        for line in _skipped:
            terminalreporter.line(line)


@pytest.fixture(scope="session")
def shakespeare_small(tmp_path_factory) -> tuple[Path, Path]:
    """First 200 KB of tinyshakespeare and a char tokenizer trained on it: (text file, tokenizer dir)."""
    from llmkit.tokenizer import train_char

    root = tmp_path_factory.mktemp("shakespeare")
    text = shared_file("en/tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    text_file = root / "shakespeare.txt"
    text_file.write_text(text, encoding="utf-8")
    tok_dir = root / "tok"
    train_char([text]).save(tok_dir)
    return text_file, tok_dir


def tiny_overrides(out_dir: Path, text_file: Path, tok_dir: Path, **extra) -> list[str]:
    """`key=value` overrides for a model that trains a step in milliseconds."""
    base = {
        "out_dir": str(out_dir), "data.inputs": f"[{text_file}]", "data.tokenizer": str(tok_dir),
        "model.n_layer": 2, "model.d_model": 32, "model.n_head": 2, "model.block_size": 32,
        "model.dropout": 0.1,  # dropout consumes RNG: exact resume must restore it
        "train.batch_size": 4, "train.max_steps": 40, "train.warmup_steps": 5, "train.eval_interval": 20,
        "train.eval_batches": 2, "train.log_interval": 1, "train.checkpoint_interval": 10,
        "train.progress": False, "track.enabled": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def last_logged_step(metrics: Path) -> int:
    """The highest step of a loss row in a run's metrics.jsonl (0 when none yet); tolerates a half-written line."""
    step = 0
    with contextlib.suppress(FileNotFoundError):
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if "loss" in row:
                    step = max(step, row["step"])
    return step


@contextlib.contextmanager
def sigterm_at_step(metrics: Path, step: int, timeout_s: float = 300):
    """Send this process SIGTERM once the run writing `metrics` has logged `step`, as a spot reclaim would.

    The training loop's handler replaces ours while it runs; ours ignores a signal that arrives after it."""
    done = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: None)

    def watch():
        deadline = time.monotonic() + timeout_s
        while not done.is_set() and time.monotonic() < deadline:
            if last_logged_step(metrics) >= step:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGTERM, previous)
