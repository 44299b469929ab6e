"""The engine's KV memory: a pool of fixed-size blocks and the prefix cache that shares them.

Paged KV cache (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP): keys and values live in `num_blocks` blocks of `block_size` positions each; a request
holds a block table (its i-th block holds positions i*block_size .. (i+1)*block_size - 1) and takes a new block
only when its sequence reaches it. Memory therefore follows the requests' actual lengths instead of
max_batch x max_len slots, and a block can be referenced by several tables at once: blocks are reference
counted and a cached prompt prefix is shared by every request that starts with it, never copied.

Prefix cache (vLLM's automatic prefix caching): full prompt blocks are keyed by a hash chained over the
token ids of the block and of every block before it; the cache holds a reference to each such block, so it
outlives the request that computed it. At most `max_tokens` tokens are cached; the least recently used entry
goes first (the deepest block of a chain before its parents), and when the pool runs out of free blocks the
entries only the cache still references are given back (`PrefixCache.reclaim`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


class BlockPool:
    """`num_blocks` KV blocks: k / v of shape (n_layer, num_blocks, H_kv, block_size, head_dim), reference
    counted. A block is free when no request table and no prefix-cache entry references it."""

    def __init__(self, n_layer: int, num_blocks: int, kv_heads: int, block_size: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of at least one position, got num_blocks="
                             f"{num_blocks}, block_size={block_size}")
        shape = (n_layer, num_blocks, kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest ids are handed out first
        self.peak_in_use = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def block_bytes(self) -> int:
        """Bytes of keys + values one block holds over all layers."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def allocate(self) -> int | None:
        """A free block, referenced once; None when every block is referenced."""
        if not self._free:
            return None
        b = self._free.pop()
        self.refs[b] = 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return b

    def retain(self, block: int) -> None:
        if self.refs[block] <= 0:
            raise RuntimeError(f"KV block {block} is free: it cannot gain a reference")
        self.refs[block] += 1

    def release(self, block: int) -> None:
        """Drop one reference; the block is free again at zero."""
        if self.refs[block] <= 0:
            raise RuntimeError(f"KV block {block} is already free")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self._free.append(block)


@dataclass
class _Entry:
    parent: int | None
    tokens: tuple[int, ...]
    block: int


class PrefixCache:
    """LRU map from chained block hashes to pool blocks holding that prefix's keys/values, at most
    `max_tokens` tokens (0 disables it). `pool` None: the bookkeeping alone (block_of's values are stored as
    they are, no references are taken), as a replay of the policy needs."""

    def __init__(self, max_tokens: int, block_size: int = 16, pool: BlockPool | None = None):
        if pool is not None and pool.block_size != block_size:
            raise ValueError(f"prefix block {block_size} != KV pool block {pool.block_size}")
        self.block_size = block_size
        self.max_blocks = max_tokens // block_size
        self.pool = pool
        self.blocks: OrderedDict[int, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def chain(self, tokens: Sequence[int], n_blocks: int, root=None) -> list[tuple[int, int | None, tuple[int, ...]]]:
        """(hash, parent hash, block tokens) for the first n_blocks full blocks of `tokens`. `root`: the first
        block's parent (default None), hashable; chains of different roots never share an entry (the engine
        gives each LoRA adapter its own, as keys/values depend on the adapter)."""
        out, parent = [], root
        bs = self.block_size
        for j in range(n_blocks):
            blk = tuple(tokens[j * bs:(j + 1) * bs])
            h = hash((parent, blk))
            out.append((h, parent, blk))
            parent = h
        return out

    def lookup(self, chain) -> list[int]:
        """The pool blocks of the cached leading blocks of `chain` (stops at the first miss), not yet retained
        for the caller; counts hits and misses per block."""
        found = []
        for h, parent, blk in chain:
            e = self.blocks.get(h)
            if e is None or e.parent != parent or e.tokens != blk:  # verify: a hash is not proof
                self.misses += len(chain) - len(found)
                break
            found.append(e.block)
        self.hits += len(found)
        return found

    def insert(self, chain, block_of: Callable[[int], int]) -> None:
        """Cache the blocks of `chain` not cached yet (block_of(j): the pool block holding block j of the
        prefix, which the cache then references too), mark the chain most recently used, then evict LRU."""
        if self.max_blocks <= 0:
            return
        for j, (h, parent, blk) in enumerate(chain):
            if h not in self.blocks:
                b = block_of(j)
                if self.pool is not None:
                    self.pool.retain(b)
                self.blocks[h] = _Entry(parent, blk, b)
        for h, _, _ in reversed(chain):  # parents most recent: evict chains from their tail
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.max_blocks:
            self._evict(next(iter(self.blocks)))

    def reclaim(self, wanted_free: int) -> None:
        """Evict least recently used entries that only the cache references until the pool has
        `wanted_free` free blocks (or no such entry is left)."""
        if self.pool is None:
            return
        for h in [h for h, e in self.blocks.items() if self.pool.refs[e.block] == 1]:
            if self.pool.num_free >= wanted_free:
                return
            self._evict(h)

    def reclaimable(self) -> int:
        """Blocks `reclaim` could free now."""
        return 0 if self.pool is None else sum(self.pool.refs[e.block] == 1 for e in self.blocks.values())

    def _evict(self, h: int) -> None:
        e = self.blocks.pop(h)
        if self.pool is not None:
            self.pool.release(e.block)
        self.evictions += 1

    def clear(self) -> None:
        for h in list(self.blocks):
            e = self.blocks.pop(h)
            if self.pool is not None:
                self.pool.release(e.block)
