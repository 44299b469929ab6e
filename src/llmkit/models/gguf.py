"""GGUF checkpoints, llama.cpp's single-file format, in and out: `import_gguf` and `export_gguf`.

Import reads the file with the `gguf` package (llama.cpp's own reader), dequantizes every tensor to fp32
(`gguf.quants.dequantize`: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants Q2_K..Q6_K),
turns the metadata into the Hugging Face config of the same architecture and the tensors into their HF
names, and hands both to `llmkit.models.hf.decoder_from_hf`, so a GGUF model and the HF checkpoint it was
converted from become the same llmkit `Decoder`. llama.cpp's converter permutes the rows of the query and
key projections of Llama-architecture models (its RoPE pairs dimensions (2i, 2i+1), HF's (i, i + d/2));
the permutation is undone here. The tokenizer is rebuilt from the metadata as a standard
``tokenizer.json`` + ``tokenizer_config.json`` (`llmkit.models.gguf_tokenizer`), with the chat template,
bos/eos/pad and ``add_bos_token``; ``generation_config.json`` gets the special ids.

Export writes an llmkit decoder (Llama / Qwen2 / Qwen3 options) as F32, F16, Q8_0 or Q4_0 GGUF with its
byte-level BPE tokenizer and chat template, permuting q/k back, so llama.cpp and Ollama load it.

A file that is truncated or not GGUF, an architecture or quantization type not listed above: a ValueError
naming the key or tensor; nothing is left in the output directory (it is written beside it and renamed).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.models.decoder import Decoder
from llmkit.models.gguf_tokenizer import UNUSED, build_tokenizer, gguf_tokenizer_metadata

__all__ = ["SUPPORTED_ARCHITECTURES", "EXPORT_TYPES", "read_gguf_metadata", "import_gguf", "export_gguf"]

# general.architecture -> the HF architecture whose config and tensor names it maps to
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# llama.cpp permutes q/k rows only for these (convert_hf_to_gguf.py's LlamaModel and its subclasses)
_PERMUTED_QK = {"llama"}
EXPORT_TYPES = ("f32", "f16", "q8_0", "q4_0")

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _reader(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, struct/IndexError, OSError on bad files
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from None


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value (strings, numbers, lists), tensors not read."""
    reader = _reader(Path(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _hf_config(meta: dict[str, Any], n_vocab: int, tied: bool) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"general.architecture: {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def key(name: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise ValueError(f"{full}: missing from the file's metadata")
        return default

    n_head = int(key("attention.head_count"))
    d_model = int(key("embedding_length"))
    hf: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]], "vocab_size": n_vocab, "hidden_size": d_model,
        "intermediate_size": int(key("feed_forward_length")), "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": int(key("attention.head_count_kv", n_head)),
        "head_dim": int(key("attention.key_length", d_model // n_head)),
        "max_position_embeddings": int(key("context_length")), "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)), "tie_word_embeddings": tied, "hidden_act": "silu",
    }
    kind = key("rope.scaling.type", None)
    if kind not in (None, "none"):
        if kind != "linear":  # yarn needs more keys than GGUF keeps consistently; llama3 stores rope_freqs
            raise ValueError(f"{arch}.rope.scaling.type: {kind!r} is not supported (supported: none, linear)")
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    if key("rope.dimension_count", hf["head_dim"]) != hf["head_dim"]:
        raise ValueError(f"{arch}.rope.dimension_count: partial rotary ({key('rope.dimension_count')} of "
                         f"{hf['head_dim']}) is not supported for {arch}")
    if key("attention.sliding_window", None) is not None:
        hf["sliding_window"] = int(key("attention.sliding_window"))
        hf["architectures"] = ["MistralForCausalLM"]
    return hf


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: rows (head, dim i, pair) -> (head, pair, dim i)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (its convert_hf_to_gguf.py `permute`)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str:
    base, _, kind = name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    raise ValueError(f"tensor {name!r}: no llmkit counterpart (known: {', '.join(_GLOBAL_NAMES)}, "
                     f"blk.N.{{{', '.join(_LAYER_NAMES)}}})")


def _dequantize(tensor) -> torch.Tensor:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    try:
        data = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        supported = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"
        raise ValueError(f"tensor {tensor.name!r}: quantization type {Q(tensor.tensor_type).name} is not "
                         f"supported (supported: {supported})") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a copy: the file is mapped read-only


def _raw_blocks(tensor) -> np.ndarray:
    """A quantized tensor's blocks as stored: uint8 (rows, row bytes), rows = the outer dimension."""
    rows = int(np.prod([int(d) for d in tensor.shape[1:]]))
    return np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1)


def read_gguf(path: str | Path, keep_types: frozenset[int] = frozenset()
              ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor], dict[str, tuple[np.ndarray, int]]]:
    """(metadata, HF config, HF-named fp32 tensors, raw) of a GGUF file.

    Tensors whose ggml type id is in `keep_types` are not dequantized: `raw[hf_name]` is (their blocks as
    stored, uint8 (rows, row bytes) with llama.cpp's q/k row permutation undone, the ggml type id), and the
    fp32 entry is a zero placeholder of the right shape, for building the model skeleton.
    """
    path = Path(path)
    reader = _reader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("tensor 'rope_freqs.weight': per-frequency RoPE factors (Llama 3.1-style scaling as "
                         "llama.cpp stores it) are not supported")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise ValueError(f"{path}: tensor 'token_embd.weight' missing")
    hf = _hf_config(meta, int(emb.shape[-1]), tied="output.weight" not in names)
    arch = meta["general.architecture"]
    heads = {"attn_q": hf["num_attention_heads"], "attn_k": hf["num_key_value_heads"]}
    weights, raw = {}, {}
    for t in reader.tensors:
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
        permuted = arch in _PERMUTED_QK and kind in heads
        if int(t.tensor_type) in keep_types:
            shape = tuple(int(d) for d in reversed(t.shape))
            blocks = torch.from_numpy(_raw_blocks(t).copy())  # rows of whole blocks: permuting rows is exact
            if permuted:
                blocks = _unpermute(blocks, heads[kind])
            raw[_hf_name(t.name)] = (blocks.numpy(), int(t.tensor_type))
            weights[_hf_name(t.name)] = torch.zeros(shape)
            continue
        w = _dequantize(t)
        if permuted:
            w = _unpermute(w, heads[kind])
        weights[_hf_name(t.name)] = w
    return meta, hf, weights, raw


def import_gguf(path: str | Path, out_dir: str | Path | None = None) -> Decoder:
    """Read a GGUF file into an llmkit `Decoder` (fp32, eval mode); with `out_dir`, also write an llmkit model
    directory there: weights, config, ``tokenizer.json`` + ``tokenizer_config.json`` (chat template, special
    tokens) and ``generation_config.json``. Quantized tensors are dequantized (import is lossless with
    respect to the file; the quantization error of the file itself stays).

    Raises FileNotFoundError, or ValueError naming the key / tensor of anything unsupported or unreadable;
    `out_dir` is only created once everything succeeded.
    """
    from llmkit.models.hf import decoder_from_hf
    from llmkit.models.io import save_model

    path = Path(path)
    meta, hf, weights, _ = read_gguf(path)
    try:
        model = decoder_from_hf(hf, weights)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if out_dir is None:
        return model
    write_model_dir(meta, model, out_dir, save_model)
    return model


def write_model_dir(meta: dict[str, Any], model, out_dir: str | Path, save) -> Path:
    """Write `model` (through `save(model, dir, tokenizer=, generation_config=)`, e.g. `save_model`) with the
    tokenizer, chat template and generation config of a GGUF file's metadata into `out_dir`, atomically: the
    directory appears whole or not at all. Raises FileExistsError for a non-empty `out_dir`."""
    from llmkit.tokenizer import Tokenizer

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    backend, tok_config = build_tokenizer(meta)
    if len(backend.get_vocab(with_added_tokens=True)) > model.config.vocab_size:
        raise ValueError(f"tokenizer.ggml.tokens: {backend.get_vocab_size()} tokens for "
                         f"{model.config.vocab_size} embedding rows")
    gen = {k: meta[f"tokenizer.ggml.{g}_token_id"] for k, g in
           (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"))
           if f"tokenizer.ggml.{g}_token_id" in meta}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok_dir = tmp / "tokenizer"
        tok_dir.mkdir()
        backend.save(str(tok_dir / "tokenizer.json"))
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False, indent=2))
        (tok_dir / "generation_config.json").write_text(json.dumps(gen))
        model_dir = tmp / "model"
        save(model, model_dir, tokenizer=Tokenizer.load(tok_dir), generation_config=gen)
        if out.exists():
            out.rmdir()
        model_dir.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- export -----------------------------------------------------------------------------------------


def _gguf_arch(cfg) -> str:
    from llmkit.models.hf import _hf_arch

    hf_arch = _hf_arch(cfg)
    arch = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
            "Qwen3ForCausalLM": "qwen3"}.get(hf_arch)
    if arch is None:
        raise ValueError(f"GGUF export writes Llama, Mistral, Qwen2 and Qwen3 decoders; this model exports as "
                         f"{hf_arch}")
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type") != "linear":
        raise ValueError(f"rope_scaling: {cfg.rope_scaling.get('rope_type')!r} cannot be written to GGUF here "
                         "(supported: none, linear)")
    if cfg.layer_types is not None:
        raise ValueError("layer_types: per-layer sliding windows cannot be written for llama/qwen2 GGUF")
    return arch


def export_gguf(model_dir: str | Path, out_path: str | Path, type: str = "f16") -> Path:
    """Write the llmkit decoder in `model_dir` as a GGUF file that llama.cpp loads; returns `out_path`.

    type: f32 | f16 | q8_0 | q4_0 for the 2-D weight matrices (norms and biases stay F32, as llama.cpp
    keeps them); the tokenizer (byte-level BPE), chat template and special ids go into the metadata.
    The file is written to a temporary name and renamed, so a failure leaves nothing at `out_path`.
    """
    import gguf

    from llmkit.models.hf import _llama_from_llmkit
    from llmkit.models.io import load_generation_config, load_model

    if type not in EXPORT_TYPES:
        raise ValueError(f"type: {type!r} is not supported (supported: {', '.join(EXPORT_TYPES)})")
    src = Path(model_dir)
    model = load_model(src)
    if not isinstance(model, Decoder) or model.config.positions != "rope" or model.config.norm != "rmsnorm":
        raise ValueError(f"{src}: GGUF export writes RoPE + RMSNorm decoders (Llama family)")
    cfg = model.config
    arch = _gguf_arch(cfg)
    if not (src / "tokenizer.json").is_file():
        raise ValueError(f"{src}: no tokenizer.json; a GGUF file must carry its tokenizer")
    tok_config = json.loads((src / "tokenizer_config.json").read_text()) \
        if (src / "tokenizer_config.json").is_file() else {}
    tok_meta = gguf_tokenizer_metadata((src / "tokenizer.json").read_text(encoding="utf-8"), tok_config)
    n_tokens = len(tok_meta["tokenizer.ggml.tokens"])
    if n_tokens > cfg.vocab_size:
        raise ValueError(f"vocab_size: {cfg.vocab_size} embedding rows for {n_tokens} tokenizer tokens")
    # a padded vocabulary (more embedding rows than tokens): llama.cpp wants one token per row, so the extra
    # rows get unused placeholder tokens, as its converter writes them
    tok_meta["tokenizer.ggml.tokens"] += [f"[PAD{i}]" for i in range(n_tokens, cfg.vocab_size)]
    tok_meta["tokenizer.ggml.token_type"] += [UNUSED] * (cfg.vocab_size - n_tokens)
    gen = load_generation_config(src)
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        value = gen.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            tok_meta[f"tokenizer.ggml.{name}_token_id"] = int(value)

    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    hf_arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    if cfg.sliding_window is not None:
        hf_arch = "MistralForCausalLM"
    hf = _llama_from_llmkit(sd, cfg, hf_arch)
    to_gguf = {f"{v}.": f"{k}." for k, v in _GLOBAL_NAMES.items()}
    layer_to_gguf = {v: k for k, v in _LAYER_NAMES.items()}

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(src.name)
        writer.add_context_length(cfg.block_size)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.n_head)
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.rope_dim)
        writer.add_rope_freq_base(cfg.rope_base)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        if cfg.sliding_window is not None:
            writer.add_sliding_window(cfg.sliding_window)
        if cfg.rope_scaling is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope_scaling["factor"])
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[type])
        _add_tokenizer(writer, tok_meta)
        for name, w in hf.items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # llama.cpp reuses token_embd when output.weight is absent
            gname = _gguf_name(name, to_gguf, layer_to_gguf)
            kind = gname.split(".")[2] if gname.startswith("blk.") else None
            if arch in _PERMUTED_QK and kind in ("attn_q", "attn_k") and name.endswith(".weight"):
                w = _permute(w, cfg.n_head if kind == "attn_q" else cfg.kv_heads)
            data, qtype = _encode(w.numpy(), type)
            writer.add_tensor(gname, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _gguf_name(name: str, to_gguf: dict[str, str], layer_to_gguf: dict[str, str]) -> str:
    for hf_prefix, g in to_gguf.items():
        if name.startswith(hf_prefix):
            return g + name[len(hf_prefix):]
    _, _, i, *rest = name.split(".")  # model.layers.N.<module...>.<weight|bias>
    module, kind = ".".join(rest[:-1]), rest[-1]
    return f"blk.{i}.{layer_to_gguf[module]}.{kind}"


def _encode(w: np.ndarray, type: str):
    """(data, GGML type) for one tensor: 2-D weights in `type` (when their rows split into whole blocks),
    everything else F32, as llama.cpp's converter does."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if w.ndim < 2 or type == "f32":
        return w.astype(np.float32), Q.F32
    if type == "f16":
        return w.astype(np.float16), Q.F16
    qtype = Q.Q8_0 if type == "q8_0" else Q.Q4_0
    block = GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:  # rows that do not split into 32-value blocks stay F16
        return w.astype(np.float16), Q.F16
    return quantize(w.astype(np.float32), qtype), qtype


def _add_tokenizer(writer, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unknown", writer.add_unk_token_id), ("padding", writer.add_pad_token_id)):
        if f"tokenizer.ggml.{name}_token_id" in meta:
            add(meta[f"tokenizer.ggml.{name}_token_id"])
    if "tokenizer.chat_template" in meta:
        writer.add_chat_template(meta["tokenizer.chat_template"])
