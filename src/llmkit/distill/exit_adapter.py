"""A trained early exit for self-speculative decoding: `llmkit distill-exit --config configs/exit_*.yaml`.

Self-speculative decoding drafts with the model's own first K layers and verifies with all of them, so the
output is the model's own greedy tokens (`llmkit.infer.speculative`). An ordinary checkpoint's layer K is
not trained to be read by the LM head, though: SmolLM2's first 15 of 30 layers agree with the last on 3-4%
of drafts (docs/speculative.md). Two fixes exist:
- LayerSkip (Elhoushi et al. 2024) retrains the whole model with an early-exit loss, which changes it;
- Kangaroo (Liu et al. 2024, "Kangaroo: Lossless Self-Speculative Decoding via Double Early Exiting") keeps
  the model frozen and trains a small adapter between layer K and the LM head. This module does that.

The adapter is one transformer block of the model's own shape. By default (`init: identity`) it is a copy
of the model's last block with the two projections that write into the residual stream (attention output,
MLP down) zeroed, so training starts from the bare exit and only improves on it (zero-initialised residual
branches, as LoRA's B = 0). `init: last_block` keeps the copy whole; on SmolLM2 the last block fed layer 8's
hidden state is further from the model than the bare exit (KL 19.9 vs 13.7 nats on a short prompt).
It is trained to match the full model's next-token distribution: forward KL(p_model || p_draft) at
temperature `temperature`, over every position of windows of the training text. The model does not change,
so verification still yields exactly its own tokens, and one adapter file serves it (~1/n_layer of its
weights).

The first K layers run once per batch: a pre-hook on block K captures their output (and the rotary tables)
during the full model's no-grad forward, and the adapter starts from there. Checkpoints, exact resume,
MLflow tracking and SIGTERM handling come from the shared loop (`llmkit.train.loop`).

The draft's LM head can be cut to the `draft_vocab` most frequent token ids of the training text (FR-Spec,
Zhao et al. 2025, "Accelerating Large-Vocabulary Language Models via Frequency-Ranked Speculative
Sampling"): on a small model the output head is a large share of a draft step (SmolLM2: 28M of 135M
parameters), and the draft only needs to propose likely tokens. The full model still verifies every token,
so the output does not change; a token outside the subset is simply never drafted.

Output: `<out_dir>/final/exit_adapter.safetensors` (the block, and `draft_vocab` ids when set) and
`exit_adapter.json` (K, the base model's weights digest, held-out figures): the format of
`llmkit.infer.exit_draft`, whose `load_exit_adapter` reads it back for `make_draft` and for
`llmkit generate --speculative draft --draft-model exit:DIR`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from llmkit import runtime
from llmkit.data.tokenized import file_sha256, open_split
from llmkit.infer.exit_draft import check_layers, save_exit_adapter
from llmkit.models.decoder import Block, Decoder
from llmkit.track import TrackConfig, Tracker
from llmkit.train import loop
from llmkit.train.pretrain import ensure_prepared
from llmkit.train.sampler import WindowSampler, fixed_batches

log = logging.getLogger(__name__)



@dataclass
class ExitDataConfig:
    inputs: list[str] = field(default_factory=list)
    """Text / jsonl / json files (e.g. chat transcripts rendered with the model's template, or the model's own
    replies: what it will be asked to generate)."""
    prepared: str | None = None
    """Where the tokenized shards live; None -> <out_dir>/data."""
    val_fraction: float = 0.05
    text_field: str = "text"

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")


@dataclass
class ExitTrainConfig(loop.LoopConfig):
    batch_size: int = 4
    block_size: int = 256
    """Tokens per training window."""
    max_steps: int = 300
    lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_interval: int = 100
    eval_batches: int = 4
    checkpoint_interval: int = 100


@dataclass
class ExitConfig:
    model: str = ""
    """The model dir whose early exit is trained (it stays unchanged)."""
    layers: int = 0
    """K: the draft runs the first K blocks, then the adapter, the final norm and the LM head."""
    temperature: float = 1.0
    init: Literal["identity", "last_block"] = "identity"
    """identity: the last block's copy with its residual output projections zeroed (starts as the bare exit);
    last_block: the copy as it is."""
    draft_vocab: int | None = 8192
    """Draft only the N most frequent token ids of the training text (FR-Spec); null: the whole vocabulary."""
    out_dir: str = "runs/exit"
    data: ExitDataConfig = field(default_factory=ExitDataConfig)
    train: ExitTrainConfig = field(default_factory=ExitTrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model: required (the model dir whose early exit is trained)")
        if self.layers < 1:
            raise ValueError(f"layers: must be >= 1 (the blocks the draft runs before its adapter), got {self.layers}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise ValueError(f"draft_vocab: must be >= 1 (or null for the whole vocabulary), got {self.draft_vocab}")


def new_adapter(model: Decoder, init: str = "identity") -> Block:
    """A block of the model's shape holding a copy of its last block's weights (trainable); init "identity"
    zeroes the projections that write into the residual stream, so the block starts as the identity."""
    if init not in ("identity", "last_block"):
        raise ValueError(f"init: 'identity' or 'last_block', got {init!r}")
    adapter = copy.deepcopy(model.blocks[-1])
    if init == "identity":
        with torch.no_grad():
            adapter.attn.proj.weight.zero_()
            mlp = adapter.mlp
            for w in ([mlp.down] if hasattr(mlp, "router") else [mlp.down.weight]):  # MoE: stacked experts
                w.zero_()
            if getattr(mlp, "shared", None) is not None:
                mlp.shared.down.weight.zero_()
            for lin in (adapter.attn.proj, getattr(mlp, "down", None)):
                if isinstance(lin, torch.nn.Linear) and lin.bias is not None:
                    lin.bias.zero_()
    for p in adapter.parameters():
        p.requires_grad_(True)
    return adapter


def frequent_tokens(split, n: int, vocab: int) -> torch.Tensor:
    """The n most frequent token ids (ascending id order) of a tokenized split, at most `vocab` of them."""
    counts = np.zeros(vocab, dtype=np.int64)
    for shard in split.shards:
        counts += np.bincount(np.asarray(shard, dtype=np.int64), minlength=vocab)[:vocab]
    top = np.argsort(-counts, kind="stable")[:min(n, vocab)]
    return torch.from_numpy(np.sort(top))


class _ExitPoint:
    """Captures the input of block K (the output of the first K blocks) and its rotary tables during a forward
    of the full model."""

    def __init__(self, model: Decoder, layers: int):
        self.hidden: torch.Tensor | None = None
        self.rope = None
        self.handle = model.blocks[layers].register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        self.hidden, self.rope = args[0], args[1]

    def remove(self) -> None:
        self.handle.remove()


def exit_logits(model: Decoder, adapter: Block, point: _ExitPoint, layers: int) -> torch.Tensor:
    """The draft's logits (B, T, V) from the hidden state `point` captured at block `layers`."""
    return model.head(adapter(point.hidden, point.rope, None, layers))


def kl_to_model(model_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(softmax(model / T) || softmax(draft / T)) x T^2 (Hinton et al. 2015)."""
    v = model_logits.size(-1)
    p = F.log_softmax(model_logits.float().reshape(-1, v) / temperature, dim=-1)
    q = F.log_softmax(draft_logits.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean") * temperature ** 2


@torch.no_grad()
def exit_agreement(model: Decoder, adapter: Block | None, layers: int, batches, temperature: float = 1.0
                   ) -> dict[str, float]:
    """Held-out figures of an exit: KL to the full model and top-1 agreement (the share of positions where the
    draft's argmax is the model's, what greedy verification accepts). adapter None: the bare exit (the first
    K blocks straight into the final norm and head), the untrained baseline."""
    point = _ExitPoint(model, layers)
    kl = agree = n = 0.0
    try:
        for x, _ in batches:
            full, _ = model(x)
            draft = exit_logits(model, adapter, point, layers) if adapter is not None else model.head(point.hidden)
            kl += float(kl_to_model(full, draft, temperature)) * x.numel()
            agree += float((full.argmax(-1) == draft.argmax(-1)).sum())
            n += x.numel()
    finally:
        point.remove()
    return {"exit_kl": kl / n, "exit_top1": agree / n}


def train_exit_adapter(cfg: ExitConfig, resume: bool = False) -> dict:
    """Train the exit adapter of `cfg.model` at `cfg.layers`; writes `<out_dir>/final` (see the module doc).

    Returns a summary: step, held-out exit_kl / exit_top1 of the trained adapter and of the bare exit
    (`baseline_*`), the adapter dir, the tracking run id, and `stopped_by_signal`.
    """
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    cfg.validate()
    info = runtime.setup(cfg.train.device)
    if info.enabled:
        raise ValueError("distill-exit runs in one process (no torchrun): the adapter is one block")
    out = Path(cfg.out_dir)
    checkpoint = loop.open_run(out, resume, info)
    device = info.device
    model_dir = Path(cfg.model)
    model = load_model(model_dir, device).eval()
    if not isinstance(model, Decoder):
        raise ValueError(f"{model_dir}: an early exit needs a decoder-only model, got {type(model).__name__}")
    check_layers(model, cfg.layers)
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = Tokenizer.load(model_dir)

    data_dir = ensure_prepared(cfg.data, out, tokenizer, info)
    train_split, val_split = open_split(data_dir, "train"), open_split(data_dir, "val")
    t_cfg = cfg.train
    block = min(t_cfg.block_size, model.config.block_size)
    heldout = fixed_batches(val_split, t_cfg.eval_batches, t_cfg.batch_size, block, seed=2)
    heldout = [(x.to(device), y.to(device)) for x, y in heldout]

    torch.manual_seed(t_cfg.seed)
    adapter = new_adapter(model, cfg.init).to(device).train()
    vocab = model.config.vocab_size
    draft_vocab = frequent_tokens(train_split, cfg.draft_vocab, vocab) if cfg.draft_vocab else None
    loop.restore_weights(adapter, checkpoint)
    optimizer = loop.make_optimizer(t_cfg, [(list(adapter.parameters()), 1.0)])
    dtype = runtime.resolve_dtype(t_cfg.precision, device)
    autocast = loop.forward_context(device, dtype)
    point = _ExitPoint(model, cfg.layers)
    baseline = exit_agreement(model, None, cfg.layers, heldout, cfg.temperature)
    model_sha256 = file_sha256(model_dir / "model.safetensors")

    tracker = Tracker(cfg.track, cfg.out_dir, active=True)
    with tracker:
        loop.start_tracking(tracker, cfg, out, checkpoint, adapter, base_model=str(model_dir),
                            base_model_sha256=model_sha256)
        tracker.log_metrics({f"baseline_{k}": v for k, v in baseline.items()}, 0)
        log.info("bare exit after %d of %d layers: KL %.3f, top-1 agreement %.3f", cfg.layers,
                 model.config.n_layer, baseline["exit_kl"], baseline["exit_top1"])

        def next_batch():
            x, _ = job.data.next_batch()
            return x.to(device)

        def loss(x):
            with torch.no_grad():
                full, _ = model(x)
            return kl_to_model(full, exit_logits(model, adapter, point, cfg.layers), cfg.temperature)

        def evaluate():
            adapter.eval()
            figures = exit_agreement(model, adapter, cfg.layers, heldout, cfg.temperature)
            adapter.train()
            return figures

        job = loop.Job(model=adapter, optimizer=optimizer, next_batch=next_batch, loss=loss, evaluate=evaluate,
                       data=WindowSampler(train_split, t_cfg.batch_size, block, t_cfg.seed), autocast=autocast,
                       tokens=lambda x: x.numel(), facts={"layers": cfg.layers, "base_model_sha256": model_sha256},
                       name="distill-exit")
        try:
            result = loop.train_loop(t_cfg, job, out, tracker, checkpoint, info)
        finally:
            point.remove()
        final = out / "final"
        if not result.stopped:
            save_exit_adapter(adapter, final, cfg.layers, model.config.n_layer, model_sha256,
                              {**result.last_eval, **{f"baseline_{k}": v for k, v in baseline.items()}}, draft_vocab)
            tracker.log_artifact(final, "exit_adapter")
        tracker.end("KILLED" if result.stopped else "FINISHED")
    return {"step": result.step, "stopped_by_signal": result.stopped, **result.last_eval,
            **{f"baseline_{k}": v for k, v in baseline.items()},
            "adapter": str(final) if not result.stopped else None, "tracking_run_id": tracker.run_id,
            "history": result.history}
