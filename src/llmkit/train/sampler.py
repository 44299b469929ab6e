"""Random training windows drawn from memmap shards, with a position that checkpoints can save.

Each batch is `batch_size` windows of `block_size + 1` tokens at uniformly random offsets (nanoGPT's
scheme), gathered with one vectorized numpy index per shard: no Python work per token. The generator
is numpy's PCG64, whose whole state is a small JSON-able dict, so `state_dict()` / `load_state_dict()`
put the sampler back exactly where it was and a resumed run sees the same batches it would have seen.
"""

from __future__ import annotations

import numpy as np
import torch

from llmkit.data.tokenized import TokenSplit


class WindowSampler:
    """Yields (x, y): (batch_size, block_size) int64 tensors, y shifted by one token.

    Args:
        split: the opened shards.
        seed: base seed; each data-parallel rank draws from its own stream (seed, rank).
    """

    def __init__(self, split: TokenSplit, batch_size: int, block_size: int, seed: int, rank: int = 0):
        self.block_size = block_size
        self.batch_size = batch_size
        self.shards = [s for s in split.shards if len(s) > block_size + 1]
        if not self.shards:
            longest = max((len(s) for s in split.shards), default=0)
            raise ValueError(f"no shard is longer than block_size+1={block_size + 1} tokens (longest: {longest})")
        starts = np.array([len(s) - block_size - 1 for s in self.shards], dtype=np.float64)
        self.shard_probs = starts / starts.sum()
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        self.batches_drawn = 0
        self._offsets = np.arange(block_size + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.block_size
        which = self.rng.choice(len(self.shards), size=B, p=self.shard_probs) if len(self.shards) > 1 \
            else np.zeros(B, dtype=np.int64)
        windows = np.empty((B, T + 1), dtype=np.int64)
        for s in np.unique(which):
            rows = np.nonzero(which == s)[0]
            starts = self.rng.integers(0, len(self.shards[s]) - T - 1, size=len(rows), endpoint=True)
            windows[rows] = self.shards[s][starts[:, None] + self._offsets]
        self.batches_drawn += 1
        t = torch.from_numpy(windows)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = state["batches_drawn"]


def fixed_batches(split: TokenSplit, n_batches: int, batch_size: int, block_size: int,
                  seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same `n_batches` batches every call: evaluation compares like with like across steps and resumes."""
    sampler = WindowSampler(split, batch_size, block_size, seed=seed)
    return [sampler.next_batch() for _ in range(n_batches)]
