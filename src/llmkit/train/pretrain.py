"""Pretraining a model from scratch (GPT, BERT or T5 family): the recipe, top to bottom.

    data -> (tokenize into memmap shards once) -> sampler -> objective (causal / mlm / span corruption)
    -> model (+DDP/FSDP, +compile) -> AdamW -> `train_loop` -> final model dir

The loop (`llmkit.train.loop`) owns resume, precision, accumulation, clipping, the LR schedule, the
log / eval / checkpoint cadence and preemption: a resumed run's losses are bit-identical to an uninterrupted
run's, and SIGTERM / SIGINT write a checkpoint and return normally. This file supplies the batches, the loss,
the evaluation (fixed windows of both splits; bits per byte for causal models) and the final save.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmkit import runtime
from llmkit.data.tokenized import file_sha256, open_split, prepare_tokens, read_meta
from llmkit.models import DecoderConfig, save_model
from llmkit.models.encdec import EncDecConfig
from llmkit.models.encoder import EncoderConfig
from llmkit.models.io import build_model
from llmkit.runtime import DistInfo
from llmkit.tokenizer import Tokenizer
from llmkit.track import TrackConfig, Tracker
from llmkit.train import distributed as D
from llmkit.train import loop
from llmkit.train import mesh as mesh_parallel
from llmkit.train.heldout_loss import fixed_batch_loss
from llmkit.train.objectives import make_objective
from llmkit.train.parallel import ParallelTraining
from llmkit.train.sampler import EpochSampler, WindowSampler, fixed_batches

log = logging.getLogger(__name__)


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
class TrainConfig(loop.LoopConfig):
    """Pretraining's `train:` section: the shared loop settings (`LoopConfig`) plus the fields below."""

    batch_size: int = 12
    """Sequences per micro-batch per process; tokens per step = batch_size * grad_accum * block_size * world."""
    max_steps: int = 2000
    min_lr: float | None = 1e-4
    eval_batches: int = 20
    """Fixed batches of each split per evaluation."""
    compile: bool = False
    attention: Literal["auto", "flash", "efficient", "math", "cudnn"] = "auto"
    """Scaled-dot-product-attention kernel; auto lets PyTorch choose. On CPU in bf16 with short
    sequences the composite `math` kernel is faster than the fused one (docs/benchmarks.md)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    expert_parallel: bool = False
    """With a mixture-of-experts model under torchrun: shard the experts over the processes (all-to-all
    dispatch, `llmkit.models.expert_parallel`); needs strategy ddp and experts divisible by the world size."""
    parallel: mesh_parallel.ParallelConfig | None = None
    """Composable data x tensor parallelism on one device mesh, `{dp, fsdp, tp}` (docs/distributed.md,
    "Composable layouts"); decoders only. Replaces `strategy`, and checkpoints become distributed checkpoints
    that resume under any other layout. None: `strategy` decides."""
    objective: Literal["auto", "causal", "mlm", "span"] = "auto"
    """auto: causal for decoders, mlm for encoders, span corruption for encoder-decoders."""
    mlm_probability: float = 0.15
    noise_density: float = 0.15
    mean_noise_span: float = 3.0
    sampling: Literal["random", "epoch"] = "random"
    """random: windows at uniformly random offsets (nanoGPT); epoch: every window once per epoch, shuffled."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None -> looked up for known GPUs, unknown on CPU."""

    def validate(self) -> None:
        super().validate()
        if self.parallel is not None and (self.strategy != "ddp" or self.expert_parallel):
            raise ValueError("parallel: replaces strategy and expert_parallel; leave those unset")
        if self.parallel is not None and self.parallel.pp > 1:
            microbatches = self.parallel.microbatches or self.parallel.pp
            if self.batch_size % microbatches:
                raise ValueError(f"parallel.microbatches: {microbatches} pipeline micro-batches do not divide "
                                 f"batch_size {self.batch_size}")
        if self.eval_batches < 1:
            raise ValueError(f"eval_batches: must be >= 1, got {self.eval_batches}")


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


def resolve_objective(name: str, model_config) -> str:
    default = {"decoder": "causal", "encoder": "mlm", "encdec": "span"}[model_config.FAMILY]
    if name == "auto":
        return default
    if name != default:
        raise ValueError(f"train.objective: {name!r} does not fit a {model_config.FAMILY} model (use {default!r})")
    return name


def make_sampler(split, cfg: TrainConfig, block_size: int, rank: int, world: int, seed: int | None = None):
    """The batches of data-parallel rank `rank` of `world` (tensor-parallel ranks of one group share one)."""
    seed = cfg.seed if seed is None else seed
    if cfg.sampling == "epoch":
        return EpochSampler(split, cfg.batch_size, block_size, seed, rank, world)
    return WindowSampler(split, cfg.batch_size, block_size, seed, rank)


def ensure_prepared(data: DataConfig, out_dir: str | Path, tokenizer, info: DistInfo) -> Path:
    """Tokenize `data.inputs` into shards (in `data.prepared`, else <out_dir>/data) unless shards for the same
    inputs and tokenizer exist there; returns that directory. `data` needs inputs, prepared, val_fraction and
    text_field (pretraining's `DataConfig`, or another recipe's section with those fields)."""
    data_dir = Path(data.prepared or Path(out_dir) / "data")
    if info.is_main:
        fresh = False
        try:
            meta = read_meta(data_dir)
            fresh = (meta["tokenizer_digest"] == tokenizer.digest()
                     and meta["val_fraction"] == data.val_fraction
                     and [s["sha256"] for s in meta["sources"]] == [file_sha256(p) for p in data.inputs])
        except FileNotFoundError:
            if not data.inputs:
                raise ValueError(f"data.inputs is empty and {data_dir} holds no tokenized data") from None
        else:
            if not data.inputs and meta["tokenizer_digest"] != tokenizer.digest():
                raise ValueError(f"{data_dir} was tokenized with another tokenizer than this run's (digests "
                                 "differ); give data.inputs to re-tokenize, or the matching tokenizer")
        if not fresh and data.inputs:
            log.info("tokenizing %s into %s", data.inputs, data_dir)
            prepare_tokens(data.inputs, tokenizer, data_dir, val_fraction=data.val_fraction,
                           text_field=data.text_field)
    runtime.barrier(info)
    return data_dir


def router_stats(model) -> dict[str, float]:
    """A mixture-of-experts model's routing over its last forward (the held-out batches): the experts' load
    imbalance (coefficient of variation of their shares, mean over layers), assignments dropped past capacity,
    and the router's mean entropy (nats). Empty for a dense model."""
    from llmkit.models.moe import MoEFeedForward, load_balance

    layers = [m.stats for m in getattr(model, "module", model).modules() if isinstance(m, MoEFeedForward) and m.stats]
    if not layers:
        return {}
    return {"moe_load_cv": sum(load_balance(s["load"]) for s in layers) / len(layers),
            "moe_dropped": float(sum(s["dropped"] for s in layers)),
            "moe_router_entropy": sum(s["entropy"] for s in layers) / len(layers)}


def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Train `cfg.model` on `cfg.data` and write `<out_dir>/final` (a model directory).

    Args:
        resume: continue from the newest valid checkpoint in `<out_dir>/checkpoints` (start fresh if none).
    Returns:
        summary dict: step, final train/val loss, val bits-per-byte, tokens/s, paths, tracking run id,
        and `stopped_by_signal` (True when SIGTERM/SIGINT ended the run early).
    """
    info = runtime.setup(cfg.train.device)
    tracker = Tracker(cfg.track, cfg.out_dir, active=info.is_main)
    with tracker:  # an exception marks the MLflow run FAILED (KILLED for Ctrl-C) before it propagates
        summary = _pretrain(cfg, resume, info, tracker)
    runtime.teardown(info)  # collective: only after every rank finished cleanly
    return summary


def _pretrain(cfg: PretrainConfig, resume: bool, info: DistInfo, tracker: Tracker) -> dict:
    t_cfg = cfg.train
    out = Path(cfg.out_dir)
    device = info.device
    checkpoint = loop.open_run(out, resume, info)

    # -- tokenizer and data
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
    data_dir = ensure_prepared(cfg.data, cfg.out_dir, tokenizer, info)
    meta = read_meta(data_dir)
    if meta["tokenizer_digest"] != tokenizer.digest():
        raise ValueError(f"{data_dir} was tokenized with a different tokenizer than {cfg.data.tokenizer}")
    train_split, val_split = open_split(data_dir, "train"), open_split(data_dir, "val")
    block = cfg.model.block_size
    objective_name = resolve_objective(t_cfg.objective, cfg.model)
    objective = make_objective(objective_name, tokenizer, t_cfg.mlm_probability, t_cfg.noise_density,
                               t_cfg.mean_noise_span)
    eval_sets = {  # fixed windows and, for mlm/span, fixed corruption: every evaluation sees the same inputs
        split: [objective(x, y, generator=torch.Generator().manual_seed(seed + i)) for i, (x, y) in enumerate(
            fixed_batches(data, t_cfg.eval_batches, t_cfg.batch_size, block, seed=seed))]
        for split, data, seed in (("train", train_split, 1), ("val", val_split, 2))
    }

    # -- model and optimizer
    torch.manual_seed(t_cfg.seed)  # same initial weights on every rank
    raw_model = build_model(cfg.model).to(device)
    loop.restore_weights(raw_model, checkpoint)
    n_params, flops_per_token = raw_model.num_params(), raw_model.flops_per_token(block)
    dtype = runtime.resolve_dtype(t_cfg.precision, device)
    layout = None
    if t_cfg.parallel is not None:  # sharded in place (DTensors): the optimizer is built after
        if t_cfg.parallel.pp > 1 and dtype == torch.float16:
            raise ValueError("train.parallel.pp: fp16 needs loss scaling, which the pipeline schedules do not do; "
                             "use train.precision bf16")
        layout = ParallelTraining(raw_model, t_cfg.parallel, info, dtype)
        model, params = layout.model, layout.params
        data_rank, data_world = layout.data_rank, layout.data_world
    else:
        # DDP returns a wrapper around raw_model; FSDP shards raw_model in place, replacing its parameters,
        # so the optimizer is built after wrapping.
        model = D.wrap_model(raw_model, info, t_cfg.strategy, t_cfg.expert_parallel)
        params = raw_model
        data_rank, data_world = info.rank, info.world_size
    if t_cfg.expert_parallel and info.enabled and info.is_main:
        experts = cfg.model.moe.experts
        log.info("experts sharded over %d processes: %d of %d per process", info.world_size,
                 experts // info.world_size, experts)
    sharded = info.enabled and (t_cfg.strategy == "fsdp" or t_cfg.expert_parallel or layout is not None)
    optimizer = loop.make_optimizer(t_cfg, [(list(params.parameters()), 1.0)], fused=not sharded)
    if t_cfg.compile:
        model = torch.compile(model)
    kernel = (lambda: sdpa_kernel(_SDPA_BACKENDS[t_cfg.attention])) if t_cfg.attention != "auto" else None
    autocast = loop.forward_context(device, dtype, kernel)

    # -- tracking
    tokens_per_step = t_cfg.batch_size * t_cfg.grad_accum * block * data_world
    if info.is_main:
        layout_params = {f"parallel_{k}": v for k, v in layout.config.as_dict().items()} if layout else {}
        loop.start_tracking(tracker, cfg, out, checkpoint, params, n_params=n_params,
                            flops_per_token=flops_per_token, world_size=info.world_size,
                            tokens_per_step=tokens_per_step, **layout_params)
        tracker.log_dataset(f"{Path(cfg.data.tokenizer).name}-tokens", meta["splits"]["train"]["sha256"],
                            str(data_dir.resolve()), context="training",
                            profile={"tokens": meta["splits"]["train"]["tokens"],
                                     "sources": [s["sha256"] for s in meta["sources"]]})
        tracker.log_dataset("validation-tokens", meta["splits"]["val"]["sha256"], str(data_dir.resolve()),
                            context="validation", profile={"tokens": meta["splits"]["val"]["tokens"]})
        tracker.log_artifact(Path(cfg.data.tokenizer) / "tokenizer.json", "tokenizer")
        log.info("model: %.2fM parameters, %.3g FLOPs/token; %d tokens/step on %d process(es), %s, %s",
                 n_params / 1e6, flops_per_token, tokens_per_step, info.world_size, device, dtype)

    # -- what the loop runs
    def next_batch() -> dict[str, torch.Tensor]:
        x, y = job.data.next_batch()
        return {k: v.to(device, non_blocking=True) for k, v in objective(x, y).items()}

    def evaluate() -> dict[str, float]:
        losses = {f"{split}_loss": fixed_batch_loss(model, batches, device, autocast)
                  for split, batches in eval_sets.items()}
        if objective_name == "causal":  # bits per byte of text: only next-token prediction has that meaning
            losses["val_bpb"] = losses["val_loss"] / math.log(2) / val_split.bytes_per_token
        return {**losses, **router_stats(params)}

    def restart_data(step: int):
        job.data = make_sampler(train_split, t_cfg, block, data_rank, data_world, seed=t_cfg.seed + step)

    if layout is not None:
        state_hooks = layout.job_hooks(optimizer)
    else:
        state_hooks = dict(model_state=lambda: D.full_model_state(raw_model),
                           optimizer_state=lambda: D.full_optimizer_state(raw_model, optimizer),
                           load_optimizer_state=lambda state: D.load_full_optimizer_state(raw_model, optimizer,
                                                                                          state))

    job = loop.Job(model=params if layout is not None else model, optimizer=optimizer, next_batch=next_batch, loss=lambda batch: model(**batch)[1],
                   evaluate=evaluate, data=make_sampler(train_split, t_cfg, block, data_rank, data_world),
                   autocast=autocast, tokens=lambda batch: t_cfg.batch_size * block * data_world,
                   flops_per_token=flops_per_token, peak_flops=peak_flops(device, t_cfg.peak_flops),
                   restart_data=restart_data, name="pretrain", **state_hooks)
    result = loop.train_loop(t_cfg, job, out, tracker, checkpoint, info)
    state_bytes = runtime.all_gather_objects(D.local_state_bytes(params, optimizer), info)

    # -- the final model
    final_dir = out / "final"
    if not result.stopped:
        # Under FSDP gathering the full weights is collective: every rank takes part.
        if layout is not None:
            final_state = layout.full_state()
        else:
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
        tracker.end("KILLED" if result.stopped else "FINISHED")
    runtime.barrier(info)
    return {
        "step": result.step,
        "stopped_by_signal": result.stopped,
        "world_size": info.world_size,
        "tokens_per_step": tokens_per_step,
        "train_loss": result.last_eval.get("train_loss"),
        "val_loss": result.last_eval.get("val_loss"),
        "val_bpb": result.last_eval.get("val_bpb"),
        "tokens_per_s": result.tokens_per_s,
        "n_params": n_params,
        "state_bytes_per_rank": state_bytes,
        "out_dir": str(out),
        "final_model": str(final_dir) if not result.stopped else None,
        "tracking_run_id": tracker.run_id,
        "history": result.history,
    }
