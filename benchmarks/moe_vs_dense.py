"""Mixture of experts against a dense decoder with the same active parameters, on the same tokens.

    python benchmarks/moe_vs_dense.py                      # 3 seeds, 600 steps each (~5 minutes on 2 cores)
    python benchmarks/moe_vs_dense.py --steps 100 --seeds 1

Character-level tinyshakespeare, 4 layers of d_model 128, SwiGLU, `llmkit.train.pretrain` for every contestant
(same data order per seed, same steps, batch and schedule):
* dense: d_ff 256;
* MoE: 8 experts of d_ff 128, top-2 (each token computes 2 x 128 = 256 hidden units: the dense model's
  active MLP), load-balancing loss 0.01 and z-loss 0.001;
* MoE without router losses (both coefficients 0): what the balancing loss buys.
Prints JSON: per contestant the held-out loss (mean and per seed), parameters (total and active per token),
training tokens/s, and for the MoE models the experts' load imbalance on the held-out batches (coefficient
of variation of their shares: 0 is perfectly even) and the router's entropy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

BASE = {"model__n_layer": 4, "model__d_model": 128, "model__n_head": 4, "model__activation": "swiglu",
        "model__norm": "rmsnorm", "model__positions": "rope", "train__lr": 2e-3, "train__batch_size": 16}
CONTESTANTS = {
    "dense d_ff 256": {"model__d_ff": 256},
    "MoE 8 x 128, top-2": {"model__d_ff": 128, "model__moe": "{experts: 8, top_k: 2}"},
    "MoE 8 x 128, top-2, no router losses": {
        "model__d_ff": 128, "model__moe": "{experts: 8, top_k: 2, router_aux_loss: 0, router_z_loss: 0}"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llmkit.lab.common import char_corpus, tiny_pretrain
    from llmkit.models.io import load_model

    work = Path(tempfile.mkdtemp(prefix="moe-vs-dense-"))
    text, tok = char_corpus(work)
    out: dict = {"benchmark": "moe_vs_dense", "steps": args.steps, "seeds": args.seeds, "threads": args.threads,
                 "data": "tinyshakespeare, characters", "contestants": {}}
    for name, extra in CONTESTANTS.items():
        rows = []
        for seed in range(args.seeds):
            run_dir = work / f"{len(out['contestants'])}-s{seed}"
            summary = tiny_pretrain(run_dir, text, tok, seed, args.steps, **{**BASE, **extra,
                                                                            "train__eval_batches": 16})
            final = summary["history"][-1]
            rows.append({"val_loss": summary["val_loss"], "tokens_per_s": summary.get("tokens_per_s"),
                         **{k: final[k] for k in ("moe_load_cv", "moe_router_entropy") if k in final}})
        model = load_model(run_dir / "final")
        entry = {"val_loss": statistics.fmean(r["val_loss"] for r in rows),
                 "val_loss_per_seed": [round(r["val_loss"], 4) for r in rows],
                 "params": sum(p.numel() for p in model.parameters()), "active_params": model.num_active_params(),
                 "train_tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rows if r["tokens_per_s"])}
        if "moe_load_cv" in rows[0]:
            entry["load_cv"] = statistics.fmean(r["moe_load_cv"] for r in rows)
            entry["router_entropy"] = statistics.fmean(r["moe_router_entropy"] for r in rows)
        out["contestants"][name] = entry
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
