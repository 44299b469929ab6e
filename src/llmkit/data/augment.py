"""Data augmentation: EDA word operations and back-translation (guide §1.1: enlarge data diversity).

**EDA** (Wei & Zou 2019, "EDA: Easy Data Augmentation Techniques for Boosting Performance on Text
Classification Tasks") applies one of four cheap word-level operations to a text:

* synonym replacement (SR): n non-stop words that have synonyms are each replaced by a random synonym;
* random insertion (RI): n times, a random synonym of a random non-stop word is inserted at a random
  position;
* random swap (RS): n times, two random words swap places;
* random deletion (RD): every word is deleted with probability p (never all of them: one survives).

with n = max(1, int(alpha * number of words)) and p = alpha unless set apart, as in the paper's code.
Two deliberate departures from the reference script (jasonwei20/eda_nlp):

1. The script lowercases the text, strips every character that is not a letter or a space and
   collapses whitespace before augmenting. That was harmless for the paper's sentence classifiers,
   but augmented *pretraining* text would then teach a language model unpunctuated lowercase prose
   without line structure, a distribution shift. Here the text is split into word tokens and the
   "glue" between them (punctuation, digits, spaces, newlines), the operations act on the words only
   and the glue stays in place, so punctuation and lines survive; casing is carried over locally (a
   synonym takes the replaced word's case, a word moved into or out of a sentence start is re-cased).
2. The script's SR replaces *every* occurrence of the chosen word types; on whole documents that
   changes far more than alpha of the words, so here n *token positions* are replaced.

Chinese text is segmented with jieba (`jieba.lcut`) and rejoined without spaces. Stop words (small
built-in en and zh lists) are never replaced and never chosen as the word whose synonym is inserted.
Every random choice comes from a `random.Random` seeded by a stable hash (blake2b) of (seed, document
id, method, copy index), so a document's augmentations do not depend on process, order or
PYTHONHASHSEED.

Synonyms come from a plain dictionary file (`load_synonym_dict`) and/or the Princeton WordNet 3.0
database files (`load_wordnet`: words that share a synset are synonyms, as EDA's WordNet lookup).

**Back-translation** (Sennrich et al. 2016, "Improving Neural Machine Translation Models with
Monolingual Data"; Xie et al. 2020, UDA, for its use as augmentation) translates a text into a pivot
language and back with two seq2seq models, greedily, giving a paraphrase. `BackTranslator` loads local
Hugging Face seq2seq models (`kind="hf"`, e.g. a Marian opus-mt pair) or llmkit encoder-decoder model
directories (`kind="llmkit"`), translates sentence by sentence (sentences longer than the model's input
budget in pieces), de-duplicates and length-sorts the units of a whole batch of documents before
batching, and reassembles each document with its line structure.

`Augmenter(AugmentConfig)` turns one original document into a list of NEW documents (the original is
never modified); the pipeline appends them after the mixing step. It never drops a document, so it
has no drop reasons; it counts what it did in `Augmenter.counts`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = [
    "EDA_METHODS",
    "EN_STOPWORDS",
    "METHODS",
    "ZH_STOPWORDS",
    "AugmentConfig",
    "Augmenter",
    "BackTranslationConfig",
    "BackTranslator",
    "HFSeq2Seq",
    "LlmkitSeq2Seq",
    "Seq2SeqEngine",
    "join_words",
    "load_synonym_dict",
    "load_wordnet",
    "merge_synonyms",
    "n_changes",
    "random_delete",
    "random_insert",
    "random_swap",
    "split_words",
    "stable_seed",
    "synonym_replace",
]

Method = Literal["synonym_replace", "random_insert", "random_swap", "random_delete", "back_translate"]
METHODS: tuple[str, ...] = ("synonym_replace", "random_insert", "random_swap", "random_delete", "back_translate")
EDA_METHODS: tuple[str, ...] = METHODS[:4]
SYNONYM_METHODS: tuple[str, ...] = ("synonym_replace", "random_insert")

# EDA's stop-word list (eda_nlp code/eda.py, itself NLTK's English list), without the empty string.
EN_STOPWORDS: frozenset[str] = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves what which who whom this that these those am is
are was were be been being have has had having do does did doing a an the and but if or because as
until while of at by for with about against between into through during before after above below to
from up down in out on off over under again further then once here there when where why how all any
both each few more most other some such no nor not only own same so than too very s t can will just don
should now
""".split())
# contractions, which the reference script never sees (it strips apostrophes), in both apostrophes
_CONTRACTIONS = """
i'm i've i'll i'd you're you've you'll you'd he's he'll he'd she's she'll she'd it's it'll we're we've
we'll we'd they're they've they'll they'd that's there's here's what's who's let's isn't aren't wasn't
weren't don't doesn't didn't haven't hasn't hadn't won't wouldn't can't couldn't shouldn't mustn't
""".split()
EN_STOPWORDS = EN_STOPWORDS | frozenset(_CONTRACTIONS) | frozenset(w.replace("'", "’") for w in _CONTRACTIONS)

# Function words, pronouns and particles of modern and classical Chinese: replacing them changes the
# grammar rather than the wording.
ZH_STOPWORDS: frozenset[str] = frozenset("""
的 了 着 过 地 得 之 乎 者 也 矣 焉 哉 兮 耶 欤 而 其 与 及 或 并 但 却 于 以 为 所 被 把 从 对 向 在 是 有 和
就 都 不 没 没有 很 也 还 又 再 才 这 那 这个 那个 这些 那些 此 彼 我 你 他 她 它 您 我们 你们 他们 她们 它们
自己 吾 汝 尔 君 吗 呢 吧 啊 呀 么 嘛 则 若 即 亦 乃 且 因 因为 所以 如果 虽然 但是 而且 或者 一 一个 个 上 下
中 里 等 将 会 能 可 可以 要 已 已经 曰 云 无 非 莫 勿
""".split())

_SEED_DOMAIN = "llmkit.augment"


# -- seeding ---------------------------------------------------------------------------------------


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from `parts` (their str(), NUL-separated) via blake2b: the same in every process,
    unlike Python's salted hash()."""
    h = hashlib.blake2b("\0".join(map(str, (_SEED_DOMAIN, *parts))).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def _stable_unit(*parts: Any) -> float:
    """A number in [0, 1) fixed by `parts` (document selection for `AugmentConfig.fraction`)."""
    return stable_seed(*parts) / 2.0**64


def n_changes(n_words: int, alpha: float) -> int:
    """EDA's number of words an operation changes: max(1, int(alpha * n_words))."""
    return max(1, int(alpha * n_words))


# -- synonym sources -------------------------------------------------------------------------------


def _add_synonyms(table: dict[str, list[str]], seen: dict[str, set[str]], word: str,
                  synonyms: Iterable[str]) -> None:
    key = word.lower()
    bucket = table.setdefault(key, [])
    have = seen.setdefault(key, {key})
    for s in synonyms:
        low = s.lower()
        if low not in have:
            have.add(low)
            bucket.append(s)


def load_synonym_dict(path: str | Path, symmetric: bool = False) -> dict[str, list[str]]:
    """Read a synonym dictionary file into {lowercased word: [synonyms in file order]}.

    Format: UTF-8 text, one group per line, either ``word<TAB>syn1 syn2 ...`` or ``word syn1 syn2 ...``
    (the first whitespace-separated item is the headword, the others its synonyms). Inside a word,
    ``_`` stands for a space (``take_a_breath``), as in WordNet. Blank lines and lines starting with
    ``#`` are skipped; repeated headwords merge. Lookups are case-insensitive (keys are lowercased;
    synonyms keep their case). With `symmetric`, every line is a group of mutual synonyms: each
    member maps to all the others.

    Raises:
        FileNotFoundError if `path` is missing; ValueError ``"<path>:<line>: why"`` for a line that is
        not valid UTF-8, has an empty headword or has no synonyms.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synonym dictionary {path} does not exist")
    table: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if lineno == 1:
                line = line.lstrip("\ufeff")
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "\t" in line:
                head, rest = line.split("\t", 1)
                head = head.strip()
                syns = rest.split()
                if not head:
                    raise ValueError(f"{path}:{lineno}: empty headword before the tab")
            else:
                head, *syns = line.split()
            words = [w.replace("_", " ") for w in (head, *syns)]
            if len(words) < 2:
                raise ValueError(f"{path}:{lineno}: {head!r} has no synonyms (expected 'word<TAB>syn1 syn2 ...' "
                                 f"or 'word syn1 syn2 ...')")
            if symmetric:
                for w in words:
                    _add_synonyms(table, seen, w, [o for o in words if o != w])
            else:
                _add_synonyms(table, seen, words[0], words[1:])
    return {k: v for k, v in table.items() if v}


WORDNET_FILES: tuple[str, ...] = ("data.noun", "data.verb", "data.adj", "data.adv")
_WN_SS_TYPES = frozenset("nvasr")
# adjective syntactic markers glued to a word in data.adj: (p) predicate, (a) prenominal, (ip) postnominal
_WN_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def load_wordnet(dict_dir: str | Path = "/usr/share/wordnet", files: Sequence[str] = WORDNET_FILES,
                 proper_nouns: bool = False) -> dict[str, list[str]]:
    """Synonyms from the Princeton WordNet 3.0 database: {lowercased word: [words sharing a synset]}.

    Reads the ``data.noun / data.verb / data.adj / data.adv`` files (wndb(5WN); Debian's
    ``wordnet-base`` package installs them in /usr/share/wordnet). Each synset line reads::

        synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...] [frames] | gloss

    with synset_offset an 8-digit byte offset, lex_filenum 2 decimal digits, ss_type one of n v a s r,
    w_cnt 2 *hexadecimal* digits and lex_id 1 hex digit. Words use ``_`` for spaces (mapped back to
    spaces) and, in data.adj, may carry a syntactic marker ``(a)``, ``(p)`` or ``(ip)`` (dropped).
    The license header lines at the top of each file start with two spaces and are skipped. A word in
    several synsets gets the union of their members, in file order (noun, verb, adj, adv), without
    itself, case-insensitively de-duplicated. Unless `proper_nouns`, words with a capital letter
    ("London", "W. C. Handy") are left out, as keys and as synonyms: EDA would otherwise replace
    "handy" by "William Christopher Handy". The result is cached per (directory, files, proper_nouns).

    Raises:
        FileNotFoundError naming the missing file; ValueError ``"<file>:<line>: why"`` for a malformed line.
    """
    d = Path(dict_dir)
    missing = [name for name in files if not (d / name).is_file()]
    if missing:
        raise FileNotFoundError(f"WordNet directory {d} lacks {', '.join(missing)} (Debian: apt-get install "
                                f"wordnet-base, which installs /usr/share/wordnet)")
    return _load_wordnet_cached(str(d.resolve()), tuple(files), proper_nouns)


@lru_cache(maxsize=4)
def _load_wordnet_cached(dict_dir: str, files: tuple[str, ...], proper_nouns: bool) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    for name in files:
        path = Path(dict_dir) / name
        with open(path, encoding="utf-8", errors="strict") as f:
            for lineno, line in enumerate(f, start=1):
                if line.startswith("  ") or not line.strip():
                    continue
                members = _parse_wordnet_line(line, f"{path}:{lineno}")
                if not proper_nouns:
                    members = [w for w in members if w.islower() or not _HAS_LETTER.search(w)]
                if len(members) > 1:
                    for w in members:
                        _add_synonyms(table, seen, w, (o for o in members if o != w))
    return {k: v for k, v in table.items() if v}


def _parse_wordnet_line(line: str, loc: str) -> list[str]:
    """The words of one data.* synset line (underscores -> spaces, adjective markers dropped)."""
    fields = line.split(" ", 4 + 2 * 255)  # at most 255 words: w_cnt is two hex digits
    if len(fields) < 6:
        raise ValueError(f"{loc}: not a WordNet synset line (too few fields)")
    offset, lex_filenum, ss_type, w_cnt = fields[:4]
    if not (offset.isdigit() and len(offset) == 8):
        raise ValueError(f"{loc}: synset_offset {offset!r} is not an 8-digit number")
    if not lex_filenum.isdigit():
        raise ValueError(f"{loc}: lex_filenum {lex_filenum!r} is not a number")
    if ss_type not in _WN_SS_TYPES:
        raise ValueError(f"{loc}: ss_type {ss_type!r} is not one of n v a s r")
    try:
        count = int(w_cnt, 16)
    except ValueError:
        raise ValueError(f"{loc}: w_cnt {w_cnt!r} is not a hexadecimal number") from None
    if count < 1 or len(fields) < 4 + 2 * count + 1:
        raise ValueError(f"{loc}: w_cnt says {count} words but the line is shorter")
    words = []
    for i in range(count):
        word, lex_id = fields[4 + 2 * i], fields[5 + 2 * i]
        if not word or len(lex_id) != 1 or lex_id not in "0123456789abcdefABCDEF":
            raise ValueError(f"{loc}: word {i + 1} ({word!r} {lex_id!r}) is not a 'word lex_id' pair")
        words.append(_WN_MARKER.sub("", word).replace("_", " "))
    return words


def merge_synonyms(*sources: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """One table from several (earlier sources first in each word's list; duplicates dropped)."""
    table: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    for src in sources:
        for word, syns in (src or {}).items():
            _add_synonyms(table, seen, word, syns)
    return {k: v for k, v in table.items() if v}


# -- words and glue --------------------------------------------------------------------------------

# A word: letters (any script), with inner apostrophes or hyphens ("don't", "well-known"). Digits,
# punctuation and whitespace are glue. The capture group makes re.split return glue, word, glue, ...
_EN_SPLIT = re.compile(r"([^\W\d_]+(?:['’\-][^\W\d_]+)*)")
_HAS_LETTER = re.compile(r"[^\W\d_]")
# glue that ends a sentence: a newline, or . ! ? (maybe closing quotes/brackets) then whitespace
_SENTENCE_GAP = re.compile(r"(?:\n[^\S\n]*|[.!?][\"'”’)\]]*\s+)$")
_ZH_LANGS = ("zh",)


def _is_zh(lang: str | None) -> bool:
    return bool(lang) and lang.split("-")[0].split("_")[0].lower() in _ZH_LANGS


def split_words(text: str, lang: str = "en") -> tuple[list[str], list[str]]:
    """Split `text` into words and the glue around them: (words, glues), len(glues) == len(words) + 1,
    ``glues[0] + words[0] + glues[1] + ... + words[-1] + glues[-1] == text``.

    en (and any other language but zh): words are runs of letters with inner ' ’ - ; zh: the tokens of
    `jieba.lcut` that contain a letter or ideograph (punctuation, digits and spaces are glue).
    """
    if not _is_zh(lang):
        parts = _EN_SPLIT.split(text)
        return parts[1::2], parts[0::2]
    import jieba  # lazy: ~0.5 s dictionary load on first use

    words: list[str] = []
    glues: list[str] = []
    pending = []
    for tok in jieba.lcut(text):
        if _HAS_LETTER.search(tok):
            glues.append("".join(pending))
            pending = []
            words.append(tok)
        else:
            pending.append(tok)
    glues.append("".join(pending))
    return words, glues


def join_words(words: Sequence[str], glues: Sequence[str]) -> str:
    """Inverse of `split_words`: glues[0] + words[0] + glues[1] + ... + glues[-1]."""
    out = [glues[0]]
    for w, g in zip(words, glues[1:]):
        out.append(w)
        out.append(g)
    return "".join(out)


def _match_case(src: str, word: str) -> str:
    """`word` in the case pattern of `src`: UPPER (two letters or more), Title, or as written."""
    if len(src) > 1 and src.isupper():
        return word.upper()
    if src[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


class _Words:
    """A text as editable words and glue, with the bits of language knowledge the operations need."""

    def __init__(self, text: str, lang: str, stopwords: frozenset[str] | None = None):
        self.words, self.glues = split_words(text, lang)
        self.zh = _is_zh(lang)
        self.sep = "" if self.zh else " "
        if stopwords is None:
            stopwords = ZH_STOPWORDS if self.zh else (EN_STOPWORDS if (lang or "en").startswith("en") else
                                                      frozenset())
        self.stopwords = stopwords
        # lowercase word forms of the untouched text: "It" may lose its capital when moved, "London" not
        self._lower_vocab: frozenset[str] = frozenset() if self.zh else frozenset(
            w for w in self.words if w.islower())

    def text(self) -> str:
        return join_words(self.words, self.glues)

    def copy(self) -> _Words:
        new = copy.copy(self)
        new.words, new.glues = list(self.words), list(self.glues)
        return new

    # sentence-start casing (en only): a word's capital may just mark the start of a sentence
    def starts_sentence(self, i: int) -> bool:
        return i == 0 or bool(_SENTENCE_GAP.search(self.glues[i]))

    def _initial_cap(self, word: str) -> bool:
        """Title-case word whose capital is (plausibly) only there because it starts a sentence."""
        if not (word[:1].isupper() and word[1:] == word[1:].lower()) or word == "I":
            return False
        low = word.lower()
        return low in self.stopwords or low in self._lower_vocab

    def moved_out(self, word: str) -> str:
        """A word leaving a sentence start: drop a capital that only marked the start."""
        return word.lower() if not self.zh and self._initial_cap(word) else word

    def moved_in(self, word: str) -> str:
        return word if self.zh else word[:1].upper() + word[1:]

    def eligible(self, synonyms: dict[str, list[str]]) -> list[int]:
        """Positions of non-stop words that have synonyms."""
        stop = self.stopwords
        out = []
        for i, w in enumerate(self.words):
            low = w.lower()
            if low not in stop and low in synonyms:
                out.append(i)
        return out

    # edits that keep the glue consistent; insertions and deletions rebuild the lists in one pass, so
    # alpha * n edits cost O(n), not O(alpha * n^2) as repeated list.insert / del would
    def insert_many(self, items: Sequence[tuple[int, str]]) -> None:
        """Insert each (pos, word) before original word `pos` (pos == len(words): after the last word),
        separated by `sep`; several words at one position keep their order in `items`."""
        n = len(self.words)
        at: dict[int, list[str]] = {}
        for pos, word in items:
            at.setdefault(pos, []).append(word)
        if n == 0:
            return  # no word to insert next to
        words: list[str] = []
        glues: list[str] = [self.glues[0]]
        for i, w in enumerate(self.words):
            new = at.get(i)
            if new:
                if not self.zh and self.starts_sentence(i) and w[:1].isupper():
                    w = self.moved_out(w)
                    new = [self.moved_in(new[0]), *new[1:]]
                for word in new:
                    words.append(word)
                    glues.append(self.sep)
            words.append(w)
            glues.append(self.glues[i + 1])
        for word in at.get(n, []):
            glues[-1] = self.sep
            words.append(word)
            glues.append(self.glues[n])
        self.words, self.glues = words, glues

    def delete_many(self, doomed: set[int]) -> None:
        """Delete the words at positions `doomed`, merging the glue around each; a sentence start that
        loses its capitalised word passes the capital on to the next surviving word."""
        words: list[str] = []
        glues: list[str] = []
        cur = self.glues[0]
        capital_pending = False
        for i, w in enumerate(self.words):
            initial = not words or bool(_SENTENCE_GAP.search(cur))
            if i in doomed:
                if not self.zh and initial and w[:1].isupper():
                    capital_pending = True
                right = self.glues[i + 1]
                cur = cur + right if self.zh else _merge_glue(cur, right, at_start=not words)
                continue
            if capital_pending and initial:
                w = self.moved_in(w)
            capital_pending = False
            words.append(w)
            glues.append(cur)
            cur = self.glues[i + 1]
        glues.append(cur)
        self.words, self.glues = words, glues

    def swap(self, i: int, j: int) -> None:
        a, b = self.words[i], self.words[j]
        new_i, new_j = b, a
        if not self.zh:
            cap_i = self.starts_sentence(i) and a[:1].isupper()
            cap_j = self.starts_sentence(j) and b[:1].isupper()
            if cap_i and not cap_j:
                new_i, new_j = self.moved_in(b), self.moved_out(a)
            elif cap_j and not cap_i:
                new_i, new_j = self.moved_out(b), self.moved_in(a)
        self.words[i], self.words[j] = new_i, new_j


_CLOSING = tuple(",.;:!?)]}'\"”’…")


def _merge_glue(left: str, right: str, at_start: bool | None = None) -> str:
    """The glue left when the word between `left` and `right` is deleted (en): one space, a newline
    or the punctuation that followed the word, never a doubled space or a space before a comma.
    `at_start`: no word precedes `left` (default: `left` is empty)."""
    if at_start is None:
        at_start = not left
    if at_start and not left.strip():
        return left + right.lstrip(" \t")  # the word began the text (keep its indentation)
    if not right:
        return left.rstrip(" \t")  # the word ended the text
    lt, rt = left.rstrip(" \t"), right.lstrip(" \t")
    if lt.endswith("\n"):
        return left + rt  # the word began a line: keep that line's indentation
    if rt.startswith(("\n", "\r")) or rt.startswith(_CLOSING):
        return lt + rt
    spaced = len(lt) < len(left) or len(rt) < len(right)
    return lt + (" " if spaced else "") + rt


# -- the four EDA operations -----------------------------------------------------------------------


def _as_words(text: str | _Words, lang: str, stopwords: frozenset[str] | None) -> _Words:
    return text.copy() if isinstance(text, _Words) else _Words(text, lang, stopwords)


def synonym_replace(text: str | _Words, rng: random.Random, synonyms: dict[str, list[str]], alpha: float = 0.1,
                    lang: str = "en", stopwords: frozenset[str] | None = None) -> str:
    """EDA SR: replace n = max(1, int(alpha * words)) distinct word positions, drawn among non-stop words
    that have synonyms (all of them when fewer), each by a random synonym in the word's case.
    `synonyms` maps lowercased words to synonym lists (`load_synonym_dict` / `load_wordnet`)."""
    w = _as_words(text, lang, stopwords)
    eligible = w.eligible(synonyms)
    n = n_changes(len(w.words), alpha)
    for i in rng.sample(eligible, min(n, len(eligible))):
        src = w.words[i]
        syn = rng.choice(synonyms[src.lower()])
        w.words[i] = syn if w.zh else _match_case(src, syn)
    return w.text()


def random_insert(text: str | _Words, rng: random.Random, synonyms: dict[str, list[str]], alpha: float = 0.1,
                  lang: str = "en", stopwords: frozenset[str] | None = None) -> str:
    """EDA RI: n = max(1, int(alpha * words)) times, insert a random synonym of a random non-stop word
    (one that has synonyms) at a random gap of the original text, before word 0..len(words)-1 or after
    the last (EDA draws positions in the growing list; gaps of the original keep it O(words)).
    No eligible word: text unchanged."""
    w = _as_words(text, lang, stopwords)
    eligible = w.eligible(synonyms)
    if not eligible:
        return w.text()
    n = n_changes(len(w.words), alpha)
    # positions are indices into the original words: insertions shift them, so map through `pool`
    pool = [w.words[i] for i in eligible]
    n_words = len(w.words)
    items = []
    for _ in range(n):
        src = rng.choice(pool)
        items.append((rng.randint(0, n_words), rng.choice(synonyms[src.lower()])))
    w.insert_many(items)
    return w.text()


def random_swap(text: str | _Words, rng: random.Random, alpha: float = 0.1, lang: str = "en") -> str:
    """EDA RS: n = max(1, int(alpha * words)) times, swap the words at two distinct random positions
    (the glue stays put). Fewer than two words: unchanged."""
    w = _as_words(text, lang, None)
    n_words = len(w.words)
    if n_words < 2:
        return w.text()
    for _ in range(n_changes(n_words, alpha)):
        i, j = rng.sample(range(n_words), 2)
        w.swap(i, j)
    return w.text()


def random_delete(text: str | _Words, rng: random.Random, p: float = 0.1, lang: str = "en") -> str:
    """EDA RD: delete each word with probability p; if that would delete all, keep one random word
    (so a text with words never loses all of them). The glue around a deleted word merges."""
    w = _as_words(text, lang, None)
    n_words = len(w.words)
    if n_words == 0:
        return w.text()
    doomed = {i for i in range(n_words) if rng.random() < p}
    if len(doomed) == n_words:
        doomed.remove(rng.randrange(n_words))
    w.delete_many(doomed)
    return w.text()


# -- back-translation ------------------------------------------------------------------------------


class Seq2SeqEngine(Protocol):
    """What `BackTranslator` needs from one translation direction (tests and custom engines implement
    it too): token counts of texts, and greedy translations of a batch."""

    def count_tokens(self, texts: list[str]) -> list[int]: ...

    def generate(self, texts: list[str], max_input_tokens: int, max_new_tokens: int) -> list[str]: ...


class HFSeq2Seq:
    """A local Hugging Face seq2seq model directory (AutoTokenizer + AutoModelForSeq2SeqLM, loaded with
    local_files_only=True: nothing is downloaded). `prefix` is prepended to every input (T5 task
    prefixes such as ``"translate English to German: "``; Marian opus-mt models need none).
    Needs `transformers` (llmkit's dev extra)."""

    def __init__(self, path: str | Path, device: str = "cpu", prefix: str = ""):
        try:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("back-translation kind 'hf' needs transformers (pip install transformers)") from e
        self.device, self.prefix = device, prefix
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(str(path), local_files_only=True).to(device).eval()
        # the prefix and the tokenizer's own special tokens (T5's </s>) ride on top of the input budget
        self._overhead = len(self.tokenizer(prefix)["input_ids"])

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def generate(self, texts: list[str], max_input_tokens: int, max_new_tokens: int) -> list[str]:
        import torch

        enc = self.tokenizer([self.prefix + t for t in texts], return_tensors="pt", padding=True,
                             truncation=True, max_length=max_input_tokens + self._overhead)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class LlmkitSeq2Seq:
    """An llmkit encoder-decoder model directory (`llmkit.models.io.save_model` layout: config.json with
    family encdec, model.safetensors, tokenizer.json). Inputs are `prefix + text` encoded with EOS
    appended (T5's framing); decoding is greedy (`EncoderDecoder.generate`) and stops at the
    generation config's eos_token_id."""

    def __init__(self, path: str | Path, device: str = "cpu", prefix: str = ""):
        from llmkit.models.encdec import EncoderDecoder
        from llmkit.models.io import load_generation_config, load_model
        from llmkit.tokenizer import Tokenizer

        self.device, self.prefix = device, prefix
        self.model = load_model(path, device=device)
        if not isinstance(self.model, EncoderDecoder):
            raise ValueError(f"{path}: back-translation needs an encoder-decoder model (family encdec), got "
                             f"{type(self.model).__name__}")
        self.tokenizer = Tokenizer.load(path)
        gen = load_generation_config(path)
        self.eos_id = int(gen.get("eos_token_id", self.tokenizer.eos_id))
        self.pad_id = int(self.model.config.pad_token_id)
        self._prefix_ids = self.tokenizer.encode(prefix) if prefix else []

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer.encode_batch(list(texts))]

    def generate(self, texts: list[str], max_input_tokens: int, max_new_tokens: int) -> list[str]:
        import torch

        rows = [self._prefix_ids + ids[:max_input_tokens] + [self.eos_id]
                for ids in self.tokenizer.encode_batch(list(texts))]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[k, :len(r)] = 1
        out = self.model.generate(ids.to(self.device), mask.to(self.device), max_new_tokens=max_new_tokens,
                                  eos_id=self.eos_id).tolist()
        texts_out = []
        for row in out:
            if self.eos_id in row:
                row = row[:row.index(self.eos_id)]
            texts_out.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts_out


# sentence ends: . ! ? (maybe a closing quote/bracket) then whitespace; 。！？ (maybe a closing quote)
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)\]])\s+")
_SENT_SPLIT_ZH = re.compile(r"(?<=[。！？!?；])(?![”」』\"'])\s*|(?<=[。！？!?；][”」』\"'])\s*")


class BackTranslator:
    """Paraphrase texts by translating them into a pivot language and back (greedy decoding).

    Args:
        forward: model translating the texts' language into the pivot: a model directory, or an object
            with `count_tokens` / `generate` (`Seq2SeqEngine`).
        backward: model translating the pivot back.
        kind: ``"hf"`` (local transformers seq2seq model, `HFSeq2Seq`) or ``"llmkit"`` (llmkit
            encoder-decoder directory, `LlmkitSeq2Seq`); ignored for engine objects.
        lang: language of the texts: sentence splitting and the joiner between translated sentences
            (" " for en and other space-delimited languages, "" for zh).
        max_input_tokens: longest model input (tokens, prefix excluded); longer sentences are cut into
            pieces that fit, at spaces (at characters for zh).
        max_new_tokens: longest translation of one sentence or piece (tokens).
        batch_size: sentences per generate call.
        device: torch device for the models.
        forward_prefix / backward_prefix: text prepended to each model input (T5 task prefixes).

    `translate(texts)` keeps each text's lines (blank lines and indentation included); every non-blank
    line is split into sentences, identical sentences across the whole batch are translated once, and
    the units are length-sorted before batching so padding stays small. Greedy decoding makes the
    result deterministic.
    """

    def __init__(self, forward: str | Path | Seq2SeqEngine, backward: str | Path | Seq2SeqEngine,
                 kind: str = "hf", lang: str = "en", max_input_tokens: int = 256, max_new_tokens: int = 256,
                 batch_size: int = 16, device: str = "cpu", forward_prefix: str = "",
                 backward_prefix: str = ""):
        if kind not in ("hf", "llmkit"):
            raise ValueError(f"kind: must be 'hf' or 'llmkit', got {kind!r}")
        if min(max_input_tokens, max_new_tokens, batch_size) < 1:
            raise ValueError("max_input_tokens, max_new_tokens and batch_size must be >= 1")
        engine_cls = HFSeq2Seq if kind == "hf" else LlmkitSeq2Seq
        self.forward = forward if hasattr(forward, "generate") else engine_cls(forward, device, forward_prefix)
        self.backward = backward if hasattr(backward, "generate") else engine_cls(backward, device,
                                                                                  backward_prefix)
        self.lang, self.zh = lang, _is_zh(lang)
        self.joiner = "" if self.zh else " "
        self.max_input_tokens, self.max_new_tokens, self.batch_size = max_input_tokens, max_new_tokens, batch_size

    def translate(self, texts: Sequence[str]) -> list[str]:
        """Back-translate each text: list of N strings -> list of N strings (same order)."""
        if isinstance(texts, str):
            raise TypeError("translate expects a list of texts, not a single string")
        # layout[t] = list of lines; a line is (lead, [sentences], trail) or a blank-line string
        layouts = []
        sentences: dict[str, None] = {}
        for text in texts:
            lines = []
            for line in text.split("\n"):
                body = line.strip()
                if not body:
                    lines.append(line)
                    continue
                lead = line[:len(line) - len(line.lstrip())]
                trail = line[len(line.rstrip()):]
                sents = [s for s in (_SENT_SPLIT_ZH if self.zh else _SENT_SPLIT).split(body) if s]
                for s in sents:
                    sentences.setdefault(s, None)
                lines.append((lead, sents, trail))
            layouts.append(lines)
        units = self._units(list(sentences))
        flat = sorted({u for pieces in units.values() for u in pieces})
        pivot = self._run(self.forward, flat, by_tokens=True)
        back_in = sorted(set(pivot.values()))
        back = self._run(self.backward, back_in, by_tokens=False)
        done = {s: self.joiner.join(back[pivot[p]] for p in pieces) for s, pieces in units.items()}
        out = []
        for lines in layouts:
            rendered = []
            for line in lines:
                if isinstance(line, str):
                    rendered.append(line)
                else:
                    lead, sents, trail = line
                    rendered.append(lead + self.joiner.join(done[s] for s in sents).strip() + trail)
            out.append("\n".join(rendered))
        return out

    def _units(self, sentences: list[str]) -> dict[str, list[str]]:
        """Sentence -> the pieces it is translated in: itself, or pieces of <= max_input_tokens tokens."""
        units: dict[str, list[str]] = {}
        if not sentences:
            return units
        counts = self.forward.count_tokens(sentences)
        for s, n in zip(sentences, counts):
            units[s] = [s] if n <= self.max_input_tokens else self._split_long(s, n)
        return units

    def _split_long(self, sentence: str, n_tokens: int) -> list[str]:
        """Cut a too-long sentence into ceil(n / limit) pieces of about equal length at spaces (zh: at
        characters), re-cutting any piece that still does not fit; a single word that alone exceeds the
        budget is left to the tokenizer's truncation."""
        k = math.ceil(n_tokens / self.max_input_tokens)
        atoms = list(sentence) if self.zh else sentence.split()
        if len(atoms) <= 1:
            return [sentence]
        k = min(k, len(atoms))
        size = math.ceil(len(atoms) / k)
        sep = "" if self.zh else " "
        pieces = [sep.join(atoms[i:i + size]) for i in range(0, len(atoms), size)]
        out = []
        for piece, n in zip(pieces, self.forward.count_tokens(pieces)):
            out.extend([piece] if n <= self.max_input_tokens or len(piece) >= len(sentence)
                       else self._split_long(piece, n))
        return out

    def _run(self, engine: Seq2SeqEngine, texts: list[str], by_tokens: bool) -> dict[str, str]:
        """Translate unique `texts` in length-sorted batches: {text: translation}."""
        if not texts:
            return {}
        lengths = engine.count_tokens(texts) if by_tokens else [len(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: (-lengths[i], texts[i]))
        result: dict[str, str] = {}
        for b in range(0, len(order), self.batch_size):
            batch = [texts[i] for i in order[b:b + self.batch_size]]
            outs = engine.generate(batch, self.max_input_tokens, self.max_new_tokens)
            if len(outs) != len(batch):
                raise RuntimeError(f"translation engine returned {len(outs)} outputs for {len(batch)} inputs")
            result.update(zip(batch, outs))
        return result


# -- config and the pipeline step ------------------------------------------------------------------


@dataclass
class BackTranslationConfig:
    forward: str | None = None
    """Model translating `lang` into the pivot language: a local HF seq2seq directory (kind hf) or an
    llmkit encoder-decoder model directory (kind llmkit)."""
    backward: str | None = None
    """Model translating the pivot language back into `lang`."""
    kind: Literal["hf", "llmkit"] = "hf"
    """`hf`: transformers AutoModelForSeq2SeqLM (e.g. a Marian opus-mt pair; needs transformers);
    `llmkit`: llmkit encoder-decoder directories."""
    lang: str = "en"
    """The language the models translate from (and back into): only documents in it are back-translated."""
    forward_prefix: str = ""
    """Prepended to every forward input (T5 task prefix, e.g. "translate English to German: ")."""
    backward_prefix: str = ""
    max_input_tokens: int = 256
    """Longest model input (tokens); longer sentences are translated in pieces."""
    max_new_tokens: int = 256
    """Longest translation of one sentence or piece (tokens)."""
    batch_size: int = 16
    """Sentences per generate call."""
    device: str = "cpu"
    """torch device for both models."""

    def validate(self) -> None:
        for name in ("max_input_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lang:
            raise ValueError("lang: must name the models' language, e.g. 'en'")


def _default_methods() -> list[str]:
    return list(EDA_METHODS)


@dataclass
class AugmentConfig:
    enabled: bool = False
    """Run the augmentation step (after mixing; originals are kept, augmented copies are added)."""
    methods: list[Method] = field(default_factory=_default_methods)
    """Operations, each applied separately: synonym_replace, random_insert, random_swap, random_delete
    (EDA) and back_translate."""
    alpha: float = 0.1
    """EDA's alpha: an operation changes n = max(1, int(alpha * words)) words (0.05-0.1 for large data
    in the paper)."""
    p_delete: float | None = None
    """Deletion probability of random_delete; None -> alpha (as the paper)."""
    copies: int = 1
    """Augmented copies per original document PER METHOD (EDA's n_aug split evenly over its methods):
    with 4 methods and copies 2 a document yields up to 8 new ones. back_translate is greedy and so
    deterministic: it yields at most one copy whatever this says."""
    fraction: float = 1.0
    """Share of eligible documents that are augmented, picked by a stable hash of (seed, id)."""
    domains: list[str] = field(default_factory=list)
    """Augment only documents of these domains; empty = all domains."""
    langs: list[str] = field(default_factory=lambda: ["en", "zh"])
    """Augment only documents in these languages (doc["lang"]); empty = any language. zh is segmented
    with jieba; every other language is split at non-letters (stop words: en and zh lists only)."""
    synonyms: str | None = None
    """Synonym dictionary file (`load_synonym_dict` format: "word<TAB>syn1 syn2" per line)."""
    symmetric_synonyms: bool = False
    """Read each dictionary line as a group of mutual synonyms."""
    wordnet: str | None = None
    """Princeton WordNet 3.0 database directory (data.noun ...), typically /usr/share/wordnet (Debian
    wordnet-base). Used beside `synonyms` when both are set."""
    back_translation: BackTranslationConfig = field(default_factory=BackTranslationConfig)
    """Models for back_translate (a plain section rather than `| None`: llmkit.config then reports a
    bad value inside it by its own key, e.g. back_translation.batch_size)."""
    seed: int = 0
    """With the document id, fixes every random choice."""

    def validate(self) -> None:
        if not self.methods:
            raise ValueError("methods: list at least one of " + ", ".join(METHODS))
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"methods: {m!r} is not one of {list(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: duplicates in {self.methods}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha: must be in (0, 1], got {self.alpha}")
        if self.p_delete is not None and not 0.0 < self.p_delete < 1.0:
            raise ValueError(f"p_delete: must be in (0, 1), got {self.p_delete}")
        if self.copies < 1:
            raise ValueError(f"copies: must be >= 1, got {self.copies}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction: must be in (0, 1], got {self.fraction}")
        if not self.enabled:
            return  # sources are only needed (and checked) when the step runs
        if any(m in SYNONYM_METHODS for m in self.methods):
            if not self.synonyms and not self.wordnet:
                raise ValueError("synonyms: synonym_replace and random_insert need a synonym source: set "
                                 "synonyms (a dictionary file) and/or wordnet (e.g. /usr/share/wordnet)")
            if self.synonyms and not Path(self.synonyms).is_file():
                raise ValueError(f"synonyms: {self.synonyms} is not a file")
            if self.wordnet and not (Path(self.wordnet) / "data.noun").is_file():
                raise ValueError(f"wordnet: {self.wordnet} has no data.noun (Debian: apt-get install "
                                 f"wordnet-base)")
        if "back_translate" in self.methods:
            bt = self.back_translation
            if not bt.forward or not bt.backward:
                raise ValueError("back_translation: back_translate needs back_translation.forward and "
                                 ".backward model directories")
            for name in ("forward", "backward"):
                if not Path(getattr(bt, name)).is_dir():
                    raise ValueError(f"back_translation.{name}: {getattr(bt, name)} is not a directory")


class Augmenter:
    """The augmentation step: `augmenter(doc) -> list of new documents` (the original is not touched).

    Each new document is a deep copy of the original with
    ``id = f"{id}#aug-{method}-{k}"`` (k = copy index, 0-based), the augmented text, and
    ``augmented = {"method": method, "of": original id}``. A copy whose text equals the original's
    (e.g. no word had a synonym) or is blank is not returned. Documents outside `domains` / `langs`,
    without text, or not picked by `fraction` yield []. `augment_batch(docs)` does the same for many
    documents and back-translates them in shared batches.

    `counts` (a Counter) records: docs, eligible, "<method>.generated", "<method>.identical" (copies
    skipped for being unchanged), "back_translate.empty". Each process has its own Augmenter: sum
    the counters. Synonym tables and models load on first use and are not pickled.
    """

    def __init__(self, cfg: AugmentConfig):
        cfg.validate()
        self.cfg = cfg
        self.counts: Counter[str] = Counter()
        self._synonyms: dict[str, list[str]] | None = None
        self._translator: BackTranslator | None = None
        self._domains = frozenset(cfg.domains)
        self._langs = frozenset(cfg.langs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_synonyms"] = None
        state["_translator"] = None
        return state

    # lazy resources
    @property
    def synonyms(self) -> dict[str, list[str]]:
        if self._synonyms is None:
            cfg = self.cfg
            own = load_synonym_dict(cfg.synonyms, cfg.symmetric_synonyms) if cfg.synonyms else None
            wn = load_wordnet(cfg.wordnet) if cfg.wordnet else None
            self._synonyms = merge_synonyms(own, wn) if own and wn else (own or wn or {})
        return self._synonyms

    @property
    def translator(self) -> BackTranslator:
        if self._translator is None:
            bt = self.cfg.back_translation
            if not bt.forward or not bt.backward:
                raise ValueError("back_translate needs back_translation.forward and .backward")
            self._translator = BackTranslator(bt.forward, bt.backward, kind=bt.kind, lang=bt.lang,
                                              max_input_tokens=bt.max_input_tokens,
                                              max_new_tokens=bt.max_new_tokens, batch_size=bt.batch_size,
                                              device=bt.device, forward_prefix=bt.forward_prefix,
                                              backward_prefix=bt.backward_prefix)
        return self._translator

    def eligible(self, doc: dict[str, Any]) -> bool:
        """Whether `doc` is augmented at all (domain, language, non-blank text, `fraction`)."""
        cfg = self.cfg
        if self._domains and doc.get("domain") not in self._domains:
            return False
        lang = doc.get("lang")
        if self._langs and lang not in self._langs:
            return False
        text = doc.get("text")
        if not isinstance(text, str) or not text.strip():
            return False
        return cfg.fraction >= 1.0 or _stable_unit(cfg.seed, doc["id"], "select") < cfg.fraction

    def __call__(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        return self.augment_batch([doc])

    def augment_batch(self, docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """New documents for every doc of `docs`, in input order (per doc: methods in config order,
        copies in index order). Back-translation runs once over all eligible documents."""
        cfg = self.cfg
        picked = []
        for doc in docs:
            self.counts["docs"] += 1
            if self.eligible(doc):
                self.counts["eligible"] += 1
                picked.append(doc)
        back: dict[int, str] = {}
        if "back_translate" in cfg.methods:
            bt_lang = cfg.back_translation.lang
            todo = [k for k, d in enumerate(picked) if d.get("lang") == bt_lang]
            if todo:
                outs = self.translator.translate([picked[k]["text"] for k in todo])
                back = dict(zip(todo, outs))
        out: list[dict[str, Any]] = []
        for k, doc in enumerate(picked):
            out.extend(self._augment_one(doc, back.get(k)))
        return out

    def _augment_one(self, doc: dict[str, Any], back_translated: str | None) -> list[dict[str, Any]]:
        cfg = self.cfg
        text, lang = doc["text"], doc.get("lang") or "en"
        words = None
        new = []
        for method in cfg.methods:
            if method == "back_translate":
                if back_translated is None:
                    continue
                if not back_translated.strip():
                    self.counts["back_translate.empty"] += 1
                    continue
                candidates = [back_translated]
            else:
                if words is None:
                    words = _Words(text, lang)  # segment once (jieba is the slow part), copy per op
                candidates = [self._eda(method, words, doc["id"], k, lang) for k in range(cfg.copies)]
            for k, aug in enumerate(candidates):
                if aug == text:
                    self.counts[f"{method}.identical"] += 1
                    continue
                self.counts[f"{method}.generated"] += 1
                new.append(self._new_doc(doc, method, k, aug))
        return new

    def _eda(self, method: str, words: _Words, doc_id: str, k: int, lang: str) -> str:
        cfg = self.cfg
        rng = random.Random(stable_seed(cfg.seed, doc_id, method, k))
        if method == "synonym_replace":
            return synonym_replace(words, rng, self.synonyms, cfg.alpha, lang)
        if method == "random_insert":
            return random_insert(words, rng, self.synonyms, cfg.alpha, lang)
        if method == "random_swap":
            return random_swap(words, rng, cfg.alpha, lang)
        return random_delete(words, rng, cfg.alpha if cfg.p_delete is None else cfg.p_delete, lang)

    @staticmethod
    def _new_doc(doc: dict[str, Any], method: str, k: int, text: str) -> dict[str, Any]:
        new = {key: copy.deepcopy(value) for key, value in doc.items() if key != "text"}
        new["id"] = f"{doc['id']}#aug-{method}-{k}"
        new["text"] = text
        new["augmented"] = {"method": method, "of": doc["id"]}
        return new
