"""Meta-learned vs standard (zero-init) LoRA: held-out loss after k adaptation steps on unseen tasks.

The experiment is the lab claim's (`llmkit.lab.experiments.meta_lora`, whose docstring has the details): per
seed, on the lab's tiny pretrained base and the alpaca en + zh demo sets split into <language>/<category>
tasks (configs/meta_lora.yaml's settings; en/rewrite, zh/rewrite and en/analyze held out, never meta-trained),

1. inner_lr is picked for the standard zero-init LoRA on the meta-training tasks (`--lr-grid`, k = --k-verdict);
2. contestants: zero-init LoRA; Reptile- and FO-MAML-learned initialisations (`meta_train_lora`,
   `--meta-iters`); joint multi-task training of the adapter for the same iterations (Reptile with 1 inner step);
   each adapted by k SGD steps on every held-out task's support set (8 conversations) and scored on its query
   set (32 others);
3. verdicts from `llmkit.finetune.meta_lora.adaptation_verdict` at k = --k-verdict (margin --margin nats, on the
   mean over seeds and a strict majority of seeds): each meta-learned init against zero-init and against joint.
   The headline `verdict` is Reptile vs zero-init (the config's algorithm); `claim_verdict` is the lab's.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/meta_lora.py      # 3 seeds, ~10 min on 2 idle cores

Each seed's result is kept in <work>/seed-N.json (reused by a later run with the same settings), so seeds can
also run as separate processes (`--seeds 1`, ...) before the full command gathers them.
    .venv/bin/python benchmarks/meta_lora.py --quick                           # a smoke run (not written)

Prints the JSON and writes it to benchmarks/results/meta_lora.json (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    from llmkit.finetune.meta_lora import adaptation_verdict
    from llmkit.lab.common import tiny_base_model
    from llmkit.lab.experiments import meta_lora as lab

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ks", default=",".join(map(str, lab.KS)))
    p.add_argument("--k-verdict", type=int, default=lab.K_VERDICT)
    p.add_argument("--margin", type=float, default=lab.MARGIN, help="nats")
    p.add_argument("--meta-iters", type=int, default=lab.META_ITERS)
    p.add_argument("--lr-grid", default=",".join(f"{x:g}" for x in lab.LR_GRID))
    p.add_argument("--base", default=None, help="a pretrained llmkit decoder dir (default: the lab's tiny base)")
    p.add_argument("--work", default="runs/bench_meta_lora")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "meta_lora.json"))
    p.add_argument("--quick", action="store_true", help="1 seed, 4 meta-iterations: a smoke run, not evidence")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    ks = sorted({*(int(k) for k in args.ks.split(",")), args.k_verdict})
    grid = [float(x) for x in args.lr_grid.split(",")]
    meta_iters = args.meta_iters
    if args.quick:
        seeds, meta_iters, grid = seeds[:1], lab.QUICK_META_ITERS, grid[:1]
    torch.set_num_threads(1)
    base = Path(args.base) if args.base else tiny_base_model(steps=300)
    t0 = time.perf_counter()
    runs = [lab.run_seed(base, s, Path(args.work), meta_iters, grid, ks, args.k_verdict,
                         log=lambda m: print(m, file=sys.stderr, flush=True)) for s in seeds]
    t = lab.table(runs, ks)
    kv = args.k_verdict
    verdicts = {}
    for algo in ("reptile", "fo-maml", "joint"):
        v, why = adaptation_verdict(t[algo][kv], t["zero-init"][kv], args.margin)
        verdicts[f"{algo} vs zero-init"] = {"verdict": v, "reason": why}
    for algo in ("reptile", "fo-maml"):
        v, why = adaptation_verdict(t[algo][kv], t["joint"][kv], args.margin)
        verdicts[f"{algo} vs joint"] = {"verdict": v, "reason": why}
    claim, claim_reason = lab.verdict(t["zero-init"][kv], t["reptile"][kv], t["joint"][kv], args.margin)
    result = {
        "benchmark": "meta_lora", "command": "python benchmarks/meta_lora.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "git_commit": git_commit(),
        "machine": f"{platform.machine()}, 1 torch thread, Python {platform.python_version()}, torch {torch.__version__}",
        "base_model": str(base), "settings": lab.SETTINGS, "seeds": seeds, "ks": ks, "k_verdict": kv,
        "margin_nats": args.margin, "meta_iters": meta_iters, "lr_grid": grid, "quick": args.quick,
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_per_run": {f"seed {r['seed']}": {n: r[n]["seconds"] for n in ("reptile", "fo-maml", "joint")}
                            for r in runs},
        "seeds_read_from_cache": [r["seed"] for r in runs if r.get("from_cache")],
        "heldout_loss_mean_over_seeds": {n: {str(k): sum(v) / len(v) for k, v in by_k.items()} for n, by_k in t.items()},
        "heldout_loss_per_seed": {n: {str(k): v for k, v in by_k.items()} for n, by_k in t.items()},
        "verdict": verdicts["reptile vs zero-init"]["verdict"], "verdicts": verdicts,
        "claim_verdict": claim, "claim_reason": claim_reason, "runs": runs,
    }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if not args.quick and len(seeds) >= 3:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
