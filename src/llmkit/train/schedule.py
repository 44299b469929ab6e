"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr` (GPT-3 / nanoGPT)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based).

    Rises linearly over `warmup_steps`, follows a half cosine from `max_lr` down to `min_lr` until
    `decay_steps`, and stays at `min_lr` after that.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
