"""Tensor- and pipeline-parallel inference for `Decoder` with explicit torch.distributed collectives.

The same code runs over gloo (CPU processes) and nccl (one GPU per process); launch it under torchrun or
from processes that have already called `init_process_group` (tests/test_parallel_infer.py spawns 2).

* Tensor parallel (Megatron-LM, Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter
  Language Models Using Model Parallelism", §3): in every block the attention heads are split across
  ranks (rank r keeps query heads [r*H/W, (r+1)*H/W) and, under grouped-query attention, exactly the
  key/value heads those queries read) and the MLP's `up`/`gate` columns are split (column parallel);
  `proj` and `down` are then row parallel: each rank multiplies its slice and one `all_reduce` (sum) per
  sub-layer restores the full output (their biases are added once, after the sum). Two all-reduces per
  block, as in Megatron. Embeddings, norms and the LM head are *replicated* on every rank: the simplest
  correct choice (no vocab-parallel embedding / cross-entropy), at the cost of holding them W times.
  Each rank's KV cache holds only its own key/value heads.
* Pipeline parallel (layer split as in GPipe, Huang et al. 2019, "GPipe: Efficient Training of Giant
  Neural Networks using Pipeline Parallelism"): rank r holds a contiguous range of blocks; rank 0 also
  embeds the tokens, the last rank also applies the final norm and the LM head. Hidden states (B, T,
  d_model) travel stage to stage with `send`/`recv`; every stage keeps a KV cache for its own layers.
  No micro-batching: with one sequence decoded token by token the stages run one after the other, so
  pipeline parallelism here splits the *memory* of the model, not its latency.
* `parallel_generate` runs on every rank and returns the same tokens everywhere: one rank samples (rank 0
  under tp; the last stage under pp, which is where the logits are) and broadcasts each token.

Every decoder option (q/k norms, soft-capping, sliding windows, partial rotary, scaled embeddings, gated
MLPs) travels with the shards: tensor parallel runs the model's own forward with sharded layers, pipeline
parallel the model's own embedding, blocks and head.

Not supported (refused): prefix-tuned models, int8-quantized models (their layers are not `nn.Linear`),
head / key-value head / d_ff counts that the world size does not divide, and under pipeline parallel the
RoPE scalings whose frequencies depend on the sequence length (dynamic, longrope).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn

from llmkit.infer.generate import SamplingParams, eos_set
from llmkit.models.decoder import Decoder, KVCache
from llmkit.models.layers import GATED_ACTIVATIONS, Attention, FeedForward
from llmkit.sampling import sample_next

__all__ = ["TPDecoder", "PPStage", "shard_decoder_tp", "split_decoder_pp", "parallel_generate"]


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, Decoder):
        raise TypeError(f"parallel inference supports llmkit Decoder models, got {type(model).__name__}")
    if model.prefix is not None:
        raise ValueError("parallel inference does not support prefix-tuned models (merge or drop the prefix)")


def _make_cache(config, n_layer: int, kv_heads: int, batch_size: int, max_len: int, device, dtype) -> KVCache:
    """A KVCache for `n_layer` layers of `kv_heads` heads each (KVCache only reads these config fields)."""
    shape = SimpleNamespace(n_layer=n_layer, kv_heads=kv_heads, head_dim=config.head_dim,
                            block_size=config.block_size)
    return KVCache(shape, batch_size, max_len, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------ tensor parallel
class _RowParallel(nn.Module):
    """Runs a sub-layer whose output projection holds this rank's input rows, sums the partial outputs
    across ranks (`all_reduce`) and adds the full bias once."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.inner = inner
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.group = group

    def forward(self, *args, **kwargs) -> torch.Tensor:
        y = self.inner(*args, **kwargs)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y if self.bias is None else y + self.bias


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _shard_attention(attn: Attention, rank: int, world: int) -> Attention:
    if not isinstance(attn.qkv, nn.Linear) or not isinstance(attn.proj, nn.Linear):
        raise TypeError("tensor parallel needs nn.Linear projections (a quantized model cannot be sharded)")
    H, Hkv, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    h, hkv = H // world, Hkv // world
    q_rows = torch.arange(rank * h * hd, (rank + 1) * h * hd)
    # query head j reads kv head j // (H / Hkv); local queries [r*h, (r+1)*h) read kv heads [r*hkv, (r+1)*hkv)
    kv_rows = torch.arange(rank * hkv * hd, (rank + 1) * hkv * hd)
    rows = torch.cat((q_rows, H * hd + kv_rows, H * hd + Hkv * hd + kv_rows)).to(attn.qkv.weight.device)
    d_model = attn.qkv.weight.shape[1]
    # every per-head option travels with the heads (q/k norms are per head_dim, so replicated)
    local = Attention(d_model, h, hkv, bias=False, dropout=attn.dropout, scale=attn.scale, head_dim=hd,
                      softcap=attn.softcap, window=attn.window, rotary_dim=attn.rotary_dim)
    local.q_norm, local.k_norm = attn.q_norm, attn.k_norm
    local.qkv = _linear(attn.qkv.weight[rows], attn.qkv.bias[rows] if attn.qkv.bias is not None else None)
    local.proj = _linear(attn.proj.weight[:, q_rows.to(attn.proj.weight.device)], None)  # row parallel
    return local.to(attn.qkv.weight.device).eval()


def _shard_mlp(mlp: FeedForward, rank: int, world: int) -> FeedForward:
    if not all(isinstance(m, nn.Linear) for m in (mlp.up, mlp.down)):
        raise TypeError("tensor parallel needs nn.Linear projections (a quantized model cannot be sharded)")
    d_ff, d_model = mlp.up.weight.shape
    n = d_ff // world
    cols = slice(rank * n, (rank + 1) * n)
    local = FeedForward(d_model, n, mlp.activation, bias=False, dropout=mlp.dropout.p)
    local.up = _linear(mlp.up.weight[cols], mlp.up.bias[cols] if mlp.up.bias is not None else None)
    if mlp.activation in GATED_ACTIVATIONS:
        local.gate = _linear(mlp.gate.weight[cols], mlp.gate.bias[cols] if mlp.gate.bias is not None else None)
    local.down = _linear(mlp.down.weight[:, cols], None)  # row parallel: bias added after the all_reduce
    return local.to(mlp.up.weight.device).eval()


class TPDecoder(nn.Module):
    """One rank's tensor-parallel shard of a Decoder; `forward(idx, cache)` is collective (all ranks call it
    with the same tokens) and returns the full (replicated) logits on every rank."""

    def __init__(self, model: Decoder, rank: int, world: int, group=None):
        super().__init__()
        self.model, self.rank, self.world = model, rank, world
        self.config = model.config
        self.kv_heads = model.config.kv_heads // world

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.model(idx, cache=cache)[0]

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = next(self.model.parameters())
        return _make_cache(self.config, self.config.n_layer, self.kv_heads, batch_size, max_len, p.device, p.dtype)


def shard_decoder_tp(model: Decoder, rank: int, world: int, group=None, inplace: bool = False) -> TPDecoder:
    """Rank `rank`'s Megatron-style shard of `model` (see the module docstring).

    The model is deep-copied first unless `inplace` (which saves the transient copy of the weights).
    Raises ValueError unless `world` divides n_head, the key/value heads and d_ff.
    """
    _check_model(model)
    c = model.config
    for name, n in (("n_head", c.n_head), ("n_kv_head", c.kv_heads), ("d_ff", c.d_ff)):
        if n % world:
            raise ValueError(f"tensor parallel: {name}={n} is not divisible by the world size {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    m = model if inplace else copy.deepcopy(model)
    m.eval()
    for block in m.blocks:
        attn_bias, mlp_bias = block.attn.proj.bias, block.mlp.down.bias
        block.attn = _RowParallel(_shard_attention(block.attn, rank, world), attn_bias, group)
        block.mlp = _RowParallel(_shard_mlp(block.mlp, rank, world), mlp_bias, group)
    return TPDecoder(m, rank, world, group)


# ---------------------------------------------------------------------------------------- pipeline parallel
class PPStage(nn.Module):
    """Stage `rank` of `world`: blocks [start, stop) of the model (`layer_range`), plus the embeddings on
    stage 0 and the final norm + LM head on the last stage.

    `forward(idx, cache)` is collective: every stage is given the same token ids (stage 0 embeds them, the
    others only read their shape and positions); stages after the first receive the hidden states from the
    previous rank, stages before the last send theirs on. Returns the logits on the last stage, None elsewhere.
    """

    def __init__(self, model: Decoder, rank: int, world: int, group=None):
        super().__init__()
        _check_model(model)
        n = model.config.n_layer
        if world > n:
            raise ValueError(f"pipeline parallel: {world} stages for {n} layers (at most one stage per layer)")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        if model.rope_original_len is not None:
            # its frequencies depend on the sequence length (and longrope recomputes the cache past the
            # original context): tensor parallel runs the model's own forward and handles that
            raise ValueError(f"pipeline parallel does not support rope_scaling "
                             f"{model.config.rope_scaling['rope_type']!r}; use tensor parallel (--parallel tp)")
        bounds = [n * i // world for i in range(world + 1)]  # contiguous, sizes differ by at most one
        self.start, self.stop = bounds[rank], bounds[rank + 1]
        self.rank, self.world, self.group = rank, world, group
        self.config = model.config
        self.first, self.last = rank == 0, rank == world - 1
        self.blocks = nn.ModuleList(model.blocks[self.start:self.stop])
        # the model's own embedding and head (embedding scale, final soft-capping), not copies of them
        self.embed = model.embed if self.first else None
        self.pos_emb = model.pos_emb if self.first else None
        self.drop = model.drop
        self.head = model.head if self.last else None
        if model.config.positions == "rope":
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype  # plain attributes (a Parameter would be registered)
        self.eval()

    @property
    def layer_range(self) -> tuple[int, int]:
        return self.start, self.stop

    def _peer(self, stage: int) -> int:
        return stage if self.group is None else dist.get_global_rank(self.group, stage)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor | None:
        B, T = idx.shape
        pos = cache.length if cache is not None else 0
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size={self.config.block_size}")
        if cache is not None and pos + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {pos + T} needed")
        if self.first:
            x = self.embed(idx)
            if self.pos_emb is not None:
                x = x + self.pos_emb(torch.arange(pos, pos + T, device=idx.device))
            x = self.drop(x)
        else:
            x = torch.empty(B, T, self.config.d_model, device=self.device, dtype=self.dtype)
            dist.recv(x, src=self._peer(self.rank - 1), group=self.group)
        rope = (self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]) if self.config.positions == "rope" else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i)
        if cache is not None:
            cache.length += T
        if not self.last:
            dist.send(x.contiguous(), dst=self._peer(self.rank + 1), group=self.group)
            return None
        return self.head(x)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return _make_cache(self.config, self.stop - self.start, self.config.kv_heads, batch_size, max_len,
                           self.device, self.dtype)


def split_decoder_pp(model: Decoder, rank: int, world: int, group=None) -> PPStage:
    """Rank `rank`'s pipeline stage of `model` (shares the model's modules; nothing is copied)."""
    return PPStage(model, rank, world, group)


# --------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def parallel_generate(model_dir_or_model: str | Path | Decoder, prompt_ids: list[int],
                      params: SamplingParams | None = None, mode: str = "tp",
                      eos_id: int | Iterable[int] | None = None,
                      device: str | torch.device | None = None) -> list[int]:
    """New token ids for `prompt_ids`, decoded with tensor (`mode="tp"`) or pipeline (`"pp"`) parallelism
    across the ranks of the default process group. Collective: call it on every rank; every rank returns
    the same list, equal to `stream_tokens` in one process (same truncation, budget, EOS and seed rules).

    Without an initialised process group it calls `llmkit.runtime.setup()` (torchrun's
    environment); with world size 1 it is plain `stream_tokens`. The prompt of rank 0 is used on all ranks.
    """
    if mode not in ("tp", "pp"):
        raise ValueError(f"mode: expected 'tp' or 'pp', got {mode!r}")
    params = params or SamplingParams()
    if not dist.is_initialized():
        from llmkit.runtime import setup

        info = setup("auto" if device is None else str(device))
        device = info.device if device is None else device
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if isinstance(model_dir_or_model, (str, Path)):
        from llmkit.models.io import load_model

        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) \
                if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
        model = load_model(model_dir_or_model, device)
    else:
        model = model_dir_or_model
    if world == 1:
        from llmkit.infer.generate import stream_tokens

        return list(stream_tokens(model, prompt_ids, params, eos_id=eos_id))

    stops = eos_set(eos_id)
    box = [list(prompt_ids)]
    dist.broadcast_object_list(box, src=0)
    prompt_ids = box[0]
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token (e.g. the BOS token)")
    is_dir = isinstance(model_dir_or_model, (str, Path))
    stage = (shard_decoder_tp(model, rank, world, inplace=is_dir) if mode == "tp"
             else split_decoder_pp(model, rank, world))
    dev = next(model.parameters()).device
    sampler = 0 if mode == "tp" else world - 1  # the rank that holds the logits samples
    block = model.config.block_size
    ids = prompt_ids[-(block - 1):]
    budget = min(params.max_new_tokens, block - len(ids))
    gen = None
    if params.seed is not None and rank == sampler:
        gen = torch.Generator(device=dev)
        gen.manual_seed(params.seed)
    cache = stage.new_cache(1, len(ids) + budget)
    logits = stage(torch.tensor([ids], device=dev), cache)
    out: list[int] = []
    token = torch.zeros(1, dtype=torch.long, device=dev)
    for _ in range(budget):
        if rank == sampler:
            token = sample_next(logits[:, -1, :], params.temperature, params.top_k, params.top_p, gen).view(1)
            token = token.to(torch.long).contiguous()
        dist.broadcast(token, src=sampler)
        t = int(token.item())
        if params.stop_at_eos and t in stops:
            break
        out.append(t)
        if cache.length >= cache.max_len:
            break
        logits = stage(token.view(1, 1), cache)
    return out
