"""Next-token sampling over logits.

* `sample_next` / `filter_logits`: one setting for the whole batch (used by `stream_tokens`): temperature,
  top-k, top-p (nucleus, Holtzman et al. 2020) and min-p (Nguyen et al. 2024).
* `BatchSampling` / `process_logits` / `filter_logits_batched`: per-row settings, vectorised over the batch
  (used by the `Engine`): repetition penalty (CTRL, Keskar et al. 2019), presence and frequency penalties
  (OpenAI semantics), temperature, top-k, top-p and min-p, plus `top_logprobs`.

Order, as in Hugging Face / vLLM: penalties on the raw logits -> divide by temperature -> truncation
(top-k, then top-p, then min-p) -> softmax -> draw. Log-probabilities are reported from the distribution
after penalties and temperature, before truncation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_INF = float("inf")

MIN_TEMPERATURE = 1e-5
"""Temperatures in (0, MIN_TEMPERATURE) sample greedily (as vLLM does): the limit of T -> 0 is the argmax,
and dividing logits by e.g. 1e-40 overflows float32 to inf (then softmax gives NaN)."""
MAX_TOP_K = 2 ** 31 - 1
"""top_k above this is off anyway (no vocabulary is that large); clamping keeps it inside an int64 tensor."""


def invalid_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) bool: rows that are no probability distribution: any NaN or +inf, or no finite entry
    (all -inf). Such a row cannot be sampled (`torch.multinomial` raises for the whole batch), so the engine
    fails that row's request alone."""
    return torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | ~torch.isfinite(logits).any(-1)


def mask_padded_vocab(logits: torch.Tensor, n_tokens: int | None) -> torch.Tensor:
    """Set to -inf the logits of ids >= `n_tokens` (the tokenizer's size), in place; returns `logits`.

    Checkpoints pad the embedding past the tokenizer (Qwen2.5: 151936 rows for 151665 tokens); those rows
    are no token, so sampling must never pick them. No-op when `n_tokens` is None or covers every logit."""
    if n_tokens is not None and 0 < n_tokens < logits.size(-1):
        logits[..., n_tokens:] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, outside the smallest set whose probability mass
    reaches top_p, and (min_p) every token whose probability is below min_p * the top probability.
    logits: (B, V) -> (B, V). The most likely token always survives."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass *before* it already reaches top_p
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                min_p: float | None = None) -> torch.Tensor:
    """Pick one token per row. logits: (B, V) -> (B,) int64. temperature 0 means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p, min_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------- batched
@dataclass
class BatchSampling:
    """Per-row sampling settings as (B,) tensors (build with `BatchSampling.from_params`).

    temperature <= 0 marks a greedy row; top_k 0 = off; top_p >= 1 = off; min_p 0 = off;
    repetition_penalty 1 = off; presence/frequency 0 = off.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor

    @classmethod
    def from_params(cls, params: Sequence, device=None) -> BatchSampling:
        """From objects with `SamplingParams` attributes; the penalty/min_p attributes are optional.
        Temperatures below `MIN_TEMPERATURE` become greedy (0); top_k is clamped to [0, MAX_TOP_K]."""
        def col(name, default, fn=float):
            vals = [getattr(p, name, None) for p in params]
            return torch.tensor([fn(default if v is None else v) for v in vals], device=device)

        def temperature(t) -> float:
            return 0.0 if float(t) < MIN_TEMPERATURE else float(t)

        def top_k(k) -> int:
            return min(max(int(k), 0), MAX_TOP_K)

        return cls(col("temperature", 1.0, temperature), col("top_k", 0, top_k), col("top_p", 1.0),
                   col("min_p", 0.0),
                   col("repetition_penalty", 1.0), col("presence_penalty", 0.0), col("frequency_penalty", 0.0))

    @property
    def any_penalty(self) -> bool:
        return bool((self.repetition_penalty != 1).any() or (self.presence_penalty != 0).any()
                    or (self.frequency_penalty != 0).any())


def token_counts(seqs: Sequence[Sequence[int]], vocab: int, device=None) -> torch.Tensor:
    """(B, V) float counts of each token id in each row's sequence."""
    counts = torch.zeros(len(seqs), vocab, device=device)
    n = max((len(s) for s in seqs), default=0)
    if n == 0:
        return counts
    ids = torch.tensor([list(s) + [0] * (n - len(s)) for s in seqs], device=device)
    ones = torch.tensor([[1.0] * len(s) + [0.0] * (n - len(s)) for s in seqs], device=device)
    return counts.scatter_add_(1, ids, ones)


def apply_penalties(logits: torch.Tensor, s: BatchSampling, seen: torch.Tensor | None,
                    output_counts: torch.Tensor | None) -> torch.Tensor:
    """Repetition penalty over `seen` (B, V) bool (prompt + output tokens): positive logits are divided by
    the penalty, negative ones multiplied (CTRL); then logits -= presence * [count > 0] + frequency * count
    with `output_counts` (B, V) over generated tokens only (OpenAI). logits: (B, V) float -> (B, V)."""
    if seen is not None:
        r = s.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalised, logits)
    if output_counts is not None:
        logits = logits - s.frequency_penalty[:, None] * output_counts \
            - s.presence_penalty[:, None] * (output_counts > 0).to(logits.dtype)
    return logits


def filter_logits_batched(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                          min_p: torch.Tensor) -> torch.Tensor:
    """`filter_logits` with per-row (B,) settings (top_k 0 / top_p >= 1 / min_p 0 switch a row off)."""
    B, V = logits.shape
    neg = float("-inf")
    k_on = (top_k > 0) & (top_k < V)
    if bool(k_on.any()):
        sorted_logits = torch.sort(logits, descending=True, dim=-1).values
        kth = sorted_logits.gather(1, (top_k.clamp(1, V) - 1)[:, None])
        logits = logits.masked_fill(k_on[:, None] & (logits < kth), neg)
    p_on = (top_p > 0) & (top_p < 1)
    if bool(p_on.any()):
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sp = sorted_logits.softmax(-1)
        thr = torch.where(p_on, top_p, torch.full_like(top_p, _INF))[:, None]
        drop_sorted = (sp.cumsum(-1) - sp) >= thr
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg)
    m_on = min_p > 0
    if bool(m_on.any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(m_on[:, None] & (probs < min_p[:, None] * probs.amax(-1, keepdim=True)), neg)
    return logits


def process_logits(logits: torch.Tensor, s: BatchSampling, seen: torch.Tensor | None = None,
                   output_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Penalties then temperature (greedy rows keep temperature 1). (B, V) -> (B, V) float: the
    distribution logprobs are reported from, before truncation."""
    logits = apply_penalties(logits.float(), s, seen, output_counts)
    t = torch.where(s.temperature > 0, s.temperature, torch.ones_like(s.temperature))
    return logits / t[:, None]


def sample_batch(logits: torch.Tensor, s: BatchSampling, generators: Sequence[torch.Generator | None],
                 skip: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from processed logits (`process_logits`): argmax for greedy rows, otherwise
    truncate per row and draw with that row's generator (so a seeded row's draws do not depend on the
    batch: each row consumes its own generator exactly as `sample_next` would). (B, V) -> (B,) int64.
    skip: optional (B,) bool of rows not to draw for (e.g. `invalid_rows`); their token is meaningless."""
    out = logits.argmax(-1)
    draw = s.temperature > 0
    if skip is not None:
        draw = draw & ~skip
    rows = draw.nonzero().flatten().tolist()
    if not rows:
        return out
    idx = torch.tensor(rows, device=logits.device)
    probs = filter_logits_batched(logits[idx], s.top_k[idx], s.top_p[idx], s.min_p[idx]).softmax(-1)
    for j, i in enumerate(rows):
        out[i] = torch.multinomial(probs[j:j + 1], 1, generator=generators[i])[0, 0]
    return out


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """log_softmax of processed logits (B, V): the chosen tokens' logprobs (B,), and the top-k
    alternatives' logprobs and ids (B, k) (k 0 gives (B, 0))."""
    lp = logits.log_softmax(-1)
    chosen_lp = lp.gather(1, chosen[:, None])[:, 0]
    if k <= 0:
        empty = lp.new_zeros(lp.size(0), 0)
        return chosen_lp, empty, empty.long()
    vals, ids = lp.topk(min(k, lp.size(-1)), dim=-1)
    return chosen_lp, vals, ids
