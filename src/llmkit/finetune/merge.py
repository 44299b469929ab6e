"""`llmkit merge`: fold a LoRA adapter into its base model, giving a plain model directory.

W' = W + (alpha / r) * B @ A for every adapted projection (Hu et al. 2021, §4.1), and per expert
W_e' = W_e + (alpha / r) * B_e @ A_e for a mixture-of-experts layer's expert adapters: the merged model has
the base's architecture and speed, and its logits equal the adapted model's. Prefix tuning adds keys and
values rather than changing weights, so a prefix adapter cannot be merged: load it with `--adapter`.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + LoRA adapter, merged, as a model dir (with the adapter's tokenizer and chat template)."""
    from llmkit.models.adapters import adapter_kind, load_adapter
    from llmkit.models.io import load_generation_config, load_model, save_model
    from llmkit.models.lora import merge_lora
    from llmkit.tokenizer import Tokenizer

    kind = adapter_kind(adapter_dir)
    if kind != "lora":
        raise ValueError(f"{adapter_dir}: a {kind} adapter cannot be merged into weights; "
                         "use it with `llmkit generate --adapter` instead")
    model = merge_lora(load_adapter(load_model(model_dir), adapter_dir))
    source = Path(adapter_dir) if (Path(adapter_dir) / "tokenizer.json").is_file() else Path(model_dir)
    out = save_model(model, out_dir, Tokenizer.load(source), generation_config=load_generation_config(model_dir))
    for name in ("chat_template.json", "tokenizer_config.json"):
        for d in (Path(adapter_dir), Path(model_dir)):
            if (d / name).is_file():
                shutil.copyfile(d / name, out / name)
                break
    return out
