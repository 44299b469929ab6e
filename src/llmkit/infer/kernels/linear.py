"""fp32 Linear layers that decode through the CPU kernels: `KernelLinear` and `use_decode_kernels`.

A batch-1 decode step spends most of its time streaming Linear weights (docs/engine.md, the decode profile);
`KernelLinear` keeps the weight an ordinary (out, in) row-major `Parameter` (the same object, so tied
embeddings stay tied) and sends up to `kernels.MAX_ROWS` tokens through `kernels.linear_f32`; more tokens,
gradients or a non-CPU device take `F.linear` as before.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.infer import kernels


class KernelLinear(nn.Module):
    """Drop-in for an `nn.Linear` at inference: same `weight` / `bias` Parameters, made contiguous.

    forward(x: (..., in)) -> (..., out). Not an `nn.Linear` subclass on purpose: quantization and adapters
    select `nn.Linear` layers, and are applied before the model is handed to a decoding engine.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // self.in_features
        if (rows <= kernels.MAX_ROWS and x.dtype == torch.float32 and w.dtype == torch.float32
                and x.device.type == "cpu" and w.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            y = kernels.linear_f32(x.reshape(rows, self.in_features), w)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)


@torch.no_grad()
def use_decode_kernels(model: nn.Module) -> int:
    """Replace every fp32 `nn.Linear` of `model` by a `KernelLinear`, in place; returns how many.

    Weights stored column-major (`llmkit.models.layout.column_major_linears`) are made row-major again, ties
    kept. Nothing changes (returns 0) when the kernels are unavailable (`kernels.why_not()` says why).
    """
    if not kernels.available():
        return 0
    from llmkit.models.layout import row_major

    row_major(model)
    swaps = [(name, m) for name, m in model.named_modules()
             if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    for name, m in swaps:
        parent_path, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, KernelLinear(m))
    return len(swaps)
