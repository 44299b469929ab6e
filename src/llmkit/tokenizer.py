"""Tokenizers: byte-level BPE and nanoGPT-style character level, stored as HF `tokenizers` JSON.

Both kinds are plain `tokenizers.Tokenizer` objects underneath and are saved as a standard
`tokenizer.json`, so anything that reads HF tokenizers (`tokenizers.Tokenizer.from_file`,
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)`) can load what llmkit trains.

* ``bpe``: GPT-2 style byte-level BPE. Every byte is in the base alphabet, so any string
  round-trips exactly (``decode(encode(x)) == x``) and nothing is ever mapped to ``<|unk|>``.
* ``char``: one token per Unicode code point, ids ``0..n-1`` are the sorted characters of the
  training text (identical to nanoGPT's ``data/shakespeare_char/prepare.py``), the special tokens
  follow. Characters that were not seen in training encode to ``unk_id``.

Special tokens (``SPECIAL_TOKENS`` + ``CHAT_TOKENS`` + any extras) are registered as HF *special*
added tokens: they are matched in the raw text before pre-tokenization, so ``"<|user|>"`` is always
one id and never split, and ``decode(..., skip_special_tokens=True)`` drops them.

Foreign tokenizers (any HF ``tokenizer.json``, e.g. of an imported Llama, Qwen, Gemma or SmolLM2 model, or
the one `llmkit import gguf` rebuilds) load too: their bos/eos/pad/unk tokens are the ones
``tokenizer_config.json`` (or ``special_tokens_map.json``) names, each of which may be absent; the added
tokens of its ``added_tokens_decoder`` are applied with their flags (special or not, strip, normalized); and
``generation_config.json``'s ``eos_token_id`` (an int or a list) adds to `Tokenizer.eos_ids`, the ids that end
generation. `Tokenizer.save` writes ``tokenizer_config.json`` back beside ``tokenizer.json`` (chat template
included), so the directory still loads in transformers.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

__all__ = [
    "CHAT_TOKENS",
    "SPECIAL_TOKENS",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "Tokenizer",
    "iter_texts",
    "train_bpe",
    "train_char",
    "train_tokenizer",
]

SPECIAL_TOKENS: dict[str, str] = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>", "unk": "<|unk|>"}
# Chat-role markers for the fine-tuning chat template; always present so that a base model's
# vocabulary already has them and fine-tuning never needs to resize the embedding.
CHAT_TOKENS: list[str] = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# HF backend model type -> Tokenizer.kind
_KINDS = {"BPE": "bpe", "WordLevel": "char", "Unigram": "unigram", "WordPiece": "wordpiece"}

# Number of base symbols in a byte-level BPE vocabulary (one per byte value).
_BYTE_ALPHABET_SIZE = 256
# Matches exactly one code point, newlines included (`.` would skip "\n").
_ONE_CHAR = Regex(r"[\s\S]")


class Tokenizer:
    """llmkit's tokenizer: a thin wrapper over a HF `tokenizers.Tokenizer`.

    Build one with `train_bpe`, `train_char`, `train_tokenizer` or `Tokenizer.load`, or wrap any HF backend.

    Attributes:
        backend: the underlying `tokenizers.Tokenizer` (use it for anything not wrapped here).
        kind: ``"bpe"`` (BPE model), ``"char"`` (WordLevel), ``"unigram"`` or ``"wordpiece"``.
        vocab_size: number of ids, special tokens included; every id is in ``[0, vocab_size)``.
        bos_token, eos_token, pad_token, unk_token: the special tokens' text, or None when the tokenizer has none.
        bos_id, eos_id, unk_id: their ids, or None when absent.
        pad_id: the pad token's id; without one, `eos_id` (HF's convention), else 0. Always an int: it fills
            padded positions, which carry no loss and are masked.
        eos_ids: every id that ends a sequence: `eos_id` first, then generation_config's ``eos_token_id``
            list (e.g. Llama 3's ``<|eot_id|>`` beside ``<|end_of_text|>``); generation stops at any of them.
        config: the ``tokenizer_config.json`` entries it was loaded with ({} for llmkit-trained tokenizers),
            written back by `save`.
    """

    def __init__(self, backend: HFTokenizer, special_tokens: dict[str, str | None] | None = None,
                 eos_ids: Iterable[int] = (), config: dict[str, Any] | None = None):
        """`special_tokens` maps bos/eos/pad/unk to their text (None or missing: absent); without it, llmkit's
        own `SPECIAL_TOKENS` are used where the vocabulary has them. `eos_ids`: more ids that end generation."""
        model_type = type(backend.model).__name__
        if model_type not in _KINDS:
            raise ValueError(f"unsupported tokenizer model {model_type}: llmkit handles {', '.join(_KINDS)}")
        self.kind = _KINDS[model_type]
        if special_tokens is None:
            special_tokens = {n: t for n, t in SPECIAL_TOKENS.items() if backend.token_to_id(t) is not None}
        unknown = sorted(set(special_tokens) - set(SPECIAL_TOKENS))
        if unknown:
            raise ValueError(f"special_tokens: unknown name(s) {unknown}; expected some of {list(SPECIAL_TOKENS)}")
        tokens: dict[str, str | None] = {}
        ids: dict[str, int | None] = {}
        for name in SPECIAL_TOKENS:
            token = special_tokens.get(name)
            tid = backend.token_to_id(token) if token is not None else None
            if token is not None and tid is None:
                warnings.warn(f"the {name} token {token!r} is not in the tokenizer's vocabulary: treated as absent",
                              stacklevel=2)
                token = None
            tokens[name], ids[name] = token, tid
        self.backend = backend
        self.config: dict[str, Any] = dict(config or {})
        self.bos_token, self.eos_token = tokens["bos"], tokens["eos"]
        self.pad_token, self.unk_token = tokens["pad"], tokens["unk"]
        self.bos_id: int | None = ids["bos"]
        self.eos_id: int | None = ids["eos"]
        self.unk_id: int | None = ids["unk"]
        self.pad_id: int = ids["pad"] if ids["pad"] is not None else (ids["eos"] if ids["eos"] is not None else 0)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.add_bos_token: bool = self.bos_id is not None and _declares_bos(backend, self.bos_token, self.config)
        """Whether the model's raw text starts with bos, as it declares (tokenizer.json's TemplateProcessing
        post-processor or tokenizer_config's ``add_bos_token``; llama.cpp's ``tokenizer.ggml.add_bos_token``):
        True for Llama / Gemma-style tokenizers, False for Qwen / GPT-2-style ones and llmkit's own. `encode`
        never adds bos by itself; raw-text callers (generation, perplexity) pass ``add_bos=tok.add_bos_token``,
        chat prompts do not (templates write their own bos)."""
        self.eos_ids: tuple[int, ...] = ()
        self.add_eos_ids(([ids["eos"]] if ids["eos"] is not None else []) + list(eos_ids))

    def add_eos_ids(self, ids: int | Iterable[int] | None) -> None:
        """Add ids that end generation (an int, a list, or None as generation_config's ``eos_token_id`` holds)."""
        if ids is None:
            return
        if isinstance(ids, int):
            ids = [ids]
        out = list(self.eos_ids)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"eos_token_id: {i!r} is not a token id of this tokenizer (vocabulary {self.vocab_size})")
            if i not in out:
                out.append(i)
        self.eos_ids = tuple(out)

    # -- encoding ---------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` (length depends on the text), optionally framed by bos / eos."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        # add_special_tokens=False: bos/eos are added here, explicitly, rather than by a post-processor
        # hidden in the JSON, so the caller always knows what it gets.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._frame(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """`encode` for many texts at once, run in parallel by the Rust encoder.

        The Rust thread pool honours ``TOKENIZERS_PARALLELISM`` / ``RAYON_NUM_THREADS``; HF disables it
        in processes forked after it was used (e.g. DataLoader workers), where it falls back to serial.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of strings, not a single string; use encode()")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: item {i} is a {type(t).__name__}, not a str")
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        return [self._frame(e.ids, add_bos, add_eos) for e in encodings]

    def _frame(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if (add_bos and self.bos_id is None) or (add_eos and self.eos_id is None):
            raise ValueError(f"this tokenizer has no {'bos' if add_bos and self.bos_id is None else 'eos'} token")
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    # -- decoding ---------------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D sequence of ids (list, tuple, 1-D torch tensor or numpy array).

        Special tokens are kept as their text (``"<|eos|>"``) unless `skip_special_tokens`. For
        ``bpe``, a sequence that ends inside a multi-byte character decodes that piece to U+FFFD.
        Raises ValueError for ids outside ``[0, vocab_size)`` (HF would silently drop them).
        """
        if hasattr(ids, "tolist"):  # torch.Tensor / np.ndarray / numpy scalar -> Python ints
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        ids = list(ids)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"decode expects a 1-D sequence of ints, found element {i!r}")
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.vocab_size)
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.vocab_size}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- vocabulary -------------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (a vocabulary entry, e.g. ``"<|user|>"``), or None if absent."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id (byte-level BPE entries use GPT-2's byte-to-unicode map)."""
        return self.backend.id_to_token(token_id)

    @property
    def special_tokens(self) -> dict[str, int]:
        """All special tokens (bos/eos/pad/unk, chat roles, extras) -> id, in id order."""
        added = self.backend.get_added_tokens_decoder()
        return {tok.content: tid for tid, tok in sorted(added.items()) if tok.special}

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, digest={self.digest()[:12]})"

    # -- persistence ------------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/tokenizer.json`` (HF tokenizers format), creating `out_dir`; returns the file.

        A tokenizer loaded with a ``tokenizer_config.json`` also writes that back (merged into one already in
        `out_dir`, its own keys winning), so special-token names, added-token flags and the chat template
        travel with it.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / TOKENIZER_FILE
        # Write-then-rename: a crash mid-write never leaves a truncated tokenizer.json behind for a
        # later run (or a model checkpoint that points at it) to pick up.
        fd, tmp = tempfile.mkstemp(prefix=".tokenizer.", suffix=".json.tmp", dir=out_dir)
        os.close(fd)
        try:
            self.backend.save(tmp, pretty=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.config:
            cfg_path = out_dir / TOKENIZER_CONFIG_FILE
            cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
            cfg.update(self.config)
            atomic_write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding ``tokenizer.json`` or from the ``tokenizer.json`` file itself.

        Beside it, ``tokenizer_config.json`` (and ``special_tokens_map.json``) name the bos/eos/pad/unk tokens
        and declare added tokens (``added_tokens_decoder``), and ``generation_config.json``'s ``eos_token_id``
        adds to `eos_ids`. Without a config, llmkit's own special tokens are used where present.
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            where = f"directory {path} has no {TOKENIZER_FILE}" if path.is_dir() else f"{path} does not exist"
            raise FileNotFoundError(
                f"cannot load tokenizer: {where} (expected a directory containing {TOKENIZER_FILE} "
                f"or the {TOKENIZER_FILE} file itself)"
            )
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
            raise ValueError(f"{file}: not a valid HF tokenizers file: {e}") from e
        d = file.parent
        config = _read_json(d / TOKENIZER_CONFIG_FILE) if (d / TOKENIZER_CONFIG_FILE).is_file() else {}
        if (d / "chat_template.jinja").is_file():  # transformers >= 4.47 stores the template on its own
            config["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if (d / "special_tokens_map.json").is_file():  # older HF dirs name the special tokens here
            for k, v in _read_json(d / "special_tokens_map.json").items():
                if k.endswith("_token"):
                    config.setdefault(k, v)
        names = {k: v for k, v in config.items() if k.endswith("_token")}
        special: dict[str, str | None] | None = None
        if any(f"{n}_token" in names for n in SPECIAL_TOKENS):
            special = {n: _token_text(names.get(f"{n}_token")) for n in SPECIAL_TOKENS}
        _apply_added_tokens(backend, config.get("added_tokens_decoder"), file)
        tok = cls(backend, special, config=config)
        gen = d / GENERATION_CONFIG_FILE
        if gen.is_file():
            tok.add_eos_ids(_read_json(gen).get("eos_token_id"))
        return tok

    def digest(self) -> str:
        """sha256 (hex) of the canonical tokenizer JSON: key-sorted, compact, UTF-8.

        Independent of file formatting, so it is equal for a tokenizer and its save/load round trip
        and changes whenever the vocabulary, merges, special tokens or pipeline change.
        """
        canonical = json.dumps(
            json.loads(self.backend.to_str()), sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _declares_bos(backend: HFTokenizer, bos_token: str | None, config: dict[str, Any]) -> bool:
    """True when the tokenizer adds bos to a single text as transformers' ``tokenizer(text)`` does: its
    post-processor's single template (possibly inside a Sequence) starts with the bos token; without a
    template, tokenizer_config's ``add_bos_token``."""
    post = backend.post_processor
    if post is not None:
        try:
            state = json.loads(post.__getstate__())
        except Exception:  # a processor that cannot describe itself: fall back to the config
            state = {}
        stack = [state]
        while stack:
            node = stack.pop()
            if node.get("type") == "Sequence":
                stack.extend(node.get("processors", []))
            elif node.get("type") == "TemplateProcessing":
                first = (node.get("single") or [{}])[0]
                return "SpecialToken" in first and first["SpecialToken"].get("id") == bos_token
    return config.get("add_bos_token") is True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e.msg} (line {e.lineno})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename: a crash never leaves it half written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _apply_added_tokens(backend: HFTokenizer, declared: Any, where: Path) -> None:
    """Apply tokenizer_config.json's ``added_tokens_decoder`` ({id: {content, special, lstrip, ...}}) to `backend`,
    as transformers does on load: missing tokens are added at their declared ids, flags are updated."""
    if not declared:
        return
    if not isinstance(declared, dict):
        raise ValueError(f"{where.parent / TOKENIZER_CONFIG_FILE}: added_tokens_decoder must be an object")
    current = backend.get_added_tokens_decoder()
    for key in sorted(declared, key=int):
        tid, spec = int(key), declared[key]
        content = spec.get("content") if isinstance(spec, dict) else None
        if not isinstance(content, str):
            raise ValueError(f"added_tokens_decoder[{key}]: no 'content' string")
        flags = {f: bool(spec.get(f, default)) for f, default in (
            ("special", False), ("lstrip", False), ("rstrip", False), ("single_word", False),
            ("normalized", not spec.get("special", False)))}
        have = current.get(tid)
        if have is not None and have.content == content and all(getattr(have, f) == v for f, v in flags.items()):
            continue
        existing = backend.token_to_id(content)
        if existing is not None and existing != tid:
            raise ValueError(f"added_tokens_decoder: token {content!r} is declared with id {tid} but the "
                             f"tokenizer.json in {where.parent} has it at id {existing}")
        if existing is None and tid != backend.get_vocab_size(with_added_tokens=True):
            raise ValueError(f"added_tokens_decoder: token {content!r} is declared with id {tid}, which is "
                             f"neither its id in {where} nor the next free id")
        token = AddedToken(content, **flags)
        if flags["special"]:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])


# -- training -------------------------------------------------------------------------------------


def _special_token_list(extra: Iterable[str]) -> list[str]:
    """SPECIAL_TOKENS + CHAT_TOKENS + extra, in that order, duplicates removed."""
    if isinstance(extra, str):
        raise TypeError("extra_special_tokens must be a list of strings, not a single string")
    out = list(SPECIAL_TOKENS.values()) + list(CHAT_TOKENS)
    for tok in extra:
        if not isinstance(tok, str) or not tok:
            raise ValueError(f"special tokens must be non-empty strings, got {tok!r}")
        if tok not in out:
            out.append(tok)
    return out


def _added(tokens: list[str]) -> list[AddedToken]:
    # normalized=False / no strip: match the literal text only, and keep surrounding whitespace as
    # ordinary text so that decode(encode(x)) == x also holds around special tokens.
    return [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in tokens]


def _checked_texts(texts: Iterable[str], counter: list[int]) -> Iterator[str]:
    if isinstance(texts, str):
        # A bare string is an iterable of characters: training on it "works" and is silently wrong.
        raise TypeError("texts must be an iterable of strings, not a single string; wrap it in a list")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts: item {i} is a {type(t).__name__}, not a str")
        counter[0] += 1
        yield t


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 8192,
    min_frequency: int = 2,
    extra_special_tokens: Sequence[str] = (),
) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE tokenizer.

    Args:
        texts: documents; streamed once (a generator is fine).
        vocab_size: target size including special tokens; at least 256 (bytes) + number of specials.
            A small corpus may yield fewer tokens than asked for.
        min_frequency: a pair must occur this many times to be merged.
        extra_special_tokens: added after `SPECIAL_TOKENS` and `CHAT_TOKENS`.
    Returns:
        Tokenizer with ids ``0..k-1`` = special tokens, then the 256 byte symbols, then merges.
    """
    specials = _special_token_list(extra_special_tokens)
    minimum = _BYTE_ALPHABET_SIZE + len(specials)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for byte-level BPE: need at least {minimum} "
            f"({_BYTE_ALPHABET_SIZE} byte symbols + {len(specials)} special tokens)"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    backend = HFTokenizer(models.BPE())
    # add_prefix_space=False: a leading space is not invented, which round-trip exactness requires.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=_added(specials),
        # All 256 byte symbols, even those absent from the corpus: any input stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counter = [0]
    backend.train_from_iterator(_checked_texts(texts, counter), trainer=trainer)
    if counter[0] == 0:
        raise ValueError("train_bpe: no training texts were given")
    return Tokenizer(backend)


def train_char(texts: Iterable[str], extra_special_tokens: Sequence[str] = ()) -> Tokenizer:
    """Train a character-level tokenizer, nanoGPT style.

    Ids ``0..n-1`` are ``sorted(set(all characters))`` exactly as nanoGPT's char ``prepare.py`` builds
    them; the special tokens (`SPECIAL_TOKENS`, `CHAT_TOKENS`, extras) take ids ``n, n+1, ...``.
    Stored as a WordLevel model with a pre-tokenizer that isolates every code point (newlines
    included) and a Fuse decoder; characters not seen in training encode to ``unk_id``.
    """
    specials = _special_token_list(extra_special_tokens)
    counter = [0]
    chars: set[str] = set()
    for t in _checked_texts(texts, counter):
        chars.update(t)
    if not chars:
        raise ValueError("train_char: the training texts contain no characters")
    clash = sorted(s for s in specials if s in chars)
    if clash:
        raise ValueError(f"special tokens {clash} are single characters that occur in the training text")
    vocab = {ch: i for i, ch in enumerate(sorted(chars))}
    # The specials are also WordLevel vocabulary entries (WordLevel needs its unk token in the vocab);
    # add_special_tokens below then reuses these ids instead of appending new ones.
    for tok in specials:
        vocab[tok] = len(vocab)
    backend = HFTokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.Split(_ONE_CHAR, behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(_added(specials))
    return Tokenizer(backend)


def train_tokenizer(
    inputs: Sequence[str | Path] | str | Path,
    kind: str = "bpe",
    vocab_size: int = 8192,
    min_frequency: int = 2,
    text_field: str = "text",
    extra_special_tokens: Sequence[str] = (),
) -> Tokenizer:
    """Train a tokenizer of `kind` (``"bpe"`` or ``"char"``) on the documents of `inputs`.

    Files are read with `iter_texts` (``.txt``, ``.jsonl``, ``.json``). `vocab_size` and
    `min_frequency` apply to ``bpe`` only: a char vocabulary is whatever characters occur.
    `extra_special_tokens` are added after the standard ones (e.g. ``<|mask|>`` for masked-LM, the
    ``<|sentinel_i|>`` tokens for span corruption).
    Raises FileNotFoundError listing every missing input before any training starts.
    """
    if kind not in ("bpe", "char"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'bpe' or 'char'")
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("train_tokenizer: no input files given")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer input file(s) not found or not a file: {', '.join(missing)}")

    def texts() -> Iterator[str]:
        for p in paths:
            yield from iter_texts(p, text_field=text_field)

    if kind == "char":
        return train_char(texts(), extra_special_tokens=extra_special_tokens)
    return train_bpe(texts(), vocab_size=vocab_size, min_frequency=min_frequency,
                     extra_special_tokens=extra_special_tokens)


# -- reading documents ----------------------------------------------------------------------------


def iter_texts(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a text file, one string per document.

    * ``.txt``: the whole file is one document, read verbatim (no newline translation).
    * ``.jsonl`` (or ``.jsonl.gz``): one JSON record per non-blank line.
    * ``.parquet``: the non-empty values of column `text_field` (e.g. `llmkit data run` output).
    * ``.json``: a list of records, or a chinese-poetry collection object (``{"title", "content": [...]}``).

    A record is a string, or an object with a `text_field` string, or an alpaca record
    (``instruction`` / ``input`` / ``output``, non-empty parts joined with ``"\\n"``), or a
    chinese-poetry record (``title`` or ``chapter`` line, then each of ``paragraphs`` on its own line),
    or a chinese-poetry section whose ``content`` list holds such records (walked recursively;
    collection-level ``title`` / ``abstract`` metadata is not yielded).

    Raises:
        ValueError naming the file and line (``.jsonl``) or record (``.json``) for malformed JSON or a
        record with no text: nothing is skipped silently.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if "".join(path.suffixes[-2:]).lower() == ".jsonl.gz":
        suffix = ".jsonl.gz"
    if suffix == ".txt":
        yield _read_utf8(path)
    elif suffix in (".jsonl", ".jsonl.gz"):
        yield from _iter_jsonl(path, text_field)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if t)
    elif suffix == ".json":
        try:
            data = json.loads(_read_utf8(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
        if isinstance(data, list):
            for i, record in enumerate(data):
                yield from _record_texts(record, text_field, f"{path}: record [{i}]")
        elif isinstance(data, dict) and isinstance(data.get("content"), list):
            yield from _record_texts(data, text_field, f"{path}: top-level object")
        else:
            raise ValueError(
                f"{path}: expected a JSON list of records or a chinese-poetry collection object "
                f"with a 'content' list, got {type(data).__name__}"
            )
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected .txt, .jsonl, .jsonl.gz, .json or .parquet")


def _read_utf8(path: Path) -> str:
    try:
        # newline="": keep "\r\n" as written, so the tokenizer sees exactly the bytes of the file.
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {e.msg}") from e
            yield from _record_texts(record, text_field, f"{path}:{lineno}")


def _record_texts(record: Any, text_field: str, loc: str) -> Iterator[str]:
    """Documents of one record; `loc` ("file:line" or "file: record [i]") prefixes error messages."""
    if isinstance(record, str):
        yield record
        return
    if not isinstance(record, dict):
        raise ValueError(f"{loc}: expected a JSON object or string, got {type(record).__name__}")
    if text_field in record:
        value = record[text_field]
        if not isinstance(value, str):
            raise ValueError(f"{loc}: field {text_field!r} is a {type(value).__name__}, not a string")
        yield value
    elif "instruction" in record and "output" in record:
        parts = [record["instruction"], record.get("input", ""), record["output"]]
        if not all(isinstance(p, str) for p in parts):
            raise ValueError(f"{loc}: alpaca fields instruction / input / output must be strings")
        yield "\n".join(p for p in parts if p)
    elif "paragraphs" in record:
        paragraphs = record["paragraphs"]
        if (
            not isinstance(paragraphs, list)
            or not paragraphs
            or not all(isinstance(p, str) for p in paragraphs)
        ):
            raise ValueError(f"{loc}: 'paragraphs' must be a non-empty list of strings")
        heading = record.get("title") or record.get("chapter")
        lines = [heading, *paragraphs] if isinstance(heading, str) and heading else paragraphs
        yield "\n".join(lines)
    elif isinstance(record.get("content"), list):
        items = record["content"]
        if not items:
            raise ValueError(f"{loc}: 'content' list is empty")
        for i, item in enumerate(items):
            yield from _record_texts(item, text_field, f"{loc}.content[{i}]")
    else:
        raise ValueError(
            f"{loc}: record has no {text_field!r} field and is not an alpaca (instruction/output) or "
            f"chinese-poetry (paragraphs/content) record; keys: {sorted(record)}"
        )


@functools.lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable symbols of a byte-level BPE vocabulary -> the byte each
    stands for (what a token adds to the output, byte for byte, even when it holds part of a character)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}
