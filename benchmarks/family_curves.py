"""Each architecture family learns: decoder (causal LM), encoder (masked LM), encoder-decoder (span
corruption), trained from the tiny recipes in configs/ on tinyshakespeare, with their validation
curves; plus the parameter count of an encoder-decoder against a decoder of the same width and depth.

    python benchmarks/family_curves.py [--steps N] [--text data/samples/en/tinyshakespeare.txt]

Prints JSON: for each family, validation loss at every evaluation, final train/val loss, tokens/s,
parameters; and the `model info` comparison (guide §1.2: encoder-decoder "~30% more parameters").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import Counter
from pathlib import Path

from llmkit.config import load_config
from llmkit.models import DecoderConfig
from llmkit.models.encdec import EncDecConfig
from llmkit.models.info import model_info
from llmkit.tokenizer import train_tokenizer
from llmkit.train.objectives import MASK_TOKEN, sentinel_token
from llmkit.train.pretrain import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"decoder": "configs/shakespeare_char.yaml", "encoder": "configs/bert_tiny_mlm.yaml",
           "encdec": "configs/t5_tiny_span.yaml"}


def find_text(arg: str | None) -> Path:
    for candidate in [arg, "data/samples/en/tinyshakespeare.txt", ROOT.parent / "shared/data/en/tinyshakespeare.txt"]:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    sys.exit("tinyshakespeare.txt not found: run `llmkit samples fetch` or pass --text")


def param_comparison(vocab: int = 32128) -> list[dict]:
    """Encoder-decoder vs decoder-only at equal width, for two readings of "equal depth"."""
    rows = []
    for d, layers in ((512, 6), (768, 12), (1024, 24)):
        dec = model_info(DecoderConfig(vocab_size=vocab, d_model=d, n_layer=layers, d_ff=4 * d, block_size=512))
        same_stack = model_info(EncDecConfig(vocab_size=vocab, d_model=d, n_layer=layers, n_decoder_layer=layers,
                                             d_ff=4 * d))
        same_total = model_info(EncDecConfig(vocab_size=vocab, d_model=d, n_layer=layers // 2,
                                             n_decoder_layer=layers // 2, d_ff=4 * d))
        for name, enc in (("encoder L + decoder L vs decoder L", same_stack),
                          ("encoder L/2 + decoder L/2 vs decoder L", same_total)):
            rows.append({"d_model": d, "layers": layers, "comparison": name,
                         "decoder_params": dec["parameters"]["total"], "encdec_params": enc["parameters"]["total"],
                         "ratio_total": enc["parameters"]["total"] / dec["parameters"]["total"],
                         "ratio_non_embedding": enc["non_embedding_parameters"] / dec["non_embedding_parameters"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=None)
    ap.add_argument("--steps", type=int, default=None, help="default: each recipe's own train.max_steps")
    ap.add_argument("--families", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = ap.parse_args()
    text = find_text(args.text)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_tokenizer([text], kind="char", extra_special_tokens=[MASK_TOKEN] + [sentinel_token(i)
                                                                                          for i in range(32)])
        tok.save(tmp / "tok")
        for family in args.families:
            cfg = load_config(PretrainConfig, ROOT / RECIPES[family], [
                f"out_dir={tmp / family}", f"data.tokenizer={tmp / 'tok'}", f"data.inputs=[{text}]",
                f"data.prepared={tmp / 'data'}", "train.progress=false", "track.enabled=false",
                *([f"train.max_steps={args.steps}"] if args.steps else [])])
            summary = pretrain(cfg)
            curve = [{"step": r["step"], "val_loss": round(r["val_loss"], 4), "train_loss": round(r["train_loss"], 4)}
                     for r in summary["history"] if "val_loss" in r]
            results[family] = {"recipe": RECIPES[family], "objective": {"decoder": "causal", "encoder": "mlm",
                                                                        "encdec": "span"}[family],
                               "n_params": summary["n_params"], "tokens_per_s": round(summary["tokens_per_s"]),
                               "curve": curve}
            print(json.dumps({family: results[family]}), file=sys.stderr)
    # what a model that knows character frequencies only reaches (the masked-LM plateau sits just below it)
    counts = Counter(text.read_text(encoding="utf-8"))
    total = sum(counts.values())
    unigram_nats = -sum(c / total * math.log(c / total) for c in counts.values())
    print(json.dumps({"benchmark": "family_curves", "steps": args.steps, "families": results,
                      "vocab_size": tok.vocab_size, "ln_vocab": round(math.log(tok.vocab_size), 3),
                      "unigram_entropy_nats": round(unigram_nats, 3),
                      "encdec_vs_decoder_params": param_comparison()}, indent=2))


if __name__ == "__main__":
    main()
