"""Data selection: keep the candidates that look most like a target distribution (issue 19, docs/data.md).

Three selectors, each a pure function of the candidates' texts (and, for two of them, a set of target
texts), plus a differentially private variant of the top-k choice:

* **DSIR** (Xie, Santurkar, Ma, Liang 2023, "Data Selection for Language Models via Importance
  Resampling"): every document becomes a bag of hashed word unigrams and bigrams (`buckets` buckets;
  CJK characters count as words). Two bag-of-ngram models are fit by counting, with add-`smoothing`
  (Laplace) smoothing: p_target from the target texts, p_raw from the candidates. A document's log
  importance weight is sum over its n-gram occurrences of log(p_target[b] / p_raw[b]) (or, with
  `length` L, L times their mean), and `k` documents
  (or a `fraction`, or a `tokens` budget) are *resampled without replacement* with probability
  proportional to the weights by Gumbel-top-k: keep the largest log w_i + G_i, G_i ~ Gumbel(0, 1)
  (the paper's own procedure). G_i comes from a hash of (seed, document id), so the choice does not
  depend on sharding.
* **classifier** (GPT-3, Brown et al. 2020, App. A; CCNet-style reference-vs-raw): logistic regression
  over the same hashed features (L2-normalised term frequencies), positives = target texts, negatives =
  candidates, classes weighted equally, cross-fitted over `folds` folds (by a hash of seed and id): every
  document is scored by the model fit on the other folds, and the ROC AUC of these out-of-fold scores
  (targets vs candidates) is reported as the held-out AUC. score = P(reference); keep score >=
  `threshold`, or the top `k` / `fraction` / `tokens` by score.
* **perplexity band**: keep the documents whose perplexity under the pipeline's reference model
  (`perplexity:` section, its scorer) lies within the [`low`, `high`] quantiles of their language
  (perplexities of different languages are not comparable, as in the perplexity filter).
* **differentially private top-k** (`dp.epsilon` set; dsir and classifier): the top k of a *bounded*
  score u_i in [0, 1] after independent Gumbel noise of scale b = 2 k Delta / epsilon_total (Delta = 1),
  the one-shot form of k exponential mechanisms (Durfee & Rogers 2019, "Practical Differentially Private
  Top-k Selection with Pay-what-you-get Composition"): each pick is an exponential
  mechanism with epsilon_0 = 2 Delta / b ((epsilon_0, 0)-DP, McSherry & Talwar 2007), so the k picks are
  (k epsilon_0, 0)-DP by basic composition; with `dp.delta` > 0 the advanced composition theorem (Dwork,
  Rothblum, Vadhan 2010) is used when it allows a larger epsilon_0 (less noise). What is private and what
  is not: see `dp_top_k` and docs/data.md.

Every candidate that is not selected gets the drop reason `select.<method>`; candidates are the documents
alive after the perplexity filter, of `select.sources` (all sources when empty).
"""

from __future__ import annotations

import glob
import hashlib
import math
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "DPConfig",
    "SelectConfig",
    "HashedNgrams",
    "auc",
    "bounded_dsir_score",
    "budget_count",
    "dp_epsilon0",
    "dp_top_k",
    "dsir_log_weights",
    "fit_ngram_model",
    "gumbel_noise",
    "gumbel_top_k",
    "perplexity_band",
    "read_target_texts",
    "train_classifier",
]

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
# a CJK character, or a run of word characters that are not CJK
_WORD = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio multiplier combining two token hashes into a bigram hash


# -- configuration -----------------------------------------------------------------------------------------
@dataclass
class DPConfig:
    epsilon: float | None = None
    """Total privacy budget of the selection; None = a non-private selection."""
    delta: float = 0.0
    """0 = pure epsilon-DP (basic composition over the k picks); > 0 also tries advanced composition."""
    dsir_clip: float = 1.0
    """DSIR's bounded score: the mean log importance ratio per n-gram, clipped to [-dsir_clip, dsir_clip]
    and mapped linearly onto [0, 1] (fixed bounds, independent of the data)."""
    seed: int | None = None
    """Seed of the privacy noise. None = fresh OS randomness (not recorded). A seed that is written into
    the config (and so into manifest.json) makes the noise known to whoever reads it, which voids the
    guarantee: set one only for tests and reproducibility studies."""

    def validate(self) -> None:
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"epsilon: must be > 0, got {self.epsilon}")
        if not 0.0 <= self.delta < 1.0:
            raise ValueError(f"delta: must be in [0, 1), got {self.delta}")
        if self.epsilon is None and self.delta:
            raise ValueError("delta: set only together with epsilon")
        if not self.dsir_clip > 0:
            raise ValueError(f"dsir_clip: must be > 0, got {self.dsir_clip}")

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None


@dataclass
class SelectConfig:
    enabled: bool = False
    method: Literal["dsir", "classifier", "perplexity"] = "dsir"
    target: list[str] = field(default_factory=list)
    """Files (or directories, globs) of target / reference text; required for dsir and classifier. Read
    like a source: txt one document per line (`target_txt_mode`), jsonl/json field `target_text`."""
    target_txt_mode: Literal["file", "line", "block"] = "line"
    target_text: list[str] = field(default_factory=lambda: ["text"])
    target_records: str | None = None
    sources: list[str] = field(default_factory=list)
    """Candidates: the surviving documents of these sources; empty = every source. Documents of other
    sources pass through untouched."""
    k: int | None = None
    """Select this many documents."""
    fraction: float | None = None
    """Select round(fraction * candidates) documents."""
    tokens: int | None = None
    """Select documents (in selection order) while their tokens fit this budget (the pipeline's token
    count: output.tokenizer, else the CJK-character + word estimate)."""
    threshold: float | None = None
    """classifier: keep candidates with P(reference) >= threshold (instead of k / fraction / tokens)."""
    low: float = 0.0
    """perplexity: lower quantile (0..1) of the band, per language."""
    high: float = 1.0
    """perplexity: upper quantile (0..1) of the band, per language."""
    buckets: int = 10_000
    """Hash buckets of the n-gram features (DSIR uses 10,000)."""
    ngram: int = 2
    """Largest n-gram order of the features (2 = unigrams + bigrams, as DSIR)."""
    smoothing: float = 1.0
    """dsir: add-smoothing pseudo-count per bucket of both bag-of-ngram models."""
    length: int | None = None
    """dsir: None = the paper's weight, the sum over every n-gram of the document (it grows with length,
    so when the target is far from the raw data, short documents win). An integer L compares documents
    at L n-grams: log w = L * mean log ratio per n-gram (an llmkit option)."""
    folds: int = 2
    """classifier: cross-fitting folds (by a hash of seed and id). Each document, target or candidate,
    is scored by the model fit on the other folds, so no candidate is scored by a model that saw it as a
    negative, and the AUC over these out-of-fold scores is a held-out AUC."""
    steps: int = 300
    """classifier: full-batch Adam steps."""
    lr: float = 0.1
    l2: float = 1e-4
    seed: int = 0
    """Seed of DSIR's resampling and of the classifier's split (public; the DP noise has dp.seed)."""
    dp: DPConfig = field(default_factory=DPConfig)

    def validate(self) -> None:
        if not self.enabled:
            return
        if self.method in ("dsir", "classifier"):
            if not self.target:
                raise ValueError(f"target: method {self.method} needs target files (the reference text to "
                                 "select toward)")
            for p in self.target:
                if not (Path(p).exists() or glob.glob(p, recursive=True)):
                    raise ValueError(f"target: nothing found at {p!r}")
        budgets = [n for n in ("k", "fraction", "tokens") if getattr(self, n) is not None]
        if len(budgets) > 1:
            raise ValueError(f"{budgets[1]}: set only one of k / fraction / tokens (got {budgets})")
        if self.k is not None and self.k < 0:
            raise ValueError(f"k: must be >= 0, got {self.k}")
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction: must be in [0, 1], got {self.fraction}")
        if self.tokens is not None and self.tokens < 0:
            raise ValueError(f"tokens: must be >= 0, got {self.tokens}")
        if self.threshold is not None:
            if self.method != "classifier":
                raise ValueError(f"threshold: only for method classifier, not {self.method}")
            if budgets:
                raise ValueError(f"threshold: set either threshold or {budgets[0]}, not both")
            if not 0.0 <= self.threshold <= 1.0:
                raise ValueError(f"threshold: must be in [0, 1], got {self.threshold}")
        if self.method in ("dsir", "classifier") and not budgets and self.threshold is None:
            raise ValueError(f"k: method {self.method} needs a budget: k, fraction or tokens"
                             + (" (or threshold)" if self.method == "classifier" else ""))
        if self.method == "perplexity":
            if budgets:
                raise ValueError(f"{budgets[0]}: method perplexity keeps a quantile band (low, high), "
                                 "not a budget")
            if not 0.0 <= self.low < self.high <= 1.0:
                raise ValueError(f"low: need 0 <= low < high <= 1, got low {self.low}, high {self.high}")
            if self.dp.enabled:
                raise ValueError("dp: method perplexity has no bounded score with a stated sensitivity "
                                 "(its band is data-dependent quantiles); use dsir or classifier")
        if self.dp.enabled and self.threshold is not None:
            raise ValueError("dp: a private selection needs a budget (k, fraction or tokens), not threshold")
        if not 16 <= self.buckets <= 1 << 24:
            raise ValueError(f"buckets: must be in 16..2^24, got {self.buckets}")
        if not 1 <= self.ngram <= 2:
            raise ValueError(f"ngram: 1 (unigrams) or 2 (unigrams + bigrams), got {self.ngram}")
        if self.length is not None and self.length < 1:
            raise ValueError(f"length: must be >= 1 or null, got {self.length}")
        if not self.smoothing > 0:
            raise ValueError(f"smoothing: must be > 0, got {self.smoothing}")
        if not 2 <= self.folds <= 20:
            raise ValueError(f"folds: must be in 2..20, got {self.folds}")
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")


def read_target_texts(cfg: SelectConfig, normalizer=None) -> tuple[list[str], int]:
    """The target texts (normalised like the candidates when `normalizer` is given) and the number of
    unreadable records skipped (malformed lines, records without text)."""
    from llmkit.data.sources import SourceConfig, read_source

    texts, bad = [], 0
    for i, p in enumerate(cfg.target):
        src = SourceConfig(name=f"target{i}", path=p, txt_mode=cfg.target_txt_mode, text=list(cfg.target_text),
                           records=cfg.target_records)
        for doc in read_source(src):
            if "error" in doc:
                bad += 1
                continue
            if normalizer is not None:
                normalizer(doc)
            if doc["text"].strip():
                texts.append(doc["text"])
    return texts, bad


# -- hashed n-gram features ----------------------------------------------------------------------------------
class HashedNgrams:
    """Hashed word unigram (+ bigram) features: each document becomes the bucket of every n-gram occurrence.

    Words are lowercased runs of word characters; each CJK character is a word of its own. A word's hash
    is the first 8 bytes of BLAKE2b of its UTF-8 (stable across processes and machines); a bigram's hash
    is h1 * 0x9E3779B97F4A7C15 + h2 (mod 2^64); the bucket is hash mod `buckets`.
    """

    def __init__(self, buckets: int = 10_000, ngram: int = 2):
        self.buckets = buckets
        self.ngram = ngram
        self._cache: dict[str, int] = {}

    @staticmethod
    def words(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def _hash(self, word: str) -> int:
        h = self._cache.get(word)
        if h is None:
            h = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
            if len(self._cache) < 2_000_000:
                self._cache[word] = h
        return h

    def doc(self, text: str) -> np.ndarray:
        """Bucket of every n-gram occurrence of `text`: unigrams, then bigrams (int64 array)."""
        h = np.array([self._hash(w) for w in self.words(text)], dtype=np.uint64)
        parts = [h]
        if self.ngram >= 2 and len(h) > 1:
            with np.errstate(over="ignore"):
                parts.append(h[:-1] * _MIX + h[1:])
        return (np.concatenate(parts) % np.uint64(self.buckets)).astype(np.int64)

    def batch(self, texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """(indices, indptr): document i's n-gram buckets are indices[indptr[i]:indptr[i + 1]]."""
        docs = [self.doc(t) for t in texts]
        indptr = np.zeros(len(docs) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(d) for d in docs])
        return (np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)), indptr


def _rows(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


# -- DSIR ------------------------------------------------------------------------------------------------------
def fit_ngram_model(indices: np.ndarray, buckets: int, smoothing: float = 1.0) -> np.ndarray:
    """A hashed bag-of-ngrams model: p[b] = (count[b] + smoothing) / (total + smoothing * buckets)."""
    counts = np.bincount(indices, minlength=buckets).astype(np.float64)
    return (counts + smoothing) / (counts.sum() + smoothing * buckets)


def dsir_log_weights(indices: np.ndarray, indptr: np.ndarray, p_target: np.ndarray,
                     p_raw: np.ndarray) -> np.ndarray:
    """log w_i = sum over document i's n-gram occurrences of log(p_target[b] / p_raw[b])."""
    ratio = np.log(p_target) - np.log(p_raw)
    return np.bincount(_rows(indptr), weights=ratio[indices], minlength=len(indptr) - 1)


def bounded_dsir_score(log_w: np.ndarray, n_features: np.ndarray, clip: float) -> np.ndarray:
    """DSIR's weight as a score in [0, 1]: the mean log ratio per n-gram occurrence, clipped to [-clip, clip]
    and mapped linearly onto [0, 1] (0.5 for a document without features). The bounds are constants, so
    the score of one document does not depend on any other document's score."""
    mean = np.divide(log_w, n_features, out=np.zeros(len(log_w)), where=n_features > 0)
    return (np.clip(mean, -clip, clip) + clip) / (2 * clip)


# -- seeded per-document randomness and top-k ---------------------------------------------------------------
def _uniform(seed: int, ids: Sequence[str]) -> np.ndarray:
    """A uniform (0, 1) number per document from BLAKE2b(seed, id): the same in every process."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, doc_id in enumerate(ids):
        h = int.from_bytes(hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest(), "little")
        out[i] = ((h >> 11) + 0.5) / float(1 << 53)
    return out


def gumbel_noise(seed: int, ids: Sequence[str], scale: float = 1.0) -> np.ndarray:
    """Gumbel(0, scale) noise per document, from a hash of (seed, id)."""
    return -scale * np.log(-np.log(_uniform(seed, ids)))


def _order(keys: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    """Indices by descending key, ties broken by id (deterministic whatever the input order)."""
    return np.lexsort((np.asarray(ids, dtype=str), -keys))


def budget_count(order: np.ndarray, n: int, cfg: SelectConfig, tokens: np.ndarray) -> int:
    """How many documents of `order` (best first) the budget takes: k, round(fraction * n), or the longest
    prefix whose tokens fit cfg.tokens."""
    if cfg.k is not None:
        return min(cfg.k, n)
    if cfg.fraction is not None:
        return min(int(round(cfg.fraction * n)), n)
    if cfg.tokens is not None:
        return int(np.searchsorted(np.cumsum(tokens[order]), cfg.tokens, side="right"))
    raise ValueError("select: no budget (k, fraction, tokens) set")


def gumbel_top_k(log_w: np.ndarray, ids: Sequence[str], seed: int, cfg: SelectConfig,
                 tokens: np.ndarray) -> np.ndarray:
    """DSIR's resampling without replacement, proportional to exp(log_w): the budget's prefix of the
    documents ordered by log_w + Gumbel(0, 1). Returns a boolean mask."""
    order = _order(log_w + gumbel_noise(seed, ids), ids)
    mask = np.zeros(len(log_w), dtype=bool)
    mask[order[:budget_count(order, len(log_w), cfg, tokens)]] = True
    return mask


# -- differential privacy -------------------------------------------------------------------------------------
def dp_epsilon0(epsilon: float, delta: float, k: int) -> tuple[float, str]:
    """Per-pick epsilon_0 of k composed exponential mechanisms under a total (epsilon, delta) budget.

    Basic composition: k * epsilon_0 <= epsilon (pure DP). With delta > 0, advanced composition (Dwork,
    Rothblum, Vadhan 2010, Thm III.3): k picks of epsilon_0 are (epsilon_0 sqrt(2 k ln(1/delta)) +
    k epsilon_0 (e^epsilon_0 - 1), delta)-DP; the larger of the two epsilon_0 is used.
    """
    if k <= 0:
        return math.inf, "none (nothing selected)"
    basic = epsilon / k
    if delta <= 0:
        return basic, "basic composition (pure DP)"

    def total(e0: float) -> float:
        return e0 * math.sqrt(2 * k * math.log(1 / delta)) + k * e0 * math.expm1(min(e0, 700.0))

    lo, hi = 0.0, epsilon / math.sqrt(2 * k * math.log(1 / delta))  # the first term alone reaches epsilon there
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= epsilon else (lo, mid)
    if lo > basic:
        return lo, "advanced composition (Dwork, Rothblum, Vadhan 2010)"
    return basic, "basic composition (pure DP; advanced composition gives no less noise here)"


def dp_top_k(scores: np.ndarray, ids: Sequence[str], k: int, epsilon: float, delta: float = 0.0,
             seed: int | None = None, sensitivity: float = 1.0) -> tuple[np.ndarray, dict]:
    """Report-noisy-top-k with Gumbel noise (Durfee & Rogers 2019): the k largest scores[i] + G_i,
    G_i ~ Gumbel(0, b) with b = 2 * sensitivity / epsilon_0 and epsilon_0 from `dp_epsilon0` (b = 2 k
    sensitivity / epsilon for pure DP).

    Privacy unit: one candidate's score. Two inputs are neighbours when they differ in one candidate's
    score by at most `sensitivity` (for a score clipped to [0, 1]: any change of that document). The
    candidate ids, the score function and k are public. The one-shot top-k has the distribution of k
    sequential exponential mechanisms (peeling), each (epsilon_0, 0)-DP for a utility of sensitivity
    `sensitivity`, so the selection is (epsilon, delta)-DP by composition.

    Returns (boolean mask of the selected, an account of the mechanism for the report).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    k = min(int(k), n)
    if n and (scores.min() < 0 or scores.max() > sensitivity):
        raise ValueError(f"dp_top_k: scores must lie in [0, {sensitivity}] for sensitivity {sensitivity}")
    eps0, composition = dp_epsilon0(epsilon, delta, k)
    scale = 2 * sensitivity / eps0 if k else 0.0
    seed_recorded = seed is not None
    if seed is None:
        seed = secrets.randbits(63)
    noisy = scores + (gumbel_noise(seed, ids, scale) if k else 0.0)
    order = _order(np.asarray(noisy, dtype=np.float64), ids)
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    account = {"mechanism": "one-shot Gumbel report-noisy-top-k = k peeling exponential mechanisms "
                            "(Durfee & Rogers 2019)",
               "epsilon": float(epsilon), "delta": float(delta), "k": k, "candidates": n,
               "sensitivity": float(sensitivity), "epsilon_per_pick": float(eps0),
               "noise": "gumbel", "noise_scale": float(scale), "composition": composition,
               "seed": "recorded in config (noise reproducible: not private against readers of the config)"
                       if seed_recorded else "secret (OS randomness, not recorded)",
               "privacy_unit": "one candidate's score, bounded in [0, sensitivity]; candidate ids, the "
                               "score models and k are public (not protected)"}
    return mask, account


# -- classifier -------------------------------------------------------------------------------------------------
def _tf_matrix(indices: np.ndarray, indptr: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse (rows, cols, values) of L2-normalised bucket counts per document."""
    rows = _rows(indptr)
    key, counts = np.unique(rows * buckets + indices, return_counts=True)
    r, c = key // buckets, key % buckets
    v = counts.astype(np.float64)
    norm = np.sqrt(np.bincount(r, weights=v * v, minlength=len(indptr) - 1))
    return r, c, v / norm[r]


class LinearClassifier:
    """Logistic regression over sparse hashed features: P(reference | x) = sigmoid(w . x + b)."""

    def __init__(self, w: np.ndarray, b: float, buckets: int):
        self.w, self.b, self.buckets = w, b, buckets

    def predict(self, indices: np.ndarray, indptr: np.ndarray) -> np.ndarray:
        r, c, v = _tf_matrix(indices, indptr, self.buckets)
        z = np.bincount(r, weights=v * self.w[c], minlength=len(indptr) - 1) + self.b
        return 1.0 / (1.0 + np.exp(-z))


def train_classifier(indices: np.ndarray, indptr: np.ndarray, labels: np.ndarray, buckets: int,
                     steps: int = 300, lr: float = 0.1, l2: float = 1e-4) -> LinearClassifier:
    """Class-balanced, L2-regularised logistic regression, full-batch Adam (numpy)."""
    n = len(indptr) - 1
    r, c, v = _tf_matrix(indices, indptr, buckets)
    y = labels.astype(np.float64)
    pos = max(y.sum(), 1.0)
    neg = max(n - y.sum(), 1.0)
    weight = np.where(y > 0, 0.5 / pos, 0.5 / neg)  # each class weighs 1/2 in the loss
    w, b = np.zeros(buckets), 0.0
    m_w, v_w, m_b, v_b = np.zeros(buckets), np.zeros(buckets), 0.0, 0.0
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        z = np.bincount(r, weights=v * w[c], minlength=n) + b
        p = 1.0 / (1.0 + np.exp(-z))
        err = weight * (p - y)
        g_w = np.bincount(c, weights=v * err[r], minlength=buckets) + l2 * w
        g_b = float(err.sum())
        m_w = beta1 * m_w + (1 - beta1) * g_w
        v_w = beta2 * v_w + (1 - beta2) * g_w * g_w
        m_b = beta1 * m_b + (1 - beta1) * g_b
        v_b = beta2 * v_b + (1 - beta2) * g_b * g_b
        corr1, corr2 = 1 - beta1 ** t, 1 - beta2 ** t
        w -= lr * (m_w / corr1) / (np.sqrt(v_w / corr2) + eps)
        b -= lr * (m_b / corr1) / (math.sqrt(v_b / corr2) + eps)
    return LinearClassifier(w, b, buckets)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative), ties counting 1/2
    (Mann-Whitney U with mid-ranks). NaN when a class is empty."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # mid-ranks of ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# -- perplexity band ----------------------------------------------------------------------------------------------
def perplexity_band(ppl: np.ndarray, langs: np.ndarray, low: float, high: float) -> tuple[np.ndarray, dict]:
    """Keep documents whose perplexity lies within [quantile(low), quantile(high)] of their language
    (np.quantile, linear interpolation; both ends inclusive). Returns (mask, {lang: [lo, hi]})."""
    ppl = np.asarray(ppl, dtype=np.float64)
    langs = np.asarray(langs)
    keep = np.zeros(len(ppl), dtype=bool)
    bands = {}
    for lang in np.unique(langs):
        member = langs == lang
        values = ppl[member & np.isfinite(ppl)]
        if not len(values):
            continue
        lo, hi = np.quantile(values, [low, high])
        bands[str(lang)] = [float(lo), float(hi)]
        keep |= member & (ppl >= lo) & (ppl <= hi)
    return keep, bands


# -- the pipeline step --------------------------------------------------------------------------------------------
def run_selection(cfg: SelectConfig, texts: Sequence[str], ids: Sequence[str], sources: np.ndarray,
                  tokens: np.ndarray, chars: np.ndarray, langs: np.ndarray, ppl: np.ndarray | None,
                  target: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Select among the candidates: (keep mask, per-candidate score, report).

    `texts`, `ids`, ... describe the candidates; `target` the target texts (dsir, classifier); `ppl` the
    candidates' perplexities (perplexity)."""
    n = len(ids)
    tokens = np.asarray(tokens, dtype=np.int64)
    chars = np.asarray(chars, dtype=np.int64)
    report: dict[str, Any] = {"method": cfg.method}
    score = np.full(n, np.nan)
    if cfg.method == "perplexity":
        if ppl is None:
            raise ValueError("select.method perplexity: needs perplexity.enabled (its scorer gives the scores)")
        keep, bands = perplexity_band(ppl, langs, cfg.low, cfg.high)
        score = np.asarray(ppl, dtype=np.float64)
        report.update({"low": cfg.low, "high": cfg.high, "bands": bands, "score": "perplexity"})
    else:
        if not target:
            raise ValueError(f"select.target: method {cfg.method} read no target text from {cfg.target}")
        feats = HashedNgrams(cfg.buckets, cfg.ngram)
        c_idx, c_ptr = feats.batch(texts)
        t_idx, t_ptr = feats.batch(target)
        report.update({"target_docs": len(target), "buckets": cfg.buckets,
                       "features": "hashed word unigrams" + (" + bigrams" if cfg.ngram == 2 else "")})
        if cfg.method == "dsir":
            p_t = fit_ngram_model(t_idx, cfg.buckets, cfg.smoothing)
            p_r = fit_ngram_model(c_idx, cfg.buckets, cfg.smoothing)
            log_w = dsir_log_weights(c_idx, c_ptr, p_t, p_r)
            if cfg.length is not None:
                n_feat = np.diff(c_ptr)
                log_w = cfg.length * np.divide(log_w, n_feat, out=np.zeros(n), where=n_feat > 0)
            score = log_w
            bounded = bounded_dsir_score(dsir_log_weights(c_idx, c_ptr, p_t, p_r), np.diff(c_ptr), cfg.dp.dsir_clip)
            report.update({"smoothing": cfg.smoothing, "length": cfg.length, "score": "log importance weight",
                           "kl_target_raw": float(np.sum(p_t * (np.log(p_t) - np.log(p_r))))})
            if not cfg.dp.enabled:
                keep = gumbel_top_k(log_w, ids, cfg.seed, cfg, tokens)
                report["resampling"] = "Gumbel-top-k without replacement, proportional to the weights"
        else:
            score, bounded, clf_report = _classifier_scores(cfg, c_idx, c_ptr, t_idx, t_ptr, ids)
            report.update(clf_report)
            if not cfg.dp.enabled:
                if cfg.threshold is not None:
                    keep = score >= cfg.threshold
                    report["threshold"] = cfg.threshold
                else:
                    order = _order(score, ids)
                    keep = np.zeros(n, dtype=bool)
                    keep[order[:budget_count(order, n, cfg, tokens)]] = True
        if cfg.dp.enabled:
            keep, dp = _private(cfg, bounded, ids, tokens)
            report["dp"] = dp
            report["score_private"] = ("clipped mean log importance ratio per n-gram, mapped onto [0, 1]"
                                       if cfg.method == "dsir" else "P(reference), in [0, 1]")
    report.update(_summary(keep, tokens, chars, sources))
    return keep, score, report


def _classifier_scores(cfg: SelectConfig, c_idx, c_ptr, t_idx, t_ptr, ids) -> tuple[np.ndarray, np.ndarray, dict]:
    n_c, n_t = len(c_ptr) - 1, len(t_ptr) - 1
    # one design matrix: targets first (label 1), then candidates (label 0)
    idx = np.concatenate([t_idx, c_idx])
    ptr = np.concatenate([t_ptr, t_ptr[-1] + c_ptr[1:]])
    labels = np.concatenate([np.ones(n_t, dtype=bool), np.zeros(n_c, dtype=bool)])
    keys = [f"target:{i}" for i in range(n_t)] + [f"candidate:{i}" for i in ids]
    fold = np.minimum((_uniform(cfg.seed + 1, keys) * cfg.folds).astype(np.int64), cfg.folds - 1)
    lens = np.diff(ptr)

    def subset(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sub_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
        sub_ptr[1:] = np.cumsum(lens[rows])
        row_of = np.repeat(rows, lens[rows])
        within = np.arange(len(row_of)) - np.repeat(sub_ptr[:-1], lens[rows])
        return idx[ptr[row_of] + within], sub_ptr

    p_all = np.full(len(labels), np.nan)
    train_aucs = []
    for f in range(cfg.folds):
        train, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if not len(held):
            continue
        model = train_classifier(*subset(train), labels[train], cfg.buckets, cfg.steps, cfg.lr, cfg.l2)
        p_all[held] = model.predict(*subset(held))
        train_aucs.append(auc(model.predict(*subset(train)), labels[train]))
    p = p_all[n_t:]
    report = {"score": "P(reference), out of fold", "classifier": "logistic regression, L2-normalised hashed "
              "n-gram counts, class-balanced, Adam", "steps": cfg.steps, "l2": cfg.l2, "folds": cfg.folds,
              "held_out_docs": int(len(labels)), "held_out_auc": auc(p_all, labels),
              "train_auc": float(np.nanmean(train_aucs)) if train_aucs else float("nan")}
    return p, p, report


def _private(cfg: SelectConfig, bounded: np.ndarray, ids: Sequence[str], tokens: np.ndarray) -> tuple[np.ndarray, dict]:
    n = len(ids)
    # the budget fixes k; a token budget is turned into k by the non-private order (public: see docs)
    order = _order(bounded, ids)
    k = budget_count(order, n, cfg, tokens)
    keep, account = dp_top_k(bounded, ids, k, cfg.dp.epsilon, cfg.dp.delta, cfg.dp.seed, sensitivity=1.0)
    non_private = np.zeros(n, dtype=bool)
    non_private[order[:k]] = True
    overlap = int((keep & non_private).sum())
    account.update({
        "non_private_selector": "top-k of the same bounded score",
        "overlap": overlap, "overlap_share": overlap / k if k else None,
        "random_overlap_share": k / n if n else None,
        "mean_score_private": float(bounded[keep].mean()) if k else None,
        "mean_score_non_private": float(bounded[non_private].mean()) if k else None,
        "mean_score_all": float(bounded.mean()) if n else None,
    })
    if cfg.tokens is not None:
        account["k_from_tokens"] = ("k = documents of the non-private top order that fit the token budget; "
                                    "k depends on the data and is not covered by the guarantee")
    return keep, account


def _summary(keep: np.ndarray, tokens: np.ndarray, chars: np.ndarray, sources: np.ndarray) -> dict:
    sources = np.asarray(sources)
    return {"candidates": int(len(keep)), "selected": int(keep.sum()), "dropped": int((~keep).sum()),
            "tokens": {"candidates": int(tokens.sum()), "selected": int(tokens[keep].sum())},
            "chars": {"candidates": int(chars.sum()), "selected": int(chars[keep].sum())},
            "by_source": {str(s): {"candidates": int((sources == s).sum()),
                                   "selected": int((keep & (sources == s)).sum())} for s in np.unique(sources)}}
