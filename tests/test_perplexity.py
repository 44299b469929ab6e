"""Perplexity filter: the n-gram LM is a normalised, correct interpolated Kneser-Ney model (brute force,
an independent reference implementation, and KenLM reading our ARPA), it ranks in-domain text below
web / shuffled / foreign text, the llmkit scorer's batching and sliding windows are exact, and the
threshold helpers and the step behave as documented."""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict

import numpy as np
import pytest

from conftest import shared_file
from llmkit.data.perplexity import (
    DROP_HIGH,
    KenLMScorer,
    LlmkitScorer,
    NgramLM,
    PerplexityConfig,
    PerplexityFilter,
    ScorerConfig,
    arpa_chars,
    load_scorer,
    summarize,
    thresholds_per_language,
)

SMALL = [
    "the cat sat on the mat.",
    "the dog sat on the log!",
    "a cat and a dog met on the mat",
    "dogs and cats",
    "",
]


@pytest.fixture(scope="module")
def wiki() -> list[str]:
    text = shared_file("en/wiki_demo.txt").read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line.strip()]


@pytest.fixture(scope="module")
def wiki_model(wiki) -> NgramLM:
    return NgramLM.train(wiki[:24], order=5)


def _shuffled(text: str, seed: int = 0) -> str:
    chars = list(text)
    random.Random(seed).shuffle(chars)
    return "".join(chars)


# -- n-gram model: correctness -----------------------------------------------------------------------


@pytest.mark.parametrize("unit,order", [("char", 1), ("char", 2), ("char", 3), ("char", 5), ("word", 3)])
def test_next_token_distribution_sums_to_one(unit, order):
    m = NgramLM.train(SMALL, order=order, unit=unit)
    assert m.n_predicted == m.n + 2
    first = 0
    histories = [[m.bos], [m.bos, first], [first, 1], [m.bos, first, 1, 2], [m.unk], [first, m.unk, 1],
                 [m.eos - 1] * 4, []]
    for hist in histories:
        p = m.next_token_probs(hist)
        assert p.shape == (m.n + 2,)
        assert (p > 0).all()
        assert p.sum() == pytest.approx(1.0, abs=1e-6), (hist, p.sum())


def _reference_kn(docs: list[list[str]], order: int):
    """Textbook interpolated modified Kneser-Ney (Chen & Goodman 1998) with dicts; returns p(w, history)."""
    raw = [Counter() for _ in range(order + 1)]
    for d in docs:
        s = ["<s>", *d, "</s>"]
        for i in range(1, len(s)):
            for k in range(1, min(order, i + 1) + 1):
                raw[k][tuple(s[i - k + 1:i + 1])] += 1
    adj = [None] + [Counter() for _ in range(order)]
    adj[order] = Counter(raw[order])
    for k in range(1, order):
        left = defaultdict(set)
        for g in raw[k + 1]:
            left[g[1:]].add(g[0])
        for g, c in raw[k].items():
            adj[k][g] = c if g[0] == "<s>" else len(left[g])

    def discounts(a):
        t = [sum(1 for c in a.values() if c == j) for j in (1, 2, 3, 4)]
        if min(t) == 0:
            return 0.5, 1.0, 1.5
        y = t[0] / (t[0] + 2 * t[1])
        d = (1 - 2 * y * t[1] / t[0], 2 - 3 * y * t[2] / t[1], 3 - 4 * y * t[3] / t[2])
        return d if all(0 < dj < j for j, dj in zip((1, 2, 3), d)) else (0.5, 1.0, 1.5)

    disc = [None] + [discounts(adj[k]) for k in range(1, order + 1)]
    den, mass = [defaultdict(float) for _ in range(order + 1)], [defaultdict(float) for _ in range(order + 1)]
    for k in range(1, order + 1):
        for g, a in adj[k].items():
            den[k][g[:-1]] += a
            mass[k][g[:-1]] += disc[k][min(a, 3) - 1]
    vocab_size = len(adj[1]) + 1  # seen tokens incl. </s>, plus <unk>

    def p(w: str, hist: tuple) -> float:
        hist = hist[max(0, len(hist) - (order - 1)):] if order > 1 else ()
        k = len(hist) + 1
        lower = 1.0 / vocab_size if k == 1 else p(w, hist[1:])
        d = den[k].get(hist, 0.0)
        if d == 0:
            return lower
        a = adj[k].get((*hist, w), 0)
        u = (a - disc[k][min(a, 3) - 1]) / d if a else 0.0
        return u + mass[k][hist] / d * lower

    return p


@pytest.mark.parametrize("unit,order", [("char", 3), ("char", 4), ("word", 3)])
def test_matches_textbook_kneser_ney(wiki, unit, order):
    train = [w[:4000] for w in wiki[:6]]
    held_out = wiki[7][:300] + " zz\u4e2d\u6587 q"  # unseen characters / words included
    m = NgramLM.train(train, order=order, unit=unit)
    split = list if unit == "char" else str.split
    p = _reference_kn([split(t) for t in train], order)
    toks = split(held_out)
    known = set(m.vocab) if unit == "word" else {chr(c) for c in m.vocab}
    toks_ref = [t if t in known else "<unk>" for t in toks] + ["</s>"]
    hist = ("<s>",)
    expected = []
    for t in toks_ref:
        expected.append(math.log(p(t, hist)))
        hist = (*hist, t)
    ours = m.token_log_probs(held_out)
    assert len(ours) == len(expected)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unit", ["char", "word"])
def test_kenlm_reads_our_arpa_and_agrees(tmp_path, wiki, unit):
    pytest.importorskip("kenlm")
    m = NgramLM.train([w[:5000] for w in wiki[:10]], order=4, unit=unit)
    arpa = m.to_arpa(tmp_path / "m.arpa")
    lines = arpa.read_text(encoding="utf-8").splitlines()
    header = lines[lines.index("\\data\\") + 1:lines.index("\\1-grams:") - 1]
    assert header == [f"ngram {k}={c}" for k, c in enumerate(m.meta["ngrams"], start=1)]
    assert lines[-1] == "\\end\\"
    kl = KenLMScorer(arpa, tokenize="chars" if unit == "char" else "words")
    texts = [wiki[12][:800], "Tabs\tand\nnewlines,  double  spaces\u00a0nbsp", "\u65e5\u672c\u8a9e text \u00d7", "",
             _shuffled(wiki[13][:300])]
    sums, counts = m.log_prob_sums(texts)
    for t, s in zip(texts, sums):
        assert kl.log10_prob(t) == pytest.approx(s / math.log(10), rel=2e-6, abs=1e-5)
    np.testing.assert_allclose(kl.perplexities(texts), m.perplexities(texts), rtol=1e-5)
    if unit == "char":  # token by token, too
        import kenlm

        per_token = [s for s, _, _ in kenlm.Model(str(arpa)).full_scores(arpa_chars(texts[1]))]
        np.testing.assert_allclose(per_token, m.token_log_probs(texts[1]) / math.log(10), atol=1e-5)


def test_arpa_char_names_escape_whitespace():
    assert arpa_chars("a b\tc") == "a <U+0020> b <U+0009> c"
    assert arpa_chars("") == ""


# -- n-gram model: behaviour on real text ------------------------------------------------------------


def test_own_domain_is_least_perplexing(wiki, wiki_model):
    c4 = [json.loads(line)["text"] for line in shared_file("en/c4_demo.jsonl").read_text(encoding="utf-8").splitlines()]
    zh = json.loads(shared_file("zh/lunyu.json").read_text(encoding="utf-8"))
    zh_text = ["".join(r["paragraphs"]) for r in zh[:20]]
    held_wiki = wiki_model.perplexities(wiki[24:])
    web = wiki_model.perplexities(c4[:100])
    shuffled = wiki_model.perplexities([_shuffled(t) for t in wiki[24:]])
    foreign = wiki_model.perplexities(zh_text)
    assert wiki_model.unit == "char"
    assert np.median(held_wiki) < np.median(web) < np.median(shuffled) < np.median(foreign)
    assert (held_wiki < shuffled).all()  # each article beats its own shuffled characters


def test_chinese_char_model():
    poems = json.loads(shared_file("zh/tangshisanbaishou.json").read_text(encoding="utf-8"))
    texts = []
    for section in poems["content"]:
        texts += ["\n".join(r["paragraphs"]) for r in section["content"]]
    mengzi = json.loads(shared_file("zh/mengzi.json").read_text(encoding="utf-8"))
    train = [p for chapter in mengzi[:11] for p in chapter["paragraphs"]]
    held_out = [p for chapter in mengzi[11:] for p in chapter["paragraphs"]]
    m = NgramLM.train(train, order=5)
    held = m.perplexities(held_out)
    shuffled = m.perplexities([_shuffled(t) for t in held_out])
    english = m.perplexities(["The Master said: is it not pleasant to learn with constant perseverance?"])
    assert np.median(held) < np.median(shuffled) < english[0]
    assert (held < shuffled).all()
    assert np.isfinite(m.perplexities(texts[:5])).all()


def test_save_load_round_trip(tmp_path, wiki_model, wiki):
    texts = wiki[25:27] + ["\u4e2d\u6587 unseen \U0001f600", ""]
    path = wiki_model.save(tmp_path / "lm.bin")  # any name: no ".npz" gets appended
    assert path == tmp_path / "lm.bin" and path.is_file()
    loaded = NgramLM.load(path)
    assert np.array_equal(loaded.perplexities(texts), wiki_model.perplexities(texts))
    word = NgramLM.train(SMALL, order=3, unit="word")
    word2 = NgramLM.load(word.save(tmp_path / "word.npz"))
    assert word2.unit == "word" and word2.vocab == word.vocab
    assert np.array_equal(word2.perplexities(SMALL + ["unseen words here"]), word.perplexities(SMALL + ["unseen words here"]))


def test_batched_scoring_equals_one_by_one(wiki_model, wiki):
    texts = [wiki[25][:2000], "", "x", wiki[26][:500], "\u4e2d"]
    batch = wiki_model.perplexities(texts)
    np.testing.assert_allclose(batch, [wiki_model.perplexity(t) for t in texts], rtol=1e-12)
    # ppl = exp(-mean ln p) over the characters plus </s>
    lp = wiki_model.token_log_probs(texts[3])
    assert len(lp) == 501
    assert batch[3] == pytest.approx(math.exp(-lp.mean()))


def test_train_char_cap_and_errors():
    m = NgramLM.train(["abcdef", "ghij"], order=2, max_chars=8)
    assert m.meta["train_chars"] == 8 and m.n == 8  # a..h
    with pytest.raises(TypeError):
        NgramLM.train("a single string")
    with pytest.raises(ValueError, match="no training texts"):
        NgramLM.train([])
    with pytest.raises(ValueError, match="unit"):
        NgramLM.train(["a"], unit="byte")


# -- llmkit checkpoint scorer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    import torch

    from llmkit.models.decoder import DecoderConfig
    from llmkit.models.io import build_model, save_model
    from llmkit.tokenizer import train_char

    tok = train_char(["abcdefghijklmnopqrstuvwxyz .,"])
    torch.manual_seed(0)
    model = build_model(DecoderConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, d_model=32, n_head=2))
    out = tmp_path_factory.mktemp("tiny_decoder")
    save_model(model, out, tokenizer=tok)
    return out


def _reference_nll(scorer: LlmkitScorer, text: str) -> tuple[float, int]:
    """Token by token: target j is predicted by the first window (starts 0, s, 2s, ...) that reaches it,
    from the context x[start:j] - no batching, no padding."""
    import torch

    x = [scorer.tokenizer.eos_id, *scorer.tokenizer.encode(text), scorer.tokenizer.eos_id]
    block, stride = scorer.block, scorer.stride
    total = 0.0
    for j in range(1, len(x)):
        start = 0
        while min(start + block, len(x) - 1) < j:
            start += stride
        with torch.no_grad():
            logits, _ = scorer.model(torch.tensor([x[start:j]]))
        total -= torch.log_softmax(logits[0, -1].double(), -1)[x[j]].item()
    return total, len(x) - 1


def test_llmkit_scorer_batched_and_sliding_windows_exact(tiny_decoder):
    texts = ["", "hello world", "a" * 14, "b" * 15, "the quick brown fox.", "jumps over the lazy dog, " * 3,
             "zzz unknown \u00e9 chars"]
    one = LlmkitScorer(tiny_decoder, batch_size=1)
    many = LlmkitScorer(tiny_decoder, batch_size=5)
    assert one.block == 16 and one.stride == 8 and one.unit.startswith("token (tokenizer char:")
    sums, counts = many.nll(texts)
    for t, s, c in zip(texts, sums, counts):
        ref_sum, ref_count = _reference_nll(one, t)
        assert c == ref_count == len(one.tokenizer.encode(t)) + 1  # every token counted once, EOS included
        assert s == pytest.approx(ref_sum, rel=1e-5)
    np.testing.assert_allclose(one.perplexities(texts), many.perplexities(texts), rtol=1e-5)
    assert many.perplexity(texts[1]) == pytest.approx(math.exp(sums[1] / counts[1]), rel=1e-6)
    capped = LlmkitScorer(tiny_decoder, max_tokens=5)
    assert capped.nll([texts[5]])[1][0] == 6


def test_load_scorer_kinds(tmp_path, tiny_decoder, wiki):
    cfg = ScorerConfig(order=3)
    m = load_scorer(cfg, train_texts=iter(wiki[:3]))
    assert isinstance(m, NgramLM) and m.order == 3
    path = m.save(tmp_path / "m.npz")
    assert isinstance(load_scorer(ScorerConfig(order=3, path=str(path))), NgramLM)
    with pytest.raises(ValueError, match="order"):
        load_scorer(ScorerConfig(order=5, path=str(path)))
    with pytest.raises(ValueError, match="training texts"):
        load_scorer(ScorerConfig())
    assert isinstance(load_scorer(ScorerConfig(kind="llmkit", path=str(tiny_decoder))), LlmkitScorer)
    pytest.importorskip("kenlm")
    arpa = m.to_arpa(tmp_path / "m.arpa")
    k = load_scorer(ScorerConfig(kind="kenlm", path=str(arpa), tokenize="chars"))
    assert k.perplexity(wiki[5][:300]) == pytest.approx(m.perplexity(wiki[5][:300]), rel=1e-5)


def test_kenlm_missing_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "kenlm", None)  # makes `import kenlm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install llmkit\[kenlm\]"):
        KenLMScorer(tmp_path / "x.arpa")


# -- config, thresholds, the step --------------------------------------------------------------------


def test_config_validation_and_yaml(tmp_path):
    from llmkit.config import ConfigError, load_config

    PerplexityConfig().validate()  # disabled by default
    with pytest.raises(ValueError, match="threshold"):
        PerplexityConfig(enabled=True).validate()
    with pytest.raises(ValueError, match="threshold"):
        PerplexityConfig(enabled=True, threshold=10.0, percentile=90.0).validate()
    with pytest.raises(ValueError, match="percentile"):
        PerplexityConfig(enabled=True, percentile=0.0).validate()
    with pytest.raises(ValueError, match="path"):
        ScorerConfig(kind="kenlm").validate()
    y = tmp_path / "ppl.yaml"
    y.write_text("enabled: true\npercentile: 90\nscorer:\n  order: 4\n  train_sources: [wiki]\n")
    cfg = load_config(PerplexityConfig, y)
    assert cfg.percentile == 90.0 and cfg.scorer.order == 4 and cfg.scorer.train_sources == ["wiki"]
    assert cfg.scorer.is_training_doc({"source": "wiki", "domain": "web"})
    assert not cfg.scorer.is_training_doc({"source": "c4", "domain": "encyclopedia"})
    with pytest.raises(ConfigError):
        load_config(PerplexityConfig, overrides=["scorer.unit=byte"])


def test_thresholds_and_summary():
    scores = {"en": np.arange(1.0, 101.0), "zh": np.array([50.0, 60.0, 70.0]), "fr": np.array([])}
    pct = thresholds_per_language(scores, PerplexityConfig(enabled=True, percentile=90.0))
    assert pct == {"en": pytest.approx(90.1), "zh": pytest.approx(68.0)}
    assert thresholds_per_language(scores, PerplexityConfig(enabled=True, threshold=15.0)) == {
        "en": 15.0, "zh": 15.0, "fr": 15.0}
    s = summarize({"web": np.array([1.0, 2.0, np.nan, 3.0, 4.0, 5.0]), "empty": np.array([])})
    assert s["web"] == {"count": 5, "mean": 3.0, "min": 1.0, "p10": 1.4, "p25": 2.0, "p50": 3.0, "p75": 4.0,
                        "p90": 4.6, "max": 5.0}
    assert s["empty"]["count"] == 0 and s["empty"]["p50"] is None


def test_filter_step_absolute_and_percentile(wiki_model, wiki):
    good = {"id": "w", "text": wiki[25][:1000], "lang": "en", "stats": {}}
    bad = {"id": "s", "text": _shuffled(wiki[25][:1000]), "lang": "en", "stats": {}}
    cut = (wiki_model.perplexity(good["text"]) + wiki_model.perplexity(bad["text"])) / 2
    step = PerplexityFilter(PerplexityConfig(enabled=True, threshold=cut), wiki_model)
    assert step(good) is None and step(bad) == DROP_HIGH
    assert good["stats"]["ppl"] == pytest.approx(wiki_model.perplexity(good["text"]), abs=1e-3)

    docs = [{"id": str(i), "text": t[:600], "lang": "en", "stats": {}} for i, t in enumerate(wiki[24:30])]
    docs += [{"id": "z", "text": "\u5b66\u800c\u65f6\u4e60\u4e4b", "lang": "zh", "stats": {}}, dict(bad, id="s2", stats={})]
    pstep = PerplexityFilter(PerplexityConfig(enabled=True, percentile=80.0), wiki_model)
    with pytest.raises(RuntimeError, match="fit"):
        pstep(docs[0])
    pstep.score(docs)
    limits = pstep.fit(docs)
    assert set(limits) == {"en", "zh"}
    reasons = [pstep(d) for d in docs]
    assert reasons[-1] == DROP_HIGH  # the shuffled text is the worst English document
    assert reasons[-2] is None  # alone in its language: at its own percentile, kept
    assert reasons.count(DROP_HIGH) == 2  # 80th percentile of 7 English documents: the top 20% (2 of 7)
