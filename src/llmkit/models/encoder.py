"""Encoder-only Transformer (BERT family, Devlin et al. 2019).

Token + learned position + token-type embeddings, LayerNorm and dropout, then `n_layer` post-norm blocks
(``x = norm(x + attn(x)); x = norm(x + mlp(x))``) with bidirectional self-attention: every position sees
every non-padding position. Two heads sit on top:

* `Encoder` carries the masked-language-model head (dense, activation, LayerNorm, then a decoder tied to
  the word embeddings plus a per-token bias), as in ``BertForMaskedLM``;
* `EncoderClassifier` pools token 0 (dense + tanh, BERT's pooler), applies dropout and a linear
  classifier, as in ``BertForSequenceClassification``.

Weights import from / export to Hugging Face BERT checkpoints with exact logits (`llmkit.models.hf_bert`;
tests/test_encoder.py checks parity against `transformers`).

Prefix tuning (`llmkit.models.prefix.apply_prefix`, Li & Liang 2021) sets `Encoder.prefix` (for
`EncoderClassifier`, on its `encoder`): every layer's self-attention then also attends to P learned
keys/values, which take no positions and are never masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.models.layers import Attention, FeedForward

_ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


@dataclass
class EncoderConfig:
    FAMILY: ClassVar[str] = "encoder"

    vocab_size: int | None = None
    """Token ids the model knows; None -> the tokenizer's vocabulary size (set by the trainer)."""
    block_size: int = 512
    """Maximum number of positions (BERT's max_position_embeddings)."""
    n_layer: int = 12
    d_model: int = 768
    n_head: int | None = None
    """Attention heads; None -> d_model // 64 (768 -> 12 heads)."""
    d_ff: int | None = None
    """Feed-forward width; None -> 4 * d_model."""
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu"
    """Used in the blocks' MLP and in the MLM head; `gelu` is the exact (erf) GELU, BERT's default."""
    dropout: float = 0.1
    """Embedding, attention-probability, residual and classifier dropout (BERT: 0.1)."""
    bias: bool = True
    norm_eps: float = 1e-12
    type_vocab_size: int = 2
    """Token-type (segment) ids; BERT uses 2 (sentence A / B)."""
    n_labels: int = 2
    """Outputs of `EncoderClassifier`; 1 means regression (MSE loss)."""
    pad_token_id: int = 0

    def __post_init__(self):
        if self.n_head is None:
            self.n_head = max(1, self.d_model // 64)
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model

    def validate(self) -> None:
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size: must be >= 1, got {self.vocab_size}")
        for name in ("block_size", "n_layer", "d_model", "n_head", "d_ff", "type_vocab_size", "n_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"n_head: {self.n_head} does not divide d_model={self.d_model}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation: must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps: must be > 0, got {self.norm_eps}")
        if self.pad_token_id < 0 or (self.vocab_size is not None and self.pad_token_id >= self.vocab_size):
            raise ValueError(f"pad_token_id: must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.gelu(x)


def padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, T) keep-mask (1 = token, 0 = pad) -> additive (B, 1, 1, T) bias: 0 for tokens, dtype-min for pads.

    An additive bias (as HF uses) rather than a bool mask keeps a fully padded row finite instead of NaN.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected shape (B, T), got {tuple(attention_mask.shape)}")
    keep = attention_mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class EncoderBlock(nn.Module):
    """Post-norm residual block (original Transformer / BERT): norm1(x + attn(x)), then norm2(x + mlp(x))."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attn = Attention(config.d_model, config.n_head, bias=config.bias, dropout=config.dropout)
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.mlp = FeedForward(config.d_model, config.d_ff, config.activation, config.bias, config.dropout)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, prefix=None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, mask=mask, prefix=prefix))
        return self.norm2(x + self.mlp(x))


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> activation -> LayerNorm -> (tied word embeddings)^T + bias."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.activation = config.activation
        self.dense = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor, emb_weight: torch.Tensor) -> torch.Tensor:
        h = self.norm(_activate(self.dense(h), self.activation))
        return F.linear(h, emb_weight, self.bias)


def _init_bert(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) matrices and embeddings, zero biases, LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Encoder(nn.Module):
    """BERT: embeddings (word + position + token type, LayerNorm, dropout), post-norm blocks, MLM head.

    Parameters: `tok_emb`, `pos_emb`, `type_emb`, `emb_norm`, `blocks.{i}.{attn.qkv,attn.proj,norm1,
    mlp.up,mlp.down,norm2}`, `mlm_head.{dense,norm,bias}` (the MLM decoder matrix is `tok_emb.weight`).
    `mlm_head=False` builds the bare encoder (no `mlm_head.*`), as `EncoderClassifier` uses it.
    """

    def __init__(self, config: EncoderConfig, mlm_head: bool = True):
        super().__init__()
        config.validate()
        if config.vocab_size is None:
            raise ValueError("EncoderConfig.vocab_size must be set (the tokenizer's vocab size)")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        self.type_emb = nn.Embedding(config.type_vocab_size, config.d_model)
        self.emb_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layer))
        self.mlm_head = MLMHead(config) if mlm_head else None
        self.apply(_init_bert)
        # learned key/value prefix (prefix tuning); None = plain model. Set by llmkit.models.prefix.apply_prefix.
        self.prefix: nn.Module | None = None

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T) -> final hidden states (B, T, d_model).

        attention_mask: (B, T), 1 for tokens and 0 for padding (padded keys are never attended to);
        token_type_ids: (B, T) segment ids, None -> all 0.
        """
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.tok_emb(input_ids) + self.type_emb(token_type_ids) + self.pos_emb(pos)
        x = self.drop(self.emb_norm(x))
        mask = padding_bias(attention_mask, x.dtype)
        if self.prefix is None:
            for block in self.blocks:
                x = block(x, mask)
            return x
        kv = self.prefix()  # (n_layer, 2, H, P, head_dim)
        if mask is not None:  # prefix keys are never masked
            mask = torch.cat((mask.new_zeros((B, 1, 1, kv.shape[3])), mask), dim=-1)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, prefix=(kv[i, 0][None], kv[i, 1][None]))
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids: (B, T) -> MLM logits (B, T, vocab) and, with labels (B, T), the mean cross-entropy
        over the positions whose label is not -100 (the masked ones)."""
        if self.mlm_head is None:
            raise RuntimeError("this Encoder was built without an MLM head (mlm_head=False); use encode()")
        logits = self.mlm_head(self.encode(input_ids, attention_mask, token_type_ids), self.tok_emb.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position and token-type embeddings (lookups, no matmul;
        the word embedding counts once, as it doubles as the MLM decoder)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_emb.weight.numel() + self.type_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 * n_layer * d_model * T (PaLM, appendix B)."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.d_model * T


class EncoderClassifier(nn.Module):
    """Sequence classification: `encoder` (an `Encoder` without MLM head), `pooler` (dense + tanh on
    token 0), dropout, `classifier` Linear(d_model, n_labels) — BERT's ``BertForSequenceClassification``."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.encoder = Encoder(config, mlm_head=False)
        self.config = config
        self.pooler = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.d_model, config.n_labels, bias=config.bias)
        _init_bert(self.pooler)
        _init_bert(self.classifier)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids: (B, T) -> logits (B, n_labels) and, with labels, the loss: cross-entropy over
        class ids (B,) when n_labels > 1, mean squared error against targets (B,) or (B, 1) when n_labels == 1."""
        h = self.encoder.encode(input_ids, attention_mask, token_type_ids)
        pooled = torch.tanh(self.pooler(h[:, 0]))
        logits = self.classifier(self.drop(pooled))
        loss = None
        if labels is not None:
            if self.config.n_labels == 1:
                loss = F.mse_loss(logits.float().squeeze(-1), labels.float().reshape(-1))
            else:
                loss = F.cross_entropy(logits.float(), labels.reshape(-1))
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position and token-type embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.encoder.pos_emb.weight.numel() + self.encoder.type_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 * n_layer * d_model * T."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.d_model * T


__all__ = ["Encoder", "EncoderClassifier", "EncoderConfig", "padding_bias"]
