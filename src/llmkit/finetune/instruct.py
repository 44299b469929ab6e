"""Instruction-tuning data: alpaca / sharegpt readers, the train/eval split, tokenized SFT examples with
response-only loss masks, batches that mix in pretraining text, and the answer metrics.

Pipeline (`build_sft_data`):

1. **Read** every file with `load_conversations`. Two formats, as LLaMA-Factory names them:
   *alpaca* (Taori et al. 2023): ``{"instruction", "input", "output"}`` plus optional ``system`` and
   ``history`` (``[[query, answer], ...]`` earlier turns); the user turn is ``instruction + "\\n" + input``.
   *sharegpt*: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}`` or
   ``{"messages": [{"role", "content"}, ...]}`` (OpenAI style), optional record-level ``system``.
   A record that cannot be read is *malformed*: it is listed with file + record index and the reason,
   counted, and left out; a file with records but not one usable conversation is an error (wrong format).
2. **System prompt** `system` is added to conversations without one; **exact duplicates** are dropped
   (counted), so no eval conversation is also a training one.
3. **Tokenize** with the chat template (`llmkit.chat.encode_chats`): the loss mask covers assistant
   content + end-of-turn only (LIMA, Zhou et al. 2023; Alpaca / Vicuna recipe). An imported model's own
   Jinja template works the same way: its ``{% generation %}`` blocks, or each reply found by rendering the
   conversation's prefixes; a record the template refuses (``raise_exception``) is malformed, with its message.
4. **Split** deterministically: a conversation goes to eval when the sha256 of (seed, its text) is among
   the ``min(eval_max, eval_fraction * n)`` smallest. Membership depends on the conversation itself, not on
   file order, and does not change with `max_len`.
5. **Truncate** examples longer than `max_len` tokens at the right (counted); one with no loss token left
   within `max_len` (the prompt alone fills it) is dropped (counted).

`MixedBatches` then yields fixed-shape (B, T) batches in which a share `mix_pretrain` of the rows are
windows of raw pretraining text (full next-token loss): mixing 10-20 % of the original pretraining data
into instruction tuning against catastrophic forgetting (the guide §3.3; InstructGPT's "PPO-ptx" mixes
pretraining gradients for the same reason, Ouyang et al. 2022). The count of pretraining rows per batch
follows an error-diffusion schedule, so after k batches exactly ``floor(k * B * mix_pretrain)`` rows were
pretraining rows: the share is exact, not just in expectation. SFT rows walk a per-epoch seeded
permutation; the state (batch count, epoch, position, pretraining RNG) resumes bit-identically.

Note on loss weighting: with a token-mean cross-entropy a pretraining row contributes T loss tokens and
an SFT row only its response tokens, so the *token* share of pretraining text in the loss is larger
than the row share (measured in docs/finetune.md).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from llmkit.chat import ChatFormatError, ChatTemplate, JinjaChatTemplate, chat_template_for, encode_chats
from llmkit.data.tokenized import TokenSplit

__all__ = [
    "IGNORE_INDEX",
    "InstructDataConfig",
    "MixedBatches",
    "SFTData",
    "SFTExample",
    "build_sft_data",
    "eval_batches",
    "exact_match",
    "load_conversations",
    "load_pretrain_tokens",
    "open_pretrain_tokens",
    "rouge_l",
]

IGNORE_INDEX = -100
"""Target value of positions without loss (PyTorch cross_entropy's default ignore_index)."""

Conversation = list[dict[str, str]]


@dataclass
class InstructDataConfig:
    """Instruction data of a fine-tuning run (the ``data:`` section of ``configs/sft_*.yaml``)."""

    paths: list[str] = field(default_factory=list)
    """Instruction files: .json (a list of records) or .jsonl (one record per line)."""
    format: Literal["auto", "alpaca", "sharegpt"] = "auto"
    """Record format; "auto" decides per file from the first record that has alpaca or sharegpt keys."""
    system: str | None = None
    """System prompt added to conversations that have none. Inference must send the same one: prefer the
    chat template's `default_system`, which generate and the server apply by themselves."""
    eval_fraction: float = 0.05
    """Share of (deduplicated) conversations held out for evaluation."""
    eval_max: int = 200
    """At most this many eval conversations."""
    max_len: int | None = None
    """Most tokens per example (prompt + response); None = the model's block_size."""
    mix_pretrain: float = 0.15
    """Share of batch rows that are pretraining windows (guide: 10-20 %); 0 disables mixing."""
    pretrain: str | None = None
    """Pretraining text: an `llmkit prepare` token dir (its train split), or a text file / glob
    (.txt/.jsonl/.json/.parquet) tokenized on the fly. Required when mix_pretrain > 0."""
    seed: int = 0
    """Seed of the eval split, the SFT shuffle and the pretraining windows."""

    def validate(self) -> None:
        if not self.paths:
            raise ValueError("paths: give at least one instruction file (.json / .jsonl)")
        for p in self.paths:
            if not isinstance(p, str) or not p:
                raise ValueError(f"paths: entries must be non-empty strings, got {p!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.eval_max < 0:
            raise ValueError(f"eval_max: must be >= 0, got {self.eval_max}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len: must be >= 2 (or null for the block size), got {self.max_len}")
        if not 0.0 <= self.mix_pretrain < 1.0:
            raise ValueError(f"mix_pretrain: must be in [0, 1), got {self.mix_pretrain}")
        if self.mix_pretrain > 0 and not self.pretrain:
            raise ValueError(f"mix_pretrain: is {self.mix_pretrain} but pretrain is not set; give a token dir or "
                             "text files as pretrain, or set mix_pretrain: 0")


# -- reading ---------------------------------------------------------------------------------------


class _Malformed(Exception):
    pass


_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
    "system": "system",
}


def _read_records(path: Path) -> tuple[list[tuple[str, Any]], list[dict]]:
    """((location, record) pairs, malformed) of a .json list or a .jsonl file."""
    if not path.is_file():
        raise FileNotFoundError(f"instruction file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records, bad = [], []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                loc = f"{path}:{lineno}"
                try:
                    records.append((loc, json.loads(line)))
                except json.JSONDecodeError as e:
                    bad.append({"where": loc, "reason": f"not valid JSON: {e.msg}"})
        return records, bad
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return [(f"{path}: record [{i}]", r) for i, r in enumerate(data)], []
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected .json or .jsonl")


def _detect_format(records: list[tuple[str, Any]], path: Path) -> str:
    for _, r in records:
        if isinstance(r, dict):
            if "conversations" in r or "messages" in r:
                return "sharegpt"
            if "instruction" in r:
                return "alpaca"
    raise ValueError(f"{path}: cannot detect the format: no record has 'instruction' (alpaca) or "
                     "'conversations' / 'messages' (sharegpt); set format explicitly")


def _text(record: dict, key: str, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise _Malformed(f"missing {key!r}")
        return ""
    if not isinstance(value, str):
        raise _Malformed(f"{key!r} is a {type(value).__name__}, not a string")
    if required and not value.strip():
        raise _Malformed(f"{key!r} is empty")
    return value


def _alpaca(record: Any) -> Conversation:
    if not isinstance(record, dict):
        raise _Malformed(f"expected a JSON object, got {type(record).__name__}")
    instruction = _text(record, "instruction", True)
    query = _text(record, "input", False)
    output = _text(record, "output", True)
    system = _text(record, "system", False)
    messages: Conversation = [{"role": "system", "content": system}] if system.strip() else []
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise _Malformed(f"'history' is a {type(history).__name__}, not a list of [query, answer] pairs")
        for j, pair in enumerate(history):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(s, str) and s.strip() for s in pair)):
                raise _Malformed(f"history[{j}] is not a [query, answer] pair of non-empty strings")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = instruction + "\n" + query if query.strip() else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _sharegpt(record: Any) -> Conversation:
    if not isinstance(record, dict):
        raise _Malformed(f"expected a JSON object, got {type(record).__name__}")
    key = "conversations" if "conversations" in record else "messages" if "messages" in record else None
    if key is None:
        raise _Malformed("no 'conversations' or 'messages' list")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise _Malformed(f"{key!r} must be a non-empty list")
    messages: Conversation = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Malformed(f"{key}[{j}] is a {type(turn).__name__}, not an object")
        if "from" in turn or "value" in turn:
            who, content = turn.get("from"), turn.get("value")
        else:
            who, content = turn.get("role"), turn.get("content")
        role = _SHAREGPT_ROLES.get(who) if isinstance(who, str) else None
        if role is None:
            raise _Malformed(f"{key}[{j}]: unknown role {who!r} (known: {sorted(_SHAREGPT_ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise _Malformed(f"{key}[{j}]: content must be a non-empty string")
        messages.append({"role": role, "content": content})
    system = _text(record, "system", False)
    if system.strip():
        if messages[0]["role"] == "system":
            raise _Malformed("both a record-level 'system' and a system turn")
        messages.insert(0, {"role": "system", "content": system})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise _Malformed("only a system message")
    for j, m in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise _Malformed(f"turn {j} (after any system turn) is {m['role']!r}, expected {expected!r}: "
                             "turns must alternate user / assistant, starting with user")
    if body[-1]["role"] != "assistant":
        raise _Malformed("ends with a user turn: no response to learn from")
    return messages


def _load(path: str | Path, format: str) -> tuple[list[Conversation], list[str], list[dict], str, int]:
    """(conversations, their locations, malformed, format used, number of records)."""
    path = Path(path)
    records, malformed = _read_records(path)
    n_records = len(records) + len(malformed)  # unparseable .jsonl lines are records too
    if format not in ("auto", "alpaca", "sharegpt"):
        raise ValueError(f"format must be 'auto', 'alpaca' or 'sharegpt', got {format!r}")
    fmt = _detect_format(records, path) if format == "auto" else format
    parse = _alpaca if fmt == "alpaca" else _sharegpt
    convs, locs = [], []
    for loc, record in records:
        try:
            convs.append(parse(record))
            locs.append(loc)
        except _Malformed as e:
            malformed.append({"where": loc, "reason": str(e)})
    return convs, locs, malformed, fmt, n_records


def load_conversations(path: str | Path, format: str = "auto") -> tuple[list[Conversation], list[dict]]:
    """Conversations of an alpaca or sharegpt file, and its malformed records.

    Args:
        path: a .json file holding a list of records, or a .jsonl file with one record per line.
        format: "alpaca", "sharegpt" or "auto" (from the first record with recognizable keys).
    Returns:
        ``(conversations, malformed)``: each conversation a list of ``{"role", "content"}`` messages
        (system first if any, then alternating user / assistant, ending with assistant); each malformed
        record a ``{"where": "file: record [i]" | "file:line", "reason": str}``.
    Raises:
        FileNotFoundError; ValueError for a file that is not JSON / not a list / of undetectable format.
    """
    convs, _, malformed, _, _ = _load(path, format)
    return convs, malformed


# -- tokenized SFT data ------------------------------------------------------------------------------


@dataclass
class SFTExample:
    """One tokenized conversation."""

    messages: Conversation
    """The conversation (system prompt applied); for generation evals: prompt = messages[:-1]."""
    ids: np.ndarray
    """int64 (n,): token ids, n <= max_len."""
    loss_mask: np.ndarray
    """bool (n,): True on assistant content + end-of-turn tokens."""
    full_len: int
    """Tokens before truncation."""
    source: str
    """Where it came from: "file: record [i]" or "file:line"."""

    @property
    def truncated(self) -> bool:
        return self.full_len > len(self.ids)


@dataclass
class SFTData:
    """Tokenized train / eval examples and the account of every record."""

    train: list[SFTExample]
    eval: list[SFTExample]
    digest: str
    """sha256 of the tokenizer, template, max_len and every example's ids and mask (data lineage)."""
    counts: dict[str, int]
    """records, malformed, conversations, duplicates, too_long_dropped, truncated, train, eval, train_tokens,
    train_loss_tokens (the last two over the train split, padding excluded)."""
    malformed: list[dict]
    """Every record left out for its content: {where, reason} (duplicates and too-long ones are only counted)."""
    files: dict[str, dict]
    """Per file: format, records, conversations, malformed."""
    template: ChatTemplate | JinjaChatTemplate
    max_len: int
    pad_id: int

    @property
    def truncated(self) -> int:
        """Examples cut to max_len (kept; their tail is lost)."""
        return self.counts["truncated"]

    @property
    def eval_conversations(self) -> list[Conversation]:
        """The eval examples' conversations (for generation evals: prompt = conv[:-1], reference = conv[-1])."""
        return [e.messages for e in self.eval]

    @property
    def loss_share(self) -> float:
        """Share of training tokens that carry loss (before padding)."""
        return self.counts["train_loss_tokens"] / max(1, self.counts["train_tokens"])

    def summary(self) -> dict:
        """JSON-able account for logs and run metadata."""
        return {"digest": self.digest, "counts": dict(self.counts), "loss_share": round(self.loss_share, 4),
                "files": self.files, "malformed_examples": self.malformed[:20], "template": self.template.name,
                "max_len": self.max_len}


def _canonical(messages: Conversation) -> str:
    return json.dumps([[m["role"], m["content"].strip()] for m in messages], ensure_ascii=False)


def build_sft_data(cfg: InstructDataConfig, tokenizer, template: ChatTemplate | JinjaChatTemplate | None,
                   block_size: int) -> SFTData:
    """Read, deduplicate, tokenize and split the instruction data of `cfg` (see the module docstring).

    Args:
        tokenizer: `llmkit.tokenizer.Tokenizer`.
        template: the chat template (None: ``chat_template_for(tokenizer)``); store it with the model. A
            model's own Jinja template (`JinjaChatTemplate`) gives masks from its ``{% generation %}`` blocks,
            or else from rendering each conversation's prefixes (`llmkit.chat.encode_chats`).
        block_size: the model's context length T; examples get at most ``cfg.max_len or block_size`` tokens.
    Raises:
        ValueError when no conversation is left, or a file has records but none usable.
    """
    cfg.validate()
    template = template or chat_template_for(tokenizer)
    max_len = cfg.max_len or block_size
    if max_len > block_size:
        raise ValueError(f"max_len: {max_len} exceeds the model's block_size {block_size}")

    convs: list[Conversation] = []
    locs: list[str] = []
    malformed: list[dict] = []
    files: dict[str, dict] = {}
    n_records = 0
    for path in cfg.paths:
        c, lc, bad, fmt, n = _load(path, cfg.format)
        if n and not c:
            reasons = "; ".join(f"{m['where']}: {m['reason']}" for m in bad[:3])
            raise ValueError(f"{path}: none of its {n} records is a usable {fmt} conversation ({reasons})")
        files[str(path)] = {"format": fmt, "records": n, "conversations": len(c), "malformed": len(bad)}
        n_records += n
        convs += c
        locs += lc
        malformed += bad

    if cfg.system is not None:
        convs = [c if c[0]["role"] == "system" else [{"role": "system", "content": cfg.system}, *c]
                 for c in convs]

    seen: set[str] = set()
    unique: list[int] = []
    keys: list[str] = []
    for i, c in enumerate(convs):
        key = _canonical(c)
        if key not in seen:
            seen.add(key)
            unique.append(i)
            keys.append(key)
    duplicates = len(convs) - len(unique)

    encoded = encode_chats(tokenizer, [convs[i] for i in unique], template)
    ok: list[tuple[int, str, np.ndarray, np.ndarray]] = []
    for i, key, enc in zip(unique, keys, encoded):
        if isinstance(enc, ChatFormatError):
            malformed.append({"where": locs[i], "reason": str(enc)})
        else:
            ok.append((i, key, *enc))
    if not ok:
        raise ValueError(f"no usable conversation in {cfg.paths} ({len(malformed)} malformed)")

    n = len(ok)
    n_eval = min(cfg.eval_max, round(n * cfg.eval_fraction))
    if cfg.eval_fraction > 0 and cfg.eval_max > 0 and n >= 2:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, n - 1)
    rank = sorted(range(n), key=lambda j: hashlib.sha256(f"{cfg.seed}\0{ok[j][1]}".encode()).digest())
    eval_set = set(rank[:n_eval])

    splits: dict[str, list[SFTExample]] = {"train": [], "eval": []}
    truncated = dropped = 0
    for j, (i, _, ids, mask) in enumerate(ok):
        full = len(ids)
        if full > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
            if not mask[1:].any():
                dropped += 1
                continue
            truncated += 1
        splits["eval" if j in eval_set else "train"].append(SFTExample(convs[i], ids, mask, full, locs[i]))
    if not splits["train"]:
        raise ValueError(f"no training example fits max_len={max_len} tokens ({dropped} dropped as too long)")

    h = hashlib.sha256()
    h.update(tokenizer.digest().encode())
    h.update(template.fingerprint().encode())
    h.update(str(max_len).encode())
    for name in ("train", "eval"):
        h.update(name.encode())
        for ex in splits[name]:
            h.update(len(ex.ids).to_bytes(8, "little"))
            h.update(ex.ids.astype("<i8").tobytes())
            h.update(np.packbits(ex.loss_mask).tobytes())

    counts = {
        "records": n_records, "malformed": len(malformed), "conversations": len(convs),
        "duplicates": duplicates, "too_long_dropped": dropped, "truncated": truncated,
        "train": len(splits["train"]), "eval": len(splits["eval"]),
        "train_tokens": int(sum(len(e.ids) for e in splits["train"])),
        "train_loss_tokens": int(sum(int(e.loss_mask.sum()) for e in splits["train"])),
    }
    return SFTData(train=splits["train"], eval=splits["eval"], digest=h.hexdigest(), counts=counts,
                   malformed=malformed, files=files, template=template, max_len=max_len, pad_id=tokenizer.pad_id)


# -- pretraining tokens ------------------------------------------------------------------------------


def load_pretrain_tokens(spec: str | Path, tokenizer) -> TokenSplit:
    """The pretraining text to mix in, as token shards.

    `spec` is an `llmkit prepare` token dir (its ``train`` split; refused when made by another tokenizer),
    or a text file or glob pattern of files read with `llmkit.tokenizer.iter_texts` and tokenized now,
    each document followed by EOS (as `prepare` does).
    """
    from llmkit.data.tokenized import encode_document, open_split, read_meta, token_dtype
    from llmkit.tokenizer import iter_texts

    p = Path(spec)
    if p.is_dir():
        meta = read_meta(p)
        if meta.get("tokenizer_digest") != tokenizer.digest():
            raise ValueError(f"pretrain: {p} was tokenized with another tokenizer (digest "
                             f"{str(meta.get('tokenizer_digest'))[:12]} != {tokenizer.digest()[:12]}); "
                             "prepare it again with this model's tokenizer")
        return open_split(p, "train")
    files = [p] if p.is_file() else [Path(f) for f in sorted(glob.glob(str(spec))) if Path(f).is_file()]
    if not files:
        raise FileNotFoundError(f"pretrain: {spec} is neither a token dir, a file, nor a glob matching files")
    dtype = token_dtype(tokenizer.vocab_size)
    pieces, n_bytes = [], 0
    for f in files:
        for text in iter_texts(f):
            pieces.append(encode_document(tokenizer, text))
            pieces.append(np.array([tokenizer.eos_id], dtype=dtype))
            n_bytes += len(text.encode("utf-8"))
    stream = np.concatenate(pieces).astype(dtype, copy=False)
    return TokenSplit(shards=[stream], tokens=len(stream), bytes=n_bytes,
                      sha256=hashlib.sha256(stream.tobytes()).hexdigest())


def open_pretrain_tokens(cfg: InstructDataConfig, tokenizer) -> TokenSplit:
    """`load_pretrain_tokens` of ``cfg.pretrain`` (which must be set)."""
    if not cfg.pretrain:
        raise ValueError("pretrain: not set; give a token dir or text files (or set mix_pretrain: 0)")
    return load_pretrain_tokens(cfg.pretrain, tokenizer)


# -- batches ----------------------------------------------------------------------------------------


def _fill_row(x: np.ndarray, y: np.ndarray, ex: SFTExample, pad_id: int) -> None:
    """Row of an SFT example: x = ids[:-1] then pad, y = ids[1:] where the mask is set, else -100."""
    n = len(ex.ids) - 1
    x[:n] = ex.ids[:-1]
    x[n:] = pad_id
    y[:n] = np.where(ex.loss_mask[1:], ex.ids[1:], IGNORE_INDEX)
    y[n:] = IGNORE_INDEX


class MixedBatches:
    """Training batches of SFT examples with pretraining windows mixed in, resumable exactly.

    Args:
        sft_data: from `build_sft_data`; its ``train`` examples are used.
        pretrain_tokens: a `TokenSplit` (`load_pretrain_tokens`, `llmkit.data.tokenized.open_split`), a 1-D
            array of token ids, or None (then `mix_pretrain` must be 0).
        batch_size: rows B per batch.
        block_size: columns T; every example must have at most T + 1 tokens.
        mix_pretrain: share of rows that are pretraining windows, in [0, 1). Batch k (from 0) holds
            ``floor((k+1)*B*mix) - floor(k*B*mix)`` of them, in its last rows.
        seed: seeds the per-epoch SFT permutation and the window offsets.

    ``next()`` returns ``(x, y)``: int64 tensors (B, T). SFT rows: x = example ids (padded with pad_id),
    y = next tokens where the loss mask is set, else -100. Pretraining rows: a random window of T + 1
    tokens, y = x shifted by one (loss on every position).
    """

    def __init__(self, sft_data: SFTData, pretrain_tokens: TokenSplit | np.ndarray | None, batch_size: int,
                 block_size: int, mix_pretrain: float = 0.15, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= mix_pretrain < 1.0:
            raise ValueError(f"mix_pretrain must be in [0, 1), got {mix_pretrain}")
        if not sft_data.train:
            raise ValueError("sft_data has no training examples")
        longest = max(len(e.ids) for e in sft_data.train)
        if longest > block_size + 1:
            raise ValueError(f"an example has {longest} tokens, more than block_size + 1 = {block_size + 1}")
        self.sft, self.B, self.T, self.seed = sft_data, batch_size, block_size, seed
        self.mix = float(mix_pretrain)
        self._mix = Fraction(repr(self.mix))  # exact: 0.15 -> 3/20, so the schedule has no float drift
        self._shards: list[np.ndarray] = []
        self._pretrain_digest: str | None = None
        if self.mix > 0:
            if pretrain_tokens is None:
                raise ValueError(f"mix_pretrain={mix_pretrain} but no pretraining tokens were given")
            if isinstance(pretrain_tokens, TokenSplit):
                shards, self._pretrain_digest = list(pretrain_tokens.shards), pretrain_tokens.sha256
            else:
                arr = np.asarray(pretrain_tokens)
                if arr.ndim != 1:
                    raise ValueError(f"pretrain_tokens must be 1-D token ids, got shape {arr.shape}")
                shards, self._pretrain_digest = [arr], hashlib.sha256(arr.astype("<i8").tobytes()).hexdigest()
            self._shards = [s for s in shards if len(s) > block_size + 1]
            if not self._shards:
                raise ValueError(f"no pretraining shard is longer than block_size + 1 = {block_size + 1} tokens")
            starts = np.array([len(s) - block_size for s in self._shards], dtype=np.float64)
            self._shard_p = starts / starts.sum()
        self._rng = np.random.Generator(np.random.PCG64([seed, 0x9E7]))
        self._offsets = np.arange(block_size + 1)
        self.batches = 0
        self.epoch = 0
        self.position = 0
        self.sft_rows = 0
        self.pretrain_rows = 0
        self.last_pretrain_rows = 0
        """Pretraining rows in the last batch (its last rows)."""
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        # A fresh generator per epoch: the order of any epoch is known from (seed, epoch) alone.
        return np.random.Generator(np.random.PCG64([self.seed, epoch, 0x5F7])).permutation(len(self.sft.train))

    def _n_pretrain(self, k: int) -> int:
        bm = self.B * self._mix
        return math.floor((k + 1) * bm) - math.floor(k * bm)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch ``(x, y)``, int64 (B, T)."""
        B, T = self.B, self.T
        n_pre = self._n_pretrain(self.batches)
        x = np.empty((B, T), dtype=np.int64)
        y = np.empty((B, T), dtype=np.int64)
        for r in range(B - n_pre):
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            _fill_row(x[r], y[r], self.sft.train[self._order[self.position]], self.sft.pad_id)
            self.position += 1
        if n_pre:
            which = (self._rng.choice(len(self._shards), size=n_pre, p=self._shard_p) if len(self._shards) > 1
                     else np.zeros(n_pre, dtype=np.int64))
            for r, s in zip(range(B - n_pre, B), which):
                start = int(self._rng.integers(0, len(self._shards[s]) - T - 1, endpoint=True))
                window = np.asarray(self._shards[s][start:start + T + 1], dtype=np.int64)
                x[r], y[r] = window[:-1], window[1:]
        self.batches += 1
        self.sft_rows += B - n_pre
        self.pretrain_rows += n_pre
        self.last_pretrain_rows = n_pre
        return torch.from_numpy(x), torch.from_numpy(y)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next()

    def _fingerprint(self) -> dict:
        return {"sft_digest": self.sft.digest, "batch_size": self.B, "block_size": self.T, "mix_pretrain": self.mix,
                "seed": self.seed, "pretrain_digest": self._pretrain_digest}

    def state_dict(self) -> dict:
        """JSON-able position: batches drawn, epoch, position in the epoch, the window RNG, and a fingerprint
        of the data and settings (a resume with other data or settings is refused)."""
        return {"version": 1, "batches": self.batches, "epoch": self.epoch, "position": self.position,
                "sft_rows": self.sft_rows, "pretrain_rows": self.pretrain_rows,
                "rng": self._rng.bit_generator.state, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unsupported MixedBatches state version {state.get('version')!r}")
        mine, theirs = self._fingerprint(), dict(state["fingerprint"])
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        if diff:
            raise ValueError("cannot resume: the data or batch settings changed since the checkpoint ("
                             + ", ".join(f"{k}: {theirs.get(k)!r} -> {mine[k]!r}" for k in diff) + ")")
        self.batches, self.epoch, self.position = state["batches"], state["epoch"], state["position"]
        self.sft_rows, self.pretrain_rows = state["sft_rows"], state["pretrain_rows"]
        self._rng.bit_generator.state = state["rng"]
        self._order = self._permutation(self.epoch)


def eval_batches(sft_data: SFTData, batch_size: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The eval examples in order as ``(x, y)`` batches of int64 (b, T), b = batch_size except maybe the last;
    laid out like `MixedBatches` SFT rows (no pretraining rows). Empty when there is no eval split."""
    out = []
    for i in range(0, len(sft_data.eval), batch_size):
        chunk = sft_data.eval[i:i + batch_size]
        x = np.empty((len(chunk), block_size), dtype=np.int64)
        y = np.empty((len(chunk), block_size), dtype=np.int64)
        for r, ex in enumerate(chunk):
            if len(ex.ids) > block_size + 1:
                raise ValueError(f"eval example {ex.source} has {len(ex.ids)} tokens > block_size + 1")
            _fill_row(x[r], y[r], ex, sft_data.pad_id)
        out.append((torch.from_numpy(x), torch.from_numpy(y)))
    return out


# -- metrics -----------------------------------------------------------------------------------------

# CJK ideographs (BMP + extension A, compatibility, astral extensions B..) and Japanese kana: scripts
# written without spaces, compared character by character. Hangul is written with spaces: words.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\U00020000-\U0003134f"
_TOKEN = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_])+")
_ARTICLES = {"a", "an", "the"}


def _tokens(text: str) -> list[str]:
    """Lowercased words (letters/digits runs) and single CJK characters; punctuation and spaces dropped."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when `pred` and `ref` are the same answer after SQuAD-style normalization, else 0.0.

    Normalization (Rajpurkar et al. 2016, extended to Unicode): NFKC, lowercase, punctuation and whitespace
    ignored, English articles a/an/the dropped; CJK compared character by character.
    """
    a = [t for t in _tokens(pred) if t not in _ARTICLES]
    b = [t for t in _tokens(ref) if t not in _ARTICLES]
    return float(a == b)


def _lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison & Dix 1986; Hyyroe 2004).

    One big-integer bit per element of `a`: each element of `b` costs O(len(a)/64) machine words,
    instead of the O(len(a)) Python steps of the dynamic programme.
    """
    if not a or not b:
        return 0
    match: dict[str, int] = {}
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (Lin 2004): LCS-based precision P = lcs/len(pred), recall R = lcs/len(ref), F = 2PR/(P+R).

    Tokens as in `exact_match` but articles kept: words for space-separated scripts, single characters for
    CJK. An empty prediction or reference scores 0.0 (as Google's rouge-score package).
    """
    p, r = _tokens(pred), _tokens(ref)
    lcs = _lcs_len(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)
