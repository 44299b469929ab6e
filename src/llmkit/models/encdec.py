"""Encoder-decoder Transformer (T5 family: Raffel et al. 2020; T5 v1.1 with gated-GELU).

An encoder reads the whole input bidirectionally; a causal decoder reads the target and attends to the
encoder output through cross-attention. Both stacks are pre-norm with T5's scale-only RMS norm, have no
biases and no absolute positions: a bucketed *relative position bias* (one learned scalar per head and
bucket, bidirectional in the encoder, causal in the decoder) is added to the attention scores. As in
Hugging Face's T5 it is computed once per stack (the first layer owns it) and reused by every layer, and
attention logits are not scaled by 1/sqrt(d_kv) (T5's initialisation absorbs the factor).

With tied embeddings (original T5) the decoder output is multiplied by d_model**-0.5 before the shared
embedding matrix projects it to logits; untied models (T5 v1.1) have a separate `lm_head` and no scaling.

Generation runs the encoder once, computes every layer's cross-attention keys/values once
(`Attention.project_kv`), and caches the decoder's self-attention keys/values, so a step costs O(T).
tests/test_encdec.py checks logits, greedy generation and export against `transformers`.

Parameter names (state_dict keys)::

    shared.weight                                   token embedding (encoder, decoder, tied head)
    encoder.rel_bias.weight                         (relative_attention_num_buckets, n_head)
    encoder.blocks.{i}.norm1 / attn.{qkv,proj} / norm2 / mlp.{up,gate,down}
    encoder.norm_f.weight
    decoder.rel_bias.weight
    decoder.blocks.{i}.norm1 / self_attn.{qkv,proj} / norm2 / cross_attn.{q,kv,proj} / norm3 / mlp.{...}
    decoder.norm_f.weight
    lm_head.weight                                  only when tie_embeddings is False

`mlp.gate` exists only for `gated-gelu` (T5 v1.1: gelu_tanh(gate x) * up x).

Prefix tuning (`llmkit.models.prefix.apply_prefix`; Li & Liang 2021, who prefix BART's encoder and
decoder) sets `EncoderDecoder.prefix`; its forward gives (2 * n_decoder_layer + n_layer, 2, H, P, d_kv)
keys/values: decoder self-attention layers first, then cross-attention layers, then encoder layers. Every
one of those attentions then also attends to its P learned keys/values, which carry no relative position
bias (bias 0) and are never masked. In generation they fill the first P slots of the decoder cache and
are put in front of each layer's cached cross-attention keys/values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.models.layers import Attention, RMSNorm
from llmkit.sampling import sample_next

__all__ = ["EncDecConfig", "EncoderDecoder", "relative_position_bucket"]


@dataclass
class EncDecConfig:
    FAMILY: ClassVar[str] = "encdec"

    vocab_size: int | None = None
    """Token ids the model knows; None -> the tokenizer's vocabulary size (set by the trainer)."""
    block_size: int = 512
    """Longest input / target sequence the trainer feeds (tokens). Relative positions do not limit the
    model itself; this sets the training context and `flops_per_token`'s default length."""
    n_layer: int = 6
    """Encoder layers."""
    n_decoder_layer: int | None = None
    """Decoder layers; None -> n_layer."""
    d_model: int = 512
    n_head: int | None = None
    """Attention heads; None -> d_model // 64."""
    d_kv: int | None = None
    """Size of one attention head (T5's d_kv, need not be d_model / n_head); None -> d_model // n_head."""
    d_ff: int | None = None
    """Feed-forward width; None -> 4 * d_model."""
    activation: Literal["relu", "gated-gelu"] = "relu"
    """`relu`: original T5 (up, relu, down); `gated-gelu`: T5 v1.1 (gelu_tanh(gate x) * up x, down)."""
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout: float = 0.1
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    """Share the token embedding with the output head (and scale the decoder output by d_model**-0.5)."""
    pad_token_id: int = 0
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        if self.n_head is None:
            self.n_head = max(1, self.d_model // 64)
        if self.d_kv is None and self.n_head >= 1:
            self.d_kv = max(1, self.d_model // self.n_head)
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model

    def validate(self) -> None:
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size: must be >= 1, got {self.vocab_size}")
        for name in ("block_size", "n_layer", "n_decoder_layer", "d_model", "n_head", "d_kv", "d_ff",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.activation not in ("relu", "gated-gelu"):
            raise ValueError(f"activation: must be 'relu' or 'gated-gelu', got {self.activation!r}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets: must be >= 4 (half exact, half log-spaced, "
                             f"per direction), got {self.relative_attention_num_buckets}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps: must be > 0, got {self.norm_eps}")
        for name in ("pad_token_id", "decoder_start_token_id"):
            v = getattr(self, name)
            if v < 0 or (self.vocab_size is not None and v >= self.vocab_size):
                raise ValueError(f"{name}: must be a token id in [0, vocab_size), got {v}")

    @property
    def head_dim(self) -> int:
        return self.d_kv


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key position - query position), int64 in [0, num_buckets).

    Half of the buckets (per direction when bidirectional) hold exact distances 0..n/2-1, the other half
    log-spaced distances up to `max_distance`; farther positions share the last bucket. Unidirectional
    (decoder) buckets treat every future position (> 0) as distance 0; the causal mask hides them anyway.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float ops in the same order as Mesh TensorFlow / HF so bucket boundaries agree exactly
    large = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """Learned bias per (bucket, head): `forward(q_len, k_len, offset)` -> (1, n_head, q_len, k_len).

    Query i sits at absolute position offset + i, key j at j (offset = tokens already in a decoder cache).
    """

    def __init__(self, num_buckets: int, max_distance: int, n_head: int, bidirectional: bool):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.zeros(num_buckets, n_head))

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        device = self.weight.device
        q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance)
        return F.embedding(buckets, self.weight).permute(2, 0, 1).unsqueeze(0)


class T5FeedForward(nn.Module):
    """`relu`: down(relu(up x)); `gated-gelu`: down(gelu_tanh(gate x) * up x). No biases (HF wi / wi_1 =
    `up`, wi_0 = `gate`, wo = `down`). Dropout after the activation, as in T5."""

    def __init__(self, d_model: int, d_ff: int, activation: str, dropout: float):
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(d_model, d_ff, bias=False)
        if activation == "gated-gelu":
            self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "gated-gelu":
            h = F.gelu(self.gate(x), approximate="tanh") * self.up(x)
        else:
            h = F.relu(self.up(x))
        return self.down(self.dropout(h))


def _attention(config: EncDecConfig, cross: bool) -> Attention:
    return Attention(config.d_model, config.n_head, bias=False, dropout=config.dropout, cross=cross,
                     scale=1.0, head_dim=config.d_kv)


class EncoderBlock(nn.Module):
    """x + attn(norm1(x)) with the relative bias (+ padding) as additive mask, then x + mlp(norm2(x))."""

    def __init__(self, config: EncDecConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = _attention(config, cross=False)
        self.norm2 = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = T5FeedForward(config.d_model, config.d_ff, config.activation, config.dropout)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, prefix=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=bias, prefix=prefix)
        return x + self.drop(self.mlp(self.norm2(x)))


class DecoderBlock(nn.Module):
    """Causal self-attention (relative bias), cross-attention to the encoder output, feed-forward."""

    def __init__(self, config: EncDecConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model, eps=config.norm_eps)
        self.self_attn = _attention(config, cross=False)
        self.norm2 = RMSNorm(config.d_model, eps=config.norm_eps)
        self.cross_attn = _attention(config, cross=True)
        self.norm3 = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = T5FeedForward(config.d_model, config.d_ff, config.activation, config.dropout)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, memory: torch.Tensor | None,
                cross_mask: torch.Tensor | None, kv_buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0, memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                self_prefix=None, cross_prefix=None) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), causal=True, mask=self_bias, kv_buffers=kv_buffers, start=start,
                               prefix=self_prefix)
        x = x + self.cross_attn(self.norm2(x), memory=memory, mask=cross_mask, memory_kv=memory_kv,
                                prefix=cross_prefix)
        return x + self.drop(self.mlp(self.norm3(x)))


class Encoder(nn.Module):
    """`n_layer` encoder blocks sharing one bidirectional relative bias, then the final norm."""

    def __init__(self, config: EncDecConfig):
        super().__init__()
        self.rel_bias = RelativePositionBias(config.relative_attention_num_buckets,
                                             config.relative_attention_max_distance, config.n_head, True)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, pad_bias: torch.Tensor | None,
                prefix_kv: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, S, d_model) embeddings; pad_bias: (B, 1, 1, S) additive or None -> (B, S, d_model).
        prefix_kv: (n_layer, 2, H, P, d_kv) per-layer prefix keys/values (prefix tuning) or None."""
        S = x.shape[1]
        bias = self.rel_bias(S, S).to(x.dtype)
        if pad_bias is not None:
            bias = bias + pad_bias
        x = self.drop(x)
        if prefix_kv is None:
            for block in self.blocks:
                x = block(x, bias)
        else:
            bias = _prefix_columns(bias, prefix_kv.shape[3])
            for i, block in enumerate(self.blocks):
                x = block(x, bias, prefix=(prefix_kv[i, 0][None], prefix_kv[i, 1][None]))
        return self.drop(self.norm_f(x))


class DecoderStack(nn.Module):
    """`n_decoder_layer` decoder blocks sharing one causal relative bias, then the final norm."""

    def __init__(self, config: EncDecConfig):
        super().__init__()
        self.rel_bias = RelativePositionBias(config.relative_attention_num_buckets,
                                             config.relative_attention_max_distance, config.n_head, False)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_decoder_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, cross_mask: torch.Tensor | None,
                cache: _DecoderCache | None = None, prefix_kv: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, d_model) embeddings of the decoder tokens; memory: (B, S, d_model) encoder output
        (may be None when `cache` holds the cross-attention K/V); cross_mask: (B, 1, 1, S) additive or
        None. With `cache`, x holds only the new tokens (placed after `cache.length`) and the cache grows.
        prefix_kv (without cache): (2 * n_decoder_layer, 2, H, P, d_kv) prefix keys/values of the
        self-attention layers, then the cross-attention layers; a cache carries its own prefix."""
        if cache is not None and prefix_kv is not None:
            raise ValueError("pass prefix_kv or a cache (which holds the prefix), not both")
        T = x.shape[1]
        start = cache.length if cache is not None else 0  # cache slot of the first new token
        P = cache.prefix_len if cache is not None else 0 if prefix_kv is None else prefix_kv.shape[3]
        pos = start - P if cache is not None else 0  # position of the first new token
        bias = self.rel_bias(T, pos + T, offset=pos).to(x.dtype)
        if P:  # prefix keys: no position bias, never masked
            bias = _prefix_columns(bias, P)
            if cross_mask is not None:
                cross_mask = _prefix_columns(cross_mask, P)
        x = self.drop(x)
        if prefix_kv is not None:
            n = len(self.blocks)
            for i, block in enumerate(self.blocks):
                x = block(x, bias, memory, cross_mask, self_prefix=(prefix_kv[i, 0][None], prefix_kv[i, 1][None]),
                          cross_prefix=(prefix_kv[n + i, 0][None], prefix_kv[n + i, 1][None]))
            return self.drop(self.norm_f(x))
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, bias, memory, cross_mask, kv_buffers=(cache.k[i], cache.v[i]), start=start,
                          memory_kv=cache.memory_kv[i])
            else:
                x = block(x, bias, memory, cross_mask)
        if cache is not None:
            cache.length += T
        return self.drop(self.norm_f(x))


def _prefix_columns(bias: torch.Tensor, P: int) -> torch.Tensor:
    """Put P zero columns (visible, no position bias) in front of an additive (.., .., T, keys) bias."""
    zeros = torch.zeros((*bias.shape[:-1], P), dtype=bias.dtype, device=bias.device)
    return torch.cat((zeros, bias), dim=-1)


class _DecoderCache:
    """Decoder self-attention K/V (n_layer, B, H, max_len, d_kv) plus each layer's cross-attention K/V.

    `max_len` counts decoder tokens. With a prefix-tuned model the first P = `prefix_len` slots hold the
    self-attention prefix (so `length` starts at P) and each layer's cross-attention K/V have the
    cross-attention prefix in front; `prefix_kv` is the model's prefix output if already computed."""

    def __init__(self, model: EncoderDecoder, memory: torch.Tensor, max_len: int,
                 prefix_kv: torch.Tensor | None = None):
        c = model.config
        B = memory.shape[0]
        if prefix_kv is None and model.prefix is not None:
            prefix_kv = model.prefix()
        P = 0 if prefix_kv is None else prefix_kv.shape[3]
        shape = (c.n_decoder_layer, B, c.n_head, P + max_len, c.d_kv)
        self.k = torch.zeros(shape, device=memory.device, dtype=memory.dtype)
        self.v = torch.zeros(shape, device=memory.device, dtype=memory.dtype)
        self.memory_kv = [blk.cross_attn.project_kv(memory) for blk in model.decoder.blocks]
        self.length = self.prefix_len = P
        if P:
            n = c.n_decoder_layer
            kv = prefix_kv.to(memory.dtype)
            self.k[:, :, :, :P] = kv[:n, 0, None]
            self.v[:, :, :, :P] = kv[:n, 1, None]
            self.memory_kv = [(torch.cat((kv[n + i, 0].expand(B, -1, -1, -1), k), dim=2),
                               torch.cat((kv[n + i, 1].expand(B, -1, -1, -1), v), dim=2))
                              for i, (k, v) in enumerate(self.memory_kv)]


class EncoderDecoder(nn.Module):
    """T5: shared token embedding, encoder stack, decoder stack with cross-attention, LM head."""

    def __init__(self, config: EncDecConfig):
        super().__init__()
        config.validate()
        if config.vocab_size is None:
            raise ValueError("EncDecConfig.vocab_size must be set (the tokenizer's vocab size)")
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Encoder(config)
        self.decoder = DecoderStack(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        # learned key/value prefix (prefix tuning); None = plain model. Set by llmkit.models.prefix.apply_prefix.
        self.prefix: nn.Module | None = None
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Mesh-TensorFlow / HF T5 initialisation: unit-variance embeddings, q scaled by (d_model*d_kv)^-1/2
        (standing in for the missing 1/sqrt(d_kv)), k/v by d_model^-1/2, out-projections by their fan-in."""
        c = self.config
        d, inner = c.d_model, c.n_head * c.d_kv
        nn.init.normal_(self.shared.weight, std=1.0)
        if self.lm_head is not None:  # no output scaling when untied: keep the initial logits O(1)
            nn.init.normal_(self.lm_head.weight, std=d ** -0.5)
        for stack in (self.encoder, self.decoder):
            nn.init.normal_(stack.rel_bias.weight, std=d ** -0.5)
            for m in stack.modules():
                if isinstance(m, RMSNorm):
                    nn.init.ones_(m.weight)
                elif isinstance(m, Attention):
                    w = m.kv.weight if m.cross else m.qkv.weight
                    nn.init.normal_(w, std=d ** -0.5)
                    q = m.q.weight if m.cross else m.qkv.weight[:inner]
                    nn.init.normal_(q, std=(d * c.d_kv) ** -0.5)
                    nn.init.normal_(m.proj.weight, std=inner ** -0.5)
                elif isinstance(m, T5FeedForward):
                    nn.init.normal_(m.up.weight, std=d ** -0.5)
                    if hasattr(m, "gate"):
                        nn.init.normal_(m.gate.weight, std=d ** -0.5)
                    nn.init.normal_(m.down.weight, std=c.d_ff ** -0.5)

    # -- pieces -------------------------------------------------------------------------------------

    def _pad_bias(self, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """(B, S) 1 = token, 0 = padding -> (B, 1, 1, S) additive bias (0 or the dtype's most negative
        value, as HF does: finite, so a fully padded row still gives finite outputs)."""
        if attention_mask is None:
            return None
        keep = attention_mask.to(torch.bool)[:, None, None, :]
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, S); attention_mask: (B, S) with 1 for tokens, 0 for padding -> (B, S, d_model)."""
        return self._encode(input_ids, attention_mask, self.prefix() if self.prefix is not None else None)

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                prefix_kv: torch.Tensor | None) -> torch.Tensor:
        x = self.shared(input_ids)
        enc_kv = None if prefix_kv is None else prefix_kv[2 * self.config.n_decoder_layer:]
        return self.encoder(x, self._pad_bias(attention_mask, x.dtype), enc_kv)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(h * self.config.d_model ** -0.5, self.shared.weight)
        return self.lm_head(h)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: (B, T) labels -> [start, labels[:, :-1]], -100 -> pad."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids: (B, S) encoder tokens; decoder_input_ids: (B, T); attention_mask: (B, S) encoder
        padding mask (1 keep, 0 pad); labels: (B, T) targets, -100 ignored.

        Returns logits (B, T, vocab) and, with labels, the mean cross-entropy over labels != -100.
        Without decoder_input_ids the decoder reads `labels` shifted right (`shift_right`).
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        prefix_kv = self.prefix() if self.prefix is not None else None  # once for both stacks
        memory = self._encode(input_ids, attention_mask, prefix_kv)
        cross_mask = self._pad_bias(attention_mask, memory.dtype)
        dec_kv = None if prefix_kv is None else prefix_kv[:2 * self.config.n_decoder_layer]
        h = self.decoder(self.shared(decoder_input_ids), memory, cross_mask, prefix_kv=dec_kv)
        logits = self._logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, eos_id: int | None = None, temperature: float = 0.0,
                 top_p: float | None = None, seed: int | None = None) -> torch.Tensor:
        """Decode up to `max_new_tokens` ids per input row: (B, S) -> (B, new_len), without the start token.

        Greedy when temperature is 0, else sampling (nucleus with `top_p`; `seed` makes it repeatable).
        The encoder runs once, each layer's cross-attention K/V are computed once, and the decoder's
        self-attention K/V are cached. Rows that produced `eos_id` continue with `pad_token_id` (as HF
        does); decoding stops early when every row has finished, so new_len <= max_new_tokens.
        Dropout follows the module's mode: call `.eval()` first.
        """
        B = input_ids.shape[0]
        device = input_ids.device
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        prefix_kv = self.prefix() if self.prefix is not None else None
        memory = self._encode(input_ids, attention_mask, prefix_kv)
        cross_mask = self._pad_bias(attention_mask, memory.dtype)
        cache = _DecoderCache(self, memory, max(1, max_new_tokens), prefix_kv)
        token = torch.full((B, 1), self.config.decoder_start_token_id, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for _ in range(max_new_tokens):
            h = self.decoder(self.shared(token), None, cross_mask, cache=cache)
            nxt = sample_next(self._logits(h)[:, -1, :], temperature, None, top_p, generator)
            if eos_id is not None:
                nxt = nxt.masked_fill(finished, self.config.pad_token_id)
                finished |= nxt == eos_id
            out.append(nxt)
            token = nxt[:, None]
            if eos_id is not None and bool(finished.all()):
                break
        if not out:
            return torch.empty(B, 0, dtype=torch.long, device=device)
        return torch.stack(out, dim=1)

    # -- accounting ---------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the tied embedding counts once. By default without the relative position bias
        tables (T5's analogue of the position embeddings `Decoder.num_params` leaves out)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.encoder.rel_bias.weight.numel() + self.decoder.rel_bias.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per target token when source and target both have
        `seq_len` tokens (default block_size): 6N — every parameter serves one source or one target token
        of each pair — plus attention scores and mixing, 12 * n_head * d_kv * T per layer for the encoder
        self-attention, the decoder self-attention and the cross-attention (as `Decoder.flops_per_token`)."""
        c = self.config
        T = seq_len or c.block_size
        attn_layers = c.n_layer + 2 * c.n_decoder_layer
        return 6 * self.num_params() + 12 * attn_layers * c.n_head * c.d_kv * T
