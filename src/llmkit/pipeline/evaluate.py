"""The pipeline's eval stage: the guide's three monitoring dimensions measured on the final model.

* quality after quantization: perplexity of the floating-point and the INT8 model on the same held-out
  tokens (the tokens stage's validation split), and Linear-weight bytes;
* fine-tune accuracy: exact match and ROUGE-L of greedy answers to the SFT stage's held-out prompts, by the
  floating-point and the INT8 model;
* inference latency: a short load run through the `Engine` with `load_concurrency` requests in flight,
  per request: time to first token, mean time per further output token, end-to-end seconds;
* benchmarks (`tasks`): `llmkit eval` on the final model, and on the floating-point model when the final one
  is quantized, so the report shows what quantization cost on MMLU-style questions too;
* and the final model's answers to a few English and Chinese instructions, for a human to read.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from llmkit.pipeline.config import EvalStage


@torch.no_grad()
def heldout_perplexity(model, tokens_dir: str | Path, max_tokens: int) -> tuple[float, int]:
    """(perplexity, tokens scored) over the first `max_tokens` tokens of the validation split, in
    non-overlapping windows of the model's block_size."""
    from llmkit.data.tokenized import open_split

    split = open_split(tokens_dir, "val")
    block = model.config.block_size
    flat = np.concatenate([np.asarray(s[:max_tokens + 1]) for s in split.shards])[:max_tokens + 1]
    n = (len(flat) - 1) // block
    if n < 1:
        raise ValueError(f"{tokens_dir}: the validation split holds {len(flat)} tokens, fewer than one window "
                         f"of {block}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n, 16):
        rows = np.arange(start, min(n, start + 16)) * block
        window = torch.from_numpy(flat[rows[:, None] + np.arange(block + 1)].astype(np.int64)).to(device)
        _, loss = model(window[:, :-1], window[:, 1:])
        total += float(loss) * window[:, 1:].numel()
        count += window[:, 1:].numel()
    return math.exp(total / count), count


def answers(model, tok, template, prompts: list[str], max_new_tokens: int, sampling: EvalStage | None = None
            ) -> list[str]:
    """Replies to single-turn prompts (`chat_replies`: batched through the Engine, cut at the end of turn):
    greedy, or with `sampling`'s temperature / top_p / repetition_penalty and seed (prompt i draws with
    seed + i)."""
    from llmkit.infer.engine import RequestParams
    from llmkit.infer.reply import chat_replies

    if sampling is None:
        params = RequestParams(max_new_tokens=max_new_tokens, temperature=0.0)
    else:
        params = [RequestParams(max_new_tokens=max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                                repetition_penalty=sampling.repetition_penalty, seed=sampling.seed + i)
                  for i in range(len(prompts))]
    return chat_replies(model, tok, template, [[{"role": "user", "content": p}] for p in prompts], params)


def load_run(model, tok, template, prompts: list[str], requests: int, concurrency: int,
             max_new_tokens: int, sampling: EvalStage | None = None) -> dict:
    """Latency of `requests` sampled requests kept `concurrency` at a time in the Engine (prompts cycled).

    Returns per-request lists ttft_s (submit -> first token), tpot_s (mean seconds per token after the
    first), e2e_s, and overall generated tokens/s."""
    from llmkit.infer.engine import Engine, RequestParams
    from llmkit.infer.reply import reply_prompt_ids, reply_stop_ids

    stops = reply_stop_ids(tok, template)  # as a chat reply would stop: end of turn, then every eos id
    ids = [reply_prompt_ids(tok, template, [{"role": "user", "content": p}]) for p in prompts]
    engine = Engine(model, tok, max_batch=concurrency, prefix_cache_tokens=0,
                    max_len=max(map(len, ids), default=1) + max_new_tokens)
    times: dict[str, list[float]] = {}

    def on_token(rid: str, _token: int) -> None:
        times[rid].append(time.perf_counter())

    submitted: dict[str, float] = {}
    t0 = time.perf_counter()
    next_i, done = 0, []
    while len(done) < requests:
        while next_i < requests and len(engine.running) + len(engine.waiting) < concurrency:
            s = sampling or EvalStage()
            params = RequestParams(max_new_tokens=max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                   repetition_penalty=s.repetition_penalty, seed=s.seed + next_i,
                                   stop_token_ids=stops)
            rid = engine.add_request(ids[next_i % len(ids)], params, on_token=on_token)
            times[rid], submitted[rid] = [], time.perf_counter()
            next_i += 1
        engine.step()
        done.extend(r for r in engine.pop_finished())
    wall = time.perf_counter() - t0
    ttft, tpot, e2e, n_tokens = [], [], [], 0
    for req in done:
        ts = times[req.request_id]
        n_tokens += len(ts)
        if not ts:
            continue
        ttft.append(ts[0] - submitted[req.request_id])
        e2e.append(ts[-1] - submitted[req.request_id])
        if len(ts) > 1:
            tpot.append((ts[-1] - ts[0]) / (len(ts) - 1))
    return {"requests": requests, "concurrency": concurrency, "max_new_tokens": max_new_tokens,
            "ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e, "tokens_per_s": n_tokens / wall if wall > 0 else None}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_benchmarks(float_dir: str | Path, final_dir: str | Path, quantized: bool, cfg: EvalStage,
                   cache_dir: str | Path) -> dict:
    """`llmkit eval` results ({"final": ..., "float": ...}, each as `run_eval` returns it) of `cfg.tasks` on the
    final model and, when it is quantized, on the floating-point one. Per-example results are cached in
    `cache_dir`, so a resumed or repeated eval stage only scores what is new."""
    from llmkit.eval.harness import EvalConfig, run_eval

    def one(model_dir) -> dict:
        return run_eval(EvalConfig(model=str(model_dir), tasks=",".join(cfg.tasks), shots=cfg.shots, limit=cfg.limit,
                                   chat_template=cfg.chat_template, max_new_tokens=cfg.task_max_new_tokens,
                                   cache_dir=str(cache_dir), device="cpu"))

    out = {"final": one(final_dir)}
    if quantized:
        out["float"] = one(float_dir)
    return out


def evaluate_models(float_dir: str | Path, final_dir: str | Path, tokens_dir: str | Path | None,
                    sft_results: str | Path | None, cfg: EvalStage, benchmark_cache: str | Path | None = None) -> dict:
    """The eval.json of the pipeline (format in `llmkit.pipeline.report`): `float_dir` is the model before
    quantization, `final_dir` the one that is registered (the same dir when quantization is off).
    benchmark_cache: where `cfg.tasks`' per-example results are kept (default: <final_dir>/../eval_cache)."""
    from llmkit.finetune.answer_metrics import exact_match, rouge_l
    from llmkit.infer.load import load_for_inference
    from llmkit.infer.quantize import is_quantized_dir, linear_weight_bytes

    float_model, tok, template = load_for_inference(float_dir, device="cpu")
    quantized = Path(final_dir) != Path(float_dir) and is_quantized_dir(final_dir)
    final_model, _, _ = load_for_inference(final_dir, device="cpu") if quantized else (float_model, None, None)
    report: dict = {"float_model": str(float_dir), "final_model": str(final_dir), "quantized": quantized}

    if tokens_dir is not None:
        ppl_f, n = heldout_perplexity(float_model, tokens_dir, cfg.perplexity_tokens)
        ppl = {"fp32": ppl_f, "tokens": n}
        if quantized:
            ppl["int8"], _ = heldout_perplexity(final_model, tokens_dir, cfg.perplexity_tokens)
            ppl["delta_rel"] = ppl["int8"] / ppl_f - 1
        report["perplexity"] = ppl
    sizes = {"fp32_linear": linear_weight_bytes(float_model)["total"], "fp32_dir": _dir_bytes(Path(float_dir))}
    if quantized:
        q = linear_weight_bytes(final_model)
        sizes.update({"int8_linear": q["total"], "int8_dir": _dir_bytes(Path(final_dir))})
    report["size_bytes"] = sizes

    if sft_results is not None and template is not None:
        held = json.loads(Path(sft_results).read_text(encoding="utf-8")).get("answers", [])
        prompts, refs = [a["prompt"] for a in held], [a["reference"] for a in held]
        if prompts:
            fp = answers(float_model, tok, template, prompts, cfg.max_new_tokens)
            ft = {"n": len(prompts), "exact_match": float(np.mean([exact_match(p, r) for p, r in zip(fp, refs)])),
                  "rouge_l": float(np.mean([rouge_l(p, r) for p, r in zip(fp, refs)]))}
            if quantized:
                q8 = answers(final_model, tok, template, prompts, cfg.max_new_tokens)
                ft["int8_exact_match"] = float(np.mean([exact_match(p, r) for p, r in zip(q8, refs)]))
                ft["int8_rouge_l"] = float(np.mean([rouge_l(p, r) for p, r in zip(q8, refs)]))
            report["finetune"] = ft

    if cfg.tasks:
        cache = Path(benchmark_cache) if benchmark_cache is not None else Path(final_dir).parent / "eval_cache"
        report["benchmarks"] = run_benchmarks(float_dir, final_dir, quantized, cfg, cache)

    prompts = [i["prompt"] for i in cfg.instructions]
    if prompts:
        said = answers(final_model, tok, template, prompts, cfg.max_new_tokens, sampling=cfg)
        report["instructions"] = [{"lang": i.get("lang", ""), "prompt": i["prompt"], "answer": a}
                                  for i, a in zip(cfg.instructions, said)]
        report["latency"] = load_run(final_model, tok, template, prompts, cfg.load_requests, cfg.load_concurrency,
                                     cfg.max_new_tokens, sampling=cfg)
        report["sampling"] = {"temperature": cfg.temperature, "top_p": cfg.top_p,
                              "repetition_penalty": cfg.repetition_penalty, "seed": cfg.seed}
    return report
