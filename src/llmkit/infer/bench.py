"""`llmkit bench generate`: decoding throughput of a model dir through the `Engine`, per batch size.

For each batch size B the engine generates `new_tokens` greedy tokens (EOS ignored) for B random prompts
of `prompt_len` tokens, all submitted together. Reported per batch: new tokens/s over the whole run,
time to first token (the batched prefill), decode tokens/s and time per output token after it. At the
smallest batch the decode rate is also given as weight bytes read per second, next to this machine's
measured streaming-read bandwidth: one decode step reads every weight once, so bandwidth / weight bytes
is the ceiling of batch-1 decoding. With `reference="hf"` the same weights run through Hugging Face
`generate` on the same prompts in the same process (exported with `llmkit.models.hf.export_hf`), and
the ratio and the number of identical greedy sequences are printed beside each batch.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence

import torch

from llmkit.infer.engine import Engine, RequestParams


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """n prompts of `length` token ids drawn uniformly from [0, vocab) with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def measure_read_bandwidth(megabytes: int = 256, reps: int = 8) -> float:
    """Streaming-read bandwidth of this machine in bytes/s: sums a `megabytes` fp32 buffer `reps` times
    (the buffer should exceed the last-level cache, or this measures the cache)."""
    buf = torch.ones(megabytes * 2**20 // 4)
    float(buf.sum())
    t = time.perf_counter()
    for _ in range(reps):
        float(buf.sum())
    return reps * buf.numel() * 4 / (time.perf_counter() - t)


def measure_matmul_flops(m: int = 1024, k: int = 1024, n: int = 4096, reps: int = 5) -> float:
    """fp32 GEMM throughput of this machine in FLOP/s on an (m, k) @ (k, n) product (best of `reps`)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def generation_flops(model: torch.nn.Module, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Forward FLOPs of prefilling `batch` prompts of `prompt_len` tokens and decoding `new_tokens` more:
    2N per token for the weights (N = parameters without position embeddings) plus 4 * n_layer * d_model per
    token and attended key (scores and values)."""
    c = model.config
    n = model.num_params()
    per_layer_key = 4 * c.n_layer * c.d_model
    prefill = prompt_len * 2 * n + per_layer_key * prompt_len * (prompt_len + 1) / 2
    decode = sum(2 * n + per_layer_key * (prompt_len + i + 1) for i in range(new_tokens - 1))
    return batch * (prefill + decode)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers a forward pass reads (tied tensors counted once, int8 as 1 byte)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or not t.is_floating_point() and t.dtype != torch.int8:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _engine_run(engine: Engine, prompts: list[list[int]], params: RequestParams) -> tuple[list[list[int]], float,
                                                                                          float]:
    """(outputs, seconds to the first token of every request, seconds after that to the end)."""
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    reqs = [engine.requests[i] for i in ids]
    while not all(r.output or r.finished for r in reqs):
        engine.step()
    t1 = time.perf_counter()
    engine.run()
    t2 = time.perf_counter()
    return [engine.requests.pop(i).output for i in ids], t1 - t0, t2 - t1


def _hf_reference(model):
    """The same weights as a transformers model, or (None, reason)."""
    try:
        from transformers import AutoModelForCausalLM

        from llmkit.models.hf import export_hf
    except ImportError as e:
        return None, f"transformers is not installed ({e})"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_hf(model, tmp)
        except (ValueError, TypeError, NotImplementedError) as e:
            return None, f"this model does not export to Hugging Face: {e}"
        return AutoModelForCausalLM.from_pretrained(tmp).eval(), None


@torch.no_grad()
def bench_generate(model: torch.nn.Module, batches: Sequence[int] = (1, 8, 32), prompt_len: int = 128,
                   new_tokens: int = 128, reference: str | None = None, seed: int = 0) -> dict:
    """Measure `Engine` decoding on `model` (an llmkit `Decoder`, fp32/bf16 or INT8) and return a JSON-able dict.

    batches: batch sizes, each run once after a short warm-up; prompt_len + new_tokens must fit the model's
    block_size. reference: None or "hf" (Hugging Face `generate` on the same weights and prompts; skipped
    with the reason in the result when the model cannot be exported, e.g. INT8 dirs).
    """
    cfg = model.config
    if prompt_len + new_tokens > cfg.block_size:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's context "
                         f"(block_size {cfg.block_size}); lower --prompt-len or --new-tokens")
    if not batches or min(batches) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batches)}")
    hf, why_not = _hf_reference(model) if reference == "hf" else (None, None)
    if reference not in (None, "hf"):
        raise ValueError(f"reference must be 'hf' or None, got {reference!r}")
    engine = Engine(model, max_batch=max(batches), max_len=prompt_len + new_tokens, prefix_cache_tokens=0)
    greedy = RequestParams(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
    V = cfg.vocab_size
    warm = random_prompts(2, 16, V, seed + 99)
    engine.generate(warm, RequestParams(max_new_tokens=4, temperature=0, stop_at_eos=False))
    if hf is not None:
        hf.generate(torch.tensor(warm), max_new_tokens=4, do_sample=False, pad_token_id=0)
    out: dict = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "prompt_len": prompt_len,
                 "new_tokens": new_tokens, "weight_MB": round(weight_bytes(model) / 1e6, 4), "batches": {}}
    if reference == "hf" and hf is None:
        out["reference_skipped"] = why_not
    for b in batches:
        prompts = random_prompts(b, prompt_len, V, seed + b)
        t = time.perf_counter()
        outs, ttft, decode = _engine_run(engine, prompts, greedy)
        total = time.perf_counter() - t
        row = {"tok_s": round(b * new_tokens / total, 1), "ttft_ms": round(1e3 * ttft, 1),
               "decode_tok_s": round(b * (new_tokens - 1) / decode, 1) if decode > 0 else None,
               "ms_per_output_token": round(1e3 * decode / max(new_tokens - 1, 1), 2)}
        if hf is not None:
            ids = torch.tensor(prompts)
            t = time.perf_counter()
            res = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            t_hf = time.perf_counter() - t
            ref = res[:, ids.shape[1]:].tolist()
            row.update({"hf_tok_s": round(b * new_tokens / t_hf, 1), "ratio_vs_hf": round(t_hf / total, 2),
                        "identical_sequences": f"{sum(a == r for a, r in zip(outs, ref))}/{b}"})
        out["batches"][str(b)] = row
    peak = measure_matmul_flops()
    out["fp32_gemm_GFLOP_s"] = round(peak / 1e9, 1)
    for b in batches:  # at large batches decoding is bound by compute: what the measured GEMM rate allows
        row = out["batches"][str(b)]
        row["compute_ceiling_fp32_tok_s"] = round(b * new_tokens * peak / generation_flops(model, b, prompt_len,
                                                                                          new_tokens), 1)
    b1 = out["batches"][str(min(batches))]
    if min(batches) == 1 and b1["decode_tok_s"]:
        bw = measure_read_bandwidth()
        wb = weight_bytes(model)
        out["batch1_memory"] = {"measured_read_GB_s": round(bw / 1e9, 1),
                                "weight_read_GB_s": round(b1["decode_tok_s"] * wb / 1e9, 4),
                                "share_of_bandwidth": round(b1["decode_tok_s"] * wb / bw, 3),
                                "ceiling_tok_s": round(bw / wb, 1)}
    return out
