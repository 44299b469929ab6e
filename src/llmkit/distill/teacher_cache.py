"""The teacher's top-k logits for every training example, computed once and cached by content.

A distillation run spends a teacher forward pass on every batch, and a sweep over students, temperatures or
loss kinds repeats the same passes. Here the teacher answers each training example once: at every position
that carries loss, its k largest logits over the real vocabulary (raw, so any temperature applies later) and
their token ids. The file is keyed by (teacher weights digest, data digest, k): a rerun, a resumed run or a
second student with the same teacher and data reads it instead of running the teacher.

    cache = teacher_outputs(teacher, teacher_digest, sft_data.train, sft_data.digest + ":train", pad_id,
                            top_k=64, vocab=tokenizer.vocab_size, cache_dir="~/.cache/llmkit/teacher")
    ids, values = cache.example(i)   # (n_i, k) int64, (n_i, k) fp32: example i's loss positions, in order

On disk: one .npz (compressed) holding the concatenated ids (int32) and values (fp16) and each example's
offset, written to a temporary name and renamed, so a killed run never leaves a half file behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmkit.finetune.sft_data import SFTExample

log = logging.getLogger(__name__)


@dataclass
class TeacherOutputs:
    """Top-k teacher logits of every training example's loss positions."""

    ids: np.ndarray
    """int32 (positions, k): token ids, all examples concatenated."""
    values: np.ndarray
    """fp16 (positions, k): the teacher's raw logits at those ids, largest first."""
    offsets: np.ndarray
    """int64 (examples + 1,): example i's rows are offsets[i]:offsets[i + 1]."""
    path: Path
    computed: bool
    """True when this call ran the teacher, False when the file was read."""

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Example i's (ids int64 (n_i, k), values fp32 (n_i, k)), n_i = its loss positions."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return torch.from_numpy(self.ids[a:b].astype(np.int64)), torch.from_numpy(self.values[a:b].astype(np.float32))

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]


def cache_key(teacher_digest: str, data_digest: str, top_k: int, vocab: int) -> str:
    """The content key of a cache file (hex, 24 characters)."""
    text = json.dumps({"teacher": teacher_digest, "data": data_digest, "top_k": top_k, "vocab": vocab,
                       "version": 1}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def top_k_logits(logits: torch.Tensor, vocab: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's `top_k` largest logits over the real vocabulary (ids < `vocab`: padded rows are never
    chosen) at each of N positions: logits (N, V') -> (ids int64 (N, k), values fp32 (N, k)), largest first.
    The cache and on-policy distillation (which scores new sequences live) select the same way."""
    top = logits[..., :vocab].float().topk(top_k, dim=-1)
    return top.indices, top.values


@torch.no_grad()
def _compute(teacher, examples: list[SFTExample], pad_id: int, top_k: int, vocab: int, batch_size: int,
             device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    teacher.eval()
    ids_parts, value_parts, counts = [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(e.ids) for e in chunk) - 1
        x = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for r, e in enumerate(chunk):
            x[r, :len(e.ids) - 1] = torch.from_numpy(e.ids[:-1].astype(np.int64))
        logits, _ = teacher(x.to(device))
        for r, e in enumerate(chunk):
            where = torch.from_numpy(np.flatnonzero(e.loss_mask[1:]))  # positions predicting a trained token
            ids, values = top_k_logits(logits[r, where.to(device)], vocab, top_k)
            ids_parts.append(ids.to(torch.int32).cpu().numpy())
            value_parts.append(values.to(torch.float16).cpu().numpy())
            counts.append(len(where))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    empty = np.zeros((0, top_k))
    return (np.concatenate(ids_parts) if ids_parts else empty.astype(np.int32),
            np.concatenate(value_parts) if value_parts else empty.astype(np.float16), offsets)


def teacher_outputs(teacher, teacher_digest: str, examples: list[SFTExample], data_digest: str, pad_id: int,
                    top_k: int, vocab: int, cache_dir: str | Path, batch_size: int = 8,
                    device: torch.device | None = None) -> TeacherOutputs:
    """Read the cached top-k teacher logits of `examples`, or compute and cache them.

    teacher: an llmkit decoder (its logits (B, T, V') for ids (B, T)); teacher_digest / data_digest: content
    digests of its weights and of these examples (e.g. `SFTData.digest` + the split); vocab: the real
    vocabulary (the tokenizer's size: logits of padded rows past it are never chosen); top_k <= vocab.
    """
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k: must be in [1, {vocab}] (the vocabulary), got {top_k}")
    root = Path(cache_dir).expanduser()
    path = root / f"teacher-{cache_key(teacher_digest, data_digest, top_k, vocab)}.npz"
    if path.is_file():
        with np.load(path) as z:
            out = TeacherOutputs(z["ids"], z["values"], z["offsets"], path, computed=False)
        if len(out.offsets) == len(examples) + 1:
            log.info("teacher outputs read from %s", path)
            return out
        log.warning("%s does not match the data (%d examples, file has %d): computing again", path,
                    len(examples), len(out.offsets) - 1)
    device = device or next(teacher.parameters()).device
    ids, values, offsets = _compute(teacher, examples, pad_id, top_k, vocab, batch_size, device)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez_compressed(tmp, ids=ids, values=values, offsets=offsets)
    os.replace(tmp, path)
    log.info("teacher outputs for %d examples (%d positions, top %d) written to %s", len(examples),
             len(ids), top_k, path)
    return TeacherOutputs(ids, values, offsets, path, computed=True)
