"""The data pipeline: sources -> cleaned, deduplicated, filtered, mixed, augmented corpus + manifest.

`build_corpus(cfg)` (CLI: `llmkit data run --config X.yaml`) runs guide §1.1 end to end in five phases
(the lifecycle pipeline of `llmkit pipeline run`, `llmkit.pipeline`, runs it as its `data` stage):

1. **read** (per shard, parallel): read -> normalize -> heuristic quality -> sensitive information
   (PII redaction, lexicon) -> exact-dedup key and MinHash signature of each surviving document.
2. **dedup** (global): exact duplicates, then MinHash-LSH near-duplicate clusters over *all* signatures,
   one survivor per cluster - so the result is the same however the corpus was sharded.
3. **perplexity** (per shard): score the survivors with the reference model (an n-gram model trained on
   the trusted sources is the offline default).
4. **select** (global): perplexity thresholds (absolute or per-language percentile), then the selection
   step (`select:` - DSIR importance resampling, a quality classifier, a perplexity band, optionally
   differentially private; `llmkit.data.select`), then the domain mix.
5. **write** (per shard): the kept documents (augmented copies added) to `data/part-NNNNN.*`, every other
   document to `rejected/` with its reason; then `manifest.json`, the spot-check review page, optional
   token memmaps for `llmkit pretrain`, and the MLflow run.

Sensitive information runs before dedup (the guide lists it last): redacting first makes copies that
differ only in an e-mail address collide, and the cheap per-document filters shrink what the global
phases hold.

Every phase records its work in `work/` with a fingerprint of the config sections it depends on and of
its input files; a rerun (or a resumed run after a kill) skips what is complete and still valid and redoes
the rest. Every input document ends up exactly once in the output or in `rejected/`, so the funnel in the
manifest adds up: nothing is lost silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmkit.config import flatten, to_dict
from llmkit.data.augment import AugmentConfig, Augmenter
from llmkit.data.dedup import (
    DedupConfig,
    MinHasher,
    exact_duplicates,
    exact_key,
    near_duplicate_clusters,
    pick_survivors,
)
from llmkit.data.executor import ExecutorConfig, run_tasks
from llmkit.data.mix import MixConfig, order_key, select
from llmkit.data.normalize import NormalizeConfig, Normalizer
from llmkit.data.perplexity import PerplexityConfig, load_scorer, summarize, thresholds_per_language
from llmkit.data.quality import QualityConfig, QualityFilter
from llmkit.data.report import FORMAT_VERSION, build_manifest, manifest_markdown, manifest_metrics
from llmkit.data.safety import SafetyConfig, SafetyFilter
from llmkit.data.select import SelectConfig, read_target_texts, run_selection
from llmkit.data.shards import JsonlGzWriter, ParquetWriter, read_jsonl_gz
from llmkit.data.sources import ReadTask, SourceConfig, plan_tasks, read_task
from llmkit.data.spot_check import SpotCheckSampler
from llmkit.data.tokenized import encode_document, file_sha256, prepare_tokens
from llmkit.tokenizer import Tokenizer
from llmkit.track import TrackConfig, Tracker

log = logging.getLogger(__name__)

# final-phase fate of a document that survived the read phase
KEEP, DEDUP_EXACT, DEDUP_NEAR, PPL_HIGH, MIX_OUT = 0, 1, 2, 3, 4
SELECT_OUT = {"dsir": 5, "classifier": 6, "perplexity": 7}  # not selected by select.method
FATE_REASON = {DEDUP_EXACT: "dedup.exact", DEDUP_NEAR: "dedup.near", PPL_HIGH: "perplexity.high",
               MIX_OUT: "mix.not_sampled", **{code: f"select.{m}" for m, code in SELECT_OUT.items()}}
# a token estimate when no tokenizer is configured: each CJK character, and each run of other
# non-space characters, counts as one token
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN_ESTIMATE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


@dataclass
class OutputConfig:
    format: Literal["jsonl.gz", "parquet"] = "jsonl.gz"
    compression_level: int = 3
    """gzip level of jsonl.gz shards and work files (1 fastest .. 9 smallest)."""
    write_rejected: bool = True
    """Write every dropped document with its reason to rejected/ (the funnel counts them either way)."""
    spot_check_per_reason: int = 20
    """Documents per stratum (kept, and each drop reason) in review/review.html for a manual check."""
    tokenizer: str | None = None
    """An llmkit tokenizer (dir or tokenizer.json): count mix tokens with it and write token memmaps
    (tokens/, ready for `llmkit pretrain` with data.prepared=<out_dir>/tokens) after the text shards."""
    val_fraction: float = 0.1
    """Tail fraction of each output shard's tokens used for validation in tokens/."""

    def validate(self) -> None:
        if not 1 <= self.compression_level <= 9:
            raise ValueError(f"compression_level: {self.compression_level} is not in 1..9")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: {self.val_fraction} is not in [0, 1)")
        if self.spot_check_per_reason < 0:
            raise ValueError("spot_check_per_reason: must be >= 0")


@dataclass
class CorpusConfig:
    out_dir: str = "runs/data/quickstart"
    sources: list[SourceConfig] = field(default_factory=list)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("sources: list at least one source")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: names must be unique, {dup} repeat")
        scorer = self.perplexity.scorer
        if self.perplexity.enabled and scorer.kind == "ngram" and scorer.path is None:
            unknown = sorted(set(scorer.train_sources) - set(names))
            if not scorer.train_sources:
                raise ValueError("perplexity.scorer.train_sources: name the trusted sources to train the "
                                 "n-gram reference model on (or give scorer.path)")
            if unknown:
                raise ValueError(f"perplexity.scorer.train_sources: {unknown} are not sources ({names})")
        if self.select.enabled:
            unknown = sorted(set(self.select.sources) - set(names))
            if unknown:
                raise ValueError(f"select.sources: {unknown} are not sources ({names})")
            if self.select.method == "perplexity" and not self.perplexity.enabled:
                raise ValueError("select.method: perplexity needs perplexity.enabled: true (its scorer gives "
                                 "the scores; percentile: 100 keeps the filter itself from dropping anything)")


# -- fingerprints: what each phase depends on ---------------------------------------------------------
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def phase_fingerprints(cfg: CorpusConfig) -> dict[str, str]:
    """A hash per phase over the config sections it (or any earlier phase) depends on."""
    d = to_dict(cfg)
    read = _digest([FORMAT_VERSION, d["sources"], d["normalize"], d["quality"], d["safety"], d["dedup"],
                    d["mix"]["unit"], d["output"]["tokenizer"], d["executor"]["split_mb"]])
    dedup = _digest([read, d["dedup"]])
    ppl = _digest([dedup, d["perplexity"]])
    select = _digest([ppl, d["select"] if cfg.select.enabled else None, d["mix"]])
    write = _digest([select, d["augment"], d["output"]])
    return {"read": read, "dedup": dedup, "perplexity": ppl, "select": select, "write": write}


def _file_state(path: str) -> list:
    p = Path(path)
    if p.is_dir():
        return sorted([str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns]
                      for f in p.rglob("*") if f.is_file())
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


# -- small file helpers --------------------------------------------------------------------------------
def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1, default=str))
    os.replace(tmp, path)


def _read_done(path: Path, fingerprint: str) -> dict | None:
    """The completion record of a unit of work, if it exists and matches the current fingerprint."""
    try:
        done = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return done if done.get("fingerprint") == fingerprint else None


def count_tokens(text: str, tokenizer) -> int:
    if tokenizer is None:
        return len(_TOKEN_ESTIMATE.findall(text))
    return int(len(encode_document(tokenizer, text)))


# -- per-process step cache ---------------------------------------------------------------------------
_WORKER_CACHE: dict[str, Any] = {}


def _doc_steps(cfg: CorpusConfig, fingerprint: str) -> list[tuple[str, Any]]:
    key = "steps:" + fingerprint
    if key not in _WORKER_CACHE:
        steps: list[tuple[str, Any]] = []
        if cfg.normalize.enabled:
            steps.append(("normalize", Normalizer(cfg.normalize)))
        if cfg.quality.enabled:
            steps.append(("quality", QualityFilter(cfg.quality)))
        if cfg.safety.pii or cfg.safety.lexicon_files or cfg.safety.lexicon_words:
            steps.append(("safety", SafetyFilter(cfg.safety)))
        _WORKER_CACHE[key] = steps
    return _WORKER_CACHE[key]


def _tokenizer(path: str | None):
    if path is None:
        return None
    key = "tok:" + path
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = Tokenizer.load(path)
    return _WORKER_CACHE[key]


# -- phase 1: read and per-document steps ----------------------------------------------------------------
def _rejected_record(doc: dict, reason: str, detail: Any = None) -> dict:
    rec = {k: v for k, v in doc.items() if k != "error"}
    rec["reason"] = reason
    if detail is not None:
        rec["detail"] = detail
    return rec


def read_shard(cfg: CorpusConfig, task: ReadTask, index: int, fingerprint: str) -> dict:
    """Phase 1 for one shard; writes work/read/<key>.* and returns its completion record."""
    out = Path(cfg.out_dir)
    work = out / "work" / "read"
    done_path = work / f"{task.key}.done.json"
    src = next(s for s in cfg.sources if s.name == task.source)
    input_state = _file_state(task.path) if src.format != "hf" else None
    done = _read_done(done_path, fingerprint)
    if done is not None and done.get("input_state") == input_state:
        return done

    steps = _doc_steps(cfg, fingerprint)
    tokenizer = _tokenizer(cfg.output.tokenizer)
    level = cfg.output.compression_level
    kept = JsonlGzWriter(work / f"{task.key}.docs.jsonl.gz", level)
    rejected = JsonlGzWriter(out / "rejected" / f"{task.key}.read.jsonl.gz", level)
    sampler = SpotCheckSampler(cfg.output.spot_check_per_reason, seed=0)
    reasons: Counter = Counter()
    seconds: Counter = Counter()
    step_bytes: Counter = Counter()
    index_cols: dict[str, list] = {"id": [], "domain": [], "lang": [], "chars": [], "tokens": []}
    keys: list[bytes] = []
    texts: list[str] = []
    langs: list[str] = []
    signatures: list[np.ndarray] = []
    hasher = MinHasher.from_config(cfg.dedup) if cfg.dedup.near else None
    n_in = bytes_in = 0
    t_read = time.perf_counter()

    def flush_signatures() -> None:
        if hasher is not None and texts:
            t = time.perf_counter()
            signatures.append(hasher.signatures(texts, langs))
            seconds["dedup"] += time.perf_counter() - t
        texts.clear()
        langs.clear()

    for doc in read_task(src, task):
        n_in += 1
        size = len(doc["text"].encode("utf-8"))
        bytes_in += size
        if "error" in doc:
            reasons[doc["error"]["reason"]] += 1
            rej = _rejected_record(doc, doc["error"]["reason"], doc["error"])
            if cfg.output.write_rejected:
                rejected.write(rej)
            sampler.offer(rej, doc["error"]["reason"])
            continue
        reason = None
        for name, step in steps:
            if name in src.skip:
                continue
            step_bytes[name] += size
            t = time.perf_counter()
            reason = step(doc)
            seconds[name] += time.perf_counter() - t
            if reason is not None:
                break
        if reason is not None:
            reasons[reason] += 1
            if cfg.output.write_rejected:
                rejected.write(_rejected_record(doc, reason))
            sampler.offer(doc, reason)
            continue
        text = doc["text"]
        t = time.perf_counter()
        keys.append(exact_key(text))
        seconds["dedup"] += time.perf_counter() - t
        step_bytes["dedup"] += len(text.encode("utf-8"))
        if hasher is not None:
            texts.append(text)
            langs.append(doc.get("lang") or "und")
            if len(texts) >= 512:
                flush_signatures()
        index_cols["id"].append(doc["id"])
        index_cols["domain"].append(doc["domain"])
        index_cols["lang"].append(doc.get("lang") or "und")
        index_cols["chars"].append(len(text))
        index_cols["tokens"].append(count_tokens(text, tokenizer))
        kept.write(doc)
    flush_signatures()
    wall = time.perf_counter() - t_read

    n_kept = len(keys)
    sig = (np.concatenate(signatures) if signatures else
           np.zeros((0, cfg.dedup.num_perm if hasher else 0), dtype=np.uint32))
    np.save(work / f"{task.key}.sig.npy", sig)
    np.savez(work / f"{task.key}.index.npz",
             id=np.array(index_cols["id"], dtype=str), domain=np.array(index_cols["domain"], dtype=str),
             lang=np.array(index_cols["lang"], dtype=str), chars=np.array(index_cols["chars"], dtype=np.int64),
             tokens=np.array(index_cols["tokens"], dtype=np.int64),
             exact=np.array(keys, dtype="S16") if keys else np.zeros(0, dtype="S16"))
    kept.commit()
    rejected.commit()
    done = {"fingerprint": fingerprint, "input_state": input_state, "task": task.__dict__, "index": index,
            "source": src.name, "domain": src.domain, "docs_in": n_in, "bytes_in": bytes_in,
            "docs_kept": n_kept, "reasons": dict(reasons), "seconds": dict(seconds),
            "step_bytes": dict(step_bytes), "wall_seconds": wall, "sampler": sampler.to_dict()}
    _write_json_atomic(done_path, done)
    return done


# -- phase 2: global dedup ------------------------------------------------------------------------------
def dedup_phase(cfg: CorpusConfig, shards: list[dict], fingerprint: str) -> dict:
    """Exact, then near-duplicate removal over every shard's survivors; writes work/dedup.npz."""
    work = Path(cfg.out_dir) / "work"
    done_path = work / "dedup.done.json"
    done = _read_done(done_path, fingerprint)
    if done is not None and (work / "dedup.npz").is_file():
        return done
    t0 = time.perf_counter()
    index = [np.load(work / "read" / f"{s['key']}.index.npz") for s in shards]
    exact = np.concatenate([x["exact"] for x in index]) if index else np.zeros(0, dtype="S16")
    n = len(exact)
    fate = np.zeros(n, dtype=np.int8)
    dup_of = np.full(n, -1, dtype=np.int64)
    if cfg.dedup.exact and n:
        first = exact_duplicates(list(exact))
        fate[~first] = DEDUP_EXACT
        # remember which first occurrence each exact copy duplicates
        _, inverse = np.unique(exact, return_inverse=True)
        first_of = np.full(inverse.max() + 1, -1, dtype=np.int64)
        for i in np.flatnonzero(first):
            first_of[inverse[i]] = i
        dup_of[~first] = first_of[inverse[~first]]
    clusters = 0
    if cfg.dedup.near and n:
        alive = np.flatnonzero(fate == KEEP)
        sig = _concat_signatures(work, shards, cfg.dedup.num_perm, n)
        labels = near_duplicate_clusters(sig[alive], cfg.dedup.threshold, *cfg.dedup.lsh_params(),
                                         cfg.dedup.verify)
        chars = np.concatenate([x["chars"] for x in index])
        keep = pick_survivors(labels, chars[alive], cfg.dedup.keep)
        fate[alive[~keep]] = DEDUP_NEAR
        # the survivor of each cluster
        survivor_of_label = {int(labels[i]): int(alive[i]) for i in np.flatnonzero(keep)}
        dup_of[alive[~keep]] = [survivor_of_label[int(lab)] for lab in labels[~keep]]
        sizes = np.bincount(np.unique(labels, return_inverse=True)[1])
        clusters = int((sizes > 1).sum())
    np.savez(work / "dedup.npz", fate=fate, dup_of=dup_of)
    done = {"fingerprint": fingerprint, "docs": int(n), "exact": int((fate == DEDUP_EXACT).sum()),
            "near": int((fate == DEDUP_NEAR).sum()), "near_clusters": clusters,
            "seconds": time.perf_counter() - t0}
    _write_json_atomic(done_path, done)
    return done


def _concat_signatures(work: Path, shards: list[dict], num_perm: int, n: int) -> np.ndarray:
    """All shards' signatures in one file-backed array, so memory holds pages, not the whole matrix."""
    path = work / "signatures.u32"
    sig = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint32, shape=(n, num_perm))
    row = 0
    for s in shards:
        part = np.load(work / "read" / f"{s['key']}.sig.npy", mmap_mode="r")
        sig[row:row + len(part)] = part
        row += len(part)
    sig.flush()
    return np.load(path, mmap_mode="r")


# -- phase 3: perplexity -----------------------------------------------------------------------------------
def _scorer(cfg: CorpusConfig):
    key = "scorer:" + _digest(to_dict(cfg.perplexity))
    if key not in _WORKER_CACHE:
        scorer_cfg = cfg.perplexity.scorer
        if scorer_cfg.kind == "ngram" and scorer_cfg.path is None:
            scorer_cfg = type(scorer_cfg)(**{**scorer_cfg.__dict__,
                                             "path": str(Path(cfg.out_dir) / "work" / "scorer" / "ngram")})
        _WORKER_CACHE[key] = load_scorer(scorer_cfg, None)
    return _WORKER_CACHE[key]


def train_reference_model(cfg: CorpusConfig, shards: list[dict], fate: np.ndarray,
                          fingerprint: str) -> None:
    """The offline default scorer: an n-gram model trained on the cleaned, deduplicated documents of the
    trusted sources (`perplexity.scorer.train_sources`)."""
    work = Path(cfg.out_dir) / "work" / "scorer"
    done_path = work / "done.json"
    if _read_done(done_path, fingerprint) is not None:
        return
    work.mkdir(parents=True, exist_ok=True)
    trusted = set(cfg.perplexity.scorer.train_sources)

    def texts():
        offset = 0
        for s in shards:
            n = s["docs_kept"]
            if s["source"] in trusted:
                alive = fate[offset:offset + n] == KEEP
                for ok, doc in zip(alive, read_jsonl_gz(Path(cfg.out_dir) / "work" / "read" /
                                                        f"{s['key']}.docs.jsonl.gz")):
                    if ok:
                        yield doc["text"]
            offset += n

    scorer = load_scorer(cfg.perplexity.scorer, texts())
    scorer.save(work / "ngram")
    _write_json_atomic(done_path, {"fingerprint": fingerprint, "train_sources": sorted(trusted)})


def score_shard(cfg: CorpusConfig, key: str, alive: np.ndarray, fingerprint: str) -> dict:
    """Phase 3 for one shard: perplexity of its dedup survivors (NaN for the others)."""
    work = Path(cfg.out_dir) / "work"
    done_path = work / "ppl" / f"{key}.done.json"
    done = _read_done(done_path, fingerprint)
    if done is not None:
        return done
    scorer = _scorer(cfg)
    t = time.perf_counter()
    texts = [doc["text"] for ok, doc in zip(alive, read_jsonl_gz(work / "read" / f"{key}.docs.jsonl.gz"))
             if ok]
    ppl = np.full(len(alive), np.nan)
    if texts:
        ppl[np.flatnonzero(alive)] = scorer.perplexities(texts)
    np.save(work / "ppl" / f"{key}.npy", ppl)
    done = {"fingerprint": fingerprint, "seconds": time.perf_counter() - t,
            "bytes": sum(len(x.encode("utf-8")) for x in texts)}
    _write_json_atomic(done_path, done)
    return done


# -- phase 4: thresholds and mix ------------------------------------------------------------------------
def select_phase(cfg: CorpusConfig, shards: list[dict], fate: np.ndarray, ppl: np.ndarray | None,
                 fingerprint: str) -> dict:
    work = Path(cfg.out_dir) / "work"
    done_path = work / "select.done.json"
    done = _read_done(done_path, fingerprint)
    if done is not None and (work / "select.npz").is_file():
        return done
    idx = [np.load(work / "read" / f"{s['key']}.index.npz") for s in shards]
    cols = {c: (np.concatenate([x[c] for x in idx]) if idx else np.zeros(0)) for c in
            ("id", "domain", "lang", "chars", "tokens")}
    sources = np.concatenate([np.full(s["docs_kept"], s["source"]) for s in shards]) if shards else np.zeros(0)
    fate = fate.copy()
    copies = (fate == KEEP).astype(np.int64)
    info: dict[str, Any] = {"fingerprint": fingerprint}
    if ppl is not None:
        alive = fate == KEEP
        by_lang = {str(lang): ppl[alive & (cols["lang"] == lang)] for lang in np.unique(cols["lang"][alive])}
        # the reference model has seen its training documents, which score far better than any other
        # text: percentiles come from the rest of the corpus where a language has any
        trained = np.isin(sources, cfg.perplexity.scorer.train_sources) if cfg.perplexity.scorer.path is None \
            else np.zeros(len(sources), dtype=bool)
        basis = {}
        exempt = np.isin(sources, [s.name for s in cfg.sources if "perplexity" in s.skip])
        for lang, values in by_lang.items():
            untrained = ppl[alive & ~trained & ~exempt & (cols["lang"] == lang)]
            basis[lang] = untrained if len(untrained) else values
        limits = thresholds_per_language(basis, cfg.perplexity)
        limit = np.array([limits.get(str(lang), np.inf) for lang in cols["lang"]])
        high = alive & ~exempt & (ppl > limit)
        fate[high] = PPL_HIGH
        info["perplexity"] = {
            "thresholds": {k: float(v) for k, v in limits.items()},
            "by_domain": summarize({str(d): ppl[alive & (cols["domain"] == d)]
                                    for d in np.unique(cols["domain"][alive])}),
            "by_lang": summarize(by_lang),
            "unit": _scorer(cfg).unit,
        }
        copies[high] = 0
    sel_score = np.full(len(fate), np.nan)
    if cfg.select.enabled:
        info["select"], sel_score = _select_step(cfg, shards, fate, copies, cols, sources, ppl)
    if cfg.mix.enabled:
        alive = np.flatnonzero(fate == KEEP)
        sizes = cols["tokens"][alive] if cfg.mix.unit == "tokens" else np.ones(len(alive), dtype=np.int64)
        keys = np.array([order_key(cfg.mix.seed, i) for i in cols["id"][alive]], dtype=np.uint64)
        chosen, report = select(cols["domain"][alive], sources[alive], sizes.astype(np.float64), keys, cfg.mix)
        copies[alive] = chosen
        fate[alive[chosen == 0]] = MIX_OUT
        report["token_counter"] = (f"tokenizer {cfg.output.tokenizer}" if cfg.output.tokenizer else
                                   "estimate: CJK characters + runs of other non-space characters")
        info["mix"] = report
    np.savez(work / "select.npz", fate=fate, copies=copies, ppl=ppl if ppl is not None else np.zeros(0),
             select_score=sel_score)
    _write_json_atomic(done_path, info)
    return info


def _select_step(cfg: CorpusConfig, shards: list[dict], fate: np.ndarray, copies: np.ndarray,
                 cols: dict[str, np.ndarray], sources: np.ndarray, ppl: np.ndarray | None
                 ) -> tuple[dict, np.ndarray]:
    """The selection step (`select:`) over the documents still alive: marks the candidates it does not
    select (fate `select.<method>`, in place) and returns its report and a score per document (NaN for
    non-candidates, and for every document of a private selection: its scores are the private input)."""
    sc = cfg.select
    t0 = time.perf_counter()
    cand_mask = fate == KEEP
    if sc.sources:
        cand_mask &= np.isin(sources, sc.sources)
    cand = np.flatnonzero(cand_mask)
    texts: list[str] = []
    target: list[str] = []
    bad = 0
    if sc.method != "perplexity":
        work = Path(cfg.out_dir) / "work" / "read"
        offset = 0
        for s in shards:
            n = s["docs_kept"]
            want = cand_mask[offset:offset + n]
            if want.any():
                texts += [doc["text"] for ok, doc in zip(want, read_jsonl_gz(work / f"{s['key']}.docs.jsonl.gz"))
                          if ok]
            offset += n
        target, bad = read_target_texts(sc, Normalizer(cfg.normalize) if cfg.normalize.enabled else None)
    keep, score, report = run_selection(
        sc, texts, [str(i) for i in cols["id"][cand]], sources[cand], cols["tokens"][cand], cols["chars"][cand],
        cols["lang"][cand], None if ppl is None else ppl[cand], target)
    fate[cand[~keep]] = SELECT_OUT[sc.method]
    copies[cand[~keep]] = 0
    out = np.full(len(fate), np.nan)
    if not sc.dp.enabled:
        out[cand] = score
    report["reason"] = f"select.{sc.method}"
    if sc.method != "perplexity":
        report["target_files"] = list(sc.target)
        report["target_unreadable_records"] = bad
    report["token_counter"] = (f"tokenizer {cfg.output.tokenizer}" if cfg.output.tokenizer else
                               "estimate: CJK characters + runs of other non-space characters")
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report, out


# -- phase 5: write --------------------------------------------------------------------------------------
def write_shard(cfg: CorpusConfig, shard: dict, part: int, fate: np.ndarray, copies: np.ndarray,
                ppl: np.ndarray | None, dup_ids: list[str | None], fingerprint: str,
                sel_score: np.ndarray | None = None) -> dict:
    """Phase 5 for one shard: output part file, rejected file, augmented copies, spot-check sample."""
    out = Path(cfg.out_dir)
    work = out / "work"
    done_path = work / "write" / f"{shard['key']}.done.json"
    done = _read_done(done_path, fingerprint)
    suffix = "jsonl.gz" if cfg.output.format == "jsonl.gz" else "parquet"
    path = out / "data" / f"part-{part:05d}.{suffix}"
    if done is not None and path.is_file():
        return done
    level = cfg.output.compression_level
    writer = JsonlGzWriter(path, level) if suffix == "jsonl.gz" else ParquetWriter(path, level)
    rejected = JsonlGzWriter(out / "rejected" / f"{shard['key']}.final.jsonl.gz", level)
    sampler = SpotCheckSampler(cfg.output.spot_check_per_reason, seed=0)
    augmenter = _augmenter(cfg)
    reasons: Counter = Counter()
    kept_docs: list[dict] = []
    t_aug = 0.0
    repeats = 0
    for i, doc in enumerate(read_jsonl_gz(work / "read" / f"{shard['key']}.docs.jsonl.gz")):
        if ppl is not None and not np.isnan(ppl[i]):
            doc["stats"]["perplexity"] = round(float(ppl[i]), 3)
        if sel_score is not None and not np.isnan(sel_score[i]):
            doc["stats"]["select"] = {"method": cfg.select.method, "score": round(float(sel_score[i]), 6)}
        if fate[i] != KEEP:
            reason = FATE_REASON[int(fate[i])]
            reasons[reason] += 1
            detail = {"duplicate_of": dup_ids[i]} if dup_ids[i] is not None else None
            if cfg.output.write_rejected:
                rejected.write(_rejected_record(doc, reason, detail))
            sampler.offer(doc, reason)
            continue
        sampler.offer(doc, None)
        for k in range(int(copies[i])):
            writer.write({**doc, "repeat": k} if k else doc)
        repeats += max(0, int(copies[i]) - 1)
        if augmenter is not None and (not cfg.augment.domains or doc["domain"] in cfg.augment.domains):
            kept_docs.append(doc)
    added = 0
    if augmenter is not None and kept_docs:
        t = time.perf_counter()
        for new in augmenter.augment_batch(kept_docs):
            writer.write(new)
            added += 1
        t_aug = time.perf_counter() - t
    writer.commit()
    rejected.commit()
    done = {"fingerprint": fingerprint, "file": path.name, "docs": writer.count, "augmented": added,
            "repeats": repeats, "reasons": dict(reasons), "sha256": file_sha256(path),
            "bytes": path.stat().st_size, "augment_seconds": t_aug, "sampler": sampler.to_dict(),
            "augment_bytes": sum(len(d["text"].encode("utf-8")) for d in kept_docs)}
    _write_json_atomic(done_path, done)
    return done


def _augmenter(cfg: CorpusConfig):
    if not cfg.augment.enabled:
        return None
    key = "augment:" + _digest(to_dict(cfg.augment))
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = Augmenter(cfg.augment)
    return _WORKER_CACHE[key]


# -- the whole run ----------------------------------------------------------------------------------------
def build_corpus(cfg: CorpusConfig, restart: bool = False) -> dict:
    """Run (or resume) the data pipeline; returns the manifest (also written to out_dir/manifest.json).

    Args:
        cfg: the data pipeline's config (`load_config(CorpusConfig, path)`).
        restart: discard the work of an earlier run in out_dir first.
    """
    out = Path(cfg.out_dir)
    if restart and out.exists():
        shutil.rmtree(out)
    for sub in ("work/read", "work/ppl", "work/write", "rejected", "data", "review"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    fps = phase_fingerprints(cfg)
    t_start = time.perf_counter()
    tracker = Tracker(cfg.track, out)
    run_file = out / "work" / "run.json"
    prior = json.loads(run_file.read_text()) if run_file.is_file() else {}
    tracker.start(prior.get("run_id"))
    if tracker.run_id:
        _write_json_atomic(run_file, {"run_id": tracker.run_id})
    tracker.log_params(flatten(to_dict(cfg)))
    try:
        manifest = _run(cfg, fps, t_start)
        tracker.log_metrics(manifest_metrics(manifest), step=0)
        for src in manifest["inputs"]:
            tracker.log_dataset(f"source:{src['source']}", src["sha256"], src["path"], context="source")
        tracker.log_dataset(out.name, manifest["output"]["digest"], str((out / "data").resolve()),
                            context="output", profile={"docs": manifest["output"]["docs"]})
        tracker.log_artifact(out / "manifest.json")
        tracker.log_artifact(out / "review")
        tracker.end("FINISHED")
    except BaseException as e:
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    return manifest


def _run(cfg: CorpusConfig, fps: dict[str, str], t_start: float) -> dict:
    out = Path(cfg.out_dir)
    work = out / "work"
    tasks = [t for src in cfg.sources for t in plan_tasks(src, int(cfg.executor.split_mb * (1 << 20)))]
    # 1. read
    shards = run_tasks(read_shard, [(cfg, t, i, fps["read"]) for i, t in enumerate(tasks)], cfg.executor,
                       "read")
    for s, t in zip(shards, tasks):
        s["key"] = t.key
    # later phases are valid only for exactly these read results (an input changed -> redo them)
    read_digest = _digest([[s["key"], s["input_state"], s["docs_kept"]] for s in shards])
    fps = {phase: (fp if phase == "read" else _digest([fp, read_digest])) for phase, fp in fps.items()}
    if cfg.select.enabled and cfg.select.target:  # the target files are inputs of the select phase too
        target_state = _digest(_target_state(cfg.select.target))
        fps.update({p: _digest([fps[p], target_state]) for p in ("select", "write")})
    keys = {t.key for t in tasks}
    for stale in (out / "rejected").glob("*.jsonl.gz"):  # from shards of an earlier plan (split_mb, files)
        if stale.name.rsplit(".", 3)[0] not in keys:
            stale.unlink()
    n_alive = sum(s["docs_kept"] for s in shards)
    offsets = np.cumsum([0] + [s["docs_kept"] for s in shards])
    # 2. dedup
    dedup = dedup_phase(cfg, shards, fps["dedup"]) if (cfg.dedup.exact or cfg.dedup.near) else None
    if dedup is not None:
        d = np.load(work / "dedup.npz")
        fate, dup_of = d["fate"], d["dup_of"]
    else:
        fate, dup_of = np.zeros(n_alive, dtype=np.int8), np.full(n_alive, -1, dtype=np.int64)
    # 3. perplexity
    ppl = None
    ppl_runs: list[dict] = []
    if cfg.perplexity.enabled:
        if cfg.perplexity.scorer.kind == "ngram" and cfg.perplexity.scorer.path is None:
            train_reference_model(cfg, shards, fate, fps["perplexity"])
        ppl_runs = run_tasks(score_shard, [(cfg, s["key"], fate[offsets[i]:offsets[i + 1]] == KEEP,
                                            fps["perplexity"]) for i, s in enumerate(shards)],
                             cfg.executor, "perplexity")
        ppl = (np.concatenate([np.load(work / "ppl" / f"{s['key']}.npy") for s in shards]) if shards
               else np.zeros(0))
    # 4. select
    selection = select_phase(cfg, shards, fate, ppl, fps["select"])
    sel = np.load(work / "select.npz")
    fate, copies = sel["fate"], sel["copies"]
    sel_score = sel["select_score"] if "select_score" in sel.files else np.full(len(fate), np.nan)
    # 5. write
    ids = (np.concatenate([np.load(work / "read" / f"{s['key']}.index.npz")["id"] for s in shards])
           if shards else np.zeros(0, dtype=str))
    dup_ids = [str(ids[j]) if j >= 0 else None for j in dup_of]
    suffix = "jsonl.gz" if cfg.output.format == "jsonl.gz" else "parquet"
    for stale in (out / "data").glob("part-*"):
        if int(stale.name.split("-")[1].split(".")[0]) >= len(shards) or not stale.name.endswith(suffix):
            stale.unlink()
    written = run_tasks(write_shard, [
        (cfg, s, i, fate[offsets[i]:offsets[i + 1]], copies[offsets[i]:offsets[i + 1]],
         None if ppl is None else ppl[offsets[i]:offsets[i + 1]], dup_ids[offsets[i]:offsets[i + 1]],
         fps["write"], sel_score[offsets[i]:offsets[i + 1]]) for i, s in enumerate(shards)], cfg.executor,
        "write")
    tokens = _tokenize_output(cfg, written) if cfg.output.tokenizer else None
    review = _write_review(cfg, shards, written)
    manifest = build_manifest(cfg, inputs=input_digests(cfg, tasks), fingerprints=fps, shards=shards,
                              dedup=dedup, ppl_runs=ppl_runs, selection=selection, written=written,
                              tokens=tokens, review=review, wall=time.perf_counter() - t_start)
    _write_json_atomic(out / "manifest.json", manifest)
    (out / "report.md").write_text(manifest_markdown(manifest), encoding="utf-8")
    return manifest


def _target_state(paths: list[str]) -> list:
    """Size and mtime of every file behind select.target (files, directories, globs)."""
    import glob

    state = []
    for p in paths:
        files = [p] if Path(p).exists() else sorted(glob.glob(p, recursive=True))
        state.append([[f, _file_state(f)] for f in files])
    return state


def input_digests(cfg: CorpusConfig, tasks: list[ReadTask]) -> list[dict]:
    """sha256 of every input file (a state digest for dataset directories): the run's lineage."""
    inputs = []
    for src in cfg.sources:
        for f in sorted({t.path for t in tasks if t.source == src.name}):
            p = Path(f)
            inputs.append({"source": src.name, "domain": src.domain, "path": f,
                           "sha256": file_sha256(p) if p.is_file() else _digest(_file_state(f)),
                           "bytes": p.stat().st_size if p.is_file() else None})
    return inputs


def _tokenize_output(cfg: CorpusConfig, written: list[dict]) -> dict:
    files = [Path(cfg.out_dir) / "data" / w["file"] for w in written if w["docs"]]
    meta = prepare_tokens(files, Tokenizer.load(cfg.output.tokenizer), Path(cfg.out_dir) / "tokens",
                          val_fraction=cfg.output.val_fraction)
    return {"dir": "tokens", **{s: meta["splits"][s]["tokens"] for s in meta["splits"]},
            "sha256": meta["splits"]["train"]["sha256"]}


def _write_review(cfg: CorpusConfig, shards: list[dict], written: list[dict]) -> dict:
    sampler = SpotCheckSampler(cfg.output.spot_check_per_reason, seed=0)
    for part in [*shards, *written]:
        sampler.merge(SpotCheckSampler.from_dict(part["sampler"]))
    paths = sampler.write(Path(cfg.out_dir) / "review")
    return {"files": [str(Path(p).relative_to(cfg.out_dir)) for p in paths]}
