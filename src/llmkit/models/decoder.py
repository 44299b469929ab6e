"""Decoder-only Transformer (GPT family), in the spirit of nanoGPT's model.py.

One configurable block covers GPT-2 (learned positions, LayerNorm, GELU, tied embeddings) and
Llama-style models (RoPE, RMSNorm, SwiGLU, grouped-query attention via `n_kv_head`). Attention goes
through `F.scaled_dot_product_attention`, which picks the flash / memory-efficient kernel where the
hardware has one.

The open-weight families differ from Llama by a handful of switches, each a `DecoderConfig` field whose
default leaves the block as it was (docs/hf.md maps them to HF configs): RoPE context scaling
(`rope_scaling`: linear, dynamic NTK, YaRN, Llama 3.1, LongRoPE), q/k/v-only biases (`qkv_bias`, Qwen2),
per-head q/k RMSNorm and a head size independent of d_model (`qk_norm`, `head_dim`, Qwen3), sliding-window
attention on all or some layers (`sliding_window`, `layer_types`: Mistral, Phi-3, Gemma 2), and Gemma 2's
GeGLU, sqrt(d_model)-scaled embeddings, (1 + w) RMSNorm, norms after attention and MLP, attention and
final logit soft-capping and its own attention scale (`activation: geglu_tanh`, `scale_embeddings`,
`norm_unit_offset`, `post_norms`, `attn_softcap`, `final_softcap`, `attn_scale`).

Generation uses a pre-allocated key/value cache (`KVCache`): each new token attends to the cached keys
and values of all earlier tokens instead of recomputing them, so a step costs O(T) instead of O(T^2),
and the logits equal those of the full forward pass (tests/test_decoder.py checks this).

Prefix tuning (`llmkit.models.prefix.apply_prefix`, Li & Liang 2021) sets `Decoder.prefix`: every layer's
self-attention then also attends to P learned key/value vectors placed before the tokens. The prefix
takes no positions (token t still gets position t); in a `KVCache` it occupies the first P slots, written
by the first forward pass that uses the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.models.layers import (
    GATED_ACTIVATIONS,
    ROPE_SCALING_KEYS,
    ROPE_SCALING_TYPES,
    Attention,
    FeedForward,
    make_norm,
    rope_angles,
    rope_cache,
    rope_frequencies,
    softcap,
)
from llmkit.models.moe import MoEConfig, MoEFeedForward

LAYER_TYPES = ("full_attention", "sliding_attention")


LOSS_CHUNK = 256  # positions per chunk of `chunked_lm_loss` (256 x 152k fp32 logits = 156 MB)


def _chunk_nll_sum(head, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(x)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def chunked_lm_loss(head, x: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of head(x) against targets (-100 ignored), equal to the unchunked loss, without
    ever holding more than `chunk` positions' logits: each chunk's logits are computed, reduced to a summed
    NLL and dropped; under autograd they are recomputed from the chunk's hidden states in backward
    (`torch.utils.checkpoint`), so the graph keeps (chunk, d_model) inputs, not (chunk, vocab) logits."""
    from torch.utils.checkpoint import checkpoint

    chunk = chunk or LOSS_CHUNK
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    count = (targets != -100).sum()
    total = x.new_zeros((), dtype=torch.float32)
    for i in range(0, x.size(0), chunk):
        xs, ts = x[i:i + chunk], targets[i:i + chunk]
        if torch.is_grad_enabled() and xs.requires_grad:
            total = total + checkpoint(_chunk_nll_sum, head, xs, ts, use_reentrant=False)
        else:
            total = total + _chunk_nll_sum(head, xs, ts)
    # as F.cross_entropy's mean: NaN when every target is ignored
    return total / count


@dataclass
class DecoderConfig:
    FAMILY: ClassVar[str] = "decoder"
    vocab_size: int | None = None
    """Token ids the model knows; None -> the tokenizer's vocabulary size (set by the trainer)."""
    block_size: int = 1024
    """Longest sequence the model sees (context length, tokens)."""
    n_layer: int = 12
    d_model: int = 768
    n_head: int | None = None
    """Attention heads; None -> d_model // 64 (guide §1.2: 768 -> 12 heads)."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention, Ainslie et al. 2023); None -> n_head (plain multi-head).
    Each group of n_head // n_kv_head query heads shares one key/value head; the KV cache shrinks to match."""
    d_ff: int | None = None
    """Feed-forward width; None -> 4 * d_model, or ~8/3 * d_model (rounded up to 64) for swiglu."""
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu", "geglu_tanh"] = "gelu"
    """`gelu` is the exact (erf) GELU; `gelu_tanh` the tanh approximation GPT-2 uses (HF `gelu_new`).
    Gated (3 matrices, Shazeer 2020): `swiglu` (silu gate, Llama), `geglu_tanh` (tanh-GELU gate, Gemma),
    `geglu` (exact-GELU gate)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    positions: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = False
    norm_eps: float = 1e-5
    head_dim: int | None = None
    """Size of one attention head; None -> d_model // n_head. Qwen3 and Gemma set it explicitly (n_head *
    head_dim may differ from d_model: q/k/v project to n_head * head_dim, the output back to d_model)."""
    qkv_bias: bool | None = None
    """Biases on the q/k/v projection; None -> `bias`. Qwen2/Qwen2.5: true with `bias: false` (no bias on
    the attention output or the MLP)."""
    qk_norm: bool = False
    """RMSNorm (eps `norm_eps`) over each head's queries and keys before RoPE, weights of size head_dim
    (Qwen3; Dehghani et al. 2023): keeps attention logits bounded."""
    rotary_dim: int | None = None
    """Partial rotary embeddings: only the first rotary_dim of each head's head_dim dimensions are rotated,
    the rest carry no position (GPT-NeoX's rotary_pct; Phi-4-mini's partial_rotary_factor 0.75). None: the
    whole head."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE context extension, HF's `rope_parameters` minus rope_theta: {"rope_type": linear | dynamic |
    yarn | llama3 | longrope, ...its keys}; formulas in `llmkit.models.layers.rope_frequencies`. None: plain
    RoPE."""
    sliding_window: int | None = None
    """Sliding-window attention (Mistral, Phi-3, Gemma 2): a token attends to itself and the window - 1
    tokens before it, in the full pass and when decoding from the KV cache (a rolling buffer of `window`
    slots when every layer slides, see `KVCache`). None: full causal attention."""
    layer_types: list[str] | None = None
    """Per layer `sliding_attention` or `full_attention` (HF's `layer_types`; Gemma 2 alternates them,
    Qwen2 slides only above max_window_layers). None: every layer slides when `sliding_window` is set."""
    scale_embeddings: bool = False
    """Multiply token embeddings by sqrt(d_model) (Gemma; Vaswani et al. 2017 §3.4)."""
    norm_unit_offset: bool = False
    """RMSNorm scales by (1 + weight) (Gemma: weights stored as an offset from 1)."""
    post_norms: bool = False
    """Also normalise the attention and MLP outputs before they join the residual stream (Gemma 2's
    sandwich: x + norm(attn(norm(x))), then x + norm(mlp(norm(x))))."""
    attn_scale: float | None = None
    """Attention logit scale; None -> 1 / sqrt(head_dim). Gemma 2: query_pre_attn_scalar ** -0.5."""
    attn_softcap: float | None = None
    """Attention logits -> c * tanh(logits / c) (Gemma 2: 50). Such layers cannot use fused SDPA kernels."""
    final_softcap: float | None = None
    """Output logits -> c * tanh(logits / c) (Gemma 2: 30)."""
    moe: MoEConfig | None = None
    """Mixture-of-experts MLPs in every layer (`llmkit.models.moe`: experts, top_k, shared experts, capacity,
    router losses); None: dense. A dict is read as a MoEConfig. Needs activation swiglu."""
    hf_architecture: str | None = None
    """The Hugging Face architecture the model came from (e.g. Qwen2ForCausalLM), so `export_hf` writes
    the same one back; None: export picks one from the options."""

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.n_head is None:
            self.n_head = max(1, self.d_model // 64)
        if self.d_ff is None:
            if self.activation in GATED_ACTIVATIONS:
                self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
            else:
                self.d_ff = 4 * self.d_model
        if self.head_dim is None and self.n_head >= 1 and self.d_model % self.n_head == 0:
            self.head_dim = self.d_model // self.n_head

    def validate(self) -> None:
        if self.moe is not None:
            self.moe.validate()
            if self.activation != "swiglu":
                raise ValueError(f"moe: experts are SwiGLU MLPs; activation must be swiglu, got {self.activation}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size: must be >= 1, got {self.vocab_size}")
        for name in ("block_size", "n_layer", "d_model", "n_head", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            raise ValueError(f"n_head: {self.n_head} does not divide d_model={self.d_model} (or set head_dim)")
        if self.head_dim < 1:
            raise ValueError(f"head_dim: must be >= 1, got {self.head_dim}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(f"n_kv_head: must be >= 1 and divide n_head={self.n_head}, got {self.n_kv_head}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"n_head: rope needs an even head size, head_dim = {self.head_dim}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim: must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.rope_scaling is not None:
            if self.positions != "rope":
                raise ValueError("rope_scaling: needs positions: rope")
            kind = self.rope_scaling.get("rope_type")
            if kind not in ROPE_SCALING_TYPES:
                raise ValueError(f"rope_scaling.rope_type: {kind!r} is not supported "
                                 f"(supported: {', '.join(ROPE_SCALING_TYPES)})")
            missing = [k for k in ROPE_SCALING_KEYS[kind] if self.rope_scaling.get(k) is None
                       and not (k == "factor" and kind in ("yarn", "longrope"))]
            if missing:
                raise ValueError(f"rope_scaling.{missing[0]}: required for rope_type {kind!r}")
            if kind == "longrope":
                for k in ("short_factor", "long_factor"):
                    if len(self.rope_scaling[k]) != self.rope_dim // 2:
                        raise ValueError(f"rope_scaling.{k}: needs rotary dims / 2 = {self.rope_dim // 2} values, "
                                         f"got {len(self.rope_scaling[k])}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window: must be >= 1, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layer:
                raise ValueError(f"layer_types: {len(self.layer_types)} entries for n_layer={self.n_layer}")
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad:
                raise ValueError(f"layer_types: {bad[0]!r} is not one of {list(LAYER_TYPES)}")
        for name in ("attn_scale", "attn_softcap", "final_softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if (self.norm_unit_offset or self.qk_norm) and self.norm != "rmsnorm":
            raise ValueError(f"{'norm_unit_offset' if self.norm_unit_offset else 'qk_norm'}: needs norm: rmsnorm")

    @property
    def rope_dim(self) -> int:
        """Dimensions of each head that RoPE rotates: `rotary_dim`, or the whole head."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used: `n_kv_head`, or `n_head` when it is None."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head


class KVCache:
    """Keys and values of every layer for up to `max_len` positions: (n_layer, B, H_kv, max_len, head_dim) each.

    H_kv is the number of key/value heads (`config.kv_heads`), fewer than the query heads under GQA.

    `length` is how many slots are filled; a forward pass with a cache appends its tokens there. With a
    prefix-tuned model the first `prefix_len` slots hold the prefix (written by the model's first forward
    pass on an empty cache), so `max_len` must leave room for it (`Decoder.num_prefix_tokens`) and the
    token positions are `length - prefix_len`.

    Rolling buffer: when every layer has the same sliding window W (Mistral; `layer_types` None) and
    max_len > W, the cache keeps only W slots per layer, position p in slot p % W, as Mistral's reference
    implementation does ("rotating buffer cache"): no query ever looks further back, so memory stays
    O(W) however long the sequence grows (`rolling=False` keeps every position). `max_len` is still the
    number of positions the cache can take.
    """

    def __init__(self, config: DecoderConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 rolling: bool = True):
        max_len = max_len or config.block_size
        # (getattr: tensor-parallel inference sizes its shards' caches with a plain namespace of shapes)
        window = getattr(config, "sliding_window", None) if getattr(config, "layer_types", None) is None else None
        self.window = window if rolling and window is not None and max_len > window else None
        """W when this is a rolling buffer of W slots, else None."""
        slots = self.window or max_len
        shape = (config.n_layer, batch_size, config.kv_heads, slots, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._max_len = max_len
        self.length = 0
        self.prefix_len = 0
        self.tokens: torch.Tensor | None = None
        """(batch, max_len) token ids, kept only for models whose RoPE depends on the sequence length
        (longrope), which recompute the cache once the sequence passes the original context."""

    @property
    def max_len(self) -> int:
        return self._max_len

    def reset(self) -> None:
        self.length = 0
        self.prefix_len = 0

    def truncate(self, length: int) -> None:
        """Keep only the first `length` slots (the prefix's slots count), dropping every later position, so
        that the next forward pass writes from slot `length` (speculative decoding rolls back rejected draft
        tokens this way). Nothing is zeroed: slots past `length` are never read before they are rewritten.

        Refused for a rolling buffer (`window` set: a later position has already overwritten the slot of an
        earlier one, which truncation cannot bring back; build the cache with ``rolling=False``), and for a
        `length` below `prefix_len` or above `length`."""
        if self.window is not None:
            raise ValueError("truncate: a rolling KV cache cannot be rolled back (build it with rolling=False)")
        if not self.prefix_len <= length <= self.length:
            raise ValueError(f"truncate: length must be in [{self.prefix_len}, {self.length}], got {length}")
        self.length = length


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    With `post_norms` (Gemma 2) the branch outputs are normalised too: x + attn_out_norm(attn(norm1(x))),
    then x + mlp_out_norm(mlp(norm2(x))). `layer` picks this block's sliding window (`layer_types`).
    """

    def __init__(self, config: DecoderConfig, layer: int = 0):
        super().__init__()
        c = config

        def norm():
            return make_norm(c.norm, c.d_model, c.bias, c.norm_eps, c.norm_unit_offset)

        self.norm1 = norm()
        self.attn = Attention(c.d_model, c.n_head, c.kv_heads, c.bias, c.dropout, scale=c.attn_scale,
                              head_dim=c.head_dim, qkv_bias=c.qkv_bias, qk_norm_eps=c.norm_eps if c.qk_norm else None,
                              softcap=c.attn_softcap, window=c.layer_window(layer), rotary_dim=c.rotary_dim)
        self.norm2 = norm()
        self.mlp = (FeedForward(c.d_model, c.d_ff, c.activation, c.bias, c.dropout) if c.moe is None
                    else MoEFeedForward(c.d_model, c.d_ff, c.moe, c.bias))
        self.attn_out_norm = norm() if c.post_norms else None
        self.mlp_out_norm = norm() if c.post_norms else None

    def forward(self, x, rope, cache: KVCache | None, layer: int, prefix=None):
        buffers = (cache.k[layer], cache.v[layer]) if cache is not None else None
        start = cache.length if cache is not None else 0
        rolling = cache is not None and cache.window is not None
        a = self.attn(self.norm1(x), causal=True, rope=rope, kv_buffers=buffers, start=start, prefix=prefix,
                      rolling=rolling)
        return self.mlp_residual(self.attn_residual(x, a))

    def attn_residual(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """x plus the attention branch's output (projected; normalised with post_norms)."""
        return x + (attn_out if self.attn_out_norm is None else self.attn_out_norm(attn_out))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x plus the MLP branch of norm2(x)."""
        h = self.mlp(self.norm2(x))
        return x + (h if self.mlp_out_norm is None else self.mlp_out_norm(h))


class Decoder(nn.Module):
    """GPT: token (+ position) embedding, `n_layer` blocks, final norm, LM head."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        config.validate()
        if config.vocab_size is None:
            raise ValueError("DecoderConfig.vocab_size must be set (the tokenizer's vocab size)")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config.norm, config.d_model, config.bias, config.norm_eps, config.norm_unit_offset)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embeddings else None
        self.rope_original_len: int | None = None  # set by init_rope for sequence-length-dependent scalings
        if config.positions == "rope":
            self.init_rope()
        # learned key/value prefix (prefix tuning); None = plain model. Set by llmkit.models.prefix.apply_prefix.
        self.prefix: nn.Module | None = None
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def init_rope(self) -> None:
        """(Re)compute the RoPE cos/sin tables (non-persistent buffers) from the config.

        `rope_cos`/`rope_sin` hold the tables within the original context. Sequence-length-dependent
        scalings switch tables beyond it: longrope to its long factors (`rope_cos_long`/`rope_sin_long`),
        dynamic NTK to frequencies computed per sequence length (`rope_at`).
        """
        c = self.config
        cos, sin = rope_cache(c.block_size, c.rope_dim, c.rope_base, c.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        kind = (c.rope_scaling or {}).get("rope_type")
        self.rope_original_len = c.rope_scaling["original_max_position_embeddings"] \
            if kind in ("dynamic", "longrope") else None
        if kind == "longrope":
            cos, sin = rope_cache(c.block_size, c.rope_dim, c.rope_base, c.rope_scaling,
                                  seq_len_for_scaling=self.rope_original_len + 1)
            self.register_buffer("rope_cos_long", cos, persistent=False)
            self.register_buffer("rope_sin_long", sin, persistent=False)

    def rope_at(self, positions: torch.Tensor, seq_lens: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (positions.shape + (head_dim/2,)) for the token positions of a forward pass.

        Shape (..., rope_dim / 2). `seq_lens` is the sequence length the pass reaches (last position + 1): one int, or one per row
        (positions then (rows, ...)). Only dynamic NTK and longrope depend on it, and only past the original
        context, as in HF, where frequencies follow the longest position of each forward pass (keys already
        cached keep the frequencies they were rotated with).
        """
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if self.rope_original_len is None:
            return cos, sin
        per_row = isinstance(seq_lens, (list, tuple))
        lens = list(seq_lens) if per_row else [seq_lens]
        if max(lens) <= self.rope_original_len:
            return cos, sin
        c = self.config
        cos, sin = cos.clone(), sin.clone()
        for r, n in enumerate(lens):
            if n <= self.rope_original_len:
                continue
            where = r if per_row else slice(None)
            if c.rope_scaling["rope_type"] == "longrope":
                cos[where], sin[where] = self.rope_cos_long[positions[where]], self.rope_sin_long[positions[where]]
            else:  # dynamic NTK: frequencies for this sequence length
                inv_freq, factor = rope_frequencies(c.rope_dim, c.rope_base, c.rope_scaling, c.block_size, seq_len=n)
                cos[where], sin[where] = rope_angles(positions[where], inv_freq, factor)
        return cos, sin

    def long_rope_crossing(self, cached: int, new: int) -> bool:
        """True when a longrope model's sequence passes its original context in this forward pass (`cached`
        positions in the cache, `new` tokens added). From there on the whole sequence uses the long factors,
        so the cached keys, rotated with the short ones, are stale: HF's Phi-3 `generate` recomputes its
        cache at that point, and so do `forward` (from the token ids the cache keeps) and the Engine."""
        orig = self.rope_original_len
        return (orig is not None and self.config.rope_scaling["rope_type"] == "longrope"
                and 0 < cached <= orig < cached + new)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings of idx (scaled by sqrt(d_model) with `scale_embeddings`), without positions."""
        x = self.tok_emb(idx)
        # the factor rounded to the weights' dtype first, as Gemma does (bf16: sqrt(3072) -> 55.5)
        return x if self.embed_scale is None else x * torch.tensor(self.embed_scale, dtype=x.dtype)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and (with `final_softcap`) logit soft-capping: hidden states -> logits."""
        logits = self.lm_head(self.norm_f(x))
        return logits if self.config.final_softcap is None else softcap(logits, self.config.final_softcap)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, return_logits: bool = True
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) token ids -> logits (B, T, vocab) and, with targets (B, T), the mean cross-entropy.

        `return_logits=False` (with targets; training loops that only need the loss): the loss is computed
        `LOSS_CHUNK` positions at a time and each chunk's logits are recomputed in backward instead of kept
        (`chunked_lm_loss`), and None is returned for the logits: with a 152k vocabulary the fp32 logits, their
        log-softmax and their gradient are the largest tensors of a LoRA step (3 x 0.6 GB at 2 x 512 tokens).

        Targets equal to -100 are ignored. With `cache`, idx holds only the new tokens; they are placed
        after the `cache.length` positions already cached, and the cache grows by T.
        With a prefix attached (`self.prefix`), every layer also attends to its P prefix keys/values: without
        a cache they are computed here, with one they are written to its first P slots on the first call.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0  # cache slot of the first new token
        prefix_kv = None
        if self.prefix is not None:
            if self.config.sliding_window is not None:
                raise ValueError("prefix tuning is not supported on a model with sliding_window attention")
            if cache is None:
                prefix_kv = self.prefix()  # (n_layer, 2, H_kv, P, head_dim)
            elif cache.length == 0:
                self._fill_prefix(cache, B)
                start = cache.length
        pos = start - cache.prefix_len if cache is not None else 0  # position of the first new token
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size={self.config.block_size}")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start + T} needed")
        if cache is not None and self.rope_original_len is not None:  # sequence-length-dependent RoPE
            if cache.tokens is None:
                cache.tokens = torch.zeros(cache.k.shape[1], cache.max_len, dtype=torch.long, device=idx.device)
            if self.long_rope_crossing(pos, T):  # recompute the whole sequence with the long factors
                full = torch.cat((cache.tokens[:B, :pos], idx), dim=1)
                cache.reset()
                logits, loss = self(full, targets=None, cache=cache)
                logits = logits[:, -T:]
                if targets is not None:
                    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                           ignore_index=-100)
                return logits, loss
            cache.tokens[:B, pos:pos + T] = idx
        x = self.embed(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(pos, pos + T, device=idx.device))
        elif self.rope_original_len is None:
            rope = (self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T])
        else:
            rope = self.rope_at(torch.arange(pos, pos + T, device=idx.device), pos + T)
        x = self.drop(x)
        if prefix_kv is None:
            for i, block in enumerate(self.blocks):
                x = block(x, rope, cache, i)
        else:
            for i, block in enumerate(self.blocks):
                x = block(x, rope, None, i, prefix=(prefix_kv[i, 0][None], prefix_kv[i, 1][None]))
        if cache is not None:
            cache.length += T
        if not return_logits and targets is not None:
            return None, self._with_router_losses(chunked_lm_loss(self.head, x, targets))
        logits = self.head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
            loss = self._with_router_losses(loss)
        return logits, loss

    def _with_router_losses(self, loss: torch.Tensor) -> torch.Tensor:
        """In training, a mixture-of-experts model's loss plus every layer's weighted router losses
        (`MoEFeedForward.aux_loss`); the loss as it is otherwise (evaluation reports the plain LM loss)."""
        if self.config.moe is None or not self.training:
            return loss
        return loss + sum(b.mlp.aux_loss for b in self.blocks if b.mlp.aux_loss is not None)

    @property
    def num_prefix_tokens(self) -> int:
        """P, the cache slots the attached prefix takes (0 without one): add it to a `KVCache`'s max_len."""
        return 0 if self.prefix is None else self.prefix.num_virtual_tokens

    def _fill_prefix(self, cache: KVCache, batch_size: int) -> None:
        """Write every layer's prefix keys/values into the first P slots of an empty cache."""
        kv = self.prefix()  # (n_layer, 2, H_kv, P, head_dim)
        P = kv.shape[3]
        if P > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; the prefix alone needs {P}")
        cache.k[:, :batch_size, :, :P] = kv[:, 0, None].to(cache.k.dtype)
        cache.v[:, :batch_size, :, :P] = kv[:, 1, None].to(cache.v.dtype)
        cache.length = cache.prefix_len = P

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (and the tied token embedding counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def num_active_params(self) -> int:
        """Parameters one token uses: `num_params()` less, in every mixture-of-experts layer, the experts it is
        not routed to (experts - top_k of them); equal to `num_params()` for a dense model."""
        n = self.num_params()
        for block in self.blocks:
            mlp = block.mlp
            if isinstance(mlp, MoEFeedForward):
                per_expert = mlp.gate.numel() + mlp.up.numel() + mlp.down.numel()
                if mlp.lora_experts is not None:  # per-expert LoRA factors idle with their experts
                    per_expert += sum(p.numel() for p in mlp.lora_experts.parameters())
                per_expert //= mlp.cfg.experts
                n -= per_expert * (mlp.cfg.experts - mlp.cfg.top_k)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 * n_layer * d_attn * T (PaLM, appendix B),
        N the active parameters (`num_active_params`: a mixture of experts counts top_k experts per layer),
        d_attn = n_head * head_dim (= d_model unless head_dim is set); a sliding-window layer attends to at
        most `sliding_window` keys, so it counts min(T, window)."""
        c = self.config
        T = seq_len or c.block_size
        d_attn = c.n_head * c.head_dim
        keys = sum(min(T, c.layer_window(i) or T) for i in range(c.n_layer))
        return 6 * self.num_active_params() + 12 * d_attn * keys
