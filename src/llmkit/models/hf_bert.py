"""Hugging Face checkpoint interop for the encoder family (BERT): `import_bert` and `export_bert`.

Architectures:

* ``BertForMaskedLM``, ``BertForPreTraining`` and ``BertModel`` import as `Encoder` (the NSP head of
  ``BertForPreTraining`` and the pooler are dropped; ``BertModel`` has no MLM head, so `mlm_head` keeps
  its fresh initialisation and a warning says so);
* ``BertForSequenceClassification`` imports as `EncoderClassifier`.

Export goes the other way: `Encoder` -> ``BertForMaskedLM``, `EncoderClassifier` ->
``BertForSequenceClassification`` (config.json + model.safetensors, fp32), loadable with
``from_pretrained``. Name mapping (HF ``bert.`` prefix omitted):

=============================================================  =========================================
HF                                                             llmkit
=============================================================  =========================================
embeddings.{word,position,token_type}_embeddings               tok_emb, pos_emb, type_emb
embeddings.LayerNorm                                           emb_norm
encoder.layer.{i}.attention.self.{query,key,value}             blocks.{i}.attn.qkv (rows [q; k; v])
encoder.layer.{i}.attention.output.dense / .LayerNorm          blocks.{i}.attn.proj / blocks.{i}.norm1
encoder.layer.{i}.intermediate.dense / output.dense            blocks.{i}.mlp.up / blocks.{i}.mlp.down
encoder.layer.{i}.output.LayerNorm                             blocks.{i}.norm2
cls.predictions.transform.dense / .LayerNorm, .bias            mlm_head.dense / mlm_head.norm, mlm_head.bias
cls.predictions.decoder.weight                                 (tied to tok_emb.weight)
pooler.dense, classifier (sequence classification)             pooler, classifier (llmkit prefix encoder.)
=============================================================  =========================================

Config keys llmkit cannot reproduce exactly (relative position embeddings, decoder/cross-attention use,
untied MLM decoder, multi-label problem type, unknown activations) are refused with a `ValueError`
naming the key. Neither function needs `transformers`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmkit.models.encoder import Encoder, EncoderClassifier, EncoderConfig
from llmkit.models.hf_weights import no_leftovers, read_hf_weights

__all__ = ["BERT_ARCHITECTURES", "bert_config_from_hf", "export_bert", "import_bert"]

BERT_ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining", "BertModel", "BertForSequenceClassification")

_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _bert_arch(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"model_type: {model_type!r} is not supported by the BERT importer (only 'bert')")
    arch = archs[0] if archs else "BertForMaskedLM"
    if arch not in BERT_ARCHITECTURES:
        raise ValueError(f"architectures: {arch!r} is not supported; supported: {', '.join(BERT_ARCHITECTURES)}")
    return arch


def bert_config_from_hf(hf_config: dict[str, Any]) -> EncoderConfig:
    """EncoderConfig for a HF BERT config.json dict; ValueError naming the key for anything unsupported."""
    hf = hf_config
    arch = _bert_arch(hf)
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ValueError(f"position_embedding_type: {pos_type!r} is not supported (only 'absolute')")
    for key in ("is_decoder", "add_cross_attention"):
        if hf.get(key):
            raise ValueError(f"{key}: true is not supported (llmkit's encoder is bidirectional, no cross-attention)")
    if arch != "BertForSequenceClassification" and hf.get("tie_word_embeddings", True) is False:
        raise ValueError("tie_word_embeddings: false is not supported (llmkit's MLM decoder is the word embedding)")
    if hf.get("problem_type") == "multi_label_classification":
        raise ValueError("problem_type: 'multi_label_classification' is not supported (single-label or regression)")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACT_IN:
        raise ValueError(f"hidden_act: {act!r} is not supported (supported: {sorted(_ACT_IN)})")
    d_model = hf.get("hidden_size", 768)
    n_head = hf.get("num_attention_heads", 12)
    if d_model % n_head:
        raise ValueError(f"num_attention_heads: {n_head} does not divide hidden_size={d_model}")
    id2label = hf.get("id2label")
    n_labels = len(id2label) if id2label else hf.get("num_labels", 2)
    cfg = EncoderConfig(
        vocab_size=hf.get("vocab_size", 30522), block_size=hf.get("max_position_embeddings", 512),
        n_layer=hf.get("num_hidden_layers", 12), d_model=d_model, n_head=n_head,
        d_ff=hf.get("intermediate_size", 4 * d_model), activation=_ACT_IN[act],
        dropout=float(hf.get("hidden_dropout_prob", 0.1)), bias=True, norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        type_vocab_size=hf.get("type_vocab_size", 2), n_labels=n_labels,
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
    )
    cfg.validate()
    return cfg


# -- import -----------------------------------------------------------------------------------------


def _normalise_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `bert.` prefix and rename old TF-era `LayerNorm.gamma/beta` to `weight/bias`."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("bert.")
        if ".LayerNorm." in k or k.startswith("LayerNorm."):
            k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    return out


def _encoder_from_hf(sd: dict[str, torch.Tensor], cfg: EncoderConfig, prefix: str) -> dict[str, torch.Tensor]:
    """Pop the embedding and block tensors out of `sd` (normalised names) into llmkit names under `prefix`."""
    e = "embeddings."
    out = {prefix + "tok_emb.weight": sd.pop(e + "word_embeddings.weight"),
           prefix + "pos_emb.weight": sd.pop(e + "position_embeddings.weight"),
           prefix + "type_emb.weight": sd.pop(e + "token_type_embeddings.weight"),
           prefix + "emb_norm.weight": sd.pop(e + "LayerNorm.weight"),
           prefix + "emb_norm.bias": sd.pop(e + "LayerNorm.bias")}
    sd.pop(e + "position_ids", None)  # buffers stored by older checkpoints
    sd.pop(e + "token_type_ids", None)
    for i in range(cfg.n_layer):
        h, b = f"encoder.layer.{i}.", f"{prefix}blocks.{i}."
        for n in ("weight", "bias"):
            out[b + f"attn.qkv.{n}"] = torch.cat(
                [sd.pop(h + f"attention.self.{p}.{n}") for p in ("query", "key", "value")], dim=0)
            for src, dst in (("attention.output.dense", "attn.proj"), ("attention.output.LayerNorm", "norm1"),
                             ("intermediate.dense", "mlp.up"), ("output.dense", "mlp.down"),
                             ("output.LayerNorm", "norm2")):
                out[b + f"{dst}.{n}"] = sd.pop(h + f"{src}.{n}")
    return out


def _mlm_from_hf(sd: dict[str, torch.Tensor], tok_emb: torch.Tensor) -> dict[str, torch.Tensor]:
    p = "cls.predictions."
    bias = sd.pop(p + "bias", None)
    dec_bias = sd.pop(p + "decoder.bias", None)
    if bias is None:
        bias = dec_bias
    if bias is None:
        raise KeyError(p + "bias")
    dec = sd.pop(p + "decoder.weight", None)
    if dec is not None and not torch.equal(dec, tok_emb):
        raise ValueError(f"{p}decoder.weight: differs from the word embeddings; llmkit ties them")
    out = {"mlm_head.bias": bias}
    for src, dst in (("transform.dense", "dense"), ("transform.LayerNorm", "norm")):
        for n in ("weight", "bias"):
            out[f"mlm_head.{dst}.{n}"] = sd.pop(f"{p}{src}.{n}")
    return out


def import_bert(src_dir: str | Path) -> Encoder | EncoderClassifier:
    """Read a local Hugging Face BERT directory into an llmkit `Encoder` or `EncoderClassifier` (fp32, eval).

    `src_dir` holds config.json and the weights (model.safetensors, sharded safetensors with an index, or
    pytorch_model.bin, read with ``torch.load(weights_only=True)``).
    """
    src = Path(src_dir)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src}: not a Hugging Face model directory (no config.json)")
    hf = json.loads(cfg_path.read_text())
    arch = _bert_arch(hf)
    cfg = bert_config_from_hf(hf)
    sd = _normalise_keys(read_hf_weights(src))
    try:
        if arch == "BertForSequenceClassification":
            model: Encoder | EncoderClassifier = EncoderClassifier(cfg)
            state = _encoder_from_hf(sd, cfg, "encoder.")
            for src_name, dst in (("pooler.dense", "pooler"), ("classifier", "classifier")):
                for n in ("weight", "bias"):
                    state[f"{dst}.{n}"] = sd.pop(f"{src_name}.{n}")
            missing_ok: set[str] = set()
        else:
            model = Encoder(cfg)
            state = _encoder_from_hf(sd, cfg, "")
            for n in ("weight", "bias"):  # the pooler (and the NSP head) have no llmkit counterpart
                sd.pop(f"pooler.dense.{n}", None)
                sd.pop(f"cls.seq_relationship.{n}", None)
            if any(k.startswith("cls.predictions.") for k in sd):
                state.update(_mlm_from_hf(sd, state["tok_emb.weight"]))
                missing_ok = set()
            else:
                warnings.warn(f"{src}: {arch} has no MLM head; mlm_head.* keeps its random initialisation",
                              stacklevel=2)
                missing_ok = {k for k in model.state_dict() if k.startswith("mlm_head.")}
    except KeyError as e:
        raise ValueError(f"{src}: {arch} checkpoint lacks tensor {e.args[0]!r}") from None
    no_leftovers(sd)
    own = model.state_dict()
    for k, v in state.items():
        if k not in own:
            raise ValueError(f"{k}: no such parameter in the llmkit model")
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} != expected {tuple(own[k].shape)}")
    missing = set(own) - set(state) - missing_ok
    if missing:
        raise ValueError(f"{src}: {arch} checkpoint lacks tensors for {sorted(missing)[:8]}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model.eval()


# -- export -----------------------------------------------------------------------------------------


def _encoder_to_hf(sd: dict[str, torch.Tensor], cfg: EncoderConfig, prefix: str) -> dict[str, torch.Tensor]:
    C = cfg.d_model

    def get(key: str, n: int) -> torch.Tensor:  # bias=False: zero biases are the same function
        return sd[key] if key in sd else torch.zeros(n)

    e = "bert.embeddings."
    out = {e + "word_embeddings.weight": sd[prefix + "tok_emb.weight"],
           e + "position_embeddings.weight": sd[prefix + "pos_emb.weight"],
           e + "token_type_embeddings.weight": sd[prefix + "type_emb.weight"],
           e + "LayerNorm.weight": sd[prefix + "emb_norm.weight"],
           e + "LayerNorm.bias": get(prefix + "emb_norm.bias", C)}
    for i in range(cfg.n_layer):
        h, b = f"bert.encoder.layer.{i}.", f"{prefix}blocks.{i}."
        qkv_w = sd[b + "attn.qkv.weight"]
        qkv_b = get(b + "attn.qkv.bias", 3 * C)
        for name, w, bias in zip(("query", "key", "value"), qkv_w.split(C, dim=0), qkv_b.split(C, dim=0)):
            out[h + f"attention.self.{name}.weight"] = w
            out[h + f"attention.self.{name}.bias"] = bias
        for dst, src, n_out in (("attention.output.dense", "attn.proj", C), ("attention.output.LayerNorm", "norm1", C),
                                ("intermediate.dense", "mlp.up", cfg.d_ff), ("output.dense", "mlp.down", C),
                                ("output.LayerNorm", "norm2", C)):
            out[h + f"{dst}.weight"] = sd[b + f"{src}.weight"]
            out[h + f"{dst}.bias"] = get(b + f"{src}.bias", n_out)
    return out


def _hf_bert_config(cfg: EncoderConfig, arch: str) -> dict[str, Any]:
    if cfg.activation not in _ACT_OUT:
        raise ValueError(f"activation: {cfg.activation!r} cannot be exported as {arch}")
    out = {
        "architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.d_ff, "hidden_act": _ACT_OUT[cfg.activation],
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.block_size, "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": 0.02, "layer_norm_eps": cfg.norm_eps, "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute", "classifier_dropout": None, "is_decoder": False,
        "add_cross_attention": False, "tie_word_embeddings": True, "use_cache": True, "dtype": "float32",
    }
    if arch == "BertForSequenceClassification":
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.n_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.n_labels)}
        if cfg.n_labels == 1:
            out["problem_type"] = "regression"
    return out


def export_bert(model: Encoder | EncoderClassifier | str | Path, out_dir: str | Path) -> Path:
    """Write an llmkit encoder as a Hugging Face model directory (config.json + model.safetensors, fp32).

    `Encoder` -> ``BertForMaskedLM``; `EncoderClassifier` -> ``BertForSequenceClassification``. `model` may
    also be an llmkit model directory. Load the result with ``AutoModelForMaskedLM.from_pretrained`` /
    ``AutoModelForSequenceClassification.from_pretrained``. Returns `out_dir`.
    """
    if isinstance(model, (str, Path)):
        from llmkit.models.io import load_model

        model = load_model(model)
    if isinstance(model, EncoderClassifier):
        arch, prefix = "BertForSequenceClassification", "encoder."
    elif isinstance(model, Encoder):
        if model.mlm_head is None:
            raise ValueError("mlm_head: this Encoder has none; BertForMaskedLM export needs it")
        arch, prefix = "BertForMaskedLM", ""
    else:
        raise TypeError(f"export_bert handles llmkit Encoder/EncoderClassifier models, not {type(model).__name__}")
    cfg = model.config
    hf_cfg = _hf_bert_config(cfg, arch)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    tensors = _encoder_to_hf(sd, cfg, prefix)
    C = cfg.d_model
    if arch == "BertForSequenceClassification":
        tensors["bert.pooler.dense.weight"] = sd["pooler.weight"]
        tensors["bert.pooler.dense.bias"] = sd.get("pooler.bias", torch.zeros(C))
        tensors["classifier.weight"] = sd["classifier.weight"]
        tensors["classifier.bias"] = sd.get("classifier.bias", torch.zeros(cfg.n_labels))
    else:
        p = "cls.predictions."
        tensors[p + "bias"] = sd["mlm_head.bias"]
        tensors[p + "transform.dense.weight"] = sd["mlm_head.dense.weight"]
        tensors[p + "transform.dense.bias"] = sd.get("mlm_head.dense.bias", torch.zeros(C))
        tensors[p + "transform.LayerNorm.weight"] = sd["mlm_head.norm.weight"]
        tensors[p + "transform.LayerNorm.bias"] = sd.get("mlm_head.norm.bias", torch.zeros(C))
        # decoder.weight / decoder.bias are tied to the word embeddings / predictions.bias in HF: not stored
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}  # clone: no shared storage
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return out
