"""Deduplication: exact copies by a canonical-text digest, near-duplicates by MinHash + LSH (guide: documents
at 90% similarity are removed).

Exact. `exact_key` hashes the text after a light canonicalisation (NFKC, case-fold, every run of
punctuation / whitespace / underscores collapsed to one space, ends stripped) with BLAKE2b-128, so copies
that differ only in case, spacing, punctuation or full-width forms collide. The first occurrence survives.

Near. Each document is a set of shingles, the n-grams of its tokens. A token is a maximal run of Unicode
word characters (Python's `\\w`, on the lower-cased text), except that every CJK ideograph or kana is a
token by itself: Latin-script text therefore gets WORD n-grams and Chinese / Japanese get CHARACTER
n-grams, and a Latin word inside Chinese text stays whole. Punctuation and whitespace never enter a
shingle. The n-gram size comes from the document's language (`DedupConfig.ngram`): 5 words by default, as
in Gopher (Rae et al. 2021) and datatrove's MinhashDedup; 3 characters for zh (and ja, unmeasured),
chosen on the zh reference corpora by benchmarks/dedup_quality.py (`zh_ngram_sweep`): no n >= 2 lets
unrelated texts reach J >= 0.9 there, while each step up in n costs tolerance to edits (after 1% random
character edits, 92% / 81% / 68% of copies keep J >= 0.9 at n = 2 / 3 / 5; of the Tang poems that the
corpus holds twice with one variant character, n = 5 finds none, n = 3 one, n = 2 five). 3 rather than 2
halves the similarity of unrelated modern-Chinese texts (alpaca_zh: 99.99th percentile 0.07 vs 0.13),
a margin for lower thresholds. A document with fewer than n tokens is one shingle (all its tokens); one
with no tokens has the empty set, whose signature is all 0xFFFFFFFF (two such documents are duplicates).

MinHash (Broder 1997) estimates Jaccard similarity J(A, B) = |A & B| / |A | B| as the fraction of equal
signature entries. `MinHasher` computes it for a whole batch in numpy, with nothing process-dependent
(no Python `hash()`; every constant is derived from `seed` with SHAKE-256), so signatures computed by
different workers or machines are comparable:
  token hash    t = fmix64(sum_i cp_i * K^i mod 2^64)   cp = the token's code points (polynomial hash)
  shingle hash  x = fmix64(sum_j C_j * t_j mod 2^64) >> 32   (a 32-bit key; order-sensitive via C_j)
  signature     sig_k = min_x ((a_k * x + b_k) mod 2^64) >> 32,   k < num_perm,   uint32
The last line is Dietzfelbinger's multiply-add-shift, a strongly universal family from 32-bit keys to
32-bit values, with a_k, b_k random 64-bit numbers; fmix64 is MurmurHash3's finaliser.

LSH (Indyk & Motwani 1998; Leskovec et al., Mining of Massive Datasets ch. 3): the signature is cut into
`bands` bands of `rows` entries; documents that agree on a whole band become candidates. The default
(bands, rows) minimises the weighted false-positive + false-negative area under the S-curve
1 - (1 - s^rows)^bands, as datasketch's `_optimal_param` does. With `verify` every candidate pair is
kept only if its signature-estimated Jaccard (over all num_perm entries) is >= threshold, which removes
most LSH false positives; false positives then only cost a comparison, so the default weights favour
recall (0.95 on false negatives: 9 bands x 14 rows at 0.9 / 128 perms instead of datasketch's 5 x 25,
which finds only 31% of the pairs at J = 0.9 and 80% at J = 0.95). Clusters are the connected
components of the verified pairs (union-find); `pick_survivors` keeps one document per cluster.
Clusters depend only on the signatures, never on the order or the sharding of the documents, so the
pipeline computes signatures per shard in its workers (`Deduplicator.features`), concatenates them and
decides once, globally (`Deduplicator.decide`).

Drop reasons: "dedup.exact" (same `exact_key` as an earlier document), "dedup.near" (in a near-duplicate
cluster whose survivor is another document).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

REASON_EXACT = "dedup.exact"
"""Drop reason: the canonical text equals an earlier document's."""
REASON_NEAR = "dedup.near"
"""Drop reason: a near-duplicate of the document kept from its cluster."""

MAX_NGRAM = 64


def _default_ngram() -> dict[str, int]:
    return {"zh": 3, "ja": 3}


@dataclass
class DedupConfig:
    exact: bool = True
    """Drop documents whose canonical text (`exact_key`) equals an earlier document's."""
    near: bool = True
    """Drop near-duplicates found by MinHash-LSH (run on the documents that survive exact dedup)."""
    threshold: float = 0.9
    """Jaccard similarity of the shingle sets at or above which two documents are duplicates."""
    num_perm: int = 128
    """MinHash permutations (signature length); the estimate's standard error is sqrt(J(1-J)/num_perm)."""
    ngram: dict[str, int] = field(default_factory=_default_ngram)
    """Shingle size per language (the primary subtag: "zh-Hant" uses "zh"). CJK text is shingled by
    characters, other scripts by words (see the module docstring)."""
    default_ngram: int = 5
    """Shingle size for languages not in `ngram` and for documents without a language: 5 words (Gopher)."""
    bands: int | None = None
    """LSH bands; None -> chosen with `rows` by `optimal_bands_rows(threshold, num_perm, fn_weight)`
    (or num_perm // rows when only rows is given)."""
    rows: int | None = None
    """Signature entries per band; None -> optimal (or num_perm // bands when only bands is given)."""
    verify: bool = True
    """Keep an LSH candidate pair only if its estimated Jaccard is >= threshold (precision)."""
    fn_weight: float | None = None
    """Weight of false negatives (false positives: 1 - fn_weight) when choosing bands/rows. None -> 0.95
    with verify, 0.5 (datasketch's default) without: a verified false positive costs one signature
    comparison, not a wrong merge, so recall is worth more. At 0.9 / 128 perms, 0.5 gives 5 x 25 bands
    (P[candidate] = 0.31 at J = 0.9, 0.80 at 0.95), 0.95 gives 9 x 14 (0.90 at 0.9, 0.998 at 0.95,
    0.001 at 0.5)."""
    keep: Literal["longest", "first"] = "longest"
    """Which document of a near-duplicate cluster survives: the longest text, or the earliest;
    ties go to the earliest. Exact duplicates always keep the first occurrence."""
    seed: int = 1
    """Seed of every hash constant; documents are only comparable under the same seed and num_perm."""

    def validate(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold: must be in (0, 1]")
        if not 1 <= self.num_perm <= 4096:
            raise ValueError("num_perm: must be in [1, 4096]")
        for lang, n in self.ngram.items():
            if not 1 <= n <= MAX_NGRAM:
                raise ValueError(f"ngram: size for {lang!r} must be in [1, {MAX_NGRAM}], got {n}")
        if not 1 <= self.default_ngram <= MAX_NGRAM:
            raise ValueError(f"default_ngram: must be in [1, {MAX_NGRAM}]")
        if self.bands is not None and self.bands < 1:
            raise ValueError("bands: must be >= 1")
        if self.rows is not None and self.rows < 1:
            raise ValueError("rows: must be >= 1")
        if self.fn_weight is not None and not 0.0 < self.fn_weight < 1.0:
            raise ValueError("fn_weight: must be in (0, 1)")
        if (self.bands or 1) * (self.rows or 1) > self.num_perm:
            raise ValueError(f"bands: bands * rows must be <= num_perm ({self.num_perm})")
        if self.keep not in ("longest", "first"):
            raise ValueError("keep: must be 'longest' or 'first'")
        if self.seed < 0:
            raise ValueError("seed: must be >= 0")

    def lsh_params(self) -> tuple[int, int]:
        """(bands, rows) this config uses."""
        fn_weight = default_fn_weight(self.verify) if self.fn_weight is None else self.fn_weight
        return resolve_bands_rows(self.threshold, self.num_perm, self.bands, self.rows, fn_weight)


# --------------------------------------------------------------------------------------------- exact

_NON_WORD = re.compile(r"[\W_]+")


def canonical_text(text: str) -> str:
    """The text `exact_key` hashes: NFKC, case-folded, punctuation/whitespace runs -> one space, stripped."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_key(text: str) -> bytes:
    """16-byte BLAKE2b digest of `canonical_text(text)`: equal for copies differing only in case, spacing,
    punctuation or compatibility forms (full-width letters, ligatures)."""
    return hashlib.blake2b(canonical_text(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def exact_duplicates(keys: Sequence[bytes]) -> np.ndarray:
    """Bool mask [N]: True for the first occurrence of each key, False for later copies."""
    seen: set[bytes] = set()
    mask = np.zeros(len(keys), dtype=bool)
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            mask[i] = True
    return mask


# ------------------------------------------------------------------------------------------ hashing

_FMIX1, _FMIX2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_S33, _S32 = np.uint64(33), np.uint64(32)
EMPTY_VALUE = 0xFFFFFFFF
"""Every entry of the signature of a document without tokens (the MinHash of the empty set)."""

# Code points that are tokens by themselves: ideographs (+ iteration marks) and kana. Hangul is not here:
# Korean separates words with spaces, so it is shingled by words like Latin script.
CJK_RANGES = ((0x3005, 0x3007), (0x3040, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
              (0xF900, 0xFAFF), (0xFF66, 0xFF9F), (0x20000, 0x3FFFF))
_CJK_CLASS = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in CJK_RANGES)
TOKEN_PATTERN = re.compile(f"(?=\\w)[{_CJK_CLASS}]|[^\\W{_CJK_CLASS}]+")
"""The tokens `MinHasher` hashes, as a regex over the lower-cased text (the vectorised tokeniser agrees
with `TOKEN_PATTERN.findall(text.lower())`; tests check it)."""

_char_class: np.ndarray | None = None


def _char_classes() -> np.ndarray:
    """uint8 [0x110000]: 0 separator, 1 word character (`\\w`), 2 CJK word character (a token by itself).
    Built once per process (~0.1 s) from `re`'s own definition of \\w."""
    global _char_class
    if _char_class is None:
        table = np.zeros(0x110000, dtype=np.uint8)
        every_char = "".join(map(chr, range(0x110000)))
        table[np.fromiter((m.start() for m in re.finditer(r"\w", every_char)), dtype=np.int64)] = 1
        for lo, hi in CJK_RANGES:
            seg = table[lo:hi + 1]
            seg[seg == 1] = 2
        _char_class = table
    return _char_class


def derive_u64(seed: int, label: str, count: int) -> np.ndarray:
    """`count` pseudo-random uint64 from SHAKE-256(label, seed): identical in every process, machine and
    numpy version (numpy's Generator streams are not guaranteed stable across versions)."""
    data = hashlib.shake_256(f"llmkit.dedup:{label}:{seed}".encode()).digest(8 * count)
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection with full avalanche), in place on a uint64 array."""
    h ^= h >> _S33
    h *= _FMIX1
    h ^= h >> _S33
    h *= _FMIX2
    h ^= h >> _S33
    return h


def _lang_key(lang: str | None) -> str | None:
    return None if lang is None else lang.split("-")[0].split("_")[0].lower()


class MinHasher:
    """Vectorised MinHash over token n-gram shingles (see the module docstring for the hash family).

    `signature(text, lang) -> uint32 [num_perm]`; `signatures(texts, langs) -> uint32 [N, num_perm]`
    computes a batch at once (much faster per document than one at a time). Deterministic: a signature
    depends only on (text, n-gram size for lang, num_perm, seed).
    """

    chunk = 2048  # shingles per [num_perm, chunk] uint64 block: 2 MiB at 128 perms, stays in L2
    batch_chars = 1 << 22  # characters tokenised at once (4 Mi chars: ~160 MiB of temporaries)

    def __init__(self, num_perm: int = 128, seed: int = 1, ngram: dict[str, int] | None = None,
                 default_ngram: int = 5):
        self.num_perm = num_perm
        self.seed = seed
        self.ngram = dict(_default_ngram() if ngram is None else ngram)
        self.default_ngram = default_ngram
        self.K = derive_u64(seed, "token", 1)[0] | np.uint64(1)
        self.C = derive_u64(seed, "shingle", MAX_NGRAM) | np.uint64(1)
        ab = derive_u64(seed, "perm", 2 * num_perm)
        self.a = ab[:num_perm].copy()
        self.b = ab[num_perm:].copy()
        self._pow = np.ones(1, dtype=np.uint64)

    @classmethod
    def from_config(cls, cfg: DedupConfig) -> MinHasher:
        return cls(cfg.num_perm, cfg.seed, cfg.ngram, cfg.default_ngram)

    def ngram_for(self, lang: str | None) -> int:
        """Shingle size for a language code ("zh-Hant" -> the "zh" entry; unknown -> default_ngram)."""
        if lang in self.ngram:
            return self.ngram[lang]
        return self.ngram.get(_lang_key(lang), self.default_ngram)

    def _powers(self, n: int) -> np.ndarray:
        """K^i mod 2^64 for i < n (cached and grown on demand)."""
        if len(self._pow) < n:
            m = max(n, 2 * len(self._pow))
            p = np.empty(m, dtype=np.uint64)
            p[0] = 1
            p[1:] = self.K
            self._pow = np.cumprod(p, dtype=np.uint64)  # wraps modulo 2^64, as intended
        return self._pow[:n]

    def tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token hashes of a batch: (hashes uint64 [T] in document order, tokens per document int64 [N])."""
        lowered = [t.lower() for t in texts]
        n_docs = len(lowered)
        # One space between documents: a token never spans two of them.
        cp = np.frombuffer(" ".join(lowered).encode("utf-32-le", "surrogatepass"), dtype="<u4")
        if cp.size == 0:
            return np.zeros(0, np.uint64), np.zeros(n_docs, np.int64)
        cls = _char_classes()[cp]
        word = cls != 0
        cjk = cls == 2
        boundary = cjk.copy()  # a token starts at a word char after a non-word char, or at/after CJK
        boundary[1:] |= cjk[:-1] | ~word[:-1]
        boundary[0] = True
        wpos = np.flatnonzero(word)
        first = np.flatnonzero(boundary[wpos])  # index into wpos of each token's first char
        if first.size == 0:
            return np.zeros(0, np.uint64), np.zeros(n_docs, np.int64)
        tok_len = np.diff(first, append=wpos.size)
        rel = np.arange(wpos.size) - np.repeat(first, tok_len)
        vals = cp[wpos].astype(np.uint64)
        vals *= self._powers(int(tok_len.max()))[rel]
        hashes = fmix64(np.add.reduceat(vals, first))
        doc_start = np.zeros(n_docs, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, lowered), np.int64, n_docs)[:-1] + 1, out=doc_start[1:])
        tok_doc = np.searchsorted(doc_start, wpos[first], side="right") - 1
        return hashes, np.bincount(tok_doc, minlength=n_docs)

    def _shingles(self, hashes: np.ndarray, begin: np.ndarray, count: np.ndarray, n: int) -> np.ndarray:
        """32-bit shingle keys (as uint64) of the documents whose tokens are hashes[begin:begin+count]
        (all count >= 1): max(1, count - n + 1) per document, in document order."""
        m = np.maximum(count - n + 1, 1)
        total = int(m.sum())
        seg = np.repeat(np.cumsum(m) - m, m)
        pos = np.repeat(begin, m) + (np.arange(total) - seg)  # first token of each shingle
        end = np.repeat(begin + count, m)
        padded = np.concatenate([hashes, np.zeros(n, dtype=np.uint64)])
        acc = np.zeros(total, dtype=np.uint64)
        short = bool((count < n).any())
        for j in range(n):
            term = padded[pos + j] * self.C[j]
            if short:  # a document shorter than n is one shingle of its tokens only
                term[pos + j >= end] = 0
            acc += term
        return fmix64(acc) >> _S32

    def _minhash(self, keys: np.ndarray, per_doc: np.ndarray) -> np.ndarray:
        """uint32 [len(per_doc), P]: the min over each document's keys (per_doc[i] >= 1 consecutive keys)."""
        P = self.num_perm
        doc_start = np.cumsum(per_doc) - per_doc
        a, b = self.a[:, None], self.b[:, None]
        doc_end = doc_start + per_doc
        seg_doc, seg_min = [], []
        for c0 in range(0, keys.size, self.chunk):
            c1 = min(c0 + self.chunk, keys.size)
            # documents overlapping [c0, c1); each is one segment of the chunk (per_doc >= 1: no empties)
            docs = np.arange(np.searchsorted(doc_end, c0, side="right"), np.searchsorted(doc_start, c1))
            block = a * keys[c0:c1][None, :]
            block += b
            seg_min.append(np.minimum.reduceat(block, np.maximum(doc_start[docs], c0) - c0, axis=1))
            seg_doc.append(docs)
        docs = np.concatenate(seg_doc)
        mins = np.concatenate(seg_min, axis=1).T  # [segments, P], segments in document order
        firsts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
        out = np.minimum.reduceat(mins, firsts, axis=0) if firsts.size != docs.size else mins
        assert out.shape == (len(per_doc), P)
        return (out >> _S32).astype(np.uint32)

    def signatures(self, texts: Sequence[str], langs: Sequence[str | None] | str | None = None) -> np.ndarray:
        """MinHash signatures uint32 [N, num_perm] of `texts`; `langs` picks each text's n-gram size
        (a sequence of N codes, one code for all, or None -> default_ngram). Texts are processed in
        batches of about `batch_chars` characters, which bounds the working memory (~40 bytes/char)."""
        n_docs = len(texts)
        if langs is None or isinstance(langs, str):
            langs = [langs] * n_docs
        if len(langs) != n_docs:
            raise ValueError(f"langs: expected {n_docs} entries, got {len(langs)}")
        out = np.full((n_docs, self.num_perm), EMPTY_VALUE, dtype=np.uint32)
        start, chars = 0, 0
        for i, t in enumerate(texts):
            chars += len(t)
            if chars >= self.batch_chars or i == n_docs - 1:
                out[start:i + 1] = self._signatures(texts[start:i + 1], langs[start:i + 1])
                start, chars = i + 1, 0
        return out

    def _signatures(self, texts: Sequence[str], langs: Sequence[str | None]) -> np.ndarray:
        n_docs = len(texts)
        out = np.full((n_docs, self.num_perm), EMPTY_VALUE, dtype=np.uint32)
        hashes, count = self.tokens(texts)
        begin = np.cumsum(count) - count
        sizes = {lang: self.ngram_for(lang) for lang in set(langs)}
        ns = np.fromiter((sizes[lang] for lang in langs), np.int64, n_docs)
        for n in np.unique(ns):
            docs = np.flatnonzero((ns == n) & (count > 0))
            if docs.size:
                keys = self._shingles(hashes, begin[docs], count[docs], int(n))
                out[docs] = self._minhash(keys, np.maximum(count[docs] - n + 1, 1))
        return out

    def signature(self, text: str, lang: str | None = None) -> np.ndarray:
        """MinHash signature uint32 [num_perm] of one text."""
        return self.signatures([text], [lang])[0]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray | float:
    """Fraction of equal entries along the last axis: the MinHash estimate of the Jaccard similarity."""
    return np.mean(np.asarray(sig_a) == np.asarray(sig_b), axis=-1)


# ---------------------------------------------------------------------------------------------- LSH


def _integrate(f, lo: float, hi: float, n: int = 1001) -> np.ndarray:
    """Simpson's rule over s in [lo, hi] of f(s) -> [..., len(s)] (n odd)."""
    s = np.linspace(lo, hi, n)
    w = np.ones(n)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return f(s) @ w * (hi - lo) / (3 * (n - 1))


@functools.lru_cache(maxsize=64)
def optimal_bands_rows(threshold: float, num_perm: int, fp_weight: float = 0.5,
                       fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising fp_weight * FP + fn_weight * FN, where
    FP = integral_0^t P[candidate | s] ds, FN = integral_t^1 P[not candidate | s] ds and
    P[candidate | s] = 1 - (1 - s^rows)^bands (the same objective as datasketch's `_optimal_param`)."""
    best, best_err = (1, 1), math.inf
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1, dtype=float)[:, None]
        fp = _integrate(lambda s, r=r, b=b: 1 - (1 - s ** r) ** b, 0.0, threshold)
        fn = _integrate(lambda s, r=r, b=b: (1 - s ** r) ** b, threshold, 1.0)
        err = fp_weight * fp + fn_weight * fn
        i = int(np.argmin(err))
        if err[i] < best_err:
            best, best_err = (b, i + 1), float(err[i])
    return best


def default_fn_weight(verify: bool) -> float:
    """False-negative weight of the (bands, rows) choice: 0.95 when candidates are verified, else 0.5."""
    return 0.95 if verify else 0.5


def resolve_bands_rows(threshold: float, num_perm: int, bands: int | None = None, rows: int | None = None,
                       fn_weight: float = 0.5) -> tuple[int, int]:
    """Fill in missing LSH parameters: both None -> `optimal_bands_rows` with weights (1 - fn_weight,
    fn_weight); one given -> the other is num_perm // it."""
    if bands is None and rows is None:
        return optimal_bands_rows(threshold, num_perm, 1.0 - fn_weight, fn_weight)
    if rows is None:
        rows = num_perm // bands
    if bands is None:
        bands = num_perm // rows
    if bands < 1 or rows < 1 or bands * rows > num_perm:
        raise ValueError(f"bands * rows must be in [1, num_perm={num_perm}], got {bands} x {rows}")
    return bands, rows


def candidate_probability(s: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P[two documents with Jaccard s share at least one band] = 1 - (1 - s^rows)^bands."""
    return 1 - (1 - np.asarray(s, dtype=float) ** rows) ** bands


def _row_hash(rows: np.ndarray, mult: np.ndarray) -> np.ndarray:
    """uint64 [N] hash of each row of a uint32 [N, k] array (random linear map mod 2^64, then fmix64)."""
    acc = np.zeros(rows.shape[0], dtype=np.uint64)
    for j in range(rows.shape[1]):
        acc += rows[:, j].astype(np.uint64) * mult[j]
    return fmix64(acc)


def connected_components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Union-find over edges (u[i], v[i]) of n nodes, vectorised (hook roots onto the smaller root, then
    pointer-jump). Returns int64 [n]: each node's component root, the smallest node of its component."""
    parent = np.arange(n, dtype=np.int64)
    u, v = np.asarray(u, dtype=np.int64), np.asarray(v, dtype=np.int64)
    while True:
        while True:  # path compression: every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        ru, rv = parent[u], parent[v]
        differ = ru != rv
        if not differ.any():
            return parent
        u, v, ru, rv = u[differ], v[differ], ru[differ], rv[differ]
        # each root hooks onto the smallest root it touches: parent[x] < x always, so no cycles
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))


def near_duplicate_clusters(signatures: np.ndarray, threshold: float = 0.9, bands: int | None = None,
                            rows: int | None = None, verify: bool = True, window: int = 32) -> np.ndarray:
    """Near-duplicate clusters of documents from their MinHash signatures (uint32 [N, P]).

    Candidates are documents that agree on at least one of `bands` bands of `rows` entries (None ->
    `resolve_bands_rows` with `default_fn_weight(verify)`). With `verify`, a candidate pair counts only
    if its estimated Jaccard (all P entries) is >= threshold. Clusters are the connected components of
    the counted pairs; identical signatures are always one cluster. Returns int64 [N]: each document's
    cluster id, the smallest index in its cluster (a singleton is its own id). The clusters are a
    function of the set of signatures only: any order or sharding of the same documents gives the same
    partition.

    Memory is O(N * bands): documents are grouped per band by sorting band hashes, never N x N. In a
    bucket each document is compared with its next `window` bucket-mates in a content-defined order (all
    pairs for buckets up to window + 1; a bound on the work for huge buckets of distinct signatures).
    """
    sig = np.ascontiguousarray(signatures)
    n, P = sig.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bands, rows = resolve_bands_rows(threshold, P, bands, rows, default_fn_weight(verify))
    mult = derive_u64(0, "band", P) | np.uint64(1)
    # Identical signatures collapse to one representative: floods of copies never make huge buckets.
    full = _row_hash(sig, mult)
    order = np.argsort(full, kind="stable")  # identical rows have equal hashes: adjacent
    same = np.all(sig[order[1:]] == sig[order[:-1]], axis=1)
    group = np.concatenate([[0], np.cumsum(~same)])
    rep_doc = order[np.flatnonzero(np.r_[True, ~same])]
    rep_of = np.empty(n, dtype=np.int64)
    rep_of[order] = group
    reps = sig[rep_doc]
    m = reps.shape[0]
    key = full[rep_doc]  # content-defined order inside buckets (never the input order)
    pairs = []
    for band in range(bands):
        bh = _row_hash(reps[:, band * rows:(band + 1) * rows], mult[band * rows:])
        o = np.lexsort((key, bh))
        bh_sorted = bh[o]
        for d in range(1, (window if verify else 1) + 1):
            hit = np.flatnonzero(bh_sorted[d:] == bh_sorted[:-d])
            if hit.size == 0:
                break
            i, j = o[hit], o[hit + d]
            pairs.append(np.minimum(i, j) * m + np.maximum(i, j))
    if pairs:
        code = np.unique(np.concatenate(pairs))
        u, v = code // m, code % m
        if verify:
            need = math.ceil(threshold * P - 1e-9)
            step = 65536  # pairs per comparison block: 8 MiB of booleans at 128 perms
            ok = np.concatenate([np.count_nonzero(reps[u[s:s + step]] == reps[v[s:s + step]], axis=1) >= need
                                 for s in range(0, u.size, step)])
            u, v = u[ok], v[ok]
    else:
        u = v = np.zeros(0, dtype=np.int64)
    root = connected_components(m, u, v)[rep_of]  # component of each document, as a representative
    label = np.full(m, n, dtype=np.int64)
    np.minimum.at(label, root, np.arange(n))
    return label[root]


def pick_survivors(labels: np.ndarray, lengths: np.ndarray, keep: str = "longest") -> np.ndarray:
    """Bool mask [N]: one True per cluster of `labels` [N]. keep="longest": the largest `lengths` [N]
    (ties -> the earliest index); keep="first": the earliest index."""
    labels = np.asarray(labels)
    idx = np.arange(labels.size)
    if keep == "longest":
        order = np.lexsort((idx, -np.asarray(lengths, dtype=np.int64), labels))
    elif keep == "first":
        order = np.lexsort((idx, labels))
    else:
        raise ValueError(f"keep: must be 'longest' or 'first', got {keep!r}")
    mask = np.zeros(labels.size, dtype=bool)
    if labels.size:
        sl = labels[order]
        mask[order[np.r_[True, sl[1:] != sl[:-1]]]] = True
    return mask


# --------------------------------------------------------------------------------------- pipeline


@dataclass
class DedupFeatures:
    """What the global dedup decision needs from a shard of N documents (computed in its worker)."""

    keys: list[bytes]
    """`exact_key` per document (empty list when exact dedup is off)."""
    signatures: np.ndarray
    """uint32 [N, num_perm] (shape [N, 0] when near dedup is off)."""
    lengths: np.ndarray
    """int64 [N]: text length in characters (for keep="longest")."""

    @staticmethod
    def concat(parts: Sequence[DedupFeatures]) -> DedupFeatures:
        """The features of the shards' documents in shard order."""
        return DedupFeatures([k for p in parts for k in p.keys],
                             np.concatenate([p.signatures for p in parts]),
                             np.concatenate([p.lengths for p in parts]))


class Deduplicator:
    """Exact + near dedup of a corpus. Per shard (any worker): `features(docs)`; then once, globally, on
    `DedupFeatures.concat` of all shards in corpus order: `decide(features)` -> a drop reason per document
    ("dedup.exact", "dedup.near" or None) and the index of the document each dropped one duplicates.
    `dedup(docs)` does both for an in-memory list and annotates doc["stats"]["dedup"]."""

    def __init__(self, config: DedupConfig):
        config.validate()
        self.config = config
        self.hasher = MinHasher.from_config(config)

    def features(self, docs: Sequence[dict]) -> DedupFeatures:
        texts = [d["text"] for d in docs]
        keys = [exact_key(t) for t in texts] if self.config.exact else []
        if self.config.near:
            sigs = self.hasher.signatures(texts, [d.get("lang") for d in docs])
        else:
            sigs = np.zeros((len(texts), 0), dtype=np.uint32)
        return DedupFeatures(keys, sigs, np.fromiter(map(len, texts), np.int64, len(texts)))

    def decide(self, feats: DedupFeatures) -> tuple[list[str | None], np.ndarray]:
        """(reasons [N], survivor_of int64 [N]: the kept document a dropped one duplicates, -1 if kept)."""
        cfg = self.config
        n = feats.lengths.size
        survivor_of = np.full(n, -1, dtype=np.int64)
        reasons: list[str | None] = [None] * n
        alive = np.arange(n)
        if cfg.exact:
            first = exact_duplicates(feats.keys)
            index_of: dict[bytes, int] = {}
            for i, k in enumerate(feats.keys):
                j = index_of.setdefault(k, i)
                if j != i:
                    survivor_of[i] = j
                    reasons[i] = REASON_EXACT
            alive = np.flatnonzero(first)
        if cfg.near and alive.size:
            bands, rows = cfg.lsh_params()
            labels = near_duplicate_clusters(feats.signatures[alive], cfg.threshold, bands, rows, cfg.verify)
            keep = pick_survivors(labels, feats.lengths[alive], cfg.keep)
            kept_of_cluster = np.empty(alive.size, dtype=np.int64)
            kept_of_cluster[labels[keep]] = alive[keep]
            for i in np.flatnonzero(~keep):
                survivor_of[alive[i]] = kept_of_cluster[labels[i]]
                reasons[alive[i]] = REASON_NEAR
            # a copy dropped by exact dedup points at the final survivor, not at a dropped near-duplicate
            moved = (survivor_of >= 0) & (survivor_of[np.maximum(survivor_of, 0)] >= 0)
            survivor_of[moved] = survivor_of[survivor_of[moved]]
        return reasons, survivor_of

    def dedup(self, docs: Sequence[dict]) -> list[str | None]:
        """Decide for an in-memory list; sets stats["dedup"] = {"dup_of": id} on dropped documents and
        {"dups": k} on kept documents that had k duplicates removed."""
        reasons, survivor_of = self.decide(self.features(docs))
        dups = np.bincount(survivor_of[survivor_of >= 0], minlength=len(docs))
        for i, doc in enumerate(docs):
            if survivor_of[i] >= 0:
                doc.setdefault("stats", {})["dedup"] = {"dup_of": docs[survivor_of[i]]["id"]}
            elif dups[i]:
                doc.setdefault("stats", {})["dedup"] = {"dups": int(dups[i])}
        return reasons
