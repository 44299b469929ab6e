"""`llmkit eval`: run tasks on a model, cache every example's result, aggregate with standard errors.

Per-example results are appended (one JSON line each, flushed per batch) to
``<cache_dir>/<key>.jsonl`` where key = sha256 of (model digest, task file digest, prompt format: layout,
shots, chat template or none, bos, generation settings). A killed eval resumes from the examples already
written; a rerun with everything cached does not load the model at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmkit.eval.tasks import (
    FORMATS,
    GSM8K_FLEXIBLE,
    GSM8K_STRICT,
    Example,
    Task,
    build_prompt,
    choice_texts,
    fewshot_for,
    load_task,
    normalize_number,
)

log = logging.getLogger(__name__)
CACHE_VERSION = 1
"""Bumped when what is cached per example changes meaning."""
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")
"""lm-eval gsm8k's `until`."""


@dataclass
class EvalConfig:
    model: str = ""
    tasks: str = ""
    """Comma-separated: named tasks (sample_mmlu, ...) or LAYOUT:PATH."""
    shots: int = 0
    limit: int | None = None
    """First N examples of each task."""
    batch_size: int = 8
    chat_template: bool = False
    """Wrap each prompt as one user turn in the model's chat template (the choice is scored as the reply)."""
    max_new_tokens: int = 256
    out: str | None = None
    cache_dir: str = "runs/eval_cache"
    device: str = "auto"
    track: bool = False
    tracking_uri: str | None = None
    experiment: str = "llmkit-eval"


def model_digest(model_dir: Path, cache_dir: Path) -> str:
    """sha256 over a model dir's files (names and bytes); remembered per (name, size, mtime) in cache_dir."""
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file())
    stamp = json.dumps([[str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    memo = cache_dir / "model_digests.json"
    known = json.loads(memo.read_text()) if memo.is_file() else {}
    key = hashlib.sha256((str(Path(model_dir).resolve()) + stamp).encode()).hexdigest()
    if key in known:
        return known[key]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(model_dir)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    known[key] = h.hexdigest()
    cache_dir.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps(known))
    return known[key]


def mean_stderr(values) -> float | None:
    """Standard error of a mean: sample standard deviation (n - 1) / sqrt(n), as lm-eval's mean_stderr."""
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return None
    return float(a.std(ddof=1) / math.sqrt(len(a)))


def acc_from_loglikelihoods(lls: list[float], choices: list[str], gold: int) -> tuple[float, float]:
    """(acc, acc_norm) of one example as lm-eval's multiple_choice: argmax of the summed log-likelihoods,
    and argmax of log-likelihood / the choice's length in characters."""
    ll = np.asarray(lls)
    lengths = np.array([float(len(c)) for c in choices])
    return float(np.argmax(ll) == gold), float(np.argmax(ll / lengths) == gold)


def extract_strict(text: str) -> str:
    """The first "#### N" of a generation (lm-eval's strict-match), "[invalid]" when there is none."""
    m = GSM8K_STRICT.findall(text)
    return m[0] if m else "[invalid]"


def extract_flexible(text: str) -> str:
    """The last number of a generation (lm-eval's flexible-extract regex, last match), else "[invalid]"."""
    matches = GSM8K_FLEXIBLE.findall(text)
    if not matches:
        return "[invalid]"
    m = matches[-1]
    return next((g for g in m if g), "[invalid]") if isinstance(m, tuple) else m


class _Runner:
    """Loads the model only when some example is not cached."""

    def __init__(self, cfg: EvalConfig, model_dir: Path):
        self.cfg, self.model_dir = cfg, model_dir
        self._loaded = None

    def get(self):
        if self._loaded is None:
            from llmkit.infer.load import load_for_inference
            from llmkit.models.decoder import Decoder

            self._loaded = load_for_inference(self.model_dir, device=self.cfg.device)
            if not isinstance(self._loaded[0], Decoder):
                raise ValueError(f"{self.model_dir}: llmkit eval scores decoder-only models, this one is "
                                 f"{type(self._loaded[0]).__name__}")
            if self.cfg.chat_template and self._loaded[2] is None:
                raise ValueError(f"--chat-template: {self.model_dir} has no chat template")
        return self._loaded


def _template_fingerprint(model_dir: Path) -> str | None:
    from llmkit.chat import has_chat_template, load_chat_template

    if not has_chat_template(model_dir):
        return None
    t = load_chat_template(model_dir)
    return t.fingerprint() if hasattr(t, "fingerprint") else repr(t)


def _prompt_ids(tok, template, cfg: EvalConfig, prompt: str) -> list[int]:
    if cfg.chat_template:
        from llmkit.infer.reply import reply_prompt_ids

        return reply_prompt_ids(tok, template, [{"role": "user", "content": prompt}])
    return tok.encode(prompt, add_bos=bool(getattr(tok, "add_bos_token", False)))


def _mc_requests(task: Task, ex: Example, cfg: EvalConfig, tok, template) -> list[tuple[list[int], list[int]]]:
    from llmkit.eval.scoring import encode_pair

    prompt = build_prompt(task.kind, ex, fewshot_for(task, ex, cfg.shots))
    conts = choice_texts(task.kind, ex)
    if cfg.chat_template:
        ctx = _prompt_ids(tok, template, cfg, prompt)
        return [(ctx, tok.encode(c)) for c in conts]
    delim = FORMATS[task.kind].delimiter
    add_bos = bool(getattr(tok, "add_bos_token", False))
    pairs = [encode_pair(tok, prompt, delim + c, add_bos) for c in conts]
    if any(not ctx for ctx, _ in pairs):
        raise ValueError(f"{ex.source}: empty context")
    return pairs


def _score_mc(task, todo, cfg, runner, write) -> None:
    from llmkit.eval.scoring import loglikelihoods

    model, tok, template = runner.get()
    chunk = max(1, cfg.batch_size * 4)
    for s in range(0, len(todo), chunk):
        exs = todo[s:s + chunk]
        reqs, owner = [], []
        for ex in exs:
            for r in _mc_requests(task, ex, cfg, tok, template):
                reqs.append(r)
                owner.append(ex)
        res = loglikelihoods(model, reqs, batch_size=cfg.batch_size)
        pos = 0
        for ex in exs:
            k = len(ex.choices)
            part = res[pos:pos + k]
            pos += k
            lls = [r[0] for r in part]
            acc, acc_norm = acc_from_loglikelihoods(lls, choice_texts(task.kind, ex), int(ex.gold))
            write({"id": ex.id, "subject": ex.subject, "ll": lls, "greedy": [r[1] for r in part], "gold": ex.gold,
                   "acc": acc, "acc_norm": acc_norm, "truncated": any(r[2] for r in part)})


def _score_gsm8k(task, todo, cfg, runner, write) -> None:
    from llmkit.eval.scoring import greedy_generate
    from llmkit.infer.reply import reply_stop_ids

    model, tok, template = runner.get()
    stop_ids = reply_stop_ids(tok, template if cfg.chat_template else None)
    chunk = max(1, cfg.batch_size * 2)
    for s in range(0, len(todo), chunk):
        exs = todo[s:s + chunk]
        prompts = [_prompt_ids(tok, template, cfg, build_prompt("gsm8k", ex, fewshot_for(task, ex, cfg.shots)))
                   for ex in exs]
        outs = greedy_generate(model, tok, prompts, cfg.max_new_tokens, GSM8K_STOP, stop_ids, cfg.batch_size)
        for ex, out in zip(exs, outs):
            strict, flex = extract_strict(out), extract_flexible(out)
            write({"id": ex.id, "output": out, "gold": ex.gold, "strict": strict, "flexible": flex,
                   "exact_match_strict": float(normalize_number(strict) == ex.gold),
                   "exact_match_flexible": float(normalize_number(flex) == ex.gold)})


def _score_ppl(task, todo, cfg, runner, write) -> None:
    from llmkit.eval.scoring import rolling_nll

    model, tok, _ = runner.get()
    for ex in todo:
        ids = tok.encode(ex.text)
        lead = tok.bos_id if tok.bos_id is not None else tok.eos_id
        if lead is not None:  # every token of the text is predicted, the first from bos (or eos)
            ids = [lead] + ids
            n_bytes = len(ex.text.encode("utf-8"))
        else:  # the first token has nothing before it: its bytes are not counted
            n_bytes = len(ex.text.encode("utf-8")) - len(tok.decode(ids[:1]).encode("utf-8"))
        nll, n = rolling_nll(model, ids, cfg.batch_size)
        write({"id": ex.id, "nll": nll, "tokens": n, "bytes": n_bytes})


def _aggregate(task: Task, records: list[dict]) -> dict:
    if task.kind == "ppl":
        nll = sum(r["nll"] for r in records)
        tokens = sum(r["tokens"] for r in records)
        nbytes = sum(r["bytes"] for r in records)
        return {"n": len(records), "tokens": tokens, "bytes": nbytes,
                "metrics": {"perplexity": math.exp(nll / tokens) if tokens else None,
                            "bits_per_byte": nll / (math.log(2) * nbytes) if nbytes else None,
                            "nll_per_token": nll / tokens if tokens else None}}
    keys = ["exact_match_strict", "exact_match_flexible"] if task.kind == "gsm8k" else ["acc", "acc_norm"]

    def stats(rows: list[dict]) -> dict:
        return {k: {"value": float(np.mean([r[k] for r in rows])) if rows else None,
                    "stderr": mean_stderr([r[k] for r in rows])} for k in keys}

    out = {"n": len(records), "metrics": stats(records)}
    if task.kind != "gsm8k":
        out["truncated"] = sum(bool(r.get("truncated")) for r in records)
    subjects = sorted({r.get("subject", "") for r in records} - {""})
    if subjects:
        per = {}
        for s in subjects:
            rows = [r for r in records if r.get("subject") == s]
            per[s] = {"n": len(rows), **{k: v for k, v in stats(rows).items()}}
        out["subjects"] = per
        out["metrics_macro"] = {k: float(np.mean([per[s][k]["value"] for s in subjects])) for k in keys}
        if task.categories:  # C-Eval reports STEM / Social Science / Humanities / Other as means over subjects
            cats: dict[str, list[str]] = {}
            for s in subjects:
                cats.setdefault(task.categories.get(s, "Other"), []).append(s)
            out["categories"] = {c: {"subjects": len(ss), "n": sum(per[s]["n"] for s in ss),
                                     **{k: float(np.mean([per[s][k]["value"] for s in ss])) for k in keys}}
                                 for c, ss in sorted(cats.items())}
    return out


def _cache_key(task: Task, cfg: EvalConfig, mdigest: str, template_fp: str | None) -> tuple[str, dict]:
    fmt = {"version": CACHE_VERSION, "kind": task.kind, "shots": cfg.shots if task.kind != "ppl" else 0,
           "prompt_format": FORMATS[task.kind].__dict__ if task.kind in FORMATS else "rolling",
           "chat_template": template_fp if cfg.chat_template else None}
    if task.kind == "gsm8k":
        fmt.update(max_new_tokens=cfg.max_new_tokens, stop=list(GSM8K_STOP))
    key = hashlib.sha256(json.dumps({"model": mdigest, "task": task.digest(), "format": fmt},
                                    sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]
    return key, fmt


def _read_cache(path: Path) -> dict[str, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            done[rec["id"]] = rec
    return done


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate `cfg.model` on `cfg.tasks`; returns (and writes to cfg.out) the results dict."""
    from llmkit.registry import resolve_model

    specs = [t for t in (s.strip() for s in cfg.tasks.split(",")) if t]
    if not specs:
        raise ValueError("--tasks: give at least one task")
    tasks = [load_task(s) for s in specs]  # every name and file checked before any model work
    model_dir = Path(resolve_model(cfg.model))
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    cache_dir = Path(cfg.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    mdigest = model_digest(model_dir, cache_dir)
    template_fp = _template_fingerprint(model_dir) if cfg.chat_template else None
    if cfg.chat_template and template_fp is None:
        raise ValueError(f"--chat-template: {model_dir} has no chat template")
    runner = _Runner(cfg, model_dir)
    results: dict = {"model": str(model_dir), "model_digest": mdigest, "shots": cfg.shots, "limit": cfg.limit,
                     "chat_template": cfg.chat_template, "tasks": {}}
    for task in tasks:
        for m in task.malformed:
            log.warning("malformed row: %s", m)
        examples = task.examples[:cfg.limit] if cfg.limit is not None else task.examples
        key, fmt = _cache_key(task, cfg, mdigest, template_fp)
        path = cache_dir / f"{key}.jsonl"
        done = _read_cache(path)
        todo = [e for e in examples if e.id not in done]
        computed = 0
        if todo:
            with open(path, "a", encoding="utf-8") as f:
                def write(rec: dict, done: dict = done) -> None:
                    nonlocal computed
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    done[rec["id"]] = rec
                    computed += 1

                scorer = {"gsm8k": _score_gsm8k, "ppl": _score_ppl}.get(task.kind, _score_mc)
                scorer(task, todo, cfg, runner, write)
        records = [done[e.id] for e in examples]
        agg = _aggregate(task, records)
        agg.update(kind=task.kind, path=str(task.path), task_digest=task.digest(), cache_file=str(path),
                   cached=len(examples) - computed, computed=computed, prompt_format=fmt,
                   malformed_count=len(task.malformed), malformed=[str(m) for m in task.malformed[:50]])
        if examples and task.kind != "ppl":
            agg["example_prompt"] = build_prompt(task.kind, examples[0], fewshot_for(task, examples[0], cfg.shots))
        results["tasks"][task.name] = agg
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if cfg.track:
        _track(cfg, results)
    return results


def _metric_name(s: str) -> str:
    """MLflow metric names allow word characters (Unicode ones too), - . / : and spaces."""
    return re.sub(r"[^\w\-./ :]", "_", s)


def flat_metrics(results: dict) -> dict[str, float]:
    """{"<task>.<metric>": value, "<task>.<subject>.<metric>": value} for MLflow (names sanitised)."""
    out = {}
    for name, t in results["tasks"].items():
        tn = _metric_name(name)
        for k, v in t["metrics"].items():
            val = v["value"] if isinstance(v, dict) else v
            if val is not None:
                out[f"{tn}.{k}"] = val
                if isinstance(v, dict) and v.get("stderr") is not None:
                    out[f"{tn}.{k}_stderr"] = v["stderr"]
        for s, st in t.get("subjects", {}).items():
            for k, v in st.items():
                if isinstance(v, dict) and v["value"] is not None:
                    out[f"{tn}.{_metric_name(s)}.{k}"] = v["value"]
    return out


def _track(cfg: EvalConfig, results: dict) -> None:
    from llmkit.track import TrackConfig, Tracker

    out_dir = Path(cfg.out).parent if cfg.out else Path(cfg.cache_dir)
    tracker = Tracker(TrackConfig(uri=cfg.tracking_uri, experiment=cfg.experiment,
                                  run_name=f"eval-{Path(results['model']).name}"), out_dir)
    tracker.start()
    with tracker:
        tracker.log_params({"model": results["model"], "model_digest": results["model_digest"], "tasks": cfg.tasks,
                            "shots": cfg.shots, "limit": cfg.limit, "chat_template": cfg.chat_template,
                            "batch_size": cfg.batch_size})
        for name, t in results["tasks"].items():
            tracker.log_dataset(name, t["task_digest"], t["path"], context="eval")
        tracker.log_metrics(flat_metrics(results), step=0)
        if cfg.out:
            tracker.log_artifact(cfg.out)
    results["mlflow_run_id"] = tracker.run_id
