"""The one place inference decides its device and dtype (guide §2.2, hardware acceleration).

GPU: bf16 where the card supports it (Ampere and newer), else fp16 - both run on the tensor cores.
CPU: fp32; the int8 path (the VNNI instructions through `torch._int_mm`) comes from a model dir written by
`llmkit quantize`, whose layers carry their own int8 weights whatever dtype is asked for.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> the first CUDA GPU when one is visible, else the CPU; other names as torch.device()."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is visible to torch here; use 'cpu' or 'auto'")
    return device


def resolve_dtype(name: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """"auto" -> bf16 (or fp16 without bf16 support) on a GPU, fp32 on the CPU; or one of fp32, bf16, fp16."""
    if isinstance(name, torch.dtype):
        return name
    device = device or torch.device("cpu")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
