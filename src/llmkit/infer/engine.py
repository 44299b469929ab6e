"""Continuous-batching inference engine for llmkit decoders, with a paged KV cache and a prefix cache.

Requests arrive at any time (`Engine.add_request`); every `Engine.step()` advances each running request by
one token. This is iteration-level scheduling as in Orca (Yu et al. 2022, "Orca: A Distributed Serving
System for Transformer-Based Generative Models", OSDI): a new request is prefilled and joins the running
batch at the next step, and a finished or cancelled one leaves it and frees its KV blocks at once, instead
of the whole batch waiting for its longest member.

KV memory (`llmkit.infer.kv_blocks`): a pool of blocks of `prefix_block` positions, as in PagedAttention
(Kwon et al. 2023, SOSP); each request holds a block table and takes a block when its sequence reaches it,
so memory follows the actual lengths, not max_batch x max_len. The decode step reads each row's keys
through its table (the fused C layer directly; the PyTorch path gathers them) and masks keys past each
row's length. H_kv < n_head (grouped-query attention) is passed to
`F.scaled_dot_product_attention(enable_gqa=True)` without repeating keys. When a decode step finds no free
block, the newest running request is preempted: its blocks are released and it goes back to the front of
the queue, to be prefilled again over its prompt and the tokens it already has (vLLM's recompute
preemption); its output is unchanged by this.

Prefix cache: full prompt blocks are keyed by a hash chained over the token ids of the block and of every
block before it (vLLM's automatic prefix caching); a new prompt whose leading blocks are cached references
those very blocks in its table (shared, not copied) and prefills only the rest. The cache holds at most
`prefix_cache_tokens` tokens, evicts the least recently used block first (the deepest block of a chain
before its parents), and gives back blocks only it references when the pool runs short.

Per request (`RequestParams`): max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p, repetition,
presence and frequency penalties, seed (a per-request `torch.Generator`, so the same seed gives the same
tokens whatever else is in the batch), logprobs, stop token ids and EOS (neither is emitted) and stop
strings (need a tokenizer), and a grammar (`llmkit.infer.constrained`: JSON schema, regex, Lark; its token
mask is applied before everything else, per row). Sampling is vectorised over the batch (`llmkit.sampling`);
only the draw itself runs per row, on that row's generator. Tokens go to an optional per-request callback and to
`Engine.stream`.

Prefill is batched: the waiting requests that fit the batch, the free blocks and `max_prefill_tokens` padded tokens
run through the model in right-padded forwards, one per group of similar prompt lengths (`padding_groups`:
padding stays under 25% of the real tokens), each row at its own start position (after its cached prefix)
with a causal keep-mask over its own keys.

Architecture options of the decoder (docs/hf.md) go through the model's own pieces: `Decoder.embed` (scaled
embeddings), `Decoder.rope_at` (RoPE scaling, per row where it depends on the sequence length),
`Attention.project_qkv` (q/k/v biases, q/k norm), `Attention.attend` (attention scale, soft-capping),
`Block.attn_residual` / `mlp_residual` (post-norms) and `Decoder.head` (final soft-capping); a layer's
sliding window narrows its keep-mask. A longrope model (Phi-3) recomputes a request's cache once it passes
the original context, as HF's generate does; prompts beyond the original context of a longrope or dynamic-NTK
model skip the prefix cache.

Many LoRA adapters (`Engine(adapters=MultiLoRA(model))`, `llmkit.infer.multi_lora`): a request names its
adapter in `RequestParams.adapter`; requests of different adapters and of the base share every forward (the
adapted Linears add each row's low-rank delta), an adapter is pinned in memory while a request of it runs, and
its prefix-cache chains start from the adapter's own root, so cached keys/values never cross adapters.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llmkit.infer import kernels as cpu_kernels
from llmkit.infer.constrained import Grammar, Matcher, bitmask_to_bool
from llmkit.infer.generate import SamplingParams, eos_set
from llmkit.infer.kv_blocks import BlockPool, PrefixCache
from llmkit.models.decoder import Decoder
from llmkit.models.layers import causal_mask
from llmkit.models.layout import column_major_linears
from llmkit.sampling import (
    BatchSampling,
    invalid_rows,
    mask_padded_vocab,
    process_logits,
    sample_batch,
    token_counts,
    top_logprobs,
)


@dataclass
class RequestParams(SamplingParams):
    """`SamplingParams` plus the engine's per-request controls.

    Any object with the `SamplingParams` attributes is accepted by the engine; the fields below are optional
    there and default to off. Order of application: repetition penalty, presence/frequency penalties,
    temperature, then top-k, top-p and min-p truncation.
    """

    stop_token_ids: tuple[int, ...] = ()
    """Generation ends at any of these ids; the stop token is not emitted."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends once the decoded output contains one; `Request.text` is cut before it
    and `Request.output` keeps only the tokens wholly before it (tokens already streamed are not recalled).
    Needs the engine's tokenizer."""
    min_p: float = 0.0
    """Keep only tokens with p >= min_p * p_max (Nguyen et al. 2024); 0 = off."""
    repetition_penalty: float = 1.0
    """CTRL (Keskar et al. 2019): logits of tokens in prompt + output are divided by it when positive and
    multiplied by it when negative; 1 = off."""
    presence_penalty: float = 0.0
    """OpenAI: subtract presence_penalty from the logit of every token generated at least once."""
    frequency_penalty: float = 0.0
    """OpenAI: subtract frequency_penalty * (times generated) from each token's logit."""
    logprobs: int | None = None
    """Record each emitted token's log-probability and this many top alternatives (0: only the chosen one)
    in `Request.logprobs`, from the distribution after penalties and temperature (before truncation; greedy
    rows use temperature 1). None = off."""
    adapter: str | None = None
    """Name of a LoRA adapter registered with the engine's `MultiLoRA` (`Engine(adapters=...)`) to generate
    with, in the same batch as other adapters' and the base's requests; None = the base model."""
    grammar: Grammar | None = None
    """A compiled constraint (`llmkit.infer.constrained`: JSON schema, regex, Lark grammar): every token is
    drawn from those the grammar allows next (masked before penalties, temperature and truncation, so
    logprobs are of the constrained distribution), EOS / stop ids only where the grammar may end, and the
    request stops ('stop') once the grammar allows no further token. None = unconstrained."""


@dataclass
class Request:
    """One request's state. `length` is how many of its tokens sit in the KV cache, in the pool blocks
    `blocks` (its block table: block i holds positions i*block_size .. (i+1)*block_size - 1)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    budget: int
    generator: torch.Generator | None
    on_token: Callable[[str, int], None] | None = None
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    length: int = 0
    last_token: int = -1
    finished: bool = False
    finish_reason: str | None = None
    """'length', 'stop' (EOS or a stop id), 'cancelled', or 'error' (see `error`)."""
    error: str | None = None
    """With finish_reason 'error': why (e.g. its sampling settings turned the logits into NaN or inf). Only
    this request ends; the others in the batch go on."""
    cached_tokens: int = 0
    """Prompt tokens whose keys/values came from the prefix cache."""
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    """With params.logprobs set: per emitted token, (its logprob, [(alternative id, logprob)] best first)."""
    text: str | None = None
    """With stop strings: the decoded output, cut before the stop string that ended it."""
    matcher: Matcher | None = None
    """With params.grammar: this request's position in the grammar (made at its first sampling step, kept
    across preemption: the recompute replays tokens the matcher has already accepted)."""


def padding_groups(reqs: list[Request], waste: float = 0.25) -> list[list[Request]]:
    """Split requests to prefill into groups of similar prompt length, longest first, so that a group's
    padded size (rows x its longest prompt) stays within (1 + waste) x its real tokens: right-padding a
    37-token prompt to 127 would triple its prefill FLOPs, while one more forward pass costs one read of
    the weights."""
    out: list[list[Request]] = []
    for req in sorted(reqs, key=lambda r: -len(r.prompt)):
        if out:
            group = out[-1]
            longest = len(group[0].prompt)
            real = sum(len(r.prompt) for r in group) + len(req.prompt)
            if (len(group) + 1) * longest <= (1 + waste) * real:
                group.append(req)
                continue
        out.append([req])
    return out


class Engine:
    """Continuous-batching generation over an llmkit `Decoder`.

    model: a plain `Decoder` (GPT-2 or Llama style, any n_kv_head); prefix-tuned models are refused.
    tokenizer: optional, for its end-of-sequence ids (`eos_ids`: every one the model declares; or pass `eos_id`,
    one id or a list), `decode` (stop strings) and its size: ids at or above `vocab_limit` (default
    ``len(tokenizer)``), the rows of a padded embedding, are never sampled.
    max_batch: most requests decoding together; later requests wait in a queue.
    max_len: most positions of one request (prompt + new tokens); None -> the model's block_size.
    kv_cache_tokens: positions the KV pool holds over all requests (rounded up to whole blocks); None ->
    max_batch * max_len + prefix_cache_tokens (every request can reach max_len at once). Smaller pools admit
    fewer or shorter requests at a time and preempt the newest when the pool runs out.
    prefix_cache_tokens: most tokens the prefix cache keeps (0 disables it); prefix_block: positions per KV
    block (the pool's and the prefix cache's granularity).
    max_prefill_tokens: most padded tokens (rows * longest prompt) prefilled in one forward; at least one
    request is always prefilled per step.
    column_major: re-store the model's Linear weights column-major in place (`llmkit.models.layout`; same
    values and shapes) so batch-1 decoding streams them contiguously; None -> on CPU only, when the decode
    kernels are not used.
    kernels: decode through `llmkit.infer.kernels` (C matrix-vector kernels; fp32 Linears become `KernelLinear`
    in place) and, for Llama-style layers, one fused C call per layer per step (`kernels.fused`; the reason it
    is not used is in `fused_unavailable`); None -> on CPU when the kernels build here. Up to
    `kernels.FUSED_MAX_ROWS` running requests of a fusable model (`kernels.MAX_ROWS` of others) decode that way,
    more go through PyTorch as before.
    adapters: a `llmkit.infer.multi_lora.MultiLoRA` over this model: requests then pick a LoRA adapter by
    `RequestParams.adapter` and requests of different adapters and of the base share a batch (its Linears are
    wrapped here, after the kernels are set up; a decode step with any adapter row goes through PyTorch). A
    request is admitted only when its adapter fits the adapter memory budget beside those running requests pin.

    KV memory is 2 * n_layer * H_kv * head_dim elements in the model's dtype per position of the pool
    (`stats()` reports the blocks in use and their peak).
    """

    def __init__(self, model: Decoder, tokenizer=None, max_batch: int = 16, max_len: int | None = None,
                 prefix_cache_tokens: int = 2048, prefix_block: int = 16, eos_id: int | Sequence[int] | None = None,
                 max_prefill_tokens: int = 8192, column_major: bool | None = None, vocab_limit: int | None = None,
                 kernels: bool | None = None, kv_cache_tokens: int | None = None, adapters=None):
        if not isinstance(model, Decoder):
            raise TypeError(f"Engine serves llmkit decoder-only models (Decoder), not {type(model).__name__}; "
                            "encoders and encoder-decoders are not supported")
        if model.prefix is not None:
            raise ValueError("Engine does not support prefix-tuned models (model.prefix is set): merge or "
                             "remove the prefix adapter, or use llmkit.infer.generate.stream_tokens")
        self.model = model.eval()
        cfg = model.config
        self.config = cfg
        self.max_batch = max_batch
        self.max_len = min(max_len or cfg.block_size, cfg.block_size)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if kernels is None:
            kernels = self.device.type == "cpu" and cpu_kernels.available()
        self.fused = None
        self.fused_unavailable: str | None = "kernels off"
        if kernels:
            from llmkit.infer.kernels.fused import FusedLayers
            from llmkit.infer.kernels.linear import use_decode_kernels

            use_decode_kernels(model)
            plan = FusedLayers.plan(model)
            self.fused, self.fused_unavailable = (None, plan) if isinstance(plan, str) else (plan, None)
        elif column_major if column_major is not None else self.device.type == "cpu":
            column_major_linears(model)
        if kv_cache_tokens is None:
            kv_cache_tokens = max_batch * -(-self.max_len // prefix_block) * prefix_block + prefix_cache_tokens
        self.pool = BlockPool(cfg.n_layer, -(-kv_cache_tokens // prefix_block), cfg.kv_heads, prefix_block,
                              cfg.head_dim, self.device, self.dtype)
        if eos_id is None:  # every end-of-sequence id the model declares (generation_config's list too)
            eos_id = getattr(tokenizer, "eos_ids", None) or getattr(tokenizer, "eos_id", None)
        self.eos_ids = eos_set(eos_id)
        self.eos_id = eos_id if isinstance(eos_id, int) or eos_id is None else (list(eos_id) or [None])[0]
        self.tokenizer = tokenizer
        # ids at or above the tokenizer's size are rows of a padded embedding (Qwen2.5: 151936 rows for
        # 151665 tokens), no token: never sampled
        if vocab_limit is None and tokenizer is not None and hasattr(tokenizer, "__len__"):
            vocab_limit = len(tokenizer)
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < cfg.vocab_size else None
        self.max_prefill_tokens = max_prefill_tokens
        self.prefix_cache = PrefixCache(prefix_cache_tokens, prefix_block, self.pool)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the newest is preempted first
        self.prefill_tokens = 0  # prompt tokens actually run through the model
        self.decode_steps = 0
        self.preemptions = 0
        self._ids = itertools.count()
        self.adapters = adapters
        if adapters is not None:
            if adapters.model is not model:
                raise ValueError("adapters: a MultiLoRA over another model")
            adapters.attach()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, on_token: Callable[[str, int], None] | None = None) -> str:
        """Queue a request; returns its id. on_token(request_id, token) is called for every new token.

        The prompt is cut to its last min(block_size, max_len) - 1 tokens, as `stream_tokens` does, and
        max_new_tokens to what max_len and the KV pool leave.
        """
        params = params or RequestParams()
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token (e.g. the BOS token)")
        if getattr(params, "stop", None) and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass Engine(model, tokenizer=...)")
        adapter = getattr(params, "adapter", None)
        if adapter is not None and self.adapters is None:
            raise ValueError(f"request names adapter {adapter!r}, but this engine serves none: pass "
                             "Engine(adapters=MultiLoRA(model))")
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests and not self.requests[rid].finished:
            raise ValueError(f"request id {rid!r} is already active")
        ids = [int(t) for t in prompt_ids][-(self.max_len - 1):]
        pool_tokens = self.pool.num_blocks * self.pool.block_size
        if len(ids) >= pool_tokens:
            raise ValueError(f"a prompt of {len(ids)} tokens does not fit the KV pool of {pool_tokens} positions: "
                             "raise Engine(kv_cache_tokens=...)")
        budget = min(params.max_new_tokens, self.max_len - len(ids), pool_tokens - len(ids))
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        req = Request(rid, ids, params, budget, gen, on_token)
        if getattr(params, "logprobs", None) is not None:
            req.logprobs = []
        if adapter is not None and budget > 0:  # UnknownAdapter (a KeyError) before anything is queued
            self.adapters.track(adapter, req)
        self.requests[rid] = req
        if budget <= 0:
            req.finished, req.finish_reason = True, "length"
        else:
            self.waiting.append(req)
        return rid

    def cancel(self, request_id: str) -> None:
        """Stop a request now: it leaves the queue or the batch and its KV blocks are free at once.
        Unknown ids (already popped) and finished requests are left alone."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        if req in self.running:
            self._free(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.finished, req.finish_reason = True, "cancelled"

    def pop_finished(self) -> list[Request]:
        """Remove and return every finished request (outputs in `Request.output`, why in `finish_reason`)."""
        done = [r for r in self.requests.values() if r.finished]
        for r in done:
            del self.requests[r.request_id]
        return done

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.running)

    def stats(self) -> dict[str, int]:
        pc = self.prefix_cache
        return {"running": len(self.running), "waiting": len(self.waiting), "prefill_tokens": self.prefill_tokens,
                "decode_steps": self.decode_steps, "prefix_hits": pc.hits, "prefix_misses": pc.misses,
                "prefix_blocks": len(pc.blocks), "prefix_evictions": pc.evictions,
                "kv_blocks": self.pool.num_blocks, "kv_blocks_in_use": self.pool.in_use,
                "kv_blocks_peak": self.pool.peak_in_use, "kv_block_bytes": self.pool.block_bytes,
                "preemptions": self.preemptions}

    # ------------------------------------------------------------------ scheduling
    @torch.no_grad()
    def step(self) -> dict[str, int]:
        """One iteration: every running request gets one token (batched decode), then waiting requests
        take the free places in the batch and the pool, are prefilled and get their first token. Returns
        {request_id: token} emitted."""
        emitted: dict[str, int] = {}
        if self.running:
            self._make_room()
        if self.running:
            logits = self._decode()  # (n, vocab)
            self._sample_all(self.running, logits, emitted)
        while self.waiting and self.free_slots > 0:
            batch, longest, blocks = [], 0, 0
            available = self.pool.num_free + self.prefix_cache.reclaimable()
            while self.waiting and len(batch) < self.free_slots:
                n_tokens = len(self.waiting[0].prompt) + len(self.waiting[0].output)
                t = max(longest, n_tokens)
                need = self._blocks_for(n_tokens + 1)  # + the first decoded token's position
                if batch and (len(batch) + 1) * t > self.max_prefill_tokens or blocks + need > available:
                    break
                if self.adapters is not None and not self.adapters.can_pin(
                        [getattr(r.params, "adapter", None) for r in (*self.running, *batch, self.waiting[0])]):
                    break  # its adapter has no room beside the running ones' yet: it waits for them
                if not self._adapter_loads(self.waiting[0]):
                    continue  # its adapter could not be read: that request failed alone
                batch.append(self.waiting.popleft())
                longest, blocks = t, blocks + need
            if not batch:  # the pool is full: the running requests free blocks as they finish
                break
            try:
                for group in padding_groups(batch):
                    logits = self._prefill_batch(group)  # (len(group), vocab)
                    self._sample_all(group, logits, emitted)
            except BaseException:
                self._requeue_unstarted(batch)
                raise
        return emitted

    def _requeue_unstarted(self, batch: list[Request]) -> None:
        """After a failed prefill: the requests of `batch` that got no token from it leave the batch (if they
        joined it) and go back to the front of the queue, in order. Without this they would be in neither
        `waiting` nor `running`, so `cancel` could not find them and the next decode step would read a
        request holding no token."""
        unstarted = [r for r in batch if not r.finished and r.last_token < 0]
        for req in unstarted:
            if req in self.running:
                self._free(req)
        for req in reversed(unstarted):
            req.length, req.cached_tokens = 0, 0
            self.waiting.appendleft(req)

    def run(self) -> None:
        """Step until no request is waiting or running."""
        while self.has_unfinished():
            self.step()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None
                 = None) -> list[list[int]]:
        """Run every prompt to completion (continuous batching) and return their new tokens, in order."""
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        self.run()
        return [self.requests.pop(i).output for i in ids]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> Iterator[int]:
        """Yield one request's tokens as they come, stepping the whole engine (other requests advance too)."""
        rid = self.add_request(prompt_ids, params, request_id)
        req, seen = self.requests[rid], 0
        try:
            while True:
                while seen < len(req.output):
                    yield req.output[seen]
                    seen += 1
                if req.finished:
                    return
                self.step()
        finally:
            if not req.finished:  # the consumer stopped early
                self.cancel(rid)
            self.requests.pop(rid, None)

    # ------------------------------------------------------------------ internals
    def _sample_all(self, reqs: list[Request], logits: torch.Tensor, emitted: dict[str, int]) -> None:
        """Pick each row's token (penalties, temperature and truncation vectorised over the rows; each
        sampled row draws with its own generator), emit it, and retire finished requests."""
        ps = [r.params for r in reqs]
        logits = mask_padded_vocab(logits, self.vocab_limit)
        dead = self._constrain(reqs, logits)  # grammar masks first: penalties etc. see only allowed tokens
        want_lp = [getattr(p, "logprobs", None) for p in ps]
        sp = BatchSampling.from_params(ps, device=logits.device)
        penalties = sp.any_penalty
        lp_rows = lp_vals = lp_ids = None
        if not penalties and not (sp.temperature > 0).any() and all(k is None for k in want_lp):
            tokens = logits.argmax(-1).tolist()  # all greedy, nothing to process: the fast path
            bad = invalid_rows(logits).tolist()
        else:
            seen = counts = None
            if penalties:
                V = logits.size(-1)
                counts = token_counts([r.output for r in reqs], V, logits.device)
                if bool((sp.repetition_penalty != 1).any()):
                    seen = token_counts([r.prompt + r.output for r in reqs], V, logits.device) > 0
            proc = process_logits(logits, sp, seen, counts)
            skip = invalid_rows(proc)  # NaN / inf rows: fail those requests, not the batch
            chosen = sample_batch(proc, sp, [r.generator for r in reqs], skip=skip)
            tokens, bad = chosen.tolist(), skip.tolist()
            if any(k is not None for k in want_lp):
                c, v, i = top_logprobs(proc, chosen, max(k or 0 for k in want_lp))
                lp_rows, lp_vals, lp_ids = c.tolist(), v.tolist(), i.tolist()
        done = []
        for i, req in enumerate(reqs):
            p, t = req.params, tokens[i]
            if bad[i]:
                req.finish_reason = "error"
                req.error = dead.get(i) or "the logits became NaN or infinite under this request's sampling settings"
                done.append(req)
                continue
            stops = getattr(p, "stop_token_ids", None) or ()
            if (p.stop_at_eos and t in self.eos_ids) or t in stops:
                req.finish_reason = "stop"
                done.append(req)
                continue
            if req.matcher is not None and not req.matcher.accept(t):  # the mask allowed it: only a bug gets here
                req.finish_reason, req.error = "error", f"grammar rejected token {t}: {req.matcher.error}"
                done.append(req)
                continue
            req.output.append(t)
            if self._hit_stop_string(req):
                req.finish_reason = "stop"
                done.append(req)
                continue
            req.last_token = t
            if req.logprobs is not None:
                k = want_lp[i]
                req.logprobs.append((lp_rows[i], list(zip(lp_ids[i][:k], lp_vals[i][:k]))))
            emitted[req.request_id] = t
            if req.on_token is not None:
                req.on_token(req.request_id, t)
            if req.matcher is not None and req.matcher.is_finished():  # the grammar is complete
                req.finish_reason = "stop"
                done.append(req)
                continue
            if len(req.output) >= req.budget:
                req.finish_reason = "length"
                done.append(req)
        for req in done:
            self._free(req)
            req.finished = True

    def _constrain(self, reqs: list[Request], logits: torch.Tensor) -> dict[int, str]:
        """Set to -inf, in place, the logits (n, vocab) of tokens the grammar of each constrained row does not
        allow next (its EOS / stop ids allowed only where the grammar may end). Rows without a grammar are
        untouched, so an unconstrained batch costs nothing. Returns {row: error} for rows whose grammar
        allows no token at all (they fail alone; the rest of the batch goes on)."""
        rows = [i for i, r in enumerate(reqs) if getattr(r.params, "grammar", None) is not None]
        if not rows:
            return {}
        V = logits.size(-1)
        words = torch.zeros(len(rows), -(-V // 32), dtype=torch.int32)  # one bit per token, filled per row
        for j, i in enumerate(rows):
            req = reqs[i]
            if req.matcher is None:
                req.matcher = req.params.grammar.matcher()
            p = req.params
            ends = [*(self.eos_ids if p.stop_at_eos else ()), *(getattr(p, "stop_token_ids", None) or ())]
            req.matcher.fill_mask(words, j, ends)
        allowed = bitmask_to_bool(words, V).to(logits.device)  # (len(rows), V)
        forbid = ~allowed
        if len(rows) < logits.size(0):  # widen to every row (bools: cheaper than gathering float rows)
            forbid = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            forbid[torch.tensor(rows, device=logits.device)] = ~allowed
        logits.masked_fill_(forbid, float("-inf"))  # in place: one pass over (n, vocab)
        empty = (~allowed.any(-1)).tolist()
        return {i: f"the grammar allows no token here ({reqs[i].matcher.error or 'dead end for this vocabulary'})"
                for j, i in enumerate(rows) if empty[j]}

    def _hit_stop_string(self, req: Request) -> bool:
        """After req's newest token: if the decoded output contains a stop string, set `req.text` to the
        text before the earliest one, drop from `req.output` the tokens not wholly before it (and their
        logprobs), and return True. The token that completed the stop string is never emitted."""
        stop = getattr(req.params, "stop", None)
        if not stop:
            return False
        text = self.tokenizer.decode(req.output)
        cut = min((j for j in (text.find(s) for s in stop if s) if j >= 0), default=-1)
        if cut < 0:
            return False
        req.text = text[:cut]
        req.output.pop()  # the completing token: not emitted
        while req.output and len(self.tokenizer.decode(req.output)) > cut:
            req.output.pop()
        if req.logprobs is not None:
            del req.logprobs[len(req.output):]
        return True

    def _free(self, req: Request) -> None:
        """Take req out of the batch and drop its references to its blocks (cached prefix blocks stay)."""
        self.running.remove(req)
        for b in req.blocks:
            self.pool.release(b)
        req.blocks = []
        if self.adapters is not None and getattr(req.params, "adapter", None) is not None:
            self.adapters.unpin(req.params.adapter)  # pinned when it joined the batch (_prefill_batch)

    def _blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.pool.block_size)

    def _allocate(self) -> int | None:
        """A free block, giving back prefix-cache-only blocks if none is free; None if the pool is full."""
        if self.pool.num_free == 0:
            self.prefix_cache.reclaim(1)
        return self.pool.allocate()

    def _preempt(self, req: Request) -> None:
        """Free a running request's blocks and put it back at the front of the queue; it is prefilled again
        over prompt + output when blocks are free (its output so far is kept)."""
        self._free(req)
        req.length, req.cached_tokens, req.last_token = 0, 0, -1
        self.waiting.appendleft(req)
        self.preemptions += 1

    def _make_room(self) -> None:
        """Before a decode step: give every running request the block its next position falls in, and a
        private copy of any shared block a longrope recompute is about to overwrite; when the pool is full,
        preempt the newest running request (possibly the one asking) until it is not."""
        bs, m = self.pool.block_size, self.model
        for req in list(self.running):  # oldest first
            if req not in self.running:  # preempted for an older one
                continue
            if m.long_rope_crossing(req.length, 1):
                for j, b in enumerate(req.blocks):
                    if self.pool.refs[b] > 1:  # shared with the prefix cache or another request
                        new = self._take_block(req)
                        if new is None:
                            break
                        self.pool.release(b)
                        req.blocks[j] = new
            if req in self.running and req.length // bs >= len(req.blocks):
                new = self._take_block(req)
                if new is not None:
                    req.blocks.append(new)

    def _take_block(self, req: Request) -> int | None:
        """A block for `req`, preempting the newest running requests while none is free; None when `req`
        itself had to go."""
        while (b := self._allocate()) is None:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return None
        return b

    def _block_table(self, reqs: list[Request]) -> torch.Tensor:
        """int64 (len(reqs), most blocks) block tables, padded with block 0 (never read unmasked)."""
        n_blocks = max(len(r.blocks) for r in reqs)
        return torch.tensor([r.blocks + [0] * (n_blocks - len(r.blocks)) for r in reqs], dtype=torch.int64,
                            device=self.device)

    def _gather(self, cache: torch.Tensor, table: torch.Tensor, L: int) -> torch.Tensor:
        """Keys (or values) of the rows of `table` from one layer's pool (num_blocks, H_kv, bs, hd), their first
        L positions: (n, H_kv, L, hd)."""
        n, nb = table.shape
        blocks = cache[table]  # (n, nb, H_kv, bs, hd)
        return blocks.transpose(1, 2).reshape(n, cache.size(1), nb * cache.size(2), cache.size(3))[:, :, :L]

    def _prefill(self, req: Request) -> torch.Tensor:
        """Prefill one request (see `_prefill_batch`). Returns (1, vocab)."""
        return self._prefill_batch([req])

    def _prefill_batch(self, reqs: list[Request]) -> torch.Tensor:
        """Give each request its block table (cached prefix blocks referenced, new blocks for the rest), and
        run the rest of all the sequences (the prompt, plus the output of a preempted request) through the
        model in one right-padded forward, writing their keys/values into their blocks. Returns every
        request's last-position logits, (n, vocab).

        Shapes: ids/positions (n, T) with T the longest uncached part and row i at positions
        start_i .. start_i + T - 1; q (n, H, T, hd); keys gathered through the tables (n, H_kv, L, hd) with
        L = max(start_i + len_i) and a keep-mask (n, 1, T, L): query t of row i sees keys <= start_i + t.
        Padded queries only see their own row's keys and are dropped; padded keys are never written.
        """
        m, cfg, dev = self.model, self.config, self.device
        pc = self.prefix_cache
        bs = pc.block_size
        starts, news = [], []
        for req in reqs:
            if self.adapters is not None and getattr(req.params, "adapter", None) is not None:
                self.adapters.pin(req.params.adapter)  # resident (paged in) while it runs; _free unpins
            self.running.append(req)
            ids, start = req.prompt + req.output, 0
            if self._prefix_cacheable(ids):
                # keep >= 1 token to compute logits from
                chain = pc.chain(ids, (len(ids) - 1) // bs, root=self._cache_root(req))
                for b in pc.lookup(chain):
                    self.pool.retain(b)
                    req.blocks.append(b)
                start = len(req.blocks) * bs
            while len(req.blocks) < self._blocks_for(len(ids)):
                b = self._allocate()
                if b is None:  # admission counted the blocks: only a bug gets here
                    raise RuntimeError(f"KV pool exhausted while prefilling {req.request_id}")
                req.blocks.append(b)
            req.cached_tokens = start
            starts.append(start)
            news.append(ids[start:])
        n = len(reqs)
        table = self._block_table(reqs)  # (n, most blocks)
        lens_l = [len(x) for x in news]
        T = max(lens_l)
        lens = torch.tensor(lens_l, device=dev)
        st = torch.tensor(starts, device=dev)
        ar = torch.arange(T, device=dev)
        pos = st[:, None] + ar[None]  # (n, T)
        valid = ar[None] < lens[:, None]  # (n, T)
        pos_c = pos.clamp(max=self.max_len - 1)  # padding positions may run past the table: never used
        idx = torch.tensor([x + [0] * (T - len(x)) for x in news], device=dev)
        # every row starts at 0 with the same length: plain causal attention over the new keys
        uniform = not any(starts) and min(lens_l) == T
        x = m.embed(idx)
        rope = None
        if m.pos_emb is not None:
            x = x + m.pos_emb(pos_c)
        else:
            cos, sin = m.rope_at(pos_c, [s + t for s, t in zip(starts, lens_l)])
            rope = (cos[:, None], sin[:, None])  # (n, 1, T, hd/2)
        L = int((st + lens).max())
        masks: dict[int | None, torch.Tensor | None] = {None: None}  # keep-mask per sliding window
        if not uniform:
            masks[None] = (torch.arange(L, device=dev)[None, None, :] <= pos[:, :, None]).view(n, 1, T, L)
        for w in {b.attn.window for b in m.blocks} - {None}:
            if uniform:
                masks[w] = causal_mask(T, T, dev, w) if T > w else None
            else:
                masks[w] = masks[None] & (torch.arange(L, device=dev)[None, None, :] > pos[:, :, None] - w
                                          ).view(n, 1, T, L)
        rows_flat = torch.arange(n, device=dev)[:, None].expand(n, T)[valid]
        pos_flat = pos[valid]
        blocks_flat, offsets_flat = table[rows_flat, pos_flat // bs], pos_flat % bs
        H, hd = cfg.n_head, cfg.head_dim
        self._adapter_rows(reqs)
        for i, block in enumerate(m.blocks):
            attn = block.attn
            q, k, v = attn.project_qkv(block.norm1(x), rope)  # (n, H, T, hd), (n, H_kv, T, hd) x 2
            kc, vc = self.pool.k[i], self.pool.v[i]  # (num_blocks, H_kv, bs, hd)
            kc[blocks_flat, :, offsets_flat] = k.transpose(1, 2)[valid]
            vc[blocks_flat, :, offsets_flat] = v.transpose(1, 2)[valid]
            mask = masks[attn.window]
            if uniform:
                y = attn.attend(q, k, v, mask=mask, is_causal=mask is None)
            else:
                y = attn.attend(q, self._gather(kc, table, L), self._gather(vc, table, L), mask=mask)
            x = block.attn_residual(x, attn.proj(y.transpose(1, 2).reshape(n, T, H * hd)))
            x = block.mlp_residual(x)
        self._adapter_rows(None)
        for req in reqs:
            req.length = len(req.prompt) + len(req.output)
        self.prefill_tokens += sum(lens_l)
        if pc.max_blocks > 0:
            for req in reqs:
                ids = req.prompt + req.output
                if self._prefix_cacheable(ids):  # its full blocks: never written again (decode writes later)
                    pc.insert(pc.chain(ids, len(ids) // bs, root=self._cache_root(req)),
                              lambda j, req=req: req.blocks[j])
        last = x[torch.arange(n, device=dev), lens - 1]
        return m.head(last)

    def _adapter_loads(self, req: Request) -> bool:
        """At admission: read req's adapter from disk if it is paged out. If that fails (its dir was removed
        or broken since it was loaded), the request leaves the queue finished with an error and False is
        returned; the rest of the batch goes on."""
        name = getattr(req.params, "adapter", None)
        if name is None or self.adapters is None:
            return True
        try:
            self.adapters.preload(name)
        except (OSError, ValueError) as e:
            self.waiting.remove(req)
            req.finished, req.finish_reason = True, "error"
            req.error = f"adapter {name!r} could not be read: {e}"
            return False
        return True

    def _cache_root(self, req: Request):
        """Where a request's prefix-cache chain starts: None for the base model, the adapter's registration
        uid otherwise, so keys/values computed under one adapter are never reused for another or the base
        (and a name re-registered with other weights starts afresh)."""
        name = getattr(req.params, "adapter", None)
        return None if name is None or self.adapters is None else ("lora", self.adapters.uid(name))

    def _adapter_rows(self, reqs: list[Request] | None) -> None:
        """Tell the adapter wrappers which adapter each row of the next forward uses (None: clear)."""
        if self.adapters is not None:
            self.adapters.set_rows(None if reqs is None else [getattr(r.params, "adapter", None) for r in reqs])

    def _prefix_cacheable(self, ids: Sequence[int]) -> bool:
        """Whether a prompt's keys/values may come from / go to the prefix cache: not for a prompt beyond the
        original context of a model whose RoPE depends on the sequence length (longrope, dynamic NTK): its
        keys all use frequencies of its own length, unlike the same tokens' keys in another prompt."""
        if self.prefix_cache.max_blocks <= 0:
            return False
        orig = self.model.rope_original_len
        return orig is None or len(ids) <= orig

    def _recompute_long_rope(self, req: Request) -> torch.Tensor:
        """A longrope request passing the original context: recompute its keys/values with the long factors
        over its whole sequence (the model's own cached forward) into its blocks (made private beforehand by
        `_make_room`) and return its next-token logits."""
        from llmkit.models.decoder import KVCache

        ids = req.prompt + req.output  # the cache holds all but the last token
        cache = KVCache(self.config, 1, len(ids), device=self.device, dtype=self.dtype, rolling=False)
        self._adapter_rows([req])
        logits, _ = self.model(torch.tensor([ids], device=self.device), cache=cache)
        self._adapter_rows(None)
        bs = self.pool.block_size
        for j in range(self._blocks_for(len(ids))):
            part = slice(j * bs, min(len(ids), (j + 1) * bs))
            n = part.stop - part.start
            self.pool.k[:, req.blocks[j], :, :n] = cache.k[:, 0, :, part]
            self.pool.v[:, req.blocks[j], :, :n] = cache.v[:, 0, :, part]
        return logits[0, -1]

    def _decode(self) -> torch.Tensor:
        """One token for every running request at its own position. Returns logits (n, vocab).

        Up to `kernels.FUSED_MAX_ROWS` rows of a fusable model go through one C call per layer (`kernels.fused`),
        the rest through `_decode_layers`.
        """
        m = self.model
        n = len(self.running)
        dev = self.device
        tokens = torch.tensor([r.last_token for r in self.running], device=dev)
        pos = torch.tensor([r.length for r in self.running], device=dev)
        seq_lens = [r.length + 1 for r in self.running]
        table = self._block_table(self.running)  # (n, most blocks)
        # the fused C layers read the base weights only: a batch with adapter rows goes through PyTorch
        adapted = self.adapters is not None and any(getattr(r.params, "adapter", None) for r in self.running)
        if self.fused is not None and n <= cpu_kernels.FUSED_MAX_ROWS and not adapted:
            logits = m.head(self.fused.decode_hidden(m, tokens, pos, seq_lens, self.pool.k, self.pool.v, table))
        else:
            logits = self._decode_layers(tokens, pos, seq_lens, table)
        for j, r in enumerate(self.running):
            if m.long_rope_crossing(r.length, 1):
                logits[j] = self._recompute_long_rope(r)
            r.length += 1
        self.decode_steps += 1
        return logits

    def _decode_layers(self, tokens: torch.Tensor, pos: torch.Tensor, seq_lens: list[int],
                       table: torch.Tensor) -> torch.Tensor:
        """The decode step's layers in PyTorch. Returns logits (n, vocab).

        Shapes: tokens/positions (n,); table (n, blocks) int64; x (n, 1, d_model); q (n, H, 1, hd); keys
        gathered through the table (n, H_kv, L, hd) with L = longest length + 1 and a keep-mask (n, 1, 1, L)
        of each row's valid keys.
        """
        m, cfg = self.model, self.config
        n = tokens.size(0)
        dev = self.device
        L = max(seq_lens)
        keys = torch.arange(L, device=dev)[None, :]
        masks = {None: (keys <= pos[:, None]).view(n, 1, 1, L)}  # keep-mask per sliding window
        for w in {b.attn.window for b in m.blocks} - {None}:
            masks[w] = masks[None] & (keys > pos[:, None] - w).view(n, 1, 1, L)
        bs = self.pool.block_size
        table = table[:, :self._blocks_for(L)]
        rows = torch.arange(n, device=dev)
        blocks, offsets = table[rows, pos // bs], pos % bs
        x = m.embed(tokens)[:, None]
        rope = None
        if m.pos_emb is not None:
            x = x + m.pos_emb(pos)[:, None]
        else:
            cos, sin = m.rope_at(pos, seq_lens)
            rope = (cos[:, None, None], sin[:, None, None])  # (n, 1, 1, hd/2)
        H, hd = cfg.n_head, cfg.head_dim
        self._adapter_rows(self.running)  # rows are self.running's, in order (`_decode`)
        for i, block in enumerate(m.blocks):
            attn = block.attn
            q, k, v = attn.project_qkv(block.norm1(x), rope)  # (n, H, 1, hd), (n, H_kv, 1, hd) x 2
            kc, vc = self.pool.k[i], self.pool.v[i]  # (num_blocks, H_kv, bs, hd)
            kc[blocks, :, offsets] = k[:, :, 0]
            vc[blocks, :, offsets] = v[:, :, 0]
            y = attn.attend(q, self._gather(kc, table, L), self._gather(vc, table, L), mask=masks[attn.window])
            x = block.attn_residual(x, attn.proj(y.transpose(1, 2).reshape(n, 1, H * hd)))
            x = block.mlp_residual(x)
        self._adapter_rows(None)
        return m.head(x[:, 0])
