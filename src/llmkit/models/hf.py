"""Hugging Face checkpoint interop for the decoder family: `import_hf` and `export_hf`.

Supported architectures (see docs/hf.md for the full name mapping):

* ``GPT2LMHeadModel``: learned positions, LayerNorm, GELU (``gelu_new`` -> llmkit ``gelu_tanh``), biases,
  Conv1D weights (stored (in, out), transposed relative to `nn.Linear`).
* ``LlamaForCausalLM``: RoPE (half-split pairing over the full head; linear / dynamic / yarn / llama3 /
  longrope scaling), RMSNorm, SwiGLU, grouped-query attention; q/k/v projections are concatenated into
  llmkit's fused ``qkv``.
* The Llama family, as the same `Decoder` with options (`DecoderConfig`): ``MistralForCausalLM`` (sliding
  window), ``Qwen2ForCausalLM`` (q/k/v-only biases, windows on upper layers), ``Qwen3ForCausalLM`` (q/k
  RMSNorm, explicit head_dim), ``Phi3ForCausalLM`` (fused qkv_proj / gate_up_proj split on import and fused
  on export, longrope), ``GemmaForCausalLM`` (GeGLU, scaled embeddings, (1 + w) RMSNorm),
  ``Gemma2ForCausalLM`` (Gemma plus pre and post norms, soft-capping, query_pre_attn_scalar, alternating
  local / global attention).
* Mixture-of-experts decoders (`llmkit.models.moe`, mapped in `llmkit.models.hf_moe`): ``MixtralForCausalLM``
  (Mistral attention, top-k routed SwiGLU experts, top-k weights renormalised), ``Qwen2MoeForCausalLM``
  (Qwen2 attention, routed experts plus a sigmoid-gated shared expert, `norm_topk_prob` as configured) and
  ``Qwen3MoeForCausalLM`` (Qwen3 attention with q/k RMSNorm, routed experts, `norm_topk_prob` as
  configured); every layer sparse. Expert weights are read in transformers 5's fused layout
  (``mlp.experts.gate_up_proj`` / ``down_proj``) and in the per-expert one of older checkpoints and of
  transformers 5's Qwen-MoE files (``block_sparse_moe.experts.j.w1/w2/w3``,
  ``mlp.experts.j.gate_proj/up_proj/down_proj``).

Import records the architecture in `DecoderConfig.hf_architecture` and export writes the same one back.
Everything else is refused with a `ValueError` naming the config key that llmkit cannot reproduce exactly
(unknown RoPE types, MoE layouts with dense layers in between, ...). Neither function needs `transformers`: the HF
files (config.json, safetensors) are read and written directly.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmkit.models.decoder import Decoder, DecoderConfig
from llmkit.models.hf_moe import (
    MOE_ARCHITECTURES,
    check_moe_exportable,
    experts_from_llmkit,
    experts_to_llmkit,
    moe_config,
    moe_hf_config,
    native_moe_arch,
)
from llmkit.models.hf_weights import no_leftovers, read_hf_weights
from llmkit.models.io import load_generation_config, load_model, require_plain, save_model
from llmkit.models.layers import ROPE_SCALING_KEYS, ROPE_SCALING_TYPES

__all__ = ["SUPPORTED_ARCHITECTURES", "export_hf", "import_hf"]

SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
                           "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")

_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_GPT2_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _rope(hf: dict[str, Any], arch: str) -> tuple[float, dict[str, Any] | None, int, float]:
    """(rope_theta, llmkit rope_scaling or None, block_size, partial_rotary_factor) from either config format.

    transformers >= 5 writes `rope_parameters` ({rope_type, rope_theta, ...}); 4.x writes `rope_theta` and
    `rope_scaling` ({type or rope_type, ...}). The scaling keys are kept as HF names them, with the values HF
    would default filled in (original_max_position_embeddings, yarn/longrope `factor`), so the llmkit config
    is self-contained. Dynamic NTK extends the context beyond max_position_embeddings (its original context):
    block_size becomes max_position_embeddings * factor.
    """
    block_size = hf.get("max_position_embeddings", 2048)
    params = hf.get("rope_parameters")
    if params and "rope_type" not in params and "type" not in params and "rope_theta" not in params \
            and isinstance(next(iter(params.values()), None), dict):
        raise ValueError("rope_parameters: per-layer-type RoPE parameters are not supported")
    scaling = hf.get("rope_scaling")
    src = dict(scaling) if scaling else dict(params or {})  # transformers 5 also prefers rope_scaling when given
    theta = float(src.get("rope_theta", (params or {}).get("rope_theta", hf.get("rope_theta", 10000.0))))
    partial = src.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    partial = 1.0 if partial is None else float(partial)
    if partial != 1.0 and arch != "Phi3ForCausalLM":
        raise ValueError(f"partial_rotary_factor: {partial} is not supported for {arch} (only Phi3ForCausalLM "
                         "rotates part of each head)")
    kind = src.get("rope_type", src.get("type", "default"))
    if arch == "Phi3ForCausalLM" and kind in ("su", "yarn"):
        kind = "longrope"  # Phi-3's older names for LongRoPE, as transformers reads them
    if kind == "default":
        return theta, None, block_size, partial
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported "
                         f"(supported: default, {', '.join(ROPE_SCALING_TYPES)})")
    out = {k: v for k, v in src.items() if k not in ("type", "rope_type", "rope_theta", "partial_rotary_factor")}
    out["rope_type"] = kind
    if kind == "dynamic":
        out["original_max_position_embeddings"] = block_size
        block_size = int(block_size * out["factor"])
    elif kind != "linear":
        orig = out.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or block_size
        out["original_max_position_embeddings"] = orig
        if kind in ("yarn", "longrope") and out.get("factor") is None:
            out["factor"] = block_size / orig
    missing = [k for k in ROPE_SCALING_KEYS[kind] if out.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling: rope_type {kind!r} needs {missing[0]!r}")
    return theta, out, block_size, partial


def _gpt2_config(hf: dict[str, Any]) -> DecoderConfig:
    for key in ("add_cross_attention", "scale_attn_by_inverse_layer_idx"):
        if hf.get(key):
            raise ValueError(f"{key}: true is not supported for GPT2LMHeadModel")
    if not hf.get("scale_attn_weights", True):
        raise ValueError("scale_attn_weights: false is not supported (llmkit scales by 1/sqrt(head_dim))")
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACT:
        raise ValueError(f"activation_function: {act!r} is not supported (supported: {sorted(_GPT2_ACT)})")
    d_model = hf.get("n_embd", 768)
    return DecoderConfig(
        vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12), d_model=d_model, n_head=hf.get("n_head", 12),
        d_ff=hf.get("n_inner") or 4 * d_model, activation=_GPT2_ACT[act], norm="layernorm",
        positions="learned", tie_embeddings=hf.get("tie_word_embeddings", True), bias=True,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=0.0,
    )


# HF activation names of the gated MLPs -> llmkit activation
_GATED_ACT = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh", "gelu": "geglu"}
_GATED_ACT_OUT = {"swiglu": "silu", "geglu_tanh": "gelu_pytorch_tanh", "geglu": "gelu"}


QWEN_STYLE = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM")
"""Architectures whose sliding window is off unless use_sliding_window, and on from max_window_layers up."""

QK_NORM = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
"""Architectures with an RMSNorm over each head's q and k (always)."""

EVERY_LAYER_WINDOW = ("MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM")
"""Architectures whose sliding window, when set, covers every layer (their transformers models ignore
layer_types)."""


def _sliding(hf: dict[str, Any], arch: str, n_layer: int) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types) as HF builds them per architecture; layer_types None = all slide."""
    window = hf.get("sliding_window")
    if arch == "Qwen3MoeForCausalLM":
        # transformers 5 (like 4.5x) gives every Qwen3-MoE layer the window when use_sliding_window is set, and
        # reads neither max_window_layers nor layer_types for it
        window = window if hf.get("use_sliding_window", False) else None
        return (None if window is None else int(window)), None
    if arch in QWEN_STYLE and not hf.get("use_sliding_window", False):
        window = None
    if arch in ("LlamaForCausalLM", "GemmaForCausalLM"):
        window = None  # no sliding window in these
    types = hf.get("layer_types")
    if window is None:
        return None, None
    if types is None:
        if arch in QWEN_STYLE:
            first = hf.get("max_window_layers", 28)  # layers from max_window_layers on slide
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layer)]
        elif arch == "Gemma2ForCausalLM":  # even layers local, odd layers global
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layer)]
    if types is not None:
        types = list(types)
        if len(types) != n_layer:
            raise ValueError(f"layer_types: {len(types)} entries for num_hidden_layers={n_layer}")
        bad = [t for t in types if t not in ("sliding_attention", "full_attention")]
        if bad:
            raise ValueError(f"layer_types: {bad[0]!r} is not supported (sliding_attention, full_attention)")
        if all(t == "full_attention" for t in types):
            return None, None
        if all(t == "sliding_attention" for t in types):
            types = None
    return int(window), types


def _llama_config(hf: dict[str, Any], arch: str) -> DecoderConfig:
    """Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma and Gemma 2: one RoPE + RMSNorm + gated-MLP decoder with
    options."""
    gemma = arch in ("GemmaForCausalLM", "Gemma2ForCausalLM")
    act_key = "hidden_activation" if arch == "Gemma2ForCausalLM" and "hidden_activation" in hf else "hidden_act"
    act = hf.get(act_key, "gelu_pytorch_tanh" if gemma else "silu")
    allowed = ("gelu_pytorch_tanh", "gelu_new", "gelu") if gemma else ("silu",)
    if act not in allowed:
        raise ValueError(f"{act_key}: {act!r} is not supported for {arch} (supported: {', '.join(allowed)})")
    if arch == "GemmaForCausalLM" and act == "gelu":
        act = "gelu_pytorch_tanh"  # Gemma 1's legacy "gelu" means the tanh approximation (transformers does the same)
    d_model, n_head, n_layer = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or d_model // n_head
    bias, qkv_bias = False, None
    if arch == "LlamaForCausalLM":
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise ValueError(f"attention_bias/mlp_bias: {attn_bias}/{mlp_bias} differ; llmkit biases the "
                             "attention output and the MLP together (supported: both true or both false)")
        bias = attn_bias
    elif arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"):
        qkv_bias = True  # Qwen2: biases on q/k/v only
    elif hf.get("attention_bias", False):
        raise ValueError(f"attention_bias: true is not supported for {arch} (it biases o_proj too, "
                         "without MLP biases)")
    if hf.get("mlp_bias", False) and arch != "LlamaForCausalLM":
        raise ValueError(f"mlp_bias: true is not supported for {arch}")
    n_kv = hf.get("num_key_value_heads") or n_head
    extra: dict[str, Any] = {}
    theta, scaling, block_size, partial = _rope(hf, arch)
    if partial != 1.0:  # HF: int(head_dim * partial_rotary_factor) dimensions rotate
        extra["rotary_dim"] = int(head_dim * partial)
    window, types = _sliding(hf, arch, n_layer)
    if arch in QK_NORM:
        extra["qk_norm"] = True
    if arch in MOE_ARCHITECTURES:
        extra["moe"] = moe_config(hf, arch, n_layer)
    if arch == "GemmaForCausalLM":  # Gemma 1: scaled embeddings and (1 + w) RMSNorm, no Gemma 2 additions
        extra.update(scale_embeddings=True, norm_unit_offset=True)
    if arch == "Gemma2ForCausalLM":
        extra.update(scale_embeddings=True, norm_unit_offset=True, post_norms=True,
                     attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
                     attn_softcap=hf.get("attn_logit_softcapping", 50.0),
                     final_softcap=hf.get("final_logit_softcapping", 30.0))
        if hf.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention: true is not supported (llmkit decoders are causal)")
    return DecoderConfig(
        vocab_size=hf["vocab_size"], block_size=block_size, n_layer=n_layer,
        d_model=d_model, n_head=n_head, n_kv_head=n_kv if n_kv != n_head else None, head_dim=head_dim,
        d_ff=hf["intermediate_size"], activation=_GATED_ACT[act], norm="rmsnorm", positions="rope",
        rope_base=theta, rope_scaling=scaling, sliding_window=window, layer_types=types,
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)), bias=bias, qkv_bias=qkv_bias,
        norm_eps=hf.get("rms_norm_eps", 1e-5 if arch == "Phi3ForCausalLM" else 1e-6), dropout=0.0,
        hf_architecture=arch, **extra,
    )


_MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
                "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "mixtral": "MixtralForCausalLM",
                "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def hf_config_to_llmkit(hf: dict[str, Any]) -> tuple[str, DecoderConfig]:
    """(architecture, DecoderConfig) for a HF config.json dict; ValueError for anything unsupported."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPES.get(hf.get("model_type", ""), "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architectures: {arch or hf.get('model_type')!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (and BERT, T5: docs/hf.md)")
    cfg = _gpt2_config(hf) if arch == "GPT2LMHeadModel" else _llama_config(hf, arch)
    cfg.validate()
    return arch, cfg


# -- name mapping -----------------------------------------------------------------------------------


def _gpt2_to_llmkit(sd: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    # save_pretrained writes `transformer.` prefixes; the original hub gpt2 files have none.
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out = {"tok_emb.weight": sd.pop("wte.weight"), "pos_emb.weight": sd.pop("wpe.weight"),
           "norm_f.weight": sd.pop("ln_f.weight"), "norm_f.bias": sd.pop("ln_f.bias")}
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for src, dst in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[b + dst + ".weight"] = sd.pop(h + src + ".weight")
            out[b + dst + ".bias"] = sd.pop(h + src + ".bias")
        for src, dst in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                         ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")):
            out[b + dst + ".weight"] = sd.pop(h + src + ".weight").t().contiguous()  # Conv1D: (in, out)
            out[b + dst + ".bias"] = sd.pop(h + src + ".bias")
        sd.pop(h + "attn.bias", None)  # causal-mask buffers stored by old checkpoints
        sd.pop(h + "attn.masked_bias", None)
    lm = sd.pop("lm_head.weight", None)
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings or lm is None else lm
    if lm is None and not cfg.tie_embeddings:
        raise ValueError("lm_head.weight: missing while tie_word_embeddings is false")
    no_leftovers(sd)
    return out


def _llama_renames(cfg: DecoderConfig, arch: str) -> list[tuple[str, str]]:
    """(llmkit name, HF name) of the tensors that map one to one in the Llama-family architectures
    (everything except Phi-3's fused qkv_proj / gate_up_proj and the q/k/v concatenation, see
    `_llama_to_llmkit`)."""
    pairs = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm_f.weight", "model.norm.weight")]
    names = ["weight"] + (["bias"] if cfg.bias else [])
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        pairs.append((b + "norm1.weight", h + "input_layernorm.weight"))
        if arch == "Gemma2ForCausalLM":  # Gemma 2's post_attention_layernorm normalises the attention output
            pairs += [(b + "attn_out_norm.weight", h + "post_attention_layernorm.weight"),
                      (b + "norm2.weight", h + "pre_feedforward_layernorm.weight"),
                      (b + "mlp_out_norm.weight", h + "post_feedforward_layernorm.weight")]
        else:
            pairs.append((b + "norm2.weight", h + "post_attention_layernorm.weight"))
        if cfg.qk_norm:
            pairs += [(b + "attn.q_norm.weight", h + "self_attn.q_norm.weight"),
                      (b + "attn.k_norm.weight", h + "self_attn.k_norm.weight")]
        for n in names:
            pairs.append((b + f"attn.proj.{n}", h + f"self_attn.o_proj.{n}"))
            if cfg.moe is not None:  # experts: `hf_moe.experts_to_llmkit`
                continue
            pairs.append((b + f"mlp.down.{n}", h + f"mlp.down_proj.{n}"))
            if arch != "Phi3ForCausalLM":
                pairs += [(b + f"mlp.gate.{n}", h + f"mlp.gate_proj.{n}"), (b + f"mlp.up.{n}", h + f"mlp.up_proj.{n}")]
    return pairs


def _qkv_names(cfg: DecoderConfig) -> list[str]:
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    return ["weight"] + (["bias"] if qkv_bias else [])


def _llama_to_llmkit(sd: dict[str, torch.Tensor], cfg: DecoderConfig, arch: str = "LlamaForCausalLM"
                     ) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    out = {dst: sd.pop(src) for dst, src in _llama_renames(cfg, arch)}
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        for n in _qkv_names(cfg):
            if arch == "Phi3ForCausalLM":  # already fused, rows [q; k; v] as llmkit's
                out[b + f"attn.qkv.{n}"] = sd.pop(h + f"self_attn.qkv_proj.{n}")
            else:
                out[b + f"attn.qkv.{n}"] = torch.cat([sd.pop(h + f"self_attn.{p}_proj.{n}") for p in "qkv"], dim=0)
        if arch == "Phi3ForCausalLM":  # gate_up_proj rows [gate; up]
            out[b + "mlp.gate.weight"], out[b + "mlp.up.weight"] = sd.pop(h + "mlp.gate_up_proj.weight").chunk(2, dim=0)
        if cfg.moe is not None:
            out.update(experts_to_llmkit(sd, h, b, cfg.moe.experts))
        sd.pop(h + "self_attn.rotary_emb.inv_freq", None)  # buffer in old checkpoints
    sd.pop("model.rotary_emb.inv_freq", None)
    lm = sd.pop("lm_head.weight", None)
    if lm is None and not cfg.tie_embeddings:
        raise ValueError("lm_head.weight: missing while tie_word_embeddings is false")
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else lm
    no_leftovers(sd)
    return out


def _build(cfg: DecoderConfig, state: dict[str, torch.Tensor]) -> Decoder:
    """A Decoder holding `state` (fp32), built without running the random init."""
    with torch.device("meta"):
        model = Decoder(cfg)
    model = model.to_empty(device="cpu")
    if cfg.positions == "rope":
        model.init_rope()  # buffers are not in the state dict
    own = model.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} != expected {tuple(own[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()


def decoder_from_hf(hf: dict[str, Any], weights: dict[str, torch.Tensor]) -> Decoder:
    """The llmkit Decoder of a HF config.json dict and its HF-named tensors (any float dtype; fp32 result).
    Other checkpoint formats (GGUF) come in through here, so they share the architecture mapping."""
    arch, cfg = hf_config_to_llmkit(hf)
    try:
        state = _gpt2_to_llmkit(weights, cfg) if arch == "GPT2LMHeadModel" else _llama_to_llmkit(weights, cfg, arch)
    except KeyError as e:
        raise ValueError(f"{arch} checkpoint lacks tensor {e.args[0]!r}") from None
    return _build(cfg, state)


def _import_decoder(src: Path, hf: dict[str, Any]) -> Decoder:
    hf_config_to_llmkit(hf)  # an unsupported architecture or option is refused (by name) before any weight is read
    try:
        return decoder_from_hf(hf, read_hf_weights(src))
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None


def import_hf(src_dir: str | Path, out_dir: str | Path | None = None) -> torch.nn.Module:
    """Read a local Hugging Face model directory into an llmkit model (fp32, eval mode).

    GPT-2 / Llama / Mistral / Qwen2 / Qwen3 / Phi-3 / Gemma / Gemma 2 and the MoE Mixtral / Qwen2-MoE /
    Qwen3-MoE become a `Decoder`, BERT an `Encoder` (or `EncoderClassifier`), T5 an
    `EncoderDecoder`, chosen by config.json's `architectures`. `src_dir` holds config.json and the weights
    (model.safetensors, sharded safetensors with an index, or pytorch_model.bin). With `out_dir`, also writes
    an llmkit model directory there, with the model's own tokenizer: any HF ``tokenizer.json`` with its
    ``tokenizer_config.json`` (special tokens, added tokens, Jinja chat template; ``chat_template.jinja`` and
    ``special_tokens_map.json`` folded in), and its ``generation_config.json`` (an ``eos_token_id`` list kept,
    so generation stops at every end-of-sequence id the model declares).
    """
    src = Path(src_dir)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src}: not a Hugging Face model directory (no config.json)")
    hf = json.loads(cfg_path.read_text())
    arch = (hf.get("architectures") or [""])[0]
    if arch.startswith("Bert"):
        from llmkit.models.hf_bert import import_bert

        model = import_bert(src)
    elif arch.startswith("T5"):
        from llmkit.models.hf_t5 import import_t5

        model = import_t5(src)
    else:
        model = _import_decoder(src, hf)
    if out_dir is not None:
        tokenizer = None
        if (src / "tokenizer.json").is_file():
            from llmkit.tokenizer import Tokenizer

            # Tokenizer.save writes tokenizer.json and the tokenizer_config.json it was loaded with
            tokenizer = Tokenizer.load(src)
        else:
            warnings.warn(f"{src} has no tokenizer.json; the llmkit model dir gets none", stacklevel=2)
        gen_path = src / "generation_config.json"
        if gen_path.is_file():  # all of it: eos_token_id lists, the model's sampling defaults
            gen = {k: v for k, v in json.loads(gen_path.read_text()).items() if k != "transformers_version"}
        else:
            gen = {k: hf[k] for k in _SPECIAL_IDS if hf.get(k) is not None}
        save_model(model, out_dir, tokenizer=tokenizer, generation_config=gen)
    return model


# -- export -----------------------------------------------------------------------------------------


def _refuse(field: str, value: Any, arch: str, why: str = "") -> None:
    raise ValueError(f"{field}: {value!r} cannot be exported as {arch}{': ' + why if why else ''}")


_GEMMA_FIELDS = ("scale_embeddings", "norm_unit_offset", "post_norms", "attn_softcap", "final_softcap",
                 "attn_scale")
_GEMMA2_ONLY = ("post_norms", "attn_softcap", "final_softcap", "attn_scale")


def _hf_arch(cfg: DecoderConfig) -> str:
    """The HF architecture an llmkit decoder exports as: `hf_architecture` when the model came from one,
    otherwise the simplest that expresses its options (a MoE model: `hf_moe.native_moe_arch`); refuses (naming
    the field) what none can."""
    if cfg.positions == "learned":
        if cfg.norm != "layernorm":
            _refuse("norm", cfg.norm, "GPT2LMHeadModel", "learned positions export as GPT-2, which uses layernorm")
        if cfg.activation not in _GPT2_ACT_OUT:
            _refuse("activation", cfg.activation, "GPT2LMHeadModel", f"supported: {sorted(_GPT2_ACT_OUT)}")
        if cfg.kv_heads != cfg.n_head:
            _refuse("n_kv_head", cfg.n_kv_head, "GPT2LMHeadModel", "GPT-2 has no grouped-query attention")
        for name in ("qkv_bias", "qk_norm", "rope_scaling", "sliding_window", "head_dim", "rotary_dim") + _GEMMA_FIELDS:
            value = getattr(cfg, name)
            if value not in (None, False) and not (name == "head_dim" and value * cfg.n_head == cfg.d_model) \
                    and not (name == "qkv_bias" and value == cfg.bias):
                _refuse(name, value, "GPT2LMHeadModel", "GPT-2 has no such option")
        return "GPT2LMHeadModel"
    arch = cfg.hf_architecture
    if cfg.moe is not None and arch not in MOE_ARCHITECTURES:
        arch = native_moe_arch(cfg)
    if cfg.moe is None and arch in MOE_ARCHITECTURES:
        _refuse("moe", None, arch, "a mixture-of-experts architecture needs moe settings")
    if arch is None or arch == "GPT2LMHeadModel":
        if any(getattr(cfg, f) not in (None, False) for f in _GEMMA2_ONLY) or cfg.layer_types is not None \
                and cfg.activation.startswith("geglu"):
            arch = "Gemma2ForCausalLM"
        elif any(getattr(cfg, f) for f in ("scale_embeddings", "norm_unit_offset")) or cfg.activation.startswith("geglu"):
            arch = "GemmaForCausalLM"
        elif cfg.qk_norm:
            arch = "Qwen3ForCausalLM"
        elif cfg.qkv_bias and not cfg.bias:
            arch = "Qwen2ForCausalLM"
        elif cfg.layer_types is not None:
            arch = "Qwen2ForCausalLM"
        elif cfg.sliding_window is not None:
            arch = "MistralForCausalLM"
        else:
            arch = "LlamaForCausalLM"
    if arch not in SUPPORTED_ARCHITECTURES:
        _refuse("hf_architecture", arch, "a Hugging Face checkpoint", f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    _check_exportable(cfg, arch)
    return arch


def _check_exportable(cfg: DecoderConfig, arch: str) -> None:
    """Refuse, naming the field, any option `arch` cannot express."""
    if cfg.norm != "rmsnorm":
        _refuse("norm", cfg.norm, arch, "rope models export as Llama-family models, which use rmsnorm")
    gemma = arch in ("GemmaForCausalLM", "Gemma2ForCausalLM")
    acts = (("geglu_tanh", "geglu") if arch == "Gemma2ForCausalLM" else ("geglu_tanh",)) if gemma else ("swiglu",)
    if cfg.activation not in acts:
        _refuse("activation", cfg.activation, arch, f"supported: {', '.join(acts)}")
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    if arch in MOE_ARCHITECTURES:
        check_moe_exportable(cfg, arch)
    if arch == "LlamaForCausalLM":
        if qkv_bias != cfg.bias:
            _refuse("qkv_bias", cfg.qkv_bias, arch, "Llama's attention_bias covers q/k/v and o_proj alike")
    elif arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"):
        if cfg.bias:
            _refuse("bias", cfg.bias, arch, "Qwen2 has biases on q/k/v only")
    elif cfg.bias or qkv_bias:
        _refuse("bias" if cfg.bias else "qkv_bias", True, arch, "no biases in this architecture")
    if cfg.qk_norm != (arch in QK_NORM):
        _refuse("qk_norm", cfg.qk_norm, arch, "Qwen3 and Qwen3-MoE always have q/k norms, the others never")
    for name in _GEMMA_FIELDS:
        value = getattr(cfg, name)
        required = ("scale_embeddings", "norm_unit_offset") + (("post_norms",) if arch == "Gemma2ForCausalLM" else ())
        if gemma and name in required and not value:
            _refuse(name, value, arch, "this architecture always has it")
        if value not in (None, False) and not (arch == "Gemma2ForCausalLM" or gemma and name not in _GEMMA2_ONLY):
            _refuse(name, value, arch, "only " + ("Gemma2ForCausalLM" if name in _GEMMA2_ONLY else
                                                  "GemmaForCausalLM and Gemma2ForCausalLM") + " have it")
    if cfg.sliding_window is not None:
        if arch in ("LlamaForCausalLM", "GemmaForCausalLM"):
            _refuse("sliding_window", cfg.sliding_window, arch, "no sliding window in this architecture (Mistral has)")
        if cfg.layer_types is not None and arch in EVERY_LAYER_WINDOW:
            _refuse("layer_types", cfg.layer_types, arch, "its sliding window covers every layer")
    if cfg.rotary_dim not in (None, cfg.head_dim) and arch != "Phi3ForCausalLM":
        _refuse("rotary_dim", cfg.rotary_dim, arch, "only Phi3ForCausalLM rotates part of each head")
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if arch == "Phi3ForCausalLM" and kind not in (None, "longrope"):
        _refuse("rope_scaling", kind, arch, "Phi-3 takes longrope only")


def _gpt2_from_llmkit(sd: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    def bias(key: str, n: int) -> torch.Tensor:  # llmkit bias=False: zero biases are the same function
        return sd[key] if key in sd else torch.zeros(n)

    C = cfg.d_model
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["norm_f.weight"], "transformer.ln_f.bias": bias("norm_f.bias", C)}
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for dst, src in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[h + dst + ".weight"] = sd[b + src + ".weight"]
            out[h + dst + ".bias"] = bias(b + src + ".bias", C)
        for dst, src in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                         ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")):
            w = sd[b + src + ".weight"]
            out[h + dst + ".weight"] = w.t()  # nn.Linear (out, in) -> Conv1D (in, out)
            out[h + dst + ".bias"] = bias(b + src + ".bias", w.shape[0])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _llama_from_llmkit(sd: dict[str, torch.Tensor], cfg: DecoderConfig, arch: str = "LlamaForCausalLM"
                       ) -> dict[str, torch.Tensor]:
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {dst: sd[src] for src, dst in _llama_renames(cfg, arch)}
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        for n in _qkv_names(cfg):
            if arch == "Phi3ForCausalLM":
                out[h + f"self_attn.qkv_proj.{n}"] = sd[b + f"attn.qkv.{n}"]
            else:
                q, k, v = sd[b + f"attn.qkv.{n}"].split((q_dim, kv_dim, kv_dim), dim=0)
                out[h + f"self_attn.q_proj.{n}"], out[h + f"self_attn.k_proj.{n}"] = q, k
                out[h + f"self_attn.v_proj.{n}"] = v
        if cfg.moe is not None:
            out.update(experts_from_llmkit(sd, b, h))
        if arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM") and not cfg.qkv_bias:  # Qwen2 always has q/k/v biases: zeros are the same
            for p, rows in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                out[h + f"self_attn.{p}_proj.bias"] = torch.zeros(rows)
        if arch == "Phi3ForCausalLM":
            out[h + "mlp.gate_up_proj.weight"] = torch.cat((sd[b + "mlp.gate.weight"], sd[b + "mlp.up.weight"]))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


_HF_MODEL_TYPE = {v: k for k, v in _MODEL_TYPES.items()}


def _query_pre_attn_scalar(cfg: DecoderConfig) -> int | float:
    """Gemma 2 scales attention logits by query_pre_attn_scalar ** -0.5 (an int in its config)."""
    scalar = (cfg.attn_scale or cfg.head_dim ** -0.5) ** -2
    return round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar


def _hf_config(cfg: DecoderConfig, arch: str, gen: dict[str, Any]) -> dict[str, Any]:
    special = {k: gen.get(k) for k in _SPECIAL_IDS}
    if arch == "GPT2LMHeadModel":
        return {
            "architectures": [arch], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": cfg.d_ff, "activation_function": _GPT2_ACT_OUT[cfg.activation],
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, "dtype": "float32", **special,
        }
    scaling = dict(cfg.rope_scaling or {})
    kind = scaling.pop("rope_type", "default")
    max_pos = cfg.block_size
    if kind == "dynamic":  # HF's dynamic NTK takes max_position_embeddings as the original context
        max_pos = scaling.pop("original_max_position_embeddings")
    out = {
        "architectures": [arch], "model_type": _HF_MODEL_TYPE[arch], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": _GATED_ACT_OUT[cfg.activation], "max_position_embeddings": max_pos,
        "rms_norm_eps": cfg.norm_eps,
        # both RoPE spellings: `rope_parameters` (transformers >= 5) and `rope_theta` / `rope_scaling` (4.x)
        "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": kind, "rope_theta": cfg.rope_base, **scaling},
        "rope_scaling": {"rope_type": kind, "type": kind, **scaling} if kind != "default" else None,
        "attention_dropout": cfg.dropout, "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True, "dtype": "float32", **special,
    }
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias, pretraining_tp=1)
    elif arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM"):
        out["attention_bias"] = False
    if arch in MOE_ARCHITECTURES:
        out.update(moe_hf_config(cfg, arch))
    window = cfg.sliding_window
    if arch in QWEN_STYLE:
        types = cfg.layer_types or ["sliding_attention" if window else "full_attention"] * cfg.n_layer
        out.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=cfg.n_layer,
                   layer_types=types)
    elif arch == "Gemma2ForCausalLM":
        types = cfg.layer_types or ["sliding_attention" if window else "full_attention"] * cfg.n_layer
        out.update(hidden_activation=out.pop("hidden_act"), sliding_window=window or cfg.block_size,
                   layer_types=types, query_pre_attn_scalar=_query_pre_attn_scalar(cfg),
                   attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)
    elif arch != "GemmaForCausalLM":  # Mistral, Phi-3, Mixtral, Qwen3-MoE: one window for every layer (or none)
        out["sliding_window"] = window
        if arch == "Qwen3MoeForCausalLM":  # its config drops sliding_window unless use_sliding_window
            out["use_sliding_window"] = window is not None
    if arch == "Phi3ForCausalLM":
        partial = cfg.rope_dim / cfg.head_dim
        out.update(resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, partial_rotary_factor=partial)
        out["rope_parameters"]["partial_rotary_factor"] = partial
        if kind == "longrope":
            out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return out


def _with_tokenizer(out: Path, src_dir: Path | None) -> Path:
    """Copy the tokenizer files of an llmkit model dir: tokenizer.json and tokenizer_config.json (special-token
    names, added tokens and the chat template as Jinja, which transformers reads)."""
    if src_dir is not None and (src_dir / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (src_dir / name).is_file():
                shutil.copyfile(src_dir / name, Path(out) / name)
    return Path(out)


def export_hf(model_dir_or_model: str | Path | torch.nn.Module, out_dir: str | Path) -> Path:
    """Write an llmkit model as a Hugging Face model directory; returns `out_dir`.

    Encoders export as BERT (`BertForMaskedLM` / `BertForSequenceClassification`), encoder-decoders as
    `T5ForConditionalGeneration`; for decoders:

    Learned positions + layernorm + gelu/gelu_tanh/relu export as ``GPT2LMHeadModel``; rope + rmsnorm models
    as their `hf_architecture` (the one they were imported from) or else the simplest Llama-family
    architecture that has their options (`_hf_arch`); any option the target cannot express is refused with a
    `ValueError` naming the field.
    Writes config.json, generation_config.json, model.safetensors (fp32) and, when the llmkit model dir
    has one, tokenizer.json. Load the result with ``AutoModelForCausalLM.from_pretrained(out_dir)``.
    """
    src_dir = None
    if isinstance(model_dir_or_model, torch.nn.Module):
        model = model_dir_or_model
    else:
        src_dir = Path(model_dir_or_model)
        model = load_model(src_dir)
    require_plain(model, "export_hf")
    if any(t.dtype == torch.int8 for t in model.state_dict().values()):
        raise ValueError("export_hf writes floating-point models and this one is INT8-quantized "
                         "(llmkit quantize): export the model dir it was quantized from")
    if model.config.FAMILY == "encoder":
        from llmkit.models.hf_bert import export_bert

        return _with_tokenizer(export_bert(model, out_dir), src_dir)
    if model.config.FAMILY == "encdec":
        from llmkit.models.hf_t5 import export_t5

        return _with_tokenizer(export_t5(model, out_dir), src_dir)
    if not isinstance(model, Decoder):
        raise TypeError(f"export_hf handles llmkit models, not {type(model).__name__}")
    cfg = model.config
    arch = _hf_arch(cfg)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    mapped = _gpt2_from_llmkit(sd, cfg) if arch == "GPT2LMHeadModel" else _llama_from_llmkit(sd, cfg, arch)
    tensors = {k: v.contiguous().clone() for k, v in mapped.items()}  # clone: no shared storage
    gen = {k: v for k, v in (load_generation_config(src_dir) if src_dir else {}).items() if k in _SPECIAL_IDS}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_hf_config(cfg, arch, gen), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({**gen, "_from_model_config": True}, indent=2) + "\n")
    return _with_tokenizer(out, src_dir)
