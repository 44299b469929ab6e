"""Load what inference needs from plain directories: model, tokenizer, chat template, optional adapter."""

from __future__ import annotations

from pathlib import Path

import torch


def load_for_inference(model_dir: str | Path, adapter: str | Path | None = None,
                       device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, chat template or None) of a model dir, with an adapter applied.

    The adapter dir (LoRA or prefix, PEFT layout) may carry its own tokenizer.json and chat template
    (an instruction-tuned adapter does); otherwise the model dir's are used. The template is None when
    neither has one: the model continues raw text. A dir written by `llmkit quantize` loads with its
    int8 layers. On CPU the Linear weights are stored column-major (`llmkit.infer.layout`): faster decoding.
    """
    from llmkit.chat import has_chat_template, load_chat_template
    from llmkit.infer.layout import column_major_linears
    from llmkit.infer.quantize import is_quantized_dir, load_quantized
    from llmkit.models.adapters import load_adapter
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    model = load_quantized(model_dir, device) if is_quantized_dir(model_dir) else load_model(model_dir, device)
    dirs = [Path(model_dir)]
    if adapter is not None:
        model = load_adapter(model, adapter).to(device).eval()
        dirs.insert(0, Path(adapter))
    if torch.device(device).type == "cpu":
        column_major_linears(model)
    tokenizer = Tokenizer.load(next((d for d in dirs if (d / "tokenizer.json").is_file()), Path(model_dir)))
    template_dir = next((d for d in dirs if has_chat_template(d)), None)
    return model, tokenizer, load_chat_template(template_dir) if template_dir is not None else None
