"""nanoGPT CPU parity run on tinyshakespeare (char level): ours vs nanoGPT's loop, side by side.

Both train nanoGPT's CPU config (n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
2000 iterations, lr 1e-3 -> 1e-4, dropout 0) on the same tokenized data in the same process, one
after the other, `--repeats` times each, alternating so machine noise hits both alike. Prints one
JSON object: tokens/s of each (training steps only, evaluation excluded), the ratio, and the final
validation loss of each, measured exactly on every token of the validation split.

    python benchmarks/pretrain_shakespeare.py [--text data/samples/en/tinyshakespeare.txt] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llmkit.config import load_config  # noqa: E402
from llmkit.data.tokenized import open_split, prepare_tokens, read_meta  # noqa: E402
from llmkit.models import load_model  # noqa: E402
from llmkit.tokenizer import train_tokenizer  # noqa: E402
from llmkit.train.trainer import PretrainConfig, pretrain, split_loss  # noqa: E402
from nanogpt_loop import train_nanogpt_style  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def find_text(arg: str | None) -> Path:
    for candidate in [arg, "data/samples/en/tinyshakespeare.txt", ROOT.parent / "shared/data/en/tinyshakespeare.txt"]:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    sys.exit("tinyshakespeare.txt not found: run `llmkit samples fetch` or pass --text")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=None)
    ap.add_argument("--config", default=str(ROOT / "configs/shakespeare_char.yaml"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for our run, e.g. train.precision=fp32")
    args = ap.parse_args()
    text = find_text(args.text)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_tokenizer([text], kind="char")
        tok.save(tmp / "tok")
        prepare_tokens([text], tok, tmp / "data", val_fraction=0.1)
        meta = read_meta(tmp / "data")
        val = open_split(tmp / "data", "val")
        ours_runs, ref_runs = [], []
        for r in range(args.repeats):
            ref = train_nanogpt_style(tmp / "data", meta["dtype"], tok.vocab_size, max_iters=args.max_steps)
            ref["val_loss_full"] = split_loss(ref.pop("model"), val, 64)
            ref_runs.append(ref)
            cfg = load_config(PretrainConfig, args.config, [
                f"out_dir={tmp / f'ours{r}'}", f"data.tokenizer={tmp / 'tok'}", f"data.prepared={tmp / 'data'}",
                f"data.inputs=[{text}]", f"train.max_steps={args.max_steps}", "train.progress=false",
                "track.enabled=false", *args.overrides])
            summary = pretrain(cfg)
            model = load_model(summary["final_model"])
            ours_runs.append({"tokens_per_s": summary["tokens_per_s"], "val_loss_sampled": summary["val_loss"],
                              "val_loss_full": split_loss(model, val, 64), "precision": cfg.train.precision,
                              "compile": cfg.train.compile})
            print(json.dumps({"repeat": r, "reference": ref, "ours": ours_runs[-1]}), file=sys.stderr)

    med = lambda runs, k: statistics.median(x[k] for x in runs)  # noqa: E731
    print(json.dumps({
        "benchmark": "pretrain_shakespeare_char",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "config": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12,
                   "max_steps": args.max_steps, "overrides": args.overrides},
        "repeats": args.repeats,
        "reference_nanogpt_loop": {"tokens_per_s": med(ref_runs, "tokens_per_s"),
                                   "ms_per_step": med(ref_runs, "ms_per_step"),
                                   "val_loss_full": med(ref_runs, "val_loss_full"),
                                   "val_loss_sampled": med(ref_runs, "val_loss_sampled")},
        "ours": {"tokens_per_s": med(ours_runs, "tokens_per_s"), "val_loss_full": med(ours_runs, "val_loss_full"),
                 "val_loss_sampled": med(ours_runs, "val_loss_sampled"),
                 "precision": ours_runs[0]["precision"], "compile": ours_runs[0]["compile"]},
        "speedup_tokens_per_s": med(ours_runs, "tokens_per_s") / med(ref_runs, "tokens_per_s"),
    }, indent=2))


if __name__ == "__main__":
    main()
