"""The `select` lab claim (llmkit.lab.experiments.select): its decision function reaches every verdict, the
subsets every arm trains on have the same number of tokens, and the target's validation text never reaches the
pool, the selectors' target sample or a selection. Fast: synthetic pools, no pretraining."""

from __future__ import annotations

import numpy as np
import pytest

from llmkit.lab.experiments import select as S

# -- the decision -------------------------------------------------------------------------------------------


def _losses(random, best, dp, others=(4.0, 4.0), random_b=None):
    return {"random": list(random), "random-b": list(random if random_b is None else random_b),
            "dsir": [others[0]] * len(random), "classifier": list(best), "perplexity": [others[1]] * len(random),
            S.dp_arm(8): list(dp), S.dp_arm(512): list(random)}


def test_verdict_holds_when_selection_and_private_selection_beat_random_on_every_seed():
    assert S.verdict(_losses([3.5, 3.6, 3.55], [3.3, 3.4, 3.3], [3.45, 3.5, 3.5]))[0] == "holds"


def test_verdict_partly_when_only_the_non_private_selector_beats_random():
    v, reason = S.verdict(_losses([3.5, 3.6, 3.55], [3.3, 3.4, 3.3], [3.51, 3.59, 3.56]))
    assert v == "partly holds" and "private selection does not beat random" in reason
    assert "best selector classifier" in reason


def test_verdict_partly_when_only_a_private_arm_beats_random():
    v, reason = S.verdict(_losses([3.5, 3.6], [3.49, 3.61], [3.4, 3.5]))
    assert v == "partly holds" and "private selection beats random" in reason


def test_verdict_needs_every_seed_and_the_margin():
    # better on the mean, but one seed within the margin: not "on every seed"
    assert S.verdict(_losses([3.5, 3.6, 3.55], [3.3, 3.59, 3.3], [3.6, 3.6, 3.6]))[0] == "does not hold"
    # below random on every seed, by less than the margin
    gap = S.MARGIN / 2
    assert S.verdict(_losses([3.5, 3.6], [3.5 - gap, 3.6 - gap], [3.5, 3.6]))[0] == "does not hold"


def test_verdict_threshold_is_the_spread_between_random_subsets():
    # the first full run's shape: a DP arm 0.05-0.09 below one random subset on every seed, while two random
    # subsets differ by up to 0.2: within the noise, so the private half fails
    random, random_b = [5.146, 5.102, 4.870], [5.05, 5.30, 4.90]
    dp = [5.095, 5.015, 4.781]
    v, reason = S.verdict(_losses(random, [4.6, 4.8, 4.6], dp, others=(5.5, 5.5), random_b=random_b))
    assert v == "partly holds" and "threshold 0.198" in reason
    # the same private gains count when the random subsets agree
    assert S.verdict(_losses(random, [4.6, 4.8, 4.6], dp, others=(5.5, 5.5), random_b=random))[0] == "holds"
    # a selector gain smaller than the random spread does not count either
    assert S.verdict(_losses(random, [5.0, 5.0, 4.75], dp, others=(5.5, 5.5), random_b=random_b))[0] == "does not hold"


def test_verdict_does_not_hold_when_selection_is_worse_than_random():
    assert S.verdict(_losses([3.5, 3.6], [3.7, 3.8], [3.6, 3.7], others=(3.9, 3.9)))[0] == "does not hold"


def test_verdict_not_measured_without_an_arm():
    assert S.verdict({"random": [3.5], "random-b": [3.5], "dsir": [3.2]})[0] == "not measured"
    assert S.verdict({"random": [3.5], "dsir": [3.2], S.dp_arm(8): [3.3]})[0] == "not measured"
    assert S.verdict({"dsir": [3.2], S.dp_arm(8): [3.3]})[0] == "not measured"


# -- the split and the subsets ---------------------------------------------------------------------------------


def test_passages_cut_at_sentence_ends_and_keep_every_character():
    text = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(200))
    ps = S.passages(text, 300)
    assert len(ps) > 5 and all(p.endswith(".") for p in ps)
    assert all(len(p) >= 300 for p in ps[:-1])
    assert " ".join(ps).split() == text.split()


def test_split_articles_keeps_validation_articles_out_of_pool_and_target():
    articles = [" ".join(f"Article{a} sentence {i} is here." for i in range(60)) for a in range(12)]
    parts = S.split_articles(articles, 200)
    val_tag = {f"Article{a} " for a in range(12) if a % 5 == 0}
    assert parts["val"] and parts["target"] and parts["pool"]
    for name in ("target", "pool"):
        assert not any(tag in p for p in parts[name] for tag in val_tag), name
    assert all(any(tag in p for tag in val_tag) for p in parts["val"])


def _pool(n=300, seed=0):
    rng = np.random.default_rng(seed)
    words = {"wiki": "the history of the state and its government in the century".split(),
             "web": "buy now click free offer best price deal shop online".split(),
             "zh": list("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种")}
    texts, sources, langs = [], [], []
    for i in range(n):
        src = ["wiki", "web", "zh"][i % 3]
        k = int(rng.integers(5, 60))
        texts.append((" " if src != "zh" else "").join(rng.choice(words[src], k)) + ".")
        sources.append(src)
        langs.append("zh" if src == "zh" else "en")
    tokens = [np.arange(len(t.split()) if s != "zh" else len(t)) + 1 for t, s in zip(texts, sources)]
    target = [" ".join(rng.choice(words["wiki"], 40)) + "." for _ in range(20)]
    ppl = np.array([10.0 if s == "wiki" else 50.0 + i for i, s in enumerate(sources)])
    return S.Pool(texts=texts, ids=[f"d{i}" for i in range(n)], sources=np.array(sources), langs=np.array(langs),
                  ppl=ppl, tokens=tokens, target=target, target_file="unused", val_text="held out", report={})


@pytest.mark.parametrize("seed", [0, 1])
def test_every_arm_holds_the_budget_and_trains_on_the_same_tokens(seed, tmp_path):
    pool = _pool()
    target_file = tmp_path / "target.txt"
    target_file.write_text("\n".join(pool.target) + "\n")
    pool.target_file = str(target_file)
    budget = 1500
    n_tok = pool.n_tokens
    selections = {arm: S.select_arm(arm, pool, seed, budget) for arm in S.ARMS}
    for arm, (keep, _) in selections.items():
        assert keep.dtype == bool and keep.any(), arm
        if not arm.startswith("dp"):  # a private arm's k documents hold about the budget, not surely
            assert n_tok[keep].sum() >= budget, arm
    length = min([budget] + [int(n_tok[k].sum()) for k, _ in selections.values()])
    streams = {arm: S.token_stream(pool.tokens, keep, length, seed) for arm, (keep, _) in selections.items()}
    assert {len(s) for s in streams.values()} == {length}
    # the selectors find the target-like documents; random does not
    wiki = {arm: n_tok[keep & (pool.sources == "wiki")].sum() / n_tok[keep].sum() for arm, (keep, _) in selections.items()}
    assert wiki["dsir"] > wiki["random"] + 0.3 and wiki["classifier"] > wiki["random"] + 0.3
    with pytest.raises(ValueError, match="fewer than"):
        S.token_stream(pool.tokens, selections["random"][0], int(n_tok.sum()) + 1, seed)


def test_token_dir_is_read_by_the_training_data_loader(tmp_path):
    from llmkit.data.tokenized import open_split, read_meta

    class Tok:
        vocab_size = 1000

        @staticmethod
        def digest():
            return "abc"

    train, val = np.arange(500) % 1000, np.arange(120) % 7
    S.write_token_dir(tmp_path, train, val, Tok(), 2000, 480)
    assert read_meta(tmp_path)["tokenizer_digest"] == "abc"
    tr, va = open_split(tmp_path, "train"), open_split(tmp_path, "val")
    assert tr.tokens == 500 and va.tokens == 120 and va.bytes == 480
    assert np.array_equal(np.concatenate(tr.shards), train) and np.array_equal(np.concatenate(va.shards), val)


def test_the_pool_never_holds_the_validation_text(tmp_path, monkeypatch):
    """build_pool on the real corpora (quick size): no validation passage, nor any 200-character piece of one,
    is in the pool, in the target sample, or in what a selection keeps."""
    from conftest import shared_file

    shared_file("en/wiki_demo.txt")
    from llmkit.lab.common import bilingual_tokenizer

    tok_dir = bilingual_tokenizer(tmp_path / "_shared", vocab_size=300)
    pool = S.build_pool(tmp_path / "work", tok_dir, quick=True)
    val_passages = [p for p in (tmp_path / "work" / "wiki_val.txt").read_text(encoding="utf-8").splitlines() if p]
    assert val_passages and pool.val_text
    pieces = [p[i:i + 200] for p in val_passages for i in range(0, max(1, len(p) - 200), 400)]
    haystacks = pool.texts + pool.target
    assert not any(piece in h for piece in pieces for h in haystacks)
    keep, _ = S.select_arm("dsir", pool, 0, 2000)
    assert not any(piece in pool.texts[i] for i in np.flatnonzero(keep) for piece in pieces)
    assert (pool.sources == "wiki").any() and len(pool.target) > 0


def test_pipeline_report_shows_the_selection():
    from llmkit.pipeline.report import data_section

    sel = {"method": "dsir", "reason": "select.dsir", "candidates": 10, "selected": 4, "dropped": 6,
           "tokens": {"candidates": 1000, "selected": 400}, "chars": {"candidates": 5000, "selected": 2000},
           "kl_target_raw": 0.5, "token_counter": "estimate",
           "by_source": {"c4": {"candidates": 6, "selected": 1}, "wiki": {"candidates": 4, "selected": 3}},
           "dp": {"epsilon": 4.0, "delta": 0.0, "noise_scale": 2.0, "composition": "basic composition",
                  "overlap_share": 0.5, "random_overlap_share": 0.4}}
    manifest = {"funnel": [{"step": "read", "in": 10, "out": 10, "dropped": {}},
                           {"step": "select", "in": 10, "out": 4, "dropped": {"select.dsir": 6}}], "select": sel}
    body = data_section(manifest).body
    assert "Selection (dsir)" in body and "4 of 10 candidates selected" in body and "select.dsir" in body
    assert "KL(target || raw)" in body and "Gumbel scale" in body and "<td>wiki</td>" in body
