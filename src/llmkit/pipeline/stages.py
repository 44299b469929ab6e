"""The pipeline's stages: what each reads (its fingerprint), what it runs, and what it leaves behind.

Every stage is two functions over a `StageContext`: `inputs(ctx)` returns the JSON-able material of its
fingerprint (its resolved config and the digests of the upstream artifacts it reads), and `run(ctx)` does
the work, resumably, and returns a `StageOutput`. Stages whose library function tracks itself (data,
pretrain, sft) make their own MLflow run, a child of the pipeline's; the runner opens one for the others.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.config import load_config, to_dict
from llmkit.data.corpus import CorpusConfig, build_corpus, phase_fingerprints
from llmkit.data.samples import fetch_samples, select_samples
from llmkit.data.tokenized import file_sha256, prepare_tokens
from llmkit.pipeline.config import PipelineConfig, StageRecipe
from llmkit.pipeline.digests import path_digest
from llmkit.registry import register_model, resolve_model
from llmkit.tokenizer import Tokenizer, train_tokenizer

# The stages that need torch (pretrain, sft, merge, quantize, eval) import their library inside their
# functions, so `llmkit pipeline status`, `llmkit report` and a run that skips them start without it.

DATA_OUTPUT = "data"
"""The data pipeline's cleaned shards sit in <data stage dir>/data."""


@dataclass
class StageContext:
    """What a stage sees: the recipe, the run dir, the tracking store, and the finished upstream stages."""

    cfg: PipelineConfig
    out: Path
    tracking_uri: str
    experiment: str
    records: dict[str, dict]
    """Stage name -> its record in pipeline.json (artifact, digest, metrics, status, ...)."""
    parent_run_id: str | None = None
    """The pipeline's MLflow run; stage runs are its children."""

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def artifact(self, stage: str) -> Path:
        rec = self.records.get(stage)
        if not rec or rec.get("status") != "done":
            raise ValueError(f"stage {stage!r} has not finished: it must run before the stages that read it")
        return Path(rec["artifact"])

    def digest(self, stage: str) -> str:
        self.artifact(stage)
        return self.records[stage]["digest"]

    def track_overrides(self, stage: str) -> list[str]:
        """Point a stage's own MLflow run at the pipeline's store, named after the pipeline and stage."""
        if not self.cfg.track.enabled:
            return ["track.enabled=false"]
        return [f"track.uri={self.tracking_uri}", f"track.experiment={self.experiment}",
                f"track.run_name={self.cfg.name}/{stage}"]


@dataclass
class StageOutput:
    artifact: Path
    """The directory (or file) the next stages read; its digest goes into their fingerprints."""
    metrics: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    """The stage's own MLflow run, for stages that track themselves."""
    stopped: bool = False
    """Stopped by SIGTERM/SIGINT after a checkpoint: the pipeline stops too; rerunning resumes."""
    digest: str | None = None
    """A digest the stage already computed for its artifact (else the runner hashes the directory)."""


@dataclass
class Stage:
    name: str
    enabled: Callable[[PipelineConfig], bool]
    inputs: Callable[[StageContext], dict]
    run: Callable[[StageContext], StageOutput]
    tracks_itself: bool = False
    wipe_on_change: bool = True
    """Empty the stage dir before running with a changed fingerprint (its old checkpoints are for other inputs)."""


def _recipe(ctx: StageContext, recipe: StageRecipe, cls, wiring: list[str]):
    """The stage's config: its file, the user's overrides, then the pipeline's wiring (which wins)."""
    return load_config(cls, recipe.config, [*recipe.overrides, *wiring])


def _data_files(ctx: StageContext) -> list[str]:
    files = sorted(str(p) for p in (ctx.artifact("data")).glob("*") if p.is_file())
    if not files:
        raise ValueError(f"{ctx.artifact('data')}: the data stage wrote no shards")
    return files


def _texts(ctx: StageContext, explicit: list[str]) -> tuple[list[str], dict]:
    """Files a stage reads: the explicit list (digested by content) or the data stage's shards."""
    if explicit:
        return list(explicit), {"files": {f: file_sha256(f) for f in explicit}}
    return _data_files(ctx), {"data": ctx.digest("data")}


# -- samples ------------------------------------------------------------------------------------------
def _samples_inputs(ctx: StageContext) -> dict:
    s = ctx.cfg.samples
    return {"out": s.out, "files": [(x.path, x.sha256) for x in select_samples(s.only or None)]}


def _samples_run(ctx: StageContext) -> StageOutput:
    s = ctx.cfg.samples
    paths = fetch_samples(s.out, from_dir=s.from_dir, only=s.only or None)
    return StageOutput(Path(s.out), {"files": len(paths)})


# -- data -----------------------------------------------------------------------------------------
def _data_config(ctx: StageContext):
    return _recipe(ctx, ctx.cfg.data, CorpusConfig, [f"out_dir={ctx.dir('data')}",
                                                    *ctx.track_overrides("data")])


def _data_inputs(ctx: StageContext) -> dict:
    cfg = _data_config(ctx)
    # the data pipeline fingerprints its own phases over the config and every input file's content
    return {"config": to_dict(cfg), "phases": phase_fingerprints(cfg)}


def _data_run(ctx: StageContext) -> StageOutput:
    manifest = build_corpus(_data_config(ctx))
    run_file = ctx.dir("data") / "work" / "run.json"
    run_id = json.loads(run_file.read_text()).get("run_id") if run_file.is_file() else None
    return StageOutput(ctx.dir("data") / DATA_OUTPUT, {
        "docs_in": manifest["funnel"][0]["in"], "docs_out": manifest["output"]["docs"],
        "mb_s_per_core": manifest["throughput"]["pipeline_mb_s_per_core"]}, run_id=run_id)


# -- tokenizer ------------------------------------------------------------------------------------
def _tokenizer_inputs(ctx: StageContext) -> dict:
    t = ctx.cfg.tokenizer
    _, source = _texts(ctx, t.inputs)
    return {"kind": t.kind, "vocab_size": t.vocab_size, "min_frequency": t.min_frequency, **source}


def _tokenizer_run(ctx: StageContext) -> StageOutput:
    t = ctx.cfg.tokenizer
    files, _ = _texts(ctx, t.inputs)
    tok = train_tokenizer(files, kind=t.kind, vocab_size=t.vocab_size, min_frequency=t.min_frequency)
    tok.save(ctx.dir("tokenizer"))
    return StageOutput(ctx.dir("tokenizer"), {"vocab_size": tok.vocab_size})


# -- tokens ---------------------------------------------------------------------------------------
def _tokens_inputs(ctx: StageContext) -> dict:
    _, source = _texts(ctx, ctx.cfg.tokens.inputs)
    return {"val_fraction": ctx.cfg.tokens.val_fraction, "tokenizer": ctx.digest("tokenizer"), **source}


def _tokens_run(ctx: StageContext) -> StageOutput:
    files, _ = _texts(ctx, ctx.cfg.tokens.inputs)
    meta = prepare_tokens(files, Tokenizer.load(ctx.artifact("tokenizer")), ctx.dir("tokens"),
                          val_fraction=ctx.cfg.tokens.val_fraction)
    # the digest of the token streams themselves: meta.json also names the input paths, which may move
    streams = {s: info["sha256"] for s, info in sorted(meta["splits"].items())}
    digest = hashlib.sha256(json.dumps({"tokenizer": ctx.digest("tokenizer"), "splits": streams},
                                       sort_keys=True).encode()).hexdigest()
    return StageOutput(ctx.dir("tokens"), {f"{s}_tokens": info["tokens"] for s, info in meta["splits"].items()},
                       digest=digest)


# -- pretrain -------------------------------------------------------------------------------------
def _pretrain_config(ctx: StageContext):
    from llmkit.train.pretrain import PretrainConfig

    return _recipe(ctx, ctx.cfg.pretrain, PretrainConfig, [
        f"out_dir={ctx.dir('pretrain')}", f"data.tokenizer={ctx.artifact('tokenizer')}",
        f"data.prepared={ctx.artifact('tokens')}", "data.inputs=[]", *ctx.track_overrides("pretrain")])


def _pretrain_inputs(ctx: StageContext) -> dict:
    cfg = to_dict(_pretrain_config(ctx))
    cfg["train"].pop("progress", None)  # a progress bar does not change the model
    return {"config": cfg, "tokenizer": ctx.digest("tokenizer"), "tokens": ctx.digest("tokens")}


def _pretrain_run(ctx: StageContext) -> StageOutput:
    from llmkit.train.pretrain import pretrain

    summary = pretrain(_pretrain_config(ctx), resume=True)
    metrics = {k: summary[k] for k in ("step", "train_loss", "val_loss", "val_bpb", "tokens_per_s", "n_params")
               if summary.get(k) is not None}
    return StageOutput(ctx.dir("pretrain") / "final", metrics, run_id=summary.get("tracking_run_id"),
                       stopped=bool(summary.get("stopped_by_signal")))


# -- sft ------------------------------------------------------------------------------------------
def _pretrained(ctx: StageContext) -> bool:
    return ctx.cfg.pretrain.enabled


def _base_model(ctx: StageContext) -> Path:
    """What SFT starts from: the pretrain stage's model, or (pretrain disabled) the SFT config's own
    `base_model`, e.g. a checkpoint brought in with `llmkit import hf`."""
    if _pretrained(ctx):
        return ctx.artifact("pretrain")
    from llmkit.finetune.sft import SFTConfig

    base = _recipe(ctx, ctx.cfg.sft, SFTConfig, _sft_wiring(ctx)).base_model
    if not base:
        raise ValueError("pretrain.enabled is false: the sft config must name its base_model")
    return resolve_model(base)


def _base_digest(ctx: StageContext) -> str:
    if _pretrained(ctx):
        return ctx.digest("pretrain")
    return path_digest(_base_model(ctx))


def _sft_wiring(ctx: StageContext) -> list[str]:
    wiring = [f"out_dir={ctx.dir('sft')}", *ctx.track_overrides("sft")]
    if ctx.records.get("tokens", {}).get("status") == "done":  # pretraining data mixed in against forgetting
        wiring.append(f"data.pretrain={ctx.artifact('tokens')}")
    return wiring


def _sft_config(ctx: StageContext):
    from llmkit.finetune.sft import SFTConfig

    return _recipe(ctx, ctx.cfg.sft, SFTConfig, [*_sft_wiring(ctx), f"base_model={_base_model(ctx)}"])


def _sft_inputs(ctx: StageContext) -> dict:
    cfg = to_dict(_sft_config(ctx))
    cfg["train"].pop("progress", None)
    return {"config": cfg, "base": _base_digest(ctx),
            "instructions": {p: file_sha256(p) for p in cfg["data"]["paths"]},
            "tokens": ctx.records.get("tokens", {}).get("digest")}


def _sft_run(ctx: StageContext) -> StageOutput:
    from llmkit.finetune.sft import finetune_sft

    cfg = _sft_config(ctx)
    summary = finetune_sft(cfg, resume=True)
    metrics = {k: summary[k] for k in ("step", "eval_loss", "exact_match", "rouge_l", "trainable_share")
               if summary.get(k) is not None}
    metrics["method"] = cfg.method
    return StageOutput(ctx.dir("sft") / "final", metrics, run_id=summary.get("tracking_run_id"),
                       stopped=bool(summary.get("stopped_by_signal")))


# -- merge ----------------------------------------------------------------------------------------
def _sft_method(ctx: StageContext) -> str:
    return ctx.records.get("sft", {}).get("metrics", {}).get("method") or _sft_config(ctx).method


def _merge_inputs(ctx: StageContext) -> dict:
    return {"base": _base_digest(ctx), "sft": ctx.digest("sft"), "method": _sft_method(ctx)}


def _merge_run(ctx: StageContext) -> StageOutput:
    from llmkit.finetune.merge import merge_adapter

    method = _sft_method(ctx)
    out = ctx.dir("merge")
    if method == "lora":
        merge_adapter(_base_model(ctx), ctx.artifact("sft"), out)
    elif method == "full":  # already a plain model dir: the merged model is that model
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(ctx.artifact("sft"), out)
    else:
        raise ValueError(f"sft method {method!r}: a prefix adapter cannot be folded into the weights, so the "
                         "pipeline cannot quantize or register a plain model; use method lora or full, or "
                         "disable merge / quantize (merge.enabled=false quantize.enabled=false)")
    return StageOutput(out, {"method": method})


# -- preference -----------------------------------------------------------------------------------
def _preference_base(ctx: StageContext) -> Path:
    """What preference tuning starts from: the merged SFT model, a fully fine-tuned SFT model, the pretrained
    model, or (none of those in this pipeline) the preference config's own `base_model`."""
    if ctx.records.get("merge", {}).get("status") == "done":
        return ctx.artifact("merge")
    if ctx.records.get("sft", {}).get("status") == "done":
        if _sft_method(ctx) != "full":
            raise ValueError(f"preference: the sft stage wrote a {_sft_method(ctx)} adapter and merge is disabled; "
                             "preference tuning needs a plain model (enable merge, or use sft method full)")
        return ctx.artifact("sft")
    if _pretrained(ctx):
        return ctx.artifact("pretrain")
    from llmkit.finetune.preference import PreferenceConfig

    base = _recipe(ctx, ctx.cfg.preference, PreferenceConfig, [f"out_dir={ctx.dir('preference')}"]).base_model
    if not base:
        raise ValueError("preference: no sft / pretrain stage ran, so the preference config must name its base_model")
    return resolve_model(base)


def _preference_config(ctx: StageContext):
    from llmkit.finetune.preference import PreferenceConfig

    return _recipe(ctx, ctx.cfg.preference, PreferenceConfig, [
        f"out_dir={ctx.dir('preference')}", f"base_model={_preference_base(ctx)}", *ctx.track_overrides("preference")])


def _preference_inputs(ctx: StageContext) -> dict:
    cfg = to_dict(_preference_config(ctx))
    cfg["train"].pop("progress", None)
    cfg.pop("reference_cache", None)  # where the reference log-probs are cached does not change the result
    files = [*cfg["data"]["paths"], *cfg["data"]["construct_from"]]
    return {"config": cfg, "base": path_digest(_preference_base(ctx)), "data": {f: file_sha256(f) for f in files}}


def _preference_run(ctx: StageContext) -> StageOutput:
    from llmkit.finetune.merge import merge_adapter
    from llmkit.finetune.preference import finetune_preference

    cfg = _preference_config(ctx)
    if cfg.method == "prefix":
        raise ValueError("preference method prefix: a prefix adapter cannot be folded into the weights, so the "
                         "pipeline cannot quantize or register a plain model; use method lora or full")
    summary = finetune_preference(cfg, resume=True)
    metrics = {"method": cfg.method, "loss": cfg.loss, "step": summary["step"]}
    for when in ("before", "after"):
        for k, v in (summary.get(when) or {}).items():
            if isinstance(v, (int, float)):
                metrics[f"{when}_{k}"] = v
    stopped = bool(summary.get("stopped_by_signal"))
    artifact = ctx.dir("preference") / "final"
    if cfg.method == "lora" and not stopped:  # quantize / eval / register read a plain model
        artifact = merge_adapter(cfg.base_model, artifact, ctx.dir("preference") / "merged")
    return StageOutput(artifact, metrics, run_id=summary.get("tracking_run_id"), stopped=stopped)


# -- quantize -------------------------------------------------------------------------------------
def _quantize_inputs(ctx: StageContext) -> dict:
    q = asdict(ctx.cfg.quantize)
    source = None
    if q["mode"] == "static":
        _, source = _texts(ctx, [q["calibration"]] if q["calibration"] else [])
    return {"config": q, "model": ctx.digest(_final_float(ctx)), "calibration": source}


def _final_float(ctx: StageContext) -> str:
    """The newest floating-point model stage that ran: preference, else merge, else pretrain."""
    for stage in ("preference", "merge"):
        if ctx.records.get(stage, {}).get("status") == "done":
            return stage
    return "pretrain"


def _quantize_run(ctx: StageContext) -> StageOutput:
    from llmkit.infer.quantize import QuantConfig, linear_weight_bytes, load_quantized, quantize_dir
    from llmkit.models.io import load_model

    q = ctx.cfg.quantize
    cfg = QuantConfig(mode=q.mode, observer=q.observer)
    if q.with_head:
        cfg.targets = [*cfg.targets, "lm_head"]
    calibration = None
    if q.mode == "static":
        calibration = q.calibration or _data_files(ctx)[0]
    source = ctx.artifact(_final_float(ctx))
    out = quantize_dir(source, ctx.dir("quantize"), cfg, calibration, q.calibration_windows)
    before, after = linear_weight_bytes(load_model(source)), linear_weight_bytes(load_quantized(out))
    return StageOutput(out, {"mode": q.mode, "linear_bytes_before": before["total"],
                             "linear_bytes_after": after["total"],
                             "linear_bytes_saved": 1 - after["total"] / before["total"]})


# -- eval -----------------------------------------------------------------------------------------
def _final_model_stage(ctx: StageContext) -> str:
    if ctx.records.get("quantize", {}).get("status") == "done":
        return "quantize"
    return _final_float(ctx)


def _eval_inputs(ctx: StageContext) -> dict:
    from llmkit.eval.tasks import load_task

    return {"config": asdict(ctx.cfg.eval), "final": ctx.digest(_final_model_stage(ctx)),
            "benchmarks": {spec: load_task(spec).digest() for spec in ctx.cfg.eval.tasks},
            "float": ctx.digest(_final_float(ctx)), "tokens": ctx.records.get("tokens", {}).get("digest"),
            "sft": ctx.records.get("sft", {}).get("digest")}


def _eval_run(ctx: StageContext) -> StageOutput:
    from llmkit.pipeline.evaluate import evaluate_models

    out = ctx.dir("eval")
    out.mkdir(parents=True, exist_ok=True)
    tokens = ctx.artifact("tokens") if ctx.records.get("tokens", {}).get("status") == "done" else None
    results = ctx.dir("sft") / "results.json"
    report = evaluate_models(ctx.artifact(_final_float(ctx)), ctx.artifact(_final_model_stage(ctx)), tokens,
                             results if results.is_file() else None, ctx.cfg.eval, benchmark_cache=out / "cache")
    path = out / "eval.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return StageOutput(path, _eval_metrics(report))


def _eval_metrics(report: dict) -> dict:
    m = {}
    ppl = report.get("perplexity") or {}
    for k in ("fp32", "int8", "delta_rel"):
        if ppl.get(k) is not None:
            m[f"ppl_{k}"] = ppl[k]
    lat = report.get("latency") or {}
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        if lat.get(k):
            m[f"{k}_p50"] = float(np.percentile(lat[k], 50))
            m[f"{k}_p95"] = float(np.percentile(lat[k], 95))
    if lat.get("tokens_per_s"):
        m["load_tokens_per_s"] = lat["tokens_per_s"]
    ft = report.get("finetune") or {}
    for k in ("exact_match", "rouge_l", "int8_rouge_l"):
        if ft.get(k) is not None:
            m[f"finetune_{k}"] = ft[k]
    bench = report.get("benchmarks") or {}
    if bench.get("final"):
        from llmkit.eval.harness import flat_metrics

        m.update({f"bench.{k}": v for k, v in flat_metrics(bench["final"]).items() if k.count(".") == 1})
    return m


# -- register -------------------------------------------------------------------------------------
def _register_inputs(ctx: StageContext) -> dict:
    r = ctx.cfg.register
    return {"name": r.model_name or ctx.cfg.name, "aliases": r.aliases,
            "model": ctx.digest(_final_model_stage(ctx)), "eval": ctx.records.get("eval", {}).get("digest")}


def _register_run(ctx: StageContext) -> StageOutput:
    r = ctx.cfg.register
    name = r.model_name or ctx.cfg.name
    stage = _final_model_stage(ctx)
    tags = {f"metric.{k}": str(v) for k, v in ctx.records.get("eval", {}).get("metrics", {}).items()}
    tags.update({"llmkit.pipeline": ctx.cfg.name, "llmkit.stage": stage,
                 "llmkit.model_digest": ctx.digest(stage)})
    for up in ("data", "tokens", "pretrain", "sft", "preference"):
        if ctx.records.get(up, {}).get("digest"):
            tags[f"lineage.{up}"] = ctx.records[up]["digest"]
    version = register_model(ctx.tracking_uri, ctx.experiment, name, ctx.artifact(stage), r.aliases, tags,
                             parent_run_id=ctx.parent_run_id)
    ctx.dir("register").mkdir(parents=True, exist_ok=True)
    record = ctx.dir("register") / "registered.json"
    record.write_text(json.dumps({"name": name, "version": version["version"], "aliases": r.aliases,
                                  "source": version["source"], "run_id": version["run_id"],
                                  "registered_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    return StageOutput(record, {"version": int(version["version"]), "model": f"models:/{name}/{version['version']}"},
                       run_id=version["run_id"], digest=f"{name}/{version['version']}/{ctx.digest(stage)}")


STAGES: list[Stage] = [
    Stage("samples", lambda c: c.samples.enabled, _samples_inputs, _samples_run, wipe_on_change=False),
    # the data pipeline keeps its own per-phase fingerprints: a changed mix redoes only select + write
    Stage("data", lambda c: c.data.enabled, _data_inputs, _data_run, tracks_itself=True, wipe_on_change=False),
    Stage("tokenizer", lambda c: c.tokenizer.enabled, _tokenizer_inputs, _tokenizer_run),
    Stage("tokens", lambda c: c.tokens.enabled, _tokens_inputs, _tokens_run),
    Stage("pretrain", lambda c: c.pretrain.enabled, _pretrain_inputs, _pretrain_run, tracks_itself=True),
    Stage("sft", lambda c: c.sft.enabled, _sft_inputs, _sft_run, tracks_itself=True),
    Stage("merge", lambda c: c.merge.enabled and c.sft.enabled, _merge_inputs, _merge_run),
    Stage("preference", lambda c: c.preference.enabled, _preference_inputs, _preference_run, tracks_itself=True),
    Stage("quantize", lambda c: c.quantize.enabled, _quantize_inputs, _quantize_run),
    Stage("eval", lambda c: c.eval.enabled, _eval_inputs, _eval_run),
    Stage("register", lambda c: c.register.enabled, _register_inputs, _register_run, tracks_itself=True),
]
STAGE_NAMES = [s.name for s in STAGES]
