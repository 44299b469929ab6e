"""Text normalization and script-based language detection: the first per-document step of `llmkit data run`.

What `normalize_text` does, in order (each stage can be switched off in `NormalizeConfig`):

1. Line breaks: `\\r\\n` and lone `\\r` become `\\n`, and so do the other characters Python's
   `str.splitlines` treats as line boundaries (`\\v \\f \\x1c-\\x1e \\x85 U+2028 U+2029`), so a form feed
   between two pages does not glue their words together.
2. Invisible characters: every control (Unicode category Cc) and format (Cf) character of the BMP is
   removed except `\\n`, `\\t`, and the zero-width (non-)joiners U+200C/U+200D, which are spelling in
   Persian and Indic scripts and glue emoji sequences. This removes NUL, BOM, soft hyphens, zero-width
   spaces, bidi marks; the astral format characters (emoji tag sequences) stay with their symbols.
3. Unicode NFKC (`unicodedata.normalize`), the compatibility folding used by CCNet and most LLM pipelines:
   fullwidth `ＡＢＣ１２３` become `ABC123`, halfwidth katakana become fullwidth, ligatures `ﬁ` become `fi`.
   It also folds a few things one may want to keep: `x²` -> `x2`, `①` -> `1`, `…` -> `...`, and Chinese
   fullwidth punctuation `，！？：；（）` to ASCII `,!?:;()`. Chinese and Japanese text is typeset with the
   fullwidth marks (and NFKC leaves `。、「」《》“”` alone, so folding half of them yields a mix like
   `你好,世界。`), so for zh/ja documents those marks are kept by default (`keep_cjk_punct`).
4. Traditional -> simplified Chinese with OpenCC's `t2s` table (off by default), for zh documents only.
5. Whitespace: every run of horizontal whitespace (spaces, tabs, no-break and ideographic spaces, ...)
   becomes one space; lines lose their leading and trailing spaces (`keep_indentation` keeps the leading
   ones, for code); runs of more than one blank line become one blank line; the document is stripped.

`detect_language` tells languages apart by the Unicode script of their letters, the fast part of what
CLD/fastText learn. The rule, on at most the first 100,000 characters:

* count letters per script with one table lookup per code point (numpy): Han, kana, hangul, Latin,
  Cyrillic, Greek, Arabic, Hebrew, Devanagari, Thai. A Han character carries about as much as a word of
  a spaced language (Chinese words average ~1.6 characters, English ones ~4.7 letters), so Han and kana
  count 3x and hangul syllable blocks 2x when scripts compete;
* no letters at all -> `"und"` (undetermined);
* Han + kana win -> `"ja"` if kana are at least 10% of them (Japanese prose is 40-70% kana; Chinese has
  none), else `"zh"` (simplified and traditional alike); hangul wins -> `"ko"`;
* Latin wins -> `"en"` unless the function words of other major Latin-script languages (de, fr, es, it,
  pt, nl: `der und ist le les est los las que ...`) outnumber the English ones (`the of and to is ...`) in
  the first 5,000 characters, in which case the generic `"und-Latn"`; text without function words
  (keyword spam, lists) counts as English so that the English quality rules see it;
* any other script wins -> `"und-<Script>"` (BCP 47), e.g. `"und-Cyrl"`.

`Normalizer` is the pipeline step: it rewrites `doc["text"]`, sets `doc["lang"]` when the source did not
declare one, and drops documents that become empty with the reason `"normalize.empty"` (its only reason).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

DROP_EMPTY = "normalize.empty"


@dataclass
class NormalizeConfig:
    enabled: bool = True
    """False: the step passes documents through untouched (no language is set either)."""
    nfkc: bool = True
    """Apply Unicode NFKC compatibility normalization."""
    keep_cjk_punct: bool = True
    """With nfkc: in zh/ja documents keep the fullwidth punctuation ，！？：；（）［］｛｝～＂＇． and the
    ellipsis … that NFKC would fold to ASCII (fullwidth letters and digits are still folded)."""
    fix_whitespace: bool = True
    """Remove control/format characters, unify line breaks, collapse spaces and blank lines, strip."""
    keep_indentation: bool = False
    """With fix_whitespace: keep each line's leading spaces/tabs (code); False removes them (prose)."""
    t2s: bool = False
    """Convert traditional to simplified Chinese (OpenCC "t2s") in zh documents."""
    detect_language: bool = True
    """Set doc["lang"] from `detect_language` when the source did not declare a language."""


# ---------------------------------------------------------------------------------------------------
# language detection

_SCRIPTS = ("none", "Latn", "Hani", "Kana", "Hang", "Cyrl", "Grek", "Arab", "Hebr", "Deva", "Thai")
_S = {name: i for i, name in enumerate(_SCRIPTS)}
_SCRIPT_RANGES = {  # inclusive code point ranges, letters (plus a few marks) of each script
    "Latn": [(0x41, 0x5A), (0x61, 0x7A), (0xAA, 0xAA), (0xBA, 0xBA), (0xC0, 0xD6), (0xD8, 0xF6),
             (0xF8, 0x24F), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xFF21, 0xFF3A),
             (0xFF41, 0xFF5A)],
    "Hani": [(0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF)],  # + planes 2-3, handled apart
    "Kana": [(0x3040, 0x309F), (0x30A0, 0x30FA), (0x30FC, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)],
    "Hang": [(0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)],
    "Cyrl": [(0x400, 0x52F)],
    "Grek": [(0x370, 0x3FF), (0x1F00, 0x1FFF)],
    "Arab": [(0x620, 0x64A), (0x66E, 0x6D3), (0x750, 0x77F), (0x8A0, 0x8FF), (0xFB50, 0xFDFF),
             (0xFE70, 0xFEFF)],
    "Hebr": [(0x5D0, 0x5F2)],
    "Deva": [(0x900, 0x97F)],
    "Thai": [(0xE01, 0xE3A), (0xE40, 0xE4E)],
}
_BMP_SCRIPT = np.zeros(0x10000, dtype=np.uint8)
for _name, _ranges in _SCRIPT_RANGES.items():
    for _lo, _hi in _ranges:
        _BMP_SCRIPT[_lo:_hi + 1] = _S[_name]
_WEIGHT = np.ones(len(_SCRIPTS))
_WEIGHT[_S["Hani"]] = _WEIGHT[_S["Kana"]] = 3.0
_WEIGHT[_S["Hang"]] = 2.0
_WEIGHT[_S["none"]] = 0.0
_DETECT_CHARS = 100_000
_FUNCTION_CHARS = 5_000
_EN_FUNCTION = frozenset("the of and to is in that it was for with as on are this be by have not".split())
_OTHER_FUNCTION = frozenset(
    "der die das und ist nicht ein eine mit sich auf dem zu auch wird"  # de
    " le la les et est une des du dans pour qui pas sur au avec ce sont"  # fr
    " el los las del por una con para es que se lo como más"  # es
    " il di che non gli della sono è"  # it
    " os não uma em da dos são é"  # pt
    " het een niet ik zijn voor".split()  # nl
)


def _script_counts(text: str) -> np.ndarray:
    """Letters per script of `_SCRIPTS` in `text`, shape (len(_SCRIPTS),), int64."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    counts = np.bincount(_BMP_SCRIPT[np.minimum(cp, 0xFFFF)], minlength=len(_SCRIPTS))
    astral = cp > 0xFFFF
    if astral.any():  # the lookup above mapped them to U+FFFF (script none); CJK extensions B-G are Han
        counts[_S["Hani"]] += int(((cp >= 0x20000) & (cp <= 0x3FFFF)).sum())
    return counts


def detect_language(text: str) -> str:
    """Language of `text` from the scripts of its letters (see the module docstring for the rule).

    Returns "en", "zh", "ja", "ko", "und-Latn" (other Latin-script language), "und-<Script>" for
    Cyrillic, Greek, Arabic, Hebrew, Devanagari or Thai, and "und" when the text has no letters.
    Looks at the first 100,000 characters; about 100 MB/s.
    """
    sample = text[:_DETECT_CHARS]
    if not sample:
        return "und"
    counts = _script_counts(sample)
    weighted = counts * _WEIGHT
    han_kana = counts[_S["Hani"]] + counts[_S["Kana"]]
    weighted[_S["Hani"]] = han_kana * 3.0  # Han and kana compete together as one writing system
    weighted[_S["Kana"]] = 0.0
    best = int(np.argmax(weighted))
    if weighted[best] == 0:
        return "und"
    script = _SCRIPTS[best]
    if script == "Hani":
        return "ja" if counts[_S["Kana"]] >= 0.1 * han_kana else "zh"
    if script == "Hang":
        return "ko"
    if script == "Latn":
        words = sample[:_FUNCTION_CHARS].lower().split()  # C-speed; "the," is missed, rarely matters
        english = sum(map(_EN_FUNCTION.__contains__, words))
        other = sum(map(_OTHER_FUNCTION.__contains__, words))
        return "en" if english >= other else "und-Latn"
    return f"und-{script}"


# ---------------------------------------------------------------------------------------------------
# normalization

_NEWLINES = re.compile(r"\r\n?|[\v\f\x1c-\x1e\x85\u2028\u2029]")
# runs of whitespace other than the newline that are not already a single space (matching every single
# space between words too would make this the slowest stage)
_HSPACE_RUN = re.compile(r" [^\S\n]+|[^\S \n][^\S\n]*")
_INNER_HSPACE_RUN = re.compile(r"(?<=\S)(?: [^\S\n]+|[^\S \n][^\S\n]*)")  # the same, not starting a line
_TRAILING_HSPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")
_KEEP_FORMAT = {"\t", "\n", "\u200c", "\u200d"}

# NFKC folds these to ASCII; in zh/ja text they are swapped for private-use code points (which NFKC
# leaves alone) around the normalization. Plane-15 PUA code points do not occur in real text.
_CJK_PUNCT = "，！？：；（）［］｛｝～＂＇．…"
_PROTECT = [(c, chr(0xF0000 + i)) for i, c in enumerate(_CJK_PUNCT)]


@functools.cache
def _control_re() -> re.Pattern:
    """Character class of the Cc and Cf code points of the BMP except tab, newline, ZWNJ and ZWJ.

    Built from the running Python's Unicode database on first use. The few astral format characters
    (emoji tag sequences, Egyptian hieroglyph and musical notation controls) belong to the symbols
    around them and are kept; leaving them out also keeps the class a fast BMP bitmap."""
    ranges: list[list[int]] = []
    for c in range(0x10000):
        ch = chr(c)
        if unicodedata.category(ch) in ("Cc", "Cf") and ch not in _KEEP_FORMAT:
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    parts = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                    for a, b in ranges)
    return re.compile(f"[{parts}]+")


@functools.cache
def _opencc_t2s():
    import opencc

    return opencc.OpenCC("t2s")


def _is_cjk(lang: str | None) -> bool:
    return lang is not None and (lang == "ja" or lang == "zh" or lang.startswith(("zh-", "ja-")))


def _is_zh(lang: str | None) -> bool:
    return lang is not None and (lang == "zh" or lang.startswith("zh-"))


def _nfkc(text: str, protect_punct: bool) -> str:
    if protect_punct:
        for c, p in _PROTECT:
            text = text.replace(c, p)
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    if protect_punct:
        for c, p in _PROTECT:
            text = text.replace(p, c)
    return text


def _fix_whitespace(text: str, keep_indentation: bool) -> str:
    if keep_indentation:
        text = _INNER_HSPACE_RUN.sub(" ", text)
        text = _TRAILING_HSPACE.sub("", text)
    else:
        text = _HSPACE_RUN.sub(" ", text)
        text = text.replace(" \n", "\n").replace("\n ", "\n")
    text = _BLANK_LINES.sub("\n\n", text)
    # with indentation kept, the first line keeps its own: drop only the blank lines above it
    return text.lstrip("\n").rstrip() if keep_indentation else text.strip()


def normalize_text(text: str, cfg: NormalizeConfig | None = None, lang: str | None = None) -> str:
    """Normalize one document's text (stages in the module docstring); returns the new text.

    Args:
        text: the raw text.
        cfg: which stages run; None -> `NormalizeConfig()` defaults.
        lang: the document's language, used by `keep_cjk_punct` and `t2s`; None -> `detect_language`
            is run when one of those needs it (never for pure-ASCII text).
    """
    cfg = cfg or NormalizeConfig()
    if not cfg.enabled or not text:
        return text
    ascii_only = text.isascii()  # O(1) in CPython: no NFKC, punctuation or Chinese work to do
    if cfg.fix_whitespace:
        text = _NEWLINES.sub("\n", text)
        text = _control_re().sub("", text)
    if not ascii_only:
        if lang is None and ((cfg.nfkc and cfg.keep_cjk_punct) or cfg.t2s):
            lang = detect_language(text)
        if cfg.nfkc:
            text = _nfkc(text, protect_punct=cfg.keep_cjk_punct and _is_cjk(lang))
        if cfg.t2s and _is_zh(lang):
            text = _opencc_t2s().convert(text)
    if cfg.fix_whitespace:
        text = _fix_whitespace(text, cfg.keep_indentation)
    return text


class Normalizer:
    """Pipeline step: `Normalizer(cfg)(doc) -> None | "normalize.empty"`.

    Sets doc["text"] to `normalize_text(doc["text"])`; when `cfg.detect_language` and doc["lang"] is
    None, sets doc["lang"] to `detect_language` of the raw text. A document whose text is empty after
    normalization is dropped with "normalize.empty".
    """

    def __init__(self, cfg: NormalizeConfig | None = None):
        self.cfg = cfg or NormalizeConfig()

    def __call__(self, doc: dict[str, Any]) -> str | None:
        cfg = self.cfg
        if not cfg.enabled:
            return None
        text = doc["text"]
        lang = doc.get("lang")
        if lang is None and (cfg.detect_language or (not text.isascii() and (
                (cfg.nfkc and cfg.keep_cjk_punct) or cfg.t2s))):
            lang = detect_language(text)
            if cfg.detect_language:
                doc["lang"] = lang
        text = normalize_text(text, cfg, lang=lang)
        doc["text"] = text
        return None if text else DROP_EMPTY
