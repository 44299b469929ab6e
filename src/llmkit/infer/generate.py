"""Autoregressive generation with the KV cache: prefill the prompt once, then one token per step."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from llmkit.models.decoder import Decoder, KVCache
from llmkit.sampling import mask_padded_vocab, sample_next


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    """0 -> greedy decoding."""
    top_k: int | None = None
    top_p: float | None = 0.9
    seed: int | None = None
    stop_at_eos: bool = True


def eos_set(eos_id: int | Iterable[int] | None) -> frozenset[int]:
    """The ids that end generation, from one id, several (a model may declare a list: generation_config's
    ``eos_token_id``, `llmkit.tokenizer.Tokenizer.eos_ids`) or None."""
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, int):
        return frozenset((eos_id,))
    return frozenset(int(i) for i in eos_id)


@torch.no_grad()
def stream_tokens(model: Decoder, prompt_ids: list[int], params: SamplingParams,
                  eos_id: int | Iterable[int] | None = None, vocab_limit: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time until max_new_tokens, EOS or the context length.

    `eos_id`: one id or several (every end-of-sequence id the model declares); with ``params.stop_at_eos``
    generation ends at any of them, which is not yielded. The prompt is cut to its last block_size - 1
    tokens if longer. Each step feeds only the newest token, reading all earlier keys/values from the cache.
    `vocab_limit`: the tokenizer's size (``len(tokenizer)``); ids at or above it (rows of a padded embedding,
    no token) are never produced.
    """
    stops = eos_set(eos_id)
    device = next(model.parameters()).device
    block = model.config.block_size
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token (e.g. the BOS token)")
    ids = prompt_ids[-(block - 1):]
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(params.seed)
    budget = min(params.max_new_tokens, block - len(ids))
    # a prefix-tuned model keeps its P prefix keys/values in the first cache slots (no positions used)
    cache = KVCache(model.config, batch_size=1, max_len=model.num_prefix_tokens + len(ids) + budget, device=device,
                    dtype=next(model.parameters()).dtype)
    logits, _ = model(torch.tensor([ids], device=device), cache=cache)
    for _ in range(budget):
        token = sample_next(mask_padded_vocab(logits[:, -1, :], vocab_limit), params.temperature, params.top_k, params.top_p, gen)
        t = int(token.item())
        if params.stop_at_eos and t in stops:
            return
        yield t
        if cache.length >= cache.max_len:
            return
        logits, _ = model(token.view(1, 1), cache=cache)


def generate(model: Decoder, tokenizer, prompt: str, params: SamplingParams | None = None,
             add_bos: bool | None = None) -> str:
    """Complete `prompt` and return only the new text; stops at any of the tokenizer's `eos_ids`.

    `add_bos`: None starts the prompt with bos where the model declares it (`Tokenizer.add_bos_token`, as
    transformers' ``tokenizer(prompt)`` does). Ids past the tokenizer (a padded embedding) are never sampled."""
    params = params or SamplingParams()
    if add_bos is None:
        add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    ids = tokenizer.encode(prompt, add_bos=add_bos)
    eos = getattr(tokenizer, "eos_ids", None) or tokenizer.eos_id
    new = list(stream_tokens(model, ids, params, eos_id=eos, vocab_limit=len(tokenizer)))
    return tokenizer.decode(new)
