"""Grammar-constrained decoding: per-token masks from a grammar over the raw bytes of a tokenizer's tokens.

The grammar engine is llguidance (PyPI ``llguidance``, Microsoft's Rust engine behind Guidance; the choice
against xgrammar and outlines-core is measured in docs/serve.md, "Structured output"). It walks a grammar
(JSON schema, regular expression or Lark context-free grammar, which may embed JSON schemas with
``%json{...}``) over a trie of the tokens' bytes and returns, per step, the bitmask of tokens that keep the
output a prefix of a sentence of the grammar.

Vocabulary: every token is reduced to the exact bytes it adds to the output (`ByteVocab.from_tokenizer`), so
the same code serves llmkit's byte-level BPE, Hugging Face byte-level tokenizers (GPT-2 / Llama-3 / Qwen /
SmolLM2), SentencePiece-style tokenizers with byte fallback (``▁`` for spaces, ``<0xNN>`` pieces: what
`llmkit import gguf` rebuilds for llama-type GGUF files) and character-level tokenizers. Special tokens
(BOS, EOS, chat markers) are never text: the grammar never allows them; the engine decides on end tokens
itself (`Matcher.fill_mask` ``end_ids``), allowed only where the grammar may end.

Public API (kept stable for the server and tool calling):

* `compile_json_schema(tok, schema)`, `compile_json_object(tok)`, `compile_regex(tok, pattern)`,
  `compile_grammar(tok, source)` (llguidance's Lark dialect, or a llama.cpp GBNF grammar),
  `compile_tagged_json(tok, begin, schemas, end, min_items, max_items, separator)`: each returns a
  `Grammar`, cached per (tokenizer, kind, source) in an LRU (`cache_info`, `clear_cache`), with its
  compile time in `Grammar.compile_ms`.
* `Grammar.matcher()`: a fresh per-request `Matcher` (`fill_mask` / `allowed_mask`, `accept`, `can_end`,
  `is_finished`, `rollback`).
* `ConstraintError` (a ValueError): an unsupported or unsatisfiable schema / pattern / grammar, its message
  naming the construct (``"$ref to a remote URL ... at /properties/x"``, ``"pattern with lookahead ..."``,
  ``"unsupported JSON schema keyword(s) uniqueItems"``, ``"unsatisfiable schema: ..."``).

JSON output is compact-but-readable: ``{"a": 1, "b": [1, 2]}`` (item separator ", ", key separator ": ", no
other whitespace). Flexible whitespace would let a small model pad forever with newlines and spaces (a known
failure of guided JSON) and costs tokens; the fixed separators are the ones ``json.dumps`` writes, which is
what models see most.
"""

from __future__ import annotations

import json
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmkit.tokenizer import byte_level_decoder

try:  # a declared dependency; imported lazily-failing so that `import llmkit.infer` never breaks without it
    import llguidance as _llg
    from llguidance.gbnf_to_lark import any_to_lark as _any_to_lark
except ImportError:  # pragma: no cover - exercised only on a broken install
    _llg = None

__all__ = [
    "ByteVocab",
    "ConstraintError",
    "Grammar",
    "Matcher",
    "cache_info",
    "clear_cache",
    "compile_grammar",
    "compile_json_object",
    "compile_json_schema",
    "compile_regex",
    "compile_tagged_json",
    "JSON_OPTIONS",
]

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance JSON compile options used for every schema: fixed separators, no free whitespace (module doc)."""

CACHE_SIZE = 256
"""Most compiled grammars kept (least recently used dropped first)."""


class ConstraintError(ValueError):
    """A schema, pattern or grammar that cannot constrain decoding: unsupported construct, syntax error, or
    unsatisfiable (no output can match). The message names the construct and, for schemas, where it is
    (a JSON pointer)."""


# ---------------------------------------------------------------------------------------------- vocabulary
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_steps(decoder: dict | None) -> list[dict]:
    """A tokenizer.json decoder as a flat list of steps (a Sequence decoder unrolled)."""
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [s for d in decoder.get("decoders", []) for s in _decoder_steps(d)]
    return [decoder]


@dataclass
class ByteVocab:
    """A vocabulary as the grammar engine sees it.

    tokens: tokens[i] = the bytes token i adds to the output (b"" for ids without a token).
    special_ids: ids that are never text (control tokens, holes): the grammar never allows them.
    eos_ids: the tokenizer's end-of-sequence ids (special too).
    encode: text -> ids (the tokenizer's own encoding; llguidance uses it only for forced-token look-ahead);
    None -> greedy longest match over `tokens`.
    """

    tokens: list[bytes]
    special_ids: list[int] = field(default_factory=list)
    eos_ids: list[int] = field(default_factory=list)
    encode: Callable[[str], list[int]] | None = None
    _ll: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ByteVocab:
        """From an llmkit `Tokenizer`, a `tokenizers.Tokenizer`, or a transformers fast tokenizer.

        Each token's bytes come from its vocabulary piece through the tokenizer's decoder steps, one token at
        a time: ByteLevel -> GPT-2's byte map; ByteFallback -> ``<0xNN>`` is byte NN; Replace (``▁`` -> " ")
        and Metaspace -> spaces; WordPiece -> ``##`` continuation prefix dropped; no decoder (character
        level) -> the piece's UTF-8. Strip / Fuse steps act on the whole text, not on tokens, and are not
        applied (so a SentencePiece output starting with a space shows it; JSON never starts with one)."""
        backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "backend_tokenizer", None) or tokenizer
        if not hasattr(backend, "to_str"):
            raise TypeError(f"no tokenizers.Tokenizer inside {type(tokenizer).__name__}")
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        steps = _decoder_steps(spec.get("decoder"))
        kinds = {s.get("type") for s in steps}
        byte_level = "ByteLevel" in kinds
        byte_fallback = "ByteFallback" in kinds or bool(model.get("byte_fallback"))
        replaces = [(s["pattern"]["String"], s["content"]) for s in steps
                    if s.get("type") == "Replace" and "String" in (s.get("pattern") or {})]
        for s in steps:
            if s.get("type") == "Metaspace":
                replaces.append((s.get("replacement", "▁"), " "))
        wp_prefix = next((s.get("prefix", "##") for s in steps if s.get("type") == "WordPiece"), None)
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        n = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
        dec = byte_level_decoder()
        tokens, special = [b""] * n, []
        for i in range(n):
            a = added.get(i)
            if a is not None:
                tokens[i] = a.content.encode("utf-8")
                if a.special:
                    special.append(i)
                continue
            piece = backend.id_to_token(i)
            if piece is None:
                special.append(i)  # a hole in the ids: never allowed
                continue
            if byte_level and all(c in dec for c in piece):
                tokens[i] = bytes(dec[c] for c in piece)
            elif byte_fallback and (m := _BYTE_PIECE.fullmatch(piece)):
                tokens[i] = bytes([int(m.group(1), 16)])
            else:
                if wp_prefix and piece.startswith(wp_prefix):
                    piece = piece[len(wp_prefix):]
                for old, new in replaces:
                    piece = piece.replace(old, new)
                tokens[i] = piece.encode("utf-8")
        eos = getattr(tokenizer, "eos_ids", None) or getattr(tokenizer, "eos_id", None)
        if eos is None:
            eos_ids = []
        else:
            eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple, set, frozenset)) else [eos])]
        special = sorted(set(special) | {e for e in eos_ids if 0 <= e < n})

        def encode(text: str) -> list[int]:
            return backend.encode(text, add_special_tokens=False).ids

        return cls(tokens, special, sorted(set(eos_ids)), encode)

    def _greedy(self, text: str) -> list[int]:
        """Greedy longest-match encoding over the byte table (for vocabularies without a tokenizer)."""
        data, out, i = text.encode("utf-8"), [], 0
        by_bytes: dict[bytes, int] = {}
        for tid, b in enumerate(self.tokens):
            if b and tid not in self.special_ids:
                by_bytes.setdefault(b, tid)
        longest = max((len(b) for b in by_bytes), default=1)
        while i < len(data):
            for n in range(min(longest, len(data) - i), 0, -1):
                tid = by_bytes.get(data[i:i + n])
                if tid is not None:
                    out.append(tid)
                    i += n
                    break
            else:
                i += 1  # a byte no token holds: skipped (llguidance only uses this as a hint)
        return out

    def ll_tokenizer(self):
        """The llguidance `LLTokenizer` over this vocabulary (built once: ~0.1 s for 49k tokens)."""
        if self._ll is None:
            _require_llguidance()
            vocab = self
            encode = self.encode or self._greedy
            eos = self.eos_ids[0] if self.eos_ids else (self.special_ids[0] if self.special_ids else 0)

            class _Wrapped:  # the duck type llguidance.TokenizerWrapper reads
                eos_token_id = eos
                bos_token_id = None
                tokens = vocab.tokens
                special_token_ids = vocab.special_ids

                def __call__(self, s: bytes | str) -> list[int]:
                    return encode(s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s)

            self._ll = _llg.LLTokenizer(_llg.TokenizerWrapper(_Wrapped()), n_vocab=len(self.tokens))
        return self._ll


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_VOCABS_BY_ID: dict[int, tuple[Any, ByteVocab]] = {}  # tokenizers that cannot be weakly referenced
_LOCK = threading.RLock()


def vocab_of(tokenizer) -> ByteVocab:
    """The `ByteVocab` of a tokenizer, built once per tokenizer object (a `ByteVocab` is returned as is)."""
    if isinstance(tokenizer, ByteVocab):
        return tokenizer
    with _LOCK:
        try:
            v = _VOCABS.get(tokenizer)
        except TypeError:
            hit = _VOCABS_BY_ID.get(id(tokenizer))
            v = hit[1] if hit is not None and hit[0] is tokenizer else None
        if v is None:
            v = ByteVocab.from_tokenizer(tokenizer)
            try:
                _VOCABS[tokenizer] = v
            except TypeError:
                _VOCABS_BY_ID[id(tokenizer)] = (tokenizer, v)
        return v


def _require_llguidance() -> None:
    if _llg is None:
        raise ConstraintError("structured output needs the llguidance package (pip install llguidance)")


# ---------------------------------------------------------------------------------------------- matcher
def bitmask_to_bool(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask (..., ceil(n/32)) (bit j of word w = token 32*w + j) -> bool (..., vocab_size); ids past
    the bitmask are False. numpy's unpackbits: little-endian words read as bytes, least significant bit
    first, are exactly token order (and it runs in ~10 us for 49k tokens, without torch's thread pool)."""
    arr = words.contiguous().numpy().view(np.uint8)
    bits = np.unpackbits(arr, axis=-1, bitorder="little").view(np.bool_)
    n = bits.shape[-1]
    if n >= vocab_size:
        return torch.from_numpy(bits[..., :vocab_size].copy())
    out = np.zeros((*bits.shape[:-1], vocab_size), dtype=np.bool_)
    out[..., :n] = bits
    return torch.from_numpy(out)


class Matcher:
    """One request's position in a `Grammar`. Not thread-safe: one per request, driven by the sampler.

    Protocol per decoding step: `fill_mask` / `allowed_mask` (which tokens may come next), sample, then
    `accept(token)`. `can_end()` says the output so far is a complete sentence of the grammar (EOS may
    come); `is_finished()` that no token at all may follow (the request is complete).
    """

    def __init__(self, grammar: Grammar, ll):
        self.grammar = grammar
        self._m = ll
        self.n_accepted = 0
        self._eos = [e for e in grammar.vocab.eos_ids if e < grammar.vocab_size]
        if not self._eos and grammar.vocab.special_ids:
            self._eos = [grammar.vocab.special_ids[0]]  # what ll_tokenizer() declared as EOS
        # EOS ends the output, it is never part of it (other special tokens: where a grammar names them,
        # e.g. a tool-call tag that is a special token)
        self._never = frozenset(self._eos)

    @property
    def vocab_size(self) -> int:
        return self.grammar.vocab_size

    def fill_mask(self, bitmask: torch.Tensor, row: int = 0, end_ids: Iterable[int] = ()) -> None:
        """Write the allowed next tokens into row `row` of an int32 bitmask (B, ceil(vocab_size/32)) (CPU,
        contiguous): bit set = allowed. End tokens (`end_ids`, e.g. EOS and stop ids) are set exactly when
        `can_end()`; llguidance's own EOS bit is cleared first, so the caller alone decides what ends."""
        v = bitmask[row]
        if not (bitmask.dtype == torch.int32 and v.is_contiguous() and v.device.type == "cpu"):
            raise ValueError("bitmask: a contiguous int32 CPU tensor (B, ceil(vocab/32))")
        if v.numel() * 32 < self.vocab_size:
            raise ValueError(f"bitmask row of {v.numel()} words is too short for {self.vocab_size} tokens")
        n_words = -(-self.vocab_size // 32)
        v[n_words:] = 0  # a wider row (padded logits): ids past the grammar's vocabulary are no tokens
        self._m.unsafe_compute_mask_ptr(v.data_ptr(), n_words * 4)
        bits = v.numpy().view(np.uint32)  # the same memory, unsigned: bit 31 needs no sign games
        for e in self._eos:
            bits[e // 32] &= np.uint32(~(1 << (e % 32)) & 0xFFFFFFFF)
        if self.can_end():
            for e in end_ids:
                if 0 <= e < bits.size * 32:
                    bits[e // 32] |= np.uint32(1 << (e % 32))

    def allowed_mask(self, vocab_size: int | None = None, end_ids: Iterable[int] = ()) -> torch.Tensor:
        """bool (vocab_size,) of the tokens allowed next (default size: the grammar's vocabulary; logits of
        a padded embedding are wider: those extra ids are False). `end_ids` as in `fill_mask`."""
        vocab_size = self.vocab_size if vocab_size is None else vocab_size
        words = torch.zeros(1, -(-max(vocab_size, self.vocab_size) // 32), dtype=torch.int32)
        self.fill_mask(words, 0, [e for e in end_ids if e < vocab_size])
        return bitmask_to_bool(words[0], vocab_size)

    def accept(self, token_id: int) -> bool:
        """Advance over one emitted token. False (and the state unchanged) when the grammar does not allow
        it here; an end token is never accepted (end of output is the caller's business)."""
        if token_id in self._never or self._m.is_error() or self._m.validate_tokens([int(token_id)]) != 1:
            return False
        ok = self._m.consume_token(int(token_id))
        self.n_accepted += int(ok)
        return ok

    def can_end(self) -> bool:
        """The output so far is a whole sentence of the grammar: it may end here."""
        return not self._m.is_error() and self._m.is_accepting()

    def is_finished(self) -> bool:
        """No further token is possible (the grammar is complete): the request should stop."""
        return not self._m.is_error() and self._m.is_stopped()

    def rollback(self, n_tokens: int) -> bool:
        """Undo the last `n_tokens` accepted tokens (speculative decoding, stop-string trimming)."""
        if n_tokens > self.n_accepted:
            return False
        ok = self._m.rollback(n_tokens)
        if ok:
            self.n_accepted -= n_tokens
        return ok

    def reset(self) -> None:
        """Back to the start of the grammar."""
        self._m.reset()
        self.n_accepted = 0

    @property
    def error(self) -> str | None:
        """The engine's error message once the matcher is in an error state, else None."""
        return self._m.get_error() or None if self._m.is_error() else None


# ---------------------------------------------------------------------------------------------- grammar
@dataclass
class Grammar:
    """A compiled constraint over one vocabulary. Immutable and shareable between requests and threads;
    each request drives its own `matcher()`.

    kind: "json_schema", "json_object", "regex", "grammar" or "tagged_json"; source: what it was compiled
    from (canonical text); compile_ms: wall time of the compile (ms), measured once (cache hits reuse it).
    """

    kind: str
    source: str
    vocab: ByteVocab
    compile_ms: float
    _proto: Any = field(repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the grammar (a copy of the compiled prototype: no recompile)."""
        with _LOCK:  # deep_copy reads the prototype, which other threads copy too
            return Matcher(self, self._proto.deep_copy())


_CACHE: OrderedDict[tuple, Grammar] = OrderedDict()
_STATS = {"hits": 0, "misses": 0, "compile_ms_total": 0.0}


def cache_info() -> dict[str, float]:
    """{hits, misses, size, compile_ms_total} of the grammar cache since start (or `clear_cache`)."""
    with _LOCK:
        return {**_STATS, "size": len(_CACHE)}


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
        _STATS.update(hits=0, misses=0, compile_ms_total=0.0)


def _compile(tokenizer, kind: str, source: str, ll_grammar: Callable[[], str]) -> Grammar:
    """The cached Grammar for (vocabulary, kind, source), compiling `ll_grammar()` on a miss."""
    _require_llguidance()
    vocab = vocab_of(tokenizer)
    key = (id(vocab), kind, source)
    with _LOCK:
        g = _CACHE.get(key)
        if g is not None and g.vocab is vocab:
            _CACHE.move_to_end(key)
            _STATS["hits"] += 1
            return g
    t0 = time.perf_counter()
    lt = vocab.ll_tokenizer()
    grm = ll_grammar()
    proto = _llg.LLMatcher(lt, grm, log_level=0)
    if proto.is_error():
        raise ConstraintError(_engine_message(kind, proto.get_error()))
    # the start state must allow something: a grammar whose first bytes no token spells is as unusable
    # as an unsatisfiable one, and computing it here warms the matcher that every request copies
    probe = proto.deep_copy()
    mask = probe.compute_bitmask()
    if probe.is_error():
        raise ConstraintError(_engine_message(kind, probe.get_error()))
    eos = set(vocab.eos_ids) | ({vocab.special_ids[0]} if not vocab.eos_ids and vocab.special_ids else set())
    allowed = bitmask_to_bool(torch.frombuffer(bytearray(mask), dtype=torch.int32), len(vocab))
    allowed[list(eos)] = False
    if not bool(allowed.any()) and not probe.is_accepting():
        raise ConstraintError(f"{kind}: no token of this vocabulary can start an output the grammar accepts")
    ms = (time.perf_counter() - t0) * 1e3
    g = Grammar(kind, source, vocab, ms, proto)
    with _LOCK:
        _CACHE[key] = g
        _CACHE.move_to_end(key)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
        _STATS["misses"] += 1
        _STATS["compile_ms_total"] += ms
    return g


def _engine_message(kind: str, err: str) -> str:
    """llguidance's error text -> a short message naming the construct."""
    first = err.strip().splitlines()[0] if err.strip() else "rejected"
    m = re.search(r"Unimplemented keys: \[([^\]]*)\]", err)
    if m:
        keys = ", ".join(k.strip().strip('"') for k in m.group(1).split(","))
        return f"unsupported JSON schema keyword(s): {keys}"
    if "look-around" in err or "look-ahead" in err:
        return f"{'pattern' if kind != 'regex' else 'regex'} with lookahead/lookbehind is not supported"
    if "backreferences" in err:
        return f"{'pattern' if kind != 'regex' else 'regex'} with a backreference is not supported"
    if "oneOf constraints are not supported" in err:
        return "oneOf whose branches may overlap is not supported: use anyOf, or make the branches disjoint"
    if first.startswith("NoExtension"):  # the start state's mask is empty
        return f"{kind}: no token of this vocabulary can start an output the grammar accepts"
    m = re.search(r"(Unsatisfiable schema:.*)", err)
    if m:
        return "unsatisfiable schema: " + m.group(1).split(":", 1)[1].strip()
    m = re.search(r"Resource '([^']*)' is not present", err)
    if m:
        return f"$ref to a remote URL ({m.group(1)}) is not supported: inline it under $defs"
    return f"{kind} rejected by the grammar engine: {first[:300]}"


# ---------------------------------------------------------------------------------------------- schema checks
_LOOKAROUND = re.compile(r"(?<!\\)\((\?<?[=!])")
_BACKREF = re.compile(r"(?<!\\)\\[1-9]|\\k<")


def _check_pattern(pattern: Any, where: str, what: str = "pattern") -> None:
    if not isinstance(pattern, str):
        raise ConstraintError(f"{what} at {where or '/'} must be a string")
    m = _LOOKAROUND.search(pattern)
    if m:
        kind = "lookbehind" if "<" in m.group(1) else "lookahead"
        raise ConstraintError(f"{what} with {kind} ({m.group(0)}...) at {where or '/'} is not supported")
    if _BACKREF.search(pattern):
        raise ConstraintError(f"{what} with a backreference at {where or '/'} is not supported")
    # syntax errors are llguidance's to report: patterns are ECMA-262 / Rust regex (\p{L} etc.), not Python re


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
               "unevaluatedProperties", "unevaluatedItems", "additionalItems")


def _check_schema(s: Any, where: str = "") -> None:
    """Reject, naming the construct and its JSON pointer, what llguidance would reject obscurely or what no
    local compiler can do: remote $ref, patterns with lookaround or backreferences, non-schema values."""
    if isinstance(s, bool):
        return
    if not isinstance(s, dict):
        raise ConstraintError(f"schema at {where or '/'} must be an object or a boolean, not {type(s).__name__}")
    ref = s.get("$ref")
    if ref is not None:
        if not isinstance(ref, str):
            raise ConstraintError(f"$ref at {where or '/'} must be a string")
        if not ref.startswith("#"):
            kind = "a remote URL" if re.match(r"^[a-z][a-z0-9+.-]*://", ref) else "another document"
            raise ConstraintError(f"$ref to {kind} ({ref!r}) at {where or '/'} is not supported: "
                                  "inline it under $defs")
    if "pattern" in s:
        _check_pattern(s["pattern"], f"{where}/pattern")
    for k in _SCHEMA_MAPS:
        sub = s.get(k)
        if isinstance(sub, dict):
            for name, v in sub.items():
                if k == "patternProperties":
                    _check_pattern(name, f"{where}/{k}", "patternProperties key")
                _check_schema(v, f"{where}/{k}/{name}")
    for k in _SCHEMA_LISTS:
        sub = s.get(k)
        if isinstance(sub, list):
            for i, v in enumerate(sub):
                _check_schema(v, f"{where}/{k}/{i}")
    for k in _SCHEMA_ONE:
        if k in s and isinstance(s[k], (dict, bool)):
            _check_schema(s[k], f"{where}/{k}")
        elif k == "items" and isinstance(s.get(k), list):  # draft-4..2019 tuple form
            for i, v in enumerate(s[k]):
                _check_schema(v, f"{where}/items/{i}")


def _schema_dict(schema: Any) -> dict | bool:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"schema must be a JSON object, not {type(schema).__name__}")
    _check_schema(schema)
    return schema


def _json_grammar(schema: dict | bool) -> str:
    """llguidance grammar text of a JSON schema with `JSON_OPTIONS` (a schema's own "x-guidance" is
    overridden: the separators are the server's choice)."""
    if schema is True:
        schema = {}
    elif schema is False:
        raise ConstraintError("unsatisfiable schema: false matches nothing")
    try:
        return _llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ConstraintError(_engine_message("json_schema", str(e))) from None


# ---------------------------------------------------------------------------------------------- compile API
def compile_json_schema(tokenizer, schema: dict | bool | str) -> Grammar:
    """A grammar of the JSON documents valid under `schema` (draft 2020-12 keywords llguidance implements:
    type, properties/required/additionalProperties, items/prefixItems/minItems/maxItems, enum/const,
    string min/maxLength/pattern/format, number minimum/maximum/exclusive*/multipleOf, anyOf/oneOf/allOf,
    local $ref/$defs). Raises `ConstraintError` for anything else (naming it) and for unsatisfiable
    schemas."""
    schema = _schema_dict(schema)
    source = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    return _compile(tokenizer, "json_schema", source, lambda: _json_grammar(schema))


def compile_json_object(tokenizer) -> Grammar:
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    return _compile(tokenizer, "json_object", "{}", lambda: _json_grammar({"type": "object"}))


def compile_regex(tokenizer, pattern: str) -> Grammar:
    """The strings matching `pattern` as a whole (Rust regex syntax: no lookaround, no backreferences)."""
    _check_pattern(pattern, "", "regex")
    return _compile(tokenizer, "regex", pattern, lambda: _llg.LLMatcher.grammar_from_regex(pattern))


def compile_grammar(tokenizer, source: str) -> Grammar:
    """A context-free grammar in llguidance's Lark dialect (``start: ...`` rules, "literals", /regex/
    terminals, ``%json{schema}`` embedded JSON schemas, ``x{m,n}`` repetition; see
    https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md), or a llama.cpp GBNF grammar
    (``root ::= ...``), converted to Lark."""
    if not isinstance(source, str) or not source.strip():
        raise ConstraintError("grammar: an empty grammar")

    def build() -> str:
        try:
            lark = _any_to_lark(source)
        except Exception as e:  # the GBNF converter raises its own error types
            raise ConstraintError(f"grammar: not valid Lark or GBNF: {e}") from None
        return _llg.LLMatcher.grammar_from_lark(lark)

    return _compile(tokenizer, "grammar", source, build)


def _lark_text(text: str, vocab: ByteVocab) -> str:
    """A Lark expression producing `text`, with any special token in it (e.g. ``<|python_tag|>``) as that
    token (llguidance's ``<[id]>`` syntax): special tokens are never spelled by text tokens."""
    specials = {vocab.tokens[i].decode("utf-8", "replace"): i for i in vocab.special_ids if vocab.tokens[i]}
    parts: list[str] = []
    rest = text
    while rest:
        hits = [(rest.find(s), s) for s in specials if s and rest.find(s) >= 0]
        if not hits:
            parts.append(json.dumps(rest))
            break
        j, s = min(hits, key=lambda h: (h[0], -len(h[1])))
        if j:
            parts.append(json.dumps(rest[:j]))
        parts.append(f"<[{specials[s]}]>")
        rest = rest[j + len(s):]
    return " ".join(parts)


def compile_tagged_json(tokenizer, begin: str, schemas: Sequence[dict], end: str, min_items: int = 1,
                        max_items: int | None = None, separator: str = "") -> Grammar:
    """``begin + JSON valid under one of schemas + end``, min_items..max_items times (None = unbounded),
    `separator` between items: tool calls (``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``).

    Each schema is compiled as in `compile_json_schema` and embedded with ``%json{...}`` in a Lark grammar;
    min_items 0 allows an empty output. Raises `ConstraintError` naming the schema index for a bad schema.
    """
    if not schemas:
        raise ConstraintError("tagged_json: at least one schema")
    if min_items < 0 or (max_items is not None and max_items < max(min_items, 1)):
        raise ConstraintError(f"tagged_json: bad item bounds min_items={min_items} max_items={max_items}")
    checked = []
    for i, s in enumerate(schemas):
        try:  # each schema alone first (cached): an error then names the schema's index
            checked.append(_schema_dict(s))
            compile_json_schema(tokenizer, checked[-1])
        except ConstraintError as e:
            raise ConstraintError(f"schema {i}: {e}") from None
    vocab = vocab_of(tokenizer)
    source = json.dumps({"begin": begin, "schemas": checked, "end": end, "min": min_items, "max": max_items,
                         "sep": separator}, sort_keys=True, separators=(",", ":"))

    def build() -> str:
        rules = []
        for i, s in enumerate(checked):
            body = {} if s is True else s
            if s is False:
                raise ConstraintError(f"schema {i}: unsatisfiable schema: false matches nothing")
            body = {**body, "x-guidance": JSON_OPTIONS}
            rules.append(f"body{i}: %json {json.dumps(body)}")
        item = " ".join(x for x in (_lark_text(begin, vocab) if begin else "", "body",
                                    _lark_text(end, vocab) if end else "") if x)
        sep = f"{_lark_text(separator, vocab)} " if separator else ""
        lo = max(min_items, 1)
        if max_items is None:
            rep = f"({sep}item)*" if lo == 1 else f"({sep}item){{{lo - 1},}}"
        else:
            rep = f"({sep}item){{{lo - 1},{max_items - 1}}}" if max_items > 1 else ""
        start = f"item {rep}".strip()
        lines = [f"start: {start}" + (" | \"\"" if min_items == 0 else ""), f"item: {item}",
                 "body: " + " | ".join(f"body{i}" for i in range(len(checked))), *rules]
        return _llg.LLMatcher.grammar_from_lark("\n".join(lines))

    return _compile(tokenizer, "tagged_json", source, build)
