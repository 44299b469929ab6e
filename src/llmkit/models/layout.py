"""Weight storage for fast decoding on CPU: Linear weights kept column-major.

`nn.Linear` stores its weight (out, in) row-major and computes x @ W.T. At batch 1 (one token per decode
step) that is a matrix-vector product, bound by how fast the weight streams from memory, and the CPU
BLAS reads the transposed operand less efficiently (the GPT-2 output head, 768 x 50257, timed both ways by
`benchmarks/engine_vs_hf.py`; figures in docs/engine.md). (in, out) is the layout of GPT-2's original
`Conv1D`, which is why Hugging Face's GPT-2 decodes faster than the same weights in `nn.Linear`.

`column_major_linears` keeps every Linear weight's shape, values and autograd identity of use (a
`Parameter` of shape (out, in)), but stores it with strides (1, out): `F.linear` then hands BLAS a
contiguous (in, out) matrix. Tied weights (the output head and the token embedding) stay one tensor.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def column_major_linears(model: nn.Module) -> int:
    """Re-store every `nn.Linear` weight of `model` column-major, in place; returns how many were changed.

    Values and shapes are unchanged (outputs equal up to float summation order); parameters shared with
    other modules (tied embeddings) are replaced everywhere by the same new parameter. Quantized layers
    (not `nn.Linear`) are left alone. Idempotent: weights already column-major are skipped.
    """
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        if id(w) in replaced or w.dim() != 2 or w.stride() == (1, w.size(0)):
            continue
        new = nn.Parameter(w.t().contiguous().t(), requires_grad=w.requires_grad)
        replaced[id(w)] = new
    if not replaced:
        return 0
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in replaced:
                module._parameters[name] = replaced[id(p)]
    return len(replaced)


@torch.no_grad()
def row_major(model: nn.Module) -> None:
    """Undo `column_major_linears`: make every parameter contiguous again (ties kept), in place."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.is_contiguous():
                continue
            if id(p) not in replaced:
                replaced[id(p)] = nn.Parameter(p.contiguous(), requires_grad=p.requires_grad)
            module._parameters[name] = replaced[id(p)]
