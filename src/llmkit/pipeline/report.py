"""The monitoring report of a pipeline run: one self-contained HTML page (`llmkit report RUN_DIR`).

`render_report(run_dir)` reads what `llmkit pipeline run` left in the run directory

    pipeline.json             stage status, compute seconds, digests, MLflow ids, hourly prices
    data/manifest.json        the data pipeline's funnel, sources, perplexity and mix
    pretrain/metrics.jsonl    train loss per step, val loss / bpb at each evaluation
    sft/metrics.jsonl         SFT loss per step, eval loss / perplexity at each evaluation
    sft/results.json          SFT exact match, ROUGE-L and graded answers
    preference/results.json   preference tuning's held-out reward accuracy / margin before and after
    preference/metrics.jsonl  its per-step rewards and KL to the reference
    eval/eval.json            perplexity fp32 vs int8, sizes, fine-tune accuracy, benchmarks (`llmkit eval`),
                              serving latency, samples

and writes `<run>/report/index.html` with every plot embedded as a base64 PNG (the PNGs are also written
beside it), so the page can be mailed or opened anywhere without the run directory. A file that is missing
(stage disabled or not run yet) turns its section into "not run". Plots are drawn with matplotlib's Agg
canvas and carry ASCII labels only (no CJK font is assumed); model text goes into the HTML, escaped.

With `log_to_mlflow` and a `parent_run_id` + `tracking_uri` in pipeline.json the page and the PNGs are
logged as artifacts of the parent run under `report/`, and the headline figures as `report.*` metrics plus
`stage.<name>.seconds`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
import warnings
import webbrowser
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPORT_DIR = "report"
STAGES = ["samples", "data", "tokenizer", "tokens", "pretrain", "sft", "merge", "preference", "quantize", "eval",
          "register"]
PERCENTILES = (50, 95, 99)
NOT_RUN = "not run"
COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
          "#CCB974", "#64B5CD"]


@dataclass
class Section:
    """One part of the page: an anchor id, a heading, its HTML body, its plots and its headline metrics."""

    id: str
    title: str
    body: str = ""
    plots: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes
    metrics: dict[str, float] = field(default_factory=dict)  # MLflow key -> value


# ---------------------------------------------------------------- reading

def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing or unreadable (a stage still running)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of `path`, one per line; broken lines (a run killed mid-write) are skipped."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _num(value: Any) -> float | None:
    """`value` as a finite float, else None."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------- formatting

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, spec: str = ".4g") -> str:
    x = _num(value)
    return "-" if x is None else format(x, spec)


def usd(value: float) -> str:
    """US dollars as the cost table shows them: 6 decimals (a tiny CPU run costs fractions of a cent)."""
    return f"${value:.6f}"


def ms(seconds: float) -> str:
    """Seconds as the latency table shows them: milliseconds with 2 decimals."""
    return f"{seconds * 1000:.2f}"


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """An HTML table; cells are escaped unless already wrapped by `_raw`."""
    def cell(v: Any, tag: str) -> str:
        text = v.html if isinstance(v, _Raw) else _esc(v)
        return f"<{tag}>{text}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


@dataclass
class _Raw:
    html: str


def _not_run(what: str) -> str:
    return f'<p class="notrun">{NOT_RUN}: {_esc(what)}</p>'


def _ascii(label: Any) -> str:
    """A plot label with ASCII glyphs only: matplotlib's default font has no CJK (the tables show the names)."""
    return str(label).encode("ascii", "replace").decode("ascii")


# ---------------------------------------------------------------- plotting

def _figure(width: float = 9.0, height: float = 4.0):
    """A matplotlib Figure on an Agg canvas (no pyplot: no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}" data-file="{_esc(name)}"></figure>'


# ---------------------------------------------------------------- sections

def summary_section(pipe: dict | None, run_dir: Path) -> Section:
    """Run name, output and tracking locations, and one row per stage: status, compute seconds (summed over
    resumes), times run, skipped by the latest pipeline run as unchanged, short output digest, MLflow run id."""
    sec = Section("summary", "Summary")
    if pipe is None:
        sec.body = _not_run(f"no pipeline.json in {run_dir}")
        return sec
    info = [["name", pipe.get("name", "")], ["run directory", str(run_dir)],
            ["tracking URI", pipe.get("tracking_uri") or "-"], ["parent MLflow run", pipe.get("parent_run_id") or "-"]]
    stages = pipe.get("stages") or {}
    rows = []
    for name in _stage_names(stages):
        s = stages[name] or {}
        seconds = _num(s.get("seconds"))
        if seconds is not None:
            sec.metrics[f"stage.{name}.seconds"] = seconds
        rows.append([name, _Raw(f'<span class="st-{_esc(s.get("status", "?"))}">{_esc(s.get("status", "?"))}</span>'),
                     _fmt(seconds, ".2f") if seconds is not None else "-", s.get("runs", "-"),
                     "yes" if s.get("skipped_last") else "no", (s.get("digest") or "-")[:12],
                     s.get("run_id") or "-", s.get("finished_at") or s.get("started_at") or "-"])
    sec.body = _table(["", ""], info, "kv") + (
        _table(["stage", "status", "seconds", "runs", "skipped", "digest", "MLflow run", "finished"], rows)
        if rows else _not_run("no stage has run yet"))
    return sec


def _stage_names(stages: dict) -> list[str]:
    """Known stages in pipeline order, then any others in the order pipeline.json lists them."""
    return [s for s in STAGES if s in stages] + [s for s in stages if s not in STAGES]


def data_section(manifest: dict | None) -> Section:
    """The data funnel: documents kept and dropped (by reason) at each step, documents and tokens per domain,
    requested vs achieved domain share, the selection step's report (`select:`), and the perplexity
    distribution (char-level) per domain."""
    sec = Section("data", "Data funnel")
    if manifest is None:
        sec.body = _not_run("no data/manifest.json (the data stage is disabled or has not finished)")
        return sec
    parts = []
    funnel = manifest.get("funnel") or []
    if funnel:
        sec.plots["data_funnel.png"] = _funnel_plot(funnel)
        parts.append(_img("data_funnel.png", sec.plots["data_funnel.png"], "documents kept and dropped per step"))
        parts.append(_funnel_table(funnel))
        sec.metrics["report.data_docs_in"] = float(funnel[0].get("in", 0))
        sec.metrics["report.data_docs_out"] = float(funnel[-1].get("out", 0))
    domains = _domain_rows(manifest)
    if domains:
        sec.plots["data_domains.png"] = _domain_plot(domains)
        parts.append("<h3>Per domain</h3>" + _img("data_domains.png", sec.plots["data_domains.png"],
                                                 "documents and tokens per domain"))
        parts.append(_table(["domain", "sources", "docs in", "docs after read", "tokens available",
                             "tokens taken", "requested share", "achieved share"],
                            [[d["domain"], d["sources"], d["docs_in"], d["docs_read"], _fmt(d["available"], ".0f"),
                              _fmt(d["taken"], ".0f"), _fmt(d["requested"], ".3f"), _fmt(d["achieved"], ".3f")]
                             for d in domains]))
    if manifest.get("select"):
        parts.append(_select_html(manifest["select"]))
    ppl = (manifest.get("perplexity") or {}).get("by_domain") or {}
    if any(all(_num((d or {}).get(k)) is not None for k in ("p10", "p25", "p50", "p75", "p90")) for d in ppl.values()):
        sec.plots["data_perplexity.png"] = _perplexity_plot(ppl, (manifest.get("perplexity") or {}).get("unit"))
        parts.append("<h3>Perplexity per domain</h3>" + _img("data_perplexity.png", sec.plots["data_perplexity.png"],
                                                             "perplexity distribution per domain"))
    sec.body = "".join(parts) or _not_run("the manifest holds no funnel")
    return sec


def _select_html(sel: dict) -> str:
    """The selection step's report (manifest `select`): method, what it kept, its diagnostics, per source."""
    tokens, chars = sel.get("tokens") or {}, sel.get("chars") or {}
    facts = [f"{sel.get('selected', '-')} of {sel.get('candidates', '-')} candidates selected "
             f"(dropped as {sel.get('reason', 'select.' + str(sel.get('method')))}); tokens "
             f"{tokens.get('selected', '-')} of {tokens.get('candidates', '-')}, characters "
             f"{chars.get('selected', '-')} of {chars.get('candidates', '-')}"
             + (f" ({sel['token_counter']})" if sel.get("token_counter") else "") + "."]
    if "held_out_auc" in sel:
        facts.append(f"Classifier held-out AUC {_fmt(sel['held_out_auc'], '.3f')} (train AUC "
                     f"{_fmt(sel.get('train_auc'), '.3f')}).")
    if "kl_target_raw" in sel:
        facts.append(f"DSIR: KL(target || raw) {_fmt(sel['kl_target_raw'], '.3f')} nats.")
    if sel.get("bands"):
        facts.append("Perplexity band per language: " + ", ".join(
            f"{k} [{_fmt(b[0], '.2f')}, {_fmt(b[1], '.2f')}]" for k, b in sel["bands"].items()) + ".")
    dp = sel.get("dp")
    if dp:
        facts.append(f"Differentially private: ({dp.get('epsilon')}, {dp.get('delta')})-DP, Gumbel scale "
                     f"{_fmt(dp.get('noise_scale'))}, {dp.get('composition')}; overlap with the non-private top-k "
                     f"{_fmt(dp.get('overlap_share'), '.3f')} (random: {_fmt(dp.get('random_overlap_share'), '.3f')}).")
    rows = [[src, v.get("candidates", "-"), v.get("selected", "-")] for src, v in (sel.get("by_source") or {}).items()]
    return (f"<h3>Selection ({_esc(sel.get('method', '?'))})</h3>" + "".join(f"<p>{_esc(f)}</p>" for f in facts)
            + (_table(["source", "candidates", "selected"], rows) if rows else ""))


def _funnel_plot(funnel: list[dict]) -> bytes:
    """Horizontal stacked bars, one per step: documents out, then the documents dropped by each reason."""
    totals: dict[str, int] = {}
    for step in funnel:
        for reason, n in (step.get("dropped") or {}).items():
            totals[reason] = totals.get(reason, 0) + int(n)
    top = [r for r, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:8]]
    fig = _figure(11, 0.45 * len(funnel) + 1.8)
    ax = fig.add_subplot()
    y = np.arange(len(funnel))[::-1]
    kept = np.array([float(s.get("out", 0)) for s in funnel])
    ax.barh(y, kept, color="#4C72B0", label="kept")
    left = kept.copy()
    groups = top + (["other"] if len(totals) > len(top) else [])
    for i, reason in enumerate(groups):
        widths = np.array([float(sum(n for r, n in (s.get("dropped") or {}).items()
                                     if (r == reason or (reason == "other" and r not in top)))) for s in funnel])
        ax.barh(y, widths, left=left, color=COLORS[(i + 1) % len(COLORS)], label=f"dropped: {_ascii(reason)}")
        left += widths
    ax.set_yticks(y, [_ascii(s.get("step", "?")) for s in funnel])
    ax.set_xlabel("documents")
    ax.set_title("Data funnel: documents kept and dropped per step")
    fig.legend(fontsize=7, loc="outside right upper")
    return _png(fig)


def _funnel_table(funnel: list[dict]) -> str:
    rows = []
    for s in funnel:
        dropped = s.get("dropped") or {}
        detail = ", ".join(f"{r}: {n}" for r, n in sorted(dropped.items(), key=lambda kv: -kv[1]))
        if s.get("added"):
            detail = (detail + "; " if detail else "") + f"added: {s['added']}"
        rows.append([s.get("step", "?"), s.get("in", "-"), sum(dropped.values()), s.get("out", "-"), detail or "-"])
    return _table(["step", "docs in", "dropped", "docs out", "reasons"], rows)


def _domain_rows(manifest: dict) -> list[dict]:
    """Per domain: source count and documents (from `sources`), tokens and shares (from `mix`)."""
    out: dict[str, dict] = {}

    def row(domain: str) -> dict:
        return out.setdefault(domain, {"domain": domain, "sources": 0, "docs_in": 0, "docs_read": 0,
                                       "available": None, "taken": None, "requested": None, "achieved": None})

    for src in (manifest.get("sources") or {}).values():
        r = row(str(src.get("domain", "?")))
        r["sources"] += 1
        r["docs_in"] += int(src.get("docs_in", 0) or 0)
        r["docs_read"] += int(src.get("after_read_phase", src.get("docs_in", 0)) or 0)
    mix = manifest.get("mix") or {}
    for key, col in [("available", "available"), ("taken", "taken"), ("requested_share", "requested"),
                     ("achieved_share", "achieved")]:
        for domain, v in (mix.get(key) or {}).items():
            row(str(domain))[col] = _num(v)
    return sorted(out.values(), key=lambda r: r["domain"])


def _domain_plot(domains: list[dict]) -> bytes:
    """Left: documents in / after reading per domain. Right: requested vs achieved share of the mix."""
    fig = _figure(10, 3.8)
    names = [_ascii(d["domain"]) for d in domains]
    x = np.arange(len(domains))
    ax = fig.add_subplot(1, 2, 1)
    ax.bar(x - 0.2, [d["docs_in"] for d in domains], 0.4, label="docs in", color=COLORS[0])
    ax.bar(x + 0.2, [d["docs_read"] for d in domains], 0.4, label="after read", color=COLORS[1])
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("documents")
    ax.set_title("Documents per domain")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    if any(d["achieved"] is not None for d in domains):
        ax.bar(x - 0.2, [d["requested"] or 0 for d in domains], 0.4, label="requested", color=COLORS[2])
        ax.bar(x + 0.2, [d["achieved"] or 0 for d in domains], 0.4, label="achieved", color=COLORS[3])
        ax.set_ylabel("share of mixed tokens")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "mix not run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_title("Domain mix: requested vs achieved")
    return _png(fig)


def _perplexity_plot(by_domain: dict, unit: str | None) -> bytes:
    """Box plots (p10 / p25 / p50 / p75 / p90 whiskers, log scale) of document perplexity per domain."""
    stats = []
    for domain, d in sorted(by_domain.items()):
        q = {k: _num(d.get(k)) for k in ("p10", "p25", "p50", "p75", "p90", "mean")}
        if None in (q["p10"], q["p25"], q["p50"], q["p75"], q["p90"]):
            continue
        stats.append({"label": f"{_ascii(domain)}\n(n={d.get('count', '?')})", "whislo": q["p10"], "q1": q["p25"],
                      "med": q["p50"], "q3": q["p75"], "whishi": q["p90"], "mean": q["mean"], "fliers": []})
    fig = _figure(9, 3.4)
    ax = fig.add_subplot()
    if stats:
        ax.bxp(stats, showmeans=all(s["mean"] is not None for s in stats), orientation="horizontal")
        ax.set_xscale("log")
    ax.set_xlabel(f"perplexity ({_ascii(unit or 'char')}-level; whiskers p10-p90)")
    ax.set_title("Document perplexity per domain")
    return _png(fig)


def training_section(run_dir: Path) -> Section:
    """Loss vs optimizer step for pretraining and SFT: the logged training loss as a line, evaluations
    (val / eval loss, in nats per token) as marked points."""
    sec = Section("training", "Training curves")
    pre = _read_jsonl(run_dir / "pretrain" / "metrics.jsonl")
    sft = _read_jsonl(run_dir / "sft" / "metrics.jsonl")
    panels = [("pretrain", pre, "val_loss"), ("sft", sft, "eval_loss")]
    if not pre and not sft:
        sec.body = _not_run("no pretrain/metrics.jsonl or sft/metrics.jsonl")
        return sec
    fig = _figure(10, 3.8)
    rows = []
    for i, (stage, metrics, val_key) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        if not metrics:
            ax.text(0.5, 0.5, NOT_RUN, ha="center", va="center", transform=ax.transAxes)
            rows.append([stage, NOT_RUN, "-", "-", "-", "-"])
            continue
        train, val = _series(metrics, "loss"), _series(metrics, val_key)
        if train:
            ax.plot(*zip(*train), color=COLORS[0], linewidth=1.2, label="train loss")
        if val:
            ax.plot(*zip(*val), color=COLORS[3], marker="o", linestyle="--", label=val_key.replace("_", " "))
        if train or val:
            ax.legend(fontsize=8)
        last_val = val[-1][1] if val else None
        best_val = min(v for _, v in val) if val else None
        sec.metrics.update({k: v for k, v in [(f"report.{stage}_final_train_loss", train[-1][1] if train else None),
                                              (f"report.{stage}_final_{val_key}", last_val)] if v is not None})
        rows.append([stage, _fmt(max((x for x, _ in _series(metrics, "step")), default=None), ".0f"),
                     _fmt(train[-1][1] if train else None), _fmt(last_val), _fmt(best_val), _extra_training(metrics)])
    sec.plots["training_loss.png"] = _png(fig)
    sec.body = _img("training_loss.png", sec.plots["training_loss.png"], "training and validation loss") + _table(
        ["stage", "last step", "final train loss", "final val loss", "best val loss", "other"], rows)
    return sec


def _series(metrics: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) of every row that logged a finite `key` at a finite step."""
    pairs = [(_num(r.get("step")), _num(r.get(key))) for r in metrics]
    return [(x, y) for x, y in pairs if x is not None and y is not None]


def _extra_training(metrics: list[dict]) -> str:
    """The last val bits-per-byte / eval perplexity and the median throughput or step time, when logged."""
    out = []
    for key, label in [("val_bpb", "val bpb"), ("eval_ppl", "eval ppl")]:
        vals = [v for _, v in _series(metrics, key)]
        if vals:
            out.append(f"{label} {vals[-1]:.4g}")
    for key, label in [("tokens_per_s", "median tokens/s"), ("step_time_s", "median step s")]:
        vals = [v for _, v in _series(metrics, key)]
        if vals:
            out.append(f"{label} {float(np.median(vals)):.4g}")
    return "; ".join(out) or "-"


def finetune_section(results: dict | None, ev: dict | None, n_answers: int = 3) -> Section:
    """Exact match and ROUGE-L (0..1) of the fine-tuned model, fp32 vs int8, and a few graded answers."""
    sec = Section("finetune", "Fine-tune accuracy")
    fin = (ev or {}).get("finetune") or {}
    if results is None and not fin:
        sec.body = _not_run("no sft/results.json and no finetune block in eval/eval.json")
        return sec
    src = results or {}
    em = _num(fin.get("exact_match", src.get("exact_match")))
    rl = _num(fin.get("rouge_l", src.get("rouge_l")))
    em8, rl8 = _num(fin.get("int8_exact_match")), _num(fin.get("int8_rouge_l"))
    for key, v in [("exact_match", em), ("rouge_l", rl), ("int8_exact_match", em8), ("int8_rouge_l", rl8)]:
        if v is not None:
            sec.metrics[f"report.{key}"] = v
    fig = _figure(6.5, 3.2)
    ax = fig.add_subplot()
    x = np.arange(2)
    ax.bar(x - 0.2, [em or 0, rl or 0], 0.4, label="fp32", color=COLORS[0])
    ax.bar(x + 0.2, [em8 or 0, rl8 or 0], 0.4, label="int8", color=COLORS[1])
    for xi, v in zip(x, [em8, rl8]):
        if v is None:
            ax.text(xi + 0.2, 0.02, "n/a", ha="center", va="bottom", fontsize=8, color="#666")
    ax.set_xticks(x, ["exact match", "ROUGE-L"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (0..1)")
    ax.set_title("Fine-tune accuracy: fp32 vs int8")
    ax.legend(fontsize=8)
    sec.plots["finetune_accuracy.png"] = _png(fig)
    info = _table(["metric", "fp32", "int8"], [["exact match", _fmt(em), _fmt(em8) if em8 is not None else "-"],
                                              ["ROUGE-L", _fmt(rl), _fmt(rl8) if rl8 is not None else "-"]])
    facts = [f"method: {src['method']}" for _ in [0] if src.get("method")]
    if src.get("n_trainable") is not None:
        facts.append(f"trainable parameters: {src['n_trainable']} of {src.get('n_params', '?')}"
                     f" ({_fmt(100 * (_num(src.get('trainable_share')) or 0), '.3g')}%)")
    if fin.get("n") is not None:
        facts.append(f"graded prompts: {fin['n']}")
    base = src.get("baseline") or {}
    if base:  # the base model's answers to the same prompts, before training (sft eval.baseline)
        info += _table(["before training (base model)", "exact match", "ROUGE-L"],
                       [["fp32", _fmt(_num(base.get("exact_match"))), _fmt(_num(base.get("rouge_l")))]])
        for key in ("exact_match", "rouge_l"):
            if _num(base.get(key)) is not None:
                sec.metrics[f"report.baseline_{key}"] = _num(base[key])
    before = {a.get("prompt"): a.get("answer") for a in base.get("answers") or []}
    answers = "".join(_answer_card(a, before.get(a.get("prompt"))) for a in (src.get("answers") or [])[:n_answers])
    sec.body = (_img("finetune_accuracy.png", sec.plots["finetune_accuracy.png"], "exact match and ROUGE-L")
                + info + (f"<p>{_esc('; '.join(facts))}</p>" if facts else "")
                + ("<h3>Graded answers</h3>" + answers if answers else ""))
    return sec


def _answer_card(a: dict, before: str | None = None) -> str:
    score = f"exact match {_fmt(a.get('exact_match'))}, ROUGE-L {_fmt(a.get('rouge_l'))}"
    earlier = ('<div class="lbl">answer before training</div><pre>' + _esc(before) + "</pre>"
               if before is not None else "")
    return ('<div class="card"><div class="lbl">prompt</div><pre>' + _esc(a.get("prompt", "")) + "</pre>"
            '<div class="lbl">reference</div><pre>' + _esc(a.get("reference", "")) + "</pre>" + earlier +
            '<div class="lbl">answer</div><pre>' + _esc(a.get("answer", "")) + "</pre>"
            f'<div class="score">{score}</div></div>')


PREFERENCE_ROWS = [("eval_reward_accuracy", "reward accuracy (chosen beats rejected)"),
                   ("eval_reward_margin", "reward margin (nats x beta)"), ("eval_loss", "loss"),
                   ("eval_kl", "KL to the reference (nats / sequence)"),
                   ("eval_logps_accuracy", "policy log-prob accuracy")]


def preference_section(results: dict | None, metrics: list[dict]) -> Section:
    """Preference tuning on held-out pairs: reward accuracy, margin, loss and KL before vs after training, and
    the per-step training rewards (preference/results.json, preference/metrics.jsonl)."""
    sec = Section("preference", "Preference tuning")
    if results is None:
        sec.body = _not_run("no preference/results.json (the preference stage is disabled or has not finished)")
        return sec
    before, after = results.get("before") or {}, results.get("after") or {}
    rows = []
    for key, label in PREFERENCE_ROWS:
        b, a = _num(before.get(key)), _num(after.get(key))
        if b is None and a is None:
            continue
        rows.append([label, _fmt(b), _fmt(a), f"{a - b:+.4g}" if a is not None and b is not None else "-"])
        if a is not None:
            sec.metrics[f"report.preference_{key}"] = a
    body = _table(["held-out pairs", "before", "after", "change"], rows)
    series = {k: _series(metrics, k) for k in ("rewards/accuracy", "rewards/margin", "kl")}
    if any(series.values()):
        fig = _figure(10, 3.2)
        for i, (key, pts) in enumerate(series.items()):
            ax = fig.add_subplot(1, 3, i + 1)
            if pts:
                ax.plot(*zip(*pts), color=COLORS[i])
            ax.set_title(f"train {key}")
            ax.set_xlabel("step")
        sec.plots["preference.png"] = _png(fig)
        body = _img("preference.png", sec.plots["preference.png"], "training rewards per step") + body
    data = results.get("data") or {}
    facts = [f"{results.get('loss', '?')} loss, beta {results.get('beta', '?')}, method {results.get('method', '?')}, "
             f"{results.get('step', '?')} steps",
             f"pairs: {data.get('train', '?')} train, {data.get('eval', '?')} held out, "
             f"{data.get('malformed', 0)} malformed, {data.get('too_long', 0)} too long"]
    sec.body = body + "".join(f"<p>{_esc(f)}</p>" for f in facts)
    return sec


def _bench_value(task: dict | None, metric: str) -> tuple[float | None, float | None]:
    v = ((task or {}).get("metrics") or {}).get(metric)
    if isinstance(v, dict):
        return _num(v.get("value")), _num(v.get("stderr"))
    return _num(v), None


def benchmarks_section(ev: dict | None) -> Section:
    """`llmkit eval` results of the final model (and the float model when the final one is quantized): one row
    per task and metric with its standard error, a bar plot of the accuracies, and the per-subject table."""
    sec = Section("benchmarks", "Benchmarks")
    bench = (ev or {}).get("benchmarks") or {}
    final, flt = (bench.get("final") or {}).get("tasks") or {}, (bench.get("float") or {}).get("tasks") or {}
    if not final:
        sec.body = _not_run("no benchmarks in eval/eval.json (eval.tasks is empty)")
        return sec
    rows, bars = [], []
    for name, task in final.items():
        for metric in (task.get("metrics") or {}):
            v, se = _bench_value(task, metric)
            fv, _ = _bench_value(flt.get(name), metric)
            rows.append([name, metric, task.get("n", "-"), _fmt(v) + (f" ± {_fmt(se, '.2g')}" if se is not None else ""),
                         _fmt(fv) if name in flt else "-"])
            if v is not None:
                sec.metrics[f"report.bench.{name}.{metric}"] = v
            if metric in ("acc", "exact_match_flexible") and v is not None:
                bars.append((f"{name} {metric}", v, fv))
    body = _table(["task", "metric", "n", "final model", "float model" if flt else "float model (not quantized)"], rows)
    if bars:
        fig = _figure(max(5.0, 1.2 * len(bars) + 2), 3.2)
        ax = fig.add_subplot()
        x = np.arange(len(bars))
        ax.bar(x - 0.2 * bool(flt), [b[1] for b in bars], 0.4, label="final", color=COLORS[0])
        if flt:
            ax.bar(x + 0.2, [b[2] or 0 for b in bars], 0.4, label="float", color=COLORS[1])
        ax.set_xticks(x, [_ascii(b[0]) for b in bars], rotation=15, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (0..1)")
        ax.legend(fontsize=8)
        sec.plots["benchmarks.png"] = _png(fig)
        body = _img("benchmarks.png", sec.plots["benchmarks.png"], "benchmark accuracy") + body
    subject_rows = [[name, subj, st.get("n", "-"), _fmt(_bench_value({"metrics": st}, "acc")[0])]
                    for name, task in final.items() for subj, st in (task.get("subjects") or {}).items()
                    if "acc" in st]
    if subject_rows:
        body += "<h3>Per subject (final model)</h3>" + _table(["task", "subject", "n", "acc"], subject_rows)
    bad = sum(int(t.get("malformed_count") or 0) for t in final.values())
    settings = bench["final"]
    sec.body = body + (f"<p>{_esc(settings.get('shots', 0))}-shot, chat template "
                       f"{'on' if settings.get('chat_template') else 'off'}, limit {_esc(settings.get('limit'))}; "
                       f"{bad} malformed rows reported by the task readers</p>")
    return sec


def quantization_section(ev: dict | None) -> Section:
    """Held-out perplexity (per token) before/after int8 quantization and the relative change, with the
    bytes of the linear weights and of the whole model directory in each precision."""
    sec = Section("quantization", "Quantization: perplexity and size")
    ppl = (ev or {}).get("perplexity") or {}
    size = (ev or {}).get("size_bytes") or {}
    if not ppl and not size:
        sec.body = _not_run("no perplexity / size_bytes in eval/eval.json")
        return sec
    fp32, int8 = _num(ppl.get("fp32")), _num(ppl.get("int8"))
    delta = _num(ppl.get("delta_rel"))
    if delta is None and fp32 and int8 is not None:
        delta = int8 / fp32 - 1
    for key, v in [("ppl_fp32", fp32), ("ppl_int8", int8), ("ppl_delta_rel", delta)]:
        if v is not None:
            sec.metrics[f"report.{key}"] = v
    fig = _figure(10, 3.4)
    ax = fig.add_subplot(1, 2, 1)
    ax.bar(["fp32", "int8"], [fp32 or 0, int8 or 0], color=[COLORS[0], COLORS[1]])
    ax.set_ylabel("perplexity")
    ax.set_title("Held-out perplexity" + (f" (int8 {delta:+.2%})" if delta is not None else ""))
    ax = fig.add_subplot(1, 2, 2)
    x = np.arange(2)
    mib = 1024 * 1024
    ax.bar(x - 0.2, [(_num(size.get("fp32_linear")) or 0) / mib, (_num(size.get("fp32_dir")) or 0) / mib], 0.4,
           label="fp32", color=COLORS[0])
    ax.bar(x + 0.2, [(_num(size.get("int8_linear")) or 0) / mib, (_num(size.get("int8_dir")) or 0) / mib], 0.4,
           label="int8", color=COLORS[1])
    ax.set_xticks(x, ["linear weights", "model directory"])
    ax.set_ylabel("MiB")
    ax.set_title("Size")
    ax.legend(fontsize=8)
    sec.plots["quantization.png"] = _png(fig)
    rows = [["perplexity", _fmt(fp32), _fmt(int8), f"{delta:+.2%}" if delta is not None else "-"]]
    for label, key in [("linear weights (bytes)", "linear"), ("model directory (bytes)", "dir")]:
        a, b = _num(size.get(f"fp32_{key}")), _num(size.get(f"int8_{key}"))
        rows.append([label, _fmt(a, ".0f"), _fmt(b, ".0f"), f"{b / a:.3f}x" if a and b is not None else "-"])
        if a and b is not None:
            sec.metrics[f"report.size_ratio_{key}"] = b / a
    sec.body = (_img("quantization.png", sec.plots["quantization.png"], "perplexity and size fp32 vs int8")
                + _table(["", "fp32", "int8", "int8 vs fp32"], rows)
                + (f"<p>evaluated on {_esc(ppl['tokens'])} tokens</p>" if ppl.get("tokens") else ""))
    return sec


def latency_section(ev: dict | None) -> Section:
    """Serving latency per request: time to first token (TTFT, s), mean time per output token (TPOT, s) and
    end-to-end time (s); histograms and CDFs with p50/p95/p99 marked; aggregate output tokens/s."""
    sec = Section("latency", "Latency")
    lat = (ev or {}).get("latency") or {}
    series = {k: np.array([v for v in (lat.get(k) or []) if _num(v) is not None], dtype=float)
              for k in ("ttft_s", "tpot_s", "e2e_s")}
    if not len(series["ttft_s"]) and not len(series["tpot_s"]):
        sec.body = _not_run("no latency block in eval/eval.json")
        return sec
    fig = _figure(10, 6)
    for col, (key, title) in enumerate([("ttft_s", "Time to first token"), ("tpot_s", "Time per output token")]):
        values = series[key]
        hist, cdf = fig.add_subplot(2, 2, col + 1), fig.add_subplot(2, 2, col + 3)
        if not len(values):
            hist.text(0.5, 0.5, NOT_RUN, ha="center", va="center", transform=hist.transAxes)
            continue
        hist.hist(values * 1000, bins=min(30, max(5, len(values) // 2)), color=COLORS[0], alpha=0.8)
        _mark_ms(hist, values)
        hist.set_title(f"{title} (n={len(values)})")
        hist.set_ylabel("requests")
        hist.legend(fontsize=7)
        xs = np.sort(values) * 1000
        cdf.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", color=COLORS[0])
        _mark_ms(cdf, values)
        cdf.set_xlabel(f"{title.lower()} (ms)")
        cdf.set_ylabel("fraction of requests")
        cdf.set_ylim(0, 1.02)
    sec.plots["latency.png"] = _png(fig)
    rows = []
    for key, label in [("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "end to end")]:
        values = series[key]
        if not len(values):
            continue
        pct = {p: float(np.percentile(values, p)) for p in PERCENTILES}
        name = key[:-2]
        sec.metrics.update({f"report.{name}_p{p}_s": v for p, v in pct.items()})
        rows.append([label, len(values), ms(float(values.mean())), *(ms(pct[p]) for p in PERCENTILES),
                     ms(float(values.max()))])
    tps = _num(lat.get("tokens_per_s"))
    if tps is not None:
        sec.metrics["report.tokens_per_s"] = tps
    facts = [f"{k}: {lat[k]}" for k in ("requests", "concurrency") if lat.get(k) is not None]
    if tps is not None:
        facts.append(f"output tokens/s (all requests): {tps:.1f}")
    sec.body = (_img("latency.png", sec.plots["latency.png"], "latency histograms and CDFs")
                + _table(["per request (ms)", "n", "mean", "p50", "p95", "p99", "max"], rows, "latency")
                + (f"<p>{_esc('; '.join(facts))}</p>" if facts else ""))
    return sec


def _mark_ms(ax, values: np.ndarray) -> None:
    """p50/p95/p99 of `values` (seconds) as dashed vertical lines on an axis in milliseconds."""
    for p, color in zip(PERCENTILES, ["#2ca02c", "#ff7f0e", "#d62728"]):
        v = float(np.percentile(values, p)) * 1000
        ax.axvline(v, color=color, linestyle="--", linewidth=1.2, label=f"p{p} {v:.1f} ms")


def cost_section(pipe: dict | None) -> Section:
    """Compute seconds per stage priced at the configured hourly rates (USD/hour): cost = seconds / 3600 *
    price, on-demand vs spot, with the total and the spot saving in percent."""
    sec = Section("cost", "Compute time and cost")
    stages = (pipe or {}).get("stages") or {}
    prices = (pipe or {}).get("cost") or {}
    od, spot = _num(prices.get("on_demand_usd_per_hour")), _num(prices.get("spot_usd_per_hour"))
    seconds = {n: _num((stages[n] or {}).get("seconds")) for n in _stage_names(stages)}
    seconds = {n: s for n, s in seconds.items() if s is not None}
    if not seconds:
        sec.body = _not_run("no stage has recorded compute seconds")
        return sec
    priced = od is not None and spot is not None
    od, spot = od or 0.0, spot or 0.0
    costs = {n: (s / 3600 * od, s / 3600 * spot) for n, s in seconds.items()}
    total_s = sum(seconds.values())
    total_od, total_spot = total_s / 3600 * od, total_s / 3600 * spot
    saving = 100 * (1 - spot / od) if od else 0.0
    sec.metrics["report.compute_seconds"] = total_s
    if priced:
        sec.metrics.update({"report.cost_on_demand_usd": total_od, "report.cost_spot_usd": total_spot,
                            "report.spot_saving_pct": saving})
    sec.plots["cost.png"] = _cost_plot(seconds, costs)
    rows = [[n, f"{s:.2f}", usd(costs[n][0]), usd(costs[n][1])] for n, s in seconds.items()]
    rows.append([_Raw("<b>total</b>"), f"{total_s:.2f}", usd(total_od), usd(total_spot)])
    sec.body = (_img("cost.png", sec.plots["cost.png"], "compute seconds and cost per stage")
                + _table(["stage", "seconds", f"on-demand (${od:g}/h)", f"spot (${spot:g}/h)"], rows, "cost")
                + f'<p class="saving">spot saving: <b>{saving:.1f}%</b> '
                  f"({usd(total_od - total_spot)} on this run)</p>"
                + ("" if priced else '<p class="notrun">no hourly prices in pipeline.json (cost): priced at $0</p>'))
    return sec


def _cost_plot(seconds: dict[str, float], costs: dict[str, tuple[float, float]]) -> bytes:
    """Left: compute seconds per stage. Right: USD per stage, on-demand vs spot."""
    fig = _figure(10, 3.6)
    names = [_ascii(n) for n in seconds]
    x = np.arange(len(names))
    ax = fig.add_subplot(1, 2, 1)
    ax.bar(x, list(seconds.values()), color=COLORS[0])
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("compute seconds")
    ax.set_title("Compute time per stage")
    ax = fig.add_subplot(1, 2, 2)
    ax.bar(x - 0.2, [c[0] for c in costs.values()], 0.4, label="on-demand", color=COLORS[3])
    ax.bar(x + 0.2, [c[1] for c in costs.values()], 0.4, label="spot", color=COLORS[2])
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("USD")
    ax.set_title("Cost per stage")
    ax.legend(fontsize=8)
    return _png(fig)


def instructions_section(ev: dict | None, results: dict | None) -> Section:
    """The final model's answers to English and Chinese instructions (eval.json `instructions`, else the SFT
    samples), as escaped text."""
    sec = Section("instructions", "Instruction samples (English / Chinese)")
    items = (ev or {}).get("instructions") or [dict(s, lang="") for s in (results or {}).get("samples") or []]
    if not items:
        sec.body = _not_run("no instructions in eval/eval.json")
        return sec
    cards = []
    for it in items:
        lang = str(it.get("lang") or "")
        attr = f' lang="{_esc(lang)}"' if lang else ""
        cards.append(f'<div class="card"{attr}><div class="lbl">{_esc(lang or "prompt")} prompt</div>'
                     f"<pre>{_esc(it.get('prompt', ''))}</pre><div class=\"lbl\">answer</div>"
                     f"<pre>{_esc(it.get('answer', ''))}</pre></div>")
    sec.body = "".join(cards)
    return sec


# ---------------------------------------------------------------- page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC","PingFang SC",
"Microsoft YaHei","WenQuanYi Micro Hei",sans-serif;margin:0 auto;max-width:1100px;padding:1rem 2rem;color:#222}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #4C72B0;padding-bottom:.2rem;margin-top:2.2rem}
nav a{margin-right:1rem}table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;vertical-align:top}th{background:#f0f3f8}
td{font-variant-numeric:tabular-nums}table.kv th{display:none}figure{margin:.5rem 0}img{max-width:100%}
.notrun{color:#888;font-style:italic}.st-done{color:#2a7}.st-failed{color:#c33;font-weight:bold}.st-running{color:#c80}
.card{border:1px solid #ddd;border-radius:6px;padding:.5rem .8rem;margin:.6rem 0;background:#fafafa}
.lbl{font-size:.75rem;color:#666;text-transform:uppercase}pre{font-family:ui-monospace,Menlo,Consolas,"DejaVu Sans Mono","Noto Sans Mono CJK SC","Noto Sans CJK SC",
"PingFang SC","Microsoft YaHei",monospace;white-space:pre-wrap;word-break:break-word;max-height:14em;overflow:auto;margin:.2rem 0 .5rem}
.score{font-size:.85rem;color:#444}footer{color:#888;font-size:.8rem;margin-top:2rem}
"""


def build_sections(run_dir: Path) -> list[Section]:
    """Every section of the report, in page order, from the files of `run_dir`."""
    pipe = _read_json(run_dir / "pipeline.json")
    ev = _read_json(run_dir / "eval" / "eval.json")
    results = _read_json(run_dir / "sft" / "results.json")
    return [summary_section(pipe, run_dir), data_section(_read_json(run_dir / "data" / "manifest.json")),
            training_section(run_dir), finetune_section(results, ev),
            preference_section(_read_json(run_dir / "preference" / "results.json"),
                               _read_jsonl(run_dir / "preference" / "metrics.jsonl")),
            benchmarks_section(ev), quantization_section(ev),
            latency_section(ev), cost_section(pipe), instructions_section(ev, results)]


def page(title: str, sections: list[Section]) -> str:
    """The HTML document: inline CSS, a table of contents, one <section> per part; no external resources."""
    nav = "".join(f'<a href="#{s.id}">{_esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.id}"><h2>{_esc(s.title)}</h2>{s.body}</section>' for s in sections)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_esc(title)}</h1><nav>{nav}</nav>{body}"
            f"<footer>generated by llmkit report at {stamp}</footer></body></html>\n")


def render_report(run_dir: str | Path, out_dir: str | Path | None = None, log_to_mlflow: bool = True) -> Path:
    """Write `<run_dir>/report/index.html` (or `<out_dir>/index.html`) and its PNGs; return the html path.

    With `log_to_mlflow` and a parent run in pipeline.json, also log them to that run (see `log_report`)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    sections = build_sections(run_dir)
    pipe = _read_json(run_dir / "pipeline.json") or {}
    files = []
    for sec in sections:
        for name, png in sec.plots.items():
            (out / name).write_bytes(png)
            files.append(out / name)
    index = out / "index.html"
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(page(f"llmkit report: {pipe.get('name') or run_dir.name}", sections), encoding="utf-8")
    os.replace(tmp, index)
    if log_to_mlflow and pipe.get("parent_run_id") and pipe.get("tracking_uri"):
        metrics = {k: v for sec in sections for k, v in sec.metrics.items()}
        try:
            log_report(pipe["tracking_uri"], pipe["parent_run_id"], [index, *files], metrics)
        except Exception as e:  # the page is written; a tracking problem must not lose it
            warnings.warn(f"could not log the report to MLflow run {pipe['parent_run_id']}: {e}", stacklevel=2)
    return index


def log_report(tracking_uri: str, run_id: str, files: list[Path], metrics: dict[str, float]) -> None:
    """Log `files` as artifacts under `report/` of MLflow run `run_id`, and `metrics` (one batch, step 0)."""
    os.environ["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=REPORT_DIR)
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items()) if _num(v) is not None]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i:i + 500])


def open_in_browser(path: str | Path) -> bool:
    """Open the report in the default web browser; False when none could be started."""
    return webbrowser.open(Path(path).resolve().as_uri())


if __name__ == "__main__":  # python -m llmkit.pipeline.report RUN_DIR
    import sys

    print(render_report(sys.argv[1], log_to_mlflow="--no-mlflow" not in sys.argv))
