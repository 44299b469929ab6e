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
from safetensors.torch import load_model as _load_weights
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
    missing, unexpected = _load_weights(model, str(Path(model_dir) / "model.safetensors"), strict=True)
    return model.to(device).eval()


def load_generation_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
