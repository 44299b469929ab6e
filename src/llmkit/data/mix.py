"""Domain mixing: per-domain target ratios and caps, stratified sampling to a target size (guide §1.1).

The guide asks to split the corpus by domain and control the proportions ("通用模型中百科类数据占比不超过
40%"), and cites a layered-sampling strategy that condensed 10 TB of raw data into 2 TB of training corpus.
Here a user states, per domain, a fixed `ratio` of the output and/or a `max_ratio` cap; domains without a
ratio share what is left in proportion to what they have, water-filled under their caps. The total is the
`target` size (in tokens or documents) or, without one, the largest size every domain can supply.

Within a domain the documents are sampled *stratified by source*: each source contributes in proportion to
its available size, and inside a source documents are taken in a seeded pseudo-random order (a stable hash
of seed and id, so the choice does not depend on shard layout or worker count). With `upsample`, a domain
asked for more than it has is repeated whole epochs plus a sampled remainder (its documents get a `repeat`
number); without it, the domain contributes everything and the report shows the shortfall.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass
class DomainTarget:
    ratio: float | None = None
    """Share of the output (0..1) this domain must have; None = a share of what the fixed ratios leave."""
    max_ratio: float | None = None
    """Upper bound on the domain's share (e.g. 0.4 for encyclopedia); None = no cap."""

    def validate(self) -> None:
        for name in ("ratio", "max_ratio"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: {v} is not in [0, 1]")
        if self.ratio is not None and self.max_ratio is not None and self.ratio > self.max_ratio:
            raise ValueError(f"ratio: {self.ratio} exceeds max_ratio {self.max_ratio}")


@dataclass
class MixConfig:
    enabled: bool = False
    unit: Literal["tokens", "docs"] = "tokens"
    """What ratios and the target count: tokens (the pipeline tokenizer's, or an estimate of Latin words
    + CJK characters when no tokenizer is set) or documents."""
    target: int | None = None
    """Output size in `unit`; None = the largest size the available data supports at these ratios."""
    domains: dict[str, DomainTarget] = field(default_factory=dict)
    """Per-domain ratio / cap; domains not listed share the remainder in proportion to their size."""
    upsample: bool = False
    """Repeat a domain's documents when its ratio asks for more than it has (otherwise it falls short)."""
    seed: int = 0

    def validate(self) -> None:
        fixed = sum(t.ratio for t in self.domains.values() if t.ratio is not None)
        if fixed > 1.0 + 1e-9:
            raise ValueError(f"domains: the fixed ratios sum to {fixed:.3f} > 1")
        if self.target is not None and self.target <= 0:
            raise ValueError(f"target: {self.target} must be positive")
        if self.upsample and self.target is None:
            raise ValueError("upsample: needs a target size (without one the mix is as large as the data "
                             "allows and nothing needs repeating)")


def domain_shares(available: dict[str, float], cfg: MixConfig) -> dict[str, float]:
    """Output share of each domain: fixed ratios, then the rest split by availability under the caps.

    Args:
        available: size (in `cfg.unit`) each domain can supply after filtering.
    Returns:
        {domain: share}, summing to <= 1 (less only when every free domain is capped).
    """
    shares: dict[str, float] = {}
    free = []
    for d in available:
        t = cfg.domains.get(d, DomainTarget())
        if t.ratio is not None:
            shares[d] = t.ratio
        elif available[d] > 0:
            free.append(d)
        else:
            shares[d] = 0.0
    left = max(0.0, 1.0 - sum(shares.values()))
    # water-filling: split `left` by availability; a domain over its cap is pinned there and the
    # excess goes to the others, until nobody is over
    while free:
        total = sum(available[d] for d in free)
        proposal = {d: left * available[d] / total for d in free}
        over = [d for d in free if (cap := cfg.domains.get(d, DomainTarget()).max_ratio) is not None
                and proposal[d] > cap]
        if not over:
            shares.update(proposal)
            break
        for d in over:
            shares[d] = cfg.domains[d].max_ratio
            left -= shares[d]
            free.remove(d)
        left = max(0.0, left)
    return shares


def plan_mix(available: dict[str, float], cfg: MixConfig) -> dict[str, float]:
    """Amount (in `cfg.unit`) to take from each domain.

    Without a target: the largest total T at which every domain with a share can supply share * T.
    Without upsampling, a domain is never asked for more than it has."""
    shares = domain_shares(available, cfg)
    if cfg.target is not None:
        total = float(cfg.target)
    else:
        limits = [available[d] / s for d, s in shares.items() if s > 0]
        total = min(limits) if limits else 0.0
    want = {d: shares[d] * total for d in shares}
    if not cfg.upsample:
        want = {d: min(w, available[d]) for d, w in want.items()}
    return want


def order_key(seed: int, doc_id: str) -> int:
    """A stable pseudo-random rank for a document (same in every process and on every machine)."""
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def select(domains: np.ndarray, sources: np.ndarray, sizes: np.ndarray, keys: np.ndarray,
           cfg: MixConfig) -> tuple[np.ndarray, dict]:
    """Choose how many times each document enters the output.

    Args:
        domains, sources: [N] strings per candidate document.
        sizes: [N] size of each document in `cfg.unit` (1 for docs).
        keys: [N] uint64 `order_key`s.
    Returns:
        copies: [N] int, 0 = not sampled, 1 = once, k > 1 = repeated (upsampling only).
        report: {"requested": {domain: share}, "achieved": {domain: share}, "available", "taken"} in `unit`.
    """
    n = len(domains)
    copies = np.zeros(n, dtype=np.int64)
    available = {str(d): float(sizes[domains == d].sum()) for d in np.unique(domains)} if n else {}
    want = plan_mix(available, cfg)
    for domain, amount in want.items():
        in_domain = np.flatnonzero(domains == domain)
        src_names = np.unique(sources[in_domain])
        src_sizes = {s: float(sizes[in_domain[sources[in_domain] == s]].sum()) for s in src_names}
        total = sum(src_sizes.values())
        for s in src_names:
            members = in_domain[sources[in_domain] == s]
            quota = amount * src_sizes[s] / total if total else 0.0
            copies[members] = _take(sizes[members], keys[members], quota)
    taken = {d: float((sizes * copies)[domains == d].sum()) for d in available}
    grand = sum(taken.values())
    requested = domain_shares(available, cfg)
    report = {
        "unit": cfg.unit,
        "target": cfg.target,
        "available": available,
        "requested_share": requested,
        "taken": taken,
        "achieved_share": {d: (t / grand if grand else 0.0) for d, t in taken.items()},
        "total": grand,
    }
    return copies, report


def _take(sizes: np.ndarray, keys: np.ndarray, quota: float) -> np.ndarray:
    """Copies per document so that the taken size reaches `quota`: whole epochs, then documents in key
    order while the running total stays within quota (the document that crosses it is taken when that
    lands closer to the quota than stopping short)."""
    copies = np.zeros(len(sizes), dtype=np.int64)
    total = float(sizes.sum())
    if total <= 0 or quota <= 0:
        return copies
    epochs = int(quota // total)
    copies += epochs
    rest = quota - epochs * total
    order = np.argsort(keys, kind="stable")
    running = np.cumsum(sizes[order])
    k = int(np.searchsorted(running, rest, side="right"))
    if k < len(order) and (running[k] - rest) < (rest - (running[k - 1] if k else 0.0)):
        k += 1
    copies[order[:k]] += 1
    return copies
