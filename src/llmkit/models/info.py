"""What a model configuration costs before you train it: parameters by part, FLOPs per token, memory.

The model is built on the `meta` device, so a 7B configuration is measured without allocating
7B parameters. Memory for training follows the usual accounting for AdamW with fp32 master weights
(weights 4 B + gradients 4 B + two moments 8 B per parameter) and, for activations, Korthikanti et
al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (§4.1): per layer
`s*b*h*(34 + 5*a*s/h)` bytes in 16-bit precision, of which `5*a*s^2*b` is the attention-score
matrices that fused attention kernels (flash / memory-efficient SDPA) never store.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict

import torch

from llmkit.models.io import build_model

GIB = 1024**3


def _component(name: str) -> str:
    leaf = name.split(".")
    if any(p in ("tok_emb", "pos_emb", "type_emb", "shared", "rel_bias") for p in leaf):
        return "embeddings"
    if any(p in ("lm_head", "mlm_head", "pooler", "classifier") for p in leaf):
        return "heads"
    if "cross_attn" in leaf:
        return "cross_attention"
    if any(p in ("attn", "self_attn") for p in leaf):
        return "attention"
    if "mlp" in leaf:
        return "mlp"
    return "norms"


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of `config`'s model, built on the `meta` device (nothing allocated);
    a tied weight is listed once, under its first name (`tok_emb.weight`). Used by `llmkit.train.plan`."""
    with torch.device("meta"):
        model = build_model(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def model_info(config, batch_size: int = 1, seq_len: int | None = None,
               activation_bytes: int = 2, fused_attention: bool = True) -> dict:
    """Parameter count by component, training FLOPs per token and memory estimates (bytes and GiB).

    Args:
        batch_size, seq_len: the shape the activation estimate is for (seq_len defaults to block_size).
        activation_bytes: bytes per activation element (2 for bf16/fp16 autocast, 4 for fp32).
        fused_attention: the attention kernel does not store the (s x s) score matrices.
    """
    if config.vocab_size is None:
        raise ValueError("model.vocab_size is needed to size the embeddings (set it, or give a tokenizer)")
    seq_len = seq_len or config.block_size
    with torch.device("meta"):
        model = build_model(config)
    by_part: dict[str, int] = defaultdict(int)
    seen = set()
    for name, p in model.named_parameters():  # named_parameters lists a tied weight once
        if id(p) in seen:
            continue
        seen.add(id(p))
        by_part[_component(name)] += p.numel()
    total = sum(by_part.values())
    s, b, h, a = seq_len, batch_size, config.d_model, config.n_head
    per_layer = s * b * h * 34 + (0 if fused_attention else 5 * a * s * s * b)
    # encoder-decoders: the decoder stack counts too (its cross-attention is approximated by the same term)
    layers = config.n_layer + (getattr(config, "n_decoder_layer", None) or config.n_layer
                               if config.FAMILY == "encdec" else 0)
    activations = layers * per_layer * activation_bytes / 2  # the paper counts 16-bit elements
    activations += s * b * config.vocab_size * 4  # fp32 logits for the loss
    memory = {
        "weights_fp32": total * 4,
        "weights_bf16": total * 2,
        "gradients_fp32": total * 4,
        "adamw_states": total * 8,
        "activations": int(activations),
    }
    memory["training_total"] = sum(memory[k] for k in ("weights_fp32", "gradients_fp32", "adamw_states",
                                                        "activations"))
    if config.FAMILY == "decoder":
        # inference: keys and values of every layer for batch x seq_len tokens at activation_bytes each; only
        # the n_kv_head key/value heads are stored (GQA), each of head_dim; a sliding window on every layer
        # caps the positions kept (KVCache's rolling buffer)
        slots = min(s, config.sliding_window) if config.sliding_window and config.layer_types is None else s
        memory["kv_cache"] = 2 * config.n_layer * b * slots * config.kv_heads * config.head_dim * activation_bytes
    return {
        "family": config.FAMILY,
        "config": asdict(config),
        "parameters": {"total": total, **dict(sorted(by_part.items()))},
        "non_embedding_parameters": total - by_part.get("embeddings", 0),
        "flops_per_token": model.flops_per_token(seq_len),
        "shape": {"batch_size": batch_size, "seq_len": seq_len, "activation_bytes": activation_bytes},
        "memory_bytes": memory,
        "memory_gib": {k: round(v / GIB, 3) for k, v in memory.items()},
    }
