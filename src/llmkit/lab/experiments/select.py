"""§5: data selection for efficient pretraining, e.g. differentially private sampling: what does each selector of
`llmkit.data.select` buy over a random subset of the same size, and what does privacy cost?

Setup (fixed before the run):

* **target domain**: English Wikipedia (`en/wiki_demo.txt`, 30 articles, one per line). The articles are split
  by their index: i % 5 == 0 -> the held-out **validation** articles (never in the pool nor in the selectors'
  target sample), i % 5 == 1 -> the **target sample** the selectors see (`select.target`; also the training text
  of the perplexity band's reference model), the rest -> **pool** passages. Every article is cut into passages
  of about `PASSAGE_CHARS` characters at sentence ends (the file has no paragraph breaks).
* **candidate pool**: the data pipeline (`llmkit.data.corpus.build_corpus`: normalize, PII redaction, exact and
  MinHash dedup, perplexity scoring; the Gopher quality rules off, so the pool keeps the boilerplate and
  fragments the sources have) over five sources: the pool's Wikipedia passages (encyclopedia), the 300 C4 web
  pages (web), `SHAKESPEARE_BLOCKS` tinyshakespeare speeches (literature), alpaca_en and alpaca_zh (instructions;
  the zh records are off-target text in another language). Token counts are the model's BPE tokens.
* **arms**, every one the real selection step (`llmkit.data.select.run_selection`, what the pipeline's `select:`
  step calls) at seed s, each holding at least the budget of `BUDGET` tokens:
  random and random-b (two independent uniform samples without replacement, selection seeds s and s + 1000:
  DSIR's Gumbel-top-k resampler with equal weights; two, so that the spread between random subsets is measured), dsir
  (`method: dsir`, the paper's weight, `tokens` budget), classifier (`method: classifier`, top P(reference) by
  `tokens`), perplexity (`method: perplexity`: the head band [0, q] of each language under a character 5-gram
  model of the target sample, cc_net's "head" with a target-trained model; q the smallest multiple of 0.01 whose
  band holds the budget) and the classifier with `dp.epsilon` in `EPSILONS` (delta `DELTA`; k = the budget over
  the pool's mean document tokens, so a near-random pick of k documents still holds about the budget).
  The budgeted arms get `BUDGET` + the longest candidate's tokens, so each holds >= BUDGET tokens; then every
  arm's documents are shuffled (seed s) and their token stream (EOS after each document) is cut to the same
  T tokens, T = min(BUDGET, the smallest selection): every arm trains on exactly T tokens.
* **model**: `llmkit.train.pretrain` (`llmkit.lab.common.tiny_pretrain`), decoder 2 layers x d_model 64, 4 heads,
  block 64, batch 16, BPE 1000 (`llmkit.lab.common.bilingual_tokenizer`), `STEPS` steps at lr 2e-3, the same for
  every arm; seed s for the weights and the batch order. **Measured**: the exact loss over every token of the
  validation articles (non-overlapping windows of 64, `split_loss`).

Verdict (`verdict`), two halves, paired by seed. The baseline of a seed is the mean loss of its two random
subsets; the noise floor is the largest gap between the two random subsets over the seeds; an arm "beats random"
when it is below the baseline by more than max(`MARGIN`, noise floor) on every seed.
* selection: the best non-private selector (lowest mean loss of dsir, classifier, perplexity) beats random;
* private selection: some DP arm beats random.
"holds" if both, "partly holds" if one, "does not hold" if neither; "not measured" without both random arms, a
non-private selector and a DP arm. DP's utility cost = its loss - the non-private classifier's, per seed.

Revision: the first full run (one random subset, threshold `MARGIN` alone) gave "holds" because the DP arm at
epsilon 8 - whose pick is indistinguishable from random (overlap with the non-private top-k 0.10 = k/n) - came
out 0.05-0.09 nats below the random subset on all 3 seeds, while the other near-random DP arm (epsilon 512) was
0.03 above it on the mean: the spread between random subsets (~0.1-0.2 nats) dwarfed the 0.02 margin, which had
been set from model-initialisation noise. The second random subset and the noise floor were added for that; the
first run's figures are in docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result

MARGIN = 0.02  # nats/token: the least gain that counts, even when the two random subsets happen to agree
PASSAGE_CHARS = 1200
SHAKESPEARE_BLOCKS = 2000
BUDGET, STEPS = 120_000, 400
QUICK_BUDGET, QUICK_STEPS = 6_000, 6
EPSILONS = (8.0, 512.0)
DELTA = 1e-6
SWEEP = (1.0, 8.0, 64.0, 512.0, 4096.0, 32768.0)
"""Epsilons of the selection-only sweep (seed 0, no training): overlap of the private pick with the non-private
top-k, against what a random pick gets."""
NONPRIVATE = ("dsir", "classifier", "perplexity")


def dp_arm(eps: float) -> str:
    return f"dp-classifier eps {eps:g}"


RANDOM = ("random", "random-b")
RANDOM_B_OFFSET = 1000  # random-b's selection seed is s + this
ARMS = (*RANDOM, *NONPRIVATE, *(dp_arm(e) for e in EPSILONS))


# -- target-domain split ------------------------------------------------------------------------------------
def passages(text: str, size: int = PASSAGE_CHARS) -> list[str]:
    """`text` cut into passages of about `size` characters, each ending at a sentence end ('.', '!' or '?'
    followed by a space, an upper-case letter or the end); a passage is closed once it reaches `size`."""
    cuts = [m.end() for m in re.finditer(r"[.!?](?=\s|[A-Z]|$)", text)]
    out, start = [], 0
    for c in cuts:
        if c - start >= size:
            out.append(text[start:c].strip())
            start = c
    tail = text[start:].strip()
    if tail:
        if out and len(tail) < size // 4:
            out[-1] = out[-1] + " " + tail
        else:
            out.append(tail)
    return [p for p in out if p]


def split_articles(articles: list[str], size: int = PASSAGE_CHARS) -> dict[str, list[str]]:
    """{val, target, pool}: passages of the articles with index % 5 == 0, == 1, and the others."""
    parts: dict[str, list[str]] = {"val": [], "target": [], "pool": []}
    for i, article in enumerate(articles):
        part = "val" if i % 5 == 0 else "target" if i % 5 == 1 else "pool"
        parts[part] += passages(article, size)
    return parts


# -- the pool -----------------------------------------------------------------------------------------------
@dataclass
class Pool:
    texts: list[str]
    ids: list[str]
    sources: np.ndarray
    langs: np.ndarray
    ppl: np.ndarray
    tokens: list[np.ndarray]
    """Each document's tokens, EOS appended (what the training stream holds)."""
    target: list[str]
    target_file: str
    val_text: str
    report: dict

    @property
    def n_tokens(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], dtype=np.int64)


def build_pool(work: Path, tok_dir: Path, quick: bool) -> Pool:
    """Write the Wikipedia split, run the data pipeline over the pool's sources and read its output back."""
    from llmkit.config import load_config
    from llmkit.data.corpus import CorpusConfig, build_corpus
    from llmkit.data.ngram_lm import NgramLM
    from llmkit.data.normalize import NormalizeConfig, Normalizer
    from llmkit.data.select import SelectConfig, read_target_texts
    from llmkit.data.shards import read_jsonl_gz
    from llmkit.data.tokenized import encode_document
    from llmkit.lab.common import data_file
    from llmkit.tokenizer import Tokenizer

    work.mkdir(parents=True, exist_ok=True)
    articles = [a for a in data_file("en/wiki_demo.txt").read_text(encoding="utf-8").splitlines() if a.strip()]
    if quick:
        articles = articles[:10]
    parts = split_articles(articles)
    (work / "wiki_val.txt").write_text("\n".join(parts["val"]) + "\n", encoding="utf-8")
    (work / "wiki_target.txt").write_text("\n".join(parts["target"]) + "\n", encoding="utf-8")
    (work / "wiki_pool.txt").write_text("\n".join(parts["pool"]) + "\n", encoding="utf-8")
    max_docs = 60 if quick else None
    sources = [
        {"name": "wiki", "path": str(work / "wiki_pool.txt"), "domain": "encyclopedia", "max_docs": max_docs},
        {"name": "c4", "path": str(data_file("en/c4_demo.jsonl")), "domain": "web", "max_docs": max_docs},
        {"name": "shakespeare", "path": str(data_file("en/tinyshakespeare.txt")), "domain": "literature",
         "txt_mode": "block", "max_docs": 60 if quick else SHAKESPEARE_BLOCKS},
        {"name": "alpaca_en", "path": str(data_file("instruct/alpaca_en_demo.json")), "domain": "instructions",
         "text": ["instruction", "input", "output"], "max_docs": max_docs},
        {"name": "alpaca_zh", "path": str(data_file("instruct/alpaca_zh_demo.json")), "domain": "instructions",
         "text": ["instruction", "input", "output"], "max_docs": max_docs},
    ]
    # the perplexity band's reference model: a character 5-gram model of the target sample (cc_net's is
    # trained on Wikipedia), given to the pipeline by path so the target sample is not a pool source
    norm = Normalizer(NormalizeConfig())
    target, _ = read_target_texts(SelectConfig(enabled=True, target=[str(work / "wiki_target.txt")]), norm)
    ref = NgramLM.train(target, order=5, unit="char").save(work / "ref_char5.npz")
    config = {"out_dir": str(work / "pool"), "sources": sources, "quality": {"enabled": False},
              "perplexity": {"enabled": True, "percentile": 100.0,
                             "scorer": {"kind": "ngram", "path": str(ref), "order": 5, "unit": "char"}},
              "output": {"format": "jsonl.gz", "write_rejected": False}, "track": {"enabled": False},
              "executor": {"workers": 1, "progress": False}}
    cfg_file = work / "pool.json"
    cfg_file.write_text(json.dumps(config, indent=1))
    cfg = load_config(CorpusConfig, cfg_file)
    manifest = build_corpus(cfg, restart=True)
    docs = [d for f in sorted((work / "pool" / "data").glob("part-*.jsonl.gz")) for d in read_jsonl_gz(f)]
    tok = Tokenizer.load(tok_dir)
    eos = np.array([tok.eos_id], dtype=np.int64)
    tokens = [np.concatenate([encode_document(tok, d["text"]).astype(np.int64), eos]) for d in docs]
    return Pool(texts=[d["text"] for d in docs], ids=[str(d["id"]) for d in docs],
                sources=np.array([d["source"] for d in docs]), langs=np.array([d.get("lang") or "und" for d in docs]),
                ppl=np.array([d["stats"]["perplexity"] for d in docs], dtype=np.float64), tokens=tokens,
                target=target, target_file=str(work / "wiki_target.txt"), val_text="\n".join(_normalized(norm, p) for p in parts["val"]),
                report={"funnel": manifest.get("funnel"), "docs": len(docs)})


def _normalized(normalizer, text: str) -> str:
    doc = {"text": text}
    normalizer(doc)
    return doc["text"]


# -- the arms -----------------------------------------------------------------------------------------------
def select_arm(arm: str, pool: Pool, seed: int, budget: int) -> tuple[np.ndarray, dict]:
    """(mask of the selected pool documents, the selection's report) of one arm at one seed: the real
    selection step (`run_selection`), each arm holding at least `budget` tokens when the pool allows."""
    from llmkit.data.select import DPConfig, SelectConfig, gumbel_top_k, run_selection

    n_tok = pool.n_tokens
    chars = np.array([len(t) for t in pool.texts], dtype=np.int64)
    over = budget + int(n_tok.max())  # a budgeted prefix then holds >= budget tokens
    if arm in RANDOM:  # sampling without replacement with equal weights: a uniformly random subset
        sel_seed = seed + (RANDOM_B_OFFSET if arm == "random-b" else 0)
        cfg = SelectConfig(enabled=True, tokens=over, seed=sel_seed)
        keep = gumbel_top_k(np.zeros(len(pool.ids)), pool.ids, sel_seed, cfg, n_tok)
        return keep, {"method": "random", "selected": int(keep.sum())}
    common = dict(enabled=True, target=[pool.target_file], seed=seed)
    if arm == "perplexity":
        for q in np.arange(0.01, 1.0001, 0.01):
            cfg = SelectConfig(enabled=True, method="perplexity", low=0.0, high=float(min(q, 1.0)), seed=seed)
            keep, _, report = run_selection(cfg, pool.texts, pool.ids, pool.sources, n_tok, chars, pool.langs,
                                            pool.ppl, None)
            if n_tok[keep].sum() >= budget:
                return keep, report
        return keep, report
    if arm in ("dsir", "classifier"):
        cfg = SelectConfig(method=arm, tokens=over, **common)
    elif arm.startswith("dp-classifier"):
        eps = float(arm.rsplit(" ", 1)[1])
        k = math.ceil(over / float(n_tok.mean()))
        cfg = SelectConfig(method="classifier", k=k, dp=DPConfig(epsilon=eps, delta=DELTA, seed=seed), **common)
    else:
        raise ValueError(f"unknown arm {arm!r}")
    keep, _, report = run_selection(cfg, pool.texts, pool.ids, pool.sources, n_tok, chars, pool.langs, None,
                                    pool.target)
    return keep, report


def token_stream(tokens: list[np.ndarray], keep: np.ndarray, length: int, seed: int) -> np.ndarray:
    """The selected documents' tokens in a seeded random order, concatenated and cut to exactly `length`.

    Raises ValueError when the selection holds fewer than `length` tokens."""
    idx = np.flatnonzero(keep)
    order = np.random.default_rng(seed).permutation(len(idx))
    stream = np.concatenate([tokens[i] for i in idx[order]]) if len(idx) else np.zeros(0, dtype=np.int64)
    if len(stream) < length:
        raise ValueError(f"the selection holds {len(stream)} tokens, fewer than {length}")
    return stream[:length]


def write_token_dir(out: Path, train: np.ndarray, val: np.ndarray, tokenizer, train_bytes: int,
                    val_bytes: int) -> Path:
    """A tokenized data directory in `llmkit.data.tokenized`'s format (train-00000.bin, val-00000.bin,
    meta.json) holding exactly these two token streams; `llmkit pretrain` reads it as `data.prepared`."""
    from llmkit.data.tokenized import FORMAT_VERSION, META, token_dtype

    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {}
    for name, stream, n_bytes in (("train", train, train_bytes), ("val", val, val_bytes)):
        data = np.asarray(stream).astype(dtype)
        data.tofile(out / f"{name}-00000.bin")
        splits[name] = {"tokens": int(len(data)), "bytes": int(n_bytes),
                        "shards": [{"file": f"{name}-00000.bin", "tokens": int(len(data))}],
                        "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
    meta = {"format_version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "tokenizer_digest": tokenizer.digest(), "eos_between_docs": True, "val_fraction": 0.0,
            "sources": [], "splits": splits}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


# -- the decision ---------------------------------------------------------------------------------------------
def verdict(losses: dict[str, list[float]]) -> tuple[str, str]:
    """(verdict, reason) from the target validation loss per arm (one value per seed, paired by index): the two
    random subsets `random` and `random-b`, the non-private selectors (`NONPRIVATE`) and the DP arms (names
    starting with "dp"). See the module docstring for the criterion."""
    ra, rb = losses.get("random") or [], losses.get("random-b") or []
    selectors = {a: v for a, v in losses.items() if a in NONPRIVATE and v}
    private = {a: v for a, v in losses.items() if a.startswith("dp") and v}
    if not ra or not rb or not selectors or not private:
        return "not measured", "two random subsets, a non-private selector and a DP arm are all needed"
    base = [(a + b) / 2 for a, b in zip(ra, rb)]
    floor = max(MARGIN, max(abs(a - b) for a, b in zip(ra, rb)))

    def gains(values: list[float]) -> list[float]:
        return [r - v for r, v in zip(base, values)]

    best = min(selectors, key=lambda a: statistics.fmean(selectors[a]))
    g = gains(selectors[best])
    selection = bool(g) and all(x > floor for x in g)
    best_dp = min(private, key=lambda a: statistics.fmean(private[a]))
    gp = gains(private[best_dp])
    dp_ok = bool(gp) and all(x > floor for x in gp)
    reason = (f"threshold {floor:.3f} nats (max of {MARGIN} and the largest gap between the two random subsets); "
              f"best selector {best}: below random by {statistics.fmean(g):+.3f} (more than the threshold on "
              f"{sum(x > floor for x in g)}/{len(g)} seeds); best private arm {best_dp}: "
              f"{statistics.fmean(gp):+.3f} ({sum(x > floor for x in gp)}/{len(gp)} seeds)")
    if selection and dp_ok:
        return "holds", reason
    if selection:
        return "partly holds", reason + ": selection helps, private selection does not beat random"
    if dp_ok:
        return "partly holds", reason + ": private selection beats random, the best non-private one does not"
    return "does not hold", reason + ": no selector beats random on every seed"


# -- the experiment -------------------------------------------------------------------------------------------
def run(ctx: ExperimentContext) -> Result:
    import torch

    from llmkit.data.tokenized import encode_document
    from llmkit.lab.common import bilingual_tokenizer, tiny_pretrain
    from llmkit.lab.experiments.mixing import pretrain_val_loss
    from llmkit.lab.plots import bars
    from llmkit.tokenizer import Tokenizer

    budget, steps = (QUICK_BUDGET, QUICK_STEPS) if ctx.quick else (BUDGET, STEPS)
    work = ctx.out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    tok_dir = bilingual_tokenizer(ctx.out_dir.parent / "_shared")
    tok = Tokenizer.load(tok_dir)
    pool = build_pool(work, tok_dir, ctx.quick)
    pool_s = time.perf_counter() - t0
    val = encode_document(tok, pool.val_text)
    val_bytes = len(pool.val_text.encode("utf-8"))
    n_tok = pool.n_tokens
    # 1. every selection (cheap), then the common length T
    selections: dict[tuple[str, int], tuple[np.ndarray, dict]] = {}
    for seed in ctx.seeds:
        for arm in ARMS:
            selections[arm, seed] = select_arm(arm, pool, seed, budget)
    length = min([budget] + [int(n_tok[keep].sum()) for keep, _ in selections.values()])
    sweep = []
    k_dp = selections[dp_arm(EPSILONS[0]), ctx.seeds[0]][1]["dp"]["k"]
    for eps in (SWEEP[:2] if ctx.quick else SWEEP):
        keep, report = select_arm(dp_arm(eps), pool, ctx.seeds[0], budget)
        dp = report["dp"]
        sweep.append(f"| {eps:g} | {dp['epsilon_per_pick']:.3g} | {dp['noise_scale']:.3g} | {dp['overlap_share']:.2f} | "
                     f"{dp['random_overlap_share']:.2f} | {dp['mean_score_private']:.3f} | "
                     f"{dp['mean_score_non_private']:.3f} | {dp['mean_score_all']:.3f} |")
    # 2. pretrain on each and measure the target validation loss
    loss: dict[str, list[float]] = {a: [] for a in ARMS}
    wiki_share: dict[str, list[float]] = {a: [] for a in ARMS}
    zh_share: dict[str, list[float]] = {a: [] for a in ARMS}
    dp_overlap: dict[str, list[float]] = {a: [] for a in ARMS if a.startswith("dp")}
    threads = torch.get_num_threads()
    for seed in ctx.seeds:
        for arm in ARMS:
            keep, report = selections[arm, seed]
            chars = sum(len(pool.texts[i]) for i in np.flatnonzero(keep))
            wiki_share[arm].append(float(100.0 * n_tok[keep & (pool.sources == "wiki")].sum() / n_tok[keep].sum()))
            zh_share[arm].append(float(100.0 * n_tok[keep & (pool.sources == "alpaca_zh")].sum() / n_tok[keep].sum()))
            if arm in dp_overlap:
                dp_overlap[arm].append(float(report["dp"]["overlap_share"]))
            name = arm.replace(" ", "_")
            data = write_token_dir(work / "tokens" / f"{name}-s{seed}", token_stream(pool.tokens, keep, length, seed),
                                   val, tok, round(chars * length / max(1, n_tok[keep].sum())), val_bytes)
            s = tiny_pretrain(work / f"{name}-s{seed}", Path("unused.txt"), tok_dir, seed, steps,
                              data__inputs="[]", data__prepared=str(data), train__eval_batches=4)
            loss[arm].append(pretrain_val_loss(Path(s["final_model"]), data))
            torch.set_num_threads(threads)
            shutil.rmtree(work / f"{name}-s{seed}" / "checkpoints", ignore_errors=True)
    train_s = time.perf_counter() - t0 - pool_s
    decided, reason = verdict(loss)

    rnd = [(a + b) / 2 for a, b in zip(loss["random"], loss["random-b"])]  # the baseline of each seed
    floor = max(MARGIN, max(abs(a - b) for a, b in zip(loss["random"], loss["random-b"])))
    others = [a for a in ARMS if a not in RANDOM]
    mean = {a: statistics.fmean(v) for a, v in loss.items()}
    best = min(NONPRIVATE, key=lambda a: mean[a])
    cost = {a: [p - c for p, c in zip(loss[a], loss["classifier"])] for a in ARMS if a.startswith("dp")}
    ms = [Measurement(f"target val loss gain over random, {a}", [r - v for r, v in zip(rnd, loss[a])], "nats/token",
                      "selection beats random" if a == best else None) for a in others]
    ms += [Measurement("gap between the two random subsets, random - random-b",
                       [a - b for a, b in zip(loss["random"], loss["random-b"])], "nats/token")]
    ms += [Measurement(f"DP utility cost vs the non-private classifier, {a}", cost[a], "nats/token") for a in cost]
    ms += [Measurement(f"target val loss, {a}", loss[a], "nats/token") for a in ARMS]
    ms += [Measurement(f"Wikipedia share of the selection's tokens, {a}", wiki_share[a], "%") for a in ARMS]
    ms += [Measurement(f"overlap with the non-private top-k, {a}", dp_overlap[a], "") for a in dp_overlap]
    quick = " (quick run, not evidence)" if ctx.quick else ""
    plots = [bars(ctx.out_dir, "select_gain", ["random-b"] + others,
                  [[r - v for r, v in zip(rnd, loss[a])] for a in ["random-b"] + others],
                  "gain over random, nats/token",
                  f"What each selector buys over random{quick}", reference=floor,
                  ref_label=f"threshold {floor:.3f}")]
    pool_wiki = 100.0 * float(n_tok[pool.sources == "wiki"].sum()) / n_tok.sum()
    rows = ["| arm | train tokens | target val loss per seed | mean | vs random | Wikipedia share | alpaca_zh share |",
            "|---|---|---|---|---|---|---|"]
    for a in ARMS:
        per_seed = " / ".join(f"{v:.3f}" for v in loss[a])
        vs = f"{mean[a] - statistics.fmean(rnd):+.3f}"
        rows.append(f"| {a} | {length:,} | {per_seed} | {mean[a]:.3f} | {vs} | {statistics.fmean(wiki_share[a]):.0f}% "
                    f"| {statistics.fmean(zh_share[a]):.0f}% |")
    by_source = {str(s): int(n_tok[pool.sources == s].sum()) for s in np.unique(pool.sources)}
    details = (f"Target validation loss (nats/token) after {steps} steps on exactly {length:,} selected tokens; "
               "per-seed values in seed order; 'vs random' against the mean of the two random subsets; shares of "
               "the selection's tokens before the cut (mean over seeds). "
               f"Pool: {len(pool.ids):,} documents, {int(n_tok.sum()):,} tokens ("
               + ", ".join(f"{k} {v:,}" for k, v in by_source.items()) + f"); Wikipedia {pool_wiki:.0f}% of it.\n\n"
               + "\n".join(rows)
               + f"\n\nThe private classifier at more epsilons (seed {ctx.seeds[0]}, selection only, k = {k_dp}, delta "
               f"{DELTA:g}): overlap with the non-private top-k against k/n, a random pick's, and the mean P(reference) "
               "of the private pick, the non-private top-k and all candidates.\n\n"
               "| epsilon | epsilon per pick | Gumbel scale | overlap | random | mean score private | non-private | all |\n"
               "|---|---|---|---|---|---|---|---|\n" + "\n".join(sweep))
    dp_text = "; ".join(f"{a}: {statistics.fmean(cost[a]):+.3f} nats over the classifier (overlap with its top-k "
                        f"{statistics.fmean(dp_overlap[a]):.2f})" for a in cost)
    summary = (f"On equal {length:,}-token subsets of a mixed pool ({pool_wiki:.0f}% Wikipedia), the target (held-out "
               f"Wikipedia) loss is {mean['random']:.3f} and {mean['random-b']:.3f} for two random subsets, "
               + ", ".join(f"{a} {mean[a]:.3f}" for a in others)
               + f"; DP's utility cost: {dp_text}. Verdict: {reason}.")
    if ctx.quick:
        summary = "Quick run (not evidence). " + summary
    setup = (f"Pool built by the data pipeline (quality rules off, dedup, char 5-gram perplexity from the target "
             f"sample) in {pool_s:.0f} s: Wikipedia passages of {PASSAGE_CHARS} chars from 3/5 of the 30 wiki_demo "
             f"articles, C4 web, {SHAKESPEARE_BLOCKS} Shakespeare speeches, alpaca_en, alpaca_zh; target sample "
             f"1/5 of the articles, held-out validation the other 1/5 (article index mod 5). Arms via "
             f"llmkit.data.select.run_selection at each seed: two random subsets (equal-weight Gumbel-top-k), dsir, classifier "
             f"(token budget), perplexity head band [0, q] per language, classifier with dp.epsilon "
             f"{', '.join(f'{e:g}' for e in EPSILONS)} (delta {DELTA:g}); every subset cut to {length:,} tokens. "
             f"Decoder 2 x 64, 4 heads, block 64, batch 16, BPE 1000, {steps} steps, lr 2e-3, the same for every arm; "
             f"exact loss over the {len(val):,} validation tokens. 'holds': the best non-private selector and a DP "
             f"arm both below the mean of the two random subsets by more than max({MARGIN}, the largest gap between "
             f"the random subsets) = {floor:.3f} nats on every seed; 'partly': one of them. Training took "
             f"{train_s:.0f} s on {threads} thread(s); load average (1 min) {load_before[0]:.2f} before, "
             f"{os.getloadavg()[0]:.2f} after. Seeds {list(ctx.seeds)}.")
    return Result(ms, decided, summary, setup, plots, details=details)


CLAIM = Claim(
    id="select",
    section="§5",
    guide_zh="高效预训练:3D并行训练、数据选择算法(如Differential Privacy-based采样)",
    guide_en="Efficient pretraining: 3D-parallel training, data selection algorithms (e.g. differential-privacy-"
             "based sampling) (here: pretraining on a selected subset reaches a lower target-domain loss than on a "
             "random subset of the same tokens, and the private selector keeps that gain).",
    claimed="selected subset < random on target loss; DP sampling too",
    run=run,
    minutes=10.0,
)
