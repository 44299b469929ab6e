"""Answer metrics of instruction tuning: `exact_match` (SQuAD-style) and `rouge_l` (LCS F1), both
Unicode-aware: CJK text is compared character by character, other scripts word by word.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

__all__ = ["exact_match", "rouge_l"]

# CJK ideographs (BMP + extension A, compatibility, astral extensions B..) and Japanese kana: scripts
# written without spaces, compared character by character. Hangul is written with spaces: words.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\U00020000-\U0003134f"
_TOKEN = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_])+")
_ARTICLES = {"a", "an", "the"}


def _tokens(text: str) -> list[str]:
    """Lowercased words (letters/digits runs) and single CJK characters; punctuation and spaces dropped."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when `pred` and `ref` are the same answer after SQuAD-style normalization, else 0.0.

    Normalization (Rajpurkar et al. 2016, extended to Unicode): NFKC, lowercase, punctuation and whitespace
    ignored, English articles a/an/the dropped; CJK compared character by character.
    """
    a = [t for t in _tokens(pred) if t not in _ARTICLES]
    b = [t for t in _tokens(ref) if t not in _ARTICLES]
    return float(a == b)


def _lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison & Dix 1986; Hyyroe 2004).

    One big-integer bit per element of `a`: each element of `b` costs O(len(a)/64) machine words,
    instead of the O(len(a)) Python steps of the dynamic programme.
    """
    if not a or not b:
        return 0
    match: dict[str, int] = {}
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (Lin 2004): LCS-based precision P = lcs/len(pred), recall R = lcs/len(ref), F = 2PR/(P+R).

    Tokens as in `exact_match` but articles kept: words for space-separated scripts, single characters for
    CJK. An empty prediction or reference scores 0.0 (as Google's rouge-score package).
    """
    p, r = _tokens(pred), _tokens(ref)
    lcs = _lcs_len(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)
