"""A whole pipeline recipe small enough for tests: real stages, tiny sizes (shared by the pipeline tests)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import shared_file


def write_tiny_recipe(root: Path, name: str = "tiny", **extra: str) -> Path:
    """Write corpus files, the stage configs and the pipeline YAML under `root`; returns the pipeline YAML."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    web = shared_file("en/c4_demo.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    (corpus / "web.jsonl").write_text("\n".join(web) + "\n", encoding="utf-8")
    en = json.loads(shared_file("instruct/alpaca_en_demo.json").read_text(encoding="utf-8"))[:120]
    zh = json.loads(shared_file("instruct/alpaca_zh_demo.json").read_text(encoding="utf-8"))[:120]
    (corpus / "en.json").write_text(json.dumps(en, ensure_ascii=False), encoding="utf-8")
    (corpus / "zh.json").write_text(json.dumps(zh, ensure_ascii=False), encoding="utf-8")
    (root / "data.yaml").write_text(f"""
sources:
  - {{name: web, path: {corpus / 'web.jsonl'}, domain: web}}
  - {{name: en, path: {corpus / 'en.json'}, domain: instructions, text: [instruction, input, output], skip: [quality]}}
  - {{name: zh, path: {corpus / 'zh.json'}, domain: instructions, text: [instruction, input, output], skip: [quality]}}
perplexity: {{enabled: false}}
mix: {{enabled: false}}
executor: {{workers: 1, progress: false}}
""", encoding="utf-8")
    (root / "pretrain.yaml").write_text("""
model: {family: decoder, block_size: 64, n_layer: 2, d_model: 32, n_head: 2, activation: swiglu, norm: rmsnorm,
        positions: rope}
train: {batch_size: 4, max_steps: 30, warmup_steps: 3, eval_interval: 10, eval_batches: 2, log_interval: 5,
        checkpoint_interval: 10, progress: false}
""", encoding="utf-8")
    (root / "sft.yaml").write_text(f"""
task: sft
method: lora
lora: {{r: 4, alpha: 8, targets: [q_proj, v_proj], trainable_tokens: ['<|assistant|>', '<|end|>']}}
data: {{paths: [{corpus / 'en.json'}, {corpus / 'zh.json'}], mix_pretrain: 0.15, max_len: 64}}
train: {{batch_size: 4, max_steps: 12, warmup_steps: 2, eval_interval: 6, checkpoint_interval: 4, log_interval: 2,
        progress: false}}
eval: {{answers: 4, samples: 1, max_new_tokens: 8}}
""", encoding="utf-8")
    (root / "preference.yaml").write_text(f"""
task: preference
method: lora
lora: {{r: 4, alpha: 8, targets: [q_proj, v_proj]}}
loss: dpo
beta: 0.1
reference_cache: {root / 'reference_cache'}
data: {{construct_from: [{corpus / 'en.json'}, {corpus / 'zh.json'}], max_len: 64, eval_fraction: 0.1, eval_max: 16}}
train: {{batch_size: 4, max_steps: 6, warmup_steps: 1, eval_interval: 6, checkpoint_interval: 3, log_interval: 2,
        progress: false}}
""", encoding="utf-8")
    lines = {
        "name": name, "out_dir": str(root / "runs" / name),
        "samples.enabled": "false",
        "data.config": str(root / "data.yaml"),
        "tokenizer.vocab_size": "320",
        "pretrain.config": str(root / "pretrain.yaml"),
        "sft.config": str(root / "sft.yaml"),
        "eval.perplexity_tokens": "2000", "eval.load_requests": "4", "eval.load_concurrency": "2",
        "eval.max_new_tokens": "8",
        "register.aliases": "[candidate, production]",
        "track.uri": f"sqlite:///{root / 'runs' / 'mlflow.db'}",
        **extra,
    }
    text = "".join(f"{k}: {v}\n" for k, v in lines.items() if "." not in k)
    sections: dict[str, list[str]] = {}
    for k, v in lines.items():
        if "." in k:
            sec, key = k.split(".", 1)
            sections.setdefault(sec, []).append(f"  {key}: {v}\n")
    text += "".join(f"{sec}:\n" + "".join(items) for sec, items in sections.items())
    path = root / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path
