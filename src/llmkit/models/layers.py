"""Building blocks shared by the architecture families: norms, rotary positions, feed-forward."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): no mean subtraction, no bias; the Llama norm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16/fp16 activations do not lose the small-variance tail.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def make_norm(kind: str, dim: int, bias: bool, eps: float = 1e-5) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


def rope_cache(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary embeddings (Su et al. 2021), each of shape (seq_len, head_dim // 2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x: (B, H, T, D) by cos/sin: (T, D/2).

    The half-split pairing is the one Llama/GPT-NeoX checkpoints use, so weights load without permuting.
    """
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class FeedForward(nn.Module):
    """Position-wise MLP: `gelu`/`gelu_tanh`/`relu` (GPT/BERT: up, act, down) or `swiglu` (Shazeer 2020: gated, 3 matrices)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool, dropout: float):
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        if activation == "swiglu":
            self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        elif self.activation == "relu":
            h = F.relu(self.up(x))
        elif self.activation == "gelu_tanh":  # GPT-2's tanh approximation (HF "gelu_new")
            h = F.gelu(self.up(x), approximate="tanh")
        else:
            h = F.gelu(self.up(x))
        return self.dropout(self.down(h))


def causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """(q_len, k_len) bool, True where query i (at absolute position k_len - q_len + i) may see key j."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def merge_masks(mask: torch.Tensor | None, causal: torch.Tensor | None) -> torch.Tensor | None:
    """Combine an attention mask (bool keep-mask or additive float bias) with a causal bool mask."""
    if causal is None:
        return mask
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, float("-inf"))


class Attention(nn.Module):
    """Multi-head attention for every family, through `F.scaled_dot_product_attention`.

    - self-attention (`cross=False`): one fused `qkv` projection (q: n_head heads, k and v: n_kv_head
      heads each; grouped-query attention when n_kv_head < n_head, Ainslie et al. 2023);
    - cross-attention (`cross=True`): `q` from the input, fused `kv` from `memory` (the encoder output).

    `forward(x, memory=None, causal=False, mask=None, rope=None, kv_buffers=None, start=0)`:
        x: (B, T, d_model); memory: (B, S, d_model) for cross-attention.
        causal: each query sees only keys at or before its own position (decoders).
        mask: bool keep-mask or additive float bias (e.g. T5's relative position bias), broadcastable
            to (B, n_head, T, keys) — padding masks are (B, 1, 1, keys).
        rope: (cos, sin) for the T positions of x (rotary embeddings on q and k).
        kv_buffers: (k, v) caches of shape (B_max, n_kv_head, max_len, head_dim); the new keys/values are
            written at [start, start+T) and attention reads [0, start+T).
        prefix: (k, v) learned prefix keys/values (prefix tuning, `llmkit.models.prefix`), each of shape
            (1 or B, n_kv_head, P, head_dim), put in front of the keys/values of x (self-attention, after
            rope: the prefix carries no position) or of memory (cross-attention). `mask` must then cover
            P + keys columns. Not with kv_buffers: a cache holds the prefix in its first P slots.
    `scale` None is 1/sqrt(head_dim); T5 uses 1.0 (its initialisation absorbs the factor).
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int | None = None, bias: bool = False,
                 dropout: float = 0.0, cross: bool = False, scale: float | None = None,
                 head_dim: int | None = None):
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        self.head_dim = head_dim or d_model // n_head
        self.scale = scale
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        if cross:
            self.q = nn.Linear(d_model, q_dim, bias=bias)
            self.kv = nn.Linear(d_model, 2 * kv_dim, bias=bias)
        else:
            self.qkv = nn.Linear(d_model, q_dim + 2 * kv_dim, bias=bias)
        self.cross = cross
        self.proj = nn.Linear(q_dim, d_model, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of `memory`: computed once per encoder output and reusable."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, causal: bool = False,
                mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_buffers: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0,
                memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.cross:
            q = self._heads(self.q(x), self.n_head)
            k, v = memory_kv if memory_kv is not None else self.project_kv(memory)
        else:
            kv_dim = self.n_kv_head * self.head_dim
            q, k, v = self.qkv(x).split((self.n_head * self.head_dim, kv_dim, kv_dim), dim=2)
            q, k, v = self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if kv_buffers is not None:
                kb, vb = kv_buffers
                kb[:B, :, start:start + T] = k
                vb[:B, :, start:start + T] = v
                k, v = kb[:B, :, :start + T], vb[:B, :, :start + T]
        if prefix is not None:
            pk, pv = prefix
            k = torch.cat((pk.expand(B, -1, -1, -1), k), dim=2)
            v = torch.cat((pv.expand(B, -1, -1, -1), v), dim=2)
        k, v = self._expand_kv(k), self._expand_kv(v)
        dropout_p = self.dropout if self.training else 0.0
        if causal and mask is None and k.shape[2] == T:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.scale)
        else:
            # one new query (T == 1) after a cache sees every cached key: no causal mask needed
            cm = causal_mask(T, k.shape[2], x.device) if causal and T > 1 else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=merge_masks(mask, cm), dropout_p=dropout_p,
                                               scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, T, hd) -> (B, H, T, hd): query head h reads key/value head h // (H / H_kv), as HF's
        `repeat_kv` does (so GQA checkpoints load without permuting heads)."""
        if self.n_kv_head == self.n_head:
            return t
        return t.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
