"""A GGUF file's Q4_0 / Q8_0 weights loaded as they are: `load_gguf_quantized` (`llmkit import gguf --keep-quantized`).

Each Q4_0 / Q8_0 Linear weight becomes a `WeightOnlyLinear` (INT4 / INT8, group 32) holding the file's own codes
and scales (`WeightOnlyLinear.from_gguf_blocks`), so the model computes with exactly the weights llama.cpp
does; everything else is dequantized to fp32 as `llmkit.models.gguf.import_gguf` does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from llmkit.infer.quantize import save_quantized
from llmkit.infer.weight_only import GGUF_Q4_0, GGUF_Q8_0, WeightOnlyLinear

# HF tensor names (after "model.layers.N.") -> the llmkit Linear (after "blocks.N.") that holds their rows, in
# row order; q, k and v are one fused Linear in llmkit
_LAYER_LINEARS = {
    "attn.qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.proj": ("self_attn.o_proj.weight",),
    "mlp.gate": ("mlp.gate_proj.weight",), "mlp.up": ("mlp.up_proj.weight",), "mlp.down": ("mlp.down_proj.weight",),
}


def load_gguf_quantized(path, out_dir=None) -> nn.Module:
    """A GGUF file as an llmkit `Decoder` whose Q4_0 / Q8_0 Linear weights load as `WeightOnlyLinear` (INT4 /
    INT8, group 32) with the file's own codes and scales: no dequantize / requantize round trip, so the
    model computes with exactly the weights llama.cpp does. Other tensors (norms, F32 / F16 / k-quant
    weights, a Linear whose q/k/v parts differ in type) are dequantized to fp32 as `import_gguf` does; the
    token embedding is dequantized for lookups and, when the head is tied to it, the head keeps its codes.
    Returns the model in eval mode; with `out_dir`, also writes it there as a quantized model directory
    (`llmkit.infer.quantize.save_quantized` + the file's tokenizer, chat template and generation config).
    """
    from gguf.quants import dequantize

    from llmkit.models.gguf import read_gguf
    from llmkit.models.hf import decoder_from_hf

    meta, hf, weights, raw = read_gguf(path, frozenset({GGUF_Q4_0, GGUF_Q8_0}))
    plan: dict[str, tuple[str, ...]] = {}  # llmkit Linear path -> HF names of its rows, all raw, one type
    for i in range(hf["num_hidden_layers"]):
        for linear, parts in _LAYER_LINEARS.items():
            names = tuple(f"model.layers.{i}.{p}" for p in parts)
            if all(n in raw for n in names) and len({raw[n][1] for n in names}) == 1:
                plan[f"blocks.{i}.{linear}"] = names
    head = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    if head in raw:
        plan["lm_head"] = (head,)
    used = {n for names in plan.values() for n in names}
    for name, (blocks, qtype) in raw.items():  # what stays fp32: dequantize it here
        if name not in used or name == "model.embed_tokens.weight":
            weights[name] = torch.from_numpy(np.asarray(dequantize(blocks, qtype), dtype=np.float32)
                                             .reshape(weights[name].shape))
    model = decoder_from_hf(hf, weights)
    for path_, names in plan.items():
        linear = model.get_submodule(path_)
        blocks = np.concatenate([raw[n][0] for n in names], axis=0)
        layer = WeightOnlyLinear.from_gguf_blocks(blocks, raw[names[0]][1], linear.out_features,
                                                  linear.in_features, linear.bias)
        parent, _, child = path_.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    model.eval()
    if out_dir is not None:
        from llmkit.models.gguf import write_model_dir

        write_model_dir(meta, model, out_dir, save_quantized)
    return model
