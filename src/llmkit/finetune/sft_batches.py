"""SFT batches: fixed-shape training batches that mix in pretraining text (`MixedBatches`), and eval batches.

`MixedBatches` yields (B, T) batches in which a share `mix_pretrain` of the rows are windows of raw
pretraining text (full next-token loss): mixing 10-20 % of the original pretraining data into instruction
tuning against catastrophic forgetting (the guide §3.3; InstructGPT's "PPO-ptx" mixes pretraining
gradients for the same reason, Ouyang et al. 2022). The count of pretraining rows per batch follows an
error-diffusion schedule, so after k batches exactly ``floor(k * B * mix_pretrain)`` rows were pretraining
rows: the share is exact, not just in expectation. SFT rows walk a per-epoch seeded permutation; the state
(batch count, epoch, position, pretraining RNG) resumes bit-identically.

Note on loss weighting: with a token-mean cross-entropy a pretraining row contributes T loss tokens and
an SFT row only its response tokens, so the *token* share of pretraining text in the loss is larger
than the row share (measured in docs/finetune.md).
"""

from __future__ import annotations

import glob
import hashlib
import math
from collections.abc import Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.data.tokenized import TokenSplit, encode_document, open_split, read_meta, token_dtype
from llmkit.finetune.sft_data import InstructDataConfig, SFTData, SFTExample
from llmkit.tokenizer import iter_texts

__all__ = ["IGNORE_INDEX", "MixedBatches", "eval_batches", "load_pretrain_tokens", "open_pretrain_tokens"]

IGNORE_INDEX = -100
"""Target value of positions without loss (PyTorch cross_entropy's default ignore_index)."""


def load_pretrain_tokens(spec: str | Path, tokenizer) -> TokenSplit:
    """The pretraining text to mix in, as token shards.

    `spec` is an `llmkit prepare` token dir (its ``train`` split; refused when made by another tokenizer),
    or a text file or glob pattern of files read with `llmkit.tokenizer.iter_texts` and tokenized now,
    each document followed by EOS (as `prepare` does).
    """
    p = Path(spec)
    if p.is_dir():
        meta = read_meta(p)
        if meta.get("tokenizer_digest") != tokenizer.digest():
            raise ValueError(f"pretrain: {p} was tokenized with another tokenizer (digest "
                             f"{str(meta.get('tokenizer_digest'))[:12]} != {tokenizer.digest()[:12]}); "
                             "prepare it again with this model's tokenizer")
        return open_split(p, "train")
    files = [p] if p.is_file() else [Path(f) for f in sorted(glob.glob(str(spec))) if Path(f).is_file()]
    if not files:
        raise FileNotFoundError(f"pretrain: {spec} is neither a token dir, a file, nor a glob matching files")
    dtype = token_dtype(tokenizer.vocab_size)
    pieces, n_bytes = [], 0
    for f in files:
        for text in iter_texts(f):
            pieces.append(encode_document(tokenizer, text))
            pieces.append(np.array([tokenizer.eos_id], dtype=dtype))
            n_bytes += len(text.encode("utf-8"))
    stream = np.concatenate(pieces).astype(dtype, copy=False)
    return TokenSplit(shards=[stream], tokens=len(stream), bytes=n_bytes,
                      sha256=hashlib.sha256(stream.tobytes()).hexdigest())


def open_pretrain_tokens(cfg: InstructDataConfig, tokenizer) -> TokenSplit:
    """`load_pretrain_tokens` of ``cfg.pretrain`` (which must be set)."""
    if not cfg.pretrain:
        raise ValueError("pretrain: not set; give a token dir or text files (or set mix_pretrain: 0)")
    return load_pretrain_tokens(cfg.pretrain, tokenizer)


def _fill_row(x: np.ndarray, y: np.ndarray, ex: SFTExample, pad_id: int) -> None:
    """Row of an SFT example: x = ids[:-1] then pad, y = ids[1:] where the mask is set, else -100."""
    n = len(ex.ids) - 1
    x[:n] = ex.ids[:-1]
    x[n:] = pad_id
    y[:n] = np.where(ex.loss_mask[1:], ex.ids[1:], IGNORE_INDEX)
    y[n:] = IGNORE_INDEX


class MixedBatches:
    """Training batches of SFT examples with pretraining windows mixed in, resumable exactly.

    Args:
        sft_data: from `build_sft_data`; its ``train`` examples are used.
        pretrain_tokens: a `TokenSplit` (`load_pretrain_tokens`, `llmkit.data.tokenized.open_split`), a 1-D
            array of token ids, or None (then `mix_pretrain` must be 0).
        batch_size: rows B per batch.
        block_size: columns T; every example must have at most T + 1 tokens.
        mix_pretrain: share of rows that are pretraining windows, in [0, 1). Batch k (from 0) holds
            ``floor((k+1)*B*mix) - floor(k*B*mix)`` of them, in its last rows.
        seed: seeds the per-epoch SFT permutation and the window offsets.

    ``next()`` returns ``(x, y)``: int64 tensors (B, T). SFT rows: x = example ids (padded with pad_id),
    y = next tokens where the loss mask is set, else -100. Pretraining rows: a random window of T + 1
    tokens, y = x shifted by one (loss on every position).
    """

    def __init__(self, sft_data: SFTData, pretrain_tokens: TokenSplit | np.ndarray | None, batch_size: int,
                 block_size: int, mix_pretrain: float = 0.15, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= mix_pretrain < 1.0:
            raise ValueError(f"mix_pretrain must be in [0, 1), got {mix_pretrain}")
        if not sft_data.train:
            raise ValueError("sft_data has no training examples")
        longest = max(len(e.ids) for e in sft_data.train)
        if longest > block_size + 1:
            raise ValueError(f"an example has {longest} tokens, more than block_size + 1 = {block_size + 1}")
        self.sft, self.B, self.T, self.seed = sft_data, batch_size, block_size, seed
        self.mix = float(mix_pretrain)
        self._mix = Fraction(repr(self.mix))  # exact: 0.15 -> 3/20, so the schedule has no float drift
        self._shards: list[np.ndarray] = []
        self._pretrain_digest: str | None = None
        if self.mix > 0:
            if pretrain_tokens is None:
                raise ValueError(f"mix_pretrain={mix_pretrain} but no pretraining tokens were given")
            if isinstance(pretrain_tokens, TokenSplit):
                shards, self._pretrain_digest = list(pretrain_tokens.shards), pretrain_tokens.sha256
            else:
                arr = np.asarray(pretrain_tokens)
                if arr.ndim != 1:
                    raise ValueError(f"pretrain_tokens must be 1-D token ids, got shape {arr.shape}")
                shards, self._pretrain_digest = [arr], hashlib.sha256(arr.astype("<i8").tobytes()).hexdigest()
            self._shards = [s for s in shards if len(s) > block_size + 1]
            if not self._shards:
                raise ValueError(f"no pretraining shard is longer than block_size + 1 = {block_size + 1} tokens")
            starts = np.array([len(s) - block_size for s in self._shards], dtype=np.float64)
            self._shard_p = starts / starts.sum()
        self._rng = np.random.Generator(np.random.PCG64([seed, 0x9E7]))
        self._offsets = np.arange(block_size + 1)
        self.batches = 0
        self.epoch = 0
        self.position = 0
        self.sft_rows = 0
        self.pretrain_rows = 0
        self.last_pretrain_rows = 0
        """Pretraining rows in the last batch (its last rows)."""
        self.last_examples: list[int] = []
        """Indices into ``sft_data.train`` of the last batch's SFT rows, in row order (distillation looks up
        each row's cached teacher outputs with them)."""
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        # A fresh generator per epoch: the order of any epoch is known from (seed, epoch) alone.
        return np.random.Generator(np.random.PCG64([self.seed, epoch, 0x5F7])).permutation(len(self.sft.train))

    def _n_pretrain(self, k: int) -> int:
        bm = self.B * self._mix
        return math.floor((k + 1) * bm) - math.floor(k * bm)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch ``(x, y)``, int64 (B, T)."""
        B, T = self.B, self.T
        n_pre = self._n_pretrain(self.batches)
        x = np.empty((B, T), dtype=np.int64)
        y = np.empty((B, T), dtype=np.int64)
        self.last_examples = []
        for r in range(B - n_pre):
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            i = int(self._order[self.position])
            _fill_row(x[r], y[r], self.sft.train[i], self.sft.pad_id)
            self.last_examples.append(i)
            self.position += 1
        if n_pre:
            which = (self._rng.choice(len(self._shards), size=n_pre, p=self._shard_p) if len(self._shards) > 1
                     else np.zeros(n_pre, dtype=np.int64))
            for r, s in zip(range(B - n_pre, B), which):
                start = int(self._rng.integers(0, len(self._shards[s]) - T - 1, endpoint=True))
                window = np.asarray(self._shards[s][start:start + T + 1], dtype=np.int64)
                x[r], y[r] = window[:-1], window[1:]
        self.batches += 1
        self.sft_rows += B - n_pre
        self.pretrain_rows += n_pre
        self.last_pretrain_rows = n_pre
        return torch.from_numpy(x), torch.from_numpy(y)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next()

    def _fingerprint(self) -> dict:
        return {"sft_digest": self.sft.digest, "batch_size": self.B, "block_size": self.T, "mix_pretrain": self.mix,
                "seed": self.seed, "pretrain_digest": self._pretrain_digest}

    def state_dict(self) -> dict:
        """JSON-able position: batches drawn, epoch, position in the epoch, the window RNG, and a fingerprint
        of the data and settings (a resume with other data or settings is refused)."""
        return {"version": 1, "batches": self.batches, "epoch": self.epoch, "position": self.position,
                "sft_rows": self.sft_rows, "pretrain_rows": self.pretrain_rows,
                "rng": self._rng.bit_generator.state, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unsupported MixedBatches state version {state.get('version')!r}")
        mine, theirs = self._fingerprint(), dict(state["fingerprint"])
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        if diff:
            raise ValueError("cannot resume: the data or batch settings changed since the checkpoint ("
                             + ", ".join(f"{k}: {theirs.get(k)!r} -> {mine[k]!r}" for k in diff) + ")")
        self.batches, self.epoch, self.position = state["batches"], state["epoch"], state["position"]
        self.sft_rows, self.pretrain_rows = state["sft_rows"], state["pretrain_rows"]
        self._rng.bit_generator.state = state["rng"]
        self._order = self._permutation(self.epoch)


def eval_batches(sft_data: SFTData, batch_size: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The eval examples in order as ``(x, y)`` batches of int64 (b, T), b = batch_size except maybe the last;
    laid out like `MixedBatches` SFT rows (no pretraining rows). Empty when there is no eval split."""
    out = []
    for i in range(0, len(sft_data.eval), batch_size):
        chunk = sft_data.eval[i:i + batch_size]
        x = np.empty((len(chunk), block_size), dtype=np.int64)
        y = np.empty((len(chunk), block_size), dtype=np.int64)
        for r, ex in enumerate(chunk):
            if len(ex.ids) > block_size + 1:
                raise ValueError(f"eval example {ex.source} has {len(ex.ids)} tokens > block_size + 1")
            _fill_row(x[r], y[r], ex, sft_data.pad_id)
        out.append((torch.from_numpy(x), torch.from_numpy(y)))
    return out
