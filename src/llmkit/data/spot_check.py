"""Manual spot check: a stratified, mergeable sample of kept and dropped documents for a person to review.

Filters and redaction rules are only as good as their error rates on real data, which no metric in the
pipeline can measure: the guide's 敏感信息 step pairs regular expressions with a manual spot check, and
quality pipelines (e.g. Gopher's MassiveText, Rae et al. 2021; FineWeb, Penedo et al. 2024) tune each
heuristic by reading what it removes. This module samples ``per_reason`` documents from every stratum -
"kept" plus one stratum per drop reason - and writes them as ``review.jsonl`` and a static
``review.html`` with the redaction placeholders highlighted and an "ok?" checkbox per document.

Sampling is bottom-k (Cohen & Kaplan 2007): each document gets the key ``blake2b(seed, id)`` and a
stratum keeps the ``per_reason`` smallest keys. The sample is therefore a uniform random sample without
replacement that depends only on the set of ids offered, not on their order or on how they were split
between worker processes, and ``a.merge(b)`` is exactly the sampler that saw both streams.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path

from llmkit.data.safety import PLACEHOLDERS

KEPT = "kept"
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in sorted(set(PLACEHOLDERS.values()))))
_FIELDS = ("id", "source", "domain", "lang")


def sample_key(seed: int, doc_id: str) -> int:
    """Stable 64-bit sampling key of a document id (same on every machine and Python process)."""
    h = hashlib.blake2b(f"{seed}\x1f{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "big")


class SpotCheckSampler:
    """Bottom-k sample of documents per stratum ("kept" or a drop reason), plus per-stratum counts.

    Args:
        per_reason: documents kept per stratum (default 20).
        seed: changes which documents are drawn (default 0).
        max_chars: texts longer than this are cut for review (the sample stays the same).
    """

    def __init__(self, per_reason: int = 20, seed: int = 0, max_chars: int = 10_000):
        if per_reason < 0:
            raise ValueError(f"per_reason: must be >= 0, got {per_reason}")
        self.per_reason = per_reason
        self.seed = seed
        self.max_chars = max_chars
        self.seen: dict[str, int] = {}
        # stratum -> candidate entries (key, id, record), pruned to the k smallest whenever it reaches 2k;
        # an id whose (key, id) is not below the stratum's k-th smallest so far can never enter the sample.
        self._pool: dict[str, list[tuple[int, str, dict]]] = {}
        self._bound: dict[str, tuple[int, str]] = {}

    def offer(self, doc: dict, reason: str | None) -> None:
        """Count `doc` in its stratum (`reason`, or "kept" for None) and keep it if its key is small enough.

        Document ids must be unique (the pipeline's contract). The record is copied, so later changes to
        `doc` do not reach the sample.
        """
        stratum = reason or KEPT
        self.seen[stratum] = self.seen.get(stratum, 0) + 1
        if self.per_reason == 0:
            return
        doc_id = str(doc.get("id", ""))
        key = sample_key(self.seed, doc_id)
        bound = self._bound.get(stratum)
        if bound is not None and (key, doc_id) >= bound:
            return
        pool = self._pool.setdefault(stratum, [])
        pool.append((key, doc_id, self._record(doc, stratum, reason)))
        if len(pool) >= 2 * self.per_reason:
            self._prune(stratum)

    def _prune(self, stratum: str) -> list[tuple[int, str, dict]]:
        pool = sorted(self._pool[stratum], key=lambda e: e[:2])[:self.per_reason]
        self._pool[stratum] = pool
        if len(pool) == self.per_reason:
            self._bound[stratum] = pool[-1][:2]
        return pool

    def _record(self, doc: dict, stratum: str, reason: str | None) -> dict:
        text = doc.get("text") or ""
        if not isinstance(text, str):
            text = str(text)
        if len(text) > self.max_chars:
            text = text[:self.max_chars] + f" …[{len(text) - self.max_chars} more characters]"
        rec = {"stratum": stratum}
        rec.update({f: doc.get(f) for f in _FIELDS})
        rec["id"] = str(rec["id"] if rec["id"] is not None else "")
        rec["reason"] = reason
        rec["text"] = text
        return rec

    def merge(self, other: SpotCheckSampler) -> SpotCheckSampler:
        """Fold `other` (same per_reason and seed) into self; returns self.

        Exact: the result equals one sampler offered both streams, in any order.
        """
        if (other.per_reason, other.seed) != (self.per_reason, self.seed):
            raise ValueError("cannot merge samplers with different per_reason or seed")
        for stratum, n in other.seen.items():
            self.seen[stratum] = self.seen.get(stratum, 0) + n
        for stratum, theirs in other._pool.items():
            self._pool[stratum] = self._pool.get(stratum, []) + list(theirs)
            self._prune(stratum)
        return self

    def samples(self) -> dict[str, list[dict]]:
        """{stratum: records in sampling-key order}; "kept" first, then drop reasons alphabetically."""
        order = sorted(self._pool, key=lambda s: (s != KEPT, s))
        return {s: [r for _, _, r in self._prune(s)] for s in order}

    def to_dict(self) -> dict:
        """A JSON-serialisable snapshot; from_dict(to_dict()) restores the sampler's sample and counts."""
        return {
            "per_reason": self.per_reason, "seed": self.seed, "max_chars": self.max_chars,
            "seen": dict(self.seen),
            "samples": {s: [[k, i, r] for k, i, r in self._prune(s)] for s in self._pool},
        }

    @classmethod
    def from_dict(cls, d: dict) -> SpotCheckSampler:
        sampler = cls(d["per_reason"], d["seed"], d.get("max_chars", 10_000))
        sampler.seen = {s: int(n) for s, n in d["seen"].items()}
        sampler._pool = {s: [(int(k), i, r) for k, i, r in entries] for s, entries in d["samples"].items()}
        for s in sampler._pool:
            sampler._prune(s)
        return sampler

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write `review.jsonl` (one record per sampled doc) and `review.html`; returns their paths.

        jsonl records: {"stratum", "id", "source", "domain", "lang", "reason", "text"}.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        samples = self.samples()
        jsonl = out / "review.jsonl"
        # backslashreplace: a lone surrogate becomes the JSON escape "\udXXX", so the file stays UTF-8
        with jsonl.open("w", encoding="utf-8", errors="backslashreplace") as f:
            for records in samples.values():
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        page = out / "review.html"
        page.write_text(render_html(samples, self.seen), encoding="utf-8", errors="replace")
        return jsonl, page


def _highlight(text: str) -> str:
    # Escape first: placeholders are made of [A-Z_] and survive escaping unchanged.
    return _PLACEHOLDER_RE.sub(lambda m: f"<mark>{m.group()}</mark>", html.escape(text))


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;width:100%;margin-bottom:2em}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
td.text{white-space:pre-wrap;word-break:break-word;max-width:60em;font-size:0.9em}
td.meta{font-size:0.8em;color:#555;white-space:nowrap}
mark{background:#ffe066;font-weight:bold}
.summary td{text-align:right}
"""

_JS = """
function exportVerdicts(){
  const rows=[...document.querySelectorAll('input.ok')].map(c=>({stratum:c.dataset.stratum,id:c.dataset.id,ok:c.checked}));
  const a=document.createElement('a');
  a.href='data:application/json;charset=utf-8,'+encodeURIComponent(JSON.stringify(rows,null,1));
  a.download='verdicts.json';a.click();
}
"""


def render_html(samples: dict[str, list[dict]], seen: dict[str, int]) -> str:
    """A self-contained UTF-8 review page: summary table, then one section per stratum."""
    e = html.escape
    total = sum(seen.values())
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>llmkit data: manual spot check</title>", f"<style>{_CSS}</style>",
           f"<script>{_JS}</script></head><body>",
           "<h1>Manual spot check</h1>",
           f"<p>{total} documents seen. Tick <b>ok?</b> where the decision (keep / drop reason / redaction) "
           "is right, then <button onclick=\"exportVerdicts()\">export verdicts</button>.</p>",
           '<table class="summary"><tr><th>stratum</th><th>seen</th><th>share</th><th>sampled</th></tr>']
    strata = sorted(set(seen) | set(samples), key=lambda s: (s != KEPT, s))
    for s in strata:
        n = seen.get(s, 0)
        share = f"{100 * n / total:.2f}%" if total else "-"
        out.append(f'<tr><td style="text-align:left"><a href="#s-{e(s)}">{e(s)}</a></td><td>{n}</td>'
                   f"<td>{share}</td><td>{len(samples.get(s, []))}</td></tr>")
    out.append("</table>")
    for s in strata:
        records = samples.get(s, [])
        out.append(f'<h2 id="s-{e(s)}">{e(s)} <small>({len(records)} of {seen.get(s, 0)})</small></h2>')
        out.append("<table><tr><th>#</th><th>document</th><th>text</th><th>ok?</th></tr>")
        for i, r in enumerate(records, 1):
            meta = "<br>".join(f"{k}: {e(str(r.get(k)))}" for k in ("id", "source", "domain", "lang"))
            out.append(
                f'<tr><td>{i}</td><td class="meta">{meta}</td><td class="text">{_highlight(r["text"])}</td>'
                f'<td><input type="checkbox" class="ok" data-stratum="{e(s)}" data-id="{e(r["id"])}"></td></tr>'
            )
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)
