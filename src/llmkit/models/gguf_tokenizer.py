"""A GGUF file's tokenizer as a standard Hugging Face ``tokenizer.json``, and back.

GGUF keeps the tokenizer as metadata (llama.cpp's ``tokenizer.ggml.*`` keys): the token strings, their
types (normal, control, user-defined, byte), BPE merges or SentencePiece scores, and a *pre-tokenizer name*
(``tokenizer.ggml.pre``) that stands for the regular expressions llama.cpp splits text with before BPE
(llama.cpp's ``llama-vocab.cpp``). `build_tokenizer` rebuilds the same tokenizer with the `tokenizers`
library so that every llmkit stage, and transformers, read it as they read any HF model:

* ``gpt2`` (byte-level BPE): vocabulary + merges, the pre-tokenizer of the named family, byte-level decoding;
* ``llama`` (SentencePiece-style BPE): merges recovered from the pieces' scores (higher score merges first,
  as SentencePiece's BPE does), ``▁`` for spaces, byte fallback for the ``<0xNN>`` pieces.

`gguf_tokenizer_metadata` goes the other way for `llmkit.models.gguf.export_gguf` (byte-level BPE only).
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

# llama.cpp's token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split expressions llama.cpp uses for each `tokenizer.ggml.pre` (llama-vocab.cpp), as the HF tokenizers
# of those families write them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                    _byte_level(use_regex=False)])


# pre-tokenizer name -> (pre-tokenizer, normalizer or None, BPE ignore_merges)
BPE_PRE_TOKENIZERS = {
    "default": lambda: (_byte_level(True), None, False),  # GPT-2's own expression
    "gpt-2": lambda: (_byte_level(True), None, False),  # llama.cpp's name for it (export writes this one)
    "gpt2": lambda: (_byte_level(True), None, False),  # read for tolerance; llama.cpp itself rejects it
    "smollm": lambda: (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)]),
                       None, False),
    "llama-bpe": lambda: (_split(_LLAMA3_SPLIT), None, True),
    "llama3": lambda: (_split(_LLAMA3_SPLIT), None, True),
    "qwen2": lambda: (_split(_QWEN2_SPLIT), normalizers.NFC(), False),
}


def _value(fields: dict[str, Any], key: str, default: Any = None) -> Any:
    return fields[key] if key in fields else default


def build_tokenizer(fields: dict[str, Any]) -> tuple[HFTokenizer, dict[str, Any]]:
    """(tokenizers.Tokenizer, tokenizer_config dict) from a GGUF file's metadata.

    fields: the file's key -> value metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``).
    The config names bos/eos/unk/pad tokens (each only where the file declares it), ``add_bos_token``,
    ``chat_template`` and ``added_tokens_decoder`` (the control and user-defined tokens), as a Hugging
    Face ``tokenizer_config.json`` does.
    Raises ValueError naming the key for a tokenizer model or pre-tokenizer it does not know.
    """
    kind = _value(fields, "tokenizer.ggml.model")
    tokens: list[str] = list(_value(fields, "tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError("tokenizer.ggml.tokens: the file has no vocabulary")
    types = list(_value(fields, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    ids = {name: _value(fields, f"tokenizer.ggml.{name}_token_id")
           for name in ("bos", "eos", "unknown", "padding")}
    add_bos = bool(_value(fields, "tokenizer.ggml.add_bos_token", kind == "llama"))
    if kind == "gpt2":
        pre_name = _value(fields, "tokenizer.ggml.pre", "default")
        if pre_name not in BPE_PRE_TOKENIZERS:
            raise ValueError(f"tokenizer.ggml.pre: {pre_name!r} is not supported "
                             f"(supported: {', '.join(sorted(BPE_PRE_TOKENIZERS))})")
        pre, norm, ignore_merges = BPE_PRE_TOKENIZERS[pre_name]()
        merges = [tuple(m.split(" ", 1)) for m in _value(fields, "tokenizer.ggml.merges", [])]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre
        if norm is not None:
            tok.normalizer = norm
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = list(_value(fields, "tokenizer.ggml.scores") or [0.0] * len(tokens))
        unk = tokens[ids["unknown"]] if ids["unknown"] is not None else None
        # merges: only between normal pieces (control / byte pieces never come out of a merge)
        mergeable = {t: s for t, s, ty in zip(tokens, scores, types) if ty == NORMAL}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(vocab, mergeable), unk_token=unk,
                                     fuse_unk=True, byte_fallback=True))
        space_prefix = bool(_value(fields, "tokenizer.ggml.add_space_prefix", True))
        steps = [normalizers.Prepend("▁")] if space_prefix else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *([decoders.Strip(" ", 1, 0)] if space_prefix else [])])
    else:
        raise ValueError(f"tokenizer.ggml.model: {kind!r} is not supported (supported: gpt2 = byte-level BPE, "
                         "llama = SentencePiece-style BPE)")

    added = [AddedToken(t, special=ty == CONTROL, normalized=False)
             for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)]
    tok.add_tokens(added)  # already in the vocabulary: they keep their ids, and are never split
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
                              "added_tokens_decoder": {
                                  str(vocab[a.content]): {"content": a.content, "special": a.special,
                                                          "normalized": False, "lstrip": False, "rstrip": False,
                                                          "single_word": False} for a in added}}
    for name, key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        if ids[name] is not None and 0 <= ids[name] < len(tokens):
            config[key] = tokens[ids[name]]
    if add_bos and ids["bos"] is not None:
        bos = tokens[ids["bos"]]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, ids["bos"])])
    template = _value(fields, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, config


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE model: every split of a piece into two pieces of the
    vocabulary is a merge, ranked by the merged piece's score (higher first), as SentencePiece applies them."""
    found = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        found += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def gguf_tokenizer_metadata(tokenizer_json: str, config: dict[str, Any]) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` metadata of a byte-level BPE ``tokenizer.json`` (the inverse of
    `build_tokenizer` for model ``gpt2``): tokens by id, types, merges, the pre-tokenizer's llama.cpp name.

    Raises ValueError for a tokenizer llama.cpp could not reproduce (not byte-level BPE, or a pre-tokenizer
    with no llama.cpp name): a GGUF that tokenizes differently would answer differently."""
    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError("tokenizer: GGUF export writes byte-level BPE tokenizers; this one is "
                         f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}")
    pre = _pre_name(spec.get("pre_tokenizer"), spec.get("normalizer"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    if any(t == "" for t in tokens):
        raise ValueError("tokenizer: the vocabulary has holes (ids without a token)")
    types = [CONTROL if i in added and added[i].get("special") else USER_DEFINED if i in added else NORMAL
             for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    out: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
                           "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
                           "tokenizer.ggml.add_bos_token": bool(config.get("add_bos_token", False))}
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None and value in vocab:
            out[f"tokenizer.ggml.{name}_token_id"] = vocab[value]
    if config.get("chat_template"):
        out["tokenizer.chat_template"] = config["chat_template"]
    return out


def _pre_name(pre: dict | None, norm: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer (one of `BPE_PRE_TOKENIZERS`)."""
    def byte_level(p, regex):
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) is regex \
            and not p.get("add_prefix_space", False)

    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    if len(steps) == 1 and byte_level(steps[0], True) and norm is None:
        return "gpt-2"
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and byte_level(steps[1], True) and norm is None:
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], False):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == _LLAMA3_SPLIT and norm is None:
            return "llama-bpe"
        if pattern == _QWEN2_SPLIT and (norm or {}).get("type") == "NFC":
            return "qwen2"
    raise ValueError("tokenizer: its pre-tokenizer matches none llama.cpp knows by name "
                     f"(supported: {', '.join(sorted(BPE_PRE_TOKENIZERS))}); a GGUF would split text differently")
