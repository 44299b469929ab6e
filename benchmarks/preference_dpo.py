"""Held-out reward accuracy before / after a short DPO LoRA run (docs/preference.md, "Measured").

Pairs are built from the alpaca demo sets by `construct_pairs` (chosen = the reference answer, rejected as
--rejected says), the first --records of each file; the recipe is configs/preference_dpo.yaml with the
overrides given. Prints and writes benchmarks/results/preference_dpo[_TAG].json.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/preference_dpo.py --base runs/lab/_shared/base_d64_l2_s300_seed0/final
    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/preference_dpo.py --base runs/pref_smol --records 150 \\
        --rejected truncated --set train.max_steps=60 --set train.batch_size=4 --set data.max_len=192 --tag smol
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from llmkit.config import load_config
from llmkit.finetune.preference import PreferenceConfig, finetune_preference

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--records", type=int, default=0, help="first N records of each alpaca file (0: all)")
    ap.add_argument("--rejected", default="other", choices=["other", "truncated", "mixed"])
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
            src = ROOT / "data" / "samples" / "instruct" / name
            records = json.loads(src.read_text(encoding="utf-8"))
            if args.records:
                records = records[:args.records]
            dst = Path(tmp) / name
            dst.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
            files.append(str(dst))
        out = Path(tmp) / "run"
        overrides = [f"base_model={args.base}", f"out_dir={out}", f"data.construct_from=[{','.join(files)}]",
                     f"data.rejected={args.rejected}", "track.enabled=false", "train.progress=false", *args.set]
        cfg = load_config(PreferenceConfig, ROOT / "configs" / "preference_dpo.yaml", overrides)
        t = time.perf_counter()
        s = finetune_preference(cfg)
        seconds = time.perf_counter() - t
        train_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in train_rows if "rewards/accuracy" in r]
    result = {"base": args.base, "records_per_file": args.records, "rejected": args.rejected, "overrides": args.set,
              "data": s["data"], "seconds": seconds, "reference_computed": s["reference_computed"],
              "before": s["before"], "after": s["after"],
              "train_reward_accuracy_last": train_rows[-1]["rewards/accuracy"] if train_rows else None}
    path = ROOT / "benchmarks" / "results" / f"preference_dpo{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    keys = ("eval_reward_accuracy", "eval_reward_margin", "eval_logps_accuracy", "eval_loss", "eval_kl")
    for k in keys:
        print(f"{k:24s} before {s['before'].get(k, float('nan')):9.4f}  after {s['after'].get(k, float('nan')):9.4f}")
    print(json.dumps({"seconds": round(seconds, 1), "data": s["data"], "written": str(path)}))


if __name__ == "__main__":
    main()
