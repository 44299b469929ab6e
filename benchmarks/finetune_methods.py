"""Full fine-tuning vs LoRA vs prefix tuning: trainable share, step time and peak memory, side by side.

    python benchmarks/finetune_methods.py            # prints one JSON object

Guide §3.1's table says full fine-tuning trains 100% of the parameters, LoRA 0.5-2% and prefix tuning
0.1-0.5%, with training time long / short / shortest. For each method this script
1. counts trainable parameters on reference configs built on the meta device (no memory): GPT-2 small
   (d 768, 12 layers, vocab 50257, learned positions) and a Llama-7B-shaped decoder (d 4096, 32 layers,
   vocab 32000, SwiGLU, RoPE), with the guide's LoRA (r 16, alpha 32, q_proj + v_proj) and 20 virtual
   tokens of prefix;
2. trains a CPU-sized Llama-style decoder (d 512, 8 layers, vocab 8192, block 256, batch 4) for a few
   AdamW steps in a fresh subprocess per method and reports the median step time and the process's peak
   resident memory (model + gradients + optimizer state + activations).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("full", "lora", "prefix", "prefix_direct")
REFERENCE = {
    "gpt2_small": dict(vocab_size=50257, block_size=1024, n_layer=12, d_model=768, n_head=12),
    "llama_7b_shape": dict(vocab_size=32000, block_size=4096, n_layer=32, d_model=4096, n_head=32,
                           activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=False,
                           d_ff=11008),
}
CPU_MODEL = dict(vocab_size=8192, block_size=256, n_layer=8, d_model=512, n_head=8, activation="swiglu",
                 norm="rmsnorm", positions="rope")


def apply_method(model, method: str):
    from llmkit.models.lora import LoRAConfig, apply_lora
    from llmkit.models.prefix import PrefixConfig, apply_prefix

    if method == "lora":
        apply_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.1, targets=["q_proj", "v_proj"]))
    elif method == "prefix":  # with Li & Liang's MLP reparameterization (trained, then folded away)
        apply_prefix(model, PrefixConfig(num_virtual_tokens=20, projection=True))
    elif method == "prefix_direct":  # the prefix keys/values themselves: what an adapter file keeps
        apply_prefix(model, PrefixConfig(num_virtual_tokens=20, projection=False))
    return model


def shares() -> dict:
    import torch

    from llmkit.models.decoder import Decoder, DecoderConfig

    out = {}
    for name, kw in REFERENCE.items():
        row = {}
        for method in METHODS:
            with torch.device("meta"):
                model = apply_method(Decoder(DecoderConfig(**kw)), method)
            total = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            row[method] = {"trainable": trainable, "total": total, "share_pct": round(100 * trainable / total, 4)}
        out[name] = row
    return out


def one_method(method: str, steps: int) -> dict:
    """Runs in its own process: peak RSS then belongs to this method alone."""
    import torch

    from llmkit.finetune.sft import SFTTrainConfig
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.train.loop import make_optimizer

    torch.manual_seed(0)
    model = apply_method(Decoder(DecoderConfig(**CPU_MODEL)), method)
    params = [p for p in model.parameters() if p.requires_grad]
    base, adapters = (params, []) if method == "full" else ([], params)
    opt = make_optimizer(SFTTrainConfig(lr=1e-4), [(base, 1.0), (adapters, 10.0)])
    x = torch.randint(0, CPU_MODEL["vocab_size"], (4, CPU_MODEL["block_size"]))
    times = []
    model.train()
    for _ in range(steps):
        t = time.perf_counter()
        _, loss = model(x, targets=x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "share_pct": round(100 * trainable / total, 4),
            "step_time_s": round(statistics.median(times[1:]), 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(one_method(sys.argv[2], int(sys.argv[3]))))
        return
    steps = 6
    runs = {}
    for method in METHODS:
        proc = subprocess.run([sys.executable, __file__, "--one", method, str(steps)], capture_output=True,
                              text=True, check=True)
        runs[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    full = runs["full"]
    for method in METHODS:
        runs[method]["step_time_vs_full"] = round(runs[method]["step_time_s"] / full["step_time_s"], 3)
        runs[method]["peak_rss_vs_full"] = round(runs[method]["peak_rss_mb"] / full["peak_rss_mb"], 3)
    print(json.dumps({"guide_table_pct": {"full": "100", "lora": "0.5-2", "prefix": "0.1-0.5"},
                      "note": "prefix = with the MLP reparameterization (trainable while training); "
                              "prefix_direct = the per-layer prefixes alone",
                      "reference_shares": shares(), "cpu_model": CPU_MODEL, "batch": [4, CPU_MODEL["block_size"]],
                      "measured": runs}, indent=1))


if __name__ == "__main__":
    main()
