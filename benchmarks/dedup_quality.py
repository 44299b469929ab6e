"""Precision / recall of near-duplicate detection on a labelled set built from ../shared/data.

Base documents
  en: the 300 texts of en/c4_demo.jsonl + the paragraphs of en/wiki_demo.txt (its articles run
      paragraphs together as "...end.Next": split where a sentence end meets a capital), >= 20 tokens.
  zh: every poem / chapter of zh/*.json (an object with "paragraphs", lines joined by newlines) + the
      records of instruct/alpaca_zh_demo.json (instruction, input, output joined by newlines).
Injected near-duplicates: for each edit rate in RATES, `--per-rate` base documents (random, seeded) get a
copy in which every unit (en: whitespace-separated word, zh: CJK character) is, with probability `rate`,
substituted by a random unit of the corpus, deleted, or followed by an inserted random unit (one third
each). Rate 0 is a copy with cosmetic changes only (case, spacing).

Ground truth: ALL pairs of documents (base and injected) whose TRUE Jaccard similarity of shingle sets
(`TOKEN_PATTERN` tokens, n-grams from DedupConfig) is >= threshold, found exactly with a prefix-filter
similarity join (Chaudhuri et al. 2006; Bayardo et al. 2007) - not only the injected pairs, so natural
duplicates in the corpora count too. Predicted pairs: every pair inside a predicted cluster. Reported per
language: pairwise precision / recall ("strict"), the same against the transitive closure of the true
pairs ("closure": clusters are transitive, so A~B~C counts A-C), and recall per edit rate, for
  ours                  near_duplicate_clusters with the DedupConfig defaults (verify=True; bands/rows
                        optimal for fn_weight 0.95: 9 x 14 at 0.9 / 128 perms)
  ours_noverify         verify=False, bands/rows optimal for fn_weight 0.5 (datasketch's 5 x 25)
  datasketch            MinHashLSH(threshold, num_perm) with its own optimum (5 x 25), queried per
                        document, union-find over the results
  datasketch_our_bands  the same with params=(our bands, rows)
Plus `zh_ngram_sweep`: for character n-gram sizes 1..8 on the zh corpus, how many base pairs look alike
(J >= 0.5, >= 0.9), the mean true J / share >= 0.9 of copies with 1-5% character edits, and the mean /
99.99th percentile J over all pairs of the 1000 alpaca_zh records (unrelated modern Chinese): the data
behind the zh default (n = 3).

    .venv/bin/python benchmarks/dedup_quality.py            # prints JSON (under a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from llmkit.data.dedup import TOKEN_PATTERN, DedupConfig, MinHasher, near_duplicate_clusters

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RATES = (0.0, 0.01, 0.03, 0.05, 0.1, 0.2, 0.3)
_CJK_CHAR = re.compile(r"(?=\w)[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_PARA_SPLIT = re.compile(r"(?<=[a-z0-9)\]\"'][.!?])(?=[A-Z])")


def _need(rel: str) -> Path:
    path = DATA / rel
    if not path.is_file():
        sys.exit(f"reference data {path} is missing (expected ../shared/data beside the checkout)")
    return path


def _paragraph_docs(node) -> list[str]:
    """Every object with a "paragraphs" list anywhere in a chinese-poetry JSON tree, as one text."""
    if isinstance(node, dict):
        if isinstance(node.get("paragraphs"), list):
            return ["\n".join(node["paragraphs"])]
        return [t for v in node.values() for t in _paragraph_docs(v)]
    if isinstance(node, list):
        return [t for v in node for t in _paragraph_docs(v)]
    return []


def load_en(min_tokens: int = 20) -> list[str]:
    """c4_demo texts + wiki_demo paragraphs with >= min_tokens tokens."""
    with _need("en/c4_demo.jsonl").open(encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    for article in _need("en/wiki_demo.txt").read_text(encoding="utf-8").splitlines():
        docs += [p.strip() for p in _PARA_SPLIT.split(article)]
    return [d for d in docs if len(TOKEN_PATTERN.findall(d.lower())) >= min_tokens]


def load_en_demo_corpus() -> list[str]:
    """The "en demo corpus" of the speed benchmark: the 300 c4_demo texts + the 30 wiki_demo articles."""
    with _need("en/c4_demo.jsonl").open(encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    return docs + [a for a in _need("en/wiki_demo.txt").read_text(encoding="utf-8").splitlines() if a]


def load_zh() -> list[str]:
    """zh/*.json poems and prose chapters + alpaca_zh records (instruction, input, output joined)."""
    docs = []
    for path in sorted(_need("zh/lunyu.json").parent.glob("*.json")):
        docs += _paragraph_docs(json.loads(path.read_text(encoding="utf-8")))
    for rec in json.loads(_need("instruct/alpaca_zh_demo.json").read_text(encoding="utf-8")):
        docs.append("\n".join(rec[k] for k in ("instruction", "input", "output") if rec.get(k)))
    return [d for d in docs if d.strip()]


def mutate(text: str, rate: float, lang: str, vocab: list[str], rng: random.Random) -> str:
    """A copy of `text` with each unit substituted / deleted / followed by an insertion w.p. `rate`."""
    if rate == 0:  # cosmetic only: different case and spacing, same shingles
        return "  " + text.upper().replace(" ", "  ") if lang == "en" else text + "\n"
    if lang == "en":
        out = []
        for w in text.split():
            if rng.random() >= rate:
                out.append(w)
                continue
            op = rng.randrange(3)
            if op == 0:
                out.append(rng.choice(vocab))
            elif op == 1:
                out += [w, rng.choice(vocab)]
        return " ".join(out)
    chars = list(text)
    out = []
    for c in chars:
        if not _CJK_CHAR.match(c) or rng.random() >= rate:
            out.append(c)
            continue
        op = rng.randrange(3)
        if op == 0:
            out.append(rng.choice(vocab))
        elif op == 1:
            out += [c, rng.choice(vocab)]
    return "".join(out)


def build_labelled(lang: str, per_rate: int, seed: int = 0, rates=RATES):
    """(texts, injected) where injected = [(source index, copy index, rate)]."""
    base = load_en() if lang == "en" else load_zh()
    rng = random.Random(seed)
    if lang == "en":
        vocab = sorted({w for d in base for w in d.split()})
    else:
        vocab = sorted({c for d in base for c in _CJK_CHAR.findall(d)})
    texts = list(base)
    injected = []
    for rate in rates:
        for src in rng.sample(range(len(base)), per_rate):
            injected.append((src, len(texts), rate))
            texts.append(mutate(base[src], rate, lang, vocab, rng))
    return texts, injected


def shingle_sets(texts: list[str], n: int) -> list[frozenset[str]]:
    """The exact shingle sets MinHasher hashes (pure Python): n-grams of TOKEN_PATTERN tokens."""
    out = []
    for t in texts:
        tok = TOKEN_PATTERN.findall(t.lower())
        out.append(frozenset(" ".join(tok[i:i + n]) for i in range(max(1, len(tok) - n + 1))) if tok
                   else frozenset())
    return out


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def similar_pairs(sets: list[frozenset], t: float) -> dict[tuple[int, int], float]:
    """All pairs (i < j) with Jaccard >= t, exactly: prefix filtering over a rare-first global order
    (two sets with J >= t share a token within their first |x| - ceil(t |x|) + 1 tokens)."""
    df: dict[str, int] = defaultdict(int)
    for s in sets:
        for x in s:
            df[x] += 1
    index: dict[str, list[int]] = defaultdict(list)
    candidates = set()
    for i, s in enumerate(sets):
        if not s:
            continue
        ordered = sorted(s, key=lambda x: (df[x], x))
        for x in ordered[:len(s) - math.ceil(t * len(s) - 1e-9) + 1]:
            for j in index[x]:
                candidates.add((j, i))
            index[x].append(i)
    pairs = {}
    for i, j in candidates:
        a, b = sets[i], sets[j]
        if min(len(a), len(b)) >= t * max(len(a), len(b)) - 1e-9:
            jac = jaccard(a, b)
            if jac >= t - 1e-12:
                pairs[(i, j)] = jac
    empty = [i for i, s in enumerate(sets) if not s]
    pairs.update({(i, j): 1.0 for k, i in enumerate(empty) for j in empty[k + 1:]})
    return pairs


def cluster_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels.tolist()):
        groups[lab].append(i)
    return {(a, b) for g in groups.values() for k, a in enumerate(g) for b in g[k + 1:]}


def closure(n: int, pairs) -> set[tuple[int, int]]:
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        parent[find(i)] = find(j)
    return cluster_pairs(np.array([find(i) for i in range(n)]))


def scores(pred: set, truth: set) -> dict:
    tp = len(pred & truth)
    return {"precision": round(tp / len(pred), 4) if pred else 1.0,
            "recall": round(tp / len(truth), 4) if truth else 1.0,
            "predicted_pairs": len(pred), "true_pairs": len(truth), "tp": tp}


def margin_scores(pred: set, sets: list[frozenset], truth_hi: set, t: float, margin: float = 0.05) -> dict:
    """Errors away from the threshold: recall of pairs with J >= t + margin, precision counting predicted
    pairs with J >= t - margin as right (MinHash's own noise at 128 perms is ~0.027 near J = 0.9)."""
    close = sum(1 for i, j in pred if jaccard(sets[i], sets[j]) >= t - margin)
    recall = len(pred & truth_hi) / len(truth_hi) if truth_hi else 1.0
    return {f"recall_j_ge_{t + margin:.2f}": round(recall, 4),
            f"precision_j_ge_{t - margin:.2f}": round(close / len(pred), 4) if pred else 1.0}


def datasketch_labels(sets: list[frozenset], threshold: float, num_perm: int, params=None) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=params)
    hashes = []
    for i, s in enumerate(sets):
        m = MinHash(num_perm=num_perm)
        m.update_batch([x.encode("utf-8") for x in s])
        lsh.insert(i, m)
        hashes.append(m)
    parent = list(range(len(sets)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in enumerate(hashes):
        for j in lsh.query(m):
            parent[find(i)] = find(j)
    return np.array([find(i) for i in range(len(sets))])


def evaluate(lang: str, cfg: DedupConfig, per_rate: int, seed: int) -> dict:
    t0 = time.perf_counter()
    texts, injected = build_labelled(lang, per_rate, seed)
    hasher = MinHasher.from_config(cfg)
    n = hasher.ngram_for(lang)
    sets = shingle_sets(texts, n)
    truth_j = similar_pairs(sets, cfg.threshold)
    truth = set(truth_j)
    truth_closure = closure(len(texts), truth)
    truth_hi = {p for p, j in truth_j.items() if j >= cfg.threshold + 0.05}
    sigs = hasher.signatures(texts, lang)
    bands, rows = cfg.lsh_params()
    nv_bands, nv_rows = replace(cfg, verify=False).lsh_params()
    labels = {
        "ours": near_duplicate_clusters(sigs, cfg.threshold, bands, rows, verify=cfg.verify),
        "ours_noverify": near_duplicate_clusters(sigs, cfg.threshold, nv_bands, nv_rows, verify=False),
        "datasketch": datasketch_labels(sets, cfg.threshold, cfg.num_perm),
        "datasketch_our_bands": datasketch_labels(sets, cfg.threshold, cfg.num_perm, (bands, rows)),
    }
    result = {"docs": len(texts), "base_docs": len(texts) - len(injected), "injected": len(injected),
              "ngram": n, "bands_rows": {"ours": [bands, rows], "ours_noverify": [nv_bands, nv_rows]},
              "mb": round(sum(len(t.encode()) for t in texts) / 1e6, 2),
              "natural_true_pairs": sum(1 for i, j in truth if j < len(texts) - len(injected))}
    for name, lab in labels.items():
        pred = cluster_pairs(lab)
        per_rate_recall = {}
        for rate in RATES:
            inj = [(s, c) for s, c, r in injected if r == rate]
            js = [jaccard(sets[s], sets[c]) for s, c in inj]
            dup = [lab[s] == lab[c] for s, c in inj]
            above = [d for d, j in zip(dup, js) if j >= cfg.threshold]
            below = [d for d, j in zip(dup, js) if j < cfg.threshold]
            per_rate_recall[str(rate)] = {
                "mean_true_j": round(float(np.mean(js)), 3), "share_j_ge_t": round(len(above) / len(js), 3),
                "clustered_when_j_ge_t": round(float(np.mean(above)), 3) if above else None,
                "clustered_when_j_lt_t": round(float(np.mean(below)), 3) if below else None}
        result[name] = {"strict": scores(pred, truth), "closure": scores(pred, truth_closure),
                        "margin": margin_scores(pred, sets, truth_hi, cfg.threshold),
                        "by_edit_rate": per_rate_recall}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def zh_ngram_sweep(per_rate: int, seed: int, sizes=range(1, 9), rates=(0.01, 0.02, 0.03, 0.05)) -> dict:
    texts, injected = build_labelled("zh", per_rate, seed, rates)
    n_base = len(texts) - len(injected)
    cjk_chars = [len(_CJK_CHAR.findall(t)) for t in texts[:n_base]]
    out = {"base_docs": n_base, "median_cjk_chars": int(np.median(cjk_chars))}
    alpaca = load_zh()[-1000:]  # modern Chinese: background similarity of unrelated texts, all pairs
    for n in sizes:
        sets = shingle_sets(texts, n)
        base = sets[:n_base]
        p5 = similar_pairs(base, 0.5)
        row = {"base_pairs_j_ge_0.5": len(p5), "base_pairs_j_ge_0.9": sum(1 for j in p5.values() if j >= 0.9)}
        for rate in rates:
            js = [jaccard(sets[s], sets[c]) for s, c, r in injected if r == rate]
            row[f"edits_{rate}"] = {"mean_j": round(float(np.mean(js)), 3),
                                    "share_j_ge_0.9": round(float(np.mean(np.array(js) >= 0.9)), 3)}
        a_sets = shingle_sets(alpaca, n)
        background = np.array([jaccard(a, b) for i, a in enumerate(a_sets) for b in a_sets[i + 1:]])
        row["alpaca_zh_all_pairs_j"] = {"mean": round(float(background.mean()), 4),
                                        "p99.99": round(float(np.percentile(background, 99.99)), 3)}
        out[str(n)] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-rate", type=int, default=150, help="injected copies per edit rate and language")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sweep", action="store_true", help="skip the zh n-gram sweep")
    args = ap.parse_args()
    cfg = DedupConfig()
    cfg.validate()
    report = {"threshold": cfg.threshold, "num_perm": cfg.num_perm, "per_rate": args.per_rate,
              "rates": list(RATES)}
    for lang in ("en", "zh"):
        report[lang] = evaluate(lang, cfg, args.per_rate, args.seed)
    if not args.no_sweep:
        report["zh_ngram_sweep"] = zh_ngram_sweep(args.per_rate, args.seed)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
