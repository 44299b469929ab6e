"""Data selection (`select:` of `llmkit data run`): DSIR, quality classifier, perplexity band, DP top-k."""

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_file
from llmkit.cli import main
from llmkit.config import ConfigError, load_config
from llmkit.data.corpus import CorpusConfig
from llmkit.data.report import load_manifest
from llmkit.data.select import (
    DPConfig,
    HashedNgrams,
    SelectConfig,
    auc,
    bounded_dsir_score,
    dp_epsilon0,
    dp_top_k,
    dsir_log_weights,
    fit_ngram_model,
    gumbel_noise,
    gumbel_top_k,
    perplexity_band,
    run_selection,
)


def _shakespeare() -> list[str]:
    blocks = shared_file("en/tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")
    return [b for b in blocks if len(b.split()) > 20]


def _c4() -> list[str]:
    return [json.loads(line)["text"] for line in shared_file("en/c4_demo.jsonl").read_text().splitlines()]


def _select(cfg: SelectConfig, cands: list[str], target: list[str], src=None, ids=None):
    n = len(cands)
    ids = ids if ids is not None else [f"d{i}" for i in range(n)]
    src = np.asarray(src if src is not None else ["s"] * n)
    tokens = np.array([len(t.split()) for t in cands])
    chars = np.array([len(t) for t in cands])
    return run_selection(cfg, cands, ids, src, tokens, chars, np.array(["en"] * n), None, target)


# -- DSIR ------------------------------------------------------------------------------------------------------
def test_dsir_weights_equal_a_hand_computation():
    target = ["the cat sat", "the cat ran home"]
    cands = ["the dog sat", "a cat sat on the mat", "home"]
    B, alpha = 1 << 20, 0.5
    feats = HashedNgrams(B, 2)

    def grams(text):
        w = text.split()
        return w + [f"{a} {b}" for a, b in zip(w, w[1:])]

    # with 2^20 buckets the dozen n-grams here must not collide, so buckets stand for the n-grams
    every = sorted({g for t in target + cands for g in grams(t)})
    bucket = {g: int(feats.doc(g)[-1]) for g in every}
    assert len(set(bucket.values())) == len(every)
    t_counts = Counter(g for t in target for g in grams(t))
    r_counts = Counter(g for t in cands for g in grams(t))
    t_total, r_total = sum(t_counts.values()), sum(r_counts.values())

    def log_ratio(g):
        return math.log((t_counts[g] + alpha) / (t_total + alpha * B)) - math.log((r_counts[g] + alpha) /
                                                                                  (r_total + alpha * B))

    expected = [sum(log_ratio(g) for g in grams(t)) for t in cands]
    c_idx, c_ptr = feats.batch(cands)
    t_idx, _ = feats.batch(target)
    got = dsir_log_weights(c_idx, c_ptr, fit_ngram_model(t_idx, B, alpha), fit_ngram_model(c_idx, B, alpha))
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    # through the step, and length-normalised: L * sum / n-grams
    cfg = SelectConfig(enabled=True, method="dsir", target=["x"], k=1, buckets=B, smoothing=alpha)
    np.testing.assert_allclose(_select(cfg, cands, target)[1], expected, rtol=1e-9)
    cfg.length = 10
    np.testing.assert_allclose(_select(cfg, cands, target)[1], 10 * np.array(expected) / [5, 11, 1], rtol=1e-9)
    # the features: 6 unigrams + 5 bigrams of "a cat sat on the mat"
    assert np.diff(c_ptr).tolist() == [5, 11, 1]
    # the bounded score: mean ratio per n-gram, clipped, onto [0, 1]
    b = bounded_dsir_score(got, np.diff(c_ptr).astype(float), clip=1.0)
    np.testing.assert_allclose(b, (np.clip(np.array(expected) / [5, 11, 1], -1, 1) + 1) / 2)


def test_dsir_prefers_target_like_documents():
    sh, c4 = _shakespeare(), _c4()
    target, cands = sh[:300], sh[300:450] + c4[:150]
    src = ["shakespeare"] * 150 + ["c4"] * 150
    keep, _, rep = _select(SelectConfig(enabled=True, method="dsir", target=["x"], k=100), cands, target, src)
    assert rep["selected"] == 100 and keep.sum() == 100
    share = rep["by_source"]["shakespeare"]["selected"] / 100
    assert share >= 0.9  # random: 0.5
    # the resampling itself is unbiased: equal weights select about half from each source
    flat = gumbel_top_k(np.zeros(300), [f"d{i}" for i in range(300)], 0, SelectConfig(k=100),
                        np.ones(300, dtype=np.int64))
    assert 0.35 <= flat[:150].sum() / 100 <= 0.65


def test_gumbel_resampling_follows_the_importance_weights():
    weights = np.array([1.0, 2.0, 7.0])
    cfg = SelectConfig(k=1)
    picks = Counter(int(np.flatnonzero(gumbel_top_k(np.log(weights), ["a", "b", "c"], seed, cfg,
                                                    np.ones(3, dtype=np.int64)))[0]) for seed in range(3000))
    freq = np.array([picks[i] for i in range(3)]) / 3000
    np.testing.assert_allclose(freq, weights / weights.sum(), atol=0.03)


def test_selection_is_seeded_and_independent_of_document_order():
    sh, c4 = _shakespeare(), _c4()
    cands, target = sh[300:400] + c4[:100], sh[:200]
    ids = [f"doc{i}" for i in range(200)]
    cfg = SelectConfig(enabled=True, method="dsir", target=["x"], fraction=0.25, seed=7)
    a, _, _ = _select(cfg, cands, target, ids=ids)
    b, _, _ = _select(cfg, cands, target, ids=ids)
    assert (a == b).all()
    perm = np.random.default_rng(0).permutation(200)
    c, _, _ = _select(cfg, [cands[i] for i in perm], target, ids=[ids[i] for i in perm])
    assert {ids[i] for i in np.flatnonzero(a)} == {ids[perm[i]] for i in np.flatnonzero(c)}
    cfg.seed = 8
    d, _, _ = _select(cfg, cands, target, ids=ids)
    assert (a != d).any()


def test_token_budget():
    sh, c4 = _shakespeare(), _c4()
    cands = sh[300:350] + c4[:50]
    keep, _, rep = _select(SelectConfig(enabled=True, method="dsir", target=["x"], tokens=2000), cands, sh[:200])
    tokens = np.array([len(t.split()) for t in cands])
    assert rep["tokens"]["selected"] == tokens[keep].sum() <= 2000
    assert rep["tokens"]["selected"] > 2000 - tokens.max()


# -- classifier --------------------------------------------------------------------------------------------------
def test_auc_matches_a_hand_computation():
    # positives 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5), (0.9>0.1), (0.5=0.5 -> 1/2), (0.5>0.1)
    assert auc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(3.5 / 4)
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([1, 1, 0, 0])) == 0.0


def test_classifier_auc_high_on_separable_data_and_chance_on_identical_data():
    sh, c4 = _shakespeare(), _c4()
    cfg = SelectConfig(enabled=True, method="classifier", target=["x"], fraction=0.5)
    keep, score, rep = _select(cfg, c4[:150], sh[:150])
    assert rep["held_out_auc"] > 0.95
    assert ((score >= 0) & (score <= 1)).all()
    # same distribution on both sides: the classifier can only memorise, held out it is at chance
    keep, score, rep = _select(cfg, c4[:150], c4[150:300])
    assert 0.35 <= rep["held_out_auc"] <= 0.65
    assert rep["train_auc"] > 0.9  # it did fit its training folds


def test_classifier_threshold_and_top_fraction():
    sh, c4 = _shakespeare(), _c4()
    cands, src = sh[300:400] + c4[:100], ["shakespeare"] * 100 + ["c4"] * 100
    keep, score, rep = _select(SelectConfig(enabled=True, method="classifier", target=["x"], threshold=0.5),
                               cands, sh[:200], src)
    assert (keep == (score >= 0.5)).all()
    keep, score, rep = _select(SelectConfig(enabled=True, method="classifier", target=["x"], fraction=0.3),
                               cands, sh[:200], src)
    assert keep.sum() == 60 and score[keep].min() >= score[~keep].max()
    assert rep["by_source"]["shakespeare"]["selected"] >= 50


# -- perplexity band ------------------------------------------------------------------------------------------------
def test_perplexity_band_keeps_exactly_the_documents_within_it():
    ppl = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100, 300, 200, 400, 500], dtype=float)
    langs = np.array(["en"] * 10 + ["zh"] * 5)
    keep, bands = perplexity_band(ppl, langs, 0.2, 0.8)
    # en: quantiles 2.8 and 8.2 -> 3..8; zh (100..500): 180 and 420 -> 200, 300, 400
    assert bands["en"] == pytest.approx([2.8, 8.2]) and bands["zh"] == pytest.approx([180, 420])
    assert ppl[keep].tolist() == [3, 4, 5, 6, 7, 8, 300, 200, 400]
    keep, _ = perplexity_band(ppl, langs, 0.0, 1.0)
    assert keep.all()


# -- differential privacy --------------------------------------------------------------------------------------------
def test_dp_noise_scale_matches_the_stated_formula():
    scores = np.linspace(0, 1, 50)
    ids = [f"d{i}" for i in range(50)]
    _, acc = dp_top_k(scores, ids, k=5, epsilon=0.5, seed=1)
    assert acc["noise_scale"] == pytest.approx(2 * 5 * 1.0 / 0.5)
    assert acc["epsilon_per_pick"] * acc["k"] == pytest.approx(0.5)
    # the noise drawn is Gumbel(0, b): std b * pi / sqrt(6), mean b * Euler-Mascheroni
    g = gumbel_noise(3, [f"x{i}" for i in range(20000)], scale=20.0)
    assert g.std() == pytest.approx(20.0 * math.pi / math.sqrt(6), rel=0.03)
    assert g.mean() == pytest.approx(20.0 * 0.5772, rel=0.05)
    # advanced composition: the per-pick epsilon spends the whole budget and beats k * eps0 = eps
    eps0, how = dp_epsilon0(1.0, 1e-6, 200)
    assert "advanced" in how and eps0 > 1.0 / 200
    total = eps0 * math.sqrt(2 * 200 * math.log(1e6)) + 200 * eps0 * math.expm1(eps0)
    assert total == pytest.approx(1.0, rel=1e-6)
    assert dp_epsilon0(1.0, 1e-6, 2)[1].startswith("basic")
    with pytest.raises(ValueError, match="must lie in"):
        dp_top_k(np.array([0.5, 1.5]), ["a", "b"], 1, 1.0, seed=0)


def test_dp_single_pick_is_the_exponential_mechanism():
    # k = 1: P(i) proportional to exp(epsilon * u_i / (2 * sensitivity))
    u, eps = np.array([0.0, 0.5, 1.0]), 4.0
    picks = Counter(int(np.flatnonzero(dp_top_k(u, ["a", "b", "c"], 1, eps, seed=s)[0])[0]) for s in range(4000))
    want = np.exp(eps * u / 2)
    np.testing.assert_allclose(np.array([picks[i] for i in range(3)]) / 4000, want / want.sum(), atol=0.03)


def test_dp_selection_huge_epsilon_is_top_k_tiny_epsilon_is_random():
    rng = np.random.default_rng(0)
    n, k = 1000, 100
    scores = rng.random(n)
    ids = [f"d{i}" for i in range(n)]
    top = np.zeros(n, dtype=bool)
    top[np.argsort(-scores)[:k]] = True
    sharp, _ = dp_top_k(scores, ids, k, epsilon=1e9, seed=0)
    assert (sharp == top).all()
    overlaps = [(dp_top_k(scores, ids, k, epsilon=1e-3, seed=s)[0] & top).sum() / k for s in range(5)]
    assert abs(np.mean(overlaps) - k / n) < 0.06  # random: k / n = 0.1 in expectation
    a, _ = dp_top_k(scores, ids, k, epsilon=1.0, seed=42)
    b, _ = dp_top_k(scores, ids, k, epsilon=1.0, seed=42)
    c, acc = dp_top_k(scores, ids, k, epsilon=1.0, seed=None)
    assert (a == b).all() and c.sum() == k and acc["seed"].startswith("secret")


def test_dp_selection_in_run_selection_reports_its_accounting():
    sh, c4 = _shakespeare(), _c4()
    cands, target = sh[300:400] + c4[:100], sh[:200]
    for method in ("dsir", "classifier"):
        cfg = SelectConfig(enabled=True, method=method, target=["x"], k=40,
                           dp=DPConfig(epsilon=1e8, delta=1e-6, seed=0))
        keep, _, rep = _select(cfg, cands, target)
        dp = rep["dp"]
        assert dp["epsilon"] == 1e8 and dp["delta"] == 1e-6 and dp["sensitivity"] == 1.0
        assert dp["overlap"] == 40 and dp["overlap_share"] == 1.0 and keep.sum() == 40
        assert dp["random_overlap_share"] == pytest.approx(0.2)
        cfg.dp.epsilon = 1e-4
        _, _, rep = _select(cfg, cands, target)
        assert rep["dp"]["overlap_share"] < 0.5
        assert rep["dp"]["mean_score_private"] < rep["dp"]["mean_score_non_private"]


# -- config ----------------------------------------------------------------------------------------------------------
def _write_config(tmp: Path, select: str, extra: str = "") -> Path:
    sh = [b.replace("\n", " ") for b in _shakespeare()]
    (tmp / "target.txt").write_text("\n".join(sh[:300]) + "\n", encoding="utf-8")
    (tmp / "plays.txt").write_text("\n".join(sh[300:420]) + "\n", encoding="utf-8")
    web = [{"text": t} for t in _c4()[:120]]
    (tmp / "web.jsonl").write_text("\n".join(json.dumps(r) for r in web) + "\n", encoding="utf-8")
    path = tmp / "select.yaml"
    path.write_text(f"""
out_dir: {tmp / 'out'}
sources:
  - {{name: plays, path: {tmp / 'plays.txt'}, domain: literature, skip: [quality]}}
  - {{name: web, path: {tmp / 'web.jsonl'}, domain: web, skip: [quality]}}
{select}
{extra}
executor: {{workers: 1, progress: false}}
track: {{enabled: false}}
""")
    return path


def test_config_errors_name_the_key(tmp_path):
    path = _write_config(tmp_path, "select: {enabled: true, method: dsir, k: 10}")
    with pytest.raises(ConfigError, match=r"select\.target: method dsir needs target files"):
        load_config(CorpusConfig, path)
    for override, key in [(["select.target=[nowhere.txt]"], r"select\.target: nothing found"),
                          ([f"select.target=[{tmp_path / 'target.txt'}]", "select.fraction=0.5"],
                           r"select\.fraction: set only one"),
                          ([f"select.target=[{tmp_path / 'target.txt'}]", "select.method=perplexity"],
                           r"select\.k: method perplexity keeps a quantile band"),
                          ([f"select.target=[{tmp_path / 'target.txt'}]", "select.dp.epsilon=-1"],
                           r"select\.dp\.epsilon: must be > 0"),
                          ([f"select.target=[{tmp_path / 'target.txt'}]", "select.sources=[nope]"],
                           r"select\.sources: \['nope'\] are not sources")]:
        with pytest.raises(ConfigError, match=key):
            load_config(CorpusConfig, path, override)
    path = _write_config(tmp_path, "select: {enabled: true, method: perplexity, low: 0.1, high: 0.9}")
    with pytest.raises(ConfigError, match=r"select\.method: perplexity needs perplexity\.enabled"):
        load_config(CorpusConfig, path)
    with pytest.raises(ConfigError, match=r"select\.dp: method perplexity"):
        load_config(CorpusConfig, path, ["select.dp.epsilon=1.0"])
    assert load_config(CorpusConfig, path, ["select.enabled=false"]).select.enabled is False


# -- the pipeline end to end --------------------------------------------------------------------------------------------
def _read_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_pipeline_runs_dsir_selection_through_the_cli(tmp_path, capsys):
    path = _write_config(tmp_path, f"select: {{enabled: true, method: dsir, target: [{tmp_path / 'target.txt'}], "
                                   "k: 60}")
    assert main(["data", "run", "--config", str(path)]) == 0
    out = tmp_path / "out"
    manifest = load_manifest(out)
    sel = manifest["select"]
    cands = sel["candidates"]
    assert sel["method"] == "dsir" and sel["selected"] == 60 and sel["dropped"] == cands - 60
    assert cands == sum(v["candidates"] for v in sel["by_source"].values()) > 200
    assert sel["by_source"]["plays"]["selected"] >= 54  # target-like: random would take about half
    assert manifest["reasons"]["select.dsir"] == cands - 60
    row = next(r for r in manifest["funnel"] if r["step"] == "select")
    assert row["in"] == cands and row["out"] == 60 and row["dropped"] == {"select.dsir": cands - 60}
    kept = [d for f in sorted((out / "data").glob("part-*.jsonl.gz")) for d in _read_gz(f)]
    rejected = [d for f in sorted((out / "rejected").glob("*.jsonl.gz")) for d in _read_gz(f)]
    assert len(kept) == 60 and len(kept) + len(rejected) == manifest["funnel"][0]["in"]
    assert sum(d["reason"] == "select.dsir" for d in rejected) == cands - 60
    assert all(d["stats"]["select"]["method"] == "dsir" for d in kept)
    assert sel["tokens"]["selected"] < sel["tokens"]["candidates"]
    assert sel["chars"]["selected"] == sum(len(d["text"]) for d in kept)
    assert main(["data", "report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "## Selection (dsir; dropped as select.dsir)" in report and f"| select | {cands} |" in report
    # the private variant: accounting in the manifest, no private scores in the output; a changed select:
    # redoes the select and write phases only
    stamp = {p: p.stat().st_mtime_ns for p in (out / "work" / "read").glob("*.done.json")}
    assert main(["data", "run", "--config", str(path), "select.dp.epsilon=2.0", "select.dp.seed=0"]) == 0
    assert stamp and all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    manifest = load_manifest(out)
    dp = manifest["select"]["dp"]
    assert dp["epsilon"] == 2.0 and dp["noise_scale"] == pytest.approx(2 * 60 / 2.0)
    assert manifest["select"]["selected"] == 60 and manifest["reasons"]["select.dsir"] == cands - 60
    kept = [d for f in sorted((out / "data").glob("part-*.jsonl.gz")) for d in _read_gz(f)]
    assert len(kept) == 60 and not any("select" in d["stats"] for d in kept)
    assert "Differentially private: (2.0, 0.0)-DP" in (out / "report.md").read_text()
    # a changed target file is a changed input of the select phase
    assert manifest["select"]["target_docs"] == 300
    with open(tmp_path / "target.txt", "a", encoding="utf-8") as f:
        f.write("one more target line of text\n")
    assert main(["data", "run", "--config", str(path), "select.dp.epsilon=2.0", "select.dp.seed=0"]) == 0
    assert load_manifest(out)["select"]["target_docs"] == 301


def test_pipeline_runs_classifier_and_perplexity_band(tmp_path):
    from llmkit.data.corpus import build_corpus

    path = _write_config(tmp_path, f"select: {{enabled: true, method: classifier, target: [{tmp_path / 'target.txt'}],"
                                   " threshold: 0.5, sources: [web]}")
    manifest = build_corpus(load_config(CorpusConfig, path))
    sel = manifest["select"]
    assert set(sel["by_source"]) == {"web"}  # plays are not candidates and pass untouched
    assert manifest["reasons"].get("select.classifier", 0) == sel["dropped"] > 0
    assert sel["held_out_auc"] > 0.9
    ppl = ("perplexity: {enabled: true, percentile: 100.0, scorer: {kind: ngram, order: 3, "
           "train_sources: [plays]}}")
    path = _write_config(tmp_path, "select: {enabled: true, method: perplexity, low: 0.1, high: 0.9}", ppl)
    manifest = build_corpus(load_config(CorpusConfig, path))
    sel = manifest["select"]
    assert "perplexity.high" not in manifest["reasons"]
    assert manifest["reasons"]["select.perplexity"] == sel["dropped"] == sel["candidates"] - sel["selected"]
    assert 0.7 <= sel["selected"] / sel["candidates"] <= 0.85
    kept = [d for f in sorted((tmp_path / "out" / "data").glob("part-*.jsonl.gz")) for d in _read_gz(f)]
    lo, hi = sel["bands"]["en"]
    assert all(lo <= d["stats"]["perplexity"] + 1e-3 and d["stats"]["perplexity"] - 1e-3 <= hi for d in kept)
