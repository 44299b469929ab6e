"""Sensitive-information step: PII detectors, redaction, lexicon, SafetyFilter and the manual spot check."""

from __future__ import annotations

import json
import pickle
import random

import pytest

from llmkit.config import ConfigError, load_config
from llmkit.data.safety import (
    PII_KINDS,
    Lexicon,
    PiiMatch,
    SafetyConfig,
    SafetyFilter,
    cn_id_valid,
    find_pii,
    luhn_valid,
    redact_pii,
)
from llmkit.data.spot_check import SpotCheckSampler, sample_key

_W = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def make_id(first17: str) -> str:
    """A Chinese ID number with the correct ISO 7064 MOD 11-2 check character."""
    return first17 + "10X98765432"[sum(int(c) * w for c, w in zip(first17, _W)) % 11]


def with_luhn(body: str) -> str:
    """`body` plus the Luhn check digit that makes it valid."""
    for d in "0123456789":
        if luhn_valid(body + d):
            return body + d
    raise AssertionError


def found(text: str, kinds=PII_KINDS) -> list[tuple[str, str]]:
    return [(m.kind, text[m.start:m.end]) for m in find_pii(text, kinds)]


# --- checksums ------------------------------------------------------------------------------------------

def test_checksums():
    assert make_id("11010519491231002") == "11010519491231002X"  # GB 11643-1999 worked example
    assert cn_id_valid("11010519491231002X") and cn_id_valid("11010519491231002x")
    assert not cn_id_valid("110105194912310021")  # wrong check digit
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")


# --- e-mail ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expect", [
    ("联系邮箱zhang.san@example.com。谢谢", "zhang.san@example.com"),
    ("Write to john.doe+news@mail.example.co.uk, please.", "john.doe+news@mail.example.co.uk"),
    ("(admin_01@sub-domain.example.org)", "admin_01@sub-domain.example.org"),
])
def test_email_positive(text, expect):
    assert found(text) == [("email", expect)]


@pytest.mark.parametrize("text", ["a@b", "user@localhost", "follow @handle now", "price@5.00", "a@b.c1"])
def test_email_negative(text):
    assert found(text, ["email"]) == []


# --- CN mobile ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expect", [
    ("电话13812345678转分机", "13812345678"),
    ("手机：+86 138-1234-5678。", "+86 138-1234-5678"),
    ("拨打0086 13912345678即可", "0086 13912345678"),
    ("(+86)15012345678", "(+86)15012345678"),
    ("call 138 1234 5678 today", "138 1234 5678"),
    ("+8619912345678", "+8619912345678"),
])
def test_cn_mobile_positive(text, expect):
    assert found(text) == [("cn_mobile", expect)]


@pytest.mark.parametrize("text", [
    "订单号2023101512345678901",  # a longer digit run: no substring may match
    "号码12812345678",  # second digit 2 is not a mobile prefix
    "138123456789",  # 12 digits
    "pi=3.13812345678",  # decimal fraction
    "token abc13812345678xyz",  # part of an ASCII identifier
    "138 1234-5678",  # inconsistent separators
])
def test_cn_mobile_negative(text):
    assert found(text) == []


# --- international phone --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expect", [
    ("Call +1 (555) 123-4567 today.", "+1 (555) 123-4567"),
    ("London office: +44 20 7946 0958.", "+44 20 7946 0958"),
    ("Tel. +49 30 12345678", "+49 30 12345678"),
    ("Paris +33 1 23 45 67 89", "+33 1 23 45 67 89"),
    ("东京+81-3-1234-5678。", "+81-3-1234-5678"),
    ("UK +44 (0)20 7946 0958", "+44 (0)20 7946 0958"),
])
def test_intl_phone_positive(text, expect):
    assert found(text) == [("intl_phone", expect)]


def test_intl_phone_stops_before_trailing_number():
    assert found("reach +44 20 7946 0958 2023 onwards") == [("intl_phone", "+44 20 7946 0958")]
    assert found("电话+81-3-7029-8744 6个") == [("intl_phone", "+81-3-7029-8744")]


@pytest.mark.parametrize("text", [
    "+2023-10-15", "growth +3.5% y/y", "version +1.2.3.4.5.6.7.8", "UTC+8", "+12,345 users", "C++11",
    "offset +10:30", "+100 points", "score 1+2 = 3",
])
def test_intl_phone_negative(text):
    assert found(text) == []


# --- CN resident ID -------------------------------------------------------------------------------------

def test_cn_id():
    valid = make_id("44030119900307123")
    assert found(f"身份证号{valid}，请核对") == [("cn_id", valid)]
    assert found("id: 11010519491231002x.") == [("cn_id", "11010519491231002x")]
    spaced = make_id("32010219851111001")
    assert found(f"证件 {spaced[:6]} {spaced[6:14]} {spaced[14:]} 有效") == [
        ("cn_id", f"{spaced[:6]} {spaced[6:14]} {spaced[14:]}")]
    bad_check = valid[:17] + str((int(valid[17]) + 1) % 10 if valid[17] != "X" else 0)
    bad_date = make_id("44030119990230123")  # 30 February
    bad_region = make_id("99030119900307123")
    future = make_id("44030121990307123")
    longer = "7" + valid  # embedded in a longer digit run
    for text in (bad_check, bad_date, bad_region, future, longer, valid + "8"):
        assert [k for k, _ in found(text)] != ["cn_id"], text


# --- bank cards -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("card", [
    "4111 1111 1111 1111",
    "5555-5555-5555-4444",
    "3782 822463 10005",  # Amex 4-6-5
    "378282246310005",
    with_luhn("222100000000000"),  # Mastercard 2-series
    with_luhn("622202123456789012"),  # UnionPay 19 digits
    with_luhn("62220212345678"),  # 15 digits
])
def test_bank_card_positive(card):
    assert found(f"卡号{card}，请转账") == [("bank_card", card)]
    assert found(f"card no. {card}.") == [("bank_card", card)]


def test_bank_card_grouped_19_and_6_13():
    c = with_luhn("622202123456789012")
    grouped = f"{c[:4]} {c[4:8]} {c[8:12]} {c[12:16]} {c[16:]}"
    assert found(f"卡号 {grouped} 有效") == [("bank_card", grouped)]
    assert found(f"卡号 {c[:6]} {c[6:]} 有效") == [("bank_card", f"{c[:6]} {c[6:]}")]


def test_bank_card_negative():
    bad = "4111111111111112"
    assert not luhn_valid(bad)
    not_a_card = [
        bad, "4111 1111 1111 1112", "1234567890123456",
        with_luhn("123456789012345"),  # Luhn-valid, but no card network starts with 1
        with_luhn("800000000000000"),
        "订单号2023101512345678901", "流水号20231015123456789", "x4111111111111111",
    ]
    for text in not_a_card:
        assert [k for k, _ in found(text)] != ["bank_card"], text
    # random long numbers that fail Luhn are never cards
    rng = random.Random(1)
    for _ in range(200):
        n = str(rng.randint(10**15, 10**16 - 1))
        if not luhn_valid(n):
            assert found(n, ["bank_card"]) == []


# --- IPs and credential URLs ----------------------------------------------------------------------------

def test_ip():
    assert found("路由器地址192.168.1.1，端口8080") == [("ipv4", "192.168.1.1")]
    assert found("server 10.0.0.255:8080") == [("ipv4", "10.0.0.255")]
    assert found("addr 2001:db8::1 ok") == [("ipv6", "2001:db8::1")]
    full = "2001:0db8:85a3:0000:0000:8a2e:0370:7334"
    assert found(f"v6地址{full}。") == [("ipv6", full)]
    assert found("mapped ::ffff:192.0.2.1 here") == [("ipv6", "::ffff:192.0.2.1")]
    for text in ["256.1.1.1", "1.2.3", "version 1.2.3.4", "v1.2.3.4", "1.2.3.4.5", "01.02.03.04",
                 "at 10:30:45", "std::vector<int>", "MAC 00:1A:2B:3C:4D:5E", "a::b", "Python 3.11.7"]:
        assert found(text) == [], text


def test_url_credentials():
    text = "DSN postgres://admin:hunter2@db.example.com:5432/app?ssl=1 done"
    assert found(text) == [("url_credentials", "postgres://admin:hunter2@db.example.com:5432")]
    assert redact_pii(text, find_pii(text)) == "DSN [URL_CREDENTIALS]/app?ssl=1 done"
    assert found("连接redis://user:p%40ss@10.1.2.3:6379") == [
        ("url_credentials", "redis://user:p%40ss@10.1.2.3:6379")]
    assert found("see https://example.com/a:b and https://example.com:8080/x") == []


# --- hard negatives and redaction -----------------------------------------------------------------------

def test_ordinary_numbers_are_left_alone():
    text = ("On 2023-10-15 (2023年10月15日, 15.10.2023, 2023/10/15) at 10:30:45 the price was ¥1,299.00, "
            "later $12,345 or 12,345,678.90 CNY; in 1999 and 2024, 85% and +3.5% growth; v1.2.3, "
            "version 10.0.19041.1, Python 3.11.7; pi 3.14159265358979; 共计 123456789 元; "
            "订单号2023101512345678901, 流水号 20231015123456, ISBN 978-7-111-54742-6, "
            "tel ext. 8001, 第12345678901234567890号")
    assert find_pii(text) == []


def test_redaction_and_priority():
    cid = make_id("11010519491231002")
    text = (f"张三，身份证{cid}，手机13812345678，邮箱zs@example.cn，卡号4111 1111 1111 1111，"
            "IP 8.8.8.8，DSN mysql://root:pw@db.local/x，US +1 415 555 2671。")
    matches = find_pii(text)
    assert [m.kind for m in matches] == ["cn_id", "cn_mobile", "email", "bank_card", "ipv4",
                                         "url_credentials", "intl_phone"]
    assert redact_pii(text, matches) == (
        "张三，身份证[CN_ID]，手机[PHONE]，邮箱[EMAIL]，卡号[BANK_CARD]，IP [IP]，DSN [URL_CREDENTIALS]/x，"
        "US [PHONE]。")
    # redaction is idempotent: placeholders hold no digits or @
    assert find_pii(redact_pii(text, matches)) == []
    assert redact_pii("abc", []) == "abc"
    assert redact_pii("ab", [PiiMatch("email", 0, 1), PiiMatch("ipv4", 1, 2)]) == "[EMAIL][IP]"


def test_kinds_subset_and_unknown():
    text = "13812345678 a@b.com"
    assert [m.kind for m in find_pii(text, ["email"])] == ["email"]
    with pytest.raises(ValueError, match="nope"):
        find_pii(text, ["nope"])


# --- lexicon --------------------------------------------------------------------------------------------

def test_lexicon_boundaries_en_zh():
    lex = Lexicon(["ass", "赌博", "AV女优", "Kill Yourself", "赌"])
    text = "class assess ASS! ass-hole 网络赌博网站 AV女优们 xAV女优 kill yourself"
    hits = [(text[s:e], w) for s, e, w in lex.find(text)]
    assert hits == [("ASS", "ass"), ("ass", "ass"), ("赌博", "赌博"), ("AV女优", "AV女优"),
                    ("kill yourself", "Kill Yourself")]  # leftmost-longest: 赌博 not 赌
    assert lex.find("classic passage") == []
    assert lex.find("他在赌钱") == [(2, 3, "赌")]
    assert lex.find("ass中文") == [(0, 3, "ass")]  # a CJK neighbour is a boundary for a Latin word
    assert Lexicon([]).find("anything") == []


def test_lexicon_files_and_pickle(tmp_path):
    p = tmp_path / "words.txt"
    p.write_text("\ufeff# comment\n\n赌博\n  scam  \n#not a word\n", encoding="utf-8")
    lex = Lexicon.from_files([p], extra=["fraud"])
    assert sorted(lex.words) == ["fraud", "scam", "赌博"]
    lex2 = pickle.loads(pickle.dumps(lex))
    assert lex2.find("a SCAM and 赌博, fraud") == [(2, 6, "scam"), (11, 13, "赌博"), (15, 20, "fraud")]


# --- config and filter ----------------------------------------------------------------------------------

def test_config_validate():
    SafetyConfig().validate()
    with pytest.raises(ValueError, match="pii_kinds.*'phone_no'"):
        SafetyConfig(pii_kinds=["email", "phone_no"]).validate()
    with pytest.raises(ConfigError, match="bogus"):
        load_config(SafetyConfig, overrides=["pii_kinds=[email, bogus]"])
    with pytest.raises(ConfigError, match="lexicon_min_hits"):
        load_config(SafetyConfig, overrides=["lexicon_min_hits=0"])
    cfg = load_config(SafetyConfig, overrides=["pii_action=drop", "lexicon_words=[赌博]"])
    assert cfg.pii_action == "drop" and cfg.lexicon_words == ["赌博"]


def test_filter_redact_and_drop(tmp_path):
    doc = {"id": "1", "text": "电话13812345678，邮箱a@b.com，再打13912345678", "stats": {}}
    assert SafetyFilter(SafetyConfig())(doc) is None
    assert doc["text"] == "电话[PHONE]，邮箱[EMAIL]，再打[PHONE]"
    assert doc["stats"]["pii"] == {"cn_mobile": 2, "email": 1}
    clean = {"id": "2", "text": "nothing here, 2023-10-15"}
    assert SafetyFilter(SafetyConfig())(clean) is None and clean["stats"]["pii"] == {}
    assert clean["text"] == "nothing here, 2023-10-15"

    doc = {"id": "3", "text": "mail a@b.com"}
    assert SafetyFilter(SafetyConfig(pii_action="drop"))(doc) == "safety.pii"
    assert doc["text"] == "mail a@b.com" and doc["stats"]["pii"] == {"email": 1}
    assert SafetyFilter(SafetyConfig(pii=False))({"id": "4", "text": "a@b.com"}) is None

    words = tmp_path / "w.txt"
    words.write_text("赌博\nscam\n", encoding="utf-8")
    f = SafetyFilter(SafetyConfig(lexicon_files=[str(words)], lexicon_min_hits=2))
    one = {"id": "5", "text": "网络赌博 13812345678"}
    assert f(one) is None and one["stats"]["lexicon"] == 1 and one["text"] == "网络赌博 [PHONE]"
    two = {"id": "6", "text": "网络赌博 is a scam"}
    assert f(two) == "safety.lexicon" and two["stats"] == {"lexicon": 2}

    red = SafetyFilter(SafetyConfig(lexicon_words=["scam", "example"], lexicon_action="redact"))
    doc = {"id": "7", "text": "scam: write to scam@example.com"}
    assert red(doc) is None
    assert doc["text"] == "[SENSITIVE]: write to [EMAIL]"  # PII wins where a word sits inside it
    assert doc["stats"] == {"lexicon": 3, "pii": {"email": 1}}

    with pytest.raises(FileNotFoundError, match="missing.txt"):
        SafetyFilter(SafetyConfig(lexicon_files=[str(tmp_path / "missing.txt")]))


def test_filter_never_raises_and_pickles():
    f = SafetyFilter(SafetyConfig(lexicon_words=["ass", "赌博"], lexicon_action="redact"))
    f = pickle.loads(pickle.dumps(f))
    rng = random.Random(0)
    alphabet = "0123456789 +-.:@/()[]xX中文赌博ass\ud800\x00\u0130\n\t%_"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        doc = {"id": "x", "text": text}
        assert f(doc) is None
        assert isinstance(doc["text"], str)
    assert f({"id": "y", "text": None}) is None


# --- spot check -----------------------------------------------------------------------------------------

def _docs(n: int) -> list[tuple[dict, str | None]]:
    rng = random.Random(7)
    reasons = [None, None, None, "safety.pii", "quality.min_words", "dedup.exact"]
    return [({"id": f"src:{i}", "text": f"doc {i} [PHONE]", "source": "s", "domain": "web", "lang": "en"},
             rng.choice(reasons)) for i in range(n)]


def test_spot_check_merge_equals_single_pass():
    docs = _docs(3000)
    single = SpotCheckSampler(per_reason=7, seed=3)
    for d, r in docs:
        single.offer(d, r)
    parts = [SpotCheckSampler(per_reason=7, seed=3) for _ in range(3)]
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    for i, (d, r) in enumerate(shuffled):
        parts[i % 3].offer(d, r)
    # ship each worker's sampler back as JSON, as a process pool would
    shipped = [SpotCheckSampler.from_dict(json.loads(json.dumps(p.to_dict()))) for p in parts]
    merged = shipped[0].merge(shipped[1]).merge(pickle.loads(pickle.dumps(shipped[2])))
    assert merged.samples() == single.samples()
    assert merged.seen == single.seen
    assert sum(single.seen.values()) == 3000
    # the sample is the k smallest keys of each stratum
    for stratum, recs in single.samples().items():
        ids = [d["id"] for d, r in docs if (r or "kept") == stratum]
        assert [r["id"] for r in recs] == sorted(ids, key=lambda i: sample_key(3, i))[:7]
    assert list(single.samples()) == ["kept", "dedup.exact", "quality.min_words", "safety.pii"]
    # another seed draws another sample
    other = SpotCheckSampler(per_reason=7, seed=4)
    for d, r in docs:
        other.offer(d, r)
    assert other.samples()["kept"] != single.samples()["kept"]
    with pytest.raises(ValueError):
        single.merge(other)


def test_spot_check_write(tmp_path):
    s = SpotCheckSampler(per_reason=5, max_chars=200)
    s.offer({"id": "a<1>", "text": "<script>alert('x')</script> call [PHONE] & 中文", "source": "web",
             "domain": "web", "lang": "zh"}, None)
    s.offer({"id": "b", "text": "x" * 500, "source": "web", "domain": "web", "lang": "en"}, "safety.lexicon")
    s.offer({"id": "c", "text": "y\ud800"}, "safety.lexicon")  # a lone surrogate must not break writing
    jsonl, page = s.write(tmp_path / "review")
    recs = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert len(recs) == 3
    assert set(recs[0]) == {"stratum", "id", "source", "domain", "lang", "reason", "text"}
    assert recs[0]["stratum"] == "kept" and recs[0]["reason"] is None and "中文" in recs[0]["text"]
    assert {r["stratum"] for r in recs[1:]} == {"safety.lexicon"}
    assert all(r["reason"] == "safety.lexicon" for r in recs[1:])
    assert any(len(r["text"]) < 300 and "more characters" in r["text"] for r in recs[1:])
    assert "y\ud800" in [r["text"] for r in recs]
    doc = page.read_text(encoding="utf-8")
    assert "<script>alert" not in doc and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in doc
    assert "<mark>[PHONE]</mark>" in doc and "&amp; 中文" in doc and "a&lt;1&gt;" in doc
    assert '<meta charset="utf-8">' in doc and doc.count('type="checkbox"') == 3
    assert "(1 of 1)" in doc and "(2 of 2)" in doc
