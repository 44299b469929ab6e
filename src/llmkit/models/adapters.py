"""Adapter directories, whatever the method: one entry point for LoRA and prefix tuning.

An adapter directory is Hugging Face PEFT's layout: `adapter_config.json` (its `peft_type` says the
method: ``LORA`` or ``PREFIX_TUNING``) and `adapter_model.safetensors`. `load_adapter` reads the type
and hands off to `llmkit.models.lora_peft` or `llmkit.models.prefix`; `save_adapter` looks at what the model
carries. Inference and serving load adapters through here, so they never import `llmkit.finetune`.

The prefix module is imported only when a prefix adapter is met, so LoRA works on its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Literal

import torch.nn as nn

from llmkit.models.lora import ADAPTER_CONFIG, has_lora
from llmkit.models.lora_peft import load_lora, save_lora

__all__ = ["PEFT_TYPES", "adapter_base_model", "adapter_kind", "is_adapter_dir", "load_adapter",
           "save_adapter"]

# PEFT's peft_type -> llmkit's method name
PEFT_TYPES: dict[str, str] = {"LORA": "lora", "PREFIX_TUNING": "prefix"}


def is_adapter_dir(path: str | Path) -> bool:
    """True when `path` holds an adapter_config.json (a PEFT adapter, not a model directory)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: not an adapter directory (no {ADAPTER_CONFIG})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def adapter_kind(adapter_dir: str | Path) -> Literal["lora", "prefix"]:
    """"lora" or "prefix", from adapter_config.json's `peft_type`; ValueError naming any other type."""
    peft_type = _config(adapter_dir).get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise ValueError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: peft_type {peft_type!r} is not supported "
                         f"(supported: {', '.join(PEFT_TYPES)})")
    return PEFT_TYPES[peft_type]  # type: ignore[return-value]


def adapter_base_model(adapter_dir: str | Path) -> str | None:
    """The base model the adapter was trained on (`base_model_name_or_path`), if it was recorded."""
    return _config(adapter_dir).get("base_model_name_or_path")


def _prefix() -> ModuleType:
    """llmkit.models.prefix, imported on first use; a clear error when this installation lacks it."""
    try:
        from llmkit.models import prefix
    except ModuleNotFoundError as e:
        if e.name == "llmkit.models.prefix":
            raise ModuleNotFoundError(
                "prefix-tuning adapters need llmkit.models.prefix (save_prefix / load_prefix), which this "
                "installation lacks", name=e.name) from e
        raise
    return prefix


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Attach the adapter in `adapter_dir` to the base `model` (in place) and return the model."""
    if adapter_kind(adapter_dir) == "lora":
        return load_lora(model, adapter_dir)
    return _prefix().load_prefix(model, adapter_dir)


def _has_prefix(model: nn.Module) -> bool:
    try:
        prefix = _prefix()
    except ModuleNotFoundError:
        return False  # without the module no model can carry a prefix
    return bool(prefix.prefix_parameters(model))


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write the adapter `model` carries (LoRA or prefix) in PEFT's layout; returns `out_dir`.

    ValueError when the model carries none, or both (a PEFT directory holds one adapter).
    """
    lora, prefix = has_lora(model), _has_prefix(model)
    if lora and prefix:
        raise ValueError("model carries both LoRA and prefix adapters; an adapter directory holds one")
    if lora:
        return save_lora(model, out_dir, base_model)
    if prefix:
        return _prefix().save_prefix(model, out_dir, base_model)
    raise ValueError("model carries no adapter (apply_lora / apply_prefix first)")
