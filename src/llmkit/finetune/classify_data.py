"""Labelled text for classification: snippets cut from source corpora (the domain-identification task)
or a user `.jsonl` of `text` / `label` records, split stratified and balanced, tokenized for an encoder.

Every snippet's fate is known: a record without text or label is an error naming file and line, and
the split is deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from llmkit.tokenizer import iter_texts


def _default_sources() -> dict[str, str]:
    return {
        "literature": "data/samples/en/tinyshakespeare.txt",
        "encyclopedia": "data/samples/en/wiki_demo.txt",
        "web": "data/samples/en/c4_demo.jsonl",
    }


@dataclass
class ClassifyDataConfig:
    sources: dict[str, str] = field(default_factory=_default_sources)
    """label -> corpus file (.txt / .jsonl / .json, read with `iter_texts`): every snippet cut from the file
    gets that label (the domain-identification task). May be empty when `jsonl` is set."""
    text_field: str = "text"
    """Field holding the text in .jsonl / .json source records."""
    jsonl: str | None = None
    """A labelled .jsonl file, one {"text": ..., "label": ...} per line; records are used whole (not cut)."""
    snippet_chars: int = 256
    """Characters per snippet cut from `sources`."""
    min_snippet_chars: int | None = None
    """A document's last, shorter piece is kept when at least this long; None -> snippet_chars // 2."""
    test_fraction: float = 0.1
    """Fraction of each class held out for evaluation (after balancing)."""
    balance: bool = True
    """Downsample every class to the size of the smallest one (after `max_per_class`)."""
    max_per_class: int | None = None
    """Keep at most this many examples per class (a random, seeded subset)."""
    seed: int = 0
    """Seed of the shuffle that picks the test split and subsets (independent of train.seed)."""
    tokenizer: str | None = None
    """Directory holding tokenizer.json; None -> the tokenizer of `init_from`, or train one (tokenizer_kind)."""
    tokenizer_kind: Literal["bpe", "char"] = "bpe"
    """Kind of tokenizer trained on the training split when `tokenizer` is None and there is no `init_from`."""
    tokenizer_vocab_size: int = 2048
    add_cls: bool = True
    """Prepend the bos token as a [CLS]-style first token."""

    def validate(self) -> None:
        if not self.sources and not self.jsonl:
            raise ValueError("sources: empty and no jsonl given: there is nothing to classify")
        if self.snippet_chars < 1:
            raise ValueError(f"snippet_chars: must be >= 1, got {self.snippet_chars}")
        if self.min_snippet_chars is not None and not 1 <= self.min_snippet_chars <= self.snippet_chars:
            raise ValueError(f"min_snippet_chars: must be in [1, snippet_chars], got {self.min_snippet_chars}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction: must be in (0, 1), got {self.test_fraction}")
        if self.max_per_class is not None and self.max_per_class < 2:
            raise ValueError(f"max_per_class: must be >= 2, got {self.max_per_class}")
        for label, path in self.sources.items():
            if not isinstance(label, str) or not label or not isinstance(path, str) or not path:
                raise ValueError(f"sources: expected label: path (two strings), got {label!r}: {path!r}")


@dataclass
class LabelledSplit:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self, n_labels: int) -> list[int]:
        return [self.labels.count(i) for i in range(n_labels)]


def snippets(text: str, size: int, min_size: int | None = None) -> list[str]:
    """Non-overlapping pieces of `size` characters; a shorter last piece is kept if >= `min_size`
    (default size // 2). Pieces that are only whitespace are dropped."""
    min_size = size // 2 if min_size is None else min_size
    out = []
    for start in range(0, len(text), size):
        piece = text[start:start + size]
        if len(piece) >= min_size and len(piece) >= 1 and piece.strip():
            out.append(piece)
    return out


def read_labelled_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """(text, label) pairs of a .jsonl file whose records have a string `text` and a `label` (string or
    integer, used as a string). Raises ValueError naming file and line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.jsonl: {path} not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            loc = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{loc}: not valid JSON: {e.msg}") from e
            if not isinstance(record, dict):
                raise ValueError(f"{loc}: expected a JSON object with 'text' and 'label', got {type(record).__name__}")
            for key in ("text", "label"):
                if key not in record or record[key] is None:
                    raise ValueError(f"{loc}: record has no {key!r} field")
            text, label = record["text"], record["label"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{loc}: 'text' must be a non-empty string, got {text!r:.60}")
            if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label) == "":
                raise ValueError(f"{loc}: 'label' must be a non-empty string (or integer), got {label!r}")
            out.append((text, str(label)))
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def build_dataset(cfg: ClassifyDataConfig) -> tuple[LabelledSplit, LabelledSplit, list[str]]:
    """The labelled train and test splits and the label names (index = label id, sorted by name).

    Deterministic for a given `cfg.seed`: exact duplicate texts are dropped (a text under two labels is
    dropped altogether), each class is shuffled, capped at `max_per_class`, balanced to the smallest class,
    and `test_fraction` of it (at least one example) is held out. No text is in both splits.
    """
    by_label: dict[str, list[str]] = {}
    for label, path in cfg.sources.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data.sources.{label}: {path} not found; "
                                    f"fetch the sample corpora with `llmkit samples fetch`")
        pieces = by_label.setdefault(label, [])
        for doc in iter_texts(path, text_field=cfg.text_field):
            pieces.extend(snippets(doc, cfg.snippet_chars, cfg.min_snippet_chars))
        if not pieces:
            raise ValueError(f"data.sources: {path} yields no snippet of >= "
                             f"{cfg.min_snippet_chars or cfg.snippet_chars // 2} characters")
    if cfg.jsonl:
        for text, label in read_labelled_jsonl(cfg.jsonl):
            by_label.setdefault(label, []).append(text)
    if len(by_label) < 2:
        raise ValueError(f"need at least 2 classes, got {sorted(by_label)}")

    # Deduplicate: a text under one label once; a text under several labels is ambiguous, dropped.
    owners: dict[str, set[str]] = {}
    for label, texts in by_label.items():
        for t in texts:
            owners.setdefault(t, set()).add(label)
    names = sorted(by_label)
    per_class: list[list[str]] = []
    for label in names:
        seen: set[str] = set()
        kept = []
        for t in by_label[label]:
            if t not in seen and len(owners[t]) == 1:
                seen.add(t)
                kept.append(t)
        rng = random.Random(f"{cfg.seed}:{label}")
        rng.shuffle(kept)
        if cfg.max_per_class is not None:
            kept = kept[:cfg.max_per_class]
        per_class.append(kept)
    if cfg.balance:
        n = min(len(k) for k in per_class)
        per_class = [k[:n] for k in per_class]
    train, test = LabelledSplit([], []), LabelledSplit([], [])
    for i, (label, texts) in enumerate(zip(names, per_class)):
        if len(texts) < 2:
            raise ValueError(f"class {label!r} has {len(texts)} example(s): need at least 2 (one to train, one to test)")
        n_test = min(len(texts) - 1, max(1, round(len(texts) * cfg.test_fraction)))
        test.texts += texts[:n_test]
        test.labels += [i] * n_test
        train.texts += texts[n_test:]
        train.labels += [i] * (len(texts) - n_test)
    return train, test, names


def split_digest(split: LabelledSplit) -> str:
    h = hashlib.sha256()
    for t, y in zip(split.texts, split.labels):
        h.update(f"{y}\t{len(t)}\t".encode())
        h.update(t.encode("utf-8"))
    return h.hexdigest()


def encode_split(split: LabelledSplit, tokenizer, block_size: int, add_cls: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels): ids truncated to `block_size`, right-padded with
    `tokenizer.pad_id` to the longest sequence; the mask is 1 on real tokens and 0 on padding."""
    ids = tokenizer.encode_batch(split.texts, add_bos=add_cls)
    ids = [x[:block_size] for x in ids]
    width = max(1, max((len(x) for x in ids), default=1))
    input_ids = torch.full((len(ids), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    return input_ids, mask, torch.tensor(split.labels, dtype=torch.long)


class EpochBatches:
    """Shuffled mini-batches, a fresh permutation per epoch (seed + epoch), with a resumable position."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next_indices(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n and self.pos > 0:  # drop the ragged end of an epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"checkpoint was written for {state['n']} training examples, the data now has {self.n}")
        self.epoch, self.pos, self.seed = state["epoch"], state["pos"], state["seed"]
        self._perm = self._permutation()
