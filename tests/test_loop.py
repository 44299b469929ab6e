"""The one training loop on a job small enough to check by hand: accumulation, schedule, resume refusals."""

import json

import pytest
import torch

from llmkit.track import TrackConfig, Tracker
from llmkit.train.checkpoint import save_checkpoint
from llmkit.train.loop import (
    Job,
    LoopConfig,
    forward_context,
    make_optimizer,
    open_run,
    restore_weights,
    train_loop,
)


class Rows:
    """A deterministic stream of regression rows with a resumable position."""

    def __init__(self, batch_size: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
        self.batch_size, self.pos = batch_size, 0

    def next(self):
        idx = torch.arange(self.pos, self.pos + self.batch_size) % len(self.x)
        self.pos += self.batch_size
        return self.x[idx], self.y[idx]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def run(out, groups_scale=None, facts=None, resume=False, **overrides):
    cfg = LoopConfig(**{"batch_size": 4, "max_steps": 6, "lr": 0.1, "warmup_steps": 0, "log_interval": 1,
                        "eval_interval": 3, "checkpoint_interval": 3, "progress": False, "weight_decay": 0.0,
                        "device": "cpu", **overrides})
    cfg.validate()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    checkpoint = open_run(out, resume)
    restore_weights(model, checkpoint)
    if groups_scale is None:
        groups = [(list(model.parameters()), 1.0)]
    else:
        groups = [(list(model[0].parameters()), 1.0), (list(model[1].parameters()), groups_scale)]
    rows = Rows(cfg.batch_size)

    def loss(batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x).squeeze(-1), y)

    job = Job(model=model, optimizer=make_optimizer(cfg, groups), next_batch=rows.next, loss=loss,
              evaluate=lambda: {"eval_loss": loss((rows.x, rows.y)).item()}, data=rows,
              autocast=forward_context(torch.device("cpu"), torch.float32), tokens=lambda b: len(b[0]),
              facts=facts or {})
    result = train_loop(cfg, job, out, Tracker(TrackConfig(enabled=False), out), checkpoint)
    return model, job, result


def test_accumulated_micro_batches_make_the_same_step_as_one_big_batch(tmp_path):
    big, _, _ = run(tmp_path / "big", batch_size=8, grad_accum=1, grad_clip=0.0)
    accumulated, _, _ = run(tmp_path / "acc", batch_size=4, grad_accum=2, grad_clip=0.0)
    unaccumulated, _, _ = run(tmp_path / "one", batch_size=4, grad_accum=1, grad_clip=0.0)
    for a, b in zip(big.parameters(), accumulated.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(big.parameters(), unaccumulated.parameters()))


def test_first_step_loss_is_the_mean_over_micro_batches(tmp_path):
    _, job, r = run(tmp_path / "acc", batch_size=4, grad_accum=2, max_steps=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    rows = Rows(4)
    expected = sum(torch.nn.functional.mse_loss(model(x).squeeze(-1), y).item() for x, y in (rows.next(), rows.next()))
    assert r.history[0]["loss"] == pytest.approx(expected / 2, rel=1e-6)


def test_every_group_follows_the_schedule_at_its_scale_and_ends_at_min_lr(tmp_path):
    _, job, r = run(tmp_path / "groups", groups_scale=10.0, max_steps=6, warmup_steps=2)
    lrs = [row["lr"] for row in r.history if "lr" in row]
    assert lrs[0] == pytest.approx(0.1 / 3)  # warmup: (step + 1) / (warmup + 1) of the peak
    assert max(lrs) == pytest.approx(0.1) and lrs[-1] < lrs[2]
    final = [g["lr"] for g in job.optimizer.param_groups]  # after the last step: the cosine's end, min_lr = lr/10
    assert final[0] == pytest.approx(0.01) and final[-1] == pytest.approx(0.1)


def test_resume_is_exact_and_metrics_tell_one_history(tmp_path):
    _, _, straight = run(tmp_path / "straight", max_steps=6, decay_steps=6)
    out = tmp_path / "cut"
    run(out, max_steps=4, decay_steps=6, checkpoint_interval=2)
    with (out / "metrics.jsonl").open("a") as f:  # a killed run logged a step past its last checkpoint
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    _, _, resumed = run(out, max_steps=6, decay_steps=6, resume=True)

    def untimed(history, after):
        return [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")} for r in history
                if r["step"] > after]

    assert untimed(resumed.history, 4) == untimed(straight.history, 4)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_written_for_other_facts_is_refused(tmp_path):
    run(tmp_path, facts={"labels": ["a", "b"]}, max_steps=3)
    with pytest.raises(ValueError, match="labels"):
        run(tmp_path, facts={"labels": ["a", "c"]}, max_steps=6, resume=True)


def test_a_checkpoint_of_another_world_size_is_refused_without_a_restart(tmp_path):
    run(tmp_path / "one", max_steps=3)
    one = open_run(tmp_path / "one", resume=True)  # re-written as if two processes had saved it
    save_checkpoint(tmp_path / "two" / "checkpoints", one.step, one.model, one.optimizer,
                    {"ranks": one.rng["ranks"] * 2}, {**one.state, "data": one.state["data"] * 2})
    with pytest.raises(ValueError, match="2 processes"):
        run(tmp_path / "two", max_steps=6, resume=True)


@pytest.mark.parametrize("layout", ["pretrain", "classify", "sft"])
def test_checkpoints_from_before_the_shared_loop_resume_exactly(tmp_path, layout):
    """Each recipe stored the data position and RNG its own way before; a run killed then still resumes."""
    _, _, straight = run(tmp_path / "straight", max_steps=6, decay_steps=6)
    run(tmp_path / "new", max_steps=3, decay_steps=6)
    new = open_run(tmp_path / "new", resume=True)
    (data,), (rng,) = new.state["data"], new.rng["ranks"]
    old_state, old_rng = {
        "pretrain": ({"samplers": [data]}, {"ranks": [rng]}),
        "classify": ({"batches": data}, rng),
        "sft": ({}, {"torch": rng, "batches": data}),
    }[layout]
    old = tmp_path / "old"
    save_checkpoint(old / "checkpoints", new.step, new.model, new.optimizer, old_rng,
                    {"tracking_run_id": None, **old_state})
    _, _, resumed = run(old, max_steps=6, decay_steps=6, resume=True)
    assert [r["loss"] for r in resumed.history if "loss" in r] == \
        [r["loss"] for r in straight.history if "loss" in r][3:]


def test_weights_that_do_not_fit_are_refused(tmp_path):
    run(tmp_path, max_steps=3)
    checkpoint = open_run(tmp_path, resume=True)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2), torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match="does not fit"):
        restore_weights(other, checkpoint)


def test_starting_over_a_run_needs_resume(tmp_path):
    run(tmp_path, max_steps=3)
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path, max_steps=3)


@pytest.mark.parametrize(("field", "value"), [("min_lr", 2.0), ("grad_accum", 0), ("lr", 0.0), ("grad_clip", -1.0)])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LoopConfig(**{"lr": 1.0, field: value}).validate()


def test_truncate_metrics_keeps_one_history_past_a_half_written_row(tmp_path, caplog):
    """A kill mid-write leaves a torn last line; resuming drops it (and later steps) instead of failing."""
    from llmkit.train.loop import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    with caplog.at_level("WARNING"):
        truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert "1 half-written row" in caplog.text
