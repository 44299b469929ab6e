"""Perplexity filter: score every document with a language model, drop the ones it finds implausible.

Guide §1.1 filters low-quality text by perplexity ("drop documents with perplexity > 15"). cc_net
(Wenzek et al. 2019, "CCNet: Extracting High Quality Monolingual Datasets from Web Crawl Data") does it
with a 5-gram KenLM model trained on Wikipedia, one per language, and keeps per-language *percentiles*
rather than one absolute cut, because perplexities of different languages (and units) are not
comparable. This module offers both: an absolute `threshold`, or a per-language `percentile`.

Scorers share one interface, `.perplexity(text) -> float`, `.perplexities(texts) -> np.ndarray` and
`.unit` (what a token is; a perplexity is only meaningful together with its unit):

* `NgramLM` (default, no external model): an interpolated modified Kneser-Ney n-gram model (Chen &
  Goodman 1998, "An Empirical Study of Smoothing Techniques for Language Modeling", §3-4; the same
  estimator as KenLM's lmplz, Heafield et al. 2013), trained inside the pipeline on a trusted subset
  (e.g. the encyclopedia source, as cc_net uses Wikipedia). Unit: characters (works for zh and en with
  no tokenizer) or whitespace words. Every document is one sequence `<s> t1 .. tn </s>`; its
  perplexity is exp(-(1/(n+1)) sum ln p(t_i | history)), `</s>` included, as in SRILM and KenLM.
  Unseen tokens map to `<unk>`, which gets the uniform share of the unigram level's backoff mass.
* `LlmkitScorer`: token perplexity under any llmkit decoder checkpoint, sliding windows for long texts.
* `KenLMScorer`: an external KenLM model (ARPA or binary), e.g. one written by `NgramLM.to_arpa` or
  downloaded from cc_net.

How the n-gram model works and stays fast: `llmkit.data.ngram_lm`.

Drop reason: "perplexity.high" (the document's perplexity is above the threshold of its language).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from llmkit.data.ngram_lm import NgramLM, arpa_chars

__all__ = [
    "DROP_HIGH",
    "REASONS",
    "KenLMScorer",
    "LlmkitScorer",
    "NgramLM",
    "PerplexityConfig",
    "PerplexityFilter",
    "Scorer",
    "ScorerConfig",
    "arpa_chars",
    "lang_key",
    "load_scorer",
    "summarize",
    "thresholds_per_language",
]

DROP_HIGH = "perplexity.high"
"""Drop reason: perplexity above the (language's) threshold."""
REASONS = (DROP_HIGH,)

_UNDETERMINED = "und"  # BCP 47 "undetermined" language: documents whose lang is None


class Scorer(Protocol):
    unit: str

    def perplexity(self, text: str) -> float: ...

    def perplexities(self, texts: Sequence[str]) -> np.ndarray: ...


# -- llmkit checkpoint scorer ------------------------------------------------------------------------


class LlmkitScorer:
    """Token perplexity of texts under an llmkit decoder checkpoint directory.

    A text is scored as the model saw documents in pretraining (`prepare_tokens` appends EOS after
    every document): the context starts with EOS (with bos for an imported model whose tokenizer adds bos,
    `Tokenizer.add_bos_token`), and the text's tokens plus a closing EOS are predicted. Texts longer than `block_size` use sliding windows (stride block_size // 2, as in the
    HF perplexity guide): every token is predicted exactly once, with at least block_size // 2 tokens
    of context after the first window. Windows of all texts are batched `batch_size` at a time,
    right-padded (causal attention: padding never influences real positions) and masked out of the loss.

    Args:
        model_dir: directory written by `llmkit.models.io.save_model` with a tokenizer.
        device: torch device ("cpu", "cuda").
        batch_size: windows per forward pass.
        max_tokens: score only the first max_tokens tokens of each text (None: all).
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", batch_size: int = 8,
                 max_tokens: int | None = None):
        from llmkit.models.decoder import Decoder
        from llmkit.models.io import load_model
        from llmkit.tokenizer import Tokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.model = load_model(model_dir, device=device)
        if not isinstance(self.model, Decoder):
            raise ValueError(f"{model_dir}: perplexity needs a decoder (causal LM) checkpoint, "
                             f"got {type(self.model).__name__}")
        self.tokenizer = Tokenizer.load(model_dir)
        self.device = device
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.block = self.model.config.block_size
        self.stride = max(1, self.block // 2)
        self.unit = f"token (tokenizer {self.tokenizer.kind}:{self.tokenizer.digest()[:12]})"

    def _windows(self, n_ids: int) -> list[tuple[int, int, int]]:
        """Windows over a sequence of `n_ids` + 2 tokens (EOS, text, EOS): (start, end, first counted target).

        Window inputs are x[start:end]; it predicts x[start+1:end+1]; targets at positions >= first are
        counted (earlier ones were counted by the previous window).
        """
        last = n_ids + 1  # index of the final target (the closing EOS)
        out, start, done = [], 0, 0
        while done < last:
            end = min(start + self.block, last)
            out.append((start, end, done + 1))
            done = end
            start += self.stride
        return out

    def nll(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(sum of token negative log-likelihoods in nats, tokens predicted) per text: two (len(texts),) arrays."""
        import torch
        import torch.nn.functional as F

        tok = self.tokenizer
        eos = tok.eos_id if tok.eos_id is not None else tok.pad_id
        # the context starts as the model's documents start: with bos where the model declares it (Llama /
        # Gemma-style tokenizers, as transformers' tokenizer(text) encodes), else with EOS (llmkit's
        # pretraining, which closes every document with EOS)
        first_id = tok.bos_id if tok.add_bos_token else eos
        encoded = tok.encode_batch(list(texts)) if len(texts) else []
        seqs, jobs = [], []
        for i, ids in enumerate(encoded):
            if self.max_tokens is not None:
                ids = ids[:self.max_tokens]
            x = np.asarray([first_id, *ids, eos], dtype=np.int64)
            seqs.append(x)
            for start, end, first in self._windows(len(ids)):
                jobs.append((i, start, end, first))
        # Longest windows first: a batch pads to its first window's length, so little padding is wasted.
        jobs.sort(key=lambda j: j[2] - j[1], reverse=True)
        sums = np.zeros(len(seqs), dtype=np.float64)
        counts = np.zeros(len(seqs), dtype=np.int64)
        pad = self.tokenizer.pad_id
        with torch.inference_mode():
            for b in range(0, len(jobs), self.batch_size):
                batch = jobs[b:b + self.batch_size]
                width = max(end - start for _, start, end, _ in batch)
                inp = np.full((len(batch), width), pad, dtype=np.int64)
                tgt = np.full((len(batch), width), -100, dtype=np.int64)
                for r, (i, start, end, first) in enumerate(batch):
                    x = seqs[i]
                    inp[r, :end - start] = x[start:end]
                    lo = first - start - 1  # window-local index of the first counted target
                    tgt[r, lo:end - start] = x[first:end + 1]
                inp_t = torch.from_numpy(inp).to(self.device)
                tgt_t = torch.from_numpy(tgt).to(self.device)
                logits, _ = self.model(inp_t)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tgt_t.reshape(-1),
                                       ignore_index=-100, reduction="none").view(len(batch), width)
                per_row = loss.sum(dim=1).double().cpu().numpy()
                n_row = (tgt_t != -100).sum(dim=1).cpu().numpy()
                for r, (i, *_rest) in enumerate(batch):
                    sums[i] += per_row[r]
                    counts[i] += n_row[r]
        return sums, counts

    def perplexities(self, texts: Sequence[str]) -> np.ndarray:
        """exp(mean token NLL) per text: (len(texts),) float64."""
        sums, counts = self.nll(texts)
        return np.exp(sums / np.maximum(counts, 1))

    def perplexity(self, text: str) -> float:
        return float(self.perplexities([text])[0])


# -- KenLM scorer ----------------------------------------------------------------------------------


class KenLMScorer:
    """Perplexity under a KenLM model (ARPA or KenLM binary), via the `kenlm` package.

    `tokenize` says how a text becomes KenLM's space-separated tokens: "chars" (`arpa_chars`, matching
    `NgramLM.to_arpa` for unit="char"), "words" (`str.split()`), or "none" (the text is already
    tokenised, e.g. sentencepiece pieces as cc_net's models expect). Per text, perplexity is
    10^(-log10 p(text </s> | <s>) / (tokens + 1)), as `kenlm.Model.perplexity`.
    """

    def __init__(self, path: str | Path, tokenize: Literal["chars", "words", "none"] = "chars"):
        try:
            import kenlm
        except ImportError as e:
            raise ImportError("KenLMScorer needs the kenlm package: pip install llmkit[kenlm]") from e
        if tokenize not in ("chars", "words", "none"):
            raise ValueError(f"tokenize: expected chars / words / none, got {tokenize!r}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"KenLM model {path} not found")
        self.model = kenlm.Model(str(path))
        self.tokenize = tokenize
        self.unit = {"chars": "char", "words": "word", "none": "token (pre-tokenised text)"}[tokenize]

    def _tokens(self, text: str) -> str:
        if self.tokenize == "chars":
            return arpa_chars(text)
        return " ".join(text.split())

    def log10_prob(self, text: str) -> float:
        """log10 p(tokens of text, </s> | <s>)."""
        return float(self.model.score(self._tokens(text), bos=True, eos=True))

    def perplexities(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty(len(texts), dtype=np.float64)
        for i, t in enumerate(texts):
            s = self._tokens(t)
            n = len(s.split()) + 1
            out[i] = 10.0 ** (-self.model.score(s, bos=True, eos=True) / n)
        return out

    def perplexity(self, text: str) -> float:
        return float(self.perplexities([text])[0])


# -- configuration ---------------------------------------------------------------------------------


@dataclass
class ScorerConfig:
    kind: Literal["ngram", "llmkit", "kenlm"] = "ngram"
    """ngram: `NgramLM` (trained in the pipeline unless `path` is set); llmkit: a decoder checkpoint
    directory; kenlm: a KenLM ARPA / binary file."""
    path: str | None = None
    """Model file (ngram .npz, kenlm .arpa/.bin) or checkpoint directory (llmkit). For ngram, None means
    "train on the trusted sources" (train_sources)."""
    train_sources: list[str] = field(default_factory=list)
    """Names of the pipeline sources that form the trusted training subset (ngram, path None), e.g. the
    encyclopedia source (cc_net trains on Wikipedia). Include a trusted source for every language."""
    order: int = 5
    """n-gram order (ngram)."""
    unit: Literal["char", "word"] = "char"
    """ngram token unit: code points (any language) or whitespace words (not for zh/ja)."""
    tokenize: Literal["chars", "words", "none"] = "chars"
    """How texts are split for kenlm (chars matches NgramLM.to_arpa with unit char)."""
    device: str = "cpu"
    """torch device for llmkit."""
    batch_size: int = 8
    """Windows per forward pass (llmkit)."""
    max_tokens: int | None = None
    """llmkit: score only the first max_tokens tokens of a document (None: all)."""
    max_train_chars: int = 20_000_000
    """ngram: cap on training characters (training peaks at ~85 bytes of memory per character)."""

    def validate(self) -> None:
        if self.kind in ("llmkit", "kenlm") and not self.path:
            raise ValueError(f"path: required for kind {self.kind!r}")
        if not 1 <= self.order <= 12:
            raise ValueError(f"order: expected 1..12, got {self.order}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1 or null, got {self.max_tokens}")
        if self.max_train_chars < 1:
            raise ValueError(f"max_train_chars: must be >= 1, got {self.max_train_chars}")

    def is_training_doc(self, doc: dict) -> bool:
        """Whether `doc` belongs to the trusted training subset (its source is one of train_sources)."""
        return doc.get("source") in self.train_sources


@dataclass
class PerplexityConfig:
    enabled: bool = False
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    threshold: float | None = None
    """Absolute cut: drop documents with perplexity > threshold (in the scorer's unit; see docs/data.md)."""
    percentile: float | None = None
    """Per-language cut, cc_net style: drop documents above this percentile (0-100] of their language's
    perplexity distribution, e.g. 90.0 drops the worst 10% of every language."""

    def validate(self) -> None:
        self.scorer.validate()
        if not self.enabled:
            return
        if (self.threshold is None) == (self.percentile is None):
            raise ValueError("threshold: set exactly one of threshold / percentile when enabled")
        if self.threshold is not None and not self.threshold > 0:
            raise ValueError(f"threshold: must be > 0, got {self.threshold}")
        if self.percentile is not None and not 0 < self.percentile <= 100:
            raise ValueError(f"percentile: must be in (0, 100], got {self.percentile}")


def load_scorer(cfg: ScorerConfig, train_texts: Iterable[str] | None = None) -> Scorer:
    """The scorer `cfg` describes. For kind "ngram" with path None the model is trained on `train_texts`
    (at most cfg.max_train_chars characters of them)."""
    if cfg.kind == "llmkit":
        return LlmkitScorer(cfg.path, device=cfg.device, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens)
    if cfg.kind == "kenlm":
        return KenLMScorer(cfg.path, tokenize=cfg.tokenize)
    if cfg.kind != "ngram":
        raise ValueError(f"kind: unknown scorer {cfg.kind!r}")
    if cfg.path is not None:
        model = NgramLM.load(cfg.path)
        if model.unit != cfg.unit or model.order != cfg.order:
            raise ValueError(f"path: {cfg.path} holds a {model.unit} order-{model.order} model, "
                             f"config asks for {cfg.unit} order {cfg.order}")
        return model
    if train_texts is None:
        raise ValueError("load_scorer: the ngram scorer has no path, so training texts are required")
    return NgramLM.train(train_texts, order=cfg.order, unit=cfg.unit, max_chars=cfg.max_train_chars)


# -- thresholds, reports, the step -------------------------------------------------------------------


def lang_key(doc: dict) -> str:
    """Language bucket of a document for per-language thresholds: doc["lang"], or "und" when unknown."""
    return doc.get("lang") or _UNDETERMINED


def thresholds_per_language(scores: dict[str, np.ndarray], cfg: PerplexityConfig) -> dict[str, float]:
    """Cut-off perplexity per language: {lang: threshold}.

    `scores` maps a language to the perplexities of its documents. With cfg.threshold every language
    gets that value; with cfg.percentile each language gets its own np.percentile (linear
    interpolation) of its scores. Languages without scores get no entry (their documents are kept).
    """
    out = {}
    for lang, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        s = s[np.isfinite(s)]
        if cfg.threshold is not None:
            out[lang] = float(cfg.threshold)
        elif cfg.percentile is not None and len(s):
            out[lang] = float(np.percentile(s, cfg.percentile))
    return out


def summarize(scores_by_group: dict[str, np.ndarray]) -> dict[str, dict]:
    """Perplexity distribution per group (domain, source or language) for the report.

    Returns {group: {"count", "mean", "min", "p10", "p25", "p50", "p75", "p90", "max"}}; NaN scores
    (unscored documents) are left out of all figures, count included; the statistics are None for an
    empty group. Values are rounded to 3 decimals.
    """
    out = {}
    for group, s in scores_by_group.items():
        s = np.asarray(s, dtype=np.float64)
        s = s[~np.isnan(s)]
        if not len(s):
            out[group] = {"count": 0, **{k: None for k in ("mean", "min", "p10", "p25", "p50", "p75", "p90", "max")}}
            continue
        q = np.percentile(s, [10, 25, 50, 75, 90])
        out[group] = {"count": int(len(s)), "mean": round(float(s.mean()), 3), "min": round(float(s.min()), 3),
                      **{f"p{p}": round(float(v), 3) for p, v in zip((10, 25, 50, 75, 90), q)},
                      "max": round(float(s.max()), 3)}
    return out


class PerplexityFilter:
    """The pipeline step: annotate doc["stats"]["ppl"] and drop documents over their language's threshold.

    Absolute mode (cfg.threshold) works document by document. Percentile mode needs the distribution
    first: score all documents (`score`), then `fit` the per-language thresholds, then call the step.
    `score` batches many documents into one scorer call (much faster than one call per document).
    """

    def __init__(self, cfg: PerplexityConfig, scorer: Scorer, thresholds: dict[str, float] | None = None):
        self.cfg = cfg
        self.scorer = scorer
        self.thresholds = thresholds

    def score(self, docs: Sequence[dict]) -> np.ndarray:
        """Set doc["stats"]["ppl"] (rounded to 3 decimals) for every doc; returns the (len(docs),) scores."""
        ppl = self.scorer.perplexities([d["text"] for d in docs])
        for d, v in zip(docs, ppl):
            d.setdefault("stats", {})["ppl"] = round(float(v), 3)
        return ppl

    def fit(self, docs: Iterable[dict]) -> dict[str, float]:
        """Per-language thresholds from already scored docs (stats["ppl"]); stored and returned."""
        by_lang: dict[str, list[float]] = {}
        for d in docs:
            by_lang.setdefault(lang_key(d), []).append(d["stats"]["ppl"])
        self.thresholds = thresholds_per_language({k: np.asarray(v) for k, v in by_lang.items()}, self.cfg)
        return self.thresholds

    def __call__(self, doc: dict) -> str | None:
        stats = doc.setdefault("stats", {})
        if "ppl" not in stats:
            self.score([doc])
        if self.cfg.threshold is not None:
            limit = self.cfg.threshold
        else:
            if self.thresholds is None:
                raise RuntimeError("percentile mode: call fit() on the scored documents before filtering")
            limit = self.thresholds.get(lang_key(doc))
        if limit is not None and stats["ppl"] > limit:
            return DROP_HIGH
        return None

