"""Heuristic quality filter: the Gopher rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis
& Insights from Training Gopher", Appendix A: MassiveWeb quality filters and repetition removal, Table A1),
with their published English defaults and a character-based variant for Chinese.

A document is dropped by the first rule it fails, in this order (reason = `"quality.<name>"`):

| reason | rule (en default) |
|---|---|
| min_words, max_words | number of words outside [50, 100000] |
| min_mean_word_length, max_mean_word_length | mean word length outside [3, 10] characters |
| symbol_word_ratio | `#` per word, or ellipses (`...`, `…`) per word, above 0.1 |
| bullet_lines | more than 90% of the non-blank lines start with a bullet (`- * • ‣ ◦ ▪ ● ○ ■ □ – ·`) |
| ellipsis_lines | more than 30% of the non-blank lines end with `...` or `…` |
| alpha_words | under 80% of the words contain an alphabetic character |
| stop_words | fewer than 2 of the stop words `the be to of and that have with` occur |
| dup_para_frac, dup_para_char_frac | paragraphs that repeat an earlier one: > 30% of paragraphs, > 20% of chars |
| dup_line_frac, dup_line_char_frac | lines that repeat an earlier one: > 30% of lines, > 20% of characters |
| top_2gram, top_3gram, top_4gram | characters in the most frequent n-gram above 20%, 18%, 16% |
| dup_5gram ... dup_10gram | characters covered by repeated n-grams above 15, 14, 13, 12, 11, 10% |

Definitions (the paper gives the thresholds, not the tokenization; these follow datatrove's
GopherQualityFilter/GopherRepetitionFilter and RedPajama-V2's quality signals, with the differences noted):

* "word" units (English and other space-separated scripts): a word is a whitespace-separated token with at
  least one letter or digit; its length counts letters and digits only (punctuation is removed, like
  RedPajama's normalized words; datatrove splits punctuation off with an NLTK tokenizer, which gives the
  same counts for ordinary prose). `alpha_words` divides by all whitespace tokens, so a document of
  `| - | 2 |` tables fails it. Stop words are matched case-insensitively as whole words, and
  `min_stop_words` counts *distinct* stop words ("contain at least two of the following words", the
  paper's wording; datatrove counts occurrences).
* "char" units (Chinese, Japanese): every Han/kana/hangul character is a word and so is every run of
  other letters/digits (`Python3`, `1839`). `alpha_words` divides by the words plus the punctuation and
  symbol characters, so symbol spam fails it.
* Lines are the non-blank lines (stripped); paragraphs are separated by blank lines. A duplicate line
  or paragraph is one equal to an earlier one; the `*_char_frac` rules divide the duplicates'
  characters by the document's length (as datatrove does).
* n-grams run over the lower-cased words; an n-gram's characters are its words' characters, and the
  fractions divide by all words' characters (RedPajama-V2). `top_Ngram`: count x characters of the most
  frequent n-gram (the longest, among equally frequent ones; 0 when nothing repeats). `dup_Ngram`: the
  characters of the words covered by any occurrence of an n-gram that occurs at least twice, each word
  counted once however many such n-grams overlap it (the paper's "taking care not to count characters
  that occur in overlapping n-grams more than once"; RedPajama-V2 and Dolma also count every occurrence,
  datatrove only the later ones, which halves the fraction of a passage that appears twice).

Speed: words are hashed once (Python's string hash, C speed), n-gram keys are built from them with a
vectorised rolling mix in numpy (uint64), duplicates are found by argsort, and word coverage is a
difference-array over word positions. A duplicated (n+1)-gram starts where a duplicated n-gram starts and
is followed by one, so n = 6..10 only look at those candidate positions (few in real text).

Chinese defaults (`zh_rules`), tuned on the shared corpora (classical poems and prose, alpaca_zh answers):
characters are the units, so the word-length rule is off and all lengths are in characters.

* `min_words` 10: a five-character quatrain is 20 characters and the alpaca_zh answers have a median of
  ~160; what goes are fragments and one-word answers ("正义。"; set 1 for instruction data).
* `min_alpha_words_frac` 0.5: punctuation is 12-20% of Chinese text by this count (medians 0.82-0.88,
  the dialogue of the Analects 0.72), so the English 80% would drop classical texts; at 50% only
  symbol-, number- or code-dominated documents fail (3% of the alpaca_zh answers: code and arithmetic).
* stop characters: function characters of modern and classical Chinese (的 了 是 在 和 有 不 之 而 也 以
  其 于 为 者 乎 无 何 此 所 亦 自 与 相 来 ..., both scripts), 2 needed, but only from 150 characters
  on (`stop_words_min_words`): Tang regulated verse has almost no function words (from 60 characters on,
  33 of the shared poems still fail with this list; from 150 none do), while keyword lists fail.
* n-gram sizes x3 (top 6/9/12, duplicate 15..30 characters): key terms like 人工智能 recur in any
  expository text, so short character n-grams measure terminology, not copied phrases (with the English
  sizes on characters, 24% of the alpaca_zh answers and 43% of Mencius fail; x3: 2% and none).
* repetition rules from 50 characters on (`repetition_min_words`): in a couplet one repeated phrase is
  already a large fraction.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from llmkit.data.normalize import detect_language

EN_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]
ZH_STOP_WORDS = ["的", "了", "是", "在", "和", "有", "不", "之", "而", "也", "以", "其", "于", "於", "为", "為",
                 "者", "乎", "我", "这", "這", "人", "一", "无", "無", "何", "此", "所", "亦", "自", "与", "與",
                 "相", "来", "來"]
BULLETS = ("-", "*", "•", "‣", "◦", "▪", "●", "○", "■", "□", "–", "·")


@dataclass
class GopherRules:
    """Thresholds of the Gopher rules for one language; every threshold can be switched off with null.

    The defaults are the paper's English values (Rae et al. 2021, Appendix A / Table A1)."""

    unit: Literal["word", "char"] = "word"
    """How text is cut into words: "word" = whitespace-separated tokens; "char" = each Han/kana/hangul
    character is a word, and each run of other letters/digits."""
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    """Mean word length in characters (letters and digits; punctuation excluded)."""
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    """Upper bound on both `#` per word and ellipses (`...`, a run of `…`) per word."""
    max_bullet_lines_frac: float | None = 0.9
    max_ellipsis_lines_frac: float | None = 0.3
    min_alpha_words_frac: float | None = 0.8
    """Fraction of words (all whitespace tokens; in char mode words + punctuation characters) that
    contain an alphabetic character."""
    stop_words: list[str] = field(default_factory=lambda: list(EN_STOP_WORDS))
    min_stop_words: int | None = 2
    """How many *distinct* stop words must occur (word mode: whole words, any case; char mode: substrings)."""
    stop_words_min_words: int = 0
    """Apply the stop-word rule only to documents with at least this many words."""
    repetition_min_words: int = 0
    """Apply the line/paragraph/n-gram repetition rules only to documents with at least this many words."""
    max_dup_line_frac: float | None = 0.30
    max_dup_para_frac: float | None = 0.30
    max_dup_line_char_frac: float | None = 0.20
    max_dup_para_char_frac: float | None = 0.20
    top_ngram_sizes: list[int] = field(default_factory=lambda: [2, 3, 4])
    max_top_ngram_char_frac: list[float] | None = field(default_factory=lambda: [0.20, 0.18, 0.16])
    """One threshold per entry of top_ngram_sizes; null switches the top n-gram rules off."""
    dup_ngram_sizes: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9, 10])
    max_dup_ngram_char_frac: list[float] | None = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    """One threshold per entry of dup_ngram_sizes; null switches the duplicate n-gram rules off."""

    def validate(self) -> None:
        for name in ("top", "dup"):
            sizes = getattr(self, f"{name}_ngram_sizes")
            fracs = getattr(self, f"max_{name}_ngram_char_frac")
            if any(n < 1 for n in sizes):
                raise ValueError(f"{name}_ngram_sizes: n-gram sizes must be >= 1, got {sizes}")
            if fracs is not None and len(fracs) != len(sizes):
                raise ValueError(f"max_{name}_ngram_char_frac: needs one value per {name}_ngram_sizes entry "
                                 f"({len(sizes)}), got {len(fracs)}")
        if self.min_stop_words is not None and self.min_stop_words > len(set(self.stop_words)):
            raise ValueError(f"min_stop_words: {self.min_stop_words} distinct stop words can never occur "
                             f"with {len(set(self.stop_words))} stop words listed")
        if (self.min_words is not None and self.max_words is not None and self.min_words > self.max_words):
            raise ValueError("min_words: larger than max_words")


def zh_rules() -> GopherRules:
    """Chinese defaults: character units, thresholds explained in the module docstring."""
    return GopherRules(
        unit="char", min_words=10, max_words=200_000, min_mean_word_length=None, max_mean_word_length=None,
        min_alpha_words_frac=0.5, stop_words=list(ZH_STOP_WORDS), min_stop_words=2, stop_words_min_words=150,
        repetition_min_words=50, top_ngram_sizes=[6, 9, 12], dup_ngram_sizes=[15, 18, 21, 24, 27, 30])


def default_rules() -> dict[str, GopherRules]:
    """{"en": GopherRules() (the paper's values), "zh": zh_rules()}."""
    return {"en": GopherRules(), "zh": zh_rules()}


@dataclass
class QualityConfig:
    enabled: bool = True
    rules: dict[str, GopherRules] = field(default_factory=default_rules)
    """Rules per language (doc["lang"]; "zh-Hant" uses "zh"). Setting `rules` in YAML replaces the whole
    mapping, and a language written there starts from the English defaults of GopherRules: copy the
    full zh block (see docs/data.md) when changing one Chinese threshold."""
    fallback: str | None = "en"
    """Rules key for languages without their own rules ("und", "und-Latn", "ja", ...). The English rules
    drop most non-English text (stop words), as Gopher's English-only MassiveWeb did; null keeps such
    documents unchecked."""
    store_stats: bool = True
    """Record the statistics computed before the decision in doc["stats"]["quality"]."""

    def validate(self) -> None:
        if self.fallback is not None and self.fallback not in self.rules:
            raise ValueError(f"fallback: {self.fallback!r} is not a key of rules ({', '.join(self.rules)})")
        for lang, rules in self.rules.items():
            try:
                rules.validate()
            except ValueError as e:
                raise ValueError(f"rules.{lang}.{e}") from e


# ---------------------------------------------------------------------------------------------------
# text statistics

_CJK = "\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af" \
       "\uf900-\ufaff\U00020000-\U0003ffff"
_PUNCT = re.compile(r"[^\w\s]+")
_PUNCT_CHARS = re.compile(r"[^\w\s]")
_CHAR_UNITS = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
_DIGIT_WORD = re.compile(r"(?<!\S)[\d_]+(?!\S)")  # on punctuation-free text: a word without letters
_DIGIT_UNIT = re.compile(f"(?<![^\\W{_CJK}])[\\d_]+(?![^\\W{_CJK}])")
_ELLIPSIS = re.compile(r"\.\.\.|…+")
_PARAGRAPH_SPLIT = re.compile(r"\n[^\S\n]*\n\s*")
_STOP_RE_CACHE: dict[str, re.Pattern] = {}

_P1 = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (2^64 / golden ratio, as in splitmix64)
_SHIFT = np.uint64(29)


def words_of(text: str, unit: str = "word") -> list[str]:
    """The lower-cased words the rules count and the n-gram rules compare (see the module docstring)."""
    if unit == "char":
        return _CHAR_UNITS.findall(text.lower())
    return _PUNCT.sub("", text.lower()).split()


def _word_hashes(words: list[str]) -> np.ndarray:
    return np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)


def _mix(keys: np.ndarray, next_words: np.ndarray) -> np.ndarray:
    """Extend n-gram keys by one word: an order-dependent, non-linear mix (uint64, wrapping)."""
    return (keys ^ (keys >> _SHIFT)) * _P1 + next_words


def _dup_flags(keys: np.ndarray) -> np.ndarray:
    """flags[i] = keys[i] occurs more than once in keys (bool, same shape)."""
    order = np.argsort(keys)
    s = keys[order]
    eq = s[1:] == s[:-1]
    dup_sorted = np.zeros(len(keys), dtype=bool)
    dup_sorted[1:] |= eq
    dup_sorted[:-1] |= eq
    flags = np.empty(len(keys), dtype=bool)
    flags[order] = dup_sorted
    return flags


class _Ngrams:
    """Vectorised n-gram repetition statistics of one word sequence."""

    def __init__(self, words: list[str]):
        self.hashes = _word_hashes(words)
        self.lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.cum_chars = np.concatenate(([0], np.cumsum(self.lengths)))
        self.total_chars = int(self.cum_chars[-1])
        self._keys = {1: self.hashes}
        self._top_counts: dict[int, int] = {}

    def keys(self, n: int) -> np.ndarray:
        """Key of the n-gram starting at each word, shape (len(words) - n + 1,).

        Built by halving, keys(n)[i] = mix(keys(n - n//2)[i], keys(n//2)[i + n - n//2]): log2(n) array
        operations instead of n."""
        keys = self._keys.get(n)
        if keys is None and n > len(self.hashes):
            keys = np.empty(0, dtype=np.uint64)
        elif keys is None:
            half = n // 2
            left, right = self.keys(n - half), self.keys(half)
            keys = self._keys[n] = _mix(left[:len(right) - (n - half)], right[n - half:])
        return keys

    def top_frac(self, n: int, limit: float | None = None) -> float | None:
        """Characters of the most frequent n-gram times its count / all words' characters.

        With `limit`, returns None without sorting when a cheap upper bound (the top count of a shorter
        n-gram, which bounds this one's, times the longest n-gram) shows the fraction is <= limit."""
        length = len(self.hashes)
        if length < n or self.total_chars == 0:
            return 0.0
        ngram_chars = self.cum_chars[n:] - self.cum_chars[:-n]
        if limit is not None:
            shorter = [c for m, c in self._top_counts.items() if m < n]
            bound = min(shorter) if shorter else length - n + 1
            if bound * int(ngram_chars.max()) <= limit * self.total_chars:
                return None
        keys = self.keys(n)
        order = np.argsort(keys)
        s = keys[order]
        starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
        counts = np.diff(starts, append=len(s))
        top = int(counts.max())
        self._top_counts[n] = top
        if top <= 1:
            return 0.0
        # all occurrences of an n-gram have the same characters: read them at each top run's first one
        chars = int(ngram_chars[order[starts[counts == top]]].max())
        return top * chars / self.total_chars

    def dup_fracs(self, sizes: list[int]) -> Iterator[tuple[int, float]]:
        """Yield (n, fraction of word characters covered by repeated n-grams) for sizes in ascending order.

        The fraction can only shrink as n grows. n-grams longer than the smallest size are only formed
        where a repeated shorter one starts and a repeated one follows it (a repeated (n+1)-gram implies
        both), so the sorts shrink quickly."""
        sizes = sorted(sizes)
        length = len(self.hashes)
        if not sizes:
            return
        if self.total_chars == 0 or length < sizes[0]:
            for n in sizes:
                yield n, 0.0
            return
        n = sizes[0]
        keys = self.keys(n)
        starts = np.flatnonzero(_dup_flags(keys))  # positions where a repeated n-gram starts
        keys = keys[starts]
        wanted = set(sizes)
        while True:
            if n in wanted:
                yield n, self._covered_frac(starts, n)
            if n == sizes[-1]:
                return
            # candidates for repeated (n+1)-grams: consecutive starts of repeated n-grams
            consecutive = np.diff(starts) == 1
            cand = starts[:-1][consecutive]
            if len(cand) == 0:
                for m in sizes:
                    if m > n:
                        yield m, 0.0
                return
            keys = _mix(keys[:-1][consecutive], self.hashes[cand + n])
            n += 1
            flags = _dup_flags(keys)
            starts, keys = cand[flags], keys[flags]

    def _covered_frac(self, starts: np.ndarray, n: int) -> float:
        if len(starts) == 0:
            return 0.0
        delta = np.zeros(len(self.hashes) + 1, dtype=np.int32)
        delta[starts] += 1  # starts are distinct, so plain fancy-index updates are exact
        delta[starts + n] -= 1
        covered = np.cumsum(delta[:-1]) > 0
        return int(self.lengths[covered].sum()) / self.total_chars


def ngram_repetition(words: list[str], top_sizes: list[int], dup_sizes: list[int]
                     ) -> tuple[dict[int, float], dict[int, float]]:
    """All n-gram repetition statistics of a word list: ({n: top_frac}, {n: dup_frac}).

    Definitions in the module docstring; `words` as returned by `words_of`."""
    grams = _Ngrams(words)
    return {n: grams.top_frac(n) or 0.0 for n in top_sizes}, dict(grams.dup_fracs(dup_sizes))


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for s in items:
        if s in seen:
            count += 1
            chars += len(s)
        else:
            seen.add(s)
    return count, chars


def _stop_pattern(word: str) -> re.Pattern:
    pattern = _STOP_RE_CACHE.get(word)
    if pattern is None:
        pattern = _STOP_RE_CACHE[word] = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    return pattern


def _count_stop_words(text: str, rules: GopherRules, needed: int) -> int:
    """Distinct stop words present, counting stops at `needed`."""
    found = 0
    for w in dict.fromkeys(rules.stop_words):
        hit = (w in text) if rules.unit == "char" else (_stop_pattern(w).search(text) is not None)
        found += hit
        if found >= needed:
            break
    return found


def check_quality(text: str, lang: str | None = None, rules: GopherRules | dict[str, GopherRules] | None = None,
                  fallback: str | None = "en", stats: dict[str, Any] | None = None) -> str | None:
    """First Gopher rule `text` fails, as "quality.<rule>", or None when it passes them all.

    Args:
        text: the (normalized) document text.
        lang: its language; picks the rules when `rules` is a mapping (exact key, then the part before
            "-", then `fallback`); None -> `detect_language(text)`.
        rules: one GopherRules, or rules per language; None -> `default_rules()`.
        fallback: rules key for languages without rules; None -> such documents pass unchecked.
        stats: if given, filled with the statistics computed before the decision (words, mean word
            length, ratios, n-gram fractions), rounded to 4 decimals.
    """
    if rules is None:
        rules = default_rules()
    if isinstance(rules, dict):
        picked = rules_for(lang if lang is not None else detect_language(text), rules, fallback)
        if picked is None:
            return None
        rules = picked
    return _evaluate(text, rules, stats if stats is not None else {})


def rules_for(lang: str | None, rules: dict[str, GopherRules], fallback: str | None) -> GopherRules | None:
    """The rules for `lang`: exact key, then its base language ("zh-Hant" -> "zh"), then `fallback`."""
    if lang is not None:
        if lang in rules:
            return rules[lang]
        base = lang.split("-", 1)[0]
        if base in rules:
            return rules[base]
    return rules.get(fallback) if fallback is not None else None


def _evaluate(text: str, r: GopherRules, stats: dict[str, Any]) -> str | None:
    char_mode = r.unit == "char"
    lower = text.lower()
    if char_mode:
        words = _CHAR_UNITS.findall(lower)
    else:
        clean = _PUNCT.sub("", lower)
        words = clean.split()
    n_words = len(words)
    stats["words"] = n_words
    if r.min_words is not None and n_words < r.min_words:
        return "quality.min_words"
    if r.max_words is not None and n_words > r.max_words:
        return "quality.max_words"

    grams = _Ngrams(words)
    if r.min_mean_word_length is not None or r.max_mean_word_length is not None:
        mean = grams.total_chars / n_words if n_words else 0.0
        stats["mean_word_length"] = round(mean, 4)
        if r.min_mean_word_length is not None and mean < r.min_mean_word_length:
            return "quality.min_mean_word_length"
        if r.max_mean_word_length is not None and mean > r.max_mean_word_length:
            return "quality.max_mean_word_length"

    if r.max_symbol_word_ratio is not None and n_words:
        hash_ratio = text.count("#") / n_words
        ellipsis_ratio = len(_ELLIPSIS.findall(text)) / n_words
        stats["hash_ratio"] = round(hash_ratio, 4)
        stats["ellipsis_ratio"] = round(ellipsis_ratio, 4)
        if max(hash_ratio, ellipsis_ratio) > r.max_symbol_word_ratio:
            return "quality.symbol_word_ratio"

    lines = [s for s in map(str.strip, text.split("\n")) if s]
    if lines and r.max_bullet_lines_frac is not None:
        frac = sum(map(_is_bullet, lines)) / len(lines)
        stats["bullet_lines_frac"] = round(frac, 4)
        if frac > r.max_bullet_lines_frac:
            return "quality.bullet_lines"
    if lines and r.max_ellipsis_lines_frac is not None:
        frac = sum(s.endswith(("...", "…")) for s in lines) / len(lines)
        stats["ellipsis_lines_frac"] = round(frac, 4)
        if frac > r.max_ellipsis_lines_frac:
            return "quality.ellipsis_lines"

    if r.min_alpha_words_frac is not None and n_words:
        if char_mode:
            alpha = n_words - len(_DIGIT_UNIT.findall(lower))
            total = n_words + _PUNCT_CHARS.subn("", text)[1]
        else:
            alpha = n_words - len(_DIGIT_WORD.findall(clean))
            total = len(text.split())
        frac = alpha / total
        stats["alpha_words_frac"] = round(frac, 4)
        if frac < r.min_alpha_words_frac:
            return "quality.alpha_words"

    if r.min_stop_words is not None and n_words >= r.stop_words_min_words:
        found = _count_stop_words(text, r, r.min_stop_words)
        stats["stop_words"] = found
        if found < r.min_stop_words:
            return "quality.stop_words"

    if n_words < r.repetition_min_words:
        return None
    n_chars = len(text)
    paragraphs = [p for p in map(str.strip, _PARAGRAPH_SPLIT.split(text)) if p]
    if paragraphs and (r.max_dup_para_frac is not None or r.max_dup_para_char_frac is not None):
        count, chars = _duplicates(paragraphs)
        stats["dup_para_frac"] = round(count / len(paragraphs), 4)
        stats["dup_para_char_frac"] = round(chars / n_chars, 4)
        if r.max_dup_para_frac is not None and count / len(paragraphs) > r.max_dup_para_frac:
            return "quality.dup_para_frac"
        if r.max_dup_para_char_frac is not None and chars / n_chars > r.max_dup_para_char_frac:
            return "quality.dup_para_char_frac"
    if lines and (r.max_dup_line_frac is not None or r.max_dup_line_char_frac is not None):
        count, chars = _duplicates(lines)
        stats["dup_line_frac"] = round(count / len(lines), 4)
        stats["dup_line_char_frac"] = round(chars / n_chars, 4)
        if r.max_dup_line_frac is not None and count / len(lines) > r.max_dup_line_frac:
            return "quality.dup_line_frac"
        if r.max_dup_line_char_frac is not None and chars / n_chars > r.max_dup_line_char_frac:
            return "quality.dup_line_char_frac"

    if r.max_top_ngram_char_frac is not None:
        for n, limit in zip(r.top_ngram_sizes, r.max_top_ngram_char_frac):
            frac = grams.top_frac(n, limit)
            if frac is None:  # bounded below the limit without sorting
                continue
            stats[f"top_{n}gram_frac"] = round(frac, 4)
            if frac > limit:
                return f"quality.top_{n}gram"
    if r.max_dup_ngram_char_frac is not None:
        limits = dict(zip(r.dup_ngram_sizes, r.max_dup_ngram_char_frac))
        for n, frac in grams.dup_fracs(list(limits)):
            stats[f"dup_{n}gram_frac"] = round(frac, 4)
            if frac > limits[n]:
                return f"quality.dup_{n}gram"
            # coverage only shrinks as n grows: stop once it is under every remaining limit
            if frac <= min((v for m, v in limits.items() if m > n), default=float("inf")):
                break
    return None


def _is_bullet(line: str) -> bool:
    return line.startswith(BULLETS)


class QualityFilter:
    """Pipeline step: `QualityFilter(cfg)(doc) -> None | "quality.<rule>"` (reasons in the module docstring).

    Picks the rules by doc["lang"] (detected on the fly, not stored, when it is None) and records the
    statistics computed up to the decision in doc["stats"]["quality"] when `cfg.store_stats`.
    """

    def __init__(self, cfg: QualityConfig | None = None):
        self.cfg = cfg or QualityConfig()

    def __call__(self, doc: dict[str, Any]) -> str | None:
        cfg = self.cfg
        if not cfg.enabled:
            return None
        text = doc["text"]
        lang = doc.get("lang")
        rules = rules_for(lang if lang is not None else detect_language(text), cfg.rules, cfg.fallback)
        if rules is None:
            return None
        stats: dict[str, Any] = {}
        reason = _evaluate(text, rules, stats)
        if cfg.store_stats:
            doc.setdefault("stats", {})["quality"] = stats
        return reason
