"""Pipeline-parallel training of a `Decoder`: contiguous ranges of blocks as stages, micro-batches scheduled by
`torch.distributed.pipelining`.

GPipe (Huang et al. 2019) cuts the model into stages, one per process, and the batch into micro-batches so
that the stages work on different micro-batches at once; the idle "bubble" is (pp - 1) / (m + pp - 1) of a
step with m micro-batches. 1F1B (PipeDream-Flush, Narayanan et al. 2021) runs the same arithmetic but starts
each micro-batch's backward as soon as it can, so a stage holds at most pp micro-batches' activations instead
of m. Interleaved 1F1B (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM", §2.2) gives each process v stages (rank r holds stages r, r + pp, ...), dividing the
bubble by v for v times the messages.

A stage (`DecoderStage`) holds blocks [a, b) under their own names (`blocks.5.attn...`, a ModuleDict keyed by
the block index), the first stage also the embeddings, the last the final norm and LM head, so checkpoints
use the same parameter names as an unpipelined model and reshard between layouts. Tied embeddings (one
matrix for the token embedding and the LM head) become two copies, on the first and the last stage, as in
Megatron-LM: they start equal, their gradients are summed between the two stages once per step
(`sync_tied_grads`), so the same AdamW update keeps them equal; the clipping norm counts the matrix once. Within a stage tensor
parallelism and FSDP apply as without pipelining (`mesh.shard`). Between stages travel the hidden states,
(micro-batch, T / tp, d_model) per tensor-parallel rank.

The schedule runs forward and backward itself, so the training loop hands it whole batches
(`PipelineRunner.train_step`); `PipelineRunner(idx, targets)` is the forward-only evaluation. Both return the
mean loss on every rank (the last stage computes it; one scalar all-reduce over the stages shares it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from llmkit.models.layers import softcap
from llmkit.train import mesh as mesh_parallel

SCHEDULES = ("1f1b", "gpipe", "interleaved-1f1b")


def stage_layers(n_layer: int, n_stages: int) -> list[range]:
    """Blocks of each stage: contiguous, as even as possible, the first n_layer % n_stages stages one more
    (the last stage also runs the LM head, so it gets no extra block)."""
    base, extra = divmod(n_layer, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        size = base + (s < extra)
        bounds.append(range(start, start + size))
        start += size
    return bounds


class DecoderStage(nn.Module):
    """Blocks `layers` of `model`, with its embeddings when `first` and its final norm and head when `last`.

    forward: first stage (B, T) token ids, others (B, T / tp, d_model) hidden states -> hidden states, or
    (B, T, vocab) logits on the last stage."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool, tp: int):
        super().__init__()
        self.tok_emb = model.tok_emb if first else None
        self.pos_emb = model.pos_emb if first else None
        self.drop = model.drop
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.norm_f = model.norm_f if last else None
        self.lm_head = model.lm_head if last else None
        if getattr(model, "rope_cos", None) is not None:
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.embed_scale = model.embed_scale
        self.final_softcap = model.config.final_softcap
        self.tp = tp  # sequence parallel: a stage's hidden states hold T / tp positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok_emb is not None:
            T = x.shape[1]
            h = self.tok_emb(x)
            if self.embed_scale is not None:
                h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
            if self.pos_emb is not None:
                h = h + self.pos_emb(torch.arange(T, device=x.device))
            h = self.drop(h)
        else:
            h, T = x, x.shape[1] * self.tp
        rope = (self.rope_cos[:T], self.rope_sin[:T]) if self.rope_cos is not None else None
        for i, block in self.blocks.items():
            h = block(h, rope, None, int(i))
        if self.lm_head is None:
            return h
        logits = self.lm_head(self.norm_f(h))
        return logits if self.final_softcap is None else softcap(logits, self.final_softcap)


class PipelineRunner:
    """This process's stages of a pipelined `Decoder`, their schedule and the parameters they hold.

    `parts` is one module with every parameter of this process under its unpipelined name (for the optimizer
    and checkpoints); `train_step(batch, scale)` runs forward + backward of a batch over its micro-batches;
    calling the runner like a model, `runner(idx, targets)`, returns (None, mean loss) without gradients."""

    def __init__(self, model: nn.Module, layout: mesh_parallel.Layout, param_dtype: torch.dtype | None = None):
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        cfg = layout.config
        mesh_parallel.check_model(model, cfg)
        mesh_parallel.split_qkv(model)
        device = next(model.parameters()).device
        self.tied = model.lm_head.weight is model.tok_emb.weight
        if self.tied:  # the last stage's own copy of the matrix (equal at the start on every rank)
            model.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())
        n_stages = cfg.pp * cfg.stages_per_rank
        ranges = stage_layers(model.config.n_layer, n_stages)
        mine = [layout.pp_rank + v * cfg.pp for v in range(cfg.stages_per_rank)]  # looped placement
        self.stages_modules = [DecoderStage(model, ranges[s], s == 0, s == n_stages - 1, cfg.tp) for s in mine]
        self.parts = nn.Module()  # every parameter of this process, under the unpipelined names
        first, last = self.stages_modules[0], self.stages_modules[-1]
        self.parts.tok_emb = first.tok_emb if mine[0] == 0 else None
        self.parts.pos_emb = first.pos_emb if mine[0] == 0 else None
        self.parts.blocks = nn.ModuleDict({k: b for st in self.stages_modules for k, b in st.blocks.items()})
        self.parts.norm_f = last.norm_f if mine[-1] == n_stages - 1 else None
        self.parts.lm_head = last.lm_head if mine[-1] == n_stages - 1 else None
        # the model keeps only what this process runs (its modules now live in the stages)
        model.blocks = nn.ModuleList()
        model.tok_emb = model.pos_emb = model.norm_f = model.lm_head = None
        for stage in self.stages_modules:
            mesh_parallel.shard(stage, layout, param_dtype)
        for stage in self.stages_modules:  # the checkpoint wrappers replaced the stages' blocks: share them
            for key in stage.blocks:
                self.parts.blocks[key] = stage.blocks[key]
        self.group = layout.mesh["pp"].get_group()
        self.is_first, self.is_last = mine[0] == 0, mine[-1] == n_stages - 1
        self.tied_group = _first_last_group(layout.mesh) if self.tied else None
        self.scale = 1.0
        stages = [PipelineStage(m, s, n_stages, device, group=self.group) for m, s in zip(self.stages_modules, mine)]
        if cfg.schedule == "interleaved-1f1b":
            if cfg.microbatches % cfg.pp:
                raise ValueError(f"train.parallel.microbatches: interleaved-1f1b needs a multiple of pp={cfg.pp}, "
                                 f"got {cfg.microbatches}")
            self.schedule = ScheduleInterleaved1F1B(stages, cfg.microbatches, loss_fn=self._loss)
        else:
            kind = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[cfg.schedule]
            self.schedule = kind(stages[0], cfg.microbatches, loss_fn=self._loss)
        self.training = True

    def tied_copy(self) -> nn.Parameter | None:
        """This process's copy of a tied embedding matrix (first stage: the embedding, last: the head)."""
        if not self.tied:
            return None
        return self.parts.tok_emb.weight if self.is_first else self.parts.lm_head.weight if self.is_last else None

    def sync_tied_grads(self) -> None:
        """Sum the tied matrix's gradients of the first and last stages (call once per optimizer step, after the
        micro-batches): each copy then holds the gradient of the one shared weight."""
        copy = self.tied_copy()
        if copy is None or copy.grad is None:
            return
        grad = copy.grad
        if hasattr(grad, "placements") and grad.placements != copy.placements:
            # under tp the embedding's gradient comes back as a pending sum (Partial) over the vocabulary
            # shards, the head's already split by rows: lay both out as their weights before adding them
            grad = copy.grad = grad.redistribute(copy.device_mesh, copy.placements)
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        dist.all_reduce(local, group=self.tied_group)  # the same shard of the same matrix on both sides

    def norm_params(self) -> list[nn.Parameter]:
        """The parameters whose gradients the clipping norm counts: all but the last stage's tied copy."""
        skip = self.parts.lm_head.weight if self.tied and self.is_last else None
        return [p for p in self.parts.parameters() if p is not skip]

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return loss * self.scale

    def _run(self, idx: torch.Tensor, targets: torch.Tensor, backward: bool) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        args = (idx,) if self.is_first else ()
        kwargs = {"target": targets, "losses": losses} if self.is_last else {}
        (self.schedule.step if backward else self.schedule.eval)(*args, **kwargs)
        loss = torch.stack([x.detach().float() for x in losses]).mean() / self.scale if self.is_last \
            else torch.zeros((), device=idx.device)
        dist.all_reduce(loss, group=self.group)  # only the last stage's is not zero
        return loss

    def train_step(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Forward and backward of `batch` ({"idx": (B, T), "targets": (B, T)}) over the micro-batches, the
        gradients of loss x scale accumulated into the parameters; returns the unscaled mean loss."""
        self.scale = scale
        return self._run(batch["idx"], batch["targets"], backward=True)

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, targets: torch.Tensor):
        self.scale = 1.0
        return None, self._run(idx, targets, backward=False)

    def train(self, mode: bool = True) -> PipelineRunner:
        self.training = mode
        for stage in self.stages_modules:
            stage.train(mode)
        return self

    def eval(self) -> PipelineRunner:
        return self.train(False)


def _first_last_group(mesh):
    """The process group of this rank's first and last pipeline stage (same dp / fsdp / tp coordinates). Every
    rank creates every such group, in the same order, as `new_group` requires."""
    ranks = mesh.mesh.reshape(mesh.mesh.shape[0], -1)  # (pp, the other coordinates)
    mine = None
    for column in range(ranks.shape[1]):
        pair = [int(ranks[0, column]), int(ranks[-1, column])]
        group = dist.new_group(pair)
        if dist.get_rank() in pair:
            mine = group
    return mine
