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

Synonyms come from a plain dictionary file and/or the Princeton WordNet 3.0 database files
(`llmkit.data.synonyms`: words that share a synset are synonyms, as EDA's WordNet lookup).

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
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmkit.data.backtranslate import (  # noqa: F401 - re-exported: part of the augment API
    BackTranslationConfig,
    BackTranslator,
    HFSeq2Seq,
    LlmkitSeq2Seq,
    Seq2SeqEngine,
)
from llmkit.data.synonyms import (  # noqa: F401 - re-exported
    WORDNET_FILES,
    load_synonym_dict,
    load_wordnet,
    merge_synonyms,
)

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


# -- config and the pipeline step ------------------------------------------------------------------


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
