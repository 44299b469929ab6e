"""Hugging Face checkpoint interop for the decoder family: `import_hf` and `export_hf`.

Supported architectures (see docs/hf.md for the full name mapping):

* ``GPT2LMHeadModel``: learned positions, LayerNorm, GELU (``gelu_new`` -> llmkit ``gelu_tanh``), biases,
  Conv1D weights (stored (in, out), transposed relative to `nn.Linear`).
* ``LlamaForCausalLM`` (and ``MistralForCausalLM`` without a sliding window, imported as Llama): RoPE
  (half-split pairing over the full head), RMSNorm, SwiGLU, grouped-query attention; q/k/v projections
  are concatenated into llmkit's fused ``qkv``.

Everything else is refused with a `ValueError` naming the config key that llmkit cannot reproduce exactly
(rope scaling, sliding windows, partial rotary, Qwen2's q/k/v-only biases, ...). Neither function needs
`transformers`: the HF files (config.json, safetensors) are read and written directly.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmkit.models.decoder import Decoder, DecoderConfig
from llmkit.models.io import load_generation_config, load_model, require_plain, save_model
from llmkit.models.layers import rope_cache

__all__ = ["SUPPORTED_ARCHITECTURES", "export_hf", "import_hf"]

SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM")

_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_GPT2_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


# -- reading HF files -------------------------------------------------------------------------------


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


def _rope_theta(hf: dict[str, Any], default: float = 10000.0) -> float:
    """rope_theta from either config format; refuses any RoPE variant other than the plain one."""
    params = hf.get("rope_parameters")  # transformers >= 5
    if params is not None:
        if "rope_type" not in params and isinstance(next(iter(params.values()), None), dict):
            raise ValueError("rope_parameters: per-layer-type RoPE parameters are not supported")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_parameters: rope_type {rope_type!r} is not supported (only plain RoPE)")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor: partial rotary embeddings are not supported")
        theta = params.get("rope_theta", hf.get("rope_theta", default))
    else:
        theta = hf.get("rope_theta", default)
    scaling = hf.get("rope_scaling")  # transformers 4.x
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "default":
        raise ValueError(f"rope_scaling: {scaling!r} is not supported (only plain RoPE, rope_scaling: null)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor: partial rotary embeddings are not supported")
    return float(theta)


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


def _llama_config(hf: dict[str, Any], arch: str) -> DecoderConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act: {act!r} is not supported (llmkit's swiglu uses silu)")
    window = hf.get("sliding_window")
    block_size = hf.get("max_position_embeddings", 2048)
    if window is not None and hf.get("use_sliding_window", True) and window < block_size:
        raise ValueError(f"sliding_window: {window} < max_position_embeddings={block_size} is not supported")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ValueError(
            f"attention_bias/mlp_bias: {attn_bias}/{mlp_bias} differ; llmkit has one `bias` switch for both")
    d_model, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d_model // n_head
    if head_dim * n_head != d_model:
        raise ValueError(f"head_dim: {head_dim} * num_attention_heads={n_head} != hidden_size={d_model} "
                         "is not supported")
    n_kv = hf.get("num_key_value_heads") or n_head
    return DecoderConfig(
        vocab_size=hf["vocab_size"], block_size=block_size, n_layer=hf["num_hidden_layers"],
        d_model=d_model, n_head=n_head, n_kv_head=n_kv if n_kv != n_head else None,
        d_ff=hf["intermediate_size"], activation="swiglu", norm="rmsnorm", positions="rope",
        rope_base=_rope_theta(hf), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=attn_bias, norm_eps=hf.get("rms_norm_eps", 1e-6), dropout=0.0,
    )


def hf_config_to_llmkit(hf: dict[str, Any]) -> tuple[str, DecoderConfig]:
    """(architecture, DecoderConfig) for a HF config.json dict; ValueError for anything unsupported."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                                   "mistral": "MistralForCausalLM"}.get(hf.get("model_type", ""), "")
    if arch not in SUPPORTED_ARCHITECTURES:
        hint = " (Qwen2 needs q/k/v-only biases, which llmkit does not have)" if arch.startswith("Qwen") else ""
        raise ValueError(f"architectures: {arch or hf.get('model_type')!r} is not supported{hint}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
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


def _llama_to_llmkit(sd: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    out = {"tok_emb.weight": sd.pop("model.embed_tokens.weight"), "norm_f.weight": sd.pop("model.norm.weight")}
    names = ["weight"] + (["bias"] if cfg.bias else [])
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out[b + "norm1.weight"] = sd.pop(h + "input_layernorm.weight")
        out[b + "norm2.weight"] = sd.pop(h + "post_attention_layernorm.weight")
        for n in names:
            out[b + f"attn.qkv.{n}"] = torch.cat([sd.pop(h + f"self_attn.{p}_proj.{n}") for p in "qkv"], dim=0)
            out[b + f"attn.proj.{n}"] = sd.pop(h + f"self_attn.o_proj.{n}")
            for src, dst in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                out[b + f"mlp.{dst}.{n}"] = sd.pop(h + f"mlp.{src}.{n}")
        sd.pop(h + "self_attn.rotary_emb.inv_freq", None)  # buffer in old checkpoints
    lm = sd.pop("lm_head.weight", None)
    if lm is None and not cfg.tie_embeddings:
        raise ValueError("lm_head.weight: missing while tie_word_embeddings is false")
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else lm
    no_leftovers(sd)
    return out


def no_leftovers(sd: dict[str, torch.Tensor]) -> None:
    if sd:
        extra = sorted(sd)
        raise ValueError(f"unexpected tensors in the checkpoint (not mapped to llmkit): {extra[:8]}"
                         + (f" and {len(extra) - 8} more" if len(extra) > 8 else ""))


def _build(cfg: DecoderConfig, state: dict[str, torch.Tensor]) -> Decoder:
    """A Decoder holding `state` (fp32), built without running the random init."""
    with torch.device("meta"):
        model = Decoder(cfg)
    model = model.to_empty(device="cpu")
    if cfg.positions == "rope":
        model.rope_cos, model.rope_sin = rope_cache(cfg.block_size, cfg.head_dim, cfg.rope_base)
    own = model.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} != expected {tuple(own[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()


def _import_decoder(src: Path, hf: dict[str, Any]) -> Decoder:
    arch, cfg = hf_config_to_llmkit(hf)
    weights = read_hf_weights(src)
    mapper = _gpt2_to_llmkit if arch == "GPT2LMHeadModel" else _llama_to_llmkit
    try:
        state = mapper(weights, cfg)
    except KeyError as e:
        raise ValueError(f"{src}: {arch} checkpoint lacks tensor {e.args[0]!r}") from None
    return _build(cfg, state)


def import_hf(src_dir: str | Path, out_dir: str | Path | None = None) -> torch.nn.Module:
    """Read a local Hugging Face model directory into an llmkit model (fp32, eval mode).

    GPT-2 / Llama / Mistral become a `Decoder`, BERT an `Encoder` (or `EncoderClassifier`), T5 an
    `EncoderDecoder`, chosen by config.json's `architectures`. `src_dir` holds config.json and the weights
    (model.safetensors, sharded safetensors with an index, or pytorch_model.bin). With `out_dir`, also writes
    an llmkit model directory there; the HF tokenizer.json is copied when it loads as an llmkit `Tokenizer`,
    otherwise skipped with a warning.
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

            try:
                tokenizer = Tokenizer.load(src)
            except ValueError as e:
                warnings.warn(f"{src / 'tokenizer.json'} is not an llmkit tokenizer, not copied: {e}",
                              stacklevel=2)
        else:
            warnings.warn(f"{src} has no tokenizer.json; the llmkit model dir gets none", stacklevel=2)
        gen_path = src / "generation_config.json"
        gen_src = json.loads(gen_path.read_text()) if gen_path.is_file() else hf
        gen = {k: gen_src[k] for k in _SPECIAL_IDS if gen_src.get(k) is not None}
        save_model(model, out_dir, tokenizer=tokenizer, generation_config=gen)
    return model


# -- export -----------------------------------------------------------------------------------------


def _refuse(field: str, value: Any, arch: str, why: str = "") -> None:
    raise ValueError(f"{field}: {value!r} cannot be exported as {arch}{': ' + why if why else ''}")


def _hf_arch(cfg: DecoderConfig) -> str:
    if cfg.positions == "learned":
        if cfg.norm != "layernorm":
            _refuse("norm", cfg.norm, "GPT2LMHeadModel", "learned positions export as GPT-2, which uses layernorm")
        if cfg.activation not in _GPT2_ACT_OUT:
            _refuse("activation", cfg.activation, "GPT2LMHeadModel", f"supported: {sorted(_GPT2_ACT_OUT)}")
        if cfg.kv_heads != cfg.n_head:
            _refuse("n_kv_head", cfg.n_kv_head, "GPT2LMHeadModel", "GPT-2 has no grouped-query attention")
        return "GPT2LMHeadModel"
    if cfg.norm != "rmsnorm":
        _refuse("norm", cfg.norm, "LlamaForCausalLM", "rope models export as Llama, which uses rmsnorm")
    if cfg.activation != "swiglu":
        _refuse("activation", cfg.activation, "LlamaForCausalLM", "Llama uses swiglu")
    return "LlamaForCausalLM"


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


def _llama_from_llmkit(sd: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    q_dim, kv_dim = cfg.d_model, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"]}
    names = ["weight"] + (["bias"] if cfg.bias else [])
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out[h + "input_layernorm.weight"] = sd[b + "norm1.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[b + "norm2.weight"]
        for n in names:
            q, k, v = sd[b + f"attn.qkv.{n}"].split((q_dim, kv_dim, kv_dim), dim=0)
            out[h + f"self_attn.q_proj.{n}"], out[h + f"self_attn.k_proj.{n}"] = q, k
            out[h + f"self_attn.v_proj.{n}"] = v
            out[h + f"self_attn.o_proj.{n}"] = sd[b + f"attn.proj.{n}"]
            for dst, src in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                out[h + f"mlp.{dst}.{n}"] = sd[b + f"mlp.{src}.{n}"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


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
    return {
        "architectures": [arch], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        # both RoPE spellings: `rope_parameters` (transformers >= 5) and `rope_theta` (4.x)
        "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "rope_scaling": None, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout, "tie_word_embeddings": cfg.tie_embeddings, "pretraining_tp": 1,
        "use_cache": True, "dtype": "float32", **special,
    }


def _with_tokenizer(out: Path, src_dir: Path | None) -> Path:
    if src_dir is not None and (src_dir / "tokenizer.json").is_file():
        shutil.copyfile(src_dir / "tokenizer.json", Path(out) / "tokenizer.json")
    return Path(out)


def export_hf(model_dir_or_model: str | Path | torch.nn.Module, out_dir: str | Path) -> Path:
    """Write an llmkit model as a Hugging Face model directory; returns `out_dir`.

    Encoders export as BERT (`BertForMaskedLM` / `BertForSequenceClassification`), encoder-decoders as
    `T5ForConditionalGeneration`; for decoders:

    Learned positions + layernorm + gelu/gelu_tanh/relu export as ``GPT2LMHeadModel``; rope + rmsnorm +
    swiglu as ``LlamaForCausalLM``; any other combination is refused with a `ValueError` naming the field.
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
    mapper = _gpt2_from_llmkit if arch == "GPT2LMHeadModel" else _llama_from_llmkit
    tensors = {k: v.contiguous().clone() for k, v in mapper(sd, cfg).items()}  # clone: no shared storage
    gen = {k: v for k, v in (load_generation_config(src_dir) if src_dir else {}).items() if k in _SPECIAL_IDS}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_hf_config(cfg, arch, gen), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({**gen, "_from_model_config": True}, indent=2) + "\n")
    if src_dir is not None and (src_dir / "tokenizer.json").is_file():
        shutil.copyfile(src_dir / "tokenizer.json", out / "tokenizer.json")
    return out
