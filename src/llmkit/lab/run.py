"""Run claims, store each result as JSON, and rebuild docs/claims.md from every stored result.

    llmkit lab list
    llmkit lab run --all                 # every claim, 3 seeds, regenerates docs/claims.md
    llmkit lab run int8 kv-cache         # a subset: their rows are updated, the others kept
    llmkit lab run hardware --quick      # seconds-long smoke run (not evidence; docs untouched)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
import time
import traceback
from pathlib import Path

from llmkit.lab.claim import Claim, Context, Measurement, Result
from llmkit.lab.registry import all_claims, get

NOT_RUN = "not run yet"


# -- machine facts ------------------------------------------------------------------------------------


def machine_facts() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": gpu or "none", "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


# -- running ------------------------------------------------------------------------------------------


def _measurement_json(m: Measurement) -> dict:
    d = dataclasses.asdict(m)
    d.update(mean=m.mean, std=m.std, text=m.text())
    return d


def result_json(claim: Claim, result: Result, seeds: list[int], quick: bool, machine: dict) -> dict:
    return {
        "id": claim.id, "section": claim.section, "guide_zh": claim.guide_zh, "guide_en": claim.guide_en,
        "claimed": claim.claimed, "expected_minutes": claim.minutes,
        "verdict": result.verdict, "summary": result.summary, "setup": result.setup,
        "measurements": [_measurement_json(m) for m in result.measurements],
        "plots": list(result.plots), "seconds": result.seconds,
        "seeds": list(seeds), "quick": quick,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
    }


def run_one(claim: Claim, seeds: list[int], quick: bool, out_dir: Path) -> Result:
    """Run one claim; an exception becomes a "not measured" result carrying the error."""
    claim_dir = out_dir / claim.id
    claim_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        result = claim.run(Context(seeds=list(seeds), quick=quick, out_dir=claim_dir))
        if not isinstance(result, Result):
            raise TypeError(f"run() returned {type(result).__name__}, not a Result")
    except Exception as e:  # noqa: BLE001 - one failing experiment must not stop the others
        tb = traceback.format_exc(limit=4)
        result = Result(measurements=[], verdict="not measured",
                        summary=f"the experiment failed: {type(e).__name__}: {e}", setup=tb)
    result.seconds = time.perf_counter() - t
    return result


def run_claims(ids: list[str] | None, seeds: int = 3, quick: bool = False, out_dir: str | Path = "runs/lab",
               docs: Path | str | None = Path("docs/claims.md"), echo=None) -> dict[str, Result]:
    """Run the claims `ids` (None or empty: all) with seeds 0..seeds-1; write <out_dir>/<id>/result.json
    and, unless `quick` (or docs is None), regenerate `docs` from every result stored in `out_dir`.

    Raises:
        ValueError for unknown ids (before anything runs).
    """
    if seeds < 1:
        raise ValueError(f"seeds: must be >= 1, got {seeds}")
    claims = get(list(ids or []))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_facts()
    seed_list = list(range(seeds))
    results: dict[str, Result] = {}
    for claim in claims:
        result = run_one(claim, seed_list, quick, out)
        results[claim.id] = result
        path = out / claim.id / "result.json"
        if quick and _is_full_result(path):
            path = path.with_name("result.quick.json")  # a smoke run never replaces real evidence
        path.write_text(json.dumps(result_json(claim, result, seed_list, quick, machine), indent=1,
                                   ensure_ascii=False) + "\n", encoding="utf-8")
        if echo:
            echo(result_line(claim, result))
    if not quick and docs is not None:
        write_docs(out, Path(docs))
    return results


def _is_full_result(path: Path) -> bool:
    try:
        return not json.loads(path.read_text(encoding="utf-8")).get("quick", True)
    except (OSError, json.JSONDecodeError):
        return False


def result_line(claim: Claim, result: Result) -> str:
    measured = "; ".join(f"{m.name} {m.text()}" for m in result.measurements) or "-"
    return f"{claim.id}: {measured} vs {claim.claimed} -> {result.verdict} ({result.seconds:.0f} s)"


# -- docs ---------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def load_results(out_dir: Path) -> dict[str, dict]:
    """Stored result.json per claim id (a quick run writes result.quick.json beside a full result instead
    of replacing it, so a quick result shows only where no full run exists)."""
    found: dict[str, dict] = {}
    if not out_dir.is_dir():
        return found
    for path in sorted(out_dir.glob("*/result.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        data["_dir"] = str(path.parent)
        found[data.get("id", path.parent.name)] = data
    return found


def render_docs(out_dir: Path, docs: Path) -> str:
    stored = load_results(out_dir)
    claims = all_claims()
    machines = {json.dumps(d.get("machine", {}), sort_keys=True) for d in stored.values()}
    lines = [
        "# The guide's claims, measured",
        "",
        "Every number the guide (`llm_lifecycle_guide.zh.txt`) states that a CPU can check gets a small controlled",
        "experiment in `llmkit.lab.experiments`; this page is generated from their stored results",
        f"(`{out_dir}/<id>/result.json`) — do not edit it by hand.",
        "",
        "Rerun everything with `llmkit lab run --all` (3 seeds each), one claim with `llmkit lab run ID`;",
        "`llmkit lab list` lists the ids. A subset run updates its rows and keeps the others.",
        "",
        "Machine(s) the stored results come from:",
        "",
    ]
    for m in sorted(machines):
        f = json.loads(m)
        if f:
            lines.append(f"- {f.get('cpu_count')} CPU cores ({f.get('processor')}), torch {f.get('torch')}, "
                         f"GPU: {f.get('gpu')}, {f.get('platform')}")
    if not stored:
        lines.append("- (no results stored yet)")
    lines += ["", "| # | claim | § | the guide says | guide's figure | measured (mean ± std, n) | verdict | "
              "setup | rerun |", "|---|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    plots_dir = docs.parent / "claims"
    for i, claim in enumerate(claims, 1):
        d = stored.get(claim.id)
        wording = f"{_cell(claim.guide_en)}<br>“{_cell(claim.guide_zh)}”"
        cmd = f"`llmkit lab run {claim.id}`"
        if d is None:
            lines.append(f"| {i} | [{claim.id}](#{claim.id}) | {claim.section} | {wording} | "
                         f"{_cell(claim.claimed)} | {NOT_RUN} | {NOT_RUN} | | {cmd} |")
            notes += [f"## {claim.id}", "", f"{claim.section} — {NOT_RUN}.", ""]
            continue
        measured = "<br>".join(f"{_cell(m['name'])}: {_cell(m['text'])}"
                               + (f" (guide: {_cell(m['claimed'])})" if m.get("claimed") else "")
                               for m in d.get("measurements", [])) or "—"
        verdict = d.get("verdict", "?") + (" (quick run: not evidence)" if d.get("quick") else "")
        setup_short = _cell(d.get("setup", ""))
        if len(setup_short) > 160:
            setup_short = setup_short[:157].rsplit(" ", 1)[0] + " … (below)"
        lines.append(f"| {i} | [{claim.id}](#{claim.id}) | {claim.section} | {wording} | {_cell(claim.claimed)} | "
                     f"{measured} | **{verdict}** | {setup_short} | {cmd} |")
        notes += [f"## {claim.id}", "",
                  f"{claim.section}, guide: “{claim.guide_zh}” — {claim.guide_en}", "",
                  f"**Verdict: {verdict}.** {d.get('summary', '')}", "",
                  f"Setup: {d.get('setup', '')}", "",
                  f"Seeds {d.get('seeds')}, {d.get('seconds', 0.0) / 60:.1f} min, run {d.get('date', '?')}.", ""]
        for plot in d.get("plots", []):
            src = Path(d["_dir"]) / plot
            if not src.is_file():
                continue
            plots_dir.mkdir(parents=True, exist_ok=True)
            name = f"{claim.id}-{Path(plot).name}"
            shutil.copyfile(src, plots_dir / name)
            notes += [f"![{claim.id}: {Path(plot).stem}](claims/{name})", ""]
    return "\n".join(lines + ["", *notes]).rstrip() + "\n"


def write_docs(out_dir: Path, docs: Path) -> Path:
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(render_docs(Path(out_dir), docs), encoding="utf-8")
    return docs


# -- CLI ----------------------------------------------------------------------------------------------


def list_claims() -> str:
    rows = [f"{'id':<18} {'§':<10} {'min':>4}  {'guide figure':<34} wording"]
    for c in all_claims():
        rows.append(f"{c.id:<18} {c.section:<10} {c.minutes:>4g}  {c.claimed:<34} {c.guide_en}")
    return "\n".join(rows)


def _lab_list(args) -> None:
    print(list_claims())


def _lab_run(args) -> None:
    if not args.ids and not args.all:
        raise ValueError("name claim ids (see `llmkit lab list`) or pass --all")
    if args.ids and args.all:
        raise ValueError("give claim ids or --all, not both")
    run_claims(None if args.all else args.ids, seeds=args.seeds, quick=args.quick, out_dir=args.out,
               docs=Path(args.docs), echo=lambda line: print(line, flush=True))
    if not args.quick:
        print(f"wrote {args.docs}")


def add_lab_arguments(subparsers) -> None:
    """`llmkit lab list` and `llmkit lab run [IDS...] [--all] [--seeds N] [--quick] [--out DIR] [--docs FILE]`."""
    lab = subparsers.add_parser("lab", help="measure the guide's claims with small controlled experiments")
    sub = lab.add_subparsers(dest="lab_action", required=True)
    ls = sub.add_parser("list", help="the claims: id, guide section, the guide's figure, expected minutes")
    ls.set_defaults(func=_lab_list)
    r = sub.add_parser("run", help="run claims, store results, regenerate docs/claims.md")
    r.add_argument("ids", nargs="*", metavar="ID", help="claim ids (see `llmkit lab list`)")
    r.add_argument("--all", action="store_true", help="every claim")
    r.add_argument("--seeds", type=int, default=3, help="seeds per experiment (default 3)")
    r.add_argument("--quick", action="store_true", help="seconds-long smoke runs; docs are not regenerated")
    r.add_argument("--out", default="runs/lab", help="where results are stored (default runs/lab)")
    r.add_argument("--docs", default="docs/claims.md", help="the page to regenerate (default docs/claims.md)")
    r.set_defaults(func=_lab_run)
