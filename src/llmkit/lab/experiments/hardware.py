"""§2.2: Tensor Cores make FP16 matrix math 5-8x faster.

On a CUDA GPU: 4096^3 matmuls in fp32 (TF32 off: the plain-FP32 baseline the claim compares with),
fp32 with TF32, fp16 and bf16; one timing per seed (median of several launches, after warm-up); the
verdict compares the fp16 / fp32 speedup with 5-8x. Without a GPU the claim is *not measured* — never
a guessed number — and, as context only, the same comparison is timed on this CPU (fp32 vs bf16 vs fp16
and int8 `torch._int_mm`, 1024^3): CPU figures say nothing about Tensor Cores.
"""

from __future__ import annotations

import time

import torch

from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result
from llmkit.lab.plots import bars

LOW, HIGH = 5.0, 8.0


def _time(fn, args: tuple, reps: int, sync=lambda: None, best: bool = False) -> float:
    """Median (GPU) or best (CPU, shared cores: contention only adds time) of `reps` runs after a warm-up."""
    fn(*args)
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[0] if best else times[len(times) // 2]


INNER = 10
"""GPU matmuls per timed launch group: one 4096^3 fp16 matmul takes ~0.2 ms, comparable to a sync."""


def _matmuls(a: torch.Tensor, b: torch.Tensor) -> None:
    for _ in range(INNER):
        torch.matmul(a, b)


def _gpu(ctx: ExperimentContext) -> Result:
    n = 2048 if ctx.quick else 4096
    reps = 3 if ctx.quick else 20
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    speed: dict[str, list[float]] = {"fp16": [], "bf16": [], "tf32": []}
    tflops: dict[str, list[float]] = {"fp32": [], "tf32": [], "fp16": [], "bf16": []}
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for seed in ctx.seeds:
            g = torch.Generator(device=dev).manual_seed(seed)
            a = torch.randn(n, n, device=dev, generator=g)
            b = torch.randn(n, n, device=dev, generator=g)
            t = {}
            torch.backends.cuda.matmul.allow_tf32 = False
            t["fp32"] = _time(_matmuls, (a, b), reps, sync) / INNER
            torch.backends.cuda.matmul.allow_tf32 = True
            t["tf32"] = _time(_matmuls, (a, b), reps, sync) / INNER
            for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
                ah, bh = a.to(dt), b.to(dt)
                t[name] = _time(_matmuls, (ah, bh), reps, sync) / INNER
            for k, v in t.items():
                tflops[k].append(2 * n ** 3 / v / 1e12)
            for k in speed:
                speed[k].append(t["fp32"] / t[k])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    ms = [Measurement("fp16 / fp32 matmul speedup", speed["fp16"], "x", "5-8x"),
          Measurement("bf16 / fp32 matmul speedup", speed["bf16"], "x"),
          Measurement("tf32 / fp32 matmul speedup", speed["tf32"], "x"),
          *[Measurement(f"{k} TFLOP/s", v, "TFLOP/s") for k, v in tflops.items()]]
    fp16 = ms[0].mean
    decided, _ = verdict(speed["fp16"], on_gpu=True)
    gpu = torch.cuda.get_device_name(0)
    plot = bars(ctx.out_dir, "gpu_tflops", list(tflops), list(tflops.values()), "TFLOP/s",
                f"{n}^3 matmul on {gpu}")
    summary = (f"On {gpu}, fp16 matmuls run {fp16:.1f}x faster than plain fp32 (TF32 off) — guide: 5-8x; "
               f"bf16 {ms[1].mean:.1f}x; with TF32 allowed fp32 itself is {ms[2].mean:.1f}x faster, so the gap "
               f"from fp32+TF32 to fp16 is only {fp16 / ms[2].mean:.1f}x.")
    setup = (f"{n}x{n} @ {n}x{n} matmuls on {gpu}, median of {reps} timings of {INNER} back-to-back matmuls after warm-up, one value per seed "
             f"({len(ctx.seeds)} seeds); fp32 with torch.backends.cuda.matmul.allow_tf32 off and on.")
    return Result(ms, decided, summary, setup, [plot])


def _cpu(ctx: ExperimentContext) -> Result:
    n = 512 if ctx.quick else 1024
    reps = 2 if ctx.quick else 7
    speed: dict[str, list[float]] = {"bf16": [], "fp16": [], "int8 (_int_mm)": []}
    gflops: dict[str, list[float]] = {"fp32": [], "bf16": [], "fp16": [], "int8 (_int_mm)": []}
    for seed in ctx.seeds:
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        t = {"fp32": _time(torch.matmul, (a, b), reps, best=True)}
        for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            ah, bh = a.to(dt), b.to(dt)
            t[name] = _time(torch.matmul, (ah, bh), max(1, reps // 3) if name == "fp16" else reps, best=True)
        ai = torch.randint(-127, 128, (n, n), dtype=torch.int8, generator=g)
        bi = torch.randint(-127, 128, (n, n), dtype=torch.int8, generator=g)
        t["int8 (_int_mm)"] = _time(torch._int_mm, (ai, bi), reps, best=True)
        for k, v in t.items():
            gflops[k].append(2 * n ** 3 / v / 1e9)
        for k in speed:
            speed[k].append(t["fp32"] / t[k])
    ms = [Measurement(f"CPU context (not the claim): {k} / fp32 matmul speedup", v, "x")
          for k, v in speed.items()]
    plot = bars(ctx.out_dir, "cpu_gflops", list(gflops), list(gflops.values()), "GFLOP/s",
                f"CPU context only: {n}^3 matmul ({torch.get_num_threads()} threads)")
    summary = ("No GPU in this run: the Tensor Core claim is not measured. As CPU context only (not the "
               "guide's claim): bf16 matmuls run " f"{ms[0].mean:.1f}x fp32 speed, fp16 {ms[1].mean:.2g}x, int8 _int_mm {ms[2].mean:.1f}x on this CPU.")
    setup = (f"No CUDA device. CPU context: {n}x{n} matmuls, best of {reps} after warm-up, "
             f"{torch.get_num_threads()} torch threads, one value per seed ({len(ctx.seeds)} seeds). "
             "On a GPU the experiment times 4096^3 fp32 (TF32 off/on), fp16 and bf16 matmuls.")
    return Result(ms, verdict([], on_gpu=False)[0], summary, setup, [plot])


def verdict(fp16_speedups: list[float], on_gpu: bool) -> tuple[str, str]:
    """(verdict, reason) from the fp16 / fp32 matmul speedups on an accelerator (one per seed). Without one the
    Tensor Core claim is not measured: CPU figures are never used to judge it."""
    if not on_gpu or not fp16_speedups:
        return "not measured", "no GPU: the Tensor Core claim cannot be measured on a CPU"
    fp16 = sum(fp16_speedups) / len(fp16_speedups)
    if LOW <= fp16 <= HIGH:
        return "holds", f"fp16 runs {fp16:.1f}x fp32, inside 5-8x"
    if fp16 > HIGH or fp16 >= LOW / 2:
        return "partly holds", f"fp16 runs {fp16:.1f}x fp32: {'above' if fp16 > HIGH else 'below'} 5-8x but within 2x of it"
    return "does not hold", f"fp16 runs {fp16:.1f}x fp32, under half the guide's 5x"


def run(ctx: ExperimentContext) -> Result:
    return _gpu(ctx) if torch.cuda.is_available() else _cpu(ctx)


CLAIM = Claim(
    id="hardware", section="§2.2",
    guide_zh="硬件加速:使用Tensor Core(GPU)或NPU进行矩阵运算优化,可使FP16计算速度提升5-8倍",
    guide_en="Hardware acceleration: Tensor Cores (GPU) or NPUs for matrix math make FP16 compute 5-8x faster.",
    claimed="fp16 5-8x faster", run=run, minutes=0.5)
