"""Experiment tracking with MLflow (guide §4: every stage's versions and data lineage).

By default each run goes into an embedded SQLite store, `sqlite:///<runs root>/mlflow.db`, with artifacts
beside it in `<runs root>/mlartifacts`: no server to start, and `mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db` shows everything. A run records the full resolved config as params, metrics
per step, the config / tokenizer / final model as artifacts, and the digest of its training data as an
MLflow dataset input, so the model can be traced back to the exact tokens it saw.

A resumed job (`pretrain(cfg, resume=True)`) reopens the run id stored in its checkpoint: it logs into the
same run, skips metric steps the run already holds (steps replayed after a crash between checkpoints),
and records params whose value changed on resume as `resume.<key>` tags (MLflow params are immutable).
See docs/tracking.md.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_LENGTH = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MAX_DIGEST_LENGTH = 36  # mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE
_BATCH = 100  # params per log_batch call (MLflow's limit)
PARENT_RUN_ENV = "LLMKIT_PARENT_RUN_ID"
"""When set (by `llmkit pipeline run`), new runs are created as children of this run id: one nested run
per stage under the pipeline's parent run."""


@dataclass
class TrackConfig:
    enabled: bool = True
    uri: str | None = None
    """Tracking URI; None -> sqlite:///<parent of out_dir>/mlflow.db."""
    experiment: str = "llmkit"
    run_name: str | None = None
    """None -> the name of out_dir."""


@contextlib.contextmanager
def parent_run(run_id: str | None):
    """Within the block, runs that start are children of `run_id` (None: no change)."""
    if not run_id:
        yield
        return
    before = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run_id
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = before


def default_tracking_uri(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve().parent / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (None for any other URI, or in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]  # drop options such as ?timeout=30
    return Path(path) if path and path != ":memory:" else None


def _truncate(v: Any, limit: int) -> str:
    s = str(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _param_value(v: Any) -> str:
    return _truncate(v, MAX_PARAM_LENGTH)


class Tracker:
    """One MLflow run. All methods are no-ops when tracking is disabled (or on non-zero ranks).

    `end(status)` closes the run; a run still open when the interpreter exits (the job raised) is
    marked FAILED. Used as a context manager, an exception inside the block ends the run FAILED
    (KILLED for Ctrl-C).
    """

    def __init__(self, config: TrackConfig, out_dir: str | Path, active: bool = True):
        self.enabled = config.enabled and active
        self.config = config
        self.out_dir = Path(out_dir)
        self.run_id: str | None = None
        self.resumed = False
        self._client = None
        self._ended = False
        self._logged_until: dict[str, int] = {}
        """Per metric key, the last step the reopened run already holds (replays up to it are skipped)."""
        self.uri = config.uri or default_tracking_uri(out_dir)

    @classmethod
    def attach(cls, uri: str, run_id: str) -> Tracker:
        """A handle that logs into an existing run (e.g. a finished one) without reopening or ending it."""
        from mlflow.tracking import MlflowClient

        tracker = cls(TrackConfig(uri=uri), ".")
        tracker._client, tracker.run_id, tracker._ended = MlflowClient(tracking_uri=uri), run_id, True
        return tracker

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, run_id: str | None = None) -> str | None:
        """Open a new run, or reopen `run_id` (a resumed job keeps logging into its original run).

        Falls back to a new run (with a warning) when `run_id` is not in the store or was deleted.
        """
        if not self.enabled:
            return None
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        from mlflow.tracking import MlflowClient

        db = sqlite_path(self.uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=self.uri)
        self._ended, self.resumed, self._logged_until = False, False, {}
        if run_id is None or not self._reopen(run_id):
            tags = self._context_tags()
            if os.environ.get(PARENT_RUN_ENV):
                tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
            run = self._client.create_run(self._experiment_id(), tags=tags,
                                          run_name=self.config.run_name or self.out_dir.name)
            self.run_id = run.info.run_id
        atexit.register(self._end_at_exit)
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED (a preempted run is KILLED until it is resumed)."""
        if self.run_id and not self._ended:
            self._client.set_terminated(self.run_id, status=status)
            self._ended = True
            atexit.unregister(self._end_at_exit)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _end_at_exit(self) -> None:
        if self.run_id and not self._ended:
            try:
                self.end("FAILED")
            except Exception:  # the store may be gone at interpreter exit; nothing more to do
                pass

    def _reopen(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            # the store was moved or wiped: record the continuation as a new run
            log.warning("tracking run %s not found in %s; starting a new run", run_id, self.uri)
            return False
        if run.info.lifecycle_stage != "active":
            log.warning("tracking run %s was deleted from %s; starting a new run", run_id, self.uri)
            return False
        self._client.update_run(run_id, status="RUNNING")
        for key in run.data.metrics:
            steps = [m.step for m in self._client.get_metric_history(run_id, key)]
            if steps:
                self._logged_until[key] = max(steps)
        resumes = int(run.data.tags.get("llmkit.resumes", "0")) + 1
        self._client.set_tag(run_id, "llmkit.resumes", str(resumes))
        self.run_id, self.resumed = run_id, True
        log.info("tracking: resumed MLflow run %s in %s", run_id, self.uri)
        return True

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.config.experiment
        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self._client.create_experiment(name, artifact_location=self._artifact_location())
            except MlflowException as e:  # another job created it at the same moment
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self._client.get_experiment_by_name(name)
        if exp.lifecycle_stage != "active":
            raise ValueError(f"track.experiment: experiment {name!r} in {self.uri} is deleted; restore it "
                             f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or choose "
                             f"another track.experiment")
        return exp.experiment_id

    def _artifact_location(self) -> str | None:
        """`<store dir>/mlartifacts` beside a SQLite store; None (the server decides) for anything else."""
        db = sqlite_path(self.uri)
        return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None

    @staticmethod
    def _context_tags() -> dict[str, str]:
        """mlflow.user / mlflow.source.* / git commit, as MLflow's fluent `start_run` would set them."""
        try:
            from mlflow.tracking.context.registry import resolve_tags

            return {k: _truncate(v, MAX_TAG_LENGTH) for k, v in resolve_tags().items()}
        except Exception as e:  # an internal MLflow module: never let it stop training
            log.debug("could not resolve MLflow context tags: %s", e)
            return {}

    # -- logging -----------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Log params. On a reopened run, params it already holds are kept (MLflow params are
        immutable); a changed value is recorded as tag `resume.<key>` instead."""
        if not self.run_id:
            return
        from mlflow.entities import Param

        values = {k: _param_value(v) for k, v in params.items()}
        existing = self._client.get_run(self.run_id).data.params
        changed = {k: v for k, v in values.items() if k in existing and existing[k] != v}
        if changed:
            log.warning("tracking: params changed on resume (kept as resume.* tags): %s",
                        ", ".join(f"{k}: {existing[k]} -> {v}" for k, v in changed.items()))
            self.set_tags({f"resume.{k}": v for k, v in changed.items()})
        items = [Param(k, v) for k, v in values.items() if k not in existing]
        for i in range(0, len(items), _BATCH):
            self._client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log metrics at `step`; on a reopened run, steps it already holds are skipped (replays)."""
        if not self.run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if step > self._logged_until.get(k, -1)]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.run_id:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training",
                    profile: dict[str, Any] | None = None) -> None:
        """Record a dataset input (name, digest, source) on the run: MLflow's lineage link.

        MLflow keeps at most 36 characters of a digest: the first 36 hex digits of the sha256.
        """
        if not self.run_id:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:MAX_DIGEST_LENGTH], source_type="local",
                          source=json.dumps({"uri": source}), profile=json.dumps(profile or {}))
        self._client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, _truncate(v, MAX_TAG_LENGTH))
