"""Tokenized SFT data: instruction files -> deduplicated, tokenized, split examples with response-only
loss masks (`build_sft_data`), and the ``data:`` section of a fine-tuning config (`InstructDataConfig`).

Steps of `build_sft_data`:

1. **Read** every file with `llmkit.finetune.instruction_formats` (alpaca or sharegpt); malformed records
   are listed with their reason and left out.
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

`llmkit.finetune.sft_batches` turns the result into training and eval batches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from llmkit.chat import ChatFormatError, ChatTemplate, JinjaChatTemplate, chat_template_for, encode_chats
from llmkit.finetune.instruction_formats import Conversation, read_instruction_file

__all__ = ["InstructDataConfig", "SFTData", "SFTExample", "build_sft_data"]


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


def sft_digest(tokenizer, template, max_len: int, train: list[SFTExample], eval_: list[SFTExample]) -> str:
    """`SFTData.digest`: sha256 of the tokenizer, template, max_len and every example's ids and mask."""
    h = hashlib.sha256()
    h.update(tokenizer.digest().encode())
    h.update(template.fingerprint().encode())
    h.update(str(max_len).encode())
    for name, examples in (("train", train), ("eval", eval_)):
        h.update(name.encode())
        for ex in examples:
            h.update(len(ex.ids).to_bytes(8, "little"))
            h.update(ex.ids.astype("<i8").tobytes())
            h.update(np.packbits(ex.loss_mask).tobytes())
    return h.hexdigest()


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
        c, lc, bad, fmt, n = read_instruction_file(path, cfg.format)
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

    counts = {
        "records": n_records, "malformed": len(malformed), "conversations": len(convs),
        "duplicates": duplicates, "too_long_dropped": dropped, "truncated": truncated,
        "train": len(splits["train"]), "eval": len(splits["eval"]),
        "train_tokens": int(sum(len(e.ids) for e in splits["train"])),
        "train_loss_tokens": int(sum(int(e.loss_mask.sum()) for e in splits["train"])),
    }
    digest = sft_digest(tokenizer, template, max_len, splits["train"], splits["eval"])
    return SFTData(train=splits["train"], eval=splits["eval"], digest=digest, counts=counts,
                   malformed=malformed, files=files, template=template, max_len=max_len, pad_id=tokenizer.pad_id)
