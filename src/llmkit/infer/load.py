"""Load what inference needs from plain directories: model, tokenizer, chat template, optional adapter."""

from __future__ import annotations

from pathlib import Path

import torch


def load_for_inference(model_dir: str | Path, adapter: str | Path | None = None,
                       device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto"):
    """(model in eval mode, tokenizer, chat template or None) of a model dir, with an adapter applied.

    The adapter dir (LoRA or prefix, PEFT layout) may carry its own tokenizer.json and chat template
    (an instruction-tuned adapter does); otherwise the model dir's are used. The template is None when
    neither has one: the model continues raw text. The template is llmkit's (``chat_template.json``) or the
    model's own Jinja template (an imported model's ``tokenizer_config.json`` ``chat_template``). The tokenizer's
    `eos_ids` gather every end-of-sequence id the dirs declare (``generation_config.json``'s ``eos_token_id``
    may be a list, e.g. Llama 3's ``<|eot_id|>`` beside ``<|end_of_text|>``), so generation stops at any of
    them. A dir written by `llmkit quantize` loads with its
    int8 layers. On CPU the Linear weights are stored column-major (`llmkit.models.layout`): faster decoding.

    model_dir / adapter may be registry URIs (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/PATH),
    resolved in the tracking store of $MLFLOW_TRACKING_URI (`llmkit.registry`).
    device: "cpu", "cuda[:i]" or "auto" (a GPU when visible); dtype: "auto" (bf16/fp16 on GPU, fp32 on CPU),
    "fp32", "bf16" or "fp16" - decided in `llmkit.runtime`. INT8 dirs run on the CPU only.
    """
    from llmkit.chat import has_chat_template, load_chat_template
    from llmkit.infer.quantize import is_quantized_dir, load_quantized
    from llmkit.models.adapters import load_adapter
    from llmkit.models.io import load_generation_config, load_model
    from llmkit.models.layout import column_major_linears
    from llmkit.registry import resolve_model
    from llmkit.runtime import resolve_device, resolve_dtype
    from llmkit.tokenizer import Tokenizer

    model_dir = resolve_model(model_dir)
    adapter = resolve_model(adapter) if adapter is not None else None
    device = resolve_device(device)
    if is_quantized_dir(model_dir):
        if device.type != "cpu":
            raise ValueError(f"{model_dir} holds INT8 weights (llmkit quantize), which run on the CPU: use "
                             "--device cpu, or serve the fp32 model dir on the GPU in bf16/fp16")
        model = load_quantized(model_dir, device)
    else:
        model = load_model(model_dir, device).to(resolve_dtype(dtype, device))
    dirs = [Path(model_dir)]
    if adapter is not None:
        model = load_adapter(model, adapter).to(device).eval()
        if not is_quantized_dir(model_dir):
            model = model.to(resolve_dtype(dtype, device))
        dirs.insert(0, Path(adapter))
    if device.type == "cpu":
        column_major_linears(model)
    tokenizer = Tokenizer.load(next((d for d in dirs if (d / "tokenizer.json").is_file()), Path(model_dir)))
    for d in dirs:  # an adapter dir has no generation_config.json: the base model's eos list still applies
        eos = load_generation_config(d).get("eos_token_id")
        if eos is not None:
            tokenizer.add_eos_ids([i for i in ([eos] if isinstance(eos, int) else eos) if i < tokenizer.vocab_size])
    template_dir = next((d for d in dirs if has_chat_template(d)), None)
    return model, tokenizer, load_chat_template(template_dir) if template_dir is not None else None
