"""Synonym sources for augmentation (EDA's synonym replacement and insertion): a plain dictionary file
and the Princeton WordNet 3.0 database files (words that share a synset are synonyms, as EDA's lookup).

Dictionary format (`load_synonym_dict`): UTF-8, one group per line, `word<TAB>syn1 syn2 ...` or
`word syn1 syn2 ...`; `_` stands for a space inside a synonym; `#` starts a comment.
WordNet (`load_wordnet`): the data.noun / data.verb / data.adj / data.adv files as Debian's
`wordnet-base` ships them (/usr/share/wordnet), parsed from their documented line format (wndb(5)).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

_HAS_LETTER = re.compile(r"[^\W\d_]")



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
