"""Data augmentation (llmkit.data.augment): the four EDA operations on en and zh (jieba), synonym
dictionaries and the WordNet data.* parser, the Augmenter step (ids, marks, filters, determinism), and
back-translation plumbing with tiny random HF T5 and llmkit encoder-decoder models."""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from llmkit.config import ConfigError, load_config
from llmkit.data.augment import (
    EN_STOPWORDS,
    ZH_STOPWORDS,
    AugmentConfig,
    Augmenter,
    BackTranslationConfig,
    BackTranslator,
    _merge_glue,
    join_words,
    load_synonym_dict,
    load_wordnet,
    merge_synonyms,
    n_changes,
    random_delete,
    random_insert,
    random_swap,
    split_words,
    synonym_replace,
)

DATA = Path(__file__).parent / "data"
EN_DICT = DATA / "synonyms_en.tsv"
ZH_DICT = DATA / "synonyms_zh.tsv"

EN_TEXT = ("the quick dog and the lazy cat sat in the old house, happy and small.\n"
           "a smart student will answer every hard question; it is easy to help!\n\n"
           "    we walk, we talk, we look at 3 new cars in 2024 and buy a big one.")
ZH_TEXT = "老师认为这个问题很重要，学生发现答案非常简单。\n今天天气很好，我们很高兴。朋友们喜欢这个城市！"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny models gain nothing from threads, and OpenMP spinning slows them on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def en_syn():
    return load_synonym_dict(EN_DICT)


@pytest.fixture(scope="module")
def zh_syn():
    return load_synonym_dict(ZH_DICT)


def _alt(options) -> str:
    # longest first so a synonym that is a prefix of another cannot win a tie
    return "|".join(re.escape(o) for o in sorted(set(options), key=len, reverse=True))


def _decompose_replaced(out: str, words, glues, synonyms) -> list[str] | None:
    """The word chosen at every position if `out` is the text with some words replaced by one of their
    synonyms (glue untouched), else None."""
    pat = re.escape(glues[0])
    for w, g in zip(words, glues[1:]):
        pat += f"({_alt([w, *synonyms.get(w.lower(), [])])})" + re.escape(g)
    m = re.fullmatch(pat, out)
    return list(m.groups()) if m else None


# -- words and glue --------------------------------------------------------------------------------


def test_split_join_roundtrip_keeps_punctuation_digits_and_lines():
    text = "It’s 9 a.m.\n  Don't stop -- well-known (really)!\n\nEnd"
    words, glues = split_words(text, "en")
    assert words == ["It’s", "a", "m", "Don't", "stop", "well-known", "really", "End"]
    assert len(glues) == len(words) + 1 and join_words(words, glues) == text
    zw, zg = split_words(ZH_TEXT, "zh")
    assert join_words(zw, zg) == ZH_TEXT
    assert "老师" in zw and "，" not in zw and all(not w.isspace() for w in zw)
    assert split_words("", "en") == ([], [""])


def test_merge_glue_after_deleting_a_word():
    assert _merge_glue(" ", " ") == " "
    assert _merge_glue(" ", ", ") == ", "  # "a b, c" - b -> "a, c"
    assert _merge_glue(", ", " ") == ", "
    assert _merge_glue(" ", "\n") == "\n"  # last word of a line
    assert _merge_glue("\n", " ") == "\n"
    assert _merge_glue("", " ") == ""  # first word of the text
    assert _merge_glue(" ", "") == ""
    assert _merge_glue(".\n\n", " ") == ".\n\n"
    assert _merge_glue("\n    ", " ") == "\n    "  # the first word of an indented line


# -- EDA on English --------------------------------------------------------------------------------


def test_synonym_replace_changes_n_words_with_dictionary_synonyms(en_syn):
    words, glues = split_words(EN_TEXT, "en")
    eligible = [w for w in words if w.lower() not in EN_STOPWORDS and w.lower() in en_syn]
    assert len(eligible) >= 12
    for alpha in (0.05, 0.1, 0.2):
        n = n_changes(len(words), alpha)
        for seed in range(5):
            out = synonym_replace(EN_TEXT, random.Random(seed), en_syn, alpha)
            chosen = _decompose_replaced(out, words, glues, en_syn)
            assert chosen is not None, out  # glue (punctuation, digits, lines) untouched
            changed = [(a, b) for a, b in zip(words, chosen) if a != b]
            assert len(changed) == n
            for old, new in changed:
                assert old.lower() not in EN_STOPWORDS and new in en_syn[old.lower()]
    # fewer eligible words than n: all of them are replaced, nothing else
    out = synonym_replace("the dog and the cat", random.Random(0), en_syn, alpha=1.0)
    the, dog, _, the2, cat = out.split()
    assert (the, the2) == ("the", "the") and dog in en_syn["dog"] and cat in en_syn["cat"]


def test_synonym_replace_keeps_case_and_never_touches_stop_words(en_syn):
    out = synonym_replace("Quick QUICK quick", random.Random(1), {"quick": ["fast"]}, alpha=1.0)
    assert out == "Fast FAST fast"
    stop_syn = merge_synonyms(en_syn, {"the": ["a"], "very": ["extremely"], "and": ["plus"]})
    for seed in range(10):
        out = synonym_replace("the very big dog and the very small cat", random.Random(seed), stop_syn, alpha=1.0)
        assert out.split()[0] == "the" and out.split()[1] == "very" and " and the very " in out
    # multi-word synonyms ("_" in the file) come back with spaces
    outs = {synonym_replace("breathe", random.Random(s), en_syn, 1.0) for s in range(30)}
    assert outs == {"respire", "take a breath"}


def test_synonym_replace_without_synonyms_is_identity(en_syn):
    text = "Zebras quietly graze near rivers."
    assert synonym_replace(text, random.Random(0), en_syn, 0.5) == text
    assert random_insert(text, random.Random(0), en_syn, 0.5) == text


def test_random_insert_adds_n_synonyms_of_words_in_the_text(en_syn):
    text = EN_TEXT.lower()
    words, glues = split_words(text, "en")
    pool = {s for w in words if w not in EN_STOPWORDS for s in en_syn.get(w, [])}
    alt = _alt(pool)
    # an insertion lands right before a word ("syn " + word) or after the last one (" " + syn)
    pat = ""
    for w, g in zip(words, glues):
        pat += re.escape(g) + f"((?:(?:{alt}) )*)" + re.escape(w)
    pat += f"((?: (?:{alt}))*)" + re.escape(glues[-1])
    for alpha in (0.05, 0.2):
        n = n_changes(len(words), alpha)
        for seed in range(5):
            out = random_insert(text, random.Random(seed), en_syn, alpha)
            m = re.fullmatch(pat, out)
            assert m is not None, out  # the original words and glue, in order, plus insertions
            inserted = [s for grp in m.groups() for s in re.findall(alt, grp)]
            assert len(inserted) == n
            assert out.count("\n") == text.count("\n")


def test_random_swap_preserves_words_and_glue():
    words, glues = split_words(EN_TEXT, "en")
    for alpha in (0.1, 0.3):
        n = n_changes(len(words), alpha)
        for seed in range(5):
            out = random_swap(EN_TEXT, random.Random(seed), alpha)
            w2, g2 = split_words(out, "en")
            assert g2 == glues  # punctuation, digits and line structure stay in place
            assert Counter(w.lower() for w in w2) == Counter(w.lower() for w in words)
            moved = sum(a.lower() != b.lower() for a, b in zip(words, w2))
            assert 0 < moved <= 2 * n
    assert random_swap("alone.", random.Random(0)) == "alone."


def test_random_swap_recases_sentence_starts():
    outs = {random_swap("The dog sat.", random.Random(s), alpha=0.4) for s in range(40)}
    assert outs == {"Dog the sat.", "Sat dog the.", "The sat dog."}
    # a capital that is not (only) a sentence start stays: "London" is never lowercased
    outs = {random_swap("London is big.", random.Random(s), alpha=0.4) for s in range(40)}
    assert all("London" in o for o in outs)


def test_random_delete_never_empties_and_only_deletes(en_syn):
    words, _ = split_words(EN_TEXT, "en")
    for seed in range(20):
        out = random_delete(EN_TEXT, random.Random(seed), p=0.99)
        left, _ = split_words(out, "en")
        assert len(left) >= 1 and left[0].lower() in {w.lower() for w in words}
        one = random_delete("word", random.Random(seed), p=0.99)
        assert one == "word"
    for seed in range(5):
        out = random_delete(EN_TEXT, random.Random(seed), p=0.3)
        left, _ = split_words(out, "en")
        assert 0 < len(left) < len(words)
        it = iter(w.lower() for w in words)  # survivors are a subsequence of the original words
        assert all(any(w.lower() == x for x in it) for w in left)
        assert out.count("\n") == EN_TEXT.count("\n")
        body = re.sub(r"(?m)^ +", "", out)  # indentation is kept; elsewhere no doubled or stray spaces
        assert " ," not in body and "  " not in body
    assert random_delete("", random.Random(0), p=0.5) == ""
    assert random_delete("... 42 !", random.Random(0), p=0.5) == "... 42 !"


# -- EDA on Chinese (jieba) ------------------------------------------------------------------------


def test_zh_synonym_replace_and_stop_words(zh_syn):
    words, glues = split_words(ZH_TEXT, "zh")
    n = n_changes(len(words), 0.2)
    syn = merge_synonyms(zh_syn, {"这个": ["此"], "很": ["颇"]})  # stop words: never replaced
    for seed in range(5):
        out = synonym_replace(ZH_TEXT, random.Random(seed), syn, 0.2, lang="zh")
        assert " " not in out
        chosen = _decompose_replaced(out, words, glues, syn)
        assert chosen is not None, out
        changed = [(a, b) for a, b in zip(words, chosen) if a != b]
        assert len(changed) == n
        assert all(a not in ZH_STOPWORDS and b in zh_syn[a] for a, b in changed)
        assert "此" not in out and "颇" not in out


def test_zh_insert_swap_delete(zh_syn):
    words, _ = split_words(ZH_TEXT, "zh")
    n = n_changes(len(words), 0.2)
    pool = {s for w in words if w not in ZH_STOPWORDS for s in zh_syn.get(w, [])}
    for seed in range(5):
        rng = random.Random(seed)
        ins = random_insert(ZH_TEXT, rng, zh_syn, 0.2, lang="zh")
        assert " " not in ins and len(ins) > len(ZH_TEXT)
        # n synonyms from the pool were added, and every original character is still there in order
        extra = len(ins) - len(ZH_TEXT)
        assert extra >= n * min(len(s) for s in pool)
        it = iter(ins)
        assert all(ch in it for ch in ZH_TEXT)  # original characters form a subsequence
        sw = random_swap(ZH_TEXT, rng, 0.2, lang="zh")
        assert sw != ZH_TEXT and sorted(sw) == sorted(ZH_TEXT) and " " not in sw
        assert sw.count("\n") == 1 and sw.count("，") == ZH_TEXT.count("，")
        de = random_delete(ZH_TEXT, rng, 0.3, lang="zh")
        assert len(de) < len(ZH_TEXT) and " " not in de
        it = iter(ZH_TEXT)
        assert all(ch in it for ch in de)


# -- synonym sources -------------------------------------------------------------------------------


def test_synonym_dict_format(tmp_path):
    p = tmp_path / "syn.tsv"
    p.write_text("\ufeff# comment\n\nQuick\tfast Speedy  rapid\nquick fast swift\nbreathe\ttake_a_breath\n"
                 "big large huge\n", encoding="utf-8")
    d = load_synonym_dict(p)
    assert d["quick"] == ["fast", "Speedy", "rapid", "swift"]  # repeated headword merges, no duplicates
    assert d["breathe"] == ["take a breath"] and d["big"] == ["large", "huge"]
    assert "large" not in d
    s = load_synonym_dict(p, symmetric=True)
    assert s["large"] == ["big", "huge"] and s["huge"] == ["big", "large"]
    en, zh = load_synonym_dict(EN_DICT), load_synonym_dict(ZH_DICT)
    assert len(en) >= 30 and len(zh) >= 30 and "高兴" in zh["快乐"]


@pytest.mark.parametrize("content, line, why", [
    ("good\tfine\nlonely\n", 2, "no synonyms"),
    ("a b\n\tx y\n", 2, "empty headword"),
    ("ok fine\nlonely\t  \n", 2, "no synonyms"),
    (b"ok fine\n\xff\xfe bad\n", 2, "not valid UTF-8"),
])
def test_synonym_dict_errors_name_file_and_line(tmp_path, content, line, why):
    p = tmp_path / "bad.tsv"
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(str(p))}:{line}: .*{why}"):
        load_synonym_dict(p)
    with pytest.raises(FileNotFoundError):
        load_synonym_dict(tmp_path / "missing.tsv")


_LICENSE = ["This software and database is being provided to you, the LICENSEE, by",
            "Princeton University under the following license.", "",
            "WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved."]
_GREEK = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
_WN = {
    "data.noun": [
        "05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis",
        "06 n 04 andiron 0 firedog 0 dog 1 dog-iron 0 001 @ 03558404 n 0000 | metal supports for logs",
        "18 n 02 Einstein 0 Albert_Einstein 0 001 @ 10447768 n 0000 | physicist born in Germany",
        "18 n 02 Handy 0 W._C._Handy 0 001 @ 10447768 n 0000 | composer",
        "07 n 01 frank 0 000 | a word alone in its synset",
        # w_cnt is hexadecimal: 0c = 12 words
        "03 n 0c " + " ".join(f"{w} 0" for w in _GREEK) + " 000 | twelve letters",
    ],
    "data.verb": [
        "29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 002 * 00005041 v 0000 ^ 00004227 v 0103"
        " 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs",
    ],
    "data.adj": [
        "00 a 01 able 0 001 ! 00002098 a 0101 | having the necessary means",
        "00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in abundance",
        "00 s 02 handy 0 ready_to_hand(p) 0 001 & 00019131 a 0000 | easy to reach",
    ],
    "data.adv": ["02 r 02 quickly 0 speedily 0 001 \\ 00976085 a 0101 | with speed"],
}


def _write_wordnet(root: Path, files: dict[str, list[str]]) -> Path:
    """data.* files as wndb(5WN) lays them out: license lines that start with two spaces, then one
    synset per line whose first field is its own byte offset (8 digits), lines ending in two spaces."""
    root.mkdir(parents=True, exist_ok=True)
    for name, synsets in files.items():
        lines = [f"  {i} {t}  \n" for i, t in enumerate(_LICENSE, start=1)]
        offset = sum(len(x.encode()) for x in lines)
        for rest in synsets:
            line = f"{offset:08d} {rest}  \n"
            lines.append(line)
            offset += len(line.encode())
        (root / name).write_text("".join(lines), encoding="ascii")
    return root


def test_wordnet_parser(tmp_path):
    wn = load_wordnet(_write_wordnet(tmp_path / "wn", _WN))
    # a word in two synsets gets both synsets' other members, in file order
    assert wn["dog"] == ["domestic dog", "andiron", "firedog", "dog-iron"]
    assert wn["domestic dog"] == ["dog"]
    assert wn["breathe"] == ["take a breath", "respire", "suspire"]
    assert wn["galore"] == ["abounding"] and wn["ready to hand"] == ["handy"]  # markers dropped
    assert wn["handy"] == ["ready to hand"]  # proper nouns left out by default
    assert wn["quickly"] == ["speedily"]
    assert wn["alpha"] == _GREEK[1:] and wn["mu"] == _GREEK[:-1]  # 0c hex words, all read
    assert "frank" not in wn and "able" not in wn and "einstein" not in wn
    with_proper = load_wordnet(tmp_path / "wn", proper_nouns=True)
    assert with_proper["einstein"] == ["Albert Einstein"] and with_proper["handy"] == ["W. C. Handy", "ready to hand"]
    # the license header is skipped, not parsed
    assert not any(k.startswith(("this", "princeton")) for k in wn)


def test_wordnet_parser_errors(tmp_path):
    files = {**_WN, "data.verb": _WN["data.verb"] + ["29 v zz breathe 0 000 | bad count"]}
    root = _write_wordnet(tmp_path / "bad", files)
    with pytest.raises(ValueError, match=r"data\.verb:6: w_cnt 'zz' is not a hexadecimal"):
        load_wordnet(root)
    files = {**_WN, "data.adv": ["02 r 03 quickly 0 speedily 0 | short"]}
    with pytest.raises(ValueError, match=r"data\.adv:5: .*(w_cnt|lex_id)"):
        load_wordnet(_write_wordnet(tmp_path / "bad2", files))
    (tmp_path / "bad2" / "data.adj").unlink()
    with pytest.raises(FileNotFoundError, match="data.adj.*wordnet-base"):
        load_wordnet(tmp_path / "bad2")


def test_real_wordnet_if_installed():
    if not Path("/usr/share/wordnet/data.noun").is_file():
        pytest.skip("WordNet is not installed (Debian: apt-get install wordnet-base)")
    wn = load_wordnet("/usr/share/wordnet")
    assert len(wn) > 50_000 and "speedy" in wn["quick"] and "take a breath" in wn["breathe"]


# -- the Augmenter step ----------------------------------------------------------------------------


def _doc(i: int, text: str = EN_TEXT, lang: str = "en", domain: str = "web") -> dict:
    return {"id": f"src:{i}", "text": text, "source": "src", "domain": domain, "lang": lang,
            "meta": {"url": f"u{i}", "tags": ["a"]}, "stats": {"ppl": 12.5}}


def _eda_cfg(**kw) -> AugmentConfig:
    base = {"enabled": True, "methods": ["synonym_replace", "random_insert", "random_swap", "random_delete"],
            "synonyms": str(EN_DICT), "copies": 2, "seed": 7}
    base.update(kw)
    return AugmentConfig(**base)


def test_augmenter_ids_marks_and_untouched_originals():
    aug = Augmenter(_eda_cfg())
    doc = _doc(1)
    before = copy.deepcopy(doc)
    new = aug(doc)
    assert doc == before
    methods = ["synonym_replace", "random_insert", "random_swap", "random_delete"]
    assert [d["id"] for d in new] == [f"src:1#aug-{m}-{k}" for m in methods for k in range(2)]
    for d in new:
        method = d["id"].split("#aug-")[1].rsplit("-", 1)[0]
        assert d["augmented"] == {"method": method, "of": "src:1"}
        assert d["text"] != doc["text"]
        assert {k: d[k] for k in ("source", "domain", "lang", "meta", "stats")} == \
            {k: doc[k] for k in ("source", "domain", "lang", "meta", "stats")}
    new[0]["meta"]["tags"].append("b")  # deep copies: the original's fields are not shared
    assert doc["meta"]["tags"] == ["a"]
    assert aug.counts["docs"] == 1 and aug.counts["synonym_replace.generated"] == 2


def test_augmenter_skips_identical_copies_and_filters():
    aug = Augmenter(_eda_cfg(methods=["synonym_replace", "random_swap"], copies=1, domains=["web"]))
    plain = _doc(2, text="Zebras graze.")  # no synonyms: replacing changes nothing
    new = aug(plain)
    assert [d["id"] for d in new] == ["src:2#aug-random_swap-0"] and new[0]["text"] == "Graze Zebras."
    assert aug.counts["synonym_replace.identical"] == 1
    assert aug(_doc(3, domain="code")) == []
    assert aug(_doc(4, lang="fr")) == [] and aug(_doc(5, lang=None)) == []
    assert aug({**_doc(6), "text": "  \n"}) == []
    assert aug.counts["docs"] == 5 and aug.counts["eligible"] == 1
    zh = Augmenter(_eda_cfg(synonyms=str(ZH_DICT), methods=["synonym_replace"], copies=1))
    (d,) = zh(_doc(7, text=ZH_TEXT, lang="zh"))
    assert d["text"] != ZH_TEXT and " " not in d["text"]
    half = Augmenter(_eda_cfg(methods=["random_swap"], copies=1, fraction=0.5))
    picked = sum(bool(half(_doc(i))) for i in range(200))
    assert 70 < picked < 130
    assert picked == sum(bool(half(_doc(i))) for i in range(200))  # the same documents every time


def test_augmenter_is_deterministic_across_processes():
    docs = [_doc(i) for i in range(3)]
    a = Augmenter(_eda_cfg()).augment_batch(docs)
    b = Augmenter(_eda_cfg()).augment_batch(list(reversed(docs)))
    assert sorted((d["id"], d["text"]) for d in a) == sorted((d["id"], d["text"]) for d in b)
    c = Augmenter(_eda_cfg(seed=8)).augment_batch(docs)
    assert [d["text"] for d in a] != [d["text"] for d in c]
    # another interpreter with another hash salt makes the same choices (no hash(), no set order)
    code = ("import sys, json; from llmkit.data.augment import Augmenter, AugmentConfig; "
            "cfg, doc = json.loads(sys.argv[1]); "
            "print(repr([d['text'] for d in Augmenter(AugmentConfig(**cfg)).augment_batch([doc])]))")
    cfg = {k: v for k, v in vars(_eda_cfg()).items() if k != "back_translation"}
    outs = set()
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        res = subprocess.run([sys.executable, "-c", code, json.dumps([cfg, _doc(0)])], env=env,
                             capture_output=True, text=True, check=True)
        outs.add(res.stdout)
    assert outs == {repr([d["text"] for d in a if d["augmented"]["of"] == "src:0"]) + "\n"}


def test_augmenter_pickles_without_loaded_resources():
    aug = Augmenter(_eda_cfg())
    first = aug(_doc(1))
    assert aug._synonyms is not None
    clone = pickle.loads(pickle.dumps(aug))
    assert clone._synonyms is None and clone(_doc(1)) == first


def test_config_validation_and_yaml(tmp_path):
    assert AugmentConfig().validate() is None  # disabled: sources are not required
    with pytest.raises(ValueError, match="^synonyms: "):
        AugmentConfig(enabled=True).validate()
    with pytest.raises(ValueError, match="^back_translation: "):
        AugmentConfig(enabled=True, methods=["back_translate"]).validate()
    with pytest.raises(ValueError, match="^alpha: "):
        AugmentConfig(alpha=0).validate()
    with pytest.raises(ValueError, match="^methods: "):
        AugmentConfig(methods=["random_swap", "random_swap"]).validate()
    with pytest.raises(ValueError, match="^wordnet: "):
        AugmentConfig(enabled=True, wordnet=str(tmp_path)).validate()
    for d in ("fwd", "bwd"):
        (tmp_path / d).mkdir()
    y = tmp_path / "aug.yaml"
    y.write_text(f"enabled: true\nmethods: [random_swap, back_translate]\ncopies: 2\ndomains: [web]\n"
                 f"back_translation:\n  kind: llmkit\n  forward: {tmp_path / 'fwd'}\n"
                 f"  backward: {tmp_path / 'bwd'}\n  batch_size: 4\n")
    cfg = load_config(AugmentConfig, y)
    assert isinstance(cfg.back_translation, BackTranslationConfig)
    assert cfg.back_translation.kind == "llmkit" and cfg.back_translation.batch_size == 4
    with pytest.raises(ConfigError, match="back_translation.batch_size"):
        load_config(AugmentConfig, y, ["back_translation.batch_size=0"])
    with pytest.raises(ConfigError, match="methods"):
        load_config(AugmentConfig, y, ["methods=[shuffle]"])


# -- back-translation ------------------------------------------------------------------------------


class FakeEngine:
    """Tokens = whitespace words (zh: characters); 'translation' = a string function; records batches."""

    def __init__(self, fn, zh: bool = False):
        self.fn, self.zh, self.calls = fn, zh, []

    def count_tokens(self, texts):
        return [len(t) if self.zh else len(t.split()) for t in texts]

    def generate(self, texts, max_input_tokens, max_new_tokens):
        self.calls.append(list(texts))
        return [self.fn(t) for t in texts]


def test_back_translation_chunking_batching_and_reassembly():
    fwd, bwd = FakeEngine(str.upper), FakeEngine(str.lower)
    bt = BackTranslator(fwd, bwd, max_input_tokens=5, batch_size=3)
    long = "one two three four five six seven eight nine ten eleven twelve thirteen."
    texts = ["the cat sat. the dog ran! " + long + "\n\n  indented line? yes.\n",
             "the cat sat. another doc.", "", "   "]
    out = bt.translate(texts)
    assert out == texts[:2] + ["", "   "]  # upper then lower: every sentence and line comes back in place
    fwd_inputs = [t for call in fwd.calls for t in call]
    assert all(len(call) <= 3 for call in fwd.calls + bwd.calls)
    assert all(len(t.split()) <= 5 for t in fwd_inputs)  # long sentence cut into pieces that fit
    assert len(fwd_inputs) == len(set(fwd_inputs))  # "the cat sat." is translated once
    assert "one two three four five" in fwd_inputs
    lens = [len(t.split()) for t in fwd_inputs]
    assert lens == sorted(lens, reverse=True)  # length-sorted batches
    zh = BackTranslator(FakeEngine(lambda t: t[::-1], zh=True), FakeEngine(lambda t: t[::-1], zh=True),
                        lang="zh", max_input_tokens=6)
    assert zh.translate([ZH_TEXT]) == [ZH_TEXT]
    with pytest.raises(TypeError):
        bt.translate("a string")


def _rerandomize(model: torch.nn.Module, seed: int, pad_rows=()) -> None:
    """Default inits make a tiny model emit one token forever; larger spread makes it read its input.
    The padding row is zeroed so greedy decoding does not emit padding (dropped by decode) only."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.shared
        for r in pad_rows:
            emb.weight[r].zero_()


_VOCAB = ("the a quick brown fox jumps over lazy dog cat sat on mat and ran home it was good day "
          "der die das hund katze und ist war gut tag schnell braun").split()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    root = tmp_path_factory.mktemp("hf_bt")
    for seed, name in ((0, "fwd"), (1, "bwd")):
        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(_VOCAB + [".", "!"])}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                    unk_token="<unk>")
        fast.save_pretrained(root / name)
        torch.manual_seed(seed)
        cfg = transformers.T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                    num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                    dropout_rate=0.0)
        model = transformers.T5ForConditionalGeneration(cfg)
        _rerandomize(model, seed, pad_rows=[0])
        model.save_pretrained(root / name)
    return root / "fwd", root / "bwd"


def _check_translations(bt: BackTranslator, texts: list[str], max_new: int, n_tokens) -> None:
    """Shared plumbing checks; `n_tokens(text)` counts the tokens of a decoded model output."""
    calls: dict[str, list[tuple[list[str], list[str]]]] = {"forward": [], "backward": []}
    for side in calls:
        engine = getattr(bt, side)
        gen = engine.generate

        def spy(batch, max_in, max_new_tokens, gen=gen, side=side):
            out = gen(batch, max_in, max_new_tokens)
            calls[side].append((list(batch), out))
            return out

        engine.generate = spy
    out = bt.translate(texts)
    assert len(out) == len(texts) and all(isinstance(t, str) for t in out)
    assert out == bt.translate(texts)  # greedy: deterministic
    assert [bt.translate([t])[0] for t in texts] == out  # batch composition (padding) changes nothing
    assert len(set(out)) > 1  # outputs depend on the input
    for batches in calls.values():
        assert all(len(b) <= bt.batch_size for b, _ in batches)
        assert all(n_tokens(o) <= max_new for _, outs in batches for o in outs)
    assert all(n <= bt.max_input_tokens for b, _ in calls["forward"] for n in bt.forward.count_tokens(b))
    assert max(len(b) for b, _ in calls["forward"]) == bt.batch_size  # batches are filled
    # line structure: blank lines and indentation survive
    assert out[0].count("\n") == texts[0].count("\n") and out[0].split("\n")[1] == ""
    assert out[0].split("\n")[2].startswith("  ")


def test_back_translation_hf_tiny_t5(hf_pair):
    fwd, bwd = hf_pair
    bt = BackTranslator(str(fwd), str(bwd), kind="hf", max_input_tokens=6, max_new_tokens=5, batch_size=2)
    texts = ["the quick brown fox jumps over the lazy dog and ran home.\n\n  it was a good day!",
             "the cat sat on the mat.", "a dog ran.", "das ist gut."]
    _check_translations(bt, texts, 5, lambda t: len(t.split()))
    one = bt.backward.generate(["the cat sat on the mat"], 6, 5)[0]
    assert 0 < len(one.split()) <= 5 and set(one.split()) <= set(_VOCAB + [".", "!"])


@pytest.fixture(scope="module")
def llmkit_pair(tmp_path_factory):
    from llmkit.models.encdec import EncDecConfig
    from llmkit.models.io import build_model, save_model
    from llmkit.tokenizer import train_char

    root = tmp_path_factory.mktemp("llmkit_bt")
    tok = train_char([" ".join(_VOCAB) + " .!?,\n"])
    for seed, name in ((0, "fwd"), (1, "bwd")):
        torch.manual_seed(seed)
        cfg = EncDecConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, d_model=32, n_head=4, d_ff=64,
                           dropout=0.0, pad_token_id=tok.pad_id, decoder_start_token_id=tok.pad_id)
        model = build_model(cfg)
        _rerandomize(model, seed, pad_rows=[tok.pad_id])
        save_model(model, root / name, tokenizer=tok)
    return root / "fwd", root / "bwd"


def test_back_translation_llmkit_tiny_encdec(llmkit_pair):
    fwd, bwd = llmkit_pair
    bt = BackTranslator(fwd, bwd, kind="llmkit", max_input_tokens=12, max_new_tokens=7, batch_size=3)
    texts = ["the quick brown fox jumps over the lazy dog.\n\n  it was a good day!",
             "the cat sat on the mat.", "a dog ran home.", "das ist gut und schnell."]
    _check_translations(bt, texts, 7, len)
    pieces = bt.backward.generate(["the cat sat", "a dog"], 12, 7)
    assert all(len(p) <= 7 for p in pieces)
    with pytest.raises(ValueError, match="kind"):
        BackTranslator(fwd, bwd, kind="onnx")


def test_augmenter_back_translate_end_to_end(llmkit_pair):
    fwd, bwd = llmkit_pair
    cfg = AugmentConfig(enabled=True, methods=["random_swap", "back_translate"], copies=2,
                        back_translation=BackTranslationConfig(forward=str(fwd), backward=str(bwd), kind="llmkit",
                                                               max_input_tokens=16, max_new_tokens=8))
    aug = Augmenter(cfg)
    docs = [_doc(0, "the cat sat on the mat."), _doc(1, "a dog ran home. it was good."),
            _doc(2, text=ZH_TEXT, lang="zh")]
    new = aug.augment_batch(docs)
    ids = [d["id"] for d in new]
    assert [i for i in ids if "back_translate" in i] == ["src:0#aug-back_translate-0",
                                                          "src:1#aug-back_translate-0"]
    assert max(k for k, i in enumerate(ids) if i.startswith("src:0#")) < \
        min(k for k, i in enumerate(ids) if i.startswith("src:1#"))  # per document, in input order
    assert any(i.startswith("src:2#aug-random_swap") for i in ids)  # zh: EDA yes, back-translation no
    bt_docs = [d for d in new if d["augmented"]["method"] == "back_translate"]
    assert bt_docs[0]["text"] == Augmenter(cfg)(docs[0])[-1]["text"]  # alone or batched: the same
    assert aug.counts["back_translate.generated"] == 2
