"""Pretraining a decoder-only model: the recipe, top to bottom.

    data -> (tokenize into memmap shards once) -> sampler -> model (+DDP/FSDP, +compile) -> AdamW
    -> loop { accumulate grads, clip, step, schedule LR, log, eval, checkpoint } -> final model dir

Fault tolerance (guide §4): a checkpoint every `checkpoint_interval` steps holds model, optimizer,
scheduler, RNG states and sampler positions, so `resume=True` continues *exactly*: the losses after a
resume are bit-identical to those of an uninterrupted run. SIGTERM / SIGINT (a spot instance being
reclaimed, Ctrl-C) finish the current step, write a checkpoint and return normally.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmkit.config import flatten, save_config, to_dict
from llmkit.data.tokenized import open_split, prepare_tokens, read_meta
from llmkit.models import DecoderConfig, save_model
from llmkit.models.encdec import EncDecConfig
from llmkit.models.encoder import EncoderConfig
from llmkit.models.io import build_model
from llmkit.track import TrackConfig, Tracker
from llmkit.train import distributed as D
from llmkit.train.checkpoint import load_latest_checkpoint, save_checkpoint
from llmkit.train.evaluate import evaluate
from llmkit.train.objectives import make_objective
from llmkit.train.preemption import StopSignal
from llmkit.train.sampler import EpochSampler, WindowSampler, fixed_batches
from llmkit.train.schedule import warmup_cosine

log = logging.getLogger(__name__)


class TokenRate:
    """The one tokens/s estimator of the trainer's logs and summary and of the benchmarks' reference loops:
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


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=list)
    """Text / jsonl / json files to tokenize (ignored when `prepared` already holds shards for them)."""
    tokenizer: str = ""
    """Directory holding tokenizer.json (see `llmkit tokenizer train`)."""
    prepared: str | None = None
    """Where the tokenized shards live; None -> <out_dir>/data."""
    val_fraction: float = 0.1
    text_field: str = "text"

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")


@dataclass
class TrainConfig:
    batch_size: int = 12
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; tokens per step = batch_size * grad_accum * block_size * world."""
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int | None = None
    """Cosine decay length in steps; None -> max_steps."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 3
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that support it, else fp16 with loss scaling; fp32 on CPU."""
    compile: bool = False
    attention: Literal["auto", "flash", "efficient", "math", "cudnn"] = "auto"
    """Scaled-dot-product-attention kernel; auto lets PyTorch choose. On CPU in bf16 with short
    sequences the composite `math` kernel is faster than the fused one (docs/benchmarks.md)."""
    device: str = "auto"
    strategy: Literal["ddp", "fsdp"] = "ddp"
    seed: int = 1337
    objective: Literal["auto", "causal", "mlm", "span"] = "auto"
    """auto: causal for decoders, mlm for encoders, span corruption for encoder-decoders."""
    mlm_probability: float = 0.15
    noise_density: float = 0.15
    mean_noise_span: float = 3.0
    sampling: Literal["random", "epoch"] = "random"
    """random: windows at uniformly random offsets (nanoGPT); epoch: every window once per epoch, shuffled."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None -> looked up for known GPUs, unknown on CPU."""
    progress: bool = True

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                     "log_interval", "checkpoint_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"min_lr: need 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: must be >= 0, got {self.grad_clip}")


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    model: DecoderConfig | EncoderConfig | EncDecConfig = field(default_factory=DecoderConfig)
    """`family: decoder` (GPT, default), `encoder` (BERT) or `encdec` (T5) picks the architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def validate(self) -> None:
        if not self.data.tokenizer:
            raise ValueError("data.tokenizer: required (a directory with tokenizer.json)")


_SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                  "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}

# bf16 dense peak FLOP/s of common accelerators, for MFU.
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
               "4090": 165e12, "V100": 125e12}


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)
    return None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases); fused kernel where the device has one."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # no fused kernel for this device / dtype
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def resolve_objective(name: str, model_config) -> str:
    default = {"decoder": "causal", "encoder": "mlm", "encdec": "span"}[model_config.FAMILY]
    if name == "auto":
        return default
    if name != default:
        raise ValueError(f"train.objective: {name!r} does not fit a {model_config.FAMILY} model (use {default!r})")
    return name


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after `step` from metrics.jsonl: a run killed between checkpoints logged steps that the
    resumed run replays, and the file should tell one history, not two."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def make_sampler(split, cfg: TrainConfig, block_size: int, info: D.DistInfo, seed: int | None = None):
    seed = cfg.seed if seed is None else seed
    if cfg.sampling == "epoch":
        return EpochSampler(split, cfg.batch_size, block_size, seed, info.rank, info.world_size)
    return WindowSampler(split, cfg.batch_size, block_size, seed, info.rank)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def ensure_prepared(cfg: PretrainConfig, tokenizer, info: D.DistInfo) -> Path:
    """Tokenize `data.inputs` into shards unless shards for the same inputs and tokenizer exist."""
    from llmkit.data.tokenized import file_sha256

    data_dir = Path(cfg.data.prepared or Path(cfg.out_dir) / "data")
    if info.is_main:
        fresh = False
        try:
            meta = read_meta(data_dir)
            fresh = (meta["tokenizer_digest"] == tokenizer.digest()
                     and meta["val_fraction"] == cfg.data.val_fraction
                     and [s["sha256"] for s in meta["sources"]] == [file_sha256(p) for p in cfg.data.inputs])
        except FileNotFoundError:
            if not cfg.data.inputs:
                raise ValueError(f"data.inputs is empty and {data_dir} holds no tokenized data") from None
        else:
            if not cfg.data.inputs and meta["tokenizer_digest"] != tokenizer.digest():
                raise ValueError(f"{data_dir} was tokenized with another tokenizer than {cfg.data.tokenizer} "
                                 "(digests differ); give data.inputs to re-tokenize, or the matching tokenizer")
        if not fresh and cfg.data.inputs:
            log.info("tokenizing %s into %s", cfg.data.inputs, data_dir)
            prepare_tokens(cfg.data.inputs, tokenizer, data_dir, val_fraction=cfg.data.val_fraction,
                           text_field=cfg.data.text_field)
    D.barrier(info)
    return data_dir


def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Train `cfg.model` on `cfg.data` and write `<out_dir>/final` (a model directory).

    Args:
        resume: continue from the newest valid checkpoint in `<out_dir>/checkpoints` (start fresh if none).
    Returns:
        summary dict: step, final train/val loss, val bits-per-byte, tokens/s, paths, tracking run id,
        and `stopped_by_signal` (True when SIGTERM/SIGINT ended the run early).
    """
    info = D.setup(cfg.train.device)
    tracker = Tracker(cfg.track, cfg.out_dir, active=info.is_main)
    with tracker:  # an exception marks the MLflow run FAILED (KILLED for Ctrl-C) before it propagates
        summary = _train(cfg, resume, info, tracker)
    D.teardown(info)  # collective: only after every rank finished cleanly
    return summary


def _train(cfg: PretrainConfig, resume: bool, info: D.DistInfo, tracker: Tracker) -> dict:
    from llmkit.tokenizer import Tokenizer

    t_cfg = cfg.train
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    device = info.device
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and ckpt_root.is_dir() and any(ckpt_root.iterdir()):
            raise FileExistsError(f"{ckpt_root} already holds checkpoints: pass --resume to continue that run, "
                                  f"or set out_dir to a new directory")
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens ({cfg.data.tokenizer})")
    # padding and the T5 decoder start token (T5 starts decoding from pad) belong to the tokenizer
    for name in ("pad_token_id", "decoder_start_token_id"):
        if hasattr(cfg.model, name):
            setattr(cfg.model, name, tokenizer.pad_id)
    data_dir = ensure_prepared(cfg, tokenizer, info)
    meta = read_meta(data_dir)
    if meta["tokenizer_digest"] != tokenizer.digest():
        raise ValueError(f"{data_dir} was tokenized with a different tokenizer than {cfg.data.tokenizer}")
    train_split, val_split = open_split(data_dir, "train"), open_split(data_dir, "val")

    torch.manual_seed(t_cfg.seed)  # same initial weights on every rank
    raw_model = build_model(cfg.model).to(device)
    step, run_id = 0, None
    checkpoint = load_latest_checkpoint(ckpt_root, map_location="cpu") if resume else None
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint.model)
    # DDP returns a wrapper around raw_model; FSDP shards raw_model in place, replacing its parameters,
    # so the optimizer is built after wrapping.
    model = D.wrap_model(raw_model, info, t_cfg.strategy)
    optimizer = make_optimizer(raw_model, t_cfg, fused=not (info.enabled and t_cfg.strategy == "fsdp"))
    decay_steps = t_cfg.decay_steps or t_cfg.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, t_cfg.lr, t_cfg.min_lr, t_cfg.warmup_steps, decay_steps) / t_cfg.lr)
    sampler = make_sampler(train_split, t_cfg, cfg.model.block_size, info)
    objective_name = resolve_objective(t_cfg.objective, cfg.model)
    objective = make_objective(objective_name, tokenizer, t_cfg.mlm_probability, t_cfg.noise_density,
                               t_cfg.mean_noise_span)
    eval_sets = {  # fixed windows and, for mlm/span, fixed corruption: every evaluation sees the same inputs
        split: [objective(x, y, generator=torch.Generator().manual_seed(seed + i)) for i, (x, y) in enumerate(
            fixed_batches(data, t_cfg.eval_batches, t_cfg.batch_size, cfg.model.block_size, seed=seed))]
        for split, data, seed in (("train", train_split, 1), ("val", val_split, 2))
    }
    if checkpoint is not None:
        D.load_full_optimizer_state(raw_model, optimizer, checkpoint.optimizer["optimizer"])
        scheduler.load_state_dict(checkpoint.optimizer["scheduler"])
        step = checkpoint.step
        run_id = checkpoint.state.get("tracking_run_id")
        ranks = checkpoint.state["samplers"]
        if len(ranks) == info.world_size:
            sampler.load_state_dict(ranks[info.rank])
            set_rng_state(checkpoint.rng["ranks"][info.rank], device)
        else:
            # a different world size cannot replay the same batches; keep going with fresh streams
            log.warning("checkpoint was written by %d processes, now %d: data order will differ",
                        len(ranks), info.world_size)
            sampler = make_sampler(train_split, t_cfg, cfg.model.block_size, info, seed=t_cfg.seed + step)
        if info.is_main:
            log.info("resumed from %s at step %d", checkpoint.path, step)
    elif resume and info.is_main:
        log.info("no checkpoint in %s: starting from step 0", ckpt_root)
    del checkpoint

    if t_cfg.compile:
        model = torch.compile(model)
    dtype = resolve_precision(t_cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def autocast():
        """Precision and attention kernel for every forward pass (training and evaluation)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32))
        if t_cfg.attention != "auto":
            stack.enter_context(sdpa_kernel(_SDPA_BACKENDS[t_cfg.attention]))
        return stack

    tokens_per_step = t_cfg.batch_size * t_cfg.grad_accum * cfg.model.block_size * info.world_size
    flops_per_token = raw_model.flops_per_token(cfg.model.block_size)
    peak = peak_flops(device, t_cfg.peak_flops)
    if info.is_main:
        save_config(cfg, out / "config.yaml")
        run_id = tracker.start(run_id)
        tracker.log_params({**flatten(to_dict(cfg)), "n_params": raw_model.num_params(),
                            "flops_per_token": flops_per_token, "world_size": info.world_size,
                            "tokens_per_step": tokens_per_step})
        tracker.log_dataset(f"{Path(cfg.data.tokenizer).name}-tokens", meta["splits"]["train"]["sha256"],
                            str(data_dir.resolve()), context="training",
                            profile={"tokens": meta["splits"]["train"]["tokens"],
                                     "sources": [s["sha256"] for s in meta["sources"]]})
        tracker.log_dataset("validation-tokens", meta["splits"]["val"]["sha256"], str(data_dir.resolve()),
                            context="validation", profile={"tokens": meta["splits"]["val"]["tokens"]})
        tracker.log_artifact(out / "config.yaml")
        tracker.log_artifact(Path(cfg.data.tokenizer) / "tokenizer.json", "tokenizer")
        log.info("model: %.2fM parameters, %.3g FLOPs/token; %d tokens/step on %d process(es), %s, %s",
                 raw_model.num_params() / 1e6, flops_per_token, tokens_per_step, info.world_size, device, dtype)

    def write_checkpoint() -> None:
        model_state = D.full_model_state(raw_model)
        optim_state = D.full_optimizer_state(raw_model, optimizer)
        samplers = D.all_gather_objects(sampler.state_dict(), info)
        rngs = D.all_gather_objects(rng_state(device), info)
        if info.is_main:
            save_checkpoint(ckpt_root, step, model_state, {"optimizer": optim_state, "scheduler": scheduler.state_dict()},
                            {"ranks": rngs}, {"samplers": samplers, "tracking_run_id": run_id,
                                              "world_size": info.world_size}, keep=t_cfg.keep_checkpoints)
        D.barrier(info)

    metrics_path = out / "metrics.jsonl"
    if info.is_main:
        truncate_metrics(metrics_path, step)
    history: list[dict] = []

    def record(row: dict) -> None:
        history.append(row)
        if info.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval() -> dict:
        losses = {f"{split}_loss": evaluate(model, batches, device, autocast) for split, batches in eval_sets.items()}
        if objective_name == "causal":  # bits per byte of text: only next-token prediction has that meaning
            losses["val_bpb"] = losses["val_loss"] / math.log(2) / val_split.bytes_per_token
        return losses

    progress = None
    if info.is_main and t_cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=t_cfg.max_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)

    model.train()
    stopped = False
    last_eval: dict = {}
    window, measured = TokenRate(), TokenRate()  # this log interval; every step this run timed
    with StopSignal() as stop:
        while step < t_cfg.max_steps:
            t0 = time.perf_counter()
            for micro in range(t_cfg.grad_accum):
                x, y = sampler.next_batch()
                batch = {k: v.to(device, non_blocking=True) for k, v in objective(x, y).items()}
                sync = contextlib.nullcontext()
                if info.enabled and t_cfg.strategy == "ddp" and micro < t_cfg.grad_accum - 1:
                    sync = model.no_sync()  # all-reduce gradients once per step, not per micro-batch
                with sync, autocast():
                    _, loss = model(**batch)
                scaler.scale(loss / t_cfg.grad_accum).backward()
            if t_cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            window.add(tokens_per_step, dt)
            measured.add(tokens_per_step, dt)

            if step % t_cfg.log_interval == 0 or step == t_cfg.max_steps:
                loss_value = loss.item()  # the last micro-batch's loss (one sync per log interval)
                tps = window.per_s
                row = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tps}
                if peak:
                    row["mfu"] = flops_per_token * tps / info.world_size / peak
                record(row)
                if info.is_main:
                    tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step)
                    if progress is not None:
                        progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:,.0f}")
                window = TokenRate()
            if step % t_cfg.eval_interval == 0 or step == t_cfg.max_steps:
                last_eval = run_eval()
                record({"step": step, **last_eval})
                if info.is_main:
                    tracker.log_metrics(last_eval, step)
                    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            if progress is not None:
                progress.update(1)
            stop_now = D.any_rank(stop.received is not None, info)
            if step % t_cfg.checkpoint_interval == 0 or step == t_cfg.max_steps or stop_now:
                write_checkpoint()
            if stop_now:
                stopped = True
                if info.is_main:
                    log.warning("stop signal received: checkpoint written at step %d; rerun with --resume", step)
                break
    if progress is not None:
        progress.close()

    final_dir = out / "final"
    if not stopped:
        if not last_eval:  # resumed a run that had already finished
            last_eval = run_eval()
        # Under FSDP gathering the full weights is collective: every rank takes part.
        final_state = D.full_model_state(raw_model) if info.enabled else None
        if info.is_main:
            to_save = raw_model
            if final_state is not None:
                to_save = build_model(cfg.model)
                to_save.load_state_dict(final_state)
            save_model(to_save, final_dir, tokenizer,
                       generation_config={"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.9})
            tracker.log_artifact(final_dir, "model")
    if info.is_main:
        tracker.end("KILLED" if stopped else "FINISHED")
    D.barrier(info)
    return {
        "step": step,
        "stopped_by_signal": stopped,
        "world_size": info.world_size,
        "tokens_per_step": tokens_per_step,
        "train_loss": last_eval.get("train_loss"),
        "val_loss": last_eval.get("val_loss"),
        "val_bpb": last_eval.get("val_bpb"),
        "tokens_per_s": measured.per_s,
        "n_params": raw_model.num_params(),
        "out_dir": str(out),
        "final_model": str(final_dir) if not stopped else None,
        "tracking_run_id": run_id,
        "history": history,
    }
