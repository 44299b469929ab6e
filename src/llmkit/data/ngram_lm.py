"""An interpolated modified Kneser-Ney n-gram language model in numpy (the data pipeline's default
perplexity scorer; `llmkit.data.perplexity` puts it behind the common scorer interface).

Chen & Goodman 1998, "An Empirical Study of Smoothing Techniques for Language Modeling", §3-4: the same
estimator as KenLM's lmplz (Heafield et al. 2013). Unit: characters (works for zh and en with no
tokenizer) or whitespace words. Every document is one sequence `<s> t1 .. tn </s>`; its perplexity is
exp(-(1/(n+1)) sum ln p(t_i | history)), `</s>` included, as in SRILM and KenLM. Unseen tokens map to
`<unk>`, which gets the uniform share of the unigram level's backoff mass.

How it stays fast (numpy only, no per-character Python loop): n-grams are stored as a trie flattened
into one open-addressing hash table per order. The key of an order-k n-gram `h w` is
`(slot of h in the order-(k-1) table) << 24 | id(w)`, so keys are exact (no hash collisions can merge two
n-grams) and a whole batch of documents is scored with one vectorised lookup per order: the order-k
n-gram ending at position i extends the order-(k-1) one ending at i-1. Each slot holds the n-gram's
discounted probability u(w|h) and its interpolation weight gamma(h w) as a context, so
p_k = u_k + gamma_{k-1} * p_{k-1} is evaluated for all positions at once.

Interpolated KN written as ARPA (`NgramLM.to_arpa`): the stored probability of a seen n-gram is its full
interpolated probability and the backoff weight of a context is its gamma, as SRILM and lmplz write
interpolated models; KenLM then reproduces `NgramLM`'s scores exactly (tests/test_perplexity.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

FORMAT_VERSION = 1
_TOK_BITS = 24  # token ids live in the low bits of a trie key; the parent slot id above them
_TOK_MASK = (1 << _TOK_BITS) - 1
_MAX_VOCAB = _TOK_MASK - 4
_EMPTY = -1  # empty hash slot; real keys are >= 0
_FIB = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio (Fibonacci hashing, Knuth TAOCP 6.4)
_CHUNK_CHARS = 1 << 20  # characters scored per numpy batch: bounds memory, keeps arrays in cache-ish sizes


# -- hash table ------------------------------------------------------------------------------------


class _Table:
    """Open-addressing (linear probing) table of distinct non-negative int64 keys; `slot` is the id.

    Load factor between 0.25 and 0.5, so a lookup costs ~1.2-1.5 probes for a hit, ~1.4-2.5 for a miss.
    """

    def __init__(self, keys: np.ndarray):
        self.keys = keys  # (2^m,) int64, _EMPTY where free
        self._shift = np.uint64(64 - int(len(keys)).bit_length() + 1)

    @classmethod
    def build(cls, keys: np.ndarray) -> tuple[_Table, np.ndarray]:
        """Table holding `keys` (distinct, >= 0) and each key's slot: (table, slots (len(keys),) int64)."""
        m = max(4, int(math.ceil(math.log2(max(1, len(keys)) * 2))))
        table = cls(np.full(1 << m, _EMPTY, dtype=np.int64))
        mask = (1 << m) - 1
        slots = table._home(keys)
        where = np.full(len(keys), -1, dtype=np.int64)
        pending = np.arange(len(keys))
        while pending.size:
            s = slots[pending]
            free = table.keys[s] == _EMPTY
            cand, cs = pending[free], s[free]
            # Several keys may race for one free slot: one write wins, the rest probe on.
            table.keys[cs] = keys[cand]
            won = table.keys[cs] == keys[cand]
            where[cand[won]] = cs[won]
            placed = np.zeros(len(pending), dtype=bool)
            placed[np.flatnonzero(free)[won]] = True
            pending = pending[~placed]
            slots[pending] = (slots[pending] + 1) & mask
        return table, where

    def _home(self, q: np.ndarray) -> np.ndarray:
        return ((q.view(np.uint64) * _FIB) >> self._shift).view(np.int64)

    def lookup(self, q: np.ndarray) -> np.ndarray:
        """Slots of the int64 keys `q` (any shape 1-D), -1 where absent."""
        mask = len(self.keys) - 1
        s = self._home(q)
        v = np.take(self.keys, s)  # np.take: several times faster than fancy indexing
        hit = v == q
        out = np.where(hit, s, -1)
        todo = np.flatnonzero(~hit & (v != _EMPTY))
        while todo.size:
            s_t = (s[todo] + 1) & mask
            v = np.take(self.keys, s_t)
            hit = v == q[todo]
            out[todo[hit]] = s_t[hit]
            keep = ~hit & (v != _EMPTY)
            s[todo[keep]] = s_t[keep]
            todo = todo[keep]
        return out


# -- tokens ------------------------------------------------------------------------------------------


def _codepoints(text: str) -> np.ndarray:
    # surrogatepass: a lone surrogate (legal in a JSON string) is one code point, as len() counts it
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _arpa_char(c: str) -> str:
    return c if c.isprintable() and not c.isspace() else f"<U+{ord(c):04X}>"


def arpa_chars(text: str) -> str:
    """`text` as space-separated characters, the way `NgramLM.to_arpa` names them (char unit).

    Whitespace and non-printable characters become `<U+XXXX>` (they would split or vanish in ARPA and
    KenLM's whitespace tokenisation): "a b" -> "a <U+0020> b". Feed this to KenLM (`KenLMScorer` does).
    """
    return " ".join(_arpa_char(c) for c in text)


def _frame(ids: np.ndarray, lens: np.ndarray, bos: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated token ids + per-document lengths -> `<s> doc </s> <s> doc </s> ...`, BOS positions."""
    total = len(ids) + 2 * len(lens)
    starts = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1] + 2, out=starts[1:])
    seq = np.empty(total, dtype=np.int64)
    inner = np.ones(total, dtype=bool)
    ends = starts + lens + 1
    inner[starts] = False
    inner[ends] = False
    seq[starts] = bos
    seq[ends] = eos
    seq[inner] = ids
    return seq, starts


def _discounts(a: np.ndarray) -> tuple[float, float, float]:
    """Modified-KN discounts D1, D2, D3+ from the count-of-counts of adjusted counts `a` (Chen & Goodman
    1998, eq. 26). Falls back to (0.5, 1.0, 1.5) when a count-of-count is zero or a value leaves (0, j):
    tiny corpora only, where any valid discount keeps the model normalised."""
    t = [int(np.count_nonzero(a == j)) for j in (1, 2, 3, 4)]
    if min(t) == 0:
        return 0.5, 1.0, 1.5
    y = t[0] / (t[0] + 2 * t[1])
    d = (1 - 2 * y * t[1] / t[0], 2 - 3 * y * t[2] / t[1], 3 - 4 * y * t[3] / t[2])
    if not all(0 < dj < j for j, dj in zip((1, 2, 3), d)):
        return 0.5, 1.0, 1.5
    return d


# -- n-gram model ----------------------------------------------------------------------------------


class NgramLM:
    """Interpolated modified Kneser-Ney n-gram LM over characters or whitespace words.

    Build with `NgramLM.train(texts)` or `NgramLM.load(path)`. Token ids: `0..n-1` the vocabulary
    (sorted code points, or sorted words), then `</s>` = n, `<s>` = n+1, `<unk>` = n+2. The predicted
    vocabulary is the n known tokens + `</s>` + `<unk>`; `<s>` is only ever a context.
    """

    def __init__(self, *, unit: str, order: int, vocab, uni: np.ndarray, tables: list[_Table],
                 vals: list[np.ndarray], gamma0: float, meta: dict):
        self.unit = unit
        self.order = order
        self.vocab = vocab  # np.ndarray of code points (char) or list[str] (word)
        self.n = len(vocab)
        self.eos, self.bos, self.unk = self.n, self.n + 1, self.n + 2
        self._uni = np.ascontiguousarray(uni, dtype=np.float32)  # (n+3, 2): [u(w), gamma(w as context)]
        self._tables = tables  # orders 2..N
        vals = [np.ascontiguousarray(v, dtype=np.float32) for v in vals]
        self._vals = vals  # per table: (slots + 1, 2) float32, last row (0, 1) = "not found"
        # The same rows as one uint64 each: a 1-D np.take gathers (u, gamma) pairs ~10x faster than vals[idx]
        self._rows = [v.view(np.uint64).reshape(-1) for v in vals]
        self.gamma0 = float(gamma0)
        self.n_predicted = self.n + 2  # |V| of the uniform distribution: vocabulary + </s> + <unk>
        self.meta = meta
        if unit == "char":
            top = int(vocab.max()) + 1 if len(vocab) else 0
            self._cmap = np.full(top + 1, self.unk, dtype=np.int64)  # last entry: beyond the vocabulary
            self._cmap[vocab] = np.arange(self.n)
        else:
            self._index = {w: i for i, w in enumerate(vocab)}

    # -- tokens ------------------------------------------------------------------------------------

    def _ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of all texts concatenated, and each text's token count."""
        if self.unit == "char":
            lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
            cp = _codepoints("".join(texts))
            return self._cmap[np.minimum(cp, len(self._cmap) - 1)], lens
        get, unk = self._index.get, self.unk
        words = [t.split() for t in texts]
        lens = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
        ids = np.fromiter((get(w, unk) for ws in words for w in ws), dtype=np.int64, count=int(lens.sum()))
        return ids, lens

    def token_count(self, text: str) -> int:
        """Predicted tokens of `text`: characters (or words) + 1 for `</s>`."""
        return (len(text) if self.unit == "char" else len(text.split())) + 1

    # -- training ----------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], order: int = 5, unit: Literal["char", "word"] = "char",
              max_chars: int | None = None) -> NgramLM:
        """Count n-grams of `texts` and estimate an interpolated modified-KN model.

        Args:
            texts: training documents (streamed; each is one `<s> ... </s>` sequence).
            order: n, the longest n-gram (default 5, as cc_net's KenLM models).
            unit: "char" (code points) or "word" (`str.split()` tokens; not for unsegmented zh/ja).
            max_chars: stop reading once this many characters were taken (the last text is cut).
        Peak memory is ~85 bytes per training character (20M characters -> ~1.5 GB).
        """
        if unit not in ("char", "word"):
            raise ValueError(f"unit: expected 'char' or 'word', got {unit!r}")
        if not 1 <= order <= 12:
            raise ValueError(f"order: expected 1..12, got {order}")
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not a single string; wrap it in a list")
        docs, taken = [], 0
        for t in texts:
            if max_chars is not None and taken + len(t) > max_chars:
                t = t[:max_chars - taken]
            docs.append(t)
            taken += len(t)
            if max_chars is not None and taken >= max_chars:
                break
        if not docs:
            raise ValueError("NgramLM.train: no training texts")
        if unit == "char":
            cp = _codepoints("".join(docs)).astype(np.int64)
            vocab, ids = np.unique(cp, return_inverse=True)
            lens = np.fromiter((len(t) for t in docs), dtype=np.int64, count=len(docs))
        else:
            words = [t.split() for t in docs]
            vocab = sorted({w for ws in words for w in ws})
            index = {w: i for i, w in enumerate(vocab)}
            lens = np.fromiter((len(ws) for ws in words), dtype=np.int64, count=len(words))
            ids = np.fromiter((index[w] for ws in words for w in ws), dtype=np.int64, count=int(lens.sum()))
        n = len(vocab)
        if n > _MAX_VOCAB:
            raise ValueError(f"vocabulary of {n} {unit}s exceeds {_MAX_VOCAB}")
        seq, _ = _frame(ids.astype(np.int64), lens, bos=n + 1, eos=n)
        del ids
        model = cls._estimate(seq, n, order, unit, vocab)
        model.meta.update(train_docs=len(docs), train_chars=taken, train_tokens=int(lens.sum()))
        return model

    @classmethod
    def _estimate(cls, seq: np.ndarray, n: int, order: int, unit: str, vocab) -> NgramLM:
        bos, unk = n + 1, n + 2
        is_bos = seq == bos
        # Count every order. Order-k ids are indices into the sorted distinct keys of that order;
        # suffix_of_next[k-1] maps each distinct (k+1)-gram to its order-k suffix (for left-extension counts).
        prefix, token, raw, suffix_of_next = [None, None], [None, None], [None, None], []
        # int32 ids per position keep the peak memory down (~85 bytes per training character).
        prev = seq.astype(np.int32)  # order-1 ids are the token ids
        for _k in range(2, order + 1):
            # the k-gram ending at i extends the (k-1)-gram ending at i-1; never across a document start
            pos = np.flatnonzero((prev[:-1] >= 0) & ~is_bos[1:]) + 1
            keys = (prev[pos - 1].astype(np.int64) << _TOK_BITS) | seq[pos]
            uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
            del keys
            # Any one occurrence of each k-gram (all share the suffix): cheaper than return_index's stable sort
            where = np.empty(len(uniq), dtype=np.int64)
            where[inverse] = pos
            suffix_of_next.append(prev[where].astype(np.int64))  # the (k-1)-gram ending where the k-gram ends
            prev = np.full(len(seq), -1, dtype=np.int32)
            prev[pos] = inverse
            del pos, inverse, where
            prefix.append(uniq >> _TOK_BITS)
            token.append(uniq & _TOK_MASK)
            raw.append(counts)
        del prev
        # Adjusted counts (Chen & Goodman §3.6 / lmplz): the highest order keeps raw counts, a lower
        # order n-gram counts its distinct left extensions N1+(. w) - except n-grams that start with
        # <s>, which cannot be extended to the left and keep their raw counts.
        uni_raw = np.bincount(seq, minlength=n + 3)
        starts_bos = [None, np.arange(n + 3) == bos]
        for k in range(2, order + 1):
            starts_bos.append(starts_bos[k - 1][prefix[k]])
        adjusted = [None]
        for k in range(1, order + 1):
            size = n + 3 if k == 1 else len(raw[k])
            if k == order:
                a = uni_raw.copy() if k == 1 else raw[k].copy()
            else:
                a = np.bincount(suffix_of_next[k - 1], minlength=size)
                r = uni_raw if k == 1 else raw[k]
                a[starts_bos[k]] = r[starts_bos[k]]
            if k == 1:
                a[bos] = 0  # <s> is never predicted
                a[unk] = 0
            adjusted.append(a.astype(np.int64))
        discounts = [None]
        for k in range(1, order + 1):
            discounts.append(_discounts(adjusted[k][adjusted[k] > 0]))
        # u(w|h) = (a(hw) - D(a)) / sum_x a(hx);  gamma(h) = (D1 N1(h.) + D2 N2(h.) + D3 N3+(h.)) / sum_x a(hx)
        us, gammas = [None], [None]
        gamma0 = 0.0
        for k in range(1, order + 1):
            a = adjusted[k]
            d = np.array((0.0, *discounts[k]))[np.minimum(a, 3)]
            if k == 1:
                den = float(a.sum())
                gamma0 = float(d.sum() / den)
                us.append(np.where(a > 0, (a - d) / den, 0.0))
            else:
                n_ctx = n + 3 if k == 2 else len(raw[k - 1])
                den = np.bincount(prefix[k], weights=a, minlength=n_ctx)
                mass = np.bincount(prefix[k], weights=d, minlength=n_ctx)
                gammas.append(np.where(den > 0, mass / np.maximum(den, 1), 1.0))
                us.append((a - d) / den[prefix[k]])
        gammas.append(np.ones(n + 3 if order == 1 else len(raw[order])))  # highest order: never a context
        # gammas[k] is the weight of order-k n-grams as contexts (for order k+1); shift to line up with us
        ctx_gamma = gammas[1:]  # ctx_gamma[k-1] = gamma of order-k entries
        uni = np.stack([us[1], ctx_gamma[0]], axis=1).astype(np.float32)
        uni[unk] = (0.0, 1.0)
        # Re-key orders 2..N by slot ids of the parent's hash table, then build each table.
        tables, vals = [], []
        parent_slot = np.arange(n + 3, dtype=np.int64)  # order 1: slot = token id
        for k in range(2, order + 1):
            keys = (parent_slot[prefix[k]] << _TOK_BITS) | token[k]
            table, slot = _Table.build(keys)
            v = np.zeros((len(table.keys) + 1, 2), dtype=np.float32)
            v[:, 1] = 1.0
            v[slot, 0] = us[k]
            v[slot, 1] = ctx_gamma[k - 1]
            tables.append(table)
            vals.append(v)
            parent_slot = slot
        meta = {
            "format_version": FORMAT_VERSION,
            "method": "interpolated modified Kneser-Ney (Chen & Goodman 1998)",
            "unit": unit, "order": order,
            "discounts": [list(map(float, discounts[k])) for k in range(1, order + 1)],
            "ngrams": [n + 3] + [len(raw[k]) for k in range(2, order + 1)],
        }
        return cls(unit=unit, order=order, vocab=vocab, uni=uni, tables=tables, vals=vals,
                   gamma0=gamma0, meta=meta)

    # -- scoring -----------------------------------------------------------------------------------

    def _log_probs(self, seq: np.ndarray) -> np.ndarray:
        """Natural-log p(seq[i] | up to order-1 previous tokens) for every position (float64)."""
        n = len(seq)
        vg = np.take(self._uni.view(np.uint64).reshape(-1), seq).view(np.float32).reshape(-1, 2)
        p = vg[:, 0].astype(np.float64) + self.gamma0 / self.n_predicted
        prev_ids, prev_gamma = seq, vg[:, 1]
        ctx = np.empty(n, dtype=np.int64)
        g = np.empty(n, dtype=np.float64)
        for table, rows in zip(self._tables, self._rows):
            ctx[0] = -1
            ctx[1:] = prev_ids[:-1]
            g[0] = 1.0
            g[1:] = prev_gamma[:-1]
            known = ctx >= 0
            cur = np.full(n, -1, dtype=np.int64)
            if known[1:].all():  # in-domain text: every context is known except at the leading <s>
                cur[1:] = table.lookup((ctx[1:] << _TOK_BITS) | seq[1:])
            else:
                idx = np.flatnonzero(known)
                cur[idx] = table.lookup((ctx[idx] << _TOK_BITS) | seq[idx])
            vg = np.take(rows, cur).view(np.float32).reshape(-1, 2)  # row -1 = (u 0, gamma 1): unseen
            p = vg[:, 0] + g * p
            prev_ids, prev_gamma = cur, vg[:, 1]
            if not (cur >= 0).any():
                break  # no longer n-gram can match: the rest of the orders leave p unchanged
        return np.log(p)

    def _chunks(self, texts: Sequence[str]) -> Iterator[tuple[int, int]]:
        start, size = 0, 0
        for i, t in enumerate(texts):
            size += len(t)
            if size >= _CHUNK_CHARS:
                yield start, i + 1
                start, size = i + 1, 0
        if start < len(texts):
            yield start, len(texts)

    def log_prob_sums(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(sum of natural-log probabilities, predicted tokens incl. `</s>`) per text: two (len(texts),) arrays."""
        texts = list(texts)
        sums = np.zeros(len(texts), dtype=np.float64)
        counts = np.zeros(len(texts), dtype=np.int64)
        for a, b in self._chunks(texts):
            ids, lens = self._ids(texts[a:b])
            seq, starts = _frame(ids, lens, self.bos, self.eos)
            lp = self._log_probs(seq)
            lp[starts] = 0.0
            sums[a:b] = np.add.reduceat(lp, starts)
            counts[a:b] = lens + 1
        return sums, counts

    def perplexities(self, texts: Sequence[str]) -> np.ndarray:
        """Per-token perplexity of each text: (len(texts),) float64, exp(-mean ln p) over tokens + `</s>`."""
        sums, counts = self.log_prob_sums(texts)
        return np.exp(-sums / counts)

    def perplexity(self, text: str) -> float:
        return float(self.perplexities([text])[0])

    def token_log_probs(self, text: str) -> np.ndarray:
        """Natural-log probability of each token of `text` and of the final `</s>`: (tokens + 1,)."""
        ids, lens = self._ids([text])
        seq, _ = _frame(ids, lens, self.bos, self.eos)
        return self._log_probs(seq)[1:]

    def next_token_probs(self, history: Sequence[int]) -> np.ndarray:
        """p(w | history) for every predicted token id (0..n-1, </s>, then <unk> last): (n + 2,).

        `history` is token ids, starting with `self.bos` for a document start (only the last order - 1
        count). For tests and inspection: every candidate is scored in one vectorised call.
        """
        cands = np.array(list(range(self.n + 1)) + [self.unk], dtype=np.int64)
        hist = np.asarray(list(history)[-(self.order - 1):] if self.order > 1 else [], dtype=np.int64)
        # Score "history w" for every w at once: one row per candidate, rows concatenated. Each row starts
        # with <unk>, which never occurs in a trained n-gram, so no context reaches across rows.
        width = len(hist) + 1
        rows = np.empty((len(cands), width), dtype=np.int64)
        rows[:, :-1] = hist
        rows[:, -1] = cands
        seq = np.concatenate([np.full((len(cands), 1), self.unk), rows], axis=1).ravel()
        return np.exp(self._log_probs(seq)).reshape(len(cands), width + 1)[:, -1]

    # -- persistence -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the model as one `.npz` file (numpy arrays + a JSON header; no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, unit=self.unit, order=self.order, gamma0=self.gamma0,
                    table_sizes=[len(t.keys) for t in self._tables])
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), "uni": self._uni}
        if self.unit == "char":
            arrays["vocab"] = np.asarray(self.vocab, dtype=np.int64)
        else:
            arrays["vocab_words"] = np.frombuffer("\n".join(self.vocab).encode("utf-8"), dtype=np.uint8)
        for k, (t, v) in enumerate(zip(self._tables, self._vals), start=2):
            # only the used slots (the tables are 50-75% empty); load() puts them back in place
            used = np.flatnonzero(t.keys != _EMPTY)
            arrays[f"slots{k}"] = used
            arrays[f"keys{k}"] = t.keys[used]
            arrays[f"vals{k}"] = v[used]
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> NgramLM:
        """Read a model written by `save`."""
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported NgramLM format {meta.get('format_version')}")
            unit, order = meta["unit"], meta["order"]
            if unit == "char":
                vocab = z["vocab"]
            else:
                raw = z["vocab_words"].tobytes().decode("utf-8")
                vocab = raw.split("\n") if raw else []
            tables, vals = [], []
            for k, size in enumerate(meta.pop("table_sizes"), start=2):
                slots = z[f"slots{k}"]
                keys = np.full(size, _EMPTY, dtype=np.int64)
                keys[slots] = z[f"keys{k}"]
                v = np.zeros((size + 1, 2), dtype=np.float32)
                v[:, 1] = 1.0
                v[slots] = z[f"vals{k}"]
                tables.append(_Table(keys))
                vals.append(v)
            return cls(unit=unit, order=order, vocab=vocab, uni=z["uni"], tables=tables, vals=vals,
                       gamma0=meta.pop("gamma0"), meta=meta)

    def to_arpa(self, path: str | Path) -> Path:
        """Write the model as an ARPA backoff file that KenLM / SRILM read.

        Stored log10 probabilities are the full interpolated ones; backoff weights are the gammas
        (for an unseen w after h, interpolated KN gives p(w|h) = gamma(h) p(w|h'), which is exactly
        the backoff rule). Char tokens are named as `arpa_chars` names them.
        """
        words = [_arpa_char(chr(c)) for c in self.vocab] if self.unit == "char" else list(self.vocab)
        words += ["</s>", "<s>", "<unk>"]
        uni_p = self._uni[:, 0].astype(np.float64) + self.gamma0 / self.n_predicted
        rows: list[list[str]] = [[]]
        with np.errstate(divide="ignore"):
            lp, lb = np.log10(uni_p), np.log10(self._uni[:, 1].astype(np.float64))
        for i, w in enumerate(words):
            prob = -99.0 if i == self.bos else lp[i]
            rows[0].append(_arpa_line(prob, w, lb[i] if i != self.unk and lb[i] != 0.0 else None))
        # Per order: the slots in use, their full probability and (for the next order) their suffix slot.
        full_prev = uni_p  # indexed by the previous order's slot (order 1: token id)
        gamma_prev = self._uni[:, 1].astype(np.float64)
        names_prev = np.array(words, dtype=object)
        suffix_prev = None
        for k, (table, vals) in enumerate(zip(self._tables, self._vals), start=2):
            used = np.flatnonzero(table.keys != _EMPTY)
            keys = table.keys[used]
            parent, tok = keys >> _TOK_BITS, keys & _TOK_MASK
            if k == 2:
                suffix = tok
            else:
                suffix = self._tables[k - 3].lookup((suffix_prev[parent] << _TOK_BITS) | tok)
                if (suffix < 0).any():
                    raise AssertionError("KN trie is not suffix-closed")  # cannot happen for counted models
            u = vals[used, 0].astype(np.float64)
            full = u + gamma_prev[parent] * full_prev[suffix]
            gamma = vals[used, 1].astype(np.float64)
            names = names_prev[parent] + " " + np.array(words, dtype=object)[tok]
            lp = np.log10(full)
            rows.append([
                _arpa_line(lp[j], names[j], math.log10(gamma[j]) if k < self.order and gamma[j] != 1.0 else None)
                for j in range(len(used))
            ])
            # Scatter back to slot-indexed arrays for the next order's parent/suffix lookups.
            size = len(table.keys)
            full_prev = np.zeros(size)
            full_prev[used] = full
            gamma_prev = np.ones(size)
            gamma_prev[used] = gamma
            names_prev = np.empty(size, dtype=object)
            names_prev[used] = names
            suffix_prev = np.full(size, -1, dtype=np.int64)
            suffix_prev[used] = suffix
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n\\data\\\n")
            for k, r in enumerate(rows, start=1):
                f.write(f"ngram {k}={len(r)}\n")
            for k, r in enumerate(rows, start=1):
                f.write(f"\n\\{k}-grams:\n")
                f.write("\n".join(r))
                f.write("\n")
            f.write("\n\\end\\\n")
        return path

    def __repr__(self) -> str:
        return f"NgramLM(unit={self.unit!r}, order={self.order}, vocab={self.n}, ngrams={self.meta.get('ngrams')})"


def _arpa_line(logp: float, words: str, backoff: float | None) -> str:
    return f"{logp:.7g}\t{words}" + (f"\t{backoff:.7g}" if backoff is not None else "")
