"""Pretraining objectives: turn a batch of token windows into a model's inputs and targets.

- causal (GPT): predict each next token; the window's targets are its inputs shifted by one.
- mlm (BERT, Devlin et al. 2019): hide 15% of the tokens; of those, 80% become `<|mask|>`, 10% a
  random token, 10% stay; the loss is on the hidden positions only.
- span (T5, Raffel et al. 2020 §3.1.4): drop 15% of the tokens in spans of mean length 3; each span
  becomes one sentinel in the encoder input, and the decoder target lists `sentinel_i, span_i ...`
  followed by EOS.

Randomness comes from a `torch.Generator` (evaluation passes a fixed one) or, during training, from
torch's global RNG, whose state the checkpoints already hold, so a resumed run masks identically.
"""

from __future__ import annotations

import numpy as np
import torch

MASK_TOKEN = "<|mask|>"


def sentinel_token(i: int) -> str:
    return f"<|sentinel_{i}|>"


def causal(x: torch.Tensor, y: torch.Tensor, **_) -> dict[str, torch.Tensor]:
    return {"idx": x, "targets": y}


def mlm(x: torch.Tensor, y: torch.Tensor, *, mask_id: int, special_ids: list[int], vocab_size: int,
        probability: float = 0.15, generator: torch.Generator | None = None, **_) -> dict[str, torch.Tensor]:
    """x: (B, T) ids -> input_ids with 15% of positions corrupted, labels = original ids there, -100 elsewhere."""
    labels = x.clone()
    maskable = ~torch.isin(x, torch.tensor(special_ids, dtype=x.dtype))
    chosen = (torch.rand(x.shape, generator=generator) < probability) & maskable
    labels[~chosen] = -100
    roll = torch.rand(x.shape, generator=generator)
    inputs = x.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    # ids a random replacement may take: every token but the special ones (vectorised: this runs every step)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special_ids] = False
    normal = allowed.nonzero().squeeze(1).to(x.dtype)
    pick = torch.randint(len(normal), x.shape, generator=generator)
    inputs[swap] = normal[pick[swap]]
    return {"input_ids": inputs, "labels": labels}


def span_lengths(length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(noise tokens, spans) for a window of `length` tokens, as T5's `random_spans_noise_mask`."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(noise / mean_span)), 1)
    return noise, spans


def _random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """n_items split into n_segments non-empty parts, uniformly at random; returns the part lengths."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def span_corruption(x: torch.Tensor, y: torch.Tensor, *, sentinel_ids: list[int], eos_id: int,
                    noise_density: float = 0.15, mean_span: float = 3.0,
                    generator: torch.Generator | None = None, **_) -> dict[str, torch.Tensor]:
    """x: (B, L) ids -> input_ids (B, L - noise + spans), labels (B, noise + spans + 1).

    Every row has the same number of noise tokens and spans, so rows stack without padding. Spans start
    with noise or not at random (T5 alternates non-noise and noise segments)."""
    B, L = x.shape
    noise, spans = span_lengths(L, noise_density, mean_span)
    if spans > len(sentinel_ids):
        raise ValueError(f"{spans} spans per window need {spans} sentinel tokens; the tokenizer has "
                         f"{len(sentinel_ids)} (train it with --sentinels {spans} or more)")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    ids = x.numpy()
    inputs, labels = [], []
    for row in ids:
        noise_lens = _random_segmentation(noise, spans, rng)
        keep_lens = _random_segmentation(L - noise, spans, rng)
        inp, tgt, pos = [], [], 0
        for i in range(spans):
            inp.extend(row[pos:pos + keep_lens[i]])
            pos += keep_lens[i]
            inp.append(sentinel_ids[i])
            tgt.append(sentinel_ids[i])
            tgt.extend(row[pos:pos + noise_lens[i]])
            pos += noise_lens[i]
        tgt.append(eos_id)
        inputs.append(inp)
        labels.append(tgt)
    return {"input_ids": torch.tensor(np.array(inputs, dtype=np.int64)),
            "labels": torch.tensor(np.array(labels, dtype=np.int64))}


def make_objective(name: str, tokenizer, probability: float = 0.15, noise_density: float = 0.15,
                   mean_span: float = 3.0):
    """A function (x, y, generator=None) -> model keyword arguments, for objective `name`."""
    if name == "causal":
        return causal
    specials = sorted(tokenizer.special_tokens.values())
    if name == "mlm":
        mask_id = tokenizer.token_to_id(MASK_TOKEN)
        if mask_id is None:
            raise ValueError(f"the mlm objective needs a {MASK_TOKEN} token: train the tokenizer with "
                             f"--special '{MASK_TOKEN}'")

        def fn(x, y, generator=None):
            return mlm(x, y, mask_id=mask_id, special_ids=specials, vocab_size=tokenizer.vocab_size,
                       probability=probability, generator=generator)
        return fn
    if name == "span":
        sentinels = []
        while (tid := tokenizer.token_to_id(sentinel_token(len(sentinels)))) is not None:
            sentinels.append(tid)
        if not sentinels:
            raise ValueError("the span objective needs sentinel tokens <|sentinel_0|>, ...: train the tokenizer "
                             "with --sentinels N")

        def fn(x, y, generator=None):
            return span_corruption(x, y, sentinel_ids=sentinels, eos_id=tokenizer.eos_id,
                                   noise_density=noise_density, mean_span=mean_span, generator=generator)
        return fn
    raise ValueError(f"unknown objective {name!r}")
