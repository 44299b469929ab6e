"""Validation loss: quick estimates during training, and the exact figure over a whole split."""

from __future__ import annotations

import torch


@torch.no_grad()
def fixed_batch_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device, autocast) -> float:
    """Mean loss (nats/token) over fixed batches, each a dict of the model's keyword arguments."""
    was_training = model.training
    model.eval()
    losses = []
    for batch in batches:
        with autocast():
            _, loss = model(**{k: v.to(device) for k, v in batch.items()})
        losses.append(loss.float())
    model.train(was_training)
    return torch.stack(losses).mean().item()


@torch.no_grad()
def split_loss(model: torch.nn.Module, split, block_size: int, batch_size: int = 64,
               device: torch.device | str = "cpu") -> float:
    """Mean loss (nats/token) over *every* token of a split, cut into non-overlapping windows of
    `block_size`: an exact figure, free of the sampling noise of `eval_batches` random windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for shard in split.shards:
        n = (len(shard) - 1) // block_size
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(n, start + batch_size)) * block_size
            idx = rows[:, None] + torch.arange(block_size + 1)
            window = torch.from_numpy(shard[idx.numpy()].astype("int64")).to(device)
            _, loss = model(window[:, :-1], window[:, 1:])
            total += loss.item() * window[:, 1:].numel()
            count += window[:, 1:].numel()
    model.train(was_training)
    return total / max(1, count)
