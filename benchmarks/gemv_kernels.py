"""Decode-time matrix products at the memory-bandwidth and compute ceilings: the llmkit CPU kernels against MKL
and PyTorch's own weight-only kernels, on a real decoder's weight shapes, out of cache.

    python benchmarks/gemv_kernels.py                   # SmolLM2-135M shapes, 2 threads, batch-1 (one row)
    python benchmarks/gemv_kernels.py --rows 1,8,32,64  # also 8 / 32 / 64 rows (tokens of a batched step)
    python benchmarks/gemv_kernels.py --d-model 768 --d-ff 3072 --kv-dim 768 --layers 12   # GPT-2-small

Every layer's weights are distinct tensors (qkv, o, gate, up, down per layer: a 30-layer SmolLM2 holds ~430 MB
of fp32 Linear weights, far beyond the caches), and one pass multiplies one token through all of them, as a
decode step does. The ceiling is the machine's streaming-read bandwidth, measured here the same way: the best
of several `torch.sum` passes over a 1 GiB fp32 buffer. Each contestant's figure is weight bytes read per pass /
median pass time, and its share of the ceiling; with more rows, also GFLOP/s (2 x rows x weights per pass):

* MKL fp32: `F.linear` on (out, in) weights and on column-major ones (the layout the Engine used before);
* llmkit fp32 / INT8 (per-output-channel, g = in) / INT4 (group 32): `llmkit.infer.kernels`;
* PyTorch's CPU weight-only kernels `aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` (group 32).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def read_bandwidth(gib: float = 1.0, passes: int = 5) -> float:
    """Streaming-read bandwidth in GB/s: the best `torch.sum` pass over a `gib` GiB fp32 buffer."""
    buf = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def timed(fn, passes: int) -> float:
    fn()
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--kv-dim", type=int, default=192, help="k and v rows of the fused qkv (n_kv_head * head_dim)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--rows", default="1", help="comma-separated input rows per product, e.g. 1,8,32,64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llmkit.infer import kernels
    from llmkit.infer.weight_only import quantize_groups

    if not kernels.available():
        raise SystemExit(f"llmkit kernels unavailable: {kernels.why_not()}")
    d, ff = args.d_model, args.d_ff
    shapes = [(d + 2 * args.kv_dim, d), (d, d), (ff, d), (ff, d), (d, ff)] * args.layers
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.02 for n, k in shapes]
    fp32_bytes = sum(w.numel() * 4 for w in weights)
    col = [w.t().contiguous().t() for w in weights]
    q8 = [quantize_groups(w, 8, w.size(1)) for w in weights]
    q4 = [quantize_groups(w, 4, 32) for w in weights]
    i8pack = [(q, s[:, 0].contiguous()) for q, s in q8]
    i4pack = []
    for w in weights:  # PyTorch's own int4 layout: codes 0..15 (out, in) int32, then (scale, zero) per group
        n, k = w.shape
        wg = w.view(n, k // 32, 32)
        scale = wg.abs().amax(-1) / 7.5
        codes = torch.clamp(torch.round(wg / scale[..., None]) + 8, 0, 15).to(torch.int32).view(n, k)
        sz = torch.stack([scale, -8 * scale], dim=-1).transpose(0, 1).contiguous()  # (k/32, n, 2)
        i4pack.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), sz))

    xs: dict[int, torch.Tensor] = {}  # input width -> the current rows' activations, set per row count below

    def run(step):
        def go():
            for i, (_, k) in enumerate(shapes):
                step(i, xs[k])
        return go

    contestants = {
        "MKL fp32 (out, in)": (run(lambda i, x: F.linear(x, weights[i])), fp32_bytes),
        "MKL fp32 column-major": (run(lambda i, x: F.linear(x, col[i])), fp32_bytes),
        "llmkit fp32": (run(lambda i, x: kernels.linear_f32(x, weights[i])), fp32_bytes),
        "llmkit INT8 per-channel": (run(lambda i, x: kernels.linear_q8(x, *q8[i])),
                                    sum(q.numel() + s.numel() * 4 for q, s in q8)),
        "llmkit INT4 g32": (run(lambda i, x: kernels.linear_q4(x, *q4[i])),
                            sum(q.numel() + s.numel() * 4 for q, s in q4)),
        "torch _weight_int8pack_mm": (run(lambda i, x: torch.ops.aten._weight_int8pack_mm(x, *i8pack[i])),
                                      sum(q.numel() + s.numel() * 4 for q, s in i8pack)),
        "torch _weight_int4pack_mm_for_cpu g32": (
            run(lambda i, x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, i4pack[i][0], 32, i4pack[i][1])),
            sum(q.numel() * q.element_size() + s.numel() * 4 for q, s in i4pack)),
    }
    ceiling = read_bandwidth()
    out = {"benchmark": "gemv_kernels", "threads": args.threads, "layers": args.layers,
           "shapes_per_layer": [list(s) for s in shapes[:5]], "read_bandwidth_gb_s": round(ceiling, 1),
           "fp32_weight_mb": round(fp32_bytes / 1e6, 1), "rows": {}}
    names = list(contestants)
    flops_per_row = 2 * sum(n * k for n, k in shapes)
    for rows in (int(r) for r in args.rows.split(",")):
        xs.update({k: torch.randn(rows, k) for k in {k for _, k in shapes}})
        per: dict[str, list[float]] = {n: [] for n in names}
        for r in range(3):  # rounds, rotating the order
            for name in names[r:] + names[:r]:
                fn, _ = contestants[name]
                per[name].append(timed(fn, args.passes))
        table = out["rows"][str(rows)] = {}
        for name, (_, nbytes) in contestants.items():
            t = statistics.median(per[name])
            gbs = nbytes / t / 1e9
            table[name] = {"ms_per_pass": round(t * 1e3, 2), "weight_mb": round(nbytes / 1e6, 1),
                           "gb_s": round(gbs, 1), "share_of_ceiling": round(gbs / ceiling, 2),
                           "gflop_s": round(rows * flops_per_row / t / 1e9, 1)}
        base = table["MKL fp32 (out, in)"]["ms_per_pass"]
        for c in table.values():
            c["speedup_vs_mkl"] = round(base / c["ms_per_pass"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
