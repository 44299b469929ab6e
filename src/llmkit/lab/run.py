"""Run claims, store each result as JSON, and rebuild docs/claims.md from the committed results.

    llmkit lab list
    llmkit lab run --all                 # every claim, 3 seeds, regenerates docs/claims.md
    llmkit lab run int8 kv-cache         # a subset: their rows are updated, the others kept
    llmkit lab run hardware --quick      # seconds-long smoke run (not evidence; docs untouched)
    llmkit lab render                    # docs/claims.md from docs/claims/results/*.json alone

A full run writes its working files under runs/lab/<id>/ and its result, with the git commit, machine,
date and seeds, to docs/claims/results/<id>.json (plots beside it in docs/claims/): those files are
committed, so the page can be rebuilt from the repository without rerunning anything.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import time
import traceback
from pathlib import Path

from llmkit.lab.catalog import all_claims, get
from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result

NOT_RUN = "not run yet"
NOT_THIS_REVISION = "not measured in this revision"
FULL_SEEDS = 3

WHAT_CHANGED = [
    "Every verdict now comes from a pure decision function of the measurements (`verdict(...)` in each "
    "experiment module), unit-tested with synthetic measurements that produce each verdict "
    "(tests/test_lab_verdicts.py).",
    "Results are committed (docs/claims/results/<id>.json: git commit, machine, date, seeds) and this page "
    "is rendered from them alone; a test checks the page equals what the committed results render to.",
    "int8: the size saving is measured on the whole model (serialized state-dict bytes, and the bytes of "
    "every tensor a forward pass reads, embeddings and output head included), not on Linear weights only "
    "(1 byte vs 4 is -75% by definition). \"Needs calibration\" is judged against static INT8 whose ranges "
    "come from the default (min/max) observers on one random-token batch, not against a forced ±1 range.",
    "checkpointing: the Spot saving is a model of assumed prices, so its verdict is \"modelled\", never "
    "\"holds\"; the assumed prices are listed with provider, instance and date, with a sensitivity table of "
    "the saving over spot/on-demand price ratios and preemption rates.",
    "sampling: a temperature x top-p grid; the claim holds only if T 0.7 / p 0.9 lies on the "
    "diversity-fluency Pareto front, fluency judged by a 5-gram LM trained on held-out text the sampled "
    "model never saw.",
    "trainable-params: LoRA and prefix tuning are judged by the same rule (a majority of the model/setting "
    "points inside the guide's range); prefix used to pass with any single point inside.",
    "encdec-params: published encoder-decoder / decoder-only pairs of the same width class (T5 and BART "
    "against GPT-2), parameter counts from their published configs; it holds only if most pairs show "
    "+20..+40%. The old criterion (30% lies between two readings of llmkit's own models) could not fail.",
    "kv-cache: LRU is compared with FIFO, LFU, ARC and Belady's offline optimum (MIN) on the same "
    "chat request traces; the replacement half holds only if LRU is within 2 hit-rate points of the best "
    "online policy at most cache budgets.",
    "activation, augment, lora-lr, mixing: criteria unchanged; their decisions moved into `verdict(...)` "
    "functions with the same thresholds, unit-tested like the others.",
    "New claims for the guide's §5 (after hardware): codesign, distill, moe (lightweight inference, "
    "distillation, dynamic routing), parallel3d (3D parallel training splits the model state and trains the "
    "same model), select (data selection, differentially private included, at equal tokens) and meta-lora "
    "(meta-learned LoRA initialisation for k-step adaptation).",
]


# -- machine facts ------------------------------------------------------------------------------------


def machine_facts() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": gpu or "none", "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


def git_commit() -> dict:
    """The checkout's commit and whether it had uncommitted changes to tracked files (the code measured)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"sha": "unknown", "dirty": None}
    return {"sha": sha, "dirty": dirty}


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
        "plots": list(result.plots), "details": result.details, "seconds": result.seconds,
        "seeds": list(seeds), "quick": quick, "git": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
    }


def run_one(claim: Claim, seeds: list[int], quick: bool, out_dir: Path) -> Result:
    """Run one claim; an exception becomes a "not measured" result carrying the error."""
    claim_dir = out_dir / claim.id
    claim_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        result = claim.run(ExperimentContext(seeds=list(seeds), quick=quick, out_dir=claim_dir))
        if not isinstance(result, Result):
            raise TypeError(f"run() returned {type(result).__name__}, not a Result")
    except Exception as e:  # noqa: BLE001 - one failing experiment must not stop the others
        tb = traceback.format_exc(limit=4)
        result = Result(measurements=[], verdict="not measured",
                        summary=f"the experiment failed: {type(e).__name__}: {e}", setup=tb)
    result.seconds = time.perf_counter() - t
    return result


def results_dir_for(docs: Path) -> Path:
    """Where the committed results of the page `docs` live: <docs dir>/claims/results."""
    return Path(docs).parent / "claims" / "results"


def commit_result(data: dict, run_dir: Path, docs: Path) -> Path:
    """Copy a full run's result into the committed results (and its plots beside the page as
    claims/<id>-<plot>.png); the stored JSON names the copied plots."""
    plots_dir = Path(docs).parent / "claims"
    plots_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for plot in data.get("plots", []):
        src = run_dir / plot
        if src.is_file():
            name = f"{data['id']}-{Path(plot).name}"
            shutil.copyfile(src, plots_dir / name)
            copied.append(name)
    out = results_dir_for(docs) / f"{data['id']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**data, "plots": copied}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def run_claims(ids: list[str] | None, seeds: int = 3, quick: bool = False, out_dir: str | Path = "runs/lab",
               docs: Path | str | None = Path("docs/claims.md"), echo=None) -> dict[str, Result]:
    """Run the claims `ids` (None or empty: all) with seeds 0..seeds-1; write <out_dir>/<id>/result.json
    and, unless `quick` (or docs is None), commit each result to <docs dir>/claims/results/<id>.json and
    regenerate `docs` from every committed result.

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
        data = result_json(claim, result, seed_list, quick, machine)
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if not quick and docs is not None:
            commit_result(data, out / claim.id, Path(docs))
        if echo:
            echo(result_line(claim, result))
    if not quick and docs is not None:
        write_docs(Path(docs))
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


def load_results(results_dir: Path) -> dict[str, dict]:
    """The committed result of each claim: <results_dir>/<id>.json."""
    found: dict[str, dict] = {}
    if not Path(results_dir).is_dir():
        return found
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        found[data.get("id", path.stem)] = data
    return found


def _git_text(d: dict) -> str:
    git = d.get("git") or {}
    sha = str(git.get("sha", "unknown"))[:12]
    return f"commit {sha}" + (" + uncommitted changes" if git.get("dirty") else "")


def render_docs(docs: Path, results_dir: Path | None = None) -> str:
    """The page for the committed results: a pure function of <results_dir>/*.json (and the claims'
    wording), so the committed page can be checked against them."""
    docs = Path(docs)
    results_dir = Path(results_dir) if results_dir is not None else results_dir_for(docs)
    stored = load_results(results_dir)
    claims = all_claims()
    machines = {json.dumps(d.get("machine", {}), sort_keys=True) for d in stored.values() if d.get("machine")}
    rel_results = os.path.relpath(results_dir, docs.parent) if results_dir.is_absolute() == docs.is_absolute() \
        else str(results_dir)
    lines = [
        "# The guide's claims, measured",
        "",
        "Every number the guide (`llm_lifecycle_guide.zh.txt`) states that a CPU can check gets a small controlled",
        "experiment in `llmkit.lab.experiments`; this page is generated from the committed results",
        f"(`{rel_results}/<id>.json`, each with the git commit, machine, date and seeds of its run) — do not",
        "edit it by hand. `llmkit lab render` rebuilds it from those files alone.",
        "",
        "Rerun everything with `llmkit lab run --all` (3 seeds each), one claim with `llmkit lab run ID`;",
        "`llmkit lab list` lists the ids. A subset run updates its rows and keeps the others. Each verdict is",
        "the output of the experiment's `verdict(...)` function, a pure function of the measurements;",
        "\"modelled\" marks a figure computed from assumed inputs, which can neither hold nor fail.",
        "",
        "## What changed in this revision",
        "",
        *[f"- {c}" for c in WHAT_CHANGED],
        "",
        "Machine(s) the stored results come from:",
        "",
    ]
    for m in sorted(machines):
        f = json.loads(m)
        lines.append(f"- {f.get('cpu_count')} CPU cores ({f.get('processor')}), torch {f.get('torch')}, "
                     f"GPU: {f.get('gpu')}, {f.get('platform')}")
    if not machines:
        lines.append("- (no measured results stored yet)")
    lines += ["", "| # | claim | § | the guide says | guide's figure | measured (mean ± std, n) | verdict | "
              "setup | rerun |", "|---|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
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
        if verdict == "not measured" and not d.get("machine"):  # a placeholder: nothing ran in this revision
            verdict = NOT_THIS_REVISION
        elif d.get("machine") and len(d.get("seeds", [])) < FULL_SEEDS:  # say so: fewer seeds than a full run
            verdict += f" ({len(d.get('seeds', []))} seed(s), fewer than a full run's {FULL_SEEDS}: time)"
        setup_short = _cell(d.get("setup", ""))
        if len(setup_short) > 160:
            setup_short = setup_short[:157].rsplit(" ", 1)[0] + " … (below)"
        lines.append(f"| {i} | [{claim.id}](#{claim.id}) | {claim.section} | {wording} | {_cell(claim.claimed)} | "
                     f"{measured} | **{verdict}** | {setup_short} | {cmd} |")
        notes += [f"## {claim.id}", "",
                  f"{claim.section}, guide: “{claim.guide_zh}” — {claim.guide_en}", "",
                  f"**Verdict: {verdict}.** {d.get('summary', '')}", "",
                  f"Setup: {d.get('setup', '')}", ""]
        if d.get("machine"):
            notes += [f"Seeds {d.get('seeds')}, {d.get('seconds', 0.0) / 60:.1f} min, run {d.get('date', '?')} "
                      f"at {_git_text(d)}.", ""]
        if d.get("details"):
            notes += [d["details"].rstrip(), ""]
        for name in d.get("plots", []):
            notes += [f"![{claim.id}: {Path(name).stem}](claims/{name})", ""]
    return "\n".join(lines + ["", *notes]).rstrip() + "\n"


def write_docs(docs: Path, results_dir: Path | None = None) -> Path:
    docs = Path(docs)
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(render_docs(docs, results_dir), encoding="utf-8")
    return docs


def not_measured_result(claim: Claim, reason: str) -> dict:
    """A committed placeholder for a claim this revision did not run (no machine facts: nothing measured)."""
    return {"id": claim.id, "section": claim.section, "claimed": claim.claimed, "verdict": "not measured",
            "summary": f"{NOT_THIS_REVISION}: {reason}", "setup": "", "measurements": [], "plots": [],
            "seeds": [], "quick": False}


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


def _lab_render(args) -> None:
    print(write_docs(Path(args.docs)))


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
    rd = sub.add_parser("render", help="rebuild docs/claims.md from the committed results (docs/claims/results)")
    rd.add_argument("--docs", default="docs/claims.md", help="the page to regenerate (default docs/claims.md)")
    rd.set_defaults(func=_lab_render)
