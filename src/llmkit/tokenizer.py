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
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

__all__ = [
    "CHAT_TOKENS",
    "SPECIAL_TOKENS",
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

# Number of base symbols in a byte-level BPE vocabulary (one per byte value).
_BYTE_ALPHABET_SIZE = 256
# Matches exactly one code point, newlines included (`.` would skip "\n").
_ONE_CHAR = Regex(r"[\s\S]")


class Tokenizer:
    """llmkit's tokenizer: a thin wrapper over a HF `tokenizers.Tokenizer`.

    Build one with `train_bpe`, `train_char`, `train_tokenizer` or `Tokenizer.load`; the
    constructor takes an already-built backend and checks that it has llmkit's special tokens.

    Attributes:
        backend: the underlying `tokenizers.Tokenizer` (use it for anything not wrapped here).
        kind: ``"bpe"`` (BPE model) or ``"char"`` (WordLevel model over single characters).
        vocab_size: number of ids, special tokens included; every id is in ``[0, vocab_size)``.
        bos_id, eos_id, pad_id, unk_id: ids of the four `SPECIAL_TOKENS`.
    """

    def __init__(self, backend: HFTokenizer):
        if isinstance(backend.model, models.BPE):
            self.kind = "bpe"
        elif isinstance(backend.model, models.WordLevel):
            self.kind = "char"
        else:
            raise ValueError(
                f"unsupported tokenizer model {type(backend.model).__name__}: llmkit handles BPE ('bpe') "
                "and WordLevel ('char') tokenizers"
            )
        ids = {}
        for name, token in SPECIAL_TOKENS.items():
            tid = backend.token_to_id(token)
            if tid is None:
                raise ValueError(
                    f"tokenizer has no {name} token {token!r}; llmkit tokenizers need all of "
                    f"{list(SPECIAL_TOKENS.values())} (train one with llmkit's train_bpe / train_char)"
                )
            ids[name] = tid
        self.backend = backend
        self.bos_id: int = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.pad_id: int = ids["pad"]
        self.unk_id: int = ids["unk"]
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

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
        """Write ``out_dir/tokenizer.json`` (HF tokenizers format), creating `out_dir`; returns the file."""
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
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding ``tokenizer.json`` or from the ``tokenizer.json`` file itself."""
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
        return cls(backend)

    def digest(self) -> str:
        """sha256 (hex) of the canonical tokenizer JSON: key-sorted, compact, UTF-8.

        Independent of file formatting, so it is equal for a tokenizer and its save/load round trip
        and changes whenever the vocabulary, merges, special tokens or pipeline change.
        """
        canonical = json.dumps(
            json.loads(self.backend.to_str()), sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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
