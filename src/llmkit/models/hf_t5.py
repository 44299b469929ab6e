"""Hugging Face interop for the encoder-decoder family: ``T5ForConditionalGeneration`` <-> `EncoderDecoder`.

Original T5 (``feed_forward_proj: relu``, tied embeddings, decoder output scaled by d_model**-0.5) and
T5 v1.1 / Flan-T5 (``gated-gelu``, untied ``lm_head``, no scaling) are supported; other feed-forward
variants are refused naming the key. Neither function needs `transformers`.

Name mapping (HF -> llmkit), per block i:

    shared.weight                                          shared.weight
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   encoder.rel_bias.weight
    encoder.block.{i}.layer.0.layer_norm.weight            encoder.blocks.{i}.norm1.weight
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v}        encoder.blocks.{i}.attn.qkv   (concatenated)
    encoder.block.{i}.layer.0.SelfAttention.o              encoder.blocks.{i}.attn.proj
    encoder.block.{i}.layer.1.layer_norm                   encoder.blocks.{i}.norm2
    encoder.block.{i}.layer.1.DenseReluDense.{wi|wi_1, wi_0, wo}   encoder.blocks.{i}.mlp.{up, gate, down}
    encoder.final_layer_norm                               encoder.norm_f
    decoder.block.{i}.layer.0 (SelfAttention, layer_norm)  decoder.blocks.{i}.self_attn, norm1
    decoder.block.{i}.layer.1 (EncDecAttention, layer_norm)  decoder.blocks.{i}.cross_attn (q; k,v -> kv), norm2
    decoder.block.{i}.layer.2 (DenseReluDense, layer_norm) decoder.blocks.{i}.mlp, norm3
    decoder.final_layer_norm                               decoder.norm_f
    lm_head.weight                                         lm_head.weight (untied models only)

Tying: transformers 4.x writes ``tie_word_embeddings: false`` for T5 v1.1; transformers 5.x always ties
the head in memory and records the (absence of) output scaling as ``scale_decoder_outputs``. Either key
false -> llmkit ``tie_embeddings=False`` (no scaling, own ``lm_head``, copied from ``shared`` when the
checkpoint has no distinct lm_head.weight).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmkit.models.encdec import EncDecConfig, EncoderDecoder
from llmkit.models.hf_weights import read_hf_weights

__all__ = ["export_t5", "import_t5", "t5_config_from_hf"]

ARCHITECTURE = "T5ForConditionalGeneration"
_FF = {"relu": "relu", "gated-gelu": "gated-gelu"}


def t5_config_from_hf(hf_config: dict[str, Any]) -> EncDecConfig:
    """An `EncDecConfig` from a HF T5 config.json dict; refuses what llmkit cannot reproduce exactly."""
    hf = hf_config
    archs = hf.get("architectures") or [ARCHITECTURE]
    if hf.get("model_type", "t5") != "t5" or archs[0] not in (ARCHITECTURE, "T5Model"):
        raise ValueError(f"architectures: {archs!r} / model_type {hf.get('model_type')!r} is not T5 "
                         f"(supported: {ARCHITECTURE})")
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in _FF:
        raise ValueError(f"feed_forward_proj: {ff!r} is not supported (supported: {sorted(_FF)})")
    if "dense_act_fn" in hf and hf["dense_act_fn"] != ("gelu_new" if ff == "gated-gelu" else "relu"):
        raise ValueError(f"dense_act_fn: {hf['dense_act_fn']!r} does not match feed_forward_proj {ff!r}")
    if hf.get("is_gated_act") is not None and hf["is_gated_act"] != (ff == "gated-gelu"):
        raise ValueError(f"is_gated_act: {hf['is_gated_act']!r} does not match feed_forward_proj {ff!r}")
    scale = hf.get("scale_decoder_outputs")  # transformers >= 5
    tie = bool(scale) if scale is not None else hf.get("tie_word_embeddings", True) is not False
    d_model = hf.get("d_model", 512)
    n_layer = hf.get("num_layers", 6)
    pad = hf.get("pad_token_id")
    pad = 0 if pad is None else pad
    start = hf.get("decoder_start_token_id")
    return EncDecConfig(
        vocab_size=hf.get("vocab_size", 32128), block_size=hf.get("n_positions", 512), n_layer=n_layer,
        n_decoder_layer=hf.get("num_decoder_layers") or n_layer, d_model=d_model,
        n_head=hf.get("num_heads", 8), d_kv=hf.get("d_kv", 64), d_ff=hf.get("d_ff", 2048), activation=_FF[ff],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout=hf.get("dropout_rate", 0.1), norm_eps=hf.get("layer_norm_epsilon", 1e-6), tie_embeddings=tie,
        pad_token_id=pad, decoder_start_token_id=pad if start is None else start,
    )


def _mlp_names(cfg: EncDecConfig) -> list[tuple[str, str]]:
    if cfg.activation == "gated-gelu":
        return [("wi_1", "up"), ("wi_0", "gate"), ("wo", "down")]
    return [("wi", "up"), ("wo", "down")]


def _from_hf(sd: dict[str, torch.Tensor], cfg: EncDecConfig) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    out = {"shared.weight": sd.pop("shared.weight")}
    for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        w = sd.pop(key, None)
        if w is not None and not torch.equal(w, out["shared.weight"]):
            raise ValueError(f"{key}: differs from shared.weight (llmkit shares one token embedding)")
    sd.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)  # unused by HF too
    lm = sd.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = lm if lm is not None else out["shared.weight"].clone()
    elif lm is not None and not torch.equal(lm, out["shared.weight"]):
        raise ValueError("lm_head.weight: differs from shared.weight while the config ties embeddings "
                         "(tie_word_embeddings / scale_decoder_outputs)")
    for stack, n in (("encoder", cfg.n_layer), ("decoder", cfg.n_decoder_layer)):
        out[f"{stack}.rel_bias.weight"] = sd.pop(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        mlp_layer = 1 if stack == "encoder" else 2
        for i in range(n):
            h, b = f"{stack}.block.{i}.", f"{stack}.blocks.{i}."
            self_name = "attn" if stack == "encoder" else "self_attn"
            a = h + "layer.0.SelfAttention."
            out[b + "norm1.weight"] = sd.pop(h + "layer.0.layer_norm.weight")
            out[b + f"{self_name}.qkv.weight"] = torch.cat([sd.pop(a + f"{p}.weight") for p in "qkv"], dim=0)
            out[b + f"{self_name}.proj.weight"] = sd.pop(a + "o.weight")
            if stack == "decoder":
                c = h + "layer.1.EncDecAttention."
                out[b + "norm2.weight"] = sd.pop(h + "layer.1.layer_norm.weight")
                out[b + "cross_attn.q.weight"] = sd.pop(c + "q.weight")
                out[b + "cross_attn.kv.weight"] = torch.cat([sd.pop(c + "k.weight"), sd.pop(c + "v.weight")], 0)
                out[b + "cross_attn.proj.weight"] = sd.pop(c + "o.weight")
            f = h + f"layer.{mlp_layer}."
            out[b + f"norm{mlp_layer + 1}.weight"] = sd.pop(f + "layer_norm.weight")
            for src, dst in _mlp_names(cfg):
                out[b + f"mlp.{dst}.weight"] = sd.pop(f + f"DenseReluDense.{src}.weight")
        out[f"{stack}.norm_f.weight"] = sd.pop(f"{stack}.final_layer_norm.weight")
    if sd:
        extra = sorted(sd)
        raise ValueError(f"unexpected tensors in the checkpoint (not mapped to llmkit): {extra[:8]}"
                         + (f" and {len(extra) - 8} more" if len(extra) > 8 else ""))
    return out


def _build(cfg: EncDecConfig, state: dict[str, torch.Tensor]) -> EncoderDecoder:
    """An EncoderDecoder holding `state` (fp32, eval mode), built without running the random init."""
    with torch.device("meta"):
        model = EncoderDecoder(cfg)
    model = model.to_empty(device="cpu")
    own = model.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} != expected {tuple(own[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def import_t5(src_dir: str | Path) -> EncoderDecoder:
    """Read a local HF ``T5ForConditionalGeneration`` directory (config.json + model.safetensors, a sharded
    safetensors index, or pytorch_model.bin) into an llmkit `EncoderDecoder` (fp32, eval mode)."""
    src = Path(src_dir)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src}: not a Hugging Face model directory (no config.json)")
    cfg = t5_config_from_hf(json.loads(cfg_path.read_text()))
    try:
        state = _from_hf(read_hf_weights(src), cfg)
    except KeyError as e:
        raise ValueError(f"{src}: {ARCHITECTURE} checkpoint lacks tensor {e.args[0]!r}") from None
    return _build(cfg, state)


def _to_hf(sd: dict[str, torch.Tensor], cfg: EncDecConfig) -> dict[str, torch.Tensor]:
    inner = cfg.n_head * cfg.d_kv
    out = {"shared.weight": sd["shared.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for stack, n in (("encoder", cfg.n_layer), ("decoder", cfg.n_decoder_layer)):
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = sd[f"{stack}.rel_bias.weight"]
        out[f"{stack}.final_layer_norm.weight"] = sd[f"{stack}.norm_f.weight"]
        mlp_layer = 1 if stack == "encoder" else 2
        self_name = "attn" if stack == "encoder" else "self_attn"
        for i in range(n):
            h, b = f"{stack}.block.{i}.", f"{stack}.blocks.{i}."
            a = h + "layer.0.SelfAttention."
            out[h + "layer.0.layer_norm.weight"] = sd[b + "norm1.weight"]
            for p, w in zip("qkv", sd[b + f"{self_name}.qkv.weight"].split(inner, dim=0), strict=True):
                out[a + f"{p}.weight"] = w
            out[a + "o.weight"] = sd[b + f"{self_name}.proj.weight"]
            if stack == "decoder":
                c = h + "layer.1.EncDecAttention."
                out[h + "layer.1.layer_norm.weight"] = sd[b + "norm2.weight"]
                out[c + "q.weight"] = sd[b + "cross_attn.q.weight"]
                out[c + "k.weight"], out[c + "v.weight"] = sd[b + "cross_attn.kv.weight"].split(inner, dim=0)
                out[c + "o.weight"] = sd[b + "cross_attn.proj.weight"]
            f = h + f"layer.{mlp_layer}."
            out[f + "layer_norm.weight"] = sd[b + f"norm{mlp_layer + 1}.weight"]
            for src, dst in _mlp_names(cfg):
                out[f + f"DenseReluDense.{src}.weight"] = sd[b + f"mlp.{dst}.weight"]
    return out


def export_t5(model: EncoderDecoder, out_dir: str | Path, eos_token_id: int | None = None) -> Path:
    """Write `model` as a HF ``T5ForConditionalGeneration`` directory (config.json, generation_config.json,
    model.safetensors in fp32); returns `out_dir`. Load it with
    ``T5ForConditionalGeneration.from_pretrained(out_dir)``. `eos_token_id` (None: generation stops only
    at max_new_tokens) goes into both configs."""
    if not isinstance(model, EncoderDecoder):
        raise TypeError(f"export_t5 handles llmkit EncoderDecoder models, not {type(model).__name__}")
    cfg = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    tensors = {k: v.contiguous().clone() for k, v in _to_hf(sd, cfg).items()}  # clone: no shared storage
    hf = {
        "architectures": [ARCHITECTURE], "model_type": "t5", "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_layers": cfg.n_layer,
        "num_decoder_layers": cfg.n_decoder_layer, "num_heads": cfg.n_head,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout, "layer_norm_epsilon": cfg.norm_eps, "initializer_factor": 1.0,
        "feed_forward_proj": cfg.activation, "is_encoder_decoder": True, "use_cache": True,
        "n_positions": cfg.block_size, "pad_token_id": cfg.pad_token_id, "eos_token_id": eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        # 4.x reads tie_word_embeddings, 5.x scale_decoder_outputs (and ties the head only when the
        # checkpoint has no distinct lm_head.weight)
        "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.tie_embeddings,
        "dtype": "float32",
    }
    gen = {"decoder_start_token_id": cfg.decoder_start_token_id, "pad_token_id": cfg.pad_token_id,
           "eos_token_id": eos_token_id, "_from_model_config": True}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out
