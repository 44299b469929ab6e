"""Dedup: exact keys, vectorised MinHash vs a pure-Python reference, LSH clustering, survivors."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import shared_file
from llmkit.data.dedup import (
    EMPTY_VALUE,
    REASON_EXACT,
    REASON_NEAR,
    TOKEN_PATTERN,
    DedupConfig,
    DedupFeatures,
    Deduplicator,
    MinHasher,
    candidate_probability,
    canonical_text,
    connected_components,
    exact_duplicates,
    exact_key,
    near_duplicate_clusters,
    optimal_bands_rows,
    pick_survivors,
)

M64 = (1 << 64) - 1


def fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & M64
    return h ^ (h >> 33)


def reference_signature(text: str, n: int, hasher: MinHasher) -> np.ndarray:
    """The documented hash family in plain Python integers, one shingle at a time."""
    K, C = int(hasher.K), [int(c) for c in hasher.C]
    tokens = TOKEN_PATTERN.findall(text.lower())
    if not tokens:
        return np.full(hasher.num_perm, EMPTY_VALUE, dtype=np.uint32)
    token_hashes = []
    for tok in tokens:
        h = sum(ord(ch) * pow(K, i, 1 << 64) for i, ch in enumerate(tok)) & M64
        token_hashes.append(fmix64(h))
    keys = []
    for i in range(max(1, len(tokens) - n + 1)):
        acc = sum(C[j] * t for j, t in enumerate(token_hashes[i:i + n])) & M64
        keys.append(fmix64(acc) >> 32)
    perms = zip(hasher.a.tolist(), hasher.b.tolist())
    return np.array([min((a * x + b) & M64 for x in keys) >> 32 for a, b in perms], dtype=np.uint32)


def random_doc(rng: random.Random, words: int, vocab: int = 20000) -> str:
    return " ".join(f"w{rng.randrange(vocab)}" for _ in range(words))


def shingles(text: str, n: int = 5) -> set[str]:
    tok = TOKEN_PATTERN.findall(text.lower())
    return {" ".join(tok[i:i + n]) for i in range(max(1, len(tok) - n + 1))}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb)


def partition(labels) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for i, lab in enumerate(np.asarray(labels).tolist()):
        groups.setdefault(lab, set()).add(i)
    return {frozenset(g) for g in groups.values()}


MIXED = [
    "Hello, World! The quick brown fox jumps over the lazy dog; it's 3-5 days.",
    "",
    "?!... --- ",
    "two words",
    "子曰：“学而时习之，不亦说乎？”有朋 from afar 自远方来，不亦乐乎？",
    "・A true to size classic t-shirt ＊ made to order ーカタカナとひらがな、漢字。",
    "İstanbul ΣΊΣΥΦΟΣ Straße café naïve " * 4,
    "under_score snake_case x1 y2 " * 30,
]
LANGS = ["en", None, "en", "en", "zh", "ja", "de", "en"]


def test_signatures_match_pure_python_reference():
    hasher = MinHasher(num_perm=32, seed=7)
    sigs = hasher.signatures(MIXED, LANGS)
    assert sigs.shape == (len(MIXED), 32) and sigs.dtype == np.uint32
    for text, lang, sig in zip(MIXED, LANGS, sigs):
        np.testing.assert_array_equal(sig, reference_signature(text, hasher.ngram_for(lang), hasher))
        np.testing.assert_array_equal(hasher.signature(text, lang), sig)
    assert (sigs[1] == EMPTY_VALUE).all() and (sigs[2] == EMPTY_VALUE).all()
    hasher.chunk = 5  # documents split across permutation blocks must give the same minima
    np.testing.assert_array_equal(hasher.signatures(MIXED, LANGS), sigs)


def test_vectorised_tokeniser_agrees_with_token_pattern_on_corpora():
    texts = [json.loads(line)["text"] for line in shared_file("en/c4_demo.jsonl").open(encoding="utf-8")][:80]
    zh = json.loads(shared_file("zh/tangshisanbaishou.json").read_text(encoding="utf-8"))
    texts += ["\n".join(p["paragraphs"]) for sec in zh["content"] for p in sec["content"]][:80]
    hasher = MinHasher(num_perm=8)
    _, counts = hasher.tokens(texts)
    assert counts.tolist() == [len(TOKEN_PATTERN.findall(t.lower())) for t in texts]


def test_estimated_jaccard_tracks_true_jaccard():
    rng = random.Random(0)
    hasher = MinHasher(num_perm=128, seed=3, default_ngram=1)
    errs, variances = [], []
    for target in (0.2, 0.5, 0.8, 0.9, 0.95) * 8:
        a = [f"t{rng.getrandbits(40)}" for _ in range(600)]
        k = round(600 * (1 - target) / (1 + target))  # shift by k words: J = (600 - k) / (600 + k)
        b = a[k:] + [f"u{rng.getrandbits(40)}" for _ in range(k)]
        true_j = (600 - k) / (600 + k)
        sa, sb = hasher.signatures([" ".join(a), " ".join(b)])
        errs.append(np.mean(sa == sb) - true_j)
        variances.append(true_j * (1 - true_j) / 128)
    errs, variances = np.array(errs), np.array(variances)
    # unbiased (4 standard errors of the mean) with the binomial variance of an ideal MinHash
    assert abs(errs.mean()) < 4 * np.sqrt(variances.sum()) / len(errs)
    assert 0.5 < np.mean(errs ** 2 / variances) < 1.6
    assert np.all(np.abs(errs) < 5 * np.sqrt(variances))


def test_identical_and_cosmetic_copies_always_cluster():
    rng = random.Random(1)
    base = [random_doc(rng, 200) for _ in range(20)]
    texts = base + [b.upper().replace(" ", "  ") for b in base[:10]] + base[:5] + ["", ""]
    sigs = MinHasher().signatures(texts)
    for threshold in (0.5, 0.9, 1.0):
        labels = near_duplicate_clusters(sigs, threshold)
        for i in range(10):
            assert labels[20 + i] == labels[i]
        for i in range(5):
            assert labels[30 + i] == labels[i]
        assert labels[35] == labels[36] == 35
        assert len(set(labels[:20].tolist())) == 20  # unrelated documents stay apart


def binomial_tail(n: int, p: float, k: int) -> float:
    """P[Binomial(n, p) >= k]."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_near_duplicates_with_five_percent_edits():
    rng = random.Random(2)
    base = [random_doc(rng, 400) for _ in range(60)]
    variants = []
    for i, doc in enumerate(base):
        words = doc.split()
        cut = rng.randrange(0, 380)
        kind = i % 5
        if kind == 0:  # 5% of the words deleted as one block: J ~ 0.93
            words = words[:cut] + words[cut + 20:]
        elif kind == 1:  # 5% inserted as one block: J ~ 0.93
            words = words[:cut] + random_doc(rng, 20).split() + words[cut:]
        elif kind == 2:  # 5% substituted as one block: J ~ 0.89, just below
            words = words[:cut] + random_doc(rng, 20).split() + words[cut + 20:]
        elif kind == 3:  # 5% substituted at random places: each edit breaks 5 shingles, J ~ 0.6
            for p in rng.sample(range(len(words)), 20):
                words[p] = f"x{rng.randrange(10**6)}"
        else:  # 1% deleted as one block: J ~ 0.97, missed with probability ~1e-5
            words = words[:cut] + words[cut + 4:]
        variants.append(" ".join(words))
    true_j = np.array([jaccard(a, b) for a, b in zip(base, variants)])
    cfg = DedupConfig()
    labels = near_duplicate_clusters(MinHasher().signatures(base + variants), cfg.threshold)
    together = labels[:60] == labels[60:]
    assert (true_j >= 0.965).sum() >= 10 and together[true_j >= 0.965].all()
    # Near the threshold MinHash can only be right on average: as often as an ideal estimator would be
    # (P[estimate >= 0.9] x P[LSH candidate]), within 3 standard deviations.
    bands, rows = cfg.lsh_params()
    need = math.ceil(cfg.threshold * cfg.num_perm)
    p = np.array([binomial_tail(cfg.num_perm, j, need) * candidate_probability(j, bands, rows)
                  for j in true_j[true_j >= 0.9]])
    assert p.size >= 30
    assert together[true_j >= 0.9].sum() >= p.sum() - 3 * np.sqrt((p * (1 - p)).sum())
    assert (true_j < 0.8).sum() >= 10 and not together[true_j < 0.8].any()
    assert len(set(labels[:60].tolist())) == 60  # unrelated documents never cluster


def test_clusters_do_not_depend_on_order_or_sharding():
    rng = random.Random(3)
    root = random_doc(rng, 300).split()
    family = []  # 60 distinct near-copies of one document: a bucket larger than the comparison window
    for _ in range(60):
        words = list(root)
        words[rng.randrange(300)] = f"v{rng.randrange(10**6)}"
        family.append(" ".join(words))
    texts = family + [random_doc(rng, 300) for _ in range(40)] + family[:5] + ["", "x y"]
    hasher = MinHasher()
    sigs = hasher.signatures(texts)
    parts = [MinHasher().signatures(texts[a:b]) for a, b in ((0, 17), (17, 18), (18, 70), (70, len(texts)))]
    np.testing.assert_array_equal(np.concatenate(parts), sigs)
    want = partition(near_duplicate_clusters(sigs, 0.9))
    assert max(map(len, want)) >= 50  # most of the family is one cluster
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(len(texts))
        labels = near_duplicate_clusters(sigs[perm], 0.9)
        assert {frozenset(int(perm[i]) for i in g) for g in partition(labels)} == want
        assert all(labels[i] == min(g) for g in partition(labels) for i in g)


def test_signatures_are_deterministic_across_processes():
    texts = ["The same text hashed in another interpreter.", "子曰：学而时习之，不亦说乎？"]
    code = textwrap.dedent(f"""
        import json
        from llmkit.data.dedup import MinHasher
        sigs = MinHasher(num_perm=64, seed=5).signatures({texts!r}, ["en", "zh"])
        print(json.dumps(sigs.tolist()))
    """)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    theirs = np.array(json.loads(out.stdout), dtype=np.uint32)
    np.testing.assert_array_equal(theirs, MinHasher(num_perm=64, seed=5).signatures(texts, ["en", "zh"]))


def test_zh_uses_character_ngrams():
    hasher = MinHasher()
    assert hasher.ngram_for("zh") == 3 and hasher.ngram_for("zh-Hant") == 3 and hasher.ngram_for("en") == 5
    poem = "白日依山盡，黃河入海流。欲窮千里目，更上一層樓。"
    assert TOKEN_PATTERN.findall(poem) == [c for c in poem if c not in "，。"]
    _, counts = hasher.tokens([poem, "GPT模型 works"])
    assert counts.tolist() == [20, 4]  # Latin words stay whole inside Chinese text
    zh = json.loads(shared_file("zh/lunyu.json").read_text(encoding="utf-8"))
    texts = ["".join(ch["paragraphs"]) for ch in zh[:10]]
    edited = [t[:200] + "仁" + t[201:] for t in texts]  # one character substituted
    sigs = hasher.signatures(texts + edited, "zh")
    labels = near_duplicate_clusters(sigs, 0.9)
    for i, (a, b) in enumerate(zip(texts, edited)):
        j = jaccard(a, b, n=3)
        assert j > 0.97
        assert labels[i] == labels[10 + i]
        assert abs(np.mean(sigs[i] == sigs[10 + i]) - j) < 0.08
    assert len(set(labels[:10].tolist())) == 10


def test_optimal_bands_rows():
    b, r = optimal_bands_rows(0.9, 128)
    assert (b, r) == (5, 25) and b * r <= 128
    assert candidate_probability(0.5, b, r) < 0.01 < candidate_probability(0.9, b, r)
    b, r = DedupConfig().lsh_params()  # verify=True weights false negatives 0.95
    assert (b, r) == (9, 14)
    assert candidate_probability(0.9, b, r) > 0.85 and candidate_probability(0.95, b, r) > 0.99
    assert candidate_probability(0.5, b, r) < 0.01
    assert DedupConfig(verify=False).lsh_params() == (5, 25)
    assert DedupConfig(bands=16).lsh_params() == (16, 8)
    datasketch_lsh = pytest.importorskip("datasketch.lsh")
    for t, p in ((0.9, 128), (0.8, 256), (0.5, 64), (0.95, 128)):
        assert optimal_bands_rows(t, p) == datasketch_lsh._optimal_param(t, p, 0.5, 0.5)


def test_pick_survivors():
    labels = np.array([0, 0, 0, 3, 3, 5, 0])
    lengths = np.array([10, 30, 30, 5, 7, 1, 20])
    assert np.flatnonzero(pick_survivors(labels, lengths, "longest")).tolist() == [1, 4, 5]  # 1 beats 2: tie
    assert np.flatnonzero(pick_survivors(labels, lengths, "first")).tolist() == [0, 3, 5]
    assert pick_survivors(np.zeros(0, np.int64), np.zeros(0), "longest").tolist() == []


def test_exact_keys():
    a = "Hello,   World!\nThis is IT."
    assert exact_key(a) == exact_key("hello world this is it") == exact_key("ＨＥＬＬＯ world: this—is it")
    assert canonical_text(a) == "hello world this is it"
    assert exact_key(a) != exact_key("Hello World this is not it")
    assert exact_key("子曰：学而时习之") == exact_key("子曰 学而时习之。") != exact_key("子曰学而时习之")
    keys = [exact_key(t) for t in ["a b", "c", "A  B!", "c", "d"]]
    assert exact_duplicates(keys).tolist() == [True, True, False, False, True]


def test_connected_components_match_python_union_find():
    rng = np.random.default_rng(0)
    n = 500
    u, v = rng.integers(0, n, 300), rng.integers(0, n, 300)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in zip(u.tolist(), v.tolist()):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    assert connected_components(n, u, v).tolist() == [find(i) for i in range(n)]


def test_deduplicator_exact_then_near_and_shards():
    rng = random.Random(4)
    texts = [random_doc(rng, 300) for _ in range(6)]
    near = texts[1] + " " + random_doc(rng, 5)  # longer near-copy of doc 1
    docs = [{"id": f"d{i}", "text": t, "lang": "en", "stats": {}} for i, t in enumerate(texts)]
    docs += [{"id": "copy0", "text": texts[0].upper(), "lang": "en", "stats": {}},
             {"id": "near1", "text": near, "lang": "en", "stats": {}},
             {"id": "copy1", "text": texts[1] + "!", "lang": None, "stats": {}}]
    dd = Deduplicator(DedupConfig())
    feats = dd.features(docs)
    sharded = DedupFeatures.concat([dd.features(docs[:4]), dd.features(docs[4:])])
    assert sharded.keys == feats.keys and np.array_equal(sharded.signatures, feats.signatures)
    reasons, survivor_of = dd.decide(sharded)
    assert reasons == [None, REASON_NEAR, None, None, None, None, REASON_EXACT, None, REASON_EXACT]
    assert survivor_of.tolist() == [-1, 7, -1, -1, -1, -1, 0, -1, 7]  # the longest near-copy survives
    assert dd.dedup(docs) == reasons
    assert docs[8]["stats"]["dedup"] == {"dup_of": "near1"} and docs[7]["stats"]["dedup"] == {"dups": 2}
    first = Deduplicator(DedupConfig(keep="first", exact=False))
    assert first.decide(first.features(docs))[0] == [None] * 6 + [REASON_NEAR] * 3


def test_config_validate_and_yaml(tmp_path):
    from llmkit.config import load_config

    path = tmp_path / "dedup.yaml"
    path.write_text("threshold: 0.85\nngram: {zh: 2, ko: 4}\nkeep: first\nbands: 10\n", encoding="utf-8")
    cfg = load_config(DedupConfig, path)
    assert cfg.ngram == {"zh": 2, "ko": 4} and cfg.keep == "first" and cfg.lsh_params() == (10, 12)
    assert MinHasher.from_config(cfg).ngram_for("ko-KR") == 4
    for bad, field_name in (({"threshold": 0.0}, "threshold"), ({"ngram": {"zh": 0}}, "ngram"),
                            ({"bands": 20, "rows": 10}, "bands"), ({"fn_weight": 1.0}, "fn_weight")):
        with pytest.raises(ValueError, match=field_name):
            DedupConfig(**bad).validate()
