"""Experiment tracking with MLflow (guide §4: every stage's versions and data lineage).

By default each run goes into an embedded SQLite store, `sqlite:///<runs root>/mlflow.db`, with artifacts
beside it in `<runs root>/mlartifacts`: no server to start, and `mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db` shows everything. A run records the full resolved config as params, metrics
per step, the config / tokenizer / final model as artifacts, and the digest of its training data as an
MLflow dataset input, so the model can be traced back to the exact tokens it saw.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class TrackConfig:
    enabled: bool = True
    uri: str | None = None
    """Tracking URI; None -> sqlite:///<parent of out_dir>/mlflow.db."""
    experiment: str = "llmkit"
    run_name: str | None = None
    """None -> the name of out_dir."""


def default_tracking_uri(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve().parent / 'mlflow.db'}"


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


class Tracker:
    """One MLflow run. All methods are no-ops when tracking is disabled (or on non-zero ranks)."""

    def __init__(self, config: TrackConfig, out_dir: str | Path, active: bool = True):
        self.enabled = config.enabled and active
        self.config = config
        self.out_dir = Path(out_dir)
        self.run_id: str | None = None
        self._client = None
        self.uri = config.uri or default_tracking_uri(out_dir)

    def start(self, run_id: str | None = None) -> str | None:
        """Open a new run, or reopen `run_id` (a resumed job keeps logging into its original run)."""
        if not self.enabled:
            return None
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            try:
                self._client.get_run(run_id)
                self._client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return run_id
            except Exception as e:  # the store was moved or wiped: record the continuation as a new run
                log.warning("tracking run %s not found in %s (%s); starting a new run", run_id, self.uri, e)
        exp = self._client.get_experiment_by_name(self.config.experiment)
        if exp is None:
            artifact_location = None
            if self.uri.startswith("sqlite:///"):
                store = Path(self.uri[len("sqlite:///"):])
                artifact_location = (store.parent / "mlartifacts").resolve().as_uri()
            exp_id = self._client.create_experiment(self.config.experiment, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
        run = self._client.create_run(exp_id, run_name=self.config.run_name or self.out_dir.name)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        existing = self._client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are immutable; a resume re-logs none
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.run_id:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

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
        """Record a dataset input (name, digest, source) on the run: MLflow's lineage link."""
        if not self.run_id:
            return
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": source}),
                          profile=json.dumps(profile or {}))
        self._client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, str(v))

    def end(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED (a preempted run is KILLED until it is resumed)."""
        if self.run_id:
            self._client.set_terminated(self.run_id, status=status)
