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


class EpochSampler:
    """Every window once per epoch: the token stream is cut into windows of `block_size + 1` starting at a
    random phase, the windows are shuffled, and batches walk through them.

    Random offsets (`WindowSampler`) leave part of the corpus unseen in a short run (after k passes'
    worth of windows, a fraction ~e^-k of positions never started a window) and show other parts twice;
    an epoch covers each token once per pass, like a data loader over shuffled chunks. Each new epoch
    draws a new phase, so window boundaries move. The state (epoch, position, generator) is JSON-able.
    """

    def __init__(self, split: TokenSplit, batch_size: int, block_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.block_size, self.batch_size = block_size, batch_size
        self.shards = [s for s in split.shards if len(s) > block_size + 1]
        if not self.shards:
            raise ValueError(f"no shard is longer than block_size+1={block_size + 1} tokens")
        self.rank, self.world_size = rank, world_size
        # one generator shared by all ranks (same permutation), each rank takes its own slice of it
        self.rng = np.random.Generator(np.random.PCG64([seed, 0xE90C]))
        self.epoch, self.position, self.batches_drawn = 0, 0, 0
        self._offsets = np.arange(block_size + 1)
        self._new_epoch()

    def _new_epoch(self) -> None:
        self._epoch_start_state = self.rng.bit_generator.state  # enough to redraw this epoch on resume
        T = self.block_size
        phase = int(self.rng.integers(0, T))
        starts = [(i, np.arange(phase, len(s) - T - 1, T)) for i, s in enumerate(self.shards)]
        windows = np.concatenate([np.stack([np.full(len(st), i), st], 1) for i, st in starts])
        self.windows = windows[self.rng.permutation(len(windows))][self.rank::self.world_size]
        if len(self.windows) < self.batch_size:
            raise ValueError(f"an epoch holds {len(self.windows)} windows per process, fewer than batch_size="
                             f"{self.batch_size}")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > len(self.windows):
            self.epoch += 1
            self.position = 0
            self._new_epoch()
        chosen = self.windows[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        batch = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
        for s in np.unique(chosen[:, 0]):
            rows = np.nonzero(chosen[:, 0] == s)[0]
            batch[rows] = self.shards[s][chosen[rows, 1][:, None] + self._offsets]
        self.batches_drawn += 1
        t = torch.from_numpy(batch)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch_start": self._epoch_start_state, "epoch": self.epoch, "position": self.position,
                "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["epoch_start"]
        self._new_epoch()  # the same phase and permutation as the saved epoch
        self.epoch, self.position, self.batches_drawn = state["epoch"], state["position"], state["batches_drawn"]
