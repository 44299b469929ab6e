"""The reference: nanoGPT's training loop (karpathy/nanoGPT train.py) restated for the CPU config.

nanoGPT cannot be downloaded here, so this file re-states what its loop does on a CPU, step for step,
around the same model math (llmkit's Decoder with nanoGPT's architecture: learned positions, LayerNorm
without bias, GELU, tied embeddings, the same initialisation):
  - `get_batch`: re-open the .bin memmap every call, `torch.randint` offsets, `torch.stack` of per-row
    `torch.from_numpy` slices (Python work per row);
  - fp32 on CPU (nanoGPT only autocasts on CUDA), no torch.compile (`--compile=False` in its CPU recipe);
  - AdamW without `fused` (nanoGPT asks for fused only on CUDA) and with decay on >= 2-D params;
  - warmup + cosine `get_lr` set on every param group each iteration, grad clipping at 1.0;
  - `loss.item()` every iteration (`--log_interval=1`), `estimate_loss` on `eval_iters` random batches
    of each split every `eval_interval` iterations, and the `iter_num > max_iters` loop bound.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from llmkit.models import Decoder, DecoderConfig
from llmkit.train.loop import TokenRate


def train_nanogpt_style(data_dir, dtype: str, vocab_size: int, n_layer=4, n_head=4, n_embd=128, block_size=64,
                        batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250,
                        eval_iters=20, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, seed=1337) -> dict:
    torch.manual_seed(seed)

    def get_batch(split):
        # nanoGPT: "We recreate np.memmap every batch to avoid a memory leak"
        data = np.memmap(f"{data_dir}/{split}-00000.bin", dtype=dtype, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
        return x, y

    model = Decoder(DecoderConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                                  d_model=n_embd, dropout=0.0, bias=False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(beta1, beta2))

    def get_lr(it):
        if it < warmup_iters:
            return lr * (it + 1) / (warmup_iters + 1)
        if it > max_iters:
            return min_lr
        ratio = (it - warmup_iters) / (max_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                x, y = get_batch(split)
                _, loss = model(x, y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    x, y = get_batch("train")
    iter_num, eval_time, last = 0, 0.0, {}
    rate = TokenRate()  # the trainer's estimator: total tokens / total seconds of the timed steps
    t_start = time.perf_counter()
    while True:
        for group in optimizer.param_groups:
            group["lr"] = get_lr(iter_num)
        if iter_num % eval_interval == 0:
            t0 = time.perf_counter()
            last = estimate_loss()
            eval_time += time.perf_counter() - t0
        if iter_num == max_iters:  # nanoGPT's last evaluation; its loop then runs one more step and stops
            break
        t0 = time.perf_counter()
        _, loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        rate.add(batch_size * block_size, time.perf_counter() - t0)
        iter_num += 1
    wall = time.perf_counter() - t_start
    return {"model": model, "steps": iter_num, "train_s": rate.seconds, "eval_s": eval_time, "wall_s": wall,
            "tokens_per_s": rate.per_s,
            "ms_per_step": 1000 * rate.seconds / iter_num, "val_loss_sampled": last["val"], "train_loss_sampled": last["train"]}
