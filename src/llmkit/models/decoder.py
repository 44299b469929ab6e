"""Decoder-only Transformer (GPT family), in the spirit of nanoGPT's model.py.

One configurable block covers GPT-2 (learned positions, LayerNorm, GELU, tied embeddings) and
Llama-style models (RoPE, RMSNorm, SwiGLU, grouped-query attention via `n_kv_head`). Attention goes
through `F.scaled_dot_product_attention`, which picks the flash / memory-efficient kernel where the
hardware has one.

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
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.models.layers import Attention, FeedForward, make_norm, rope_cache


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
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu"] = "gelu"
    """`gelu` is the exact (erf) GELU; `gelu_tanh` the tanh approximation GPT-2 uses (HF `gelu_new`)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    positions: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_head is None:
            self.n_head = max(1, self.d_model // 64)
        if self.d_ff is None:
            if self.activation == "swiglu":
                self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
            else:
                self.d_ff = 4 * self.d_model

    def validate(self) -> None:
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size: must be >= 1, got {self.vocab_size}")
        for name in ("block_size", "n_layer", "d_model", "n_head", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"n_head: {self.n_head} does not divide d_model={self.d_model}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(f"n_kv_head: must be >= 1 and divide n_head={self.n_head}, got {self.n_kv_head}")
        if self.positions == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError(f"n_head: rope needs an even head size, d_model/n_head = {self.d_model // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

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
    """

    def __init__(self, config: DecoderConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        max_len = max_len or config.block_size
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.prefix_len = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.length = 0
        self.prefix_len = 0


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.norm1 = make_norm(config.norm, config.d_model, config.bias, config.norm_eps)
        self.attn = Attention(config.d_model, config.n_head, config.kv_heads, config.bias, config.dropout)
        self.norm2 = make_norm(config.norm, config.d_model, config.bias, config.norm_eps)
        self.mlp = FeedForward(config.d_model, config.d_ff, config.activation, config.bias, config.dropout)

    def forward(self, x, rope, cache: KVCache | None, layer: int, prefix=None):
        buffers = (cache.k[layer], cache.v[layer]) if cache is not None else None
        start = cache.length if cache is not None else 0
        x = x + self.attn(self.norm1(x), causal=True, rope=rope, kv_buffers=buffers, start=start, prefix=prefix)
        return x + self.mlp(self.norm2(x))


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
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config.norm, config.d_model, config.bias, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.positions == "rope":
            cos, sin = rope_cache(config.block_size, config.head_dim, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # learned key/value prefix (prefix tuning); None = plain model. Set by llmkit.models.prefix.apply_prefix.
        self.prefix: nn.Module | None = None
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids -> logits (B, T, vocab) and, with targets (B, T), the mean cross-entropy.

        Targets equal to -100 are ignored. With `cache`, idx holds only the new tokens; they are placed
        after the `cache.length` positions already cached, and the cache grows by T.
        With a prefix attached (`self.prefix`), every layer also attends to its P prefix keys/values: without
        a cache they are computed here, with one they are written to its first P slots on the first call.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0  # cache slot of the first new token
        prefix_kv = None
        if self.prefix is not None:
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
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(pos, pos + T, device=idx.device))
        else:
            rope = (self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T])
        x = self.drop(x)
        if prefix_kv is None:
            for i, block in enumerate(self.blocks):
                x = block(x, rope, cache, i)
        else:
            for i, block in enumerate(self.blocks):
                x = block(x, rope, None, i, prefix=(prefix_kv[i, 0][None], prefix_kv[i, 1][None]))
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

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

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 * n_layer * d_model * T (PaLM, appendix B)."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.d_model * T
