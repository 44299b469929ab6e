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

Per request: max_new_tokens, temperature (0 = greedy), top_k, top_p, seed (a per-request
`torch.Generator`, so the same seed gives the same tokens whatever else is in the batch), stop token ids
and EOS (neither is emitted). Tokens go to an optional per-request callback and to `Engine.stream`.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmkit.infer.generate import SamplingParams
from llmkit.infer.sampling import sample_next
from llmkit.models.decoder import Decoder, KVCache
from llmkit.models.layers import apply_rope


@dataclass
class RequestParams(SamplingParams):
    """`SamplingParams` plus stop token ids (generation ends at any of them; the stop token is not emitted).

    Any object with the `SamplingParams` attributes is accepted by the engine; `stop_token_ids` is optional.
    """

    stop_token_ids: tuple[int, ...] = ()


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
    """'length', 'stop' (EOS or a stop id) or 'cancelled'."""
    cached_tokens: int = 0
    """Prompt tokens whose keys/values came from the prefix cache."""


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


class Engine:
    """Continuous-batching generation over an llmkit `Decoder`.

    model: a plain `Decoder` (GPT-2 or Llama style, any n_kv_head); prefix-tuned models are refused.
    tokenizer: optional, only for its `eos_id` (or pass `eos_id`).
    max_batch: cache slots = most requests decoding together; later requests wait in a queue.
    max_len: cache positions per slot (prompt + new tokens); None -> the model's block_size.
    prefix_cache_tokens: prefix-cache budget in tokens (0 disables it); prefix_block: tokens per block.

    KV memory is 2 * n_layer * max_batch * H_kv * max_len * head_dim elements in the model's dtype.
    """

    def __init__(self, model: Decoder, tokenizer=None, max_batch: int = 16, max_len: int | None = None,
                 prefix_cache_tokens: int = 2048, prefix_block: int = 16, eos_id: int | None = None):
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
        shape = (cfg.n_layer, max_batch, cfg.kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
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
        self.requests[rid] = req
        if budget <= 0:
            req.finished, req.finish_reason = True, "length"
        else:
            self.waiting.append(req)
        return rid

    def cancel(self, request_id: str) -> None:
        """Stop a request now: it leaves the queue or the batch and its cache slot is free at once."""
        req = self.requests[request_id]
        if req.finished:
            return
        if req.slot >= 0:
            self._free(req)
        else:
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
            req = self.waiting.popleft()
            logits = self._prefill(req)  # (1, vocab)
            self._sample_all([req], logits, emitted)
        return emitted

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
        """Pick each row's token with its own params/generator, emit it, and retire finished requests."""
        greedy = logits.argmax(-1).tolist()
        done = []
        for i, req in enumerate(reqs):
            p = req.params
            if p.temperature <= 0:
                t = greedy[i]
            else:
                t = int(sample_next(logits[i:i + 1], p.temperature, p.top_k, p.top_p, req.generator).item())
            stops = getattr(p, "stop_token_ids", None) or ()
            if (p.stop_at_eos and self.eos_id is not None and t == self.eos_id) or t in stops:
                req.finish_reason = "stop"
                done.append(req)
                continue
            req.output.append(t)
            req.last_token = t
            emitted[req.request_id] = t
            if req.on_token is not None:
                req.on_token(req.request_id, t)
            if len(req.output) >= req.budget:
                req.finish_reason = "length"
                done.append(req)
        for req in sorted(done, key=lambda r: -r.slot):  # last slots first: fewer moves
            self._free(req)
            req.finished = True

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
        """Put req in a free slot, reuse cached prefix blocks, run the rest of the prompt through the model's
        own blocks (writing the slot's keys/values). Returns the last position's logits, (1, vocab)."""
        s = len(self.running)
        req.slot = s
        self.running.append(req)
        ids, pc = req.prompt, self.prefix_cache
        bs = pc.block_size
        start = 0
        if pc.max_blocks > 0:
            chain = pc.chain(ids, (len(ids) - 1) // bs)  # keep >= 1 token to compute logits from
            for j, b in enumerate(pc.lookup(chain)):
                self.k[:, s, :, j * bs:(j + 1) * bs] = b.k
                self.v[:, s, :, j * bs:(j + 1) * bs] = b.v
                start = (j + 1) * bs
        req.cached_tokens = start
        new = ids[start:]
        T = len(new)
        cache = KVCache.__new__(KVCache)  # a view of this slot: the model's blocks write into self.k/self.v
        cache.k, cache.v = self.k[:, s:s + 1], self.v[:, s:s + 1]
        cache.length, cache.prefix_len = start, 0
        m = self.model
        idx = torch.tensor([new], device=self.device)
        x = m.tok_emb(idx)
        rope = None
        if m.pos_emb is not None:
            x = x + m.pos_emb(torch.arange(start, start + T, device=self.device))
        else:
            rope = (m.rope_cos[start:start + T], m.rope_sin[start:start + T])
        for i, block in enumerate(m.blocks):
            x = block(x, rope, cache, i)
        req.length = len(ids)
        self.prefill_tokens += T
        if pc.max_blocks > 0:
            full = pc.chain(ids, len(ids) // bs)
            pc.insert(full, lambda j: (self.k[:, s, :, j * bs:(j + 1) * bs].clone(),
                                       self.v[:, s, :, j * bs:(j + 1) * bs].clone()))
        return m.lm_head(m.norm_f(x[:, -1]))

    def _decode(self) -> torch.Tensor:
        """One token for every running request at its own position. Returns logits (n, vocab).

        Shapes: tokens/positions (n,); x (n, 1, d_model); q (n, H, 1, hd); keys read (n, H_kv, L, hd) with
        L = longest length + 1 and a keep-mask (n, 1, 1, L) of each row's valid keys.
        """
        m, cfg = self.model, self.config
        n = len(self.running)
        dev = self.device
        tokens = torch.tensor([r.last_token for r in self.running], device=dev)
        pos = torch.tensor([r.length for r in self.running], device=dev)
        L = int(max(r.length for r in self.running)) + 1
        mask = (torch.arange(L, device=dev)[None, :] <= pos[:, None]).view(n, 1, 1, L)
        rows = torch.arange(n, device=dev)
        x = m.tok_emb(tokens)[:, None]
        rope = None
        if m.pos_emb is not None:
            x = x + m.pos_emb(pos)[:, None]
        else:
            rope = (m.rope_cos[pos][:, None, None], m.rope_sin[pos][:, None, None])  # (n, 1, 1, hd/2)
        H, Hkv, hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        for i, block in enumerate(m.blocks):
            attn = block.attn
            h = block.norm1(x)
            q, k, v = attn.qkv(h).split((H * hd, Hkv * hd, Hkv * hd), dim=2)
            q = q.view(n, 1, H, hd).transpose(1, 2)  # (n, H, 1, hd)
            k = k.view(n, Hkv, hd)
            v = v.view(n, Hkv, hd)
            if rope is not None:
                q = apply_rope(q, *rope)
                k = apply_rope(k[:, :, None], *rope)[:, :, 0]
            kc, vc = self.k[i], self.v[i]  # (max_batch, H_kv, max_len, hd)
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            y = F.scaled_dot_product_attention(q, kc[:n, :, :L], vc[:n, :, :L], attn_mask=mask,
                                               scale=attn.scale, enable_gqa=Hkv != H)
            x = x + attn.proj(y.transpose(1, 2).reshape(n, 1, H * hd))
            x = x + block.mlp(block.norm2(x))
        for r in self.running:
            r.length += 1
        self.decode_steps += 1
        return m.lm_head(m.norm_f(x[:, 0]))
