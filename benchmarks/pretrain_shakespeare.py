"""nanoGPT CPU parity run on tinyshakespeare (char level): ours vs nanoGPT's loop, side by side.

Both train nanoGPT's CPU config (n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
2000 iterations, lr 1e-3 -> 1e-4, dropout 0) on the same tokenized data in the same process, one
after the other, `--repeats` times each, alternating so machine noise hits both alike. Prints one
JSON object: tokens/s of each (one estimator for both, `llmkit.train.loop.TokenRate`: total tokens / total
seconds of the timed training steps, evaluation excluded), the ratio, and the final
validation loss of each, measured exactly on every token of the validation split.

    python benchmarks/pretrain_shakespeare.py [--text data/samples/en/tinyshakespeare.txt] [--repeats 3]

Variants of ours: `fp32` (the recipe as written) and `bf16` (bf16 autocast + the math attention
kernel, for CPUs with native bf16); `--variants fp32 bf16 bf16_epoch` adds bf16 with `train.sampling=epoch`. Each repeat uses a new seed for every contestant.
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
from llmkit.train.heldout_loss import split_loss
from llmkit.train.pretrain import PretrainConfig, pretrain  # noqa: E402
from nanogpt_loop import train_nanogpt_style  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def find_text(arg: str | None) -> Path:
    for candidate in [arg, "data/samples/en/tinyshakespeare.txt", ROOT.parent / "shared/data/en/tinyshakespeare.txt"]:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    sys.exit("tinyshakespeare.txt not found: run `llmkit samples fetch` or pass --text")


VARIANTS = {
    "fp32": [],  # the recipe as it stands: fp32 on CPU, PyTorch's default attention kernel
    "bf16": ["train.precision=bf16", "train.attention=math"],  # CPUs with native bf16 (AVX512-BF16 / AMX)
    # every window once per epoch instead of random offsets (not run by default: --variants ... bf16_epoch)
    "bf16_epoch": ["train.precision=bf16", "train.attention=math", "train.sampling=epoch"],
}
DEFAULT_VARIANTS = ["fp32", "bf16"]


def sampled_eval_spread(model, val, n_sets: int = 30, eval_iters: int = 20, batch_size: int = 12,
                        block_size: int = 64) -> dict:
    """How much nanoGPT's `estimate_loss` (eval_iters random batches) moves between draws on one model."""
    from llmkit.train.sampler import WindowSampler

    sampler = WindowSampler(val, batch_size, block_size, seed=99)
    model.eval()
    estimates = []
    with torch.no_grad():
        for _ in range(n_sets):
            estimates.append(statistics.mean(model(*sampler.next_batch())[1].item() for _ in range(eval_iters)))
    return {"sets": n_sets, "mean": statistics.mean(estimates), "stdev": statistics.stdev(estimates),
            "min": min(estimates), "max": max(estimates)}


def summarize(runs: list[dict]) -> dict:
    out = {"tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs)}
    for key in ("val_loss_full", "val_loss_sampled"):
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.mean(values), "min": min(values), "max": max(values), "runs": values}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=None)
    ap.add_argument("--config", default=str(ROOT / "configs/shakespeare_char.yaml"))
    ap.add_argument("--repeats", type=int, default=1, help="seeds 1337, 1338, ... for every contestant")
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    args = ap.parse_args()
    text = find_text(args.text)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_tokenizer([text], kind="char")
        tok.save(tmp / "tok")
        prepare_tokens([text], tok, tmp / "data", val_fraction=0.1)
        meta = read_meta(tmp / "data")
        val = open_split(tmp / "data", "val")
        runs: dict[str, list[dict]] = {"reference": [], **{v: [] for v in args.variants}}
        spread = None
        for r in range(args.repeats):
            seed = 1337 + r
            ref = train_nanogpt_style(tmp / "data", meta["dtype"], tok.vocab_size, max_iters=args.max_steps, seed=seed)
            model = ref.pop("model")
            ref["val_loss_full"] = split_loss(model, val, 64)
            if spread is None:
                spread = sampled_eval_spread(model, val)
            runs["reference"].append(ref)
            for variant in args.variants:
                cfg = load_config(PretrainConfig, args.config, [
                    f"out_dir={tmp / f'{variant}{r}'}", f"data.tokenizer={tmp / 'tok'}", f"data.prepared={tmp / 'data'}",
                    f"data.inputs=[{text}]", f"train.max_steps={args.max_steps}", f"train.seed={seed}",
                    "train.progress=false", "track.enabled=false", *VARIANTS[variant]])
                summary = pretrain(cfg)
                runs[variant].append({"tokens_per_s": summary["tokens_per_s"], "val_loss_sampled": summary["val_loss"],
                                      "val_loss_full": split_loss(load_model(summary["final_model"]), val, 64)})
            print(json.dumps({"seed": seed, **{k: v[-1] for k, v in runs.items()}}), file=sys.stderr)

    ref_tps = statistics.median(r["tokens_per_s"] for r in runs["reference"])
    print(json.dumps({
        "benchmark": "pretrain_shakespeare_char",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "config": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12,
                   "max_steps": args.max_steps},
        "seeds": [1337 + r for r in range(args.repeats)],
        "reference_nanogpt_loop": {**summarize(runs["reference"]),
                                   "ms_per_step_median": statistics.median(r["ms_per_step"] for r in runs["reference"]),
                                   "sampled_eval_spread": spread},
        **{f"ours_{v}": {**summarize(runs[v]), "overrides": VARIANTS[v],
                         "speedup_vs_reference": summarize(runs[v])["tokens_per_s_median"] / ref_tps}
           for v in args.variants},
    }, indent=2))


if __name__ == "__main__":
    main()
