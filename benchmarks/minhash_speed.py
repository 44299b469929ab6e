"""MinHash signature throughput (MB/s of UTF-8 text, one process, one core) of llmkit's vectorised
MinHasher vs datasketch's MinHash.update_batch, and their Jaccard estimation accuracy.

Corpora (../shared/data)
  en: "the en demo corpus" = the 300 texts of en/c4_demo.jsonl + the 30 articles (lines) of
      en/wiki_demo.txt, 1.77 MB; word 5-grams.
  zh: zh/*.json poems and prose chapters + instruct/alpaca_zh_demo.json records, 1.41 MB; character
      n-grams of DedupConfig's zh size.
Timings for num_perm 128 and 256, all in this one process, in --repeat rounds that interleave the
contestants (order rotating per round); MB/s is each contestant's best round:
  ours_batch       MinHasher.signatures(all texts)          (what the pipeline calls per shard)
  ours_per_doc     MinHasher.signature(text) per document
  datasketch's fast path (MinHash.bulk: one MinHash built, its permutations shared by a copy per document;
  datasketch's default scheme: sha1_hash32 + affine32 permutations, the same estimator as MinHash(...)):
  datasketch_bulk_e2e            the same tokens (TOKEN_PATTERN), shingle strings, utf-8, MinHash.bulk
  datasketch_bulk_hash_only      MinHash.bulk alone, shingle bytes prepared outside the timer
  datasketch_shared_perm_hash_only   MinHash(num_perm, permutations=<shared>, scheme="affine32")
                                 .update_batch per document, shingle bytes prepared outside the timer
  datasketch_new_per_doc_hash_only   MinHash(num_perm).update_batch per document (the constructor draws
                                 the permutations again for every document), for comparison
The reference for the ratios is datasketch_fast = the faster of bulk / shared permutations (hash only).
Ratios are ours_batch speed / each other speed, computed within each round; the median over rounds is
reported with its range. Accuracy: on the injected (source, copy) pairs of
benchmarks/dedup_quality.py (en, edit rates 1-30%, true J ~0.1-0.95) the error est - J of both
estimators: bias, RMSE, mean of err^2 / (J(1-J)/P) (1.0 = the binomial variance of an ideal MinHash),
and a paired z-test of err_ours^2 - err_datasketch^2 (|z| < 2: no detectable difference).

    .venv/bin/python benchmarks/minhash_speed.py      # prints JSON (about 30 s on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dedup_quality import build_labelled, load_en_demo_corpus, load_zh, shingle_sets  # noqa: E402
from llmkit.data.dedup import (  # noqa: E402
    TOKEN_PATTERN,
    DedupConfig,
    MinHasher,
    exact_key,
    near_duplicate_clusters,
)


def best_of(fn, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def shingle_bytes(text: str, n: int) -> list[bytes]:
    tok = TOKEN_PATTERN.findall(text.lower())
    return [" ".join(tok[i:i + n]).encode("utf-8") for i in range(max(1, len(tok) - n + 1))] if tok else []


def speed(texts: list[str], lang: str, num_perm: int, repeat: int) -> dict:
    from datasketch import MinHash

    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    hasher = MinHasher(num_perm=num_perm, ngram=DedupConfig().ngram)
    n = hasher.ngram_for(lang)
    hasher.signatures(texts[:2], lang)  # build the character table outside the timer (once per process)

    prepared = [shingle_bytes(t, n) for t in texts]
    template = MinHash(num_perm=num_perm)  # the permutations every fast-path MinHash shares

    def ds_bulk_e2e():
        MinHash.bulk((shingle_bytes(t, n) for t in texts), num_perm=num_perm)

    def ds_bulk():
        MinHash.bulk(prepared, num_perm=num_perm)

    def ds_shared():
        for s in prepared:
            MinHash(num_perm=num_perm, permutations=template.permutations, scheme=template.scheme).update_batch(s)

    def ds_new_per_doc():
        for s in prepared:
            MinHash(num_perm=num_perm).update_batch(s)

    # the fast paths give the very signatures of a fresh MinHash(num_perm) per document
    check = prepared[: min(20, len(prepared))]
    for s in check:
        fresh = MinHash(num_perm=num_perm)
        fresh.update_batch(s)
        bulk = MinHash.bulk([s], num_perm=num_perm)[0]
        assert (fresh.digest() == bulk.digest()).all()

    contestants = {"ours_batch": lambda: hasher.signatures(texts, lang),
                   "ours_per_doc": lambda: [hasher.signature(t, lang) for t in texts],
                   "datasketch_bulk_e2e": ds_bulk_e2e,
                   "datasketch_bulk_hash_only": ds_bulk,
                   "datasketch_shared_perm_hash_only": ds_shared,
                   "datasketch_new_per_doc_hash_only": ds_new_per_doc}
    # rounds interleave the contestants (the order rotating each round), so a burst of load from other
    # jobs on the machine hits one round of every contestant rather than all runs of one of them
    names = list(contestants)
    rounds: list[dict[str, float]] = []
    for r in range(repeat):
        sec_r = {}
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            contestants[name]()
            sec_r[name] = time.perf_counter() - t0
        sec_r["datasketch_fast"] = min(sec_r["datasketch_bulk_hash_only"], sec_r["datasketch_shared_perm_hash_only"])
        rounds.append(sec_r)
    sec = {k: min(x[k] for x in rounds) for k in rounds[0]}
    out = {"docs": len(texts), "mb": round(mb, 3), "ngram": n,
           "mb_per_s": {k: round(mb / v, 2) for k, v in sec.items()}}
    # per-round ratios (each from runs minutes apart at most), their median and range
    per_round = {k: [x[k] / x["ours_batch"] for x in rounds] for k in sec if k != "ours_batch"}
    out["ratio_ours_batch_vs"] = {k: round(float(np.median(v)), 2) for k, v in per_round.items()}
    out["ratio_range"] = {k: [round(min(v), 2), round(max(v), 2)] for k, v in per_round.items()}
    return out


def accuracy(num_perm: int, per_rate: int, seed: int) -> dict:
    from datasketch import MinHash

    texts, injected = build_labelled("en", per_rate, seed, rates=(0.01, 0.03, 0.05, 0.1, 0.2, 0.3))
    sets = shingle_sets(texts, 5)
    sigs = MinHasher(num_perm=num_perm).signatures(texts, "en")
    used = sorted({i for s, c, _ in injected for i in (s, c)})
    ds = {}
    for i in used:
        m = MinHash(num_perm=num_perm)
        m.update_batch([x.encode("utf-8") for x in sets[i]])
        ds[i] = m
    true_j = np.array([len(sets[s] & sets[c]) / len(sets[s] | sets[c]) for s, c, _ in injected])
    est = {"ours": np.array([np.mean(sigs[s] == sigs[c]) for s, c, _ in injected]),
           "datasketch": np.array([ds[s].jaccard(ds[c]) for s, c, _ in injected])}
    var = np.maximum(true_j * (1 - true_j) / num_perm, 1e-12)
    out = {"pairs": len(injected),
           "true_j_range": [round(float(true_j.min()), 3), round(float(true_j.max()), 3)]}
    for name, e in est.items():
        err = e - true_j
        out[name] = {"bias": round(float(err.mean()), 5), "rmse": round(float(np.sqrt((err ** 2).mean())), 5),
                     "mse_over_binomial": round(float((err ** 2 / var).mean()), 3)}
    d = (est["ours"] - true_j) ** 2 - (est["datasketch"] - true_j) ** 2
    z = float(d.mean() / (d.std(ddof=1) / math.sqrt(d.size)))
    out["paired_sq_error_z"] = round(z, 3)
    out["p_value_two_sided"] = round(math.erfc(abs(z) / math.sqrt(2)), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds (best MB/s, median per-round ratio)")
    ap.add_argument("--per-rate", type=int, default=150, help="accuracy pairs per edit rate")
    args = ap.parse_args()
    corpora = {"en": load_en_demo_corpus(), "zh": load_zh()}
    import datasketch

    report = {"note": "one process; MB/s of UTF-8 input: best of --repeat interleaved rounds; ratios: median of per-round ratios", "datasketch": datasketch.__version__,
              "repeat": args.repeat, "speed": {}, "accuracy": {}, "other_steps": {}}
    for lang, texts in corpora.items():
        for num_perm in (128, 256):
            report["speed"][f"{lang}_{num_perm}"] = speed(texts, lang, num_perm, args.repeat)
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        sec = best_of(lambda texts=texts: [exact_key(t) for t in texts], args.repeat)
        sigs = MinHasher().signatures(texts, lang)
        lsh = best_of(lambda sigs=sigs: near_duplicate_clusters(sigs, 0.9), args.repeat)
        report["other_steps"][lang] = {"exact_key_mb_per_s": round(mb / sec, 1),
                                       "near_duplicate_clusters_s": round(lsh, 4), "docs": len(texts)}
    for num_perm in (128, 256):
        report["accuracy"][str(num_perm)] = accuracy(num_perm, args.per_rate, 0)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
