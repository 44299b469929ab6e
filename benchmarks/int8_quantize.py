"""INT8 vs fp32 on the same models, one run: Linear-weight bytes, prefill / decode time, perplexity delta.

    .venv/bin/python benchmarks/int8_quantize.py [--decode-steps 32] [--reps 3] [--out int8.json]

Speed: a randomly initialised decoder of GPT-2-small shape (d_model 768, 12 layers, 12 heads, vocab 50257,
learned positions, LayerNorm, gelu_tanh, biases, tied head), batch 1: a 128-token prompt forward pass,
and single-token decode steps through llmkit's `KVCache` after that prompt (as `stream_tokens` runs them).
Every variant runs in this process on the same weights, so the ratios compare like with like.
Quality: the trained model at runs/base_bilingual/final, perplexity over the whole val split of
runs/data/quickstart/tokens (`llmkit.train.heldout_loss.split_loss`), static scales calibrated on 8 windows of
the train split. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from llmkit.infer.quantize import QuantConfig, linear_weight_bytes, quantize_model
from llmkit.models.decoder import Decoder, DecoderConfig, KVCache

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "runs/base_bilingual/final"
TOKENS = ROOT / "runs/data/quickstart/tokens"


def variants() -> dict[str, QuantConfig | None]:
    return {
        "fp32": None,
        "dynamic": QuantConfig(mode="dynamic"),
        "weight_only_limbs": QuantConfig(mode="weight_only", weight_only_kernel="limbs"),
        "weight_only_dequant": QuantConfig(mode="weight_only", weight_only_kernel="dequant"),
        "static_minmax": QuantConfig(mode="static", observer="minmax"),
        "static_percentile": QuantConfig(mode="static", observer="percentile", percentile=99.99),
        "static_histogram": QuantConfig(mode="static", observer="histogram"),
        "dynamic+lm_head": QuantConfig(mode="dynamic", targets=[r"(.*\.)?blocks\.\d+\..+", "lm_head"]),
    }


@torch.no_grad()
def time_model(model: Decoder, prompt: torch.Tensor, decode_steps: int, reps: int) -> dict[str, float]:
    """Median seconds of a (1, T) prompt forward pass, and mean seconds per decode step (KV cache)."""
    model(prompt)  # warm-up
    prefill = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(prompt)
        prefill.append(time.perf_counter() - t0)
    steps = []
    for _ in range(reps):
        cache = KVCache(model.config, batch_size=1, max_len=prompt.shape[1] + decode_steps + 1)
        logits, _ = model(prompt, cache=cache)
        tok = logits[:, -1].argmax(-1).view(1, 1)
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            logits, _ = model(tok, cache=cache)
            tok = logits[:, -1].argmax(-1).view(1, 1)
        steps.append((time.perf_counter() - t0) / decode_steps)
    return {"prefill_s": statistics.median(prefill), "decode_step_s": statistics.median(steps)}


def speed(decode_steps: int, reps: int, prompt_len: int) -> dict:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=50257, block_size=1024, n_layer=12, d_model=768, activation="gelu_tanh",
                        bias=True)
    base = Decoder(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g)
    calib = [torch.randint(0, cfg.vocab_size, (2, prompt_len), generator=g) for _ in range(2)]
    out = {"model": "GPT-2-small shape, random init", "params": base.num_params(), "prompt_len": prompt_len,
           "decode_steps": decode_steps, "variants": {}}
    fp32 = None
    for name, qcfg in variants().items():
        t0 = time.perf_counter()
        model = base if qcfg is None else quantize_model(copy.deepcopy(base), qcfg, calib)
        qtime = time.perf_counter() - t0
        r = time_model(model, prompt, decode_steps, reps)
        b = linear_weight_bytes(model)
        r.update(linear_weight_bytes=b["total"], quantize_s=round(qtime, 2) if qcfg else 0.0)
        if fp32 is None:
            fp32 = r
        r["prefill_speedup"] = fp32["prefill_s"] / r["prefill_s"]
        r["decode_speedup"] = fp32["decode_step_s"] / r["decode_step_s"]
        r["decode_tok_per_s"] = 1.0 / r["decode_step_s"]
        r["linear_bytes_change_pct"] = 100.0 * (b["total"] / fp32["linear_weight_bytes"] - 1)
        out["variants"][name] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}
        print(f"[speed] {name}: {out['variants'][name]}", file=sys.stderr, flush=True)
        if model is not base:
            del model
    return out


def quality(n_calib: int = 8) -> dict:
    from llmkit.data.tokenized import open_split
    from llmkit.models.io import load_model
    from llmkit.train.heldout_loss import split_loss

    base = load_model(TRAINED)
    T = base.config.block_size
    val, train = open_split(TOKENS, "val"), open_split(TOKENS, "train")
    shard = train.shards[0]
    starts = torch.linspace(0, len(shard) - T - 1, n_calib).long().tolist()
    calib = [torch.from_numpy(shard[s:s + T].astype("int64"))[None] for s in starts]
    out = {"model": str(TRAINED.relative_to(ROOT)), "params": base.num_params(), "val_tokens": val.tokens,
           "variants": {}}
    ref = None
    for name, qcfg in variants().items():
        model = base if qcfg is None else quantize_model(copy.deepcopy(base), qcfg, calib)
        with torch.no_grad():
            loss = split_loss(model, val, T, batch_size=32)
        ppl = math.exp(loss)
        ref = ref or ppl
        b = linear_weight_bytes(model)
        out["variants"][name] = {"loss": round(loss, 5), "ppl": round(ppl, 4),
                                 "ppl_delta_pct": round(100 * (ppl / ref - 1), 3), "linear_weight_bytes": b["total"]}
        print(f"[quality] {name}: {out['variants'][name]}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "speed": speed(args.decode_steps, args.reps, args.prompt_len)}
    if TRAINED.is_dir() and TOKENS.is_dir():
        result["quality"] = quality()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
