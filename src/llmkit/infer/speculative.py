"""Speculative decoding for llmkit decoders, batch 1: a cheap drafter proposes k tokens, the target model
checks them all in one forward pass, and every accepted token saves the target a forward pass of its own.

Methods implemented here:

* Verification and the sampling rule: Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via
  Speculative Decoding" (ICML), Algorithm 1; Chen et al. 2023, "Accelerating Large Language Model Decoding
  with Speculative Sampling" (arXiv:2302.01318), Algorithm 2. Draft token x (drawn from q) is accepted with
  probability min(1, p(x) / q(x)); on the first rejection the token is drawn from norm(max(0, p - q)) and
  the round ends; when all k are accepted one more token is drawn from the target's p. Each emitted token
  is then distributed exactly as p (`acceptance_probability`, `residual_distribution`, `accept_or_resample`).
  At temperature 0 (greedy) this is: keep the longest prefix of drafts equal to the target's argmax, then
  the target's own argmax, so the output equals plain greedy decoding token for token (up to the float
  summation order of a k+1-token forward against a 1-token one).
* `NGramDrafter`: prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; Hugging Face's
  ``prompt_lookup_num_tokens``): the most recent earlier occurrence of the last n tokens (n = max_ngram
  down to min_ngram) in prompt + output, and the tokens that followed it. No model, a deterministic proposal
  (q is a point mass, so a draft x is accepted with probability p(x)).
* `ModelDrafter`: a small decoder with the target's vocabulary and its own KV cache, proposing gamma tokens
  one at a time. `make_draft` builds one from the target itself: an INT8 copy (`llmkit.infer.quantize`,
  dynamic mode) or its first K layers with the target's final norm and head (LayerSkip's early exit,
  Elhoushi et al. 2024, without LayerSkip's training, so acceptance is lower on an ordinary checkpoint).

Both caches keep every position (``rolling=False``) and are rolled back with `KVCache.truncate` past the
first rejected draft. The target cache holds every accepted token but the last; each round feeds that last
token plus the k drafts (k + 1 positions), which yields the target's distribution after each of them.

`speculative_generate` returns the new tokens and a `SpecStats`; `stream_speculative` yields them as they
are accepted. `llmkit generate --speculative ngram|draft` runs the same code (docs/speculative.md).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from llmkit.infer.generate import SamplingParams, eos_set
from llmkit.models.decoder import Decoder, KVCache
from llmkit.sampling import filter_logits, mask_padded_vocab


@dataclass
class SpecStats:
    """Counters of one speculative generation (`speculative_generate` / `stream_speculative`)."""

    drafted: int = 0
    """Draft tokens proposed and checked by the target."""
    accepted: int = 0
    """Of those, the ones the target accepted."""
    generated: int = 0
    """Tokens emitted (accepted drafts plus the target's own token per round; without a stop id)."""
    target_forwards: int = 0
    """Forward passes of the target, the prompt's prefill included."""
    draft_forwards: int = 0
    """Forward passes of a draft model (0 for the n-gram drafter)."""

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """generated / target_forwards: 1.0 is plain decoding (the prefill yields the first token)."""
        return self.generated / self.target_forwards if self.target_forwards else 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["acceptance_rate"] = round(self.acceptance_rate, 4)
        d["tokens_per_forward"] = round(self.tokens_per_forward, 4)
        return d


# ------------------------------------------------------------------------------------------ sampling rule
def target_probs(logits: torch.Tensor, params: SamplingParams, vocab_limit: int | None = None) -> torch.Tensor:
    """The distribution the plain sampler (`llmkit.sampling.sample_next`) draws from: padded ids masked, logits
    / temperature, then top-k and top-p. logits (N, V) -> probabilities (N, V) float32. Temperature must be
    > 0 (greedy has no distribution to draw from)."""
    logits = mask_padded_vocab(logits.float().clone(), vocab_limit)
    return filter_logits(logits / params.temperature, params.top_k, params.top_p).softmax(-1)


def acceptance_probability(p: torch.Tensor, q: torch.Tensor | None, x: int) -> float:
    """min(1, p(x) / q(x)) for draft token x; p, q: (V,) probabilities, q None = a point mass on x (an n-gram
    draft), for which this is p(x). Leviathan et al. 2023, Algorithm 1."""
    px = float(p[x])
    qx = 1.0 if q is None else float(q[x])
    return 1.0 if px >= qx else px / qx


def residual_distribution(p: torch.Tensor, q: torch.Tensor | None, x: int) -> torch.Tensor:
    """norm(max(0, p - q)): what a rejected draft x is replaced by. (V,) -> (V,). q None = a point mass on x.

    When p <= q everywhere (p == q up to rounding) the residual is empty; then rejection has probability 0 in
    exact arithmetic, and p itself is returned."""
    if q is None:
        q = torch.zeros_like(p)
        q[x] = 1.0
    r = (p - q).clamp_min(0.0)
    total = r.sum()
    return r / total if float(total) > 0 else p


def accept_or_resample(p: torch.Tensor, q: torch.Tensor | None, x: int,
                       generator: torch.Generator | None = None) -> tuple[bool, int | None]:
    """One step of speculative sampling: (True, None) when draft x is accepted (probability
    `acceptance_probability`), else (False, y) with y drawn from `residual_distribution`. p, q: (V,)."""
    u = float(torch.rand((), generator=generator, device=p.device))
    if u < acceptance_probability(p, q, x):
        return True, None
    y = torch.multinomial(residual_distribution(p, q, x), 1, generator=generator)
    return False, int(y)


def verify(target_logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
           params: SamplingParams, generator: torch.Generator | None = None,
           vocab_limit: int | None = None) -> tuple[int, int]:
    """Check k drafts against the target: (number accepted n, the token that follows them).

    target_logits: (k + 1, V), row i the target's logits after the i-th draft (row 0: after the last
    accepted token); drafts: k ids; draft_probs: (k, V) the drafter's distributions (its `q`), or None for a
    deterministic drafter. Temperature 0: n is the longest prefix equal to the target's argmax and the token
    is the argmax after it. Otherwise the rejection rule (`accept_or_resample`), the extra token drawn from
    row k when all are accepted."""
    if params.temperature <= 0:
        best = mask_padded_vocab(target_logits.float().clone(), vocab_limit).argmax(-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == best[n]:
            n += 1
        return n, best[n]
    p = target_probs(target_logits, params, vocab_limit)
    for i, x in enumerate(drafts):
        ok, y = accept_or_resample(p[i], None if draft_probs is None else draft_probs[i], x, generator)
        if not ok:
            return i, y
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


# ---------------------------------------------------------------------------------------------- drafters
class Drafter:
    """Proposes draft tokens. `start(max_len)` before each sequence; `propose(ids, k, ...)` with the whole
    sequence so far (prompt + accepted output) returns (up to k ids, their (n, V) distributions q or None
    for a deterministic proposal)."""

    def start(self, max_len: int, stats: SpecStats | None = None) -> None:
        self.stats = stats

    def propose(self, ids: list[int], k: int, params: SamplingParams, generator: torch.Generator | None,
                vocab_limit: int | None) -> tuple[list[int], torch.Tensor | None]:
        raise NotImplementedError


class NGramDrafter(Drafter):
    """Prompt lookup decoding (Saxena 2023): for n = max_ngram .. min_ngram, find the most recent earlier
    occurrence of the last n tokens and propose the (up to k) tokens that followed it; nothing when no
    n-gram recurs (the round is then a plain decoding step). Defaults: max_ngram 3, min_ngram 1."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, ids, k, params=None, generator=None, vocab_limit=None):
        return lookup(ids, k, self.max_ngram, self.min_ngram), None


def lookup(ids: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """The up to k tokens after the most recent earlier occurrence of ids' last n tokens, trying n from
    max_ngram down to min_ngram; [] when none recurs (or k <= 0)."""
    L = len(ids)
    if k <= 0:
        return []
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        tail = ids[L - n:]
        last = tail[-1]
        # an occurrence ending at i + n - 1 <= L - 2 leaves at least one token after it
        for i in range(L - n - 1, -1, -1):
            if ids[i + n - 1] == last and ids[i:i + n] == tail:
                return ids[i + n:i + n + k]
    return []


class ModelDrafter(Drafter):
    """A draft decoder with its own KV cache (`rolling=False`), proposing k tokens one at a time: greedy at
    temperature 0, else drawn from its own distribution q processed like the target's (temperature, top-k,
    top-p). Between rounds its cache is truncated to the longest prefix it shares with the accepted sequence,
    so rejected drafts are dropped and only the new tokens are fed. The draft must have the target's
    vocabulary (same ids; its vocab_size is checked against the target's in `stream_speculative`)."""

    def __init__(self, model: Decoder, min_confidence: float = 0.0):
        if not 0.0 <= min_confidence < 1.0:
            raise ValueError(f"min_confidence: must be in [0, 1), got {min_confidence}")
        self.model = model
        self.min_confidence = min_confidence
        """Stop drafting at the first token whose draft probability is below this (Kangaroo's second early
        exit): a draft the model is unsure of is likely rejected and would cost a draft forward for nothing."""
        self.cache: KVCache | None = None
        self.cached: list[int] = []

    def start(self, max_len: int, stats: SpecStats | None = None) -> None:
        super().start(max_len, stats)
        p = next(self.model.parameters())
        self.cache = KVCache(self.model.config, 1, max_len=self.model.num_prefix_tokens + max_len,
                             device=p.device, dtype=_cache_dtype(self.model), rolling=False)
        self.cached = []

    def _forward(self, ids: list[int]) -> torch.Tensor:
        device = self.cache.k.device
        logits, _ = self.model(torch.tensor([ids], device=device), cache=self.cache)
        if self.stats is not None:
            self.stats.draft_forwards += 1
        return logits[0, -1:]

    @torch.no_grad()
    def propose(self, ids, k, params, generator=None, vocab_limit=None):
        if k <= 0:
            return [], None
        common = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # feed at least the last token: its logits are needed
        self.cache.truncate(self.cache.prefix_len + common)
        logits = self._forward(ids[common:])
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        for j in range(k):
            if params.temperature <= 0:
                masked = mask_padded_vocab(logits.float().clone(), vocab_limit)[0]
                x = int(masked.argmax())
                confidence = float(torch.softmax(masked, -1)[x]) if self.min_confidence else 1.0
            else:
                q = target_probs(logits, params, vocab_limit)[0]
                x = int(torch.multinomial(q, 1, generator=generator))
                confidence = float(q.max())
            if confidence < self.min_confidence:
                self.cached = list(ids) + drafts  # every draft so far was fed
                return drafts, (torch.stack(qs) if qs else None)
            if params.temperature > 0:
                qs.append(q)
            drafts.append(x)
            if j < k - 1:
                logits = self._forward([x])
        self.cached = list(ids) + drafts[:-1]  # the last draft was not fed
        return drafts, (torch.stack(qs) if qs else None)


def _cache_dtype(model: Decoder) -> torch.dtype:
    """The dtype of the activations: the embedding's (an INT8 model keeps fp32 embeddings and norms)."""
    return model.tok_emb.weight.dtype


class SubsetHead(torch.nn.Module):
    """An LM head over a subset of the vocabulary: logits (..., vocab) with -inf outside `ids`, computed with
    only those rows of the weight (len(ids) x d instead of vocab x d). A draft with it proposes only those
    tokens (FR-Spec, Zhao et al. 2025: the most frequent ones); the target's verification is unchanged."""

    def __init__(self, head: torch.nn.Linear, ids: torch.Tensor, vocab: int):
        super().__init__()
        ids = ids.to(head.weight.device)
        # column-major (len(ids), d), as `llmkit.models.layout` stores decoding weights: a faster GEMV on CPU
        self.weight = torch.nn.Parameter(head.weight.detach()[ids].t().contiguous().t(), requires_grad=False)
        self.bias = None if head.bias is None else torch.nn.Parameter(head.bias.detach()[ids].clone(),
                                                                     requires_grad=False)
        self.register_buffer("ids", ids)
        self.vocab = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = torch.nn.functional.linear(x, self.weight, self.bias)
        out = sub.new_full((*sub.shape[:-1], self.vocab), float("-inf"))
        return out.index_copy_(-1, self.ids, sub)


def make_draft(target: Decoder, kind: str = "int8", layers: int | None = None,
               exit_adapter: torch.nn.Module | None = None, draft_vocab: torch.Tensor | None = None) -> Decoder:
    """A draft model built from `target` (eval mode).

    kind "int8": a deep copy with every block Linear dynamically quantized to INT8
    (`llmkit.infer.quantize.quantize_model`); proposals agree with the target's almost always, and the copy
    reads about a quarter of the target's Linear bytes (more memory: the INT8 weights beside the fp32 ones).
    kind "layers": the target's first `layers` blocks, then its final norm and head (LayerSkip-style early
    exit, Elhoushi et al. 2024); the modules are shared, not copied (no extra memory), and its cost is
    layers / n_layer of the target's blocks. Without LayerSkip's early-exit training the shallow exit agrees
    with the target less often. `exit_adapter` (kind "layers"): a trained block run after the first K
    (`llmkit.distill.exit_adapter`, Kangaroo), which brings the exit much closer to the last layer;
    `draft_vocab` (token ids): its head computes only those rows (`SubsetHead`, FR-Spec), the rest never drafted."""
    if kind == "int8":
        from llmkit.infer.quantize import QuantConfig, quantize_model

        return quantize_model(copy.deepcopy(target), QuantConfig(mode="dynamic")).eval()
    if kind == "layers":
        n = target.config.n_layer
        if layers is None or not 1 <= layers <= n:
            raise ValueError(f"layers: need 1..{n} for kind 'layers', got {layers}")
        draft = copy.copy(target)
        # a shallow copy shares the module tables: give the draft its own, holding the same modules
        draft._modules = dict(target._modules)
        draft._parameters = dict(target._parameters)
        draft._buffers = dict(target._buffers)
        blocks = list(target.blocks)[:layers]
        c = target.config
        types = None if c.layer_types is None else c.layer_types[:layers]
        if exit_adapter is not None:  # a block of the last layer's kind (its copy, trained)
            blocks.append(exit_adapter)
            types = None if types is None else [*types, c.layer_types[-1]]
        draft.blocks = torch.nn.ModuleList(blocks)
        draft.config = dataclasses.replace(c, n_layer=len(blocks), layer_types=types)
        if draft_vocab is not None:
            draft.lm_head = SubsetHead(target.lm_head, draft_vocab, c.vocab_size)
        return draft.eval()
    raise ValueError(f"kind: 'int8' or 'layers', got {kind!r}")


# ------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def stream_speculative(target: Decoder, prompt_ids: list[int], params: SamplingParams, drafter: Drafter,
                       num_draft: int = 4, eos_id: int | Iterable[int] | None = None,
                       vocab_limit: int | None = None, stats: SpecStats | None = None) -> Iterator[int]:
    """Yield new token ids as rounds accept them, with `stream_tokens`' contract (max_new_tokens, stop at any
    of `eos_id` with ``params.stop_at_eos``, the stop id not yielded, the prompt cut to its last block_size - 1
    tokens, ids >= vocab_limit never produced).

    Each round asks `drafter` for up to `num_draft` (default 4) tokens (fewer near the end of the budget),
    runs the target once over the last accepted token + those drafts, keeps the accepted prefix (`verify`)
    plus one token of the target's, and truncates the target's cache past it. `stats` (a `SpecStats`) is
    filled in as it goes. Sampling draws from one torch.Generator seeded with ``params.seed`` (the global RNG
    when None): repeatable, and distributed as plain sampling, though not the same draws."""
    if not isinstance(target, Decoder):
        raise ValueError(f"speculative decoding runs decoder-only models, got {type(target).__name__}")
    if num_draft < 0:
        raise ValueError(f"num_draft: must be >= 0, got {num_draft}")
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token (e.g. the BOS token)")
    draft_model = getattr(drafter, "model", None)
    if draft_model is not None and draft_model.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocab_size {draft_model.config.vocab_size} != target's "
                         f"{target.config.vocab_size}: the draft must share the target's tokenizer")
    stats = stats if stats is not None else SpecStats()
    stops = eos_set(eos_id) if params.stop_at_eos else frozenset()
    device = next(target.parameters()).device
    block = target.config.block_size
    ids = list(prompt_ids[-(block - 1):])
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(params.seed)
    budget = min(params.max_new_tokens, block - len(ids))
    if budget <= 0:
        return
    # every position a round can write stays below len(prompt) + budget (k <= remaining - 1)
    max_len = len(ids) + budget
    cache = KVCache(target.config, batch_size=1, max_len=target.num_prefix_tokens + max_len, device=device,
                    dtype=_cache_dtype(target), rolling=False)
    drafter.start(max_len, stats)
    if len(ids) > 1:  # the cache holds every token but the last, which each round feeds
        target(torch.tensor([ids[:-1]], device=device), cache=cache)
        stats.target_forwards += 1
    produced = 0
    while produced < budget:
        k = min(num_draft, budget - produced - 1)
        drafts, q = drafter.propose(ids, k, params, gen, vocab_limit) if k > 0 else ([], None)
        drafts = drafts[:k]
        logits, _ = target(torch.tensor([[ids[-1], *drafts]], device=device), cache=cache)
        stats.target_forwards += 1
        n, nxt = verify(logits[0], drafts, None if q is None else q[:len(drafts)], params, gen, vocab_limit)
        stats.drafted += len(drafts)
        stats.accepted += n
        # the cache now holds ids + drafts; keep ids + the n accepted drafts (nxt is fed next round)
        cache.truncate(cache.prefix_len + len(ids) + n)
        for t in (*drafts[:n], nxt):
            if t in stops:
                return
            ids.append(t)
            produced += 1
            stats.generated += 1
            yield t


def speculative_generate(target: Decoder, prompt_ids: list[int], params: SamplingParams,
                         drafter: Drafter | None = None, num_draft: int = 4,
                         eos_id: int | Iterable[int] | None = None,
                         vocab_limit: int | None = None) -> tuple[list[int], SpecStats]:
    """(new token ids, `SpecStats`) of `stream_speculative`; drafter default: `NGramDrafter()`."""
    stats = SpecStats()
    out = list(stream_speculative(target, prompt_ids, params, drafter or NGramDrafter(), num_draft, eos_id,
                                  vocab_limit, stats))
    return out, stats


def drafter_from_config(kind: str, target: Decoder, draft_model: str | None = None,
                        device: str | torch.device = "cpu", dtype: str = "auto", min_confidence: float = 0.0,
                        target_dir: str | None = None) -> Drafter:
    """The drafter `llmkit generate --speculative KIND [--draft-model SPEC] [--draft-confidence C]` uses.

    kind "ngram": `NGramDrafter()`. kind "draft": `ModelDrafter` of `draft_model`, which is a model directory
    (or registry URI) loaded like the target, "int8" (the default: `make_draft(target, "int8")`),
    "layers:K" (`make_draft(target, "layers", K)`) or "exit:DIR" (the first K layers and the exit adapter
    `llmkit distill-exit` wrote to DIR; with `target_dir`, the adapter must have been trained on its weights).
    min_confidence: see `ModelDrafter`."""
    if kind == "ngram":
        return NGramDrafter()
    if kind != "draft":
        raise ValueError(f"speculative: 'ngram' or 'draft', got {kind!r}")
    spec = draft_model or "int8"
    if spec == "int8":
        return ModelDrafter(make_draft(target, "int8"), min_confidence)
    if spec.startswith("layers:"):
        return ModelDrafter(make_draft(target, "layers", int(spec.split(":", 1)[1])), min_confidence)
    if spec.startswith("exit:"):
        from llmkit.infer.exit_draft import load_exit_adapter
        from llmkit.models.layout import column_major_linears

        adapter, layers, draft_vocab = load_exit_adapter(target, spec.split(":", 1)[1], target_dir)
        if next(target.parameters()).device.type == "cpu":
            column_major_linears(adapter)  # the layout `load_for_inference` gives the target's own blocks
        draft = make_draft(target, "layers", layers, exit_adapter=adapter, draft_vocab=draft_vocab)
        return ModelDrafter(draft, min_confidence)
    from llmkit.infer.load import load_for_inference

    model, _, _ = load_for_inference(spec, None, device, dtype)
    return ModelDrafter(model.eval(), min_confidence)
