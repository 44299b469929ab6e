"""Building blocks shared by the architecture families: norms, rotary positions, feed-forward, attention."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): no mean subtraction, no bias; the Llama norm.

    `unit_offset`: scale by (1 + weight) instead of weight, computed in fp32 before the cast back, as Gemma
    does (its checkpoints store weight - 1, initialised at 0).
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16/fp16 activations do not lose the small-variance tail.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return xf.type_as(x) * self.weight


def make_norm(kind: str, dim: int, bias: bool, eps: float = 1e-5, unit_offset: bool = False) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, unit_offset=unit_offset)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): bounds x smoothly to (-cap, cap) (Gemma 2's attention / final logit soft-capping)."""
    return torch.tanh(x / cap) * cap


ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")
"""`DecoderConfig.rope_scaling["rope_type"]` values; each type's keys are those of HF's `rope_parameters`."""
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}


def rope_frequencies(head_dim: int, base: float = 10000.0, scaling: dict[str, Any] | None = None,
                     max_positions: int | None = None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim // 2,), attention_factor) of rotary embeddings, plain or with a context-extension
    scaling (`scaling["rope_type"]`, the formulas of HF's `modeling_rope_utils`, so checkpoints match):

    - ``linear`` (position interpolation, Chen et al. 2023): every frequency divided by `factor`.
    - ``dynamic`` (dynamic NTK, bloc97 2023): once the sequence (`seq_len`) is longer than the original
      context, the base grows to base * (factor * seq_len / orig - factor + 1) ** (d / (d - 2)); within it,
      plain RoPE. Frequencies depend on the sequence length: see `Decoder.rope_at`.
    - ``yarn`` (Peng et al. 2023, "YaRN"): high frequencies kept, low ones interpolated by `factor`, a linear
      ramp between dimensions `beta_fast` (32) and `beta_slow` (1) rotations; cos/sin scaled by the attention
      factor 0.1 * ln(factor) + 1 (or `attention_factor`, or mscale / mscale_all_dim).
    - ``llama3`` (Llama 3.1): wavelengths above orig / low_freq_factor divided by `factor`, below
      orig / high_freq_factor kept, a smooth blend between.
    - ``longrope`` (Phi-3, Ding et al. 2024 "LongRoPE"): per-dimension divisors, `short_factor` while the
      sequence fits the original context and `long_factor` beyond; cos/sin scaled by
      sqrt(1 + ln(s) / ln(orig)) with s = max_positions / orig (or `attention_factor`).

    `max_positions` is the model's context (HF max_position_embeddings), which yarn/longrope use when
    `factor` is absent and dynamic uses as the original context.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if not scaling:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "dynamic":
        orig = scaling["original_max_position_embeddings"]
        if seq_len is None or seq_len <= orig:
            return inv_freq, 1.0
        factor = scaling["factor"]
        base = base * ((factor * seq_len / orig) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
    if kind == "llama3":
        factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < orig / high) * ~(wavelen > orig / low)
        return torch.where(medium, smoothed, scaled), 1.0
    orig = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or (max_positions / orig)
    attention_factor = scaling.get("attention_factor")
    if kind == "yarn":
        if attention_factor is None:
            def mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations):  # the dimension that turns `rotations` times over the original context
            return (head_dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001  # no zero-width ramp
        ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        extrapolate = 1 - ramp  # 1: keep the frequency, 0: interpolate it
        pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolate) + 1.0 / pos_freqs * extrapolate
        return inv_freq, attention_factor
    if kind == "longrope":
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        long = seq_len is not None and seq_len > orig
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        base_freq = base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        return 1.0 / (ext * base_freq), attention_factor
    raise ValueError(f"rope_scaling.rope_type: {kind!r} is not supported (supported: {', '.join(ROPE_SCALING_TYPES)})")


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of positions (any shape) x inv_freq: shape positions.shape + (head_dim // 2,)."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    if attention_factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rope_cache(seq_len: int, head_dim: int, base: float = 10000.0, scaling: dict[str, Any] | None = None,
               seq_len_for_scaling: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary embeddings (Su et al. 2021), each of shape (seq_len, head_dim // 2).

    With `scaling` (see `rope_frequencies`) the frequencies are rescaled and yarn/longrope's attention
    factor is folded into the tables; `seq_len_for_scaling` picks the sequence-length-dependent variant
    (dynamic NTK, longrope's long factors) and is None for the variant within the original context.
    """
    inv_freq, factor = rope_frequencies(head_dim, base, scaling, max_positions=seq_len, seq_len=seq_len_for_scaling)
    return rope_angles(torch.arange(seq_len), inv_freq, factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x: (B, H, T, D) by cos/sin: (T, D/2).

    The half-split pairing is the one Llama/GPT-NeoX checkpoints use, so weights load without permuting.
    """
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")
"""Gated feed-forwards (Shazeer 2020, "GLU Variants Improve Transformer"): down(act(gate(x)) * up(x)), 3 matrices."""


class FeedForward(nn.Module):
    """Position-wise MLP: `gelu`/`gelu_tanh`/`relu` (GPT/BERT: up, act, down) or a gated one (Shazeer 2020):
    `swiglu` (silu gate: Llama, Mistral, Qwen, Phi-3), `geglu_tanh` (tanh-GELU gate: Gemma, HF
    `gelu_pytorch_tanh`), `geglu` (exact-GELU gate)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool, dropout: float):
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        if activation in GATED_ACTIVATIONS:
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
        elif self.activation == "geglu_tanh":
            h = F.gelu(self.gate(x), approximate="tanh") * self.up(x)
        elif self.activation == "geglu":
            h = F.gelu(self.gate(x)) * self.up(x)
        else:
            h = F.gelu(self.up(x))
        return self.dropout(self.down(h))


def causal_mask(q_len: int, k_len: int, device, window: int | None = None) -> torch.Tensor:
    """(q_len, k_len) bool, True where query i (at absolute position k_len - q_len + i) may see key j.

    With `window` (sliding-window attention), also only the keys less than `window` positions back:
    query at position p sees keys p - window + 1 .. p (HF's `sliding_window` convention).
    """
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
    if window is not None:
        keep = keep.triu(diagonal=k_len - q_len - window + 1)
    return keep


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
            written at [start, start+T) and attention reads [0, start+T) (with a window, only the slots
            some query of x can still see).
        rolling: kv_buffers is a rolling buffer of `window` slots, position p in slot p % window
            (`KVCache` of a sliding-window model).
        prefix: (k, v) learned prefix keys/values (prefix tuning, `llmkit.models.prefix`), each of shape
            (1 or B, n_kv_head, P, head_dim), put in front of the keys/values of x (self-attention, after
            rope: the prefix carries no position) or of memory (cross-attention). `mask` must then cover
            P + keys columns. Not with kv_buffers: a cache holds the prefix in its first P slots.
    `scale` None is 1/sqrt(head_dim); T5 uses 1.0 (its initialisation absorbs the factor), Gemma 2
    query_pre_attn_scalar ** -0.5.

    Options of the decoders imported from Hugging Face (all off by default; off costs nothing):
        qkv_bias: biases on q/k/v only (Qwen2); None -> `bias` (which then also covers `proj`).
        qk_norm_eps: RMSNorm over each head's q and k before RoPE (Qwen3, following Dehghani et al. 2023
            "Scaling Vision Transformers to 22B"); weights `q_norm`, `k_norm` of size head_dim.
        softcap: attention logits become softcap * tanh(logits / softcap) before the softmax (Gemma 2);
            SDPA cannot do this, so such layers compute the scores explicitly.
        window: sliding-window attention (Beltagy et al. 2020 "Longformer"; Mistral 7B, Jiang et al. 2023):
            a query sees only the `window` most recent positions, itself included.
        rotary_dim: rotate only the first rotary_dim dimensions of each head (partial rotary; `rope` then
            holds rotary_dim / 2 frequencies); None: the whole head.
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int | None = None, bias: bool = False,
                 dropout: float = 0.0, cross: bool = False, scale: float | None = None,
                 head_dim: int | None = None, qkv_bias: bool | None = None, qk_norm_eps: float | None = None,
                 softcap: float | None = None, window: int | None = None, rotary_dim: int | None = None):
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        self.head_dim = head_dim or d_model // n_head
        self.scale = scale
        self.softcap = softcap
        self.window = window
        self.rotary_dim = rotary_dim if rotary_dim != self.head_dim else None
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        in_bias = bias if qkv_bias is None else qkv_bias
        if cross:
            self.q = nn.Linear(d_model, q_dim, bias=in_bias)
            self.kv = nn.Linear(d_model, 2 * kv_dim, bias=in_bias)
        else:
            self.qkv = nn.Linear(d_model, q_dim + 2 * kv_dim, bias=in_bias)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(self.head_dim, eps=qk_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None
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

    def project_qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention q (B, H, T, hd), k and v (B, H_kv, T, hd) of x: projection, q/k norm, rotary."""
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split((self.n_head * self.head_dim, kv_dim, kv_dim), dim=2)
        q, k, v = self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            if self.rotary_dim is None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            else:
                r = self.rotary_dim
                q = torch.cat((apply_rope(q[..., :r], *rope), q[..., r:]), dim=-1)
                k = torch.cat((apply_rope(k[..., :r], *rope), k[..., r:]), dim=-1)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               is_causal: bool = False) -> torch.Tensor:
        """softmax(q k^T * scale [soft-capped] + mask) v for q (B, H, T, hd) and k, v (B, H_kv, S, hd) ->
        (B, H, T, hd). Grouped-query heads are read without copying (SDPA's enable_gqa) unless soft-capped."""
        dropout_p = self.dropout if self.training else 0.0
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                                  scale=self.scale, enable_gqa=self.n_kv_head != self.n_head)
        return self._softcapped(q, self._expand_kv(k), self._expand_kv(v), mask, is_causal, dropout_p)

    def _softcapped(self, q, k, v, mask, is_causal: bool, dropout_p: float) -> torch.Tensor:
        """Attention with soft-capped logits (Gemma 2), k/v already expanded to H heads."""
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        scores = softcap(torch.matmul(q, k.transpose(-1, -2)) * scale, self.softcap)
        if is_causal:
            mask = causal_mask(q.shape[2], k.shape[2], q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=dropout_p)
        return torch.matmul(probs, v)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, causal: bool = False,
                mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_buffers: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0,
                memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None, rolling: bool = False) -> torch.Tensor:
        B, T, _ = x.shape
        if self.cross:
            q = self._heads(self.q(x), self.n_head)
            k, v = memory_kv if memory_kv is not None else self.project_kv(memory)
        else:
            q, k, v = self.project_qkv(x, rope)
            if kv_buffers is not None and rolling:
                k, v = self._rolling(kv_buffers, k, v, start)
            elif kv_buffers is not None:
                kb, vb = kv_buffers
                kb[:B, :, start:start + T] = k
                vb[:B, :, start:start + T] = v
                # a sliding window never looks further back than window - 1 slots before the first query
                first = 0 if self.window is None else max(0, start - self.window + 1)
                k, v = kb[:B, :, first:start + T], vb[:B, :, first:start + T]
        if prefix is not None:
            pk, pv = prefix
            k = torch.cat((pk.expand(B, -1, -1, -1), k), dim=2)
            v = torch.cat((pv.expand(B, -1, -1, -1), v), dim=2)
        S = k.shape[2]
        # the window only bites once some query is `window` or more keys after the first one
        window = self.window if self.window is not None and causal and S > self.window else None
        k, v = self._expand_kv(k), self._expand_kv(v)
        dropout_p = self.dropout if self.training else 0.0
        if causal and mask is None and S == T and window is None:
            if self.softcap is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.scale)
            else:
                y = self._softcapped(q, k, v, None, True, dropout_p)
        else:
            # one new query (T == 1) after a cache sees every cached key: no causal mask needed
            cm = causal_mask(T, S, x.device, window) if causal and (T > 1 or window is not None) else None
            if self.softcap is None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=merge_masks(mask, cm), dropout_p=dropout_p,
                                                   scale=self.scale)
            else:
                y = self._softcapped(q, k, v, merge_masks(mask, cm), False, dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))

    def _rolling(self, kv_buffers, k: torch.Tensor, v: torch.Tensor, start: int):
        """Keys/values to attend to from a rolling buffer of W = window slots (position p in slot p % W),
        after writing the T new ones (positions start .. start+T-1): the W - 1 positions before `start` that
        the first new query can still see, then the new ones. One new token (decoding) reads the slots in
        place: all of them are in its window, and attention does not depend on the keys' order."""
        kb, vb = kv_buffers
        B, T, W = k.shape[0], k.shape[2], kb.shape[2]
        if T == 1:
            kb[:B, :, start % W] = k[:, :, 0]
            vb[:B, :, start % W] = v[:, :, 0]
            n = min(start + 1, W)
            return kb[:B, :, :n], vb[:B, :, :n]
        past = torch.arange(max(0, start - W + 1), start, device=k.device) % W
        k_all = torch.cat((kb[:B, :, past], k), dim=2)
        v_all = torch.cat((vb[:B, :, past], v), dim=2)
        keep = min(T, W)  # only the last W new positions stay
        slots = torch.arange(start + T - keep, start + T, device=k.device) % W
        kb[:B, :, slots] = k[:, :, T - keep:]
        vb[:B, :, slots] = v[:, :, T - keep:]
        return k_all, v_all

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, T, hd) -> (B, H, T, hd): query head h reads key/value head h // (H / H_kv), as HF's
        `repeat_kv` does (so GQA checkpoints load without permuting heads)."""
        if self.n_kv_head == self.n_head:
            return t
        return t.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
