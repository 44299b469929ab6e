"""Pretraining end to end on a slice of tinyshakespeare: exact resume, preemption, refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_overrides
from llmkit.config import ConfigError, load_config
from llmkit.train.checkpoint import list_checkpoints, verify_checkpoint
from llmkit.train.pretrain import PretrainConfig, pretrain

STEPS = 40


def losses(out_dir: Path) -> dict[int, float]:
    """step -> training loss; each step must appear once (a resume drops rows after its checkpoint)."""
    out = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            assert row["step"] not in out, f"step {row['step']} logged twice in {out_dir}/metrics.jsonl"
            out[row["step"]] = row["loss"]
    return out


def config(out_dir, data, **extra):
    return load_config(PretrainConfig, None, tiny_overrides(out_dir, *data, **extra))


@pytest.fixture(scope="module")
def straight(shakespeare_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    summary = pretrain(config(out, shakespeare_small, **{"train.decay_steps": STEPS}))
    return out, summary


def test_straight_run_learns_and_writes_a_model(straight):
    out, summary = straight
    curve = losses(out)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] - 0.5
    assert summary["val_loss"] is not None and summary["val_bpb"] > 0
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [20, 30, 40]  # keep_checkpoints=3


@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_resume_continues_exactly(straight, shakespeare_small, tmp_path, sampling):
    """N steps, stop, resume N more: every loss equals the uninterrupted run's, bit for bit."""
    ref = straight[0]
    if sampling != "random":
        ref = tmp_path / "ref"
        pretrain(config(ref, shakespeare_small, **{"train.decay_steps": STEPS, "train.sampling": sampling}))
    out = tmp_path / "run"
    first = pretrain(config(out, shakespeare_small, **{"train.decay_steps": STEPS, "train.max_steps": STEPS // 2,
                                                      "train.sampling": sampling}))
    assert first["step"] == STEPS // 2
    pretrain(config(out, shakespeare_small, **{"train.decay_steps": STEPS, "train.sampling": sampling}), resume=True)
    assert losses(out) == losses(ref)


def test_existing_checkpoints_are_not_overwritten_without_resume(straight, shakespeare_small):
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(config(straight[0], shakespeare_small))


def _cli(out: Path, data, extra: dict, *flags) -> list[str]:
    cfg_file = out.parent / f"{out.name}.yaml"
    cfg_file.write_text(yaml.safe_dump({"out_dir": str(out)}))
    return [sys.executable, "-m", "llmkit", "pretrain", "--config", str(cfg_file), *flags,
            *tiny_overrides(out, *data, **extra)]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"  # read while the job writes: count complete rows only
    return sum(1 for line in path.read_text().split("\n")[:-1] if '"loss"' in line) if path.is_file() else 0


# A long schedule so the job is still running when the signal arrives; decay fixed so the resumed
# (shorter) run follows the same learning-rate curve.
LONG = {"train.max_steps": 100_000, "train.decay_steps": 1000, "train.checkpoint_interval": 25}


def test_sigterm_checkpoints_and_exits_zero_then_resumes_exactly(shakespeare_small, tmp_path):
    out = tmp_path / "preempted"
    proc = subprocess.Popen(_cli(out, shakespeare_small, LONG), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _steps_logged(out) >= 30, 120, "30 training steps")
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert elapsed < 10, f"took {elapsed:.1f}s to stop"
    stopped_at = max(losses(out))
    assert list_checkpoints(out / "checkpoints")[-1][0] == stopped_at  # checkpoint at the very step it stopped
    assert "stop signal" in err

    target = stopped_at + 10
    done = subprocess.run(_cli(out, shakespeare_small, {**LONG, "train.max_steps": target}, "--resume"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = tmp_path / "reference"
    subprocess.run(_cli(ref, shakespeare_small, {**LONG, "train.max_steps": target}), check=True,
                   capture_output=True, timeout=300)
    assert losses(out) == losses(ref)


def test_sigkill_at_any_moment_resumes_from_last_checkpoint(shakespeare_small, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(out, shakespeare_small, LONG), stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: len(list_checkpoints(out / "checkpoints")) >= 2, 120, "two checkpoints")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    last = list_checkpoints(out / "checkpoints")[-1][0]
    for _, path in list_checkpoints(out / "checkpoints"):  # whatever the kill interrupted is not listed
        verify_checkpoint(path)
    target = last + 15
    subprocess.run(_cli(out, shakespeare_small, {**LONG, "train.max_steps": target}, "--resume"), check=True,
                   capture_output=True, timeout=300)
    ref = tmp_path / "reference"
    subprocess.run(_cli(ref, shakespeare_small, {**LONG, "train.max_steps": target}), check=True,
                   capture_output=True, timeout=300)
    assert losses(out) == losses(ref)


def test_cli_refuses_unknown_key_naming_key_and_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  n_layers: 4\n")
    r = subprocess.run([sys.executable, "-m", "llmkit", "pretrain", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "bad.yaml" in r.stderr and "model.n_layers" in r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
    ("model.d_model=102", "model.n_head: 4 does not divide d_model=102"),
    ("train.batch_size=0", "train.batch_size: must be >= 1"),
    ("train.nonsense=1", "unknown key 'train.nonsense'"),
    ("train.attention=fast", "train.attention: 'fast' is not one of"),
])
def test_bad_values_are_refused_before_work(override, message, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  n_head: 4\ndata:\n  tokenizer: tok\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(PretrainConfig, cfg, [override])


@pytest.fixture(scope="module")
def objective_tokenizer(shakespeare_small, tmp_path_factory):
    """A char tokenizer with the <|mask|> and sentinel tokens the mlm / span objectives need."""
    from llmkit.tokenizer import train_char
    from llmkit.train.objectives import MASK_TOKEN, sentinel_token

    text_file, _ = shakespeare_small
    tok_dir = tmp_path_factory.mktemp("tok_enc")
    train_char([text_file.read_text(encoding="utf-8")],
               extra_special_tokens=[MASK_TOKEN] + [sentinel_token(i) for i in range(16)]).save(tok_dir)
    return text_file, tok_dir


@pytest.mark.parametrize("family", ["encoder", "encdec"])
def test_other_families_learn_and_resume_exactly(family, objective_tokenizer, tmp_path):
    """The one trainer loop serves masked-LM (encoder) and span corruption (encoder-decoder): the loss falls,
    and a resumed run re-draws the same masks and spans (they come from the checkpointed RNG)."""
    extra = {"model.family": family, "train.decay_steps": STEPS}
    straight = tmp_path / "straight"
    summary = pretrain(config(straight, objective_tokenizer, **extra))
    curve = losses(straight)
    assert sum(list(curve.values())[-5:]) / 5 < sum(list(curve.values())[:5]) / 5 - 0.3
    assert summary["val_bpb"] is None  # bits per byte only means something for next-token prediction
    out = tmp_path / "resumed"
    pretrain(config(out, objective_tokenizer, **extra, **{"train.max_steps": STEPS // 2}))
    pretrain(config(out, objective_tokenizer, **extra), resume=True)
    assert losses(out) == curve
    from llmkit.models import load_model

    assert type(load_model(out / "final")).__name__ == {"encoder": "Encoder", "encdec": "EncoderDecoder"}[family]


def test_objective_must_fit_the_family(objective_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="train.objective: 'mlm' does not fit a decoder"):
        pretrain(config(tmp_path / "x", objective_tokenizer, **{"train.objective": "mlm"}))
