"""Catastrophic forgetting: pretraining-set loss before and after instruction tuning, with 0% and 15% of
the batch rows drawn from the pretraining data (guide §3.3: mix in 10-20% to prevent forgetting).

    python benchmarks/sft_forgetting.py --base runs/base_bilingual/final --tokens runs/data/quickstart/tokens

The base is a pretrained llmkit decoder and `--tokens` the token dir it was pretrained on (its `val`
split is the forgetting probe). For each method (full fine-tuning and LoRA by default) and mixing share,
the same recipe (configs/sft_<method>.yaml values, same seed, same steps) fine-tunes the base on the
alpaca en + zh demo sets; the script reports the held-out instruction loss and the pretraining val loss
before and after, and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pretrain_val_loss(model, tokens_dir: Path, block: int) -> float:
    """Exact mean loss over every token of the pretraining val split (non-overlapping windows)."""
    from llmkit.data.tokenized import open_split
    from llmkit.train.heldout_loss import split_loss

    return split_loss(model, open_split(tokens_dir, "val"), block)


def main() -> None:
    from llmkit.config import load_config
    from llmkit.finetune.sft import SFTConfig, finetune_sft
    from llmkit.infer.load import load_for_inference

    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/base_bilingual/final")
    ap.add_argument("--tokens", default="runs/data/quickstart/tokens")
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--mix", default="0.0,0.15")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=None, help="override train.lr of the recipes")
    args = ap.parse_args()
    base, _, _ = load_for_inference(args.base)
    block = base.config.block_size
    result = {"base": args.base, "steps": args.steps, "lr": args.lr,
              "pretrain_val_loss_before": pretrain_val_loss(base, Path(args.tokens), block),
              "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for mix in (float(m) for m in args.mix.split(",")):
                out = Path(tmp) / f"{method}-{mix}"
                cfg = load_config(SFTConfig, ROOT / "configs" / f"sft_{method}.yaml", [
                    f"out_dir={out}", f"base_model={args.base}", f"data.mix_pretrain={mix}",
                    f"data.pretrain={args.tokens}", f"train.max_steps={args.steps}", "train.progress=false",
                    f"train.eval_interval={args.steps}", f"train.checkpoint_interval={args.steps}",
                    "eval.answers=0", "eval.samples=0", "track.enabled=false",
                    *([f"train.lr={args.lr}"] if args.lr else [])])
                summary = finetune_sft(cfg)
                model, _, _ = load_for_inference(args.base, out / "final") if method != "full" else \
                    load_for_inference(out / "final")
                result["runs"].append({
                    "method": method, "mix_pretrain": mix, "instruction_eval_loss": summary["eval_loss"],
                    "pretrain_val_loss_after": pretrain_val_loss(model, Path(args.tokens), block)})
    for r in result["runs"]:
        r["forgetting"] = r["pretrain_val_loss_after"] - result["pretrain_val_loss_before"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
