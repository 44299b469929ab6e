"""Tokenized corpora as memory-mapped shards: `train-00000.bin`, `val-00000.bin`, ... and `meta.json`.

Token ids are stored flat as `uint16` when the vocabulary fits (< 65,536 ids) and `uint32` otherwise,
so a training step reads its windows straight from disk through `np.memmap` without Python work per
token. `meta.json` records the dtype, token counts, the bytes of text behind each split (for
bits-per-byte), the tokenizer digest, and a sha256 digest of the token stream (the data's lineage).

Split: each input file's token stream is cut at `1 - val_fraction`; its tail goes to validation. For a
single text such as tinyshakespeare this is nanoGPT's 90/10 split; for several files every source is
represented in both splits.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

META = "meta.json"
FORMAT_VERSION = 1


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Cut text after newlines into ~size-character pieces, so the Rust batch encoder can use every core.

    Cutting only after a newline keeps the tokenization the same as encoding the whole text, because
    the pre-tokenizers never merge across a newline followed by a non-space character.
    """
    pieces, start = [], 0
    while start < len(text):
        end = start + size
        if end < len(text):
            nl = text.find("\n", end)
            end = len(text) if nl < 0 else nl + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def encode_document(tokenizer, text: str) -> np.ndarray:
    ids = tokenizer.encode_batch(_chunks(text)) if text else []
    dtype = token_dtype(tokenizer.vocab_size)
    return np.concatenate([np.asarray(piece, dtype=dtype) for piece in ids]) if ids else np.zeros(0, dtype)


class _ShardWriter:
    """Appends token arrays to `{split}-NNNNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.files: list[dict] = []
        self.hash = hashlib.sha256()
        self.total = 0
        self._f = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        self.hash.update(tokens.tobytes())
        self.total += len(tokens)
        while len(tokens):
            if self._f is None or self._in_shard >= self.shard_tokens:
                self._open_next()
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            self._f.write(tokens[:take].tobytes())
            self._in_shard += take
            self.files[-1]["tokens"] += take
            tokens = tokens[take:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self._f = open(self.out / name, "wb")  # noqa: SIM115 - closed in close()
        self._in_shard = 0
        self.files.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None


def prepare_tokens(
    inputs: list[str | Path],
    tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    text_field: str = "text",
    eos_between_docs: bool = True,
    shard_tokens: int = 100_000_000,
) -> dict:
    """Tokenize text / jsonl / json files into memmap shards under `out_dir`; returns the meta dict.

    Args:
        inputs: files read with `llmkit.tokenizer.iter_texts` (`.txt` is one document, `.jsonl` one per line).
        tokenizer: an `llmkit.tokenizer.Tokenizer`.
        val_fraction: tail fraction of each file's tokens used for validation (0 disables validation).
        eos_between_docs: append EOS after every document, so the model learns where texts end.
        shard_tokens: most tokens per `.bin` file.
    """
    from llmkit.tokenizer import iter_texts

    if not inputs:
        raise ValueError("prepare_tokens: no input files given")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*.bin")) + [out / META]:
        stale.unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    text_bytes = {"train": 0, "val": 0}
    sources = []
    for path in inputs:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
        docs = []
        for text in iter_texts(path, text_field=text_field):
            toks = encode_document(tokenizer, text)
            if eos_between_docs and tokenizer.eos_id is not None:
                toks = np.append(toks, np.array([tokenizer.eos_id], dtype=dtype))
            docs.append((toks, len(text.encode("utf-8"))))
        stream = np.concatenate([d[0] for d in docs]) if docs else np.zeros(0, dtype)
        n_bytes = sum(d[1] for d in docs)
        cut = int(len(stream) * (1.0 - val_fraction))
        writers["train"].write(stream[:cut])
        writers["val"].write(stream[cut:])
        # bytes are attributed in proportion to tokens: exact for one document, close for many
        share = cut / max(1, len(stream))
        text_bytes["train"] += round(n_bytes * share)
        text_bytes["val"] += n_bytes - round(n_bytes * share)
        sources.append(
            {
                "path": str(path),
                "sha256": file_sha256(path),
                "documents": len(docs),
                "tokens": int(len(stream)),
                "bytes": n_bytes,
            }
        )
    for w in writers.values():
        w.close()
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_digest": tokenizer.digest(),
        "eos_between_docs": eos_between_docs,
        "val_fraction": val_fraction,
        "sources": sources,
        "splits": {
            s: {"tokens": w.total, "bytes": text_bytes[s], "shards": w.files, "sha256": w.hash.hexdigest()}
            for s, w in writers.items()
        },
    }
    tmp = out / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META)
    return meta


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: no {META}; run `llmkit prepare` first")
    return json.loads(path.read_text())


@dataclass
class TokenSplit:
    """The shards of one split, opened read-only as memmaps."""

    shards: list[np.memmap]
    tokens: int
    bytes: int
    sha256: str

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(1, self.tokens)


def open_split(data_dir: str | Path, split: str) -> TokenSplit:
    meta = read_meta(data_dir)
    info = meta["splits"][split]
    shards = [
        np.memmap(Path(data_dir) / s["file"], dtype=meta["dtype"], mode="r")
        for s in info["shards"]
        if s["tokens"] > 0
    ]
    return TokenSplit(shards=shards, tokens=info["tokens"], bytes=info["bytes"], sha256=info["sha256"])
