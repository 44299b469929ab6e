"""The one training loop. Pretraining, instruction tuning and classification all run through it.

A recipe builds its model, optimizer and data, and hands the loop a `Job`: how to draw a batch, the loss of a
batch, how to evaluate. The loop owns everything that is the same for every recipe:

    resume -> loop { micro-batches under autocast (+ loss scaling in fp16), gradient accumulation, clipping,
    AdamW step, warmup + cosine LR, log / eval / checkpoint cadence, SIGTERM / SIGINT } -> LoopResult

with metrics.jsonl and the tracker's metrics written as it goes.

Exact resume (guide §4): a checkpoint holds the trainable weights, the optimizer and scheduler, every rank's
RNG state and data position, so a resumed run's losses are bit-identical to an uninterrupted run's.
SIGTERM / SIGINT (a spot instance reclaimed, Ctrl-C) finish the current step on every rank, write a
checkpoint and return normally (`LoopResult.stopped`), so the process exits 0 and `--resume` continues.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from llmkit import runtime
from llmkit.config import flatten, save_config, to_dict
from llmkit.runtime import DistInfo
from llmkit.track import Tracker
from llmkit.train.checkpoint import (
    Checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from llmkit.train.distributed import clip_grad_norm
from llmkit.train.preemption import StopSignal
from llmkit.train.schedule import warmup_cosine

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """The optimisation and cadence settings every recipe's `train:` section shares (each recipe's own train
    config adds its fields to these and may change the defaults)."""

    batch_size: int = 8
    """Examples per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 1000
    lr: float = 1e-3
    """Peak learning rate (of the base weights; adapters of a LoRA / prefix recipe train at lr x lr_ratio)."""
    min_lr: float | None = None
    """Where the cosine ends; None -> lr / 10. Parameter groups at lr x ratio end at min_lr x ratio."""
    warmup_steps: int = 100
    decay_steps: int | None = None
    """Cosine decay length in steps; None -> max_steps."""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices only (not on norms and biases)."""
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    eval_interval: int = 250
    log_interval: int = 10
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 3
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that support it, else fp16 with loss scaling; fp32 on CPU."""
    device: str = "auto"
    """auto: the first CUDA GPU when one is visible, else the CPU."""
    seed: int = 1337
    progress: bool = True

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval",
                     "checkpoint_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: need 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: must be >= 0, got {self.grad_clip}")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


@dataclass
class Job:
    """What a recipe hands the loop."""

    model: torch.nn.Module
    """The module that trains: its trainable parameters are clipped; a DDP wrapper skips the gradient
    all-reduce on all but the last micro-batch of a step."""
    optimizer: torch.optim.Optimizer
    """Built with `make_optimizer`; the loop adds the warmup + cosine schedule."""
    next_batch: Callable[[], Any]
    """The next training micro-batch of this process."""
    loss: Callable[[Any], torch.Tensor]
    """Scalar loss of a batch; called under the precision's autocast."""
    evaluate: Callable[[], dict[str, float]]
    """Held-out figures, at every eval_interval and at the end."""
    data: Any
    """The batch source's state holder: state_dict() / load_state_dict(), saved per rank in checkpoints."""
    autocast: Callable[[], contextlib.AbstractContextManager]
    """The forward context of training and evaluation (`forward_context`)."""
    tokens: Callable[[Any], int] | None = None
    """Tokens of a micro-batch over all processes, for tokens/s (and MFU with flops_per_token)."""
    flops_per_token: float | None = None
    peak_flops: float | None = None
    """Peak FLOP/s of one device; with flops_per_token the log rows get `mfu`."""
    model_state: Callable[[], dict[str, torch.Tensor]] | None = None
    """What a checkpoint saves of the model; None -> its trainable weights (`trainable_state`)."""
    optimizer_state: Callable[[], dict] | None = None
    load_optimizer_state: Callable[[dict], None] | None = None
    """Defaults: optimizer.state_dict() / load_state_dict(); FSDP gathers and shards instead."""
    restart_data: Callable[[int], None] | None = None
    """Called with the resumed step when the checkpoint came from another world size or layout (its data
    positions cannot be replayed); None -> such a resume is refused."""
    save_shards: Callable[[Path], None] | None = None
    load_shards: Callable[[Path], None] | None = None
    """Distributed checkpoints (`train.parallel`): every rank writes / reads its shards of the model and the
    optimizer in a directory (collective, `llmkit.train.mesh`), instead of model_state / optimizer_state;
    loading reshards when the checkpoint was written under another layout."""
    forward_backward: Callable[[Any, float], torch.Tensor] | None = None
    """Runs forward and backward of a micro-batch itself, gradients of loss x the factor (1 / grad_accum),
    and returns the unscaled loss: a pipeline schedule (`llmkit.train.pipeline`). None: loss() + backward()."""
    grad_norm_across: Any = None
    """A process group whose ranks hold other parameters (pipeline stages): clipping sums their norms in."""
    grad_norm_params: list[torch.nn.Parameter] | None = None
    """The parameters the clipping norm counts (None: every trainable one); all trainable ones are clipped."""
    sync_grads: Callable[[], None] | None = None
    """Called once per step after the micro-batches, before clipping: e.g. pipeline stages summing the
    gradients of a tied weight each holds a copy of."""
    layout: dict[str, int] | None = None
    """The process layout (e.g. {"dp": 2, "fsdp": 1, "tp": 2}); a checkpoint of another layout resumes with
    restart_data, as one of another world size does."""
    facts: dict[str, Any] = field(default_factory=dict)
    """JSON-able facts a checkpoint must match to be resumed (e.g. the labels, the method)."""
    name: str = "train"
    """The progress bar's label."""


@dataclass
class LoopResult:
    step: int
    stopped: bool
    """True when SIGTERM / SIGINT ended the run early (a checkpoint holds its state)."""
    last_eval: dict[str, float]
    history: list[dict]
    tokens_per_s: float | None


class TokenRate:
    """The one tokens/s estimator of the loop's logs and summary and of the benchmarks' reference loops:
    total tokens / total wall seconds over the measured window (the timed training steps; evaluation and
    checkpoint writing are outside it). Not a mean of per-interval rates, which would weigh a short fast
    interval like a long slow one."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    @property
    def per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


# -- what a recipe calls before the loop -------------------------------------------------------------
ELASTIC_MARKER = ".torchelastic-run"
"""In out_dir: the TORCHELASTIC_RUN_ID of the torchrun job that last started there (see open_run)."""


def open_run(out: Path, resume: bool, info: DistInfo | None = None) -> Checkpoint | None:
    """Create `out` and return the newest valid checkpoint under out/checkpoints when resuming (None when
    there is none, or when not resuming). Refuses to start over a run's checkpoints without `resume`.

    Under torchelastic (`torchrun --max-restarts N`, `--nnodes MIN:MAX`) a failed or resized worker group is
    started again with the same command line, so the job resumes as with `resume` when out/ELASTIC_MARKER
    names this job (TORCHELASTIC_RUN_ID: its `--rdzv-id`) and either some rank is a restart
    (TORCHELASTIC_RESTART_COUNT > 0) or the job has an id of its own (not "none"; an agent whose workers are
    restarted for another node's failure or a membership change does not count a restart). Rank 0 writes the
    marker at every start that passes the check and removes it at a refusal, so a restart never continues
    a run that its first attempt refused to start over. Collective under torchelastic without `resume`."""
    ckpt_root = out / "checkpoints"
    marker = out / ELASTIC_MARKER
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    main = info is None or info.is_main
    if run_id is not None and not resume:
        ours = marker.is_file() and marker.read_text().strip() == run_id  # read by every rank before rank 0 writes
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0
        resume = runtime.any_rank(ours and (restarted or run_id != "none"), info or DistInfo())
        if resume and main:
            log.warning("torchelastic job %r started again (restart %s of this agent): resuming from the newest "
                        "checkpoint in %s, as with --resume", run_id, os.environ.get("TORCHELASTIC_RESTART_COUNT"),
                        ckpt_root)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and ckpt_root.is_dir() and any(ckpt_root.iterdir()):
            marker.unlink(missing_ok=True)  # a restart of this job must refuse too
            raise FileExistsError(f"{ckpt_root} already holds checkpoints: pass --resume to continue that run, "
                                  "or set out_dir to a new directory")
        if run_id is not None:
            marker.write_text(run_id + "\n")
    if not resume:
        return None
    checkpoint = load_latest_checkpoint(ckpt_root, map_location="cpu")
    if checkpoint is None and (info is None or info.is_main):
        log.info("no checkpoint in %s: starting from step 0", ckpt_root)
    return checkpoint


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries of the parameters that train (a tied weight under its first name)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def restore_weights(model: torch.nn.Module, checkpoint: Checkpoint | None) -> None:
    """Load a checkpoint's weights into the model; every trainable weight must be in it. The checkpoint's
    copy of the weights is dropped after (the loop restores the rest from it)."""
    if checkpoint is None or checkpoint.shards is not None:  # distributed: the loop loads it after sharding
        return
    missing = set(trainable_state(model)) - set(checkpoint.model)
    unexpected = set(checkpoint.model) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"{checkpoint.path} does not fit this model (missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}): was it written by another method or model?")
    model.load_state_dict(checkpoint.model, strict=False)
    checkpoint.model = {}


def tracking_run_id(checkpoint: Checkpoint | None) -> str | None:
    """The MLflow run a resumed job continues (None: a new run)."""
    return checkpoint.state.get("tracking_run_id") if checkpoint is not None else None


def start_tracking(tracker: Tracker, run_config: Any, out: Path, checkpoint: Checkpoint | None,
                   model: torch.nn.Module, **params: Any) -> tuple[int, int]:
    """Write the resolved config to out/config.yaml, open the tracking run (a resumed job reopens its own), and
    log the config's values, the parameter counts and `params` (which may override them). Returns
    (n_params, n_trainable)."""
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    save_config(run_config, out / "config.yaml")
    tracker.start(tracking_run_id(checkpoint))
    tracker.log_params({**flatten(to_dict(run_config)), "n_params": n_params, "n_trainable": n_trainable, **params})
    tracker.log_artifact(out / "config.yaml")
    return n_params, n_trainable


def make_optimizer(cfg: LoopConfig, groups: list[tuple[list[torch.nn.Parameter], float]],
                   fused: bool = True) -> torch.optim.AdamW:
    """AdamW over (parameters, lr scale) groups: weight decay on matrices only (not norms, biases), each group
    at cfg.lr x scale; the fused kernel where the device has one (not under FSDP: `fused=False`).
    Sharded (DTensor) parameters and plain ones go to separate groups: foreach kernels take one kind."""
    param_groups = []
    for params, scale in groups:
        params = [p for p in params if p.requires_grad]
        for decayed, sharded in itertools.product((True, False), (False, True)):
            chosen = [p for p in params if (p.dim() >= 2) == decayed and hasattr(p, "device_mesh") == sharded]
            if chosen:
                param_groups.append({"params": chosen, "weight_decay": cfg.weight_decay if decayed else 0.0,
                                     "lr": cfg.lr * scale})
    if not param_groups:
        raise ValueError("no parameter trains: nothing for the optimizer to do")
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if fused:
        try:
            return torch.optim.AdamW(param_groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # no fused kernel for this device / dtype
            pass
    return torch.optim.AdamW(param_groups, foreach=True, **kwargs)


def forward_context(device: torch.device, dtype: torch.dtype,
                    extra: Callable[[], contextlib.AbstractContextManager] | None = None
                    ) -> Callable[[], contextlib.AbstractContextManager]:
    """The context of every forward pass, training and evaluation: autocast in `dtype` (none in fp32), plus
    `extra()` when given (e.g. an attention-kernel choice)."""
    def enter() -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(runtime.autocast(device, dtype))
        if extra is not None:
            stack.enter_context(extra())
        return stack
    return enter


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after `step` from metrics.jsonl: a run killed between checkpoints logged steps that the
    resumed run replays, and the file should tell one history, not two."""
    if not path.is_file():
        return
    keep, torn = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line) if line else None
        except ValueError:  # the kill landed mid-write: the row never finished, and its step is replayed
            torn += 1
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    if torn:
        log.warning("%s: dropped %d half-written row(s) left by the interrupted run", path, torn)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def saved_positions(checkpoint: Checkpoint) -> tuple[list[dict], list[dict]]:
    """Every rank's data position and RNG state in a checkpoint; checkpoints written before the recipes shared
    this loop (pretraining's "samplers", classification's and SFT's single "batches") are read too."""
    state, rng = checkpoint.state, checkpoint.rng
    if "data" in state:
        return state["data"], rng["ranks"]
    if "samplers" in state:  # pretraining
        return state["samplers"], rng["ranks"]
    if "batches" in state:  # classification: rng is the state itself
        return [state["batches"]], [rng]
    if "batches" in rng:  # SFT
        return [rng["batches"]], [rng["torch"]]
    raise ValueError(f"{checkpoint.path}: no data position in this checkpoint: it cannot be resumed exactly")


def replay_source(saved_layout: dict | None, layout: dict | None, saved_ranks: int, info: DistInfo) -> int | None:
    """The saved rank whose data position and RNG state this rank continues from, or None when the
    checkpoint's data order cannot be replayed (then `Job.restart_data`).

    Same layout (or none, plain DDP / FSDP): the same rank, when the world size is the same too. Another
    layout (`train.parallel`) with the same number of data-parallel ranks: the saved rank of the same
    data-parallel rank on the first pipeline stage (tensor-parallel ranks are the innermost mesh dimension and
    pipeline stages the outermost; both share their batches), so resharding a run from fsdp 2 to fsdp 2 x tp 2
    continues its exact data order."""
    if saved_layout == layout:
        return info.rank if saved_ranks == info.world_size else None
    if saved_layout is None or layout is None:
        return None
    saved_tp, tp = saved_layout.get("tp", 1), layout.get("tp", 1)
    saved_data, data = saved_ranks // (saved_tp * saved_layout.get("pp", 1)), info.world_size // (tp * layout.get("pp", 1))
    if saved_data != data:
        return None
    return (info.rank // tp) % data * saved_tp  # the saved rank of this data rank on the first pipeline stage


# -- the loop ----------------------------------------------------------------------------------------
def train_loop(cfg: LoopConfig, job: Job, out: Path, tracker: Tracker, checkpoint: Checkpoint | None,
               info: DistInfo | None = None) -> LoopResult:
    """Run `job` from the checkpoint's step (or 0) to `cfg.max_steps`, or until SIGTERM / SIGINT.

    The recipe has already loaded the checkpoint's weights (`restore_weights`, before any wrapping) and
    started its tracking run; the loop restores the rest. Writes out/metrics.jsonl and out/checkpoints.
    Returns the step reached, whether a signal stopped it, the last evaluation (run once more at the end
    when a resumed run had nothing left to do), the rows logged and the measured tokens/s.
    """
    info = info or DistInfo(device=runtime.resolve_device(cfg.device))
    device = info.device
    ckpt_root = out / "checkpoints"
    optimizer = job.optimizer
    final_lr_ratio = cfg.final_lr / cfg.lr
    decay_steps = cfg.decay_steps or cfg.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # each group's lr x the schedule's factor
        optimizer, lambda s: warmup_cosine(s, 1.0, final_lr_ratio, cfg.warmup_steps, decay_steps))
    save_optimizer = job.optimizer_state or optimizer.state_dict
    load_optimizer = job.load_optimizer_state or optimizer.load_state_dict
    model_state = job.model_state or (lambda: trainable_state(getattr(job.model, "module", job.model)))

    step = 0
    if checkpoint is not None:
        for key, value in job.facts.items():
            if key in checkpoint.state and checkpoint.state[key] != value:  # (older checkpoints record fewer)
                raise ValueError(f"{checkpoint.path}: written for {key} {checkpoint.state.get(key)!r}, this run has "
                                 f"{value!r}")
        if (checkpoint.shards is not None) != (job.load_shards is not None):
            raise ValueError(f"{checkpoint.path} is a {'distributed' if checkpoint.shards else 'full'} checkpoint "
                             f"and this run {'sets' if job.load_shards else 'does not set'} train.parallel: resume "
                             "it with train.parallel set as it was (any layout), or unset, as it was")
        if checkpoint.shards is not None:
            job.load_shards(checkpoint.shards)
        else:
            load_optimizer(checkpoint.optimizer["optimizer"])
        scheduler.load_state_dict(checkpoint.optimizer["scheduler"])
        step = checkpoint.step
        data_states, rng_states = saved_positions(checkpoint)
        source = replay_source(checkpoint.state.get("layout"), job.layout, len(data_states), info)
        if source is not None:
            job.data.load_state_dict(data_states[source])
            set_rng_state(rng_states[source], device)
        elif job.restart_data is not None:
            log.warning("checkpoint was written by %d processes, now %d (layout %s, now %s): data order will differ",
                        len(data_states), info.world_size, checkpoint.state.get("layout"), job.layout)
            job.restart_data(step)
        else:
            raise ValueError(f"{checkpoint.path} was written by {len(data_states)} processes, this run has "
                             f"{info.world_size}: resume with the same number")
        if info.is_main:
            log.info("resumed from %s at step %d", checkpoint.path, step)

    dtype = runtime.resolve_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    trainable = [p for p in job.model.parameters() if p.requires_grad]
    ddp = callable(getattr(job.model, "no_sync", None))  # DDP, also behind torch.compile
    if device.type == "cpu":
        runtime.return_freed_memory_to_the_os()

    metrics_path = out / "metrics.jsonl"
    if info.is_main:
        truncate_metrics(metrics_path, step)
    history: list[dict] = []

    def record(row: dict) -> None:
        history.append(row)
        if info.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])

    def write_checkpoint() -> None:
        data_states = runtime.all_gather_objects(job.data.state_dict(), info)
        rngs = runtime.all_gather_objects(rng_state(device), info)
        if job.save_shards is not None:
            save_sharded_checkpoint(ckpt_root, step, job.save_shards, {"scheduler": scheduler.state_dict()},
                                    {"ranks": rngs}, {"data": data_states, "tracking_run_id": tracker.run_id,
                                                      "world_size": info.world_size, "layout": job.layout,
                                                      **job.facts},
                                    keep=cfg.keep_checkpoints, info=info)
            return
        weights = model_state()
        optim = save_optimizer()
        if info.is_main:
            save_checkpoint(ckpt_root, step, weights, {"optimizer": optim, "scheduler": scheduler.state_dict()},
                            {"ranks": rngs}, {"data": data_states, "tracking_run_id": tracker.run_id,
                                              "world_size": info.world_size, **job.facts},
                            keep=cfg.keep_checkpoints)
        runtime.barrier(info)

    progress = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.max_steps, initial=step, desc=job.name, unit="step", dynamic_ncols=True)

    job.model.train()
    stopped = False
    last_eval: dict = {}
    window, measured = TokenRate(), TokenRate()  # this log interval; every step this run timed
    window_time, window_steps = 0.0, 0
    with StopSignal() as stop:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            step_loss = torch.zeros((), device=device)
            step_tokens = 0
            for micro in range(cfg.grad_accum):
                batch = job.next_batch()
                if job.tokens is not None:
                    step_tokens += job.tokens(batch)
                if job.forward_backward is not None:
                    with job.autocast():
                        loss = job.forward_backward(batch, 1.0 / cfg.grad_accum)
                else:
                    sync = job.model.no_sync() if ddp and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
                    with sync, job.autocast():
                        loss = job.loss(batch)
                    scaler.scale(loss / cfg.grad_accum).backward()
                step_loss += loss.detach().float() / cfg.grad_accum
            if job.sync_grads is not None:
                job.sync_grads()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                clip_grad_norm(trainable, cfg.grad_clip, across=job.grad_norm_across, counted=job.grad_norm_params)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            window.add(step_tokens, dt)
            measured.add(step_tokens, dt)
            window_time += dt
            window_steps += 1

            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                # every rank's loss, averaged as DDP averages the gradients (rank 0's alone is a sample)
                row = {"step": step, "loss": runtime.mean_over_ranks(step_loss, info).item(), "lr": lr, "step_time_s": window_time / window_steps}
                if job.tokens is not None:
                    row["tokens_per_s"] = window.per_s
                    if job.flops_per_token and job.peak_flops and window.per_s:
                        row["mfu"] = job.flops_per_token * window.per_s / info.world_size / job.peak_flops
                record(row)
                if progress is not None:
                    progress.set_postfix(loss=f"{row['loss']:.4f}")
                window, window_time, window_steps = TokenRate(), 0.0, 0
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                last_eval = job.evaluate()
                record({"step": step, **last_eval})
                if info.is_main:
                    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            if progress is not None:
                progress.update(1)
            stop_now = runtime.any_rank(stop.received is not None, info)
            if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or stop_now:
                write_checkpoint()
            if stop_now:
                stopped = True
                if info.is_main:
                    log.warning("stop signal received: checkpoint written at step %d; rerun with --resume", step)
                break
    if progress is not None:
        progress.close()
    if not stopped and not last_eval:  # resumed a run that had already finished
        last_eval = job.evaluate()
    return LoopResult(step=step, stopped=stopped, last_eval=last_eval, history=history,
                      tokens_per_s=measured.per_s)
