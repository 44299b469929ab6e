"""Where a CPU training step's time goes: precision x attention kernel x torch.compile.

One optimizer step (forward, backward, clip, fused AdamW) of nanoGPT's CPU Shakespeare model
(4 layers, 128 wide, batch 12 x 64 tokens), timed for each combination, rounds interleaved so machine
noise hits all alike. Prints JSON: median ms/step per combination and the speed-up over eager fp32
with PyTorch's default kernel choice.

    python benchmarks/train_step_kernels.py [--steps 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmkit.models import Decoder, DecoderConfig
from llmkit.train.loop import make_optimizer
from llmkit.train.pretrain import TrainConfig

KERNELS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def time_steps(dtype: torch.dtype, kernel: str, compiled: bool, steps: int, warmup: int = 20) -> float:
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=73, block_size=64, n_layer=4, n_head=4, d_model=128))
    optimizer = make_optimizer(TrainConfig(), [(list(model.parameters()), 1.0)])
    forward = torch.compile(model) if compiled else model
    x, y = torch.randint(0, 73, (12, 64)), torch.randint(0, 73, (12, 64))

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if KERNELS[kernel] is None:
                _, loss = forward(x, y)
            else:
                with sdpa_kernel(KERNELS[kernel]):
                    _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    combos = [(d, k, c) for c in ([False] if args.no_compile else [False, True])
              for d in ("fp32", "bf16") for k in KERNELS]
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for d, k, c in combos:
            name = f"{d}/{k}/{'compile' if c else 'eager'}"
            dtype = torch.float32 if d == "fp32" else torch.bfloat16
            times.setdefault(name, []).append(time_steps(dtype, k, c, args.steps))
    base = statistics.median(times["fp32/auto/eager"])
    print(json.dumps({
        "benchmark": "train_step_kernels", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "ms_per_step_median": {k: round(statistics.median(v), 2) for k, v in times.items()},
        "speedup_vs_fp32_auto_eager": {k: round(base / statistics.median(v), 3) for k, v in times.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
