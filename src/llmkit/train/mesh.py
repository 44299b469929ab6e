"""Composable parallel training on one device mesh: pipeline x data (replicated and sharded) x tensor parallel.

`train.parallel: {pp, dp, fsdp, tp}` lays the processes out on a 4-D mesh `(pp, dp, fsdp, tp)`, tp innermost
(the ranks of one tensor-parallel group are neighbours, i.e. on the same node when it has tp or more devices)
and pp outermost (stages exchange only activations, the least traffic, so they may sit on different nodes):

* pp - pipeline parallel: contiguous ranges of blocks as stages, micro-batches scheduled by
  `torch.distributed.pipelining` (GPipe, 1F1B, interleaved 1F1B); `llmkit.train.pipeline`.
* tp - tensor parallel, Megatron-LM (Shoeybi et al. 2019, "Megatron-LM", §3) with sequence parallelism
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", §4.2), through
  DTensor's `parallelize_module`: in every block the attention heads and the MLP's hidden units are split tp
  ways (q, k, v, up, gate column-parallel; proj, down row-parallel). Between the sub-layers the activations
  stay split along the *sequence* (`Shard(1)`), so the norms, residual adds and dropouts each do 1/tp of the
  work and hold 1/tp of the activations; an all-gather enters each sub-layer and a reduce-scatter leaves it
  (the same bytes as Megatron's two all-reduces per block). The token embedding is split by vocabulary rows
  (each rank looks up its rows, a reduce-scatter sums and splits by sequence), the LM head by vocabulary
  columns; tied embeddings stay one parameter.
* fsdp - FSDP2 (`fully_shard`, ZeRO-3): every block and the root (embeddings, final norm, head) are sharded
  fsdp ways over the data-parallel ranks; a block's weights are all-gathered for its forward and backward and
  its gradients reduce-scattered.
* dp - replicas of the fsdp-sharded model (HSDP, "hybrid sharding"): gradients are all-reduced across the dp
  groups. With fsdp 1 this is plain data parallelism.

The data-parallel ranks are dp x fsdp; each sees its own batches, and the tp ranks and pipeline stages of one
data-parallel rank see the same batch. Gradients are averaged over the data-parallel ranks, so a run equals one process that sees all their
batches, up to float rounding (tests/test_mesh_parallel.py).

Module names: under `parallel` the fused q/k/v projection of each block is held as three linears
(`attn.qkv.q`, `.k`, `.v`, `SplitQKV`), so that tensor parallelism can split each by heads; every layout,
tp 1 included, uses the same names, which is what lets a distributed checkpoint written under one layout be
loaded under another (`sharded_state` / `load_sharded_state`). `full_state` gathers and fuses them back into
the `Decoder`'s own layout for the final model directory.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from llmkit.runtime import DistInfo


@dataclass
class ParallelConfig:
    """`train.parallel`: how the processes are laid out. world size = pp x dp x fsdp x tp."""

    pp: int = 1
    """Pipeline stages (processes); the blocks are split into pp x stages_per_rank contiguous stages."""
    microbatches: int | None = None
    """Pipeline micro-batches per batch (must divide train.batch_size); None: pp."""
    schedule: Literal["1f1b", "gpipe", "interleaved-1f1b"] = "1f1b"
    """1f1b (PipeDream-Flush, Narayanan et al. 2021): at most pp micro-batches' activations in flight;
    gpipe (Huang et al. 2019): all forwards, then all backwards; interleaved-1f1b (Megatron-LM, Narayanan
    et al. 2021 §2.2): stages_per_rank stages per process, a smaller bubble for more messages."""
    stages_per_rank: int | None = None
    """Stages per process: 1 for 1f1b / gpipe, default 2 for interleaved-1f1b."""

    dp: int = 1
    """Data-parallel replicas (gradients all-reduced between them)."""
    fsdp: int = -1
    """Data-parallel shards of the weights, gradients and optimizer state (FSDP2); -1: the processes left over
    by dp and tp."""
    tp: int = 1
    """Tensor-parallel degree: splits attention heads, key/value heads and MLP hidden units; must divide them."""
    reshard_after_forward: bool = True
    """FSDP: free a block's gathered weights after its forward (ZeRO-3) and gather them again for backward;
    False keeps them until backward (ZeRO-2-like: more memory, one all-gather less per block)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them (one extra block forward)."""

    def validate(self) -> None:
        for name in ("pp", "dp", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.fsdp < 1 and self.fsdp != -1:
            raise ValueError(f"fsdp: must be >= 1, or -1 for the processes left over, got {self.fsdp}")
        if self.microbatches is not None and self.microbatches < 1:
            raise ValueError(f"microbatches: must be >= 1, got {self.microbatches}")
        if self.stages_per_rank is not None and self.stages_per_rank < 1:
            raise ValueError(f"stages_per_rank: must be >= 1, got {self.stages_per_rank}")
        if self.schedule != "interleaved-1f1b" and self.stages_per_rank not in (None, 1):
            raise ValueError(f"stages_per_rank: {self.stages_per_rank} needs schedule interleaved-1f1b")

    def resolve(self, world_size: int) -> ParallelConfig:
        """A copy with fsdp filled in and every degree checked against the world size."""
        self.validate()
        fsdp, rest = self.fsdp, self.pp * self.dp * self.tp
        if fsdp == -1:
            if world_size % rest:
                raise ValueError(f"train.parallel: pp x dp x tp = {rest} does not divide the {world_size} processes")
            fsdp = world_size // rest
        if rest * fsdp != world_size:
            raise ValueError(f"train.parallel: pp x dp x fsdp x tp = {self.pp} x {self.dp} x {fsdp} x {self.tp} = "
                             f"{rest * fsdp}, but there are {world_size} processes")
        default_stages = 2 if self.schedule == "interleaved-1f1b" else 1
        return dataclasses.replace(self, fsdp=fsdp, microbatches=self.microbatches or self.pp,
                                   stages_per_rank=self.stages_per_rank or default_stages)

    @property
    def data_parallel(self) -> int:
        return self.dp * self.fsdp

    def as_dict(self) -> dict[str, int]:
        return {"pp": self.pp, "dp": self.dp, "fsdp": self.fsdp, "tp": self.tp}


@dataclass
class Layout:
    """Where this process sits on the mesh."""

    config: ParallelConfig
    mesh: object | None
    """The (pp, dp, fsdp, tp) DeviceMesh; None in a single process."""
    data_rank: int
    """This process's index among the data-parallel ranks (its batches)."""
    pp_rank: int = 0

    @property
    def data_world(self) -> int:
        return self.config.data_parallel


def make_layout(cfg: ParallelConfig, info: DistInfo) -> Layout:
    """Resolve `cfg` for this world and build the device mesh (collective under torchrun)."""
    cfg = cfg.resolve(info.world_size)
    if not info.enabled:
        return Layout(cfg, None, 0)
    from torch.distributed.device_mesh import init_device_mesh

    # DTensor warns that reducing the clipping norm over (fsdp, tp) takes two all-reduces instead of one over
    # a flattened mesh; every rank runs the same two in the same order, so the norms agree: a cost, not a bug
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

    mesh = init_device_mesh(info.device.type, (cfg.pp, cfg.dp, cfg.fsdp, cfg.tp),
                            mesh_dim_names=("pp", "dp", "fsdp", "tp"))
    return Layout(cfg, mesh, (info.rank // cfg.tp) % cfg.data_parallel, info.rank // (cfg.data_parallel * cfg.tp))


class SplitQKV(nn.Module):
    """A block's fused q/k/v projection held as three linears: y = [q(x), k(x), v(x)] (the fused output)."""

    def __init__(self, fused: nn.Linear, q_dim: int, kv_dim: int):
        super().__init__()
        bias = fused.bias is not None
        dims = (q_dim, kv_dim, kv_dim)
        for name, w, b in zip("qkv", fused.weight.split(dims), fused.bias.split(dims) if bias else (None,) * 3):
            linear = nn.Linear(fused.in_features, w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
                if bias:
                    linear.bias.copy_(b)
            setattr(self, name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.q(x), self.k(x), self.v(x)), dim=-1)


def split_qkv(model: nn.Module) -> None:
    """Replace every block's fused `attn.qkv` by a `SplitQKV` with the same weights (in place)."""
    for block in model.blocks:
        attn = block.attn
        if isinstance(attn.qkv, SplitQKV):
            continue
        attn.qkv = SplitQKV(attn.qkv, attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim)


def fuse_qkv_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with `SplitQKV` names (`...attn.qkv.q.weight`) in the Decoder's fused layout
    (`...attn.qkv.weight` = rows of q, then k, then v)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for part in ("q", "k", "v"):
            marker = f".qkv.{part}."
            if marker in key:
                if part == "q":
                    prefix, leaf = key.split(marker)
                    out[f"{prefix}.qkv.{leaf}"] = torch.cat(
                        [state[f"{prefix}.qkv.{p}.{leaf}"] for p in ("q", "k", "v")], dim=0)
                break
        else:
            out[key] = value
    return out


def check_model(model: nn.Module, cfg: ParallelConfig) -> None:
    """Refuse, naming the setting, what this layout cannot split."""
    c = getattr(model, "config", None)
    if getattr(c, "FAMILY", None) != "decoder":
        raise ValueError("train.parallel: supports the decoder family (GPT); use train.strategy for encoders "
                         "and encoder-decoders")
    if c.moe is not None:
        raise ValueError("train.parallel: mixture-of-experts models use train.expert_parallel (with DDP)")
    if getattr(model, "prefix", None) is not None:
        raise ValueError("train.parallel: prefix tuning is not supported")
    tp = cfg.tp
    if tp > 1:
        for name, value in (("model.n_head", c.n_head), ("the key/value heads", c.kv_heads),
                            ("model.d_ff", c.d_ff)):
            if value % tp:
                raise ValueError(f"train.parallel.tp={tp} does not divide {name} ({value})")
        if c.qk_norm:
            raise ValueError("train.parallel.tp: q/k norms (model.qk_norm) are not split yet; use tp 1")
    if cfg.pp > 1:
        stages = cfg.pp * (cfg.stages_per_rank or 1)
        if c.n_layer < stages:
            raise ValueError(f"train.parallel: {stages} pipeline stages need at least as many blocks, the model "
                             f"has {c.n_layer}")
        if getattr(model, "rope_original_len", None) is not None:
            raise ValueError("train.parallel.pp: sequence-length-dependent RoPE scaling (dynamic, longrope) is "
                             "not supported in pipeline stages")


def parallelize(model: nn.Module, layout: Layout, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Split `model` (a `Decoder` on this process's device, same initial weights on every rank) over the
    layout's mesh, in place: tensor parallel inside each block, activation checkpointing, then FSDP2 over the
    data-parallel ranks. Call before building the optimizer (the parameters become DTensors). A single process
    gets only the q/k/v split and, if asked, activation checkpointing. Pipeline parallelism (pp > 1) is
    `llmkit.train.pipeline.pipeline_stages`, which calls `shard` on each stage.

    param_dtype: FSDP's mixed-precision policy (weights gathered and computed in it, gradients reduced in
    fp32, the sharded master weights stay fp32); None keeps the weights' dtype.
    """
    check_model(model, layout.config)
    split_qkv(model)
    return shard(model, layout, param_dtype)


def shard(module: nn.Module, layout: Layout, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Tensor parallel, activation checkpointing and FSDP2 on `module`: a `Decoder` or a pipeline stage (its
    `blocks` a ModuleList or a ModuleDict; `tok_emb`, `pos_emb`, `norm_f`, `lm_head` where it has them)."""
    cfg = layout.config
    if layout.mesh is not None and cfg.tp > 1:
        _tensor_parallel(module, layout.mesh["tp"])
    if cfg.activation_checkpointing:
        _checkpoint_blocks(module)
    if layout.mesh is not None and cfg.data_parallel > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dp_mesh = layout.mesh["dp", "fsdp"] if cfg.dp > 1 else layout.mesh["fsdp"]
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in blocks_of(module):
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=mp)
        fully_shard(module, mesh=dp_mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=mp)
    return module


def blocks_of(module: nn.Module) -> list[nn.Module]:
    blocks = module.blocks
    return list(blocks.values()) if isinstance(blocks, nn.ModuleDict) else list(blocks)


def _tensor_parallel(model: nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    has = lambda name: getattr(model, name, None) is not None  # noqa: E731 - a pipeline stage lacks some
    tied = has("lm_head") and has("tok_emb") and model.lm_head.weight is model.tok_emb.weight
    root = {}
    if has("tok_emb"):
        root["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if has("pos_emb"):  # (T, d) position rows, split like the tokens' sequence
        root["pos_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0))
    if has("lm_head"):
        root["norm_f"] = SequenceParallel()
        root["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    if root:
        parallelize_module(model, tp_mesh, root)
    if tied:  # one parameter again: both sides shard its vocabulary rows, Shard(0)
        model.lm_head.weight = model.tok_emb.weight
    for name in ("tok_emb", "pos_emb"):
        if has(name):
            getattr(model, name).weight.register_post_accumulate_grad_hook(_grad_like_weight)
    for block in blocks_of(model):
        plan = {
            "norm1": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attn.qkv.q": ColwiseParallel(),
            "attn.qkv.k": ColwiseParallel(),
            "attn.qkv.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
            "norm2": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.up": ColwiseParallel(),
            "mlp.down": RowwiseParallel(output_layouts=Shard(1)),
        }
        if hasattr(block.mlp, "gate"):
            plan["mlp.gate"] = ColwiseParallel()
        for name in ("attn_out_norm", "mlp_out_norm"):
            if getattr(block, name) is not None:
                plan[name] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
        block.attn.n_head //= tp  # this rank's heads: the attention reshapes by them
        block.attn.n_kv_head //= tp


def _grad_like_weight(param) -> None:
    """A vocabulary- or position-split embedding's gradient comes back from DTensor's embedding backward
    replicated (the whole table on every tp rank); keep only this rank's rows, as its weight and AdamW state
    are laid out (a local slice, no communication)."""
    if param.grad is not None and param.grad.placements != param.placements:
        param.grad = param.grad.redistribute(param.device_mesh, param.placements)


def _checkpoint_blocks(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = model.blocks
    for key in (blocks.keys() if isinstance(blocks, nn.ModuleDict) else range(len(blocks))):
        blocks[key] = checkpoint_wrapper(blocks[key])


# -- state: sharded (distributed checkpoints) and full (the final model) ---------------------------------
def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, optimizer_names: dict[str, str] | None = None
                  ) -> dict:
    """{"model": ..., "optimizer": ...} of this rank's shards, keyed by parameter names that are the same in
    every layout; `torch.distributed.checkpoint.save` writes it and `load_sharded_state` reads it into any
    other layout (resharding). `optimizer_names` renames optimizer-state entries: a pipeline's last stage
    stores its copy of a tied embedding's AdamW state under "tok_emb.weight", the name an unpipelined tied
    model gives the one matrix."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": _rename_params(optim_state, optimizer_names or {})}


def _rename_params(optim_state: dict, names: dict[str, str]) -> dict:
    if not names:
        return optim_state
    groups = [{**g, "params": [names.get(p, p) for p in g["params"]]} for g in optim_state["param_groups"]]
    return {"state": {names.get(k, k): v for k, v in optim_state["state"].items()}, "param_groups": groups}


def save_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, path,
                       optimizer_names: dict[str, str] | None = None) -> None:
    """Every rank writes its own shards to the directory `path` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(model, optimizer, optimizer_names), checkpoint_id=str(path))


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, path,
                       optimizer_names: dict[str, str] | None = None) -> None:
    """Read shards written by `save_sharded_state` under any layout into this one (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = sharded_state(model, optimizer, optimizer_names)
    dcp.load(state, checkpoint_id=str(path))
    back = {new: old for old, new in (optimizer_names or {}).items()}
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=_rename_params(state["optimizer"], back))


def full_state(model: nn.Module, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded weights of `model` in the Decoder's own layout (fused qkv, no wrapper prefixes), on CPU.
    Collective; only global rank 0 receives them (the others get an empty dict) unless `every_rank`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    offload = dist.is_initialized() and not every_rank
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    state = {k.replace("_checkpoint_wrapped_module.", ""): v.detach().to("cpu") for k, v in state.items()}
    return fuse_qkv_state(state)
