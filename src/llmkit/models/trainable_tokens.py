"""Trainable token rows beside LoRA: PEFT's `trainable_token_indices` for llmkit decoders.

LoRA freezes the embeddings, which is right for ordinary tokens but wrong for tokens the base model never
saw in use: a model pretrained on plain text has untrained (and, with a tied output head, actively
suppressed) rows for the chat template's `<|assistant|>` and `<|end|>`, so a LoRA-tuned model rarely ends
its turn. Training just those rows costs k * d_model numbers. As in PEFT's `TrainableTokensLayer`, the
trainable tensor holds the rows' new *values* (initialised to the originals), and the effective embedding
is the base matrix with those rows replaced; with a tied output head the head reads the same matrix, so
the logits of those tokens change too. Merging writes the rows into the base matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class TrainableTokens(nn.Module):
    """An `nn.Embedding` whose rows `ids` are replaced by the trainable `values` (k, d)."""

    def __init__(self, base: nn.Embedding, ids: Sequence[int]):
        super().__init__()
        ids = sorted({int(i) for i in ids})
        if not ids or ids[0] < 0 or ids[-1] >= base.num_embeddings:
            raise ValueError(f"trainable token ids must be in [0, {base.num_embeddings}), got {ids}")
        self.base = base
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.weight.device))
        self.values = nn.Parameter(base.weight.detach()[self.ids].clone())

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    def merged_weight(self) -> torch.Tensor:
        """(vocab, d): the base matrix with the trainable rows in place (differentiable in `values`)."""
        return self.base.weight.index_copy(0, self.ids, self.values.to(self.base.weight.dtype))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.merged_weight())

    @torch.no_grad()
    def merge(self) -> nn.Embedding:
        """Write the rows into the base embedding (and so into a head tied to it); returns the base."""
        self.base.weight[self.ids] = self.values.to(self.base.weight.dtype)
        return self.base


class TiedTokensHead(nn.Module):
    """The output head of a tied model while its embedding carries `TrainableTokens`: logits read the same
    effective matrix. The embedding is held outside the module tree so its parameters count once."""

    def __init__(self, base: nn.Linear, tokens: TrainableTokens):
        super().__init__()
        self.base = base
        self._tokens = [tokens]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._tokens[0].merged_weight(), self.base.bias)


def apply_trainable_tokens(model: nn.Module, ids: Sequence[int]) -> TrainableTokens:
    """Make rows `ids` of a decoder's token embedding trainable (in place); returns the new module.

    The model must have `tok_emb` (an `nn.Embedding`) and `lm_head`; a head tied to the embedding follows
    the trained rows. Only the new `values` require grad."""
    emb = getattr(model, "tok_emb", None)
    if not isinstance(emb, nn.Embedding) or not hasattr(model, "lm_head"):
        raise ValueError(f"trainable tokens need a decoder with a token embedding, not {type(model).__name__}")
    tied = getattr(model.lm_head, "weight", None) is emb.weight
    tokens = TrainableTokens(emb, ids)
    model.tok_emb = tokens
    if tied:
        model.lm_head = TiedTokensHead(model.lm_head, tokens)
    return tokens


def trainable_tokens(model: nn.Module) -> TrainableTokens | None:
    emb = getattr(model, "tok_emb", None)
    return emb if isinstance(emb, TrainableTokens) else None


def merge_trainable_tokens(model: nn.Module) -> None:
    """Fold the trained rows into the embedding and restore plain modules (no-op without them)."""
    tokens = trainable_tokens(model)
    if tokens is None:
        return
    model.tok_emb = tokens.merge()
    if isinstance(model.lm_head, TiedTokensHead):
        model.lm_head = model.lm_head.base
