"""Architectures (guide §1.2) and the model directory format shared by every stage."""

from llmkit.models.decoder import Decoder, DecoderConfig, KVCache
from llmkit.models.io import load_model, save_model

__all__ = ["Decoder", "DecoderConfig", "KVCache", "load_model", "save_model"]
