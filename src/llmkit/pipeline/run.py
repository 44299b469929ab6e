"""`run_pipeline`: the stages in order, skipping what has not changed, resuming what was cut short.

Each stage's fingerprint is a sha256 over what it reads: its resolved config and the digests of the
upstream artifacts (content digests, not timestamps). `<out_dir>/pipeline.json` keeps, per stage, the
fingerprint it last ran with, its status, the digest of what it wrote, its metrics, compute seconds and
MLflow run. A stage is skipped when it is `done` with the same fingerprint and its artifact still hashes
to the recorded digest. A stage that was `running` with the same fingerprint (the pipeline was killed)
runs again with resume on: pretraining and SFT continue from their last checkpoint, the data pipeline
from its last finished phase. A stage whose fingerprint changed starts from an empty directory.

MLflow: one parent run per pipeline (reopened on every rerun), each stage a child run; every stage run is
tagged with the digests of the artifacts it read (as MLflow dataset inputs) and wrote, so a registered
model traces back to its exact data shards and configs. `lineage.json` (an artifact of the parent run and
a file in the run dir) holds the same chain.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path

from llmkit.config import flatten, to_dict
from llmkit.pipeline.config import PipelineConfig
from llmkit.pipeline.digests import fingerprint, path_digest
from llmkit.pipeline.stages import STAGES, Stage, StageContext
from llmkit.track import TrackConfig, Tracker, default_tracking_uri, parent_run

log = logging.getLogger(__name__)

STATE_FILE = "pipeline.json"
LINEAGE_FILE = "lineage.json"
FORMAT_VERSION = 1

# which upstream artifacts each stage reads (for lineage; fingerprints come from Stage.inputs)
READS = {"data": ["samples"], "tokenizer": ["data"], "tokens": ["data", "tokenizer"],
         "pretrain": ["tokenizer", "tokens"], "sft": ["pretrain", "tokens"], "merge": ["pretrain", "sft"],
         "preference": ["merge", "sft", "pretrain"], "quantize": ["preference", "merge", "pretrain"],
         "eval": ["quantize", "preference", "merge", "tokens", "sft"], "register": ["quantize", "preference", "merge", "eval"]}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def load_state(out_dir: str | Path) -> dict:
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}); remove it to start the pipeline over") from e


def _save_state(out: Path, state: dict) -> None:
    tmp = out / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / STATE_FILE)


@contextlib.contextmanager
def _exclusive(out: Path):
    """One pipeline per run dir at a time: a second one fails at once instead of corrupting the first."""
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{out}: another `llmkit pipeline run` is working in this directory") from None
        yield


def _intact(rec: dict) -> bool:
    try:
        return rec.get("status") == "done" and path_digest(rec["artifact"]) == rec.get("artifact_digest",
                                                                                      rec.get("digest"))
    except (FileNotFoundError, KeyError):
        return False


def run_pipeline(cfg: PipelineConfig, restart: bool = False) -> dict:
    """Run (or resume) every enabled stage of `cfg` in order; returns the pipeline state (pipeline.json).

    restart: forget earlier work in `cfg.out_dir` first (the sample corpora and the MLflow store stay).
    Stops early, with `state["stopped"] = stage`, when a stage was stopped by SIGTERM/SIGINT after a
    checkpoint: running the same command again resumes it.
    """
    out = Path(cfg.out_dir)
    if restart and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run(cfg, out)


def _run(cfg: PipelineConfig, out: Path) -> dict:
    state = load_state(out)
    uri = cfg.track.uri or default_tracking_uri(out)
    state.update({"format_version": FORMAT_VERSION, "name": cfg.name, "out_dir": str(out),
                  "tracking_uri": uri if cfg.track.enabled else None, "config": to_dict(cfg),
                  "cost": to_dict(cfg.cost), "stopped": None})
    records: dict[str, dict] = state.setdefault("stages", {})
    parent = Tracker(TrackConfig(enabled=cfg.track.enabled, uri=uri, experiment=cfg.track.experiment,
                                 run_name=cfg.track.run_name or cfg.name), out)
    parent.start(state.get("parent_run_id"))
    state["parent_run_id"] = parent.run_id
    parent.log_params(flatten(to_dict(cfg)))
    ctx = StageContext(cfg, out, uri, cfg.track.experiment, records, parent.run_id)
    t_all = time.perf_counter()
    try:
        for stage in STAGES:
            if not stage.enabled(cfg):
                records.pop(stage.name, None)
                continue
            if not _run_stage(stage, ctx, state, parent):
                state["stopped"] = stage.name
                _save_state(out, state)
                parent.end("KILLED")
                return state
        state["seconds_last_run"] = time.perf_counter() - t_all
        _write_lineage(out, state)
        parent.log_artifact(out / LINEAGE_FILE)
        parent.log_artifact(out / STATE_FILE)
        _save_state(out, state)
        parent.end("FINISHED")
    except BaseException as e:
        _save_state(out, state)
        parent.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    return state


def _run_stage(stage: Stage, ctx: StageContext, state: dict, parent: Tracker) -> bool:
    """Run or skip one stage; False when it was stopped by a signal (the pipeline stops too)."""
    name, out = stage.name, ctx.out
    rec = ctx.records.get(name, {})
    fp = fingerprint({"stage": name, "inputs": stage.inputs(ctx)})
    if rec.get("fingerprint") == fp and _intact(rec):
        rec["skipped_last"] = True
        log.info("pipeline: %s unchanged (fingerprint %s), skipped", name, fp[:12])
        _save_state(out, state)
        return True
    resuming = rec.get("fingerprint") == fp and rec.get("status") in ("running", "failed")
    if not resuming and stage.wipe_on_change and ctx.dir(name).exists():
        shutil.rmtree(ctx.dir(name))
    rec = {"status": "running", "fingerprint": fp, "started_at": _now(),
           "seconds": rec.get("seconds", 0.0) if resuming else 0.0, "runs": rec.get("runs", 0) + 1,
           "skipped_last": False, "run_id": rec.get("run_id") if resuming else None}
    ctx.records[name] = rec
    _save_state(out, state)
    log.info("pipeline: %s %s", "resuming" if resuming else "running", name)
    t = time.perf_counter()
    own = None
    try:
        with parent_run(parent.run_id):
            if not stage.tracks_itself:
                own = Tracker(TrackConfig(enabled=ctx.cfg.track.enabled, uri=ctx.tracking_uri,
                                          experiment=ctx.experiment, run_name=f"{ctx.cfg.name}/{name}"),
                              ctx.dir(name))
                own.start(rec["run_id"])
                rec["run_id"] = own.run_id
                _save_state(out, state)
            result = stage.run(ctx)
    except BaseException as e:
        rec.update(status="failed", error=f"{type(e).__name__}: {e}", seconds=rec["seconds"] + time.perf_counter() - t)
        if own is not None:
            own.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    rec["seconds"] += time.perf_counter() - t
    if result.stopped:
        rec["status"] = "running"  # a checkpoint was written: the next run resumes it
        return False
    artifact_digest = path_digest(result.artifact)
    rec.update(status="done", finished_at=_now(), artifact=str(result.artifact),
               digest=result.digest or artifact_digest, artifact_digest=artifact_digest,
               metrics=result.metrics, run_id=result.run_id or rec["run_id"])
    rec.pop("error", None)
    _tag_stage_run(ctx, name, rec, own)
    parent.log_metrics({f"{name}.seconds": rec["seconds"],
                        **{f"{name}.{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float))}},
                       step=0)
    _save_state(out, state)
    return True


def _tag_stage_run(ctx: StageContext, name: str, rec: dict, own: Tracker | None) -> None:
    """Lineage on the stage's MLflow run: upstream digests as dataset inputs, its own digest as output."""
    if not ctx.cfg.track.enabled or not rec.get("run_id"):
        return
    # the stage's own run (data / pretrain / sft / register) is closed by now: log into it as it is
    tracker = own if own is not None else Tracker.attach(ctx.tracking_uri, rec["run_id"])
    for up in READS.get(name, []):
        urec = ctx.records.get(up)
        if urec and urec.get("status") == "done":
            tracker.log_dataset(f"{ctx.cfg.name}/{up}", urec["digest"], urec["artifact"], context="input")
    tracker.log_dataset(f"{ctx.cfg.name}/{name}", rec["digest"], rec["artifact"], context="output")
    tracker.set_tags({"llmkit.pipeline": ctx.cfg.name, "llmkit.stage": name, "llmkit.fingerprint": rec["fingerprint"],
                      "llmkit.output_digest": rec["digest"]})
    if own is not None:
        own.log_metrics({k: v for k, v in rec["metrics"].items() if isinstance(v, (int, float))}, step=0)
        own.end("FINISHED")


def _write_lineage(out: Path, state: dict) -> None:
    chain = {name: {"artifact": rec.get("artifact"), "digest": rec.get("digest"), "fingerprint": rec.get("fingerprint"),
                    "reads": {up: state["stages"][up]["digest"] for up in READS.get(name, [])
                              if state["stages"].get(up, {}).get("status") == "done"},
                    "run_id": rec.get("run_id")}
             for name, rec in state["stages"].items() if rec.get("status") == "done"}
    (out / LINEAGE_FILE).write_text(json.dumps({"pipeline": state["name"], "parent_run_id": state.get("parent_run_id"),
                                                "stages": chain}, indent=2) + "\n")
