"""PII detection quality and SafetyFilter throughput on real text (llmkit.data.safety).

A labelled set is built from REAL host text in ../shared/data (en: C4 and Wikipedia; zh: alpaca_zh and the
chinese-poetry anthologies): windows of 200-800 characters, into which synthetic identifiers are inserted
at random positions with their spans recorded - valid e-mails, CN mobiles (bare, grouped, +86/0086), CN ID
numbers (valid MOD 11-2 checksum), bank cards (valid Luhn; Visa/Mastercard/Amex/Diners/JCB/UnionPay,
13-19 digits, contiguous and grouped), IPv4/IPv6, international phones and credential URLs - plus hard
negatives that must stay untouched (dates, prices, years, order numbers, long Luhn-invalid numbers, times,
percentages, version strings). Insertion points never touch an ASCII letter or digit (a number glued to a
word is not a standalone identifier, by design); in Chinese there are no spaces around the insertion.

Scoring (per kind): a prediction is a true positive when its span is *exactly* a gold span of the same
kind ("exact"); "overlap" scores also count any overlap with a gold span of the same kind. Predictions in
the untouched host text (real PII or false positives of the host itself) are measured on the host before
insertion, excluded from precision and reported separately with examples. "wrongly_redacted" counts hard
negatives that any prediction overlaps, per category (must be 0 for dates and prices).

Throughput: SafetyFilter (all PII kinds, redact; then also with a 2,000-entry lexicon) over the full en and
zh corpora on one core, MB/s of UTF-8 input, best of 3. Also: the share of uniformly random 13-19 digit
numbers that pass as bank cards (the inherent limit of prefix + Luhn validation; about 4-5%).

    python benchmarks/pii_recall.py [--examples 4000] [--seed 0]

Prints JSON.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import random
import re
import time
from pathlib import Path

from llmkit.data.safety import _CN_PROVINCES, PII_KINDS, SafetyConfig, SafetyFilter, find_pii, luhn_valid

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --- real host text -------------------------------------------------------------------------------------

def _paragraphs(value, out: list[str]) -> None:
    # chinese-poetry JSON: poems/prose keep their text in "paragraphs" lists, nested at varying depth
    if isinstance(value, dict):
        if isinstance(value.get("paragraphs"), list):
            out.append("".join(p for p in value["paragraphs"] if isinstance(p, str)))
        for k, v in value.items():
            if k != "paragraphs":
                _paragraphs(v, out)
    elif isinstance(value, list):
        for v in value:
            _paragraphs(v, out)


def load_corpora() -> dict[str, list[str]]:
    """{"en": [...], "zh": [...]} documents from ../shared/data (raises with a clear message if missing)."""
    if not DATA.is_dir():
        raise SystemExit(f"reference data {DATA} is missing (expected ../shared/data beside the checkout)")
    en = [json.loads(line)["text"] for line in (DATA / "en/c4_demo.jsonl").open(encoding="utf-8")]
    en += [line for line in (DATA / "en/wiki_demo.txt").read_text(encoding="utf-8").splitlines() if line]
    zh = [f"{r['instruction']}\n{r['input']}\n{r['output']}".strip()
          for r in json.loads((DATA / "instruct/alpaca_zh_demo.json").read_text(encoding="utf-8"))]
    for name in ("guwenguanzhi", "tangshisanbaishou", "lunyu", "mengzi", "quantangshi_tang0_traditional"):
        _paragraphs(json.loads((DATA / f"zh/{name}.json").read_text(encoding="utf-8")), zh)
    return {"en": en, "zh": [t for t in zh if t]}


# --- synthetic identifiers ------------------------------------------------------------------------------

_ID_W = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_FIRST = ["zhang", "li", "wang", "john", "mary", "alex", "chen", "liu", "sarah", "mike", "yang", "o'brien"]
_DOMAINS = ["gmail.com", "qq.com", "163.com", "126.com", "example.co.uk", "company.com.cn", "mail.example.org",
            "outlook.com", "sina.com.cn", "uni-heidelberg.de"]


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def gen_email(rng):
    first, last = rng.choice(_FIRST).replace("'", ""), rng.choice(_FIRST).replace("'", "")
    local = rng.choice([f"{first}.{last}", f"{first}{rng.randint(1, 9999)}", f"{first}_{last}",
                        f"{first}+news", f"{first[0]}{last}", digits(rng, rng.randint(5, 10))])
    return f"{local}@{rng.choice(_DOMAINS)}"


def gen_cn_mobile(rng):
    n = "1" + rng.choice("3456789") + digits(rng, 9)
    fmt = rng.randrange(8)
    body = [n, f"{n[:3]} {n[3:7]} {n[7:]}", f"{n[:3]}-{n[3:7]}-{n[7:]}"][fmt % 3]
    prefix = ["", "", "", "+86 ", "+86-", "+86", "0086 ", "(+86)"][fmt]
    return prefix + body


def gen_cn_id(rng):
    region = f"{rng.choice(sorted(_CN_PROVINCES - {71, 81, 82, 83}))}{rng.randint(1, 99):02d}{rng.randint(1, 99):02d}"
    born = datetime.date(1940, 1, 1) + datetime.timedelta(days=rng.randrange(70 * 365))
    first17 = region + born.strftime("%Y%m%d") + digits(rng, 3)
    full = first17 + "10X98765432"[sum(int(c) * w for c, w in zip(first17, _ID_W)) % 11]
    return full if rng.random() < 0.9 else f"{full[:6]} {full[6:14]} {full[14:]}"


def _luhn_complete(body: str) -> str:
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


_CARD_NETWORKS = [  # (prefix choices, lengths)
    (["4"], [16, 16, 13, 19]), (["51", "52", "53", "54", "55"], [16]), (["2221", "2500", "2720"], [16]),
    (["34", "37"], [15]), (["36", "38"], [14]), (["35"], [16, 19]), (["62"], [16, 17, 18, 19]), (["6011"], [16]),
]


def gen_bank_card(rng):
    prefixes, lengths = rng.choice(_CARD_NETWORKS)
    prefix, n = rng.choice(prefixes), rng.choice(lengths)
    card = _luhn_complete(prefix + digits(rng, n - len(prefix) - 1))
    sep = rng.choice([" ", "-", ""])
    if not sep:
        return card
    if n == 15 and prefix in ("34", "37") or n == 14:
        return sep.join([card[:4], card[4:10], card[10:]])
    if n == 19 and rng.random() < 0.5:
        return sep.join([card[:6], card[6:]])
    if n in (16, 19):
        return sep.join(card[i:i + 4] for i in range(0, n, 4))
    return card


def gen_ipv4(rng):
    return ".".join(str(rng.choice([rng.randint(1, 255), rng.randint(0, 99), rng.randint(200, 255)]))
                    for _ in range(4))


def gen_ipv6(rng):
    groups = [f"{rng.randrange(65536):x}" for _ in range(8)]
    groups[0] = rng.choice(["2001", "2400", "fe80", "2a00", "240e"])
    if rng.random() < 0.5:
        i = rng.randrange(1, 6)
        j = rng.randrange(i + 1, 8)
        return ":".join(groups[:i]) + "::" + ":".join(groups[j:])
    return ":".join(groups)


def gen_intl_phone(rng):
    d = lambda n: digits(rng, n)  # noqa: E731
    return rng.choice([
        f"+1 ({rng.randint(201, 989)}) {rng.randint(200, 999)}-{d(4)}", f"+1 {rng.randint(201, 989)}-{d(3)}-{d(4)}",
        f"+44 20 {d(4)} {d(4)}", f"+44 (0)20 {d(4)} {d(4)}", f"+49 30 {d(8)}", f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
        f"+81-3-{d(4)}-{d(4)}", f"+61 2 {d(4)} {d(4)}", f"+91 {rng.randint(70000, 99999)} {d(5)}",
        f"+852 {d(4)} {d(4)}", f"+65 {d(4)} {d(4)}", f"+7 495 {d(3)}-{d(2)}-{d(2)}",
    ])


def gen_url_credentials(rng):
    scheme = rng.choice(["https", "http", "ftp", "postgres", "mysql", "redis", "mongodb", "amqp"])
    user = rng.choice(["admin", "root", "deploy", "svc_app", "u" + digits(rng, 4)])
    pw = "".join(rng.choice("abcdefghijkmnpqrstuvwxyzABCDEFGH23456789!$%*_~-") for _ in range(rng.randint(6, 16)))
    host = rng.choice(["db.internal", "10.0.3.7", "example.com", "cache-01.prod.example.net", "localhost"])
    port = rng.choice(["", f":{rng.randint(1024, 65535)}"])
    path = rng.choice(["", "/app", "/v1/data?ssl=true", "/0"])
    return f"{scheme}://{user}:{pw}@{host}{port}", path


GENERATORS = {"email": gen_email, "cn_mobile": gen_cn_mobile, "cn_id": gen_cn_id, "bank_card": gen_bank_card,
              "ipv4": gen_ipv4, "ipv6": gen_ipv6, "intl_phone": gen_intl_phone}


def gen_negative(rng) -> tuple[str, str]:
    y, m, dd = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    cat = rng.choice(["date", "price", "year", "order_number", "long_number", "time", "percentage", "version"])
    text = {
        "date": rng.choice([f"{y}-{m:02d}-{dd:02d}", f"{y}/{m}/{dd}", f"{y}年{m}月{dd}日", f"{dd:02d}.{m:02d}.{y}",
                            f"{y}{m:02d}{dd:02d}", f"{y}-{m:02d}-{dd:02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
                            f"{y}-{m:02d}-{dd:02d}T10:00:00+08:00"]),
        "price": rng.choice([f"¥{rng.randint(1, 99)},{rng.randint(0, 999):03d}.{rng.randint(0, 99):02d}",
                             f"${rng.randint(1, 999)},{rng.randint(0, 999):03d}", f"€{rng.randint(1, 9999)}.99",
                             f"{rng.randint(100, 99999)}元", f"US${rng.randint(1, 9)},{rng.randint(0, 999):03d},"
                             f"{rng.randint(0, 999):03d}.{rng.randint(0, 99):02d}", f"￥{rng.randint(1000, 99999)}"]),
        "year": rng.choice([str(y), f"{y}年", f"in {y}", f"{y}-{y + 1}"]),
        "order_number": rng.choice([f"订单号{y}{m:02d}{dd:02d}{digits(rng, 11)}", f"No. {y}{m:02d}{dd:02d}{digits(rng, 6)}",
                                    f"运单号SF{digits(rng, 12)}", f"#{y}{digits(rng, 8)}"]),
        "long_number": _luhn_invalid(rng),
        "time": rng.choice([f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
                            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
                            f"{rng.randint(0, 23)}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{digits(rng, 3)}"]),
        "percentage": rng.choice([f"{rng.randint(0, 100)}%", f"+{rng.randint(0, 99)}.{rng.randint(0, 9)}%",
                                  f"-{rng.randint(0, 99)}.{rng.randint(0, 99):02d}%"]),
        "version": rng.choice([f"v{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}",
                               f"version {rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 99)}",
                               f"10.0.{rng.randint(10000, 22999)}.{rng.randint(1, 999)}",
                               f"Python 3.{rng.randint(6, 13)}.{rng.randint(0, 12)}", f"2.0.0-rc.{rng.randint(1, 9)}"]),
    }[cat]
    return cat, text


def _luhn_invalid(rng) -> str:
    while True:
        n = str(rng.randint(10**15, 10**19 - 1))
        if not luhn_valid(n):
            return n


# --- building and scoring the labelled set --------------------------------------------------------------

_CTX = {
    "en": {"email": ["", "Email: ", "contact "], "cn_mobile": ["", "Tel: ", "mobile "],
           "intl_phone": ["", "Phone: ", "call "], "cn_id": ["", "ID "], "bank_card": ["", "card "],
           "ipv4": ["", "server "], "ipv6": ["", "host "], "url_credentials": ["", "DSN "], "neg": [""]},
    "zh": {"email": ["", "邮箱", "邮箱："], "cn_mobile": ["", "电话", "手机："], "intl_phone": ["", "电话"],
           "cn_id": ["", "身份证号", "身份证："], "bank_card": ["", "卡号", "银行卡："], "ipv4": ["", "地址"],
           "ipv6": ["", "地址"], "url_credentials": ["", "连接"], "neg": [""]},
}
_GLUE = re.compile(r"[0-9A-Za-z_.+\-@:/]")


def _insertion_points(host: str, avoid: list[tuple[int, int]]) -> list[int]:
    # Between two characters neither of which is an ASCII letter/digit/_ (a glued identifier is not
    # standalone, by design) nor one of . + - @ : / that would extend it (a decimal, "++86", "x@" ...);
    # never inside a detection of the host text itself.
    return [i for i in range(1, len(host))
            if not _GLUE.match(host[i - 1]) and not _GLUE.match(host[i])
            and not any(s < i < e for s, e in avoid)]


def build_example(rng, lang: str, doc: str, n_items: int):
    """A host window with n_items identifiers/negatives inserted: (text, gold, negatives, host_spans)."""
    start = rng.randrange(max(1, len(doc) - 800))
    host = doc[start:start + rng.randint(200, 800)]
    host_spans = [(m.start, m.end) for m in find_pii(host)]
    points = _insertion_points(host, host_spans)
    if len(points) < n_items:
        return None
    chosen = sorted(rng.sample(points, n_items))
    pieces, gold, negs, pos, shift = [], [], [], 0, 0
    for p in chosen:
        pieces.append(host[pos:p])
        out_len = sum(map(len, pieces))
        if rng.random() < 0.3:
            cat, item = gen_negative(rng)
            ins, s = (f" {item} " if lang == "en" else item), (1 if lang == "en" else 0)
            negs.append((cat, out_len + s, out_len + s + len(item)))
        else:
            kind = rng.choice(list(GENERATORS) + ["url_credentials"])
            if kind == "url_credentials":
                item, tail = gen_url_credentials(rng)
            else:
                item, tail = GENERATORS[kind](rng), ""
            ctx = rng.choice(_CTX[lang][kind])
            ins = ctx + item + tail
            if lang == "en":
                ins = f" {ins} "
            s = out_len + ins.index(item)
            gold.append((kind, s, s + len(item)))
        pieces.append(ins)
        shift += len(ins)
        pos = p
    pieces.append(host[pos:])
    text = "".join(pieces)
    # host spans move right by what was inserted before them
    moved = []
    for hs, he in host_spans:
        before = sum(1 for p in chosen if p <= hs)
        add = sum(len(pieces[2 * i + 1]) for i in range(before))
        moved.append((hs + add, he + add))
    return text, gold, negs, moved


def overlaps(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def evaluate(examples) -> dict:
    kinds = list(PII_KINDS)
    gold_n = collections.Counter()
    tp_exact, tp_overlap = collections.Counter(), collections.Counter()
    pred_n, pred_ok_exact, pred_ok_overlap = collections.Counter(), collections.Counter(), collections.Counter()
    neg_n, neg_hit = collections.Counter(), collections.Counter()
    host_hits, host_examples, misses, false_pos = collections.Counter(), [], [], []
    for text, gold, negs, host_spans in examples:
        preds = [(m.kind, m.start, m.end) for m in find_pii(text)]
        for cat, s, e in negs:
            neg_n[cat] += 1
            if any(overlaps((s, e), p[1:]) for p in preds):
                neg_hit[cat] += 1
                false_pos.append({"negative": cat, "text": text[s:e]})
        for k, s, e in gold:
            gold_n[k] += 1
            if (k, s, e) in preds:
                tp_exact[k] += 1
            if any(p[0] == k and overlaps((s, e), p[1:]) for p in preds):
                tp_overlap[k] += 1
            elif len(misses) < 20:
                misses.append({"kind": k, "item": text[s:e], "context": text[max(0, s - 15):e + 15]})
        for k, s, e in preds:
            if any(overlaps((s, e), h) for h in host_spans):
                host_hits[k] += 1
                if len(host_examples) < 15:
                    host_examples.append({"kind": k, "text": text[s:e]})
                continue
            pred_n[k] += 1
            if (k, s, e) in gold:
                pred_ok_exact[k] += 1
            if any(g[0] == k and overlaps((s, e), g[1:]) for g in gold):
                pred_ok_overlap[k] += 1
            elif len(false_pos) < 40:
                false_pos.append({"kind": k, "text": text[s:e], "context": text[max(0, s - 15):e + 15]})

    def ratio(a, b):
        return round(a / b, 4) if b else None

    return {
        "per_kind": {k: {"gold": gold_n[k], "predicted": pred_n[k],
                         "recall_exact": ratio(tp_exact[k], gold_n[k]),
                         "recall_overlap": ratio(tp_overlap[k], gold_n[k]),
                         "precision_exact": ratio(pred_ok_exact[k], pred_n[k]),
                         "precision_overlap": ratio(pred_ok_overlap[k], pred_n[k])} for k in kinds},
        "hard_negatives": {c: {"inserted": neg_n[c], "wrongly_redacted": neg_hit[c]} for c in sorted(neg_n)},
        "wrongly_redacted_total": sum(neg_hit.values()),
        "host_text_detections": {"counts": dict(host_hits), "examples": host_examples},
        "missed_examples": misses,
        "false_positive_examples": false_pos[:20],
    }


def throughput(docs: list[str], cfg: SafetyConfig, repeats: int = 3) -> float:
    f = SafetyFilter(cfg)
    mb = sum(len(t.encode("utf-8")) for t in docs) / 1e6
    best = float("inf")
    for _ in range(repeats):
        batch = [{"id": str(i), "text": t, "stats": {}} for i, t in enumerate(docs)]
        t0 = time.perf_counter()
        for d in batch:
            f(d)
        best = min(best, time.perf_counter() - t0)
    return round(mb / best, 1)


def rare_lexicon(corpora: dict[str, list[str]], n: int = 1000) -> list[str]:
    """n rare English words and n rare Chinese bigrams of the corpora: a lexicon that hits now and then."""
    words = collections.Counter(w.lower() for t in corpora["en"] for w in re.findall(r"[A-Za-z]{5,}", t))
    bigrams = collections.Counter(t[i:i + 2] for t in corpora["zh"][:1000] for i in range(len(t) - 1)
                                  if "\u4e00" <= t[i] <= "\u9fff" and "\u4e00" <= t[i + 1] <= "\u9fff")
    rare_en = sorted(w for w, c in words.items() if c <= 2)[:n]
    rare_zh = sorted(b for b, c in bigrams.items() if c <= 2)[:n]
    return rare_en + rare_zh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=4000, help="labelled host windows (half en, half zh)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    corpora = load_corpora()
    examples = []
    while len(examples) < args.examples:
        lang = "en" if len(examples) % 2 == 0 else "zh"
        ex = build_example(rng, lang, rng.choice(corpora[lang]), rng.randint(1, 3))
        if ex is not None:
            examples.append(ex)
    result = {"examples": len(examples), "match": "exact = same span and kind; overlap = any overlap, same kind"}
    result.update(evaluate(examples))
    lexicon = rare_lexicon(corpora)
    result["throughput_MB_per_s"] = {}
    for lang, docs in corpora.items():
        mb = sum(len(t.encode("utf-8")) for t in docs) / 1e6
        result["throughput_MB_per_s"][lang] = {
            "corpus_MB": round(mb, 2), "docs": len(docs),
            "pii_redact": throughput(docs, SafetyConfig()),
            "pii_redact+lexicon_2000": throughput(
                docs, SafetyConfig(lexicon_words=lexicon, lexicon_action="redact")),
        }
    hits = collections.Counter()
    default = SafetyFilter(SafetyConfig())
    for docs in corpora.values():
        for t in docs:
            d = {"text": t}
            default(d)
            hits.update(d["stats"]["pii"])
    result["real_corpus_pii_counts"] = dict(hits)
    # The known limit of checksum validation: an arbitrary 13-19 digit number that happens to start with a
    # card prefix (2221-2720, 3-6) and pass Luhn (1 in 10) cannot be told from a card number.
    rand = [str(rng.randint(10 ** (n - 1), 10**n - 1)) for n in rng.choices(range(13, 20), k=20000)]
    flagged = sum(1 for t in rand if find_pii(f"编号{t}。", ["bank_card"]))
    result["uniform_random_13_19_digit_numbers_flagged_as_bank_card"] = round(flagged / len(rand), 4)
    print(json.dumps(result, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
