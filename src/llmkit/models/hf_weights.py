"""The weights of a Hugging Face model directory, shared by every HF importer (decoders, BERT, T5).

`read_hf_weights` reads every tensor of the directory, whichever of the files transformers writes hold
them; `no_leftovers` refuses a checkpoint with tensors a name mapping did not consume, so nothing is
silently dropped on import.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

__all__ = ["no_leftovers", "read_hf_weights"]


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF model dir: model.safetensors, sharded safetensors, or pytorch_model.bin."""
    if (src / "model.safetensors").is_file():
        return load_file(str(src / "model.safetensors"))
    for index_name, loader in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "pt")):
        index = src / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for f in files:
                out.update(_load_one(src / f, loader))
            return out
    shards = sorted(src.glob("*.safetensors"))
    if shards:
        out = {}
        for f in shards:
            out.update(load_file(str(f)))
        return out
    if (src / "pytorch_model.bin").is_file():
        return _load_one(src / "pytorch_model.bin", "pt")
    raise FileNotFoundError(
        f"{src}: no weights found (expected model.safetensors, a sharded *.safetensors with "
        "model.safetensors.index.json, or pytorch_model.bin)"
    )


def _load_one(path: Path, kind: str) -> dict[str, torch.Tensor]:
    if kind == "st":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def no_leftovers(sd: dict[str, torch.Tensor]) -> None:
    if sd:
        extra = sorted(sd)
        raise ValueError(f"unexpected tensors in the checkpoint (not mapped to llmkit): {extra[:8]}"
                         + (f" and {len(extra) - 8} more" if len(extra) > 8 else ""))
