"""llmkit `Engine` vs Hugging Face `generate` on the same weights; continuous batching; prefix-cache TTFT.

    python benchmarks/engine_vs_hf.py                # prints one JSON object (~6-8 minutes on 2 CPU cores)
    python benchmarks/engine_vs_hf.py --rounds 5     # more rounds per batch (default 3)
    python benchmarks/engine_vs_hf.py --quick        # smaller model/sizes, for a smoke run

A randomly initialised GPT-2-small shape (d 768, 12 layers, 12 heads, vocab 50257, block 1024, fp32) is
exported with `llmkit.models.hf.export_hf` and loaded with `AutoModelForCausalLM`, so both sides hold the
same weights. Measured in one process:
* `generate`: greedy, 128-token random prompts, 64 new tokens, batch 1 / 8 / 32: HF `generate` vs
  `Engine.generate` (new tokens/s, including prefill), their ratio, and whether the greedy tokens agree.
  Each batch runs --rounds rounds (>= 3) with the order alternating (round 0 engine first, round 1 HF
  first, ...); every round is reported, and the headline figures are medians over the rounds (the ratio is
  the median of the per-round ratios). The INT8 engine and the row-major engine get the same rounds;
* output head at batch 1: `F.linear` of one token through the model's (50257 x 768) head weight (a random
  one of that shape under --quick) stored
  row-major (nn.Linear's layout) vs column-major (the engine's), median ms of 50 calls per round, the two
  layouts alternating first per round;
* continuous batching: 16 requests (prompts of 32..128 tokens, 32 new tokens each) submitted together
  vs one at a time through the same engine: total new tokens/s;
* prefix cache: time to first token for a 512-token shared prefix + 16 fresh tokens, warm (prefix
  blocks cached) vs cold (median of 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

FULL = dict(vocab_size=50257, block_size=1024, n_layer=12, d_model=768, n_head=12, activation="gelu_tanh",
            bias=True)
QUICK = dict(FULL, n_layer=4, d_model=256, n_head=4)


@torch.no_grad()
def main() -> None:
    from transformers import AutoModelForCausalLM

    from llmkit.infer.bench import generation_flops, measure_matmul_flops, measure_read_bandwidth
    from llmkit.infer.bench import random_prompts as rand_prompts
    from llmkit.infer.engine import Engine, RequestParams
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.hf import export_hf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, d 256, batches 1/8 only")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per batch, order alternating (>= 3)")
    args = ap.parse_args()
    if args.rounds < 3:
        sys.exit("--rounds must be >= 3")
    quick, rounds = args.quick, args.rounds
    cfg = QUICK if quick else FULL
    batches = (1, 8) if quick else (1, 8, 32)
    prompt_len, new = 128, 64
    V = cfg["vocab_size"]
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**cfg)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp).eval()
    greedy = RequestParams(max_new_tokens=new, temperature=0, stop_at_eos=False)
    t_start = time.perf_counter()
    out: dict = {"model": {k: cfg[k] for k in ("n_layer", "d_model", "n_head", "vocab_size")},
                 "params_M": round(model.num_params() / 1e6, 1), "threads": torch.get_num_threads(),
                 "prompt_len": prompt_len, "new_tokens": new, "generate": {}}

    def hf_generate(prompts):
        ids = torch.tensor(prompts)
        res = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
        return res[:, ids.shape[1]:].tolist()

    import copy

    # the same weights left row-major (nn.Linear's own layout): what the column-major re-layout buys
    row_major = Engine(copy.deepcopy(model), max_batch=1, max_len=prompt_len + new, prefix_cache_tokens=0,
                       column_major=False)
    engine = Engine(model, max_batch=max(batches), max_len=prompt_len + new, prefix_cache_tokens=0)
    warm = rand_prompts(2, 16, V, 99)
    row_major.generate(warm[:1], RequestParams(max_new_tokens=4, temperature=0, stop_at_eos=False))
    hf.generate(torch.tensor(warm), max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    engine.generate(warm, RequestParams(max_new_tokens=4, temperature=0, stop_at_eos=False))
    def timed(fn) -> tuple[float, list]:
        t = time.perf_counter()
        res = fn()
        return time.perf_counter() - t, res

    for b in batches:
        prompts = rand_prompts(b, prompt_len, V, b)
        per_round = []
        for r in range(rounds):
            order = ["hf", "engine"] if r % 2 else ["engine", "hf"]
            if b == 1:
                order.append("engine_row_major")
            sec, res = {}, {}
            for who in order:
                fn = {"hf": lambda p=prompts: hf_generate(p), "engine": lambda p=prompts: engine.generate(p, greedy),
                      "engine_row_major": lambda p=prompts: row_major.generate(p, greedy)}[who]
                sec[who], res[who] = timed(fn)
            same = sum(a == h for a, h in zip(res["engine"], res["hf"]))
            row = {"order": "/".join(order), "hf_tok_s": round(b * new / sec["hf"], 1),
                   "engine_tok_s": round(b * new / sec["engine"], 1), "ratio": round(sec["hf"] / sec["engine"], 3),
                   "identical_sequences": f"{same}/{b}"}
            if b == 1:
                row["engine_row_major_tok_s"] = round(new / sec["engine_row_major"], 1)
                row["column_major_speedup"] = round(sec["engine_row_major"] / sec["engine"], 3)
            per_round.append(row)

        def med(key, per_round=per_round):
            return round(statistics.median(x[key] for x in per_round), 2)

        out["generate"][f"batch_{b}"] = {
            "hf_tok_s": med("hf_tok_s"), "engine_tok_s": med("engine_tok_s"), "ratio": med("ratio"),
            "ratio_range": [min(x["ratio"] for x in per_round), max(x["ratio"] for x in per_round)],
            "identical_sequences": per_round[0]["identical_sequences"]
            if len({x["identical_sequences"] for x in per_round}) == 1 else [x["identical_sequences"] for x in per_round],
            "rounds": per_round}
        if b == 1:
            out["generate"]["batch_1"].update({"engine_row_major_tok_s": med("engine_row_major_tok_s"),
                                               "column_major_speedup": med("column_major_speedup")})

    # the output head alone at batch 1: one token through the (vocab x d) weight, row- vs column-major
    # (vocab, d) in nn.Linear's layout; under --quick a random head of the full GPT-2-small shape, so this
    # figure is always for the (50257 x 768) head
    w_row = (torch.randn(FULL["vocab_size"], FULL["d_model"]) if quick
             else model.lm_head.weight.detach().contiguous())
    w_col = w_row.t().contiguous().t()
    x1 = torch.randn(1, w_row.shape[1])
    head = {"row_major": [], "column_major": []}

    def head_ms(w) -> float:
        for _ in range(5):
            torch.nn.functional.linear(x1, w)
        times = []
        for _ in range(50):
            t = time.perf_counter()
            torch.nn.functional.linear(x1, w)
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    for r in range(rounds):
        for name in (["row_major", "column_major"] if r % 2 == 0 else ["column_major", "row_major"]):
            head[name].append(round(head_ms(w_row if name == "row_major" else w_col), 3))
    out["output_head_batch1"] = {
        "shape": list(w_row.shape), "row_major_ms": round(statistics.median(head["row_major"]), 2),
        "column_major_ms": round(statistics.median(head["column_major"]), 2),
        "speedup": round(statistics.median(head["row_major"]) / statistics.median(head["column_major"]), 2),
        "rounds_ms": head}

    # batch 1 against the memory wall: every decoded token reads every weight once
    bandwidth = measure_read_bandwidth()  # 256 MB of fp32, far beyond the caches
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    b1 = out["generate"][f"batch_{batches[0]}"]
    out["batch1_bandwidth"] = {
        "measured_read_GB_s": round(bandwidth / 1e9, 1), "weight_MB": round(weight_bytes / 1e6, 1),
        "ceiling_tok_s": round(bandwidth / weight_bytes, 1),
        "engine_weight_GB_s": round(b1["engine_tok_s"] * weight_bytes / 1e9, 1),
        "hf_weight_GB_s": round(b1["hf_tok_s"] * weight_bytes / 1e9, 1)}

    # large batches against the compute wall: prefill + decode FLOPs at the measured fp32 GEMM rate
    peak = measure_matmul_flops()
    out["compute_ceiling"] = {"fp32_gemm_GFLOP_s": round(peak / 1e9, 1)}
    for b in batches:
        ceiling = b * new * peak / generation_flops(model, b, prompt_len, new)
        row = out["generate"][f"batch_{b}"]
        out["compute_ceiling"][f"batch_{b}"] = {
            "ceiling_tok_s": round(ceiling, 1), "engine_share": round(row["engine_tok_s"] / ceiling, 2),
            "hf_share": round(row["hf_tok_s"] / ceiling, 2),
            "ceiling_over_hf": round(ceiling / row["hf_tok_s"], 2)}

    # the same engine on INT8 weights (dynamic activations, the output head included) against HF's fp32
    from llmkit.infer.quantize import QuantConfig, quantize_model

    qcfg = QuantConfig(mode="dynamic")
    qcfg.targets = [*qcfg.targets, "lm_head"]
    int8 = quantize_model(copy.deepcopy(model), qcfg)
    engine8 = Engine(int8, max_batch=max(batches), max_len=prompt_len + new, prefix_cache_tokens=0)
    engine8.generate(warm, RequestParams(max_new_tokens=4, temperature=0, stop_at_eos=False))
    out["generate_int8"] = {}
    for b in (batches[0], batches[-1]):
        prompts = rand_prompts(b, prompt_len, V, b)
        tok_s = []
        for _ in range(rounds):
            t_ours, _ = timed(lambda p=prompts: engine8.generate(p, greedy))
            tok_s.append(round(b * new / t_ours, 1))
        fp32 = out["generate"][f"batch_{b}"]
        med8 = statistics.median(tok_s)
        out["generate_int8"][f"batch_{b}"] = {
            "engine_int8_tok_s": round(med8, 1), "rounds_tok_s": tok_s, "hf_fp32_tok_s": fp32["hf_tok_s"],
            "ratio_vs_hf_fp32": round(med8 / fp32["hf_tok_s"], 2),
            "ratio_vs_engine_fp32": round(med8 / fp32["engine_tok_s"], 2),
            "note": "medians of separate rounds (INT8 rounds run after the fp32 ones)"}

    # continuous batching: 16 concurrent requests vs one at a time
    n_req, cb_new = 16, 32
    g = torch.Generator().manual_seed(7)
    lens = torch.randint(32, 129, (n_req,), generator=g).tolist()
    reqs = [rand_prompts(1, n, V, 100 + i)[0] for i, n in enumerate(lens)]
    cb = RequestParams(max_new_tokens=cb_new, temperature=0, stop_at_eos=False)
    eng16 = Engine(model, max_batch=n_req, max_len=128 + cb_new, prefix_cache_tokens=0)
    t = time.perf_counter()
    seq = [eng16.generate([p], cb)[0] for p in reqs]
    t_seq = time.perf_counter() - t
    t = time.perf_counter()
    conc = eng16.generate(reqs, cb)
    t_conc = time.perf_counter() - t
    out["continuous_batching"] = {
        "requests": n_req, "prompt_lens": f"{min(lens)}..{max(lens)}", "new_tokens_each": cb_new,
        "one_at_a_time_tok_s": round(n_req * cb_new / t_seq, 1),
        "concurrent_tok_s": round(n_req * cb_new / t_conc, 1), "speedup": round(t_seq / t_conc, 2),
        "same_tokens": seq == conc}

    # prefix cache: time to first token, warm 512-token shared prefix vs cold
    shared = rand_prompts(1, 512, V, 500)[0]
    suffixes = rand_prompts(4, 16, V, 501)
    one = RequestParams(max_new_tokens=1, temperature=0, stop_at_eos=False)
    pfx = Engine(model, max_batch=1, max_len=600, prefix_cache_tokens=1024, prefix_block=16)

    def ttft(prompt) -> tuple[float, int]:
        t = time.perf_counter()
        rid = pfx.add_request(prompt, one)
        while not pfx.requests[rid].output:
            pfx.step()
        dt = time.perf_counter() - t
        pfx.run()
        return dt, pfx.requests.pop(rid).output[0]

    cold, warm_t = [], []
    for s in suffixes[:3]:
        pfx.prefix_cache.clear()
        cold.append(ttft(shared + s)[0])
    pfx.prefix_cache.clear()
    ttft(shared + suffixes[3])  # fills the cache with the shared prefix
    before = pfx.prefill_tokens
    for s in suffixes[:3]:
        dt_warm, tok = ttft(shared + s)
        warm_t.append(dt_warm)
    warm_prefill = (pfx.prefill_tokens - before) / 3
    pfx.prefix_cache.clear()
    agree = ttft(shared + suffixes[2])[1] == tok
    st = pfx.stats()
    out["prefix_cache"] = {
        "prefix_tokens": 512, "suffix_tokens": 16, "ttft_cold_ms": round(1e3 * statistics.median(cold), 1),
        "ttft_warm_ms": round(1e3 * statistics.median(warm_t), 1),
        "speedup": round(statistics.median(cold) / statistics.median(warm_t), 2),
        "prefill_tokens_per_warm_request": warm_prefill,
        "block_hits": st["prefix_hits"], "block_misses": st["prefix_misses"], "same_first_token": agree}
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    out["rounds"] = rounds
    if quick:
        out["note"] = "--quick: 4 layers, d 256, batches 1/8 only"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
