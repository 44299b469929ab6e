"""The data pipeline's account of a run: the manifest (funnel, digests, figures) and its markdown report.

`build_manifest` turns the completion records of every phase into `manifest.json`; `manifest_markdown` is
what `llmkit data report <out_dir>` prints: the funnel (what each step kept and dropped, and why), the
sources, the perplexity distribution per domain, achieved vs requested domain shares, and MB/s per core.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

from llmkit.config import to_dict
from llmkit.data.executor import total_workers

FORMAT_VERSION = 1
STEP_ORDER = ["read", "normalize", "quality", "safety", "dedup", "perplexity", "select", "mix"]


def build_manifest(cfg, *, inputs: list[dict], fingerprints: dict[str, str], shards: list[dict],
                   dedup: dict | None, ppl_runs: list[dict], selection: dict, written: list[dict],
                   tokens: dict | None, review: dict, wall: float) -> dict:
    """The manifest of a finished run from the completion records of its phases (see corpus.py)."""
    reasons: Counter = Counter()
    for part in [*shards, *written]:
        reasons.update(part["reasons"])
    docs_in = sum(s["docs_in"] for s in shards)
    bytes_in = sum(s["bytes_in"] for s in shards)
    funnel, alive = [], docs_in
    for step in STEP_ORDER:
        dropped = {r: n for r, n in sorted(reasons.items()) if r.split(".")[0] == step}
        lost = sum(dropped.values())
        funnel.append({"step": step, "in": alive, "dropped": dropped, "out": alive - lost})
        alive -= lost
    out_docs = sum(w["docs"] for w in written)
    augmented = sum(w["augmented"] for w in written)
    repeats = sum(w["repeats"] for w in written)
    funnel.append({"step": "augment", "in": alive, "added": augmented, "repeats": repeats, "out": out_docs})
    # MB/s per core: bytes each step saw / CPU seconds it spent (summed over workers)
    seconds: Counter = Counter()
    step_bytes: Counter = Counter()
    for s in shards:
        seconds.update(s["seconds"])
        step_bytes.update(s["step_bytes"])
    if ppl_runs:
        seconds["perplexity"] += sum(r["seconds"] for r in ppl_runs)
        step_bytes["perplexity"] += sum(r["bytes"] for r in ppl_runs)
    if dedup is not None:
        seconds["dedup_clustering"] += dedup["seconds"]
    if any(w["augment_bytes"] for w in written):
        seconds["augment"] += sum(w["augment_seconds"] for w in written)
        step_bytes["augment"] += sum(w["augment_bytes"] for w in written)
    throughput = {k: round(step_bytes[k] / seconds[k] / 1e6, 3) for k in seconds if step_bytes.get(k) and
                  seconds[k] > 0}
    workers = total_workers(cfg.executor)
    digest = hashlib.sha256("".join(f"{w['file']}:{w['sha256']}\n" for w in written).encode()).hexdigest()
    per_source = {}
    for s in shards:
        row = per_source.setdefault(s["source"], {"domain": s["domain"], "docs_in": 0, "bytes_in": 0,
                                                  "after_read_phase": 0})
        row["docs_in"] += s["docs_in"]
        row["bytes_in"] += s["bytes_in"]
        row["after_read_phase"] += s["docs_kept"]
    return {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": to_dict(cfg),
        "fingerprints": fingerprints,
        "inputs": inputs,
        "sources": per_source,
        "funnel": funnel,
        "reasons": dict(sorted(reasons.items())),
        "dedup": dedup and {k: v for k, v in dedup.items() if k != "fingerprint"},
        "perplexity": selection.get("perplexity"),
        "select": selection.get("select"),
        "mix": selection.get("mix"),
        "output": {"format": cfg.output.format, "docs": out_docs, "augmented": augmented,
                   "files": [{k: w[k] for k in ("file", "docs", "bytes", "sha256")} for w in written],
                   "digest": digest},
        "rejected_dir": "rejected" if cfg.output.write_rejected else None,
        "tokens": tokens,
        "review": review,
        "throughput": {"bytes_in": bytes_in, "wall_seconds": round(wall, 3), "workers": workers,
                       "pipeline_mb_s_per_core": round(bytes_in / wall / workers / 1e6, 3) if wall else None,
                       "step_mb_s_per_core": throughput},
    }


def manifest_metrics(manifest: dict) -> dict[str, float]:
    m = {f"reason.{k}": float(v) for k, v in manifest["reasons"].items()}
    m["docs_in"] = float(manifest["funnel"][0]["in"])
    m["docs_out"] = float(manifest["output"]["docs"])
    t = manifest["throughput"]
    if t["pipeline_mb_s_per_core"] is not None:
        m["pipeline_mb_s_per_core"] = t["pipeline_mb_s_per_core"]
    m.update({f"mb_s_per_core.{k}": v for k, v in t["step_mb_s_per_core"].items()})
    return m


def load_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} the out_dir of a finished `llmkit data run`?")
    return json.loads(path.read_text())


def manifest_markdown(manifest: dict) -> str:
    """The funnel and the per-step figures of a manifest as markdown (what `llmkit data report` prints)."""
    lines = ["# Data pipeline report", "", "## Funnel", "", "| step | in | dropped | out | why |",
             "|---|---:|---:|---:|---|"]
    for row in manifest["funnel"]:
        if row["step"] == "augment":
            lines.append(f"| augment | {row['in']} | +{row['added']} added, +{row['repeats']} repeats | "
                         f"{row['out']} | |")
            continue
        dropped = sum(row["dropped"].values())
        why = ", ".join(f"{r} {n}" for r, n in row["dropped"].items())
        lines.append(f"| {row['step']} | {row['in']} | {dropped} | {row['out']} | {why} |")
    lines += ["", "## Sources", "", "| source | domain | docs in | MB in | after read phase |",
              "|---|---|---:|---:|---:|"]
    for name, s in manifest["sources"].items():
        lines.append(f"| {name} | {s['domain']} | {s['docs_in']} | {s['bytes_in'] / 1e6:.2f} | "
                     f"{s['after_read_phase']} |")
    if manifest.get("dedup"):
        d = manifest["dedup"]
        lines += ["", f"Dedup: {d['exact']} exact copies, {d['near']} near-duplicates in "
                      f"{d['near_clusters']} clusters."]
    if manifest.get("perplexity"):
        p = manifest["perplexity"]
        lines += ["", f"## Perplexity ({p['unit']})", "",
                  "thresholds: " + ", ".join(f"{k} {v:.2f}" for k, v in p["thresholds"].items()), "",
                  "| domain | count | p10 | p50 | p90 | mean |", "|---|---:|---:|---:|---:|---:|"]
        for dom, s in p["by_domain"].items():
            lines.append(f"| {dom} | {s['count']} | {s['p10']:.2f} | {s['p50']:.2f} | {s['p90']:.2f} | "
                         f"{s['mean']:.2f} |")
    if manifest.get("select"):
        lines += _select_markdown(manifest["select"])
    if manifest.get("mix"):
        m = manifest["mix"]
        lines += ["", f"## Mix ({m['unit']}; {m['token_counter']})", "",
                  "| domain | available | requested share | achieved share | taken |", "|---|---:|---:|---:|---:|"]
        for dom in m["available"]:
            lines.append(f"| {dom} | {m['available'][dom]:.0f} | {m['requested_share'].get(dom, 0):.3f} | "
                         f"{m['achieved_share'][dom]:.3f} | {m['taken'][dom]:.0f} |")
    t = manifest["throughput"]
    lines += ["", "## Throughput", "",
              f"{t['bytes_in'] / 1e6:.2f} MB in {t['wall_seconds']:.1f} s on {t['workers']} worker(s): "
              f"{t['pipeline_mb_s_per_core']} MB/s per core for the whole pipeline.", "",
              "| step | MB/s per core |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in t["step_mb_s_per_core"].items()]
    o = manifest["output"]
    lines += ["", f"Output: {o['docs']} documents in {len(o['files'])} {o['format']} shard(s), digest "
                  f"{o['digest'][:16]}; review page: {', '.join(manifest['review']['files'])}."]
    return "\n".join(lines) + "\n"


def _select_markdown(sel: dict) -> list[str]:
    lines = ["", f"## Selection ({sel['method']}; dropped as {sel['reason']})", "",
             f"{sel['selected']} of {sel['candidates']} candidates selected; tokens "
             f"{sel['tokens']['selected']} of {sel['tokens']['candidates']}, characters "
             f"{sel['chars']['selected']} of {sel['chars']['candidates']} ({sel['token_counter']}).", ""]
    if "held_out_auc" in sel:
        lines += [f"Classifier held-out AUC {sel['held_out_auc']:.3f} on {sel['held_out_docs']} documents "
                  f"(train AUC {sel['train_auc']:.3f}).", ""]
    if "kl_target_raw" in sel:
        lines += [f"DSIR: KL(target || raw) of the hashed n-gram models {sel['kl_target_raw']:.3f} nats.", ""]
    if "bands" in sel:
        lines += ["Perplexity band per language: " + ", ".join(f"{k} [{lo:.2f}, {hi:.2f}]" for k, (lo, hi) in
                                                               sel["bands"].items()), ""]
    dp = sel.get("dp")
    if dp:
        share = "n/a" if dp["overlap_share"] is None else f"{dp['overlap_share']:.3f}"
        rnd = "n/a" if dp["random_overlap_share"] is None else f"{dp['random_overlap_share']:.3f}"
        lines += [f"Differentially private: ({dp['epsilon']}, {dp['delta']})-DP, {dp['mechanism']}; "
                  f"sensitivity {dp['sensitivity']}, epsilon per pick {dp['epsilon_per_pick']:.4g}, Gumbel "
                  f"scale {dp['noise_scale']:.4g}, {dp['composition']}. Overlap with the non-private top-k "
                  f"{dp['overlap']} ({share}; random: {rnd}).", ""]
    lines += ["| source | candidates | selected |", "|---|---:|---:|"]
    lines += [f"| {s} | {v['candidates']} | {v['selected']} |" for s, v in sel["by_source"].items()]
    return lines
