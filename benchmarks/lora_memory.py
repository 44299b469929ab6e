"""Peak memory and step time of LoRA fine-tuning a 0.5B model on CPU.

A Qwen2.5-0.5B-shaped model (its published config: hidden 896, 24 layers, 14 heads / 2 kv heads,
intermediate 4864, vocab 151936, tied embeddings, q/k/v biases; random weights, which cost the same memory)
is written with transformers' save_pretrained together with a small byte-level BPE tokenizer and a ChatML
template, imported with `llmkit.models.hf.import_hf`, and fine-tuned with LoRA through `llmkit finetune`'s
own path (`finetune_sft`) on the alpaca demo set. The embedding has 151936 rows and the tokenizer far fewer:
a padded vocabulary, as Qwen2.5 itself has (151936 rows, 151665 tokens).

Model building runs in a child process, so the figure is that of the fine-tuning process alone: peak RSS
(VmHWM of /proc/self/status, and ru_maxrss) and the wall time per optimizer step, as JSON.

    nice -n 10 .venv/bin/python benchmarks/lora_memory.py --steps 4 --batch 2 --max-len 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
                  bos_token_id=151643, eos_token_id=151645, sliding_window=32768, max_window_layers=21,
                  use_sliding_window=False)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build(hf_dir: Path, out_dir: Path, data: list[str]) -> None:
    """Child process: the HF directory (random weights, tokenizer, template) and its llmkit import."""
    import torch
    import transformers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from llmkit.models.hf import import_hf
    from llmkit.tokenizer import iter_texts

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [t for p in data for t in iter_texts(p)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    # the tokenizer's own special ids (Qwen2.5's 151643 / 151645 are padding rows here)
    ids = dict(bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=tok.token_to_id("<|im_end|>"))
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**QWEN25_05B, **ids}))
    model.save_pretrained(hf_dir)
    del model
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": CHATML, "clean_up_tokenization_spaces": False}))
    import_hf(hf_dir, out_dir)


class PeakSampler(threading.Thread):
    """VmHWM / VmRSS of this process every 50 ms (VmHWM is the kernel's own high-water mark)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kb = 0
        self.stop = threading.Event()

    @staticmethod
    def read() -> dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0])
        return out

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak_kb = max(self.peak_kb, self.read().get("VmHWM", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--data", nargs="+", default=[str(ROOT / "data/samples/instruct/alpaca_en_demo.json")])
    ap.add_argument("--workdir", default=None, help="keep the model dirs here (default: a temp dir)")
    ap.add_argument("--build-only", nargs=2, metavar=("HF_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build(Path(args.build_only[0]), Path(args.build_only[1]), args.data)
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        hf_dir, model_dir = tmp / "hf", tmp / "qwen"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build-only", str(hf_dir), str(model_dir),
                        "--data", *args.data], check=True)
        build_s = time.perf_counter() - t0

        import torch

        from llmkit.finetune.sft import SFTConfig, finetune_sft
        from llmkit.models.lora import LoRAConfig

        sampler = PeakSampler()
        sampler.start()
        before = PeakSampler.read()
        cfg = SFTConfig(out_dir=str(tmp / "sft"), base_model=str(model_dir), method="lora",
                        lora=LoRAConfig(r=args.rank, alpha=2 * args.rank,
                                        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                 "up_proj", "down_proj"]))
        cfg.data.paths = list(args.data)
        cfg.data.max_len = args.max_len
        cfg.data.mix_pretrain = 0.0
        cfg.data.eval_max = 2
        cfg.train.batch_size = args.batch
        cfg.train.max_steps = args.steps
        cfg.train.warmup_steps = 1
        cfg.train.log_interval = 1
        cfg.train.eval_interval = 10 ** 6
        cfg.train.checkpoint_interval = 10 ** 6
        cfg.train.device = "cpu"
        cfg.train.precision = "fp32"
        cfg.train.progress = False
        cfg.eval.answers = 0
        cfg.eval.samples = 0
        cfg.eval.loss_batches = 1
        cfg.track.enabled = False
        t1 = time.perf_counter()
        res = finetune_sft(cfg)
        total_s = time.perf_counter() - t1
        sampler.stop.set()
        sampler.join()
        rows = [json.loads(line) for line in (tmp / "sft" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "step_time_s" in r]
        hwm_kb = max(sampler.peak_kb, PeakSampler.read()["VmHWM"])
        from llmkit.models.io import load_model

        n_params = sum(p.numel() for p in load_model(model_dir).parameters())
        result = {
            "model": "Qwen2.5-0.5B shape (random weights), imported with import_hf",
            "params": n_params, "method": f"lora r={args.rank}, q/k/v/o/gate/up/down", "precision": "fp32",
            "batch": args.batch, "max_len": args.max_len, "steps": args.steps, "batch_width": res["batch_width"],
            "peak_rss_gb": round(hwm_kb / 2 ** 20, 3),
            "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
            "rss_before_finetune_gb": round(before.get("VmRSS", 0) / 2 ** 20, 3),
            "finetune_wall_s": round(total_s, 1), "build_s": round(build_s, 1),
            "metrics": steps[-3:], "torch_threads": torch.get_num_threads(),
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
