"""Continuous-batching inference engine for llmkit decoders, with a slot KV cache and a prefix cache.

Requests arrive at any time (`Engine.add_request`); every `Engine.step()` advances each running request by
one token. This is iteration-level scheduling as in Orca (Yu et al. 2022, "Orca: A Distributed Serving
System for Transformer-Based Generative Models", OSDI): a new request is prefilled and joins the running
batch at the next step, and a finished or cancelled one leaves it and frees its cache slot at once, instead
of the whole batch waiting for its longest member.

KV memory: one preallocated slot per running request, `k`/`v` of shape
(n_layer, max_batch, H_kv, max_len, head_dim) with per-slot lengths; running requests occupy slots
[0, n) (a freed slot is refilled by moving the last slot into it), so the batched decode step reads a
view of the cache and masks keys past each row's length. H_kv < n_head (grouped-query attention) is
passed to `F.scaled_dot_product_attention(enable_gqa=True)` without repeating keys.

Prefix cache: prompt keys/values are kept in blocks of `block_size` tokens, keyed by a hash chained over
the token ids of the block and of every block before it, as in vLLM's automatic prefix caching (Kwon et
al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention", SOSP). A
new prompt whose leading blocks are cached copies their keys/values into its slot and prefills only the
rest. The cache holds at most `prefix_cache_tokens` tokens and evicts the least recently used block first
(the deepest block of a chain goes before its parents). Unlike vLLM the blocks are copied into a
contiguous slot rather than paged in place: simpler, at the cost of one copy per hit.

Per request (`RequestParams`): max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p, repetition,
presence and frequency penalties, seed (a per-request `torch.Generator`, so the same seed gives the same
tokens whatever else is in the batch), logprobs, stop token ids and EOS (neither is emitted) and stop
strings (need a tokenizer). Sampling is vectorised over the batch (`llmkit.sampling`); only the draw
itself runs per row, on that row's generator. Tokens go to an optional per-request callback and to
`Engine.stream`.

Prefill is batched: the waiting requests that fit the free slots (and `max_prefill_tokens` padded tokens)
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
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llmkit.infer import kernels as cpu_kernels
from llmkit.infer.generate import SamplingParams, eos_set
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


@dataclass
class Request:
    """One request's state. `length` is how many of its tokens sit in the KV cache; `slot` its cache row."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    budget: int
    generator: torch.Generator | None
    on_token: Callable[[str, int], None] | None = None
    output: list[int] = field(default_factory=list)
    slot: int = -1
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


@dataclass
class _Block:
    parent: int | None
    tokens: tuple[int, ...]
    k: torch.Tensor  # (n_layer, H_kv, block_size, head_dim)
    v: torch.Tensor


class PrefixCache:
    """LRU store of prompt KV blocks keyed by chained hashes (vLLM-style), at most `max_tokens` tokens."""

    def __init__(self, max_tokens: int, block_size: int = 16):
        self.block_size = block_size
        self.max_blocks = max_tokens // block_size
        self.blocks: OrderedDict[int, _Block] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def chain(self, tokens: Sequence[int], n_blocks: int) -> list[tuple[int, int | None, tuple[int, ...]]]:
        """(hash, parent hash, block tokens) for the first n_blocks full blocks of `tokens`."""
        out, parent = [], None
        bs = self.block_size
        for j in range(n_blocks):
            blk = tuple(tokens[j * bs:(j + 1) * bs])
            h = hash((parent, blk))
            out.append((h, parent, blk))
            parent = h
        return out

    def lookup(self, chain) -> list[_Block]:
        """The cached leading blocks of `chain` (stops at the first miss); counts hits and misses per block."""
        found = []
        for h, parent, blk in chain:
            b = self.blocks.get(h)
            if b is None or b.parent != parent or b.tokens != blk:  # verify: a hash is not proof
                self.misses += len(chain) - len(found)
                break
            found.append(b)
        self.hits += len(found)
        return found

    def insert(self, chain, kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add the blocks of `chain` not cached yet (kv(j) gives block j's keys/values), then evict LRU."""
        if self.max_blocks <= 0:
            return
        for j, (h, parent, blk) in enumerate(chain):
            if h not in self.blocks:
                k, v = kv(j)
                self.blocks[h] = _Block(parent, blk, k, v)
        for h, _, _ in reversed(chain):  # parents most recent: evict chains from their tail
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)
            self.evictions += 1

    def clear(self) -> None:
        self.blocks.clear()


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
    max_batch: cache slots = most requests decoding together; later requests wait in a queue.
    max_len: cache positions per slot (prompt + new tokens); None -> the model's block_size.
    prefix_cache_tokens: prefix-cache budget in tokens (0 disables it); prefix_block: tokens per block.
    max_prefill_tokens: most padded tokens (rows * longest prompt) prefilled in one forward; at least one
    request is always prefilled per step.
    column_major: re-store the model's Linear weights column-major in place (`llmkit.models.layout`; same
    values and shapes) so batch-1 decoding streams them contiguously; None -> on CPU only, when the decode
    kernels are not used.
    kernels: decode through `llmkit.infer.kernels` (C matrix-vector kernels; fp32 Linears become `KernelLinear`
    in place) and, for Llama-style layers, one fused C call per layer per step (`kernels.fused`; the reason it
    is not used is in `fused_unavailable`); None -> on CPU when the kernels build here. Up to
    `kernels.MAX_ROWS` running requests decode that way, more go through PyTorch as before.

    KV memory is 2 * n_layer * max_batch * H_kv * max_len * head_dim elements in the model's dtype.
    """

    def __init__(self, model: Decoder, tokenizer=None, max_batch: int = 16, max_len: int | None = None,
                 prefix_cache_tokens: int = 2048, prefix_block: int = 16, eos_id: int | Sequence[int] | None = None,
                 max_prefill_tokens: int = 8192, column_major: bool | None = None, vocab_limit: int | None = None,
                 kernels: bool | None = None):
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
        shape = (cfg.n_layer, max_batch, cfg.kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
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
        self.prefix_cache = PrefixCache(prefix_cache_tokens, prefix_block)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i].slot == i
        self.prefill_tokens = 0  # prompt tokens actually run through the model
        self.decode_steps = 0
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, on_token: Callable[[str, int], None] | None = None) -> str:
        """Queue a request; returns its id. on_token(request_id, token) is called for every new token.

        The prompt is cut to its last min(block_size, max_len) - 1 tokens, as `stream_tokens` does.
        """
        params = params or RequestParams()
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token (e.g. the BOS token)")
        if getattr(params, "stop", None) and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass Engine(model, tokenizer=...)")
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests and not self.requests[rid].finished:
            raise ValueError(f"request id {rid!r} is already active")
        ids = [int(t) for t in prompt_ids][-(self.max_len - 1):]
        budget = min(params.max_new_tokens, self.max_len - len(ids))
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        req = Request(rid, ids, params, budget, gen, on_token)
        if getattr(params, "logprobs", None) is not None:
            req.logprobs = []
        self.requests[rid] = req
        if budget <= 0:
            req.finished, req.finish_reason = True, "length"
        else:
            self.waiting.append(req)
        return rid

    def cancel(self, request_id: str) -> None:
        """Stop a request now: it leaves the queue or the batch and its cache slot is free at once.
        Unknown ids (already popped) and finished requests are left alone."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        if req.slot >= 0:
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
                "prefix_blocks": len(pc.blocks), "prefix_evictions": pc.evictions}

    # ------------------------------------------------------------------ scheduling
    @torch.no_grad()
    def step(self) -> dict[str, int]:
        """One iteration: every running request gets one token (batched decode), then waiting requests
        take the free slots, are prefilled and get their first token. Returns {request_id: token} emitted."""
        emitted: dict[str, int] = {}
        if self.running:
            logits = self._decode()  # (n, vocab)
            self._sample_all(self.running, logits, emitted)
        while self.waiting and self.free_slots > 0:
            batch, longest = [self.waiting.popleft()], 0
            longest = len(batch[0].prompt)
            while self.waiting and len(batch) < self.free_slots:
                t = max(longest, len(self.waiting[0].prompt))
                if (len(batch) + 1) * t > self.max_prefill_tokens:
                    break
                batch.append(self.waiting.popleft())
                longest = t
            try:
                for group in padding_groups(batch):
                    logits = self._prefill_batch(group)  # (len(group), vocab)
                    self._sample_all(group, logits, emitted)
            except BaseException:
                self._requeue_unstarted(batch)
                raise
        return emitted

    def _requeue_unstarted(self, batch: list[Request]) -> None:
        """After a failed prefill: the requests of `batch` that got no first token leave their slots (if
        they took one) and go back to the front of the queue, in order. Without this they would be in
        neither `waiting` nor `running`, so `cancel` could not find them and the next decode step would
        read a slot holding no token."""
        unstarted = [r for r in batch if not r.finished and r.last_token < 0]
        for req in sorted((r for r in unstarted if r.slot >= 0), key=lambda r: -r.slot):
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
                req.error = "the logits became NaN or infinite under this request's sampling settings"
                done.append(req)
                continue
            stops = getattr(p, "stop_token_ids", None) or ()
            if (p.stop_at_eos and t in self.eos_ids) or t in stops:
                req.finish_reason = "stop"
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
            if len(req.output) >= req.budget:
                req.finish_reason = "length"
                done.append(req)
        for req in sorted(done, key=lambda r: -r.slot):  # last slots first: fewer moves
            self._free(req)
            req.finished = True

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
        """Release req's slot; the last running request moves into it so slots [0, n) stay dense."""
        s = req.slot
        last = self.running[-1]
        if last is not req:
            n = last.length
            self.k[:, s, :, :n] = self.k[:, last.slot, :, :n]
            self.v[:, s, :, :n] = self.v[:, last.slot, :, :n]
            last.slot = s
            self.running[s] = last
        self.running.pop()
        req.slot = -1

    def _prefill(self, req: Request) -> torch.Tensor:
        """Prefill one request (see `_prefill_batch`). Returns (1, vocab)."""
        return self._prefill_batch([req])

    def _prefill_batch(self, reqs: list[Request]) -> torch.Tensor:
        """Put each request in a free slot, reuse its cached prefix blocks, and run the rest of all the
        prompts through the model in one right-padded forward, writing each slot's keys/values. Returns
        every request's last-position logits, (n, vocab).

        Shapes: ids/positions (n, T) with T the longest uncached part and row i at positions
        start_i .. start_i + T - 1; q (n, H, T, hd); keys read from the slots (n, H_kv, L, hd) with
        L = max(start_i + len_i) and a keep-mask (n, 1, T, L): query t of row i sees keys <= start_i + t.
        Padded queries only see their own row's keys and are dropped; padded keys are never written.
        """
        m, cfg, dev = self.model, self.config, self.device
        pc = self.prefix_cache
        bs = pc.block_size
        s0 = len(self.running)
        starts, news = [], []
        for req in reqs:
            s = len(self.running)
            req.slot = s
            self.running.append(req)
            ids, start = req.prompt, 0
            if self._prefix_cacheable(ids):
                chain = pc.chain(ids, (len(ids) - 1) // bs)  # keep >= 1 token to compute logits from
                for j, b in enumerate(pc.lookup(chain)):
                    self.k[:, s, :, j * bs:(j + 1) * bs] = b.k
                    self.v[:, s, :, j * bs:(j + 1) * bs] = b.v
                    start = (j + 1) * bs
            req.cached_tokens = start
            starts.append(start)
            news.append(ids[start:])
        n = len(reqs)
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
        rows_flat = (s0 + torch.arange(n, device=dev))[:, None].expand(n, T)[valid]
        pos_flat = pos[valid]
        H, hd = cfg.n_head, cfg.head_dim
        for i, block in enumerate(m.blocks):
            attn = block.attn
            q, k, v = attn.project_qkv(block.norm1(x), rope)  # (n, H, T, hd), (n, H_kv, T, hd) x 2
            kc, vc = self.k[i], self.v[i]  # (max_batch, H_kv, max_len, hd)
            kc[rows_flat, :, pos_flat] = k.transpose(1, 2)[valid]
            vc[rows_flat, :, pos_flat] = v.transpose(1, 2)[valid]
            mask = masks[attn.window]
            if uniform:
                y = attn.attend(q, k, v, mask=mask, is_causal=mask is None)
            else:
                y = attn.attend(q, kc[s0:s0 + n, :, :L], vc[s0:s0 + n, :, :L], mask=mask)
            x = block.attn_residual(x, attn.proj(y.transpose(1, 2).reshape(n, T, H * hd)))
            x = block.mlp_residual(x)
        for req in reqs:
            req.length = len(req.prompt)
        self.prefill_tokens += sum(lens_l)
        if pc.max_blocks > 0:
            for req in reqs:
                s, ids = req.slot, req.prompt
                if not self._prefix_cacheable(ids):
                    continue
                full = pc.chain(ids, len(ids) // bs)
                pc.insert(full, lambda j, s=s: (self.k[:, s, :, j * bs:(j + 1) * bs].clone(),
                                                self.v[:, s, :, j * bs:(j + 1) * bs].clone()))
        last = x[torch.arange(n, device=dev), lens - 1]
        return m.head(last)

    def _prefix_cacheable(self, ids: Sequence[int]) -> bool:
        """Whether a prompt's keys/values may come from / go to the prefix cache: not for a prompt beyond the
        original context of a model whose RoPE depends on the sequence length (longrope, dynamic NTK): its
        keys all use frequencies of its own length, unlike the same tokens' keys in another prompt."""
        if self.prefix_cache.max_blocks <= 0:
            return False
        orig = self.model.rope_original_len
        return orig is None or len(ids) <= orig

    def _recompute_long_rope(self, req: Request) -> torch.Tensor:
        """A longrope request passing the original context: recompute its slot's keys/values with the long
        factors over its whole sequence (the model's own cached forward) and return its next-token logits."""
        from llmkit.models.decoder import KVCache

        ids = req.prompt + req.output  # the cache holds all but the last token
        cache = KVCache(self.config, 1, len(ids), device=self.device, dtype=self.dtype, rolling=False)
        logits, _ = self.model(torch.tensor([ids], device=self.device), cache=cache)
        self.k[:, req.slot, :, :len(ids)] = cache.k[:, 0]
        self.v[:, req.slot, :, :len(ids)] = cache.v[:, 0]
        return logits[0, -1]

    def _decode(self) -> torch.Tensor:
        """One token for every running request at its own position. Returns logits (n, vocab).

        Up to `kernels.MAX_ROWS` rows of a fusable model go through one C call per layer (`kernels.fused`),
        the rest through `_decode_layers`.
        """
        m = self.model
        n = len(self.running)
        dev = self.device
        tokens = torch.tensor([r.last_token for r in self.running], device=dev)
        pos = torch.tensor([r.length for r in self.running], device=dev)
        seq_lens = [r.length + 1 for r in self.running]
        if self.fused is not None and n <= cpu_kernels.MAX_ROWS:
            # slot i is one block of max_len positions of the cache: block table row i = [i]
            table = torch.arange(n, device=dev)[:, None]
            logits = m.head(self.fused.decode_hidden(m, tokens, pos, seq_lens, self.k, self.v, table))
        else:
            logits = self._decode_layers(tokens, pos, seq_lens)
        for j, r in enumerate(self.running):
            if m.long_rope_crossing(r.length, 1):
                logits[j] = self._recompute_long_rope(r)
            r.length += 1
        self.decode_steps += 1
        return logits

    def _decode_layers(self, tokens: torch.Tensor, pos: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """The decode step's layers in PyTorch. Returns logits (n, vocab).

        Shapes: tokens/positions (n,); x (n, 1, d_model); q (n, H, 1, hd); keys read (n, H_kv, L, hd) with
        L = longest length + 1 and a keep-mask (n, 1, 1, L) of each row's valid keys.
        """
        m, cfg = self.model, self.config
        n = tokens.size(0)
        dev = self.device
        L = max(seq_lens)
        keys = torch.arange(L, device=dev)[None, :]
        masks = {None: (keys <= pos[:, None]).view(n, 1, 1, L)}  # keep-mask per sliding window
        for w in {b.attn.window for b in m.blocks} - {None}:
            masks[w] = masks[None] & (keys > pos[:, None] - w).view(n, 1, 1, L)
        rows = torch.arange(n, device=dev)
        x = m.embed(tokens)[:, None]
        rope = None
        if m.pos_emb is not None:
            x = x + m.pos_emb(pos)[:, None]
        else:
            cos, sin = m.rope_at(pos, seq_lens)
            rope = (cos[:, None, None], sin[:, None, None])  # (n, 1, 1, hd/2)
        H, hd = cfg.n_head, cfg.head_dim
        for i, block in enumerate(m.blocks):
            attn = block.attn
            q, k, v = attn.project_qkv(block.norm1(x), rope)  # (n, H, 1, hd), (n, H_kv, 1, hd) x 2
            kc, vc = self.k[i], self.v[i]  # (max_batch, H_kv, max_len, hd)
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            y = attn.attend(q, kc[:n, :, :L], vc[:n, :, :L], mask=masks[attn.window])
            x = block.attn_residual(x, attn.proj(y.transpose(1, 2).reshape(n, 1, H * hd)))
            x = block.mlp_residual(x)
        return m.head(x[:, 0])
