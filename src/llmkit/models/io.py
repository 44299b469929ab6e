"""The model directory: `config.json`, `model.safetensors`, `tokenizer.json`, `generation_config.json`.

Every stage that produces a model writes this layout and every stage that consumes one reads it, so a
model can move from pretraining to fine-tuning to serving as plain files. Weights are safetensors only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model as _save_weights

from llmkit.models.decoder import Decoder, DecoderConfig
from llmkit.models.encdec import EncDecConfig, EncoderDecoder
from llmkit.models.encoder import Encoder, EncoderClassifier, EncoderConfig

# family name (config.json "family") -> (config class, model class)
FAMILIES = {
    "decoder": (DecoderConfig, Decoder),
    "encoder": (EncoderConfig, Encoder),
    "encoder_classifier": (EncoderConfig, EncoderClassifier),
    "encdec": (EncDecConfig, EncoderDecoder),
}


def build_model(config) -> torch.nn.Module:
    """A freshly initialised model of the family `config` describes (its class attribute FAMILY)."""
    return FAMILIES[config.FAMILY][1](config)


def model_family(model: torch.nn.Module) -> str:
    for family, (_, cls) in FAMILIES.items():
        if type(model) is cls:
            return family
    raise TypeError(f"unknown model class {type(model).__name__}")


def require_plain(model: torch.nn.Module, what: str) -> None:
    """Refuse a model that carries an adapter: its weights would not load back as a plain model."""
    if getattr(model, "prefix", None) is not None or any(".lora_" in n for n, _ in model.named_parameters()):
        raise ValueError(f"{what} writes plain models: save the adapter with llmkit.models.adapters.save_adapter,"
                         " or merge a LoRA adapter first (llmkit.models.lora.merge_lora / `llmkit merge`)")


def save_model(model: torch.nn.Module, out_dir: str | Path, tokenizer=None,
               generation_config: dict[str, Any] | None = None) -> Path:
    """Write `model` (and its tokenizer) as a model directory; returns the directory."""
    require_plain(model, "save_model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"family": model_family(model), **dataclasses.asdict(model.config)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if any(not p.is_contiguous() for p in model.parameters()):
        # e.g. column-major weights from llmkit.models.layout: safetensors stores contiguous tensors only
        from llmkit.models.layout import row_major

        model = copy.deepcopy(model)
        row_major(model)
    # save_model (not save_file) handles tied weights: the shared tensor is stored once.
    _save_weights(model, str(out / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save(out)
    gen = dict(generation_config or {})
    if tokenizer is not None:
        gen.setdefault("bos_token_id", tokenizer.bos_id)
        gen.setdefault("eos_token_id", tokenizer.eos_id)
        gen.setdefault("pad_token_id", tokenizer.pad_id)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def load_model_config(model_dir: str | Path):
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    raw = json.loads(path.read_text())
    family = raw.pop("family", "decoder")
    if family not in FAMILIES:
        raise ValueError(f"{path}: unknown model family {family!r} (known: {sorted(FAMILIES)})")
    config_cls, model_cls = FAMILIES[family]
    return config_cls(**raw), model_cls


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Read a model directory written by `save_model` into a model in eval mode on `device`."""
    config, model_cls = load_model_config(model_dir)
    model = model_cls(config)
    load_weights_into(model, Path(model_dir) / "model.safetensors")
    return model.to(device).eval()


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def load_weights_into(model: torch.nn.Module, path: str | Path) -> None:
    """Read a safetensors file into `model`'s parameters and buffers one tensor at a time, strictly.

    Each tensor's bytes are read from the file straight into the tensor it belongs to (through a one-tensor
    buffer only when the dtype differs), so loading needs the model's memory plus the largest tensor, not
    twice the model as a whole state dict (or a memory map of the file) next to the model does: a 0.5B fp32
    model peaks at ~2 GB here, not ~4 GB. Tensors shared in the model (tied embeddings) are stored once,
    under either name, as safetensors' `save_model` writes them."""
    import struct

    path = Path(path)
    state = model.state_dict()
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        except (struct.error, ValueError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
        base = 8 + n
        header.pop("__metadata__", None)
        unexpected = sorted(set(header) - set(state))
        if unexpected:
            raise RuntimeError(f"{path}: unexpected tensors {unexpected[:5]} for {type(model).__name__}")
        loaded: set[int] = set()
        for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
            info, dst = header[name], state[name]
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{path}: {name} has dtype {info['dtype']}, not one llmkit reads")
            if list(info["shape"]) != list(dst.shape):
                raise RuntimeError(f"{path}: {name} has shape {info['shape']}, the model needs {list(dst.shape)}")
            start, end = info["data_offsets"]
            src_dtype = _ST_DTYPES[info["dtype"]]
            f.seek(base + start)
            with torch.no_grad():
                if src_dtype == dst.dtype and dst.is_contiguous() and dst.device.type == "cpu":
                    buf = dst
                else:
                    buf = torch.empty(dst.shape, dtype=src_dtype)
                if end > start:
                    view = buf.view(-1).view(torch.uint8).numpy()
                    if f.readinto(memoryview(view)) != end - start:
                        raise ValueError(f"{path}: truncated at tensor {name}")
                if buf is not dst:
                    dst.copy_(buf)
            loaded.add(dst.data_ptr())
        missing = [k for k, t in state.items() if k not in header and not (t.numel() and t.data_ptr() in loaded)]
        if missing:
            raise RuntimeError(f"{path}: missing tensors {missing[:5]} for {type(model).__name__}")


def load_generation_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
