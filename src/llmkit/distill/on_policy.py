"""On-policy distillation: the student learns on its own samples, scored by the teacher (GKD, Agarwal et al.
2024, "On-Policy Distillation of Language Models"; MiniLLM, Gu et al. 2024).

Word-level KD trains the student along fixed sequences (the references, or the teacher's answers), but at
inference it conditions on its own earlier tokens, sequences it never trained on (the train-inference
mismatch of Bengio et al. 2015's "exposure bias"). GKD replaces a share `fraction` (its lambda) of the batches:

* for each row of such a batch the *current* student samples a reply to the row's prompt (the conversation
  but its last assistant turn, rendered with the generation prompt), without gradients;
* the teacher scores prompt + reply live (the sequences are new, so nothing is cached), its top-k logits
  selected as the cache selects them (`teacher_cache.top_k_logits`), kept in fp32 (the cache stores fp16);
* the loss is the configured divergence (`loss.kind`, `loss.temperature`, `loss.beta`) over the reply's
  tokens only, the stop token that ended it included, with no cross-entropy: a sample is not a label.

The other batches keep the cached teacher outputs along the references. A row whose prompt leaves no room
for a reply within data.max_len (a truncated example) keeps its reference sequence in an on-policy batch,
scored live as well.

Which batches: batch k (counting every micro-batch drawn) is on-policy when floor((k+1) f) > floor(k f), so
after k batches exactly floor(k f) were, evenly spread (f = 0.5: every other batch), as `MixedBatches`
spreads pretraining rows. Row r of batch k samples with its own generator seeded by (train.seed, k, r)
(`sample_seed`): the batch counter is part of the checkpointed data position and the weights are
checkpointed, so a resumed run samples exactly the replies the uninterrupted run sampled.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from llmkit.chat_template import ChatFormatError
from llmkit.distill.teacher_cache import top_k_logits
from llmkit.finetune.sft_batches import IGNORE_INDEX
from llmkit.finetune.sft_data import SFTExample
from llmkit.infer.reply import reply_prompt_ids, reply_stop_ids


@dataclass
class OnPolicyConfig:
    """The ``on_policy:`` section."""

    fraction: float = 0.0
    """Share of training batches whose replies the current student samples (GKD's lambda); 0: off."""
    max_new_tokens: int = 64
    """Longest sampled reply (also cut to what data.max_len leaves after the prompt)."""
    temperature: float = 1.0
    """Sampling temperature of the student's replies (1: its own distribution; 0: greedy). No top-k / top-p."""

    def validate(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction: must be in [0, 1] (the share of on-policy batches), got {self.fraction}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")


def is_on_policy(batch_index: int, fraction: float) -> bool:
    """Whether batch `batch_index` (from 0) is sampled by the student: floor((k+1) f) > floor(k f), in exact
    rational arithmetic (0.1 -> 1/10), so after k batches exactly floor(k f) were."""
    f = Fraction(repr(float(fraction)))
    return math.floor((batch_index + 1) * f) > math.floor(batch_index * f)


def sample_seed(seed: int, batch_index: int, row: int) -> int:
    """The seed of row `row`'s sampling generator in batch `batch_index` (63 bits of a sha256)."""
    digest = hashlib.sha256(f"llmkit-on-policy:{seed}:{batch_index}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def reply_prompts(examples: Sequence[SFTExample], tokenizer, template) -> list[list[int] | None]:
    """Each example's prompt for a sampled reply: its messages but the last (the assistant's), rendered with
    the generation prompt, as `llmkit generate` prompts a model; None where the last message is not the
    assistant's or the prompt cannot be encoded (those rows keep their reference)."""
    out: list[list[int] | None] = []
    for ex in examples:
        if len(ex.messages) < 2 or ex.messages[-1]["role"] != "assistant":
            out.append(None)
            continue
        try:
            out.append(list(reply_prompt_ids(tokenizer, template, ex.messages[:-1])))
        except ChatFormatError:
            out.append(None)
    return out


def stop_ids(tokenizer, template) -> tuple[int, ...]:
    """The ids that end a sampled reply (the template's end of turn, then every eos id); the reply keeps it."""
    return tuple(reply_stop_ids(tokenizer, template))


@torch.no_grad()
def sample_replies(model, tokenizer, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                   stops: Sequence[int], temperature: float, seeds: Sequence[int]) -> list[list[int]]:
    """The model's sampled reply to each prompt (new token ids, at most its budget), ending with the stop id
    that ended it when one did; each prompt samples with its own generator seeded by `seeds`, so a reply
    depends on its prompt, the weights and its seed only, not on the other rows of the batch.

    Why the `Engine`, rebuilt for every batch: building one allocates a KV pool of len(prompts) x (prompt +
    budget) positions and nothing else once its in-place CPU optimisations are off (`kernels=False` would
    otherwise swap the training model's Linears for C-kernel modules, `column_major=False` re-store their
    weights) and the prefix cache is off. In exchange it already does what a hand-written loop over
    `Decoder.forward` would have to redo: prompts of different lengths decoded together at per-row
    positions with per-row masks (`KVCache` puts every row at the same position), per-row seeded generators,
    padded vocabulary rows never sampled, and any student module (LoRA-wrapped Linears included, since it
    calls the modules' own forward). It runs in the weights' dtype, outside autocast (its KV pool has that
    dtype). The Engine neither emits a stop id nor says which one ended a reply, and the reply must keep it
    (the reference replies train their end-of-turn token too), so requests run without stop ids and are
    cancelled on the step that emitted one: nothing is computed past it.
    """
    from llmkit.infer.engine import Engine, RequestParams

    if not prompts:
        return []
    was_training = model.training
    try:
        engine = Engine(model, tokenizer, max_batch=len(prompts), prefix_cache_tokens=0, column_major=False,
                        kernels=False, max_len=max(len(p) + b for p, b in zip(prompts, budgets)))
        ends = set(stops)
        rids = [engine.add_request(list(p), RequestParams(max_new_tokens=b, temperature=temperature, top_k=None,
                                                          top_p=None, seed=s, stop_at_eos=False))
                for p, b, s in zip(prompts, budgets, seeds)]
        while engine.has_unfinished():
            for rid, token in engine.step().items():
                if token in ends:
                    engine.cancel(rid)
        return [engine.requests.pop(rid).output for rid in rids]
    finally:
        model.train(was_training)


def on_policy_batch(student, teacher, examples: Sequence[SFTExample], prompts: Sequence[list[int] | None],
                    cfg: OnPolicyConfig, *, tokenizer, stops: Sequence[int], max_len: int, pad_id: int, vocab: int,
                    top_k: int, seed: int, batch_index: int, device: torch.device | str,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict:
    """An on-policy training batch for these rows (`examples` and their `reply_prompts`): the student's
    sampled replies (`sample_replies`, row r seeded with `sample_seed(seed, batch_index, r)`), laid out like
    `MixedBatches` rows (x = ids[:-1] right-padded with pad_id, y = the reply's tokens at the positions that
    predict them, else -100), and the teacher's live top-k logits at those positions in row-major order.

    Returns {"x", "y", "ids", "values", "tokens", "on_policy": True, "replies": per row the sampled ids or
    None (the row kept its reference), "new_tokens": sampled tokens in all}. The teacher runs under
    `autocast`; nothing here records gradients."""
    budgets = {r: min(cfg.max_new_tokens, max_len - len(p)) for r, p in enumerate(prompts) if p is not None}
    rows = [r for r, b in budgets.items() if b >= 1]
    sampled = sample_replies(student, tokenizer, [prompts[r] for r in rows], [budgets[r] for r in rows], stops,
                             cfg.temperature, [sample_seed(seed, batch_index, r) for r in rows])
    replies: list[list[int] | None] = [None] * len(examples)
    for r, reply in zip(rows, sampled):
        replies[r] = reply or None  # empty only when the sampling failed (NaN logits): keep the reference
    seqs: list[tuple[np.ndarray, np.ndarray]] = []
    for r, ex in enumerate(examples):
        if replies[r] is None:
            seqs.append((np.asarray(ex.ids, dtype=np.int64), np.asarray(ex.loss_mask, dtype=bool)))
        else:
            n_prompt, reply = len(prompts[r]), replies[r]
            seqs.append((np.asarray([*prompts[r], *reply], dtype=np.int64),
                         np.arange(n_prompt + len(reply)) >= n_prompt))
    width = max(1, max(len(ids) for ids, _ in seqs) - 1)
    x = np.full((len(seqs), width), pad_id, dtype=np.int64)
    y = np.full((len(seqs), width), IGNORE_INDEX, dtype=np.int64)
    for r, (ids, mask) in enumerate(seqs):
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    x_t, y_t = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    with torch.no_grad(), autocast():
        logits, _ = teacher(x_t)
    ids, values = top_k_logits(logits[y_t != IGNORE_INDEX], vocab, top_k)
    return {"x": x_t, "y": y_t, "ids": ids, "values": values, "tokens": int((y_t != IGNORE_INDEX).sum()),
            "on_policy": True, "replies": replies, "new_tokens": sum(len(r) for r in replies if r is not None)}


class OnPolicyBatches:
    """The data state a run with on-policy batches checkpoints: the batch source's position (`MixedBatches`)
    and the on-policy tallies the logs report (`figures`), so a resumed run reports the same figures."""

    SAMPLES = 3
    """Replies of the latest on-policy batch kept for results.json."""

    def __init__(self, batches) -> None:
        self.batches = batches
        self.on_batches = 0
        self.sampled_rows = 0
        self.reference_rows = 0
        self.new_tokens = 0
        self.samples: list[dict[str, Any]] = []
        """The latest on-policy batch's first replies: {"batch", "example", "reply_ids"}."""

    def add(self, batch_index: int, examples: Sequence[int], b: dict) -> None:
        """Count an on-policy batch `b` (`on_policy_batch`) of these training examples."""
        self.on_batches += 1
        replies = b["replies"]
        self.sampled_rows += sum(r is not None for r in replies)
        self.reference_rows += sum(r is None for r in replies)
        self.new_tokens += b["new_tokens"]
        self.samples = [{"batch": batch_index, "example": int(i), "reply_ids": [int(t) for t in r]}
                        for i, r in zip(examples, replies) if r is not None][:self.SAMPLES]

    def figures(self) -> dict[str, float]:
        """on_policy_share: the share of batches drawn so far that were on-policy; on_policy_new_tokens: the
        mean length of the sampled replies so far (tokens, the stop token included)."""
        return {"on_policy_share": self.on_batches / max(1, self.batches.batches),
                "on_policy_new_tokens": self.new_tokens / max(1, self.sampled_rows)}

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(),
                "on_policy": {"on_batches": self.on_batches, "sampled_rows": self.sampled_rows,
                              "reference_rows": self.reference_rows, "new_tokens": self.new_tokens,
                              "samples": self.samples}}

    def load_state_dict(self, state: dict) -> None:
        if "on_policy" not in state:
            raise ValueError("cannot resume: the checkpoint was written without on-policy batches (on_policy."
                             "fraction 0); resume with the same on_policy settings")
        self.batches.load_state_dict(state["batches"])
        tallies = state["on_policy"]
        self.on_batches, self.sampled_rows = tallies["on_batches"], tallies["sampled_rows"]
        self.reference_rows, self.new_tokens = tallies["reference_rows"], tallies["new_tokens"]
        self.samples = list(tallies["samples"])
