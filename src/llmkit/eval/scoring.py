"""What a model is asked: log-likelihoods of continuations, greedy generations, rolling perplexity.

Batches are right-padded: in a causal decoder a position attends only to itself and earlier positions, so
the padding after a row's last real token changes none of that row's logits (tested: batched log-likelihoods
equal one-at-a-time ones within 1e-4). Requests are sorted longest first (as lm-evaluation-harness does) so a
batch pads little, requests with the same input tokens (the single-letter choices of one MMLU question) share
one forward, and results come back in the caller's order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's `_encode_pair`: trailing spaces of the context move to the
    continuation, the pair is encoded as one string and the continuation is what follows the context's ids
    (so a merge across the boundary is scored as the model would see it)."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_bos=add_bos)
    ctx = tokenizer.encode(context, add_bos=add_bos)
    if whole[:len(ctx)] != ctx:  # a merge across the boundary: keep the context's own ids
        return ctx, tokenizer.encode(continuation)
    return ctx, whole[len(ctx):]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def loglikelihoods(model, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 8,
                   on_batch: Callable[[list[int], list[tuple[float, bool]]], None] | None = None
                   ) -> list[tuple[float, bool, bool]]:
    """Per (context ids, continuation ids): (sum of log p(continuation token | everything before), whether
    every continuation token is the argmax, whether the context was cut on the left to fit the model).

    The scored sequence is context + continuation cut to the model's last block_size + 1 tokens (the
    continuation is never cut). `on_batch(indices, results)` is called after each batch (resumable caching)."""
    block = model.config.block_size
    device = _device(model)
    prepared = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("an empty continuation has no log-likelihood")
        if len(cont) > block:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's {block}-token context")
        if not ctx:
            raise ValueError("an empty context: start it with a bos token")
        full = (ctx + cont)[-(block + 1):]
        prepared.append((full[:-1], len(cont), len(ctx) + len(cont) > block + 1))
    # requests with the same input (the choices of one question when each is a single token) share a forward
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (inp, _, _) in enumerate(prepared):
        groups.setdefault(tuple(inp), []).append(i)
    keys = sorted(groups, key=lambda k: -len(k))
    out: list[tuple[float, bool, bool] | None] = [None] * len(prepared)
    for start in range(0, len(keys), batch_size):
        chunk = keys[start:start + batch_size]
        width = max(len(k) for k in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, k in enumerate(chunk):
            x[r, :len(k)] = torch.tensor(k)
        logits, _ = model(x.to(device))
        logp = F.log_softmax(logits.float(), dim=-1)
        idx, done = [], []
        for r, k in enumerate(chunk):
            for i in groups[k]:
                _, n_cont, cut = prepared[i]
                targets = torch.tensor(requests[i][1], device=device)
                rows = logp[r, len(k) - n_cont:len(k)]
                ll = float(rows.gather(1, targets[:, None]).sum())
                greedy = bool((rows.argmax(-1) == targets).all())
                out[i] = (ll, greedy, cut)
                idx.append(i)
                done.append((ll, greedy))
        if on_batch is not None:
            on_batch(idx, done)
    return out  # type: ignore[return-value]


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str],
                    stop_ids: Sequence[int], batch_size: int = 8) -> list[str]:
    """Greedy continuations of token prompts through the `Engine` (continuous batching), cut at the first
    stop string. New tokens are capped at half the model's context (a small model keeps half its context
    for the prompt); a prompt is cut on the left to leave room for them."""
    from llmkit.infer.engine import Engine, RequestParams

    block = model.config.block_size
    new = max(1, min(max_new_tokens, block // 2))
    ids = [p[-(block - new):] for p in prompts]
    engine = Engine(model, tokenizer, max_batch=max(1, min(batch_size, len(ids))), prefix_cache_tokens=0,
                    max_len=max(map(len, ids), default=1) + new)
    params = RequestParams(max_new_tokens=new, temperature=0.0, top_p=None, stop_token_ids=tuple(stop_ids),
                           stop=tuple(stop))
    outs = engine.generate(ids, [params] * len(ids))
    texts = []
    for o in outs:
        t = tokenizer.decode(o, skip_special_tokens=True)
        cut = min((t.find(s) for s in stop if s in t), default=len(t))
        texts.append(t[:cut])
    return texts


@torch.no_grad()
def rolling_nll(model, ids: list[int], batch_size: int = 8) -> tuple[float, int]:
    """(sum of -log p in nats, tokens predicted) of every token after the first, in disjoint windows of the
    model's block_size: window w predicts tokens [w*B + 1, (w+1)*B] from the B tokens before each."""
    block = model.config.block_size
    device = _device(model)
    n = len(ids) - 1
    if n < 1:
        return 0.0, 0
    starts = list(range(0, n, block))
    total, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        chunk = starts[b:b + batch_size]
        width = min(block, max(min(block, n - s) for s in chunk))
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, s in enumerate(chunk):
            m = min(block, n - s)
            x[r, :m] = torch.tensor(ids[s:s + m])
            y[r, :m] = torch.tensor(ids[s + 1:s + m + 1])
        logits, _ = model(x.to(device))
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.to(device).reshape(-1),
                              ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((y != -100).sum())
    return total, count


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    return nll_nats / (math.log(2) * n_bytes) if n_bytes else float("nan")
