"""Text normalization (NFKC, whitespace, control characters, t2s) and script-based language detection."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import pytest

from conftest import shared_file
from llmkit.config import load_config
from llmkit.data.normalize import NormalizeConfig, Normalizer, detect_language, normalize_text


def test_nfkc_folds_compatibility_characters():
    assert normalize_text("ＡＢＣ １２３ ﬁle ｶﾀｶﾅ") == "ABC 123 file カタカナ"
    assert normalize_text("ＡＢＣ", NormalizeConfig(nfkc=False)) == "ＡＢＣ"


def test_nfkc_keeps_fullwidth_punctuation_in_chinese_only():
    zh = "子曰：“学而时习之，不亦说乎？”……（注）ＡＢＣ１２"
    # fullwidth letters/digits fold, Chinese punctuation and the ellipsis stay
    assert normalize_text(zh, lang="zh") == "子曰：“学而时习之，不亦说乎？”……（注）ABC12"
    assert normalize_text(zh) == normalize_text(zh, lang="zh")  # detected as zh
    folded = normalize_text(zh, NormalizeConfig(keep_cjk_punct=False), lang="zh")
    assert folded == "子曰:“学而时习之,不亦说乎?”......(注)ABC12"
    # in English text NFKC folds them as usual
    assert normalize_text("Wait… what？", lang="en") == "Wait... what?"


def test_whitespace_and_control_characters():
    raw = ("\ufeff  Hello\u00a0\u00a0world\t\tand\u200b more\u00ad text  \r\n"
           "second\x00 line\u3000end \r\r\n\r\n\r\n\n\nthird\x0cfourth\u2028fifth   \n   ")
    assert normalize_text(raw) == "Hello world and more text\nsecond line end\n\nthird\nfourth\nfifth"
    # a single blank line (paragraph break) is kept; zero-width joiners (emoji, Persian) are kept
    assert normalize_text("a\n\nb") == "a\n\nb"
    assert normalize_text("👩\u200d💻 x") == "👩\u200d💻 x"
    # bidi marks and tabs
    assert normalize_text("a\u200eb\tc") == "ab c"


def test_whitespace_can_keep_indentation_or_be_left_alone():
    code = "\n\ndef f():\n    return  1   \n\n\n\n\tx = 2\n"
    assert normalize_text(code, NormalizeConfig(keep_indentation=True)) == "def f():\n    return 1\n\n\tx = 2"
    assert normalize_text(code) == "def f():\nreturn 1\n\nx = 2"
    assert normalize_text("a  b\n\n\n\nc ", NormalizeConfig(fix_whitespace=False)) == "a  b\n\n\n\nc "
    assert normalize_text(" x\x00 ", NormalizeConfig(enabled=False)) == " x\x00 "


def test_t2s_converts_traditional_chinese_documents_only():
    cfg = NormalizeConfig(t2s=True)
    assert normalize_text("「學而時習之」", cfg) == "「学而时习之」"
    assert normalize_text("學而時習之，不亦說乎？", cfg, lang="zh-Hant") == "学而时习之，不亦说乎？"
    assert normalize_text("學而時習之", NormalizeConfig()) == "學而時習之"  # off by default
    # Japanese kanji are not Chinese: 學校 stays in a Japanese document
    assert normalize_text("學校へ行きます。", cfg) == "學校へ行きます。"


def _zh_poems(rel: str) -> list[str]:
    data = json.loads(shared_file(rel).read_text(encoding="utf-8"))
    if isinstance(data, dict):  # anthologies: sections of poems
        data = [p for section in data["content"] for p in section["content"]]
    return ["\n".join(p["paragraphs"]) for p in data]


def test_detect_language_on_real_corpora():
    c4 = [json.loads(line)["text"] for line in shared_file("en/c4_demo.jsonl").open(encoding="utf-8")]
    wiki = [line for line in shared_file("en/wiki_demo.txt").open(encoding="utf-8") if line.strip()]
    assert Counter(map(detect_language, c4)) == {"en": 300}
    assert Counter(map(detect_language, wiki)) == {"en": 30}
    # traditional-character prose and poems (zh-Hant) and simplified instruction answers
    assert set(map(detect_language, _zh_poems("zh/guwenguanzhi.json"))) == {"zh"}
    assert set(map(detect_language, _zh_poems("zh/quantangshi_tang0_traditional.json"))) == {"zh"}
    alpaca = json.loads(shared_file("instruct/alpaca_zh_demo.json").read_text(encoding="utf-8"))
    langs = Counter(detect_language(r["output"]) for r in alpaca)
    assert langs["zh"] >= 0.93 * len(alpaca)  # the rest are English answers, code, name lists
    assert detect_language(alpaca[0]["output"]) == "zh"


@pytest.mark.parametrize("text, lang", [
    ("これは日本語の文章です。漢字も少し使います。", "ja"),
    ("東京都に住んでいます", "ja"),
    ("한국어 문장입니다. 오늘은 날씨가 좋습니다.", "ko"),
    ("学而时习之，不亦说乎", "zh"),
    ("Python是一种编程语言", "zh"),
    ("The cat sat on the mat and it was good.", "en"),
    ("buy cheap pills online now", "en"),  # no function words at all: treated as English
    ("Der Hund ist nicht da und die Katze auch nicht.", "und-Latn"),
    ("Le chat est sur la table et les enfants sont dans le jardin.", "und-Latn"),
    ("Привет, как дела?", "und-Cyrl"),
    ("Καλημέρα κόσμε", "und-Grek"),
    ("12345 !!! ---", "und"),
    ("", "und"),
])
def test_detect_language_strings(text, lang):
    assert detect_language(text) == lang


def test_normalizer_step():
    step = Normalizer(NormalizeConfig())
    doc = {"id": "a", "text": "  Ｈｅｌｌｏ，  the world  ", "lang": None, "stats": {}}
    assert step(doc) is None
    assert doc["text"] == "Hello, the world" and doc["lang"] == "en"
    # a declared language is kept and drives the punctuation choice
    doc = {"id": "b", "text": "你好，世界", "lang": "zh", "stats": {}}
    assert step(doc) is None and doc == {"id": "b", "text": "你好，世界", "lang": "zh", "stats": {}}
    doc = {"id": "c", "text": " \u200b\x00\r\n\t ", "lang": None, "stats": {}}
    assert step(doc) == "normalize.empty" and doc["text"] == ""
    doc = {"id": "d", "text": "你好，世界", "lang": None, "stats": {}}
    assert Normalizer(NormalizeConfig(detect_language=False))(doc) is None
    assert doc["lang"] is None and doc["text"] == "你好，世界"  # punctuation still judged by script
    step = pickle.loads(pickle.dumps(Normalizer(NormalizeConfig(t2s=True))))  # goes to worker processes
    doc = {"id": "e", "text": "學而時習之", "lang": None, "stats": {}}
    assert step(doc) is None and doc["text"] == "学而时习之" and doc["lang"] == "zh"


def test_config_loads_from_yaml(tmp_path):
    path = tmp_path / "normalize.yaml"
    path.write_text("t2s: true\nkeep_cjk_punct: false\ndetect_language: false\n", encoding="utf-8")
    cfg = load_config(NormalizeConfig, path)
    assert cfg == NormalizeConfig(t2s=True, keep_cjk_punct=False, detect_language=False)
