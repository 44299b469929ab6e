"""Preference data: read, construct and tokenize (prompt, chosen, rejected) pairs and unpaired KTO examples.

Layouts read (`.json` list or `.jsonl`, detected per record):

* pairs: ``{"prompt": str | [messages], "chosen": str | message, "rejected": str | message}`` (prompt
  messages are ``{"role", "content"}``; an optional ``"system"``);
* LLaMA-Factory's sharegpt preference layout: ``{"conversations": [{"from", "value"}, ...], "chosen": {"from":
  "gpt", "value"}, "rejected": {"from": "gpt", "value"}}`` (optional ``"system"``), the conversation ending with
  a user turn;
* unpaired (KTO): ``{"prompt": ..., "completion": str | message, "label": true | false}``.

Each response is rendered after its prompt with the model's chat template (`encode_chat`) and only the
response tokens (and the end of turn) are scored. Malformed records are listed with file, record and reason;
too-long sequences are cut from the right and counted; a sequence left with no response token is counted as
`too_long` and its example dropped (reported).

`construct_pairs` builds a preference set from instruction data when no preference data exists: chosen = the
reference answer; rejected = the reference answer of another instruction in the same language (`other`), the
reference cut to its first third (`truncated`), or alternating both (`mixed`). Command:
``python -m llmkit.finetune.preference_data --from alpaca.json --out pairs.jsonl [--rejected other]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmkit.chat import encode_chat
from llmkit.chat_template import ChatFormatError
from llmkit.finetune.instruction_formats import load_conversations

Conversation = list[dict[str, str]]
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "model": "assistant", "bot": "assistant"}


@dataclass
class PreferenceDataConfig:
    paths: list[str] = field(default_factory=list)
    """Preference files (pairs, sharegpt with chosen / rejected, or unpaired {prompt, completion, label})."""
    construct_from: list[str] = field(default_factory=list)
    """Instruction files (alpaca / sharegpt) to build pairs from with `construct_pairs` (see `rejected`)."""
    rejected: Literal["other", "truncated", "mixed"] = "other"
    """How constructed pairs get their rejected answer."""
    max_len: int | None = None
    """Tokens per sequence (prompt + response); None: the model's block_size."""
    eval_fraction: float = 0.1
    eval_max: int = 100
    seed: int = 0

    def validate(self) -> None:
        if not self.paths and not self.construct_from:
            raise ValueError("data.paths or data.construct_from: at least one preference or instruction file")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction: must be in [0, 1), got {self.eval_fraction}")


@dataclass
class PreferenceRecord:
    prompt: Conversation
    responses: list[str]
    """[chosen, rejected] for a pair; [completion] for an unpaired example."""
    label: bool | None = None
    """Unpaired only: True = desirable."""
    where: str = ""


@dataclass
class PreferenceExample:
    seqs: list[tuple[np.ndarray, np.ndarray]]
    """(ids int64, response mask bool) per sequence: [chosen, rejected] for pairs; [completion, mismatched
    completion (the KL estimate's)] for unpaired examples."""
    label: bool | None = None


@dataclass
class PreferenceData:
    train: list[PreferenceExample]
    eval: list[PreferenceExample]
    paired: bool
    digest: str
    malformed: list[dict]
    truncated: int
    too_long: int
    n_records: int

    def summary(self) -> dict:
        return {"train": len(self.train), "eval": len(self.eval), "paired": self.paired,
                "records": self.n_records, "malformed": len(self.malformed), "truncated": self.truncated,
                "too_long": self.too_long, "malformed_examples": self.malformed[:5]}


class _Malformed(Exception):
    pass


def _message(value: Any, what: str) -> str:
    """A response given as a string or a {role/from, content/value} assistant message."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict):
        who = value.get("from", value.get("role", "assistant"))
        if _ROLES.get(who) != "assistant":
            raise _Malformed(f"{what}: role {who!r} is not the assistant's")
        text = value.get("value", value.get("content"))
    else:
        raise _Malformed(f"{what}: expected a string or a message, got {type(value).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise _Malformed(f"{what}: empty")
    return text


def _prompt(record: dict) -> Conversation:
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise _Malformed("'conversations' must be a non-empty list")
        msgs = []
        for j, t in enumerate(turns):
            if not isinstance(t, dict):
                raise _Malformed(f"conversations[{j}] is not an object")
            role = _ROLES.get(t.get("from", t.get("role")))
            content = t.get("value", t.get("content"))
            if role is None or not isinstance(content, str) or not content.strip():
                raise _Malformed(f"conversations[{j}]: unknown role or empty content")
            msgs.append({"role": role, "content": content})
    else:
        p = record.get("prompt")
        if isinstance(p, str):
            if not p.strip():
                raise _Malformed("'prompt' is empty")
            msgs = [{"role": "user", "content": p}]
        elif isinstance(p, list) and p:
            msgs = []
            for j, t in enumerate(p):
                role = _ROLES.get(t.get("role", t.get("from"))) if isinstance(t, dict) else None
                content = t.get("content", t.get("value")) if isinstance(t, dict) else None
                if role is None or not isinstance(content, str) or not content.strip():
                    raise _Malformed(f"prompt[{j}]: not a {{role, content}} message")
                msgs.append({"role": role, "content": content})
        else:
            raise _Malformed("no 'prompt' (a string or a list of messages) and no 'conversations'")
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        if msgs[0]["role"] == "system":
            raise _Malformed("both a record-level 'system' and a system turn")
        msgs.insert(0, {"role": "system", "content": system})
    body = [m for m in msgs if m["role"] != "system"]
    if not body or body[-1]["role"] != "user":
        raise _Malformed("the prompt must end with a user turn")
    return msgs


def parse_record(record: Any, where: str = "") -> PreferenceRecord:
    """One preference record (any of the three layouts); `_Malformed` (a ValueError) names what is wrong."""
    if not isinstance(record, dict):
        raise _Malformed(f"expected a JSON object, got {type(record).__name__}")
    prompt = _prompt(record)
    if "chosen" in record or "rejected" in record:
        chosen, rejected = _message(record.get("chosen"), "chosen"), _message(record.get("rejected"), "rejected")
        if chosen.strip() == rejected.strip():
            raise _Malformed("chosen and rejected are the same text")
        return PreferenceRecord(prompt, [chosen, rejected], where=where)
    if "completion" in record:
        label = record.get("label")
        if not isinstance(label, bool):
            raise _Malformed(f"'label' must be true or false, got {label!r}")
        return PreferenceRecord(prompt, [_message(record["completion"], "completion")], label=label, where=where)
    raise _Malformed("neither chosen / rejected nor completion / label")


def read_preference_file(path: str | Path) -> tuple[list[PreferenceRecord], list[dict], int]:
    """(records, malformed [{"where", "reason"}], number of records) of a .json list or .jsonl file."""
    path = Path(path)
    raw: list[tuple[str, Any]] = []
    malformed: list[dict] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                malformed.append({"where": f"{path}:{i}", "reason": f"not JSON: {e.msg}"})
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        raw = [(f"{path}: record [{i}]", r) for i, r in enumerate(data)]
    records = []
    for where, r in raw:
        try:
            records.append(parse_record(r, where))
        except _Malformed as e:
            malformed.append({"where": where, "reason": str(e)})
    return records, malformed, len(raw) + sum(1 for m in malformed if "not JSON" in m["reason"])


# -- construction from instruction data ----------------------------------------------------------------
def language(text: str) -> str:
    """"zh" when >= 30% of the letters are CJK ideographs, else "en" (a coarse split for pairing answers)."""
    letters = [c for c in text if c.isalpha()]
    cjk = sum(1 for c in letters if "\u4e00" <= c <= "\u9fff")
    return "zh" if letters and cjk / len(letters) >= 0.3 else "en"


def truncate_answer(answer: str, keep: float = 1 / 3) -> str:
    """The first `keep` share of the answer's words (of its characters for unspaced text), at least one."""
    words = list(re.finditer(r"\S+", answer))
    if len(words) >= 3:  # cut after a word, keeping the text before it as it was
        return answer[:words[max(1, int(len(words) * keep)) - 1].end()]
    return answer[:max(1, int(len(answer) * keep))]


def construct_pairs(conversations: list[Conversation], rejected: str = "other", seed: int = 0) -> list[dict]:
    """Preference pairs {prompt, chosen, rejected} from instruction conversations (the last turn the answer).

    chosen = the reference answer. rejected: `other` - the reference answer of another conversation in the same
    language (a seeded derangement within each language, never the same text); `truncated` - the reference
    cut to its first third (`truncate_answer`; answers too short to cut are skipped); `mixed` - even
    positions `other`, odd ones `truncated`. Deterministic for a seed."""
    if rejected not in ("other", "truncated", "mixed"):
        raise ValueError(f"rejected: 'other', 'truncated' or 'mixed', got {rejected!r}")
    rng = random.Random(seed)
    usable = [c for c in conversations if len(c) >= 2 and c[-1]["role"] == "assistant" and c[-2]["role"] == "user"]
    by_lang: dict[str, list[int]] = {}
    for i, c in enumerate(usable):
        by_lang.setdefault(language(c[-2]["content"] + c[-1]["content"]), []).append(i)
    other: dict[int, int] = {}
    for idx in by_lang.values():
        if len(idx) < 2:
            continue
        perm = idx[:]
        rng.shuffle(perm)
        for a, b in zip(perm, perm[1:] + perm[:1]):  # a cycle: nobody gets its own answer
            other[a] = b
    pairs = []
    for i, c in enumerate(usable):
        chosen = c[-1]["content"]
        kind = rejected if rejected != "mixed" else ("other" if i % 2 == 0 else "truncated")
        if kind == "other":
            if i not in other:
                continue
            bad = usable[other[i]][-1]["content"]
        else:
            bad = truncate_answer(chosen)
        if bad.strip() == chosen.strip():
            continue
        pairs.append({"prompt": c[:-1], "chosen": chosen, "rejected": bad})
    return pairs


# -- tokenization ------------------------------------------------------------------------------------
def _encode(tokenizer, template, prompt: Conversation, response: str, max_len: int
            ) -> tuple[np.ndarray, np.ndarray, bool]:
    ids, mask = encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": response}], template)
    cut = len(ids) > max_len
    ids, mask = ids[:max_len], mask[:max_len]
    # the final assistant turn only: earlier assistant turns in the prompt are context, not scored
    n_prompt = len(encode_chat(tokenizer, prompt, template, add_generation_prompt=True)[0]) if any(
        m["role"] == "assistant" for m in prompt) else 0
    m = np.asarray(mask, dtype=bool)
    m[:min(n_prompt, len(m))] = False
    return np.asarray(ids, dtype=np.int64), m, cut


def _split_key(prompt: Conversation, seed: int) -> float:
    text = json.dumps([seed, prompt], ensure_ascii=False, sort_keys=True)
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16 ** 12


def data_digest(examples: list[PreferenceExample], template, max_len: int) -> str:
    """sha256 of the tokenized sequences, masks, labels, the template and max_len."""
    h = hashlib.sha256()
    fp = template.fingerprint() if template is not None and hasattr(template, "fingerprint") else repr(template)
    h.update(json.dumps({"template": fp, "max_len": max_len, "version": 1}).encode())
    for e in examples:
        h.update(b"E" + (b"1" if e.label else b"0" if e.label is False else b"-"))
        for ids, m in e.seqs:
            h.update(ids.astype(np.int64).tobytes() + b"|" + np.packbits(m).tobytes() + b";")
    return h.hexdigest()


def build_preference_data(cfg: PreferenceDataConfig, tokenizer, template, block_size: int) -> PreferenceData:
    """Read / construct, tokenize and split the preference data (see the module docstring)."""
    max_len = min(cfg.max_len or block_size, block_size + 1)
    records: list[PreferenceRecord] = []
    malformed: list[dict] = []
    n_records = 0
    for p in cfg.paths:
        recs, bad, n = read_preference_file(p)
        records += recs
        malformed += bad
        n_records += n
    for p in cfg.construct_from:
        convs, bad = load_conversations(p)
        malformed += bad
        n_records += len(convs) + len(bad)
        for i, pair in enumerate(construct_pairs(convs, cfg.rejected, cfg.seed)):
            records.append(PreferenceRecord(pair["prompt"], [pair["chosen"], pair["rejected"]],
                                            where=f"{p}: constructed pair [{i}]"))
    kinds = {r.label is None for r in records}
    if len(kinds) > 1:
        raise ValueError("data: pairs (chosen / rejected) and unpaired examples (completion / label) are mixed; "
                         "use one kind per run (unpaired: loss kto)")
    paired = kinds != {False}
    examples: list[tuple[PreferenceRecord, PreferenceExample]] = []
    truncated = too_long = 0
    for r in records:
        try:
            seqs, cut = [], 0
            for resp in r.responses:
                ids, m, was_cut = _encode(tokenizer, template, r.prompt, resp, max_len)
                cut += was_cut
                seqs.append((ids, m))
        except ChatFormatError as e:
            malformed.append({"where": r.where, "reason": str(e)})
            continue
        if any(not m[1:].any() for _, m in seqs):
            too_long += 1
            continue
        truncated += cut
        examples.append((r, PreferenceExample(seqs, r.label)))
    if not paired:  # KTO's KL estimate: each prompt with the next example's completion (a fixed derangement)
        n = len(examples)
        for i, (r, e) in enumerate(examples):
            other = examples[(i + 1) % n][0].responses[0] if n > 1 else r.responses[0]
            ids, m, _ = _encode(tokenizer, template, r.prompt, other, max_len)
            if not m[1:].any():
                ids, m = e.seqs[0]
            e.seqs.append((ids, m))
    keyed = sorted(((_split_key(r.prompt, cfg.seed), i) for i, (r, _) in enumerate(examples)))
    n_eval = min(cfg.eval_max, int(round(len(examples) * cfg.eval_fraction)))
    eval_idx = {i for _, i in keyed[:n_eval]}
    train = [e for i, (_, e) in enumerate(examples) if i not in eval_idx]
    eval_ = [e for i, (_, e) in enumerate(examples) if i in eval_idx]
    if not train:
        raise ValueError(f"data: no usable training example ({len(malformed)} malformed, {too_long} too long)")
    digest = data_digest(train + eval_, template, max_len) + f":{len(train)}"
    return PreferenceData(train, eval_, paired, digest, malformed, truncated, too_long, n_records)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="build preference pairs from instruction data (construct_pairs)")
    ap.add_argument("--from", dest="src", nargs="+", required=True, help="alpaca / sharegpt instruction files")
    ap.add_argument("--out", required=True, help="a .jsonl file of {prompt, chosen, rejected}")
    ap.add_argument("--rejected", default="other", choices=["other", "truncated", "mixed"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for src in args.src:
            convs, _ = load_conversations(src)
            for pair in construct_pairs(convs, args.rejected, args.seed):
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
                n += 1
    print(json.dumps({"pairs": n, "out": args.out}))


if __name__ == "__main__":
    main()
