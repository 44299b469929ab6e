"""Instruction files: the alpaca and sharegpt readers, with an account of every record left out.

Two formats, as LLaMA-Factory names them:

* *alpaca* (Taori et al. 2023): ``{"instruction", "input", "output"}`` plus optional ``system`` and
  ``history`` (``[[query, answer], ...]`` earlier turns); the user turn is ``instruction + "\\n" + input``.
* *sharegpt*: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}`` or
  ``{"messages": [{"role", "content"}, ...]}`` (OpenAI style), optional record-level ``system``.

A record that cannot be read is *malformed*: it is listed with file + record index and the reason,
counted, and left out; a file with records but not one usable conversation is an error (wrong format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["Conversation", "load_conversations", "read_instruction_file"]

Conversation = list[dict[str, str]]
"""A list of ``{"role", "content"}`` messages: system first if any, then alternating user / assistant."""


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


def read_instruction_file(path: str | Path, format: str
                          ) -> tuple[list[Conversation], list[str], list[dict], str, int]:
    """(conversations, their locations, malformed, format used, number of records) of one instruction file.

    `load_conversations` is the short form; `llmkit.finetune.sft_data.build_sft_data` needs the rest for its
    per-file account."""
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
    convs, _, malformed, _, _ = read_instruction_file(path, format)
    return convs, malformed
