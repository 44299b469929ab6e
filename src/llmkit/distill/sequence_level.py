"""Sequence-level distillation: the student trains on the teacher's own answers (Kim & Rush 2016).

Word-level KD matches the teacher's next-token distribution along the reference answers. Sequence-level KD
instead replaces each training conversation's last assistant turn by the teacher's greedy answer to the
same prompt, so the student learns the sequences the teacher actually produces. The two combine: the
top-k logits are then taken along the teacher's answers.

The answers are generated once, batched through the Engine, and cached by content like the logits
(`teacher_answers-<key>.json`, keyed by the teacher's weights digest, the data digest and
`max_new_tokens`). Held-out examples keep their reference answers: the student is measured on the
task, not on the teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

from llmkit.chat import encode_chats
from llmkit.chat_template import ChatFormatError
from llmkit.finetune.sft_data import SFTData, SFTExample, sft_digest
from llmkit.infer.generate import SamplingParams
from llmkit.infer.reply import chat_replies

log = logging.getLogger(__name__)


def teacher_answers(teacher, teacher_digest: str, data: SFTData, tokenizer, max_new_tokens: int,
                    cache_dir: str | Path) -> tuple[list[str], bool]:
    """The teacher's greedy answer to every training example's prompt (its messages but the last), read
    from the cache or generated and cached. Returns (answers, computed)."""
    key = hashlib.sha256(json.dumps({"teacher": teacher_digest, "data": data.digest, "max_new_tokens": max_new_tokens,
                                     "sampling": "greedy", "version": 1}, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir).expanduser() / f"teacher_answers-{key}.json"
    if path.is_file():
        answers = json.loads(path.read_text(encoding="utf-8"))
        if len(answers) == len(data.train):
            return answers, False
    prompts = [ex.messages[:-1] for ex in data.train]
    answers = chat_replies(teacher, tokenizer, data.template, prompts,
                           SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.json")
    tmp.write_text(json.dumps(answers, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    log.info("teacher answers for %d prompts written to %s", len(answers), path)
    return answers, True


def with_teacher_answers(data: SFTData, answers: list[str], tokenizer) -> tuple[SFTData, int]:
    """`data` with each training conversation's last assistant turn replaced by the teacher's answer, encoded
    and truncated as `build_sft_data` does; eval untouched. Returns (data, examples dropped): an empty
    answer or one whose conversation no longer fits with a trained token is dropped (and counted)."""
    convs, kept_answers = [], []
    for ex, answer in zip(data.train, answers):
        if ex.messages[-1]["role"] != "assistant":
            raise ValueError(f"{ex.source}: the last message is not the assistant's; nothing to replace")
        if answer.strip():
            convs.append([*ex.messages[:-1], {"role": "assistant", "content": answer}])
            kept_answers.append(ex)
    train: list[SFTExample] = []
    for ex, conv, enc in zip(kept_answers, convs, encode_chats(tokenizer, convs, data.template)):
        if isinstance(enc, ChatFormatError):
            continue
        ids, mask = enc
        full = len(ids)
        ids, mask = ids[:data.max_len], mask[:data.max_len]
        if mask[1:].any():
            train.append(SFTExample(conv, ids, mask, full, ex.source + " (teacher's answer)"))
    if not train:
        raise ValueError("sequence-level distillation: no teacher answer gave a usable training example")
    digest = sft_digest(tokenizer, data.template, data.max_len, train, data.eval)
    counts = {**data.counts, "train": len(train), "train_tokens": int(sum(len(e.ids) for e in train)),
              "train_loss_tokens": int(sum(int(e.loss_mask.sum()) for e in train))}
    return dataclasses.replace(data, train=train, digest=digest, counts=counts), len(data.train) - len(train)
