"""Sensitive information: PII detection/redaction and a sensitive-word lexicon (guide: 敏感信息).

Two mechanisms, both deterministic and auditable:

* **PII** - compiled regular expressions propose candidates, validators confirm them, and each confirmed
  span is replaced by a typed placeholder (``[EMAIL]``, ``[PHONE]``, ``[CN_ID]``, ``[BANK_CARD]``, ``[IP]``,
  ``[URL_CREDENTIALS]``). This follows the regex-plus-checksum approach of BigScience ROOTS' PII step
  (Laurençon et al. 2022) and BigCode's StarCoder PII pipeline (Li et al. 2023), which redact e-mails, IPs
  and keys with placeholders rather than dropping whole documents. Validators keep precision high where a
  bare regex would fire on ordinary numbers: Chinese resident ID numbers must have a valid region code,
  birth date and ISO 7064 MOD 11-2 check digit (GB 11643-1999); bank cards must pass the Luhn checksum
  (ISO/IEC 7812) and start with a payment-card industry prefix; international phones need an explicit
  ``+`` country code; IPs are parsed by :mod:`ipaddress`.
* **Lexicon** - a sensitive-word list matched in one pass with an Aho-Corasick automaton (Aho & Corasick
  1975, via pyahocorasick), case-insensitive for Latin letters. Latin words must sit on word boundaries
  ("ass" does not hit "class"); CJK words match as substrings since Chinese has no spaces.

Digit boundaries use explicit look-arounds, never ``\\b``: Chinese characters are word characters to
``re``, so ``\\b`` would find no boundary in "电话13812345678转". A number embedded in a longer digit run
("订单号2023101512345678901") never yields a match for a substring of it.

The manual spot check that goes with this step (a stratified sample of kept and dropped documents for a
person to review) lives in :mod:`llmkit.data.spot_check`.

Drop reasons emitted by :class:`SafetyFilter`:

* ``safety.lexicon`` - at least ``lexicon_min_hits`` lexicon hits and ``lexicon_action="drop"``.
* ``safety.pii`` - at least one PII match and ``pii_action="drop"``.
"""

from __future__ import annotations

import bisect
import datetime
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import ahocorasick

# Detection priority, highest first: when candidates of two kinds overlap, the earlier kind wins (a
# credential URL contains an e-mail-like "pass@host"; a valid ID number may also pass Luhn).
PII_KINDS: tuple[str, ...] = (
    "url_credentials", "email", "cn_id", "bank_card", "cn_mobile", "intl_phone", "ipv6", "ipv4",
)
PLACEHOLDERS: dict[str, str] = {
    "url_credentials": "[URL_CREDENTIALS]",
    "email": "[EMAIL]",
    "cn_id": "[CN_ID]",
    "bank_card": "[BANK_CARD]",
    "cn_mobile": "[PHONE]",
    "intl_phone": "[PHONE]",
    "ipv6": "[IP]",
    "ipv4": "[IP]",
    "lexicon": "[SENSITIVE]",
}
_PRIORITY = {k: i for i, k in enumerate(PII_KINDS)}


class PiiMatch(NamedTuple):
    """One detected span: ``text[start:end]`` is an identifier of ``kind`` (a key of PLACEHOLDERS)."""

    kind: str
    start: int
    end: int


# ---------------------------------------------------------------------------------------------------------
# Candidate regexes. Look-behinds/-aheads give digit boundaries that work next to CJK text: a number must
# not touch an ASCII letter/digit/underscore, nor continue a decimal ("3.14159265358..." holds no phone).
# Each numeric pattern consumes its first character *before* the look-behind (which then spans that
# character too): a pattern that starts with a literal or a character class lets `re` skip ahead with a
# fast scan instead of trying the look-behind at every position (about 5-30x faster on prose).


def _left(first: str) -> str:
    """`first` (a one-character class), not preceded by an ASCII word character or a "digit." decimal."""
    return rf"{first}(?<![0-9A-Za-z_]{first})(?<![0-9]\.{first})"


_NUM_AFTER = r"(?![0-9A-Za-z_])(?!\.[0-9])"

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9_%+\-][A-Za-z0-9._%+\-]{0,63}"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)
_URL_CREDENTIALS = re.compile(
    r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]{0,15}://"
    r"[^\s:/?#@\[\]<>\"']+:[^\s/?#@<>\"']+@"  # user:password@
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%\-]+)(?::[0-9]{1,5})?"  # host[:port]
)
# CN mobile: 1[3-9]x xxxx xxxx with optional consistent space/dash groups (3-4-4); a second pattern takes
# the +86 / 0086 / (+86) prefixed form. A bare number right after "+" belongs to intl_phone ("+1 381...").
_MOBILE_BODY = r"[3-9][0-9](?P<s>[ \-]?)[0-9]{4}(?P=s)[0-9]{4}" + _NUM_AFTER
_CN_MOBILE = re.compile(r"1(?<![0-9A-Za-z_+]1)(?<![0-9]\.1)" + _MOBILE_BODY)
_CN_MOBILE_PREFIXED = re.compile(r"(?<![0-9A-Za-z_+])(?:\+86|0086|\(\+?86\))[ \-]?1" + _MOBILE_BODY)
# CN resident ID (GB 11643-1999): 6-digit region, YYYYMMDD, 3-digit sequence, check digit 0-9/X.
_CN_ID = re.compile(
    _left("[1-9]")
    + r"[0-9]{5}(?P<s>[ \-]?)(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])"
    r"(?P=s)[0-9]{3}[0-9Xx](?![0-9A-Za-z_])"
)
# Bank cards (first digit 2-6, see _card_prefix_ok): contiguous 13-19 digits, or the printed groupings
# 4-4-4-4(-3), 4-6-5 / 4-6-4, 6-13.
_BANK_CARD = re.compile(
    _left("[2-6]")
    + r"(?:[0-9]{3}(?P<s1>[ \-])[0-9]{4}(?P=s1)[0-9]{4}(?P=s1)[0-9]{1,4}(?:(?P=s1)[0-9]{1,3})?"
    r"|[0-9]{3}(?P<s2>[ \-])[0-9]{6}(?P=s2)[0-9]{4,5}"
    r"|[0-9]{5}(?P<s3>[ \-])[0-9]{10,13}"
    r"|[0-9]{12,18})" + _NUM_AFTER
)
# International phone: "+" country code, then digit groups joined by one separator (space . -) or a
# parenthesised area code. Each group starts with a non-digit, so the regex cannot backtrack badly, and
# the repeats are bounded (E.164 has at most 15 digits), so "+1 2 3 4 ..." costs O(1) per candidate.
_INTL_PHONE = re.compile(
    r"\+(?<![0-9A-Za-z_+]\+)[1-9][0-9]{0,14}"
    r"(?:[ .\-][0-9]{1,14}|[ ]?\([0-9]{1,4}\)[ .\-]?[0-9]{1,14}){0,8}" + _NUM_AFTER
)
# Dotted quads; octet values (<= 255, no leading zeros) are checked in Python.
_IPV4 = re.compile(
    r"[0-9](?<![0-9A-Za-z_.][0-9])[0-9]{0,2}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}" + _NUM_AFTER
)
_IPV6 = re.compile(
    r"(?<![0-9A-Za-z_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
    r"(?:(?:[0-9]{1,3}\.){3}[0-9]{1,3}|[0-9A-Fa-f]{1,4})?(?![0-9A-Za-z_:])"
)
# Any IPv6 address holds "::" or (all eight groups written) this; a cheap test before the full scan.
_IPV6_GATE = re.compile(r":[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")
# A dotted quad right after a version word is a version string, not an address.
_VERSION_CONTEXT = re.compile(
    r"(?:(?<![A-Za-z])(?:version|ver\.?|release|build|rev\.?)|版本号?|版)\s*[:：]?\s*$", re.I
)
_DIGITS = re.compile(r"[0-9]+")

# GB/T 2260 province-level codes (first two digits of an ID number); 71/81/82/83: Taiwan, Hong Kong,
# Macao residence permits.
_CN_PROVINCES = frozenset({
    11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46,
    50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83,
})
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)  # 2^(17-i) mod 11
_ID_CHECK = "10X98765432"  # check character for (sum mod 11) = 0..10

# ITU-T E.164 country codes, as a set of the assigned 1-, 2- and 3-digit prefixes.
_CC1 = {"1", "7"}
_CC2 = {
    "20", "27", "30", "31", "32", "33", "34", "36", "39", "40", "41", "43", "44", "45", "46", "47", "48",
    "49", "51", "52", "53", "54", "55", "56", "57", "58", "60", "61", "62", "63", "64", "65", "66", "81",
    "82", "84", "86", "90", "91", "92", "93", "94", "95", "98",
}
_CC3_PREFIXES = {"21", "22", "23", "24", "25", "26", "29", "35", "37", "38", "42", "50", "59", "67", "68",
                 "69", "80", "85", "87", "88", "96", "97", "99"}


def cn_id_valid(s: str) -> bool:
    """True for an 18-character Chinese resident ID number with a valid region, birth date and check digit.

    `s` may contain the single space/dash group separators the detector accepts (6-8-4 groups).
    """
    s = s.replace(" ", "").replace("-", "")
    if len(s) != 18 or not s[:17].isdigit() or int(s[:2]) not in _CN_PROVINCES:
        return False
    try:
        born = datetime.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:  # 2023-02-30 and the like
        return False
    if born.year < 1900 or born > datetime.date.today():
        return False
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == s[17].upper()


def luhn_valid(digits: str) -> bool:
    """Luhn (mod 10) checksum of a digit string, as used by every payment card number (ISO/IEC 7812)."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_prefix_ok(digits: str) -> bool:
    # Issuer identification: 3 travel/entertainment (Amex, JCB, Diners), 4 Visa, 5 Mastercard/Maestro,
    # 6 UnionPay/Discover/Maestro, 2221-2720 Mastercard. Rejecting 0/1/7/8/9 and other 2xxx prefixes stops
    # dates-led order numbers ("2023101512...") and phone-like runs from passing on Luhn alone (1 in 10).
    first = digits[0]
    if first in "3456":
        return True
    return first == "2" and 2221 <= int(digits[:4]) <= 2720


def _bank_card_valid(s: str) -> bool:
    digits = s.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and _card_prefix_ok(digits) and luhn_valid(digits)


def _looks_like_date(groups: list[str]) -> bool:
    for i in range(len(groups) - 2):
        y, m, d = groups[i:i + 3]
        if len(y) == 4 and y[:2] in ("19", "20") and len(m) <= 2 and len(d) <= 2 \
                and 1 <= int(m) <= 12 and 1 <= int(d) <= 31:
            return True
    return False


def _intl_phone_valid(s: str) -> bool:
    groups = _DIGITS.findall(s.replace("(0)", ""))  # "(0)" is a trunk prefix, not part of E.164
    digits = "".join(groups)
    if not 8 <= len(digits) <= 15:
        return False
    if not (digits[0] in _CC1 or digits[:2] in _CC2 or digits[:2] in _CC3_PREFIXES):
        return False
    if _looks_like_date(groups):
        return False
    if len(groups) > 2 and len(groups[-1]) == 1:
        return False  # no numbering plan ends in a 1-digit group: the number ran into "... 5/(3^3)"
    # "+1.2.3.4.5.6.7.8" is a version or list, not a number; phone groups of 1-2 digits use spaces.
    return not ("." in s and max(len(g) for g in groups) <= 2)


def _ipv4_valid(s: str) -> bool:
    return all(int(o) <= 255 and (o[0] != "0" or len(o) == 1) for o in s.split("."))


def _ipv6_valid(s: str) -> bool:
    if not any(c.isdigit() for c in s) or sum(1 for g in s.split(":") if g) < 2:
        return False  # "::1", "a::b" (C++ scopes), bare colons
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _trim_groups(s: str, valid) -> str | None:
    """The longest prefix of `s`, cut at a group separator, that `valid` accepts (or None).

    A grouped number may run into a following number ("+44 20 7946 0958 2023"); dropping trailing groups
    recovers it without a second regex pass.
    """
    if valid(s):
        return s
    cuts = [m.start() for m in re.finditer(r"[ .\-](?=[0-9(])", s)]
    for cut in reversed(cuts):
        if valid(s[:cut]):
            return s[:cut]
    return None


def _find_kind(text: str, kind: str) -> Iterable[tuple[int, int]]:
    if kind == "email":
        if "@" in text:
            for m in _EMAIL.finditer(text):
                yield m.span()
    elif kind == "url_credentials":
        if "@" in text and "://" in text:
            for m in _URL_CREDENTIALS.finditer(text):
                yield m.span()
    elif kind == "cn_mobile":
        for m in _CN_MOBILE.finditer(text):
            yield m.span()
        if "86" in text:
            for m in _CN_MOBILE_PREFIXED.finditer(text):
                yield m.span()
    elif kind == "cn_id":
        for m in _CN_ID.finditer(text):
            if cn_id_valid(m.group()):
                yield m.span()
    elif kind == "bank_card":
        for m in _BANK_CARD.finditer(text):
            s = _trim_groups(m.group(), _bank_card_valid)
            if s is not None:
                yield m.start(), m.start() + len(s)
    elif kind == "intl_phone":
        if "+" in text:
            for m in _INTL_PHONE.finditer(text):
                s = _trim_groups(m.group(), _intl_phone_valid)
                if s is not None:
                    yield m.start(), m.start() + len(s)
    elif kind == "ipv4":
        if "." in text:
            for m in _IPV4.finditer(text):
                if _ipv4_valid(m.group()) and not _VERSION_CONTEXT.search(text, max(0, m.start() - 12), m.start()):
                    yield m.span()
    elif kind == "ipv6":
        if "::" in text or _IPV6_GATE.search(text):
            for m in _IPV6.finditer(text):
                if _ipv6_valid(m.group()):
                    yield m.span()
    else:
        raise ValueError(f"unknown PII kind {kind!r}; known: {', '.join(PII_KINDS)}")


def _resolve(candidates: list[PiiMatch], priority: dict[str, int]) -> list[PiiMatch]:
    """Non-overlapping subset: by priority, then longest, then leftmost; returned sorted by start."""
    candidates.sort(key=lambda m: (priority[m.kind], m.start - m.end, m.start))
    starts: list[int] = []
    kept: list[PiiMatch] = []
    for m in candidates:
        i = bisect.bisect_right(starts, m.start)
        if i and kept[i - 1].end > m.start:
            continue
        if i < len(kept) and kept[i].start < m.end:
            continue
        starts.insert(i, m.start)
        kept.insert(i, m)
    return kept


def find_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> list[PiiMatch]:
    """Detect PII in `text`.

    Args:
        text: any string.
        kinds: which detectors to run, a subset of PII_KINDS (default: all).
    Returns:
        Non-overlapping PiiMatch(kind, start, end) sorted by start, character offsets into `text`. Where
        candidates of different kinds overlap, the kind listed first in PII_KINDS wins.
    Raises:
        ValueError for an unknown kind.
    """
    candidates = [PiiMatch(kind, s, e) for kind in kinds for s, e in _find_kind(text, kind)]
    if len(candidates) <= 1:
        return candidates
    return _resolve(candidates, _PRIORITY)


def redact_pii(text: str, matches: Iterable[PiiMatch]) -> str:
    """Replace each match's span by its kind's placeholder (PLACEHOLDERS, e.g. "[PHONE]").

    `matches` must not overlap (find_pii's output never does); their order does not matter.
    """
    matches = sorted(matches, key=lambda m: m.start)
    if not matches:
        return text
    parts, pos = [], 0
    for m in matches:
        parts.append(text[pos:m.start])
        parts.append(PLACEHOLDERS[m.kind])
        pos = m.end
    parts.append(text[pos:])
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Lexicon

def _is_cjk(ch: str) -> bool:
    # Scripts written without spaces between words: a lexicon word ending in one of these matches as a
    # substring. Han (incl. extensions and compatibility), kana, Hangul syllables, CJK punctuation.
    o = ord(ch)
    return (0x2E80 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF
            or 0xFE30 <= o <= 0xFE4F or 0x20000 <= o <= 0x3FFFF)


def _is_word_char(ch: str) -> bool:
    return (ch.isalnum() or ch == "_") and not _is_cjk(ch)


def _lower_same_length(text: str) -> str:
    """text.lower() with one character per character, so match offsets map back to `text`.

    A few characters lower to two ("İ" -> "i̇"); those are kept as they are.
    """
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c if len(lc := c.lower()) != 1 else lc for c in text)


class Lexicon:
    """A sensitive-word list matched with an Aho-Corasick automaton (one pass over the text, any list size).

    Matching is case-insensitive (words and text are lower-cased). A word whose first (last) character is
    a non-CJK letter or digit only matches where the text's character before (after) it is not one; CJK
    ends match anywhere, so "ass" does not hit "class" but "赌博" hits "网络赌博网站".

    Args:
        words: the entries; blank ones are ignored, duplicates (after lower-casing) kept once.
    """

    def __init__(self, words: Iterable[str]):
        seen: dict[str, str] = {}
        for w in words:
            w = w.strip()
            if w:
                seen.setdefault(_lower_same_length(w), w)
        self.words: list[str] = list(seen.values())
        self._build(seen)

    def _build(self, table: dict[str, str]) -> None:
        self._automaton = None
        if not table:
            return
        automaton = ahocorasick.Automaton()
        for key, word in table.items():
            automaton.add_word(key, (len(key), word, _is_word_char(key[0]), _is_word_char(key[-1])))
        automaton.make_automaton()
        self._automaton = automaton

    @classmethod
    def from_files(cls, paths: Iterable[str | Path], extra: Iterable[str] = ()) -> Lexicon:
        """Read UTF-8 word lists: one word per line, blank lines and lines starting with "#" ignored.

        `extra` words are added to those of the files.
        """
        words = list(extra)
        for path in paths:
            for line in Path(path).read_text(encoding="utf-8-sig").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    words.append(line)
        return cls(words)

    def __len__(self) -> int:
        return len(self.words)

    def __getstate__(self) -> dict:
        return {"words": self.words}  # rebuilt on unpickling: small to ship to worker processes

    def __setstate__(self, state: dict) -> None:
        self.words = state["words"]
        self._build({_lower_same_length(w): w for w in self.words})

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Lexicon hits in `text`: non-overlapping (start, end, word), leftmost-longest, sorted by start.

        `word` is the lexicon entry as given; text[start:end] is the hit (any case).
        """
        if self._automaton is None or not text:
            return []
        low = _lower_same_length(text)
        n = len(low)
        hits = []
        for end_idx, (length, word, left_bound, right_bound) in self._automaton.iter(low):
            start, end = end_idx - length + 1, end_idx + 1
            if left_bound and start > 0 and _is_word_char(low[start - 1]):
                continue
            if right_bound and end < n and _is_word_char(low[end]):
                continue
            hits.append((start, end, word))
        if len(hits) <= 1:
            return hits
        hits.sort(key=lambda h: (h[0], h[0] - h[1]))
        out, last_end = [], -1
        for h in hits:
            if h[0] >= last_end:
                out.append(h)
                last_end = h[1]
        return out


# ---------------------------------------------------------------------------------------------------------
# The pipeline step

@dataclass
class SafetyConfig:
    pii: bool = True
    """Detect PII (e-mails, phones, CN ID numbers, bank cards, IPs, credential URLs)."""
    pii_kinds: list[str] = field(default_factory=lambda: list(PII_KINDS))
    """Detectors to run, from: url_credentials, email, cn_id, bank_card, cn_mobile, intl_phone, ipv6, ipv4."""
    pii_action: Literal["redact", "drop"] = "redact"
    """redact: replace each match by its placeholder ([EMAIL], [PHONE], ...); drop: reject the document."""
    lexicon_files: list[str] = field(default_factory=list)
    """UTF-8 word lists, one word per line, "#" comments."""
    lexicon_words: list[str] = field(default_factory=list)
    """Extra lexicon words given inline."""
    lexicon_action: Literal["drop", "redact"] = "drop"
    """drop: reject documents with >= lexicon_min_hits hits; redact: replace each hit by [SENSITIVE]."""
    lexicon_min_hits: int = 1
    """Number of lexicon hits at which a document is dropped (lexicon_action=drop)."""

    def validate(self) -> None:
        unknown = [k for k in self.pii_kinds if k not in PLACEHOLDERS or k == "lexicon"]
        if unknown:
            raise ValueError(f"pii_kinds: unknown PII kind {unknown[0]!r}; known: {', '.join(PII_KINDS)}")
        if self.pii_action not in ("redact", "drop"):
            raise ValueError(f"pii_action: {self.pii_action!r} is not 'redact' or 'drop'")
        if self.lexicon_action not in ("drop", "redact"):
            raise ValueError(f"lexicon_action: {self.lexicon_action!r} is not 'drop' or 'redact'")
        if self.lexicon_min_hits < 1:
            raise ValueError(f"lexicon_min_hits: must be >= 1, got {self.lexicon_min_hits}")


class SafetyFilter:
    """Per-document step: lexicon check, then PII detection; redacts in place or returns a drop reason.

    Records ``doc["stats"]["lexicon"]`` (number of hits, when a lexicon is configured) and
    ``doc["stats"]["pii"]`` ({kind: count} of the kinds found, {} for none; not set for a document already
    dropped by the lexicon). Both run on the original text, so placeholders never feed the lexicon.
    Returns None (keep), "safety.lexicon" or "safety.pii".

    Raises FileNotFoundError at construction for a missing lexicon file.
    """

    def __init__(self, cfg: SafetyConfig):
        cfg.validate()
        self.cfg = cfg
        self.kinds = tuple(k for k in PII_KINDS if k in set(cfg.pii_kinds)) if cfg.pii else ()
        for p in cfg.lexicon_files:
            if not Path(p).is_file():
                raise FileNotFoundError(f"safety.lexicon_files: no such file {p}")
        lexicon = Lexicon.from_files(cfg.lexicon_files, cfg.lexicon_words)
        self.lexicon: Lexicon | None = lexicon if len(lexicon) else None

    def __call__(self, doc: dict) -> str | None:
        text = doc.get("text") or ""
        if not isinstance(text, str):
            text = str(text)
        stats = doc.setdefault("stats", {})
        spans: list[PiiMatch] = []
        if self.lexicon is not None:
            hits = self.lexicon.find(text)
            stats["lexicon"] = len(hits)
            if hits and self.cfg.lexicon_action == "drop":
                if len(hits) >= self.cfg.lexicon_min_hits:
                    return "safety.lexicon"
            elif hits:
                spans = [PiiMatch("lexicon", s, e) for s, e, _ in hits]
        if self.kinds:
            matches = find_pii(text, self.kinds)
            counts: dict[str, int] = {}
            for m in matches:
                counts[m.kind] = counts.get(m.kind, 0) + 1
            stats["pii"] = counts
            if matches and self.cfg.pii_action == "drop":
                return "safety.pii"
            if matches:
                # PII outranks lexicon words where the two overlap (a word inside an e-mail address).
                spans = _resolve(matches + spans, {**_PRIORITY, "lexicon": len(_PRIORITY)}) if spans \
                    else matches
        if spans:
            doc["text"] = redact_pii(text, spans)
        return None
