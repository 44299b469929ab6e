"""The MLflow model registry: register a model dir, move aliases, and turn model URIs back into dirs.

A registered version's files are logged as artifacts of a `register` run (a child of the pipeline run), so
the registry holds its own copy: deleting the run dir does not lose a production model. Tags on the version
carry the eval metrics and the digests of the data, tokens and models it came from (lineage).

`resolve_model("models:/quickstart@production")` (or `models:/quickstart/3`, `runs:/<run id>/model`)
returns a local directory: the artifact directory itself for a local store, else a download. Every
`llmkit` command that takes `--model` accepts these URIs; the tracking store is `--tracking-uri`, else
$MLFLOW_TRACKING_URI, else `sqlite:///runs/mlflow.db` (where `llmkit pipeline run` puts it by default).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
MODEL_ARTIFACT = "model"


def is_model_uri(value: str | Path) -> bool:
    return isinstance(value, str) and value.startswith(("models:/", "runs:/"))


def tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _client(uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_model(uri: str, experiment: str, name: str, model_dir: str | Path, aliases: list[str],
                   tags: dict[str, str], parent_run_id: str | None = None) -> dict:
    """Log `model_dir` as the `model` artifact of a new run and register it as a new version of `name`.

    Returns {version, source, run_id}. Each alias in `aliases` then points at this version; `tags` are set
    on the version (values as strings)."""
    from mlflow.exceptions import MlflowException

    from llmkit.track import TrackConfig, Tracker, parent_run

    tracker = Tracker(TrackConfig(uri=uri, experiment=experiment, run_name=f"{name}/register"), model_dir)
    with parent_run(parent_run_id), tracker:
        tracker.start()
        tracker.log_artifact(model_dir, MODEL_ARTIFACT)
        tracker.set_tags(tags)
        run_id = tracker.run_id
    client = _client(uri)
    try:
        client.create_registered_model(name, description="registered by llmkit pipeline run")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    mv = client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
    for alias in aliases:
        client.set_registered_model_alias(name, alias, mv.version)
    return {"version": mv.version, "source": source, "run_id": run_id}


def set_alias(name: str, alias: str, version: int | str, uri: str | None = None) -> None:
    """Point `alias` (e.g. production) at `version` of the registered model `name`."""
    _client(tracking_uri(uri)).set_registered_model_alias(name, alias, str(version))


def _local(artifact_uri: str) -> Path | None:
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and artifact_uri.startswith("/"):
        return Path(artifact_uri)
    return None


def resolve_model(value: str | Path, uri: str | None = None) -> Path:
    """A model dir for `value`: a path as it is, or a `models:/name@alias`, `models:/name/version` or
    `runs:/run_id/path` URI resolved in the tracking store (downloaded when the store is remote).

    Raises ValueError naming the URI when the model, alias, version or run does not exist."""
    if not is_model_uri(value):
        return Path(value)
    from mlflow.exceptions import MlflowException

    store = tracking_uri(uri)
    client = _client(store)
    try:
        if value.startswith("models:/"):
            ref = value[len("models:/"):]
            if "@" in ref:
                name, alias = ref.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, _, version = ref.partition("/")
                if not version.isdigit():
                    raise ValueError(f"{value}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
                mv = client.get_model_version(name, version)
            source = mv.source
            if source.startswith("runs:/"):
                return resolve_model(source, store)
        else:
            run_id, _, path = value[len("runs:/"):].partition("/")
            source = f"{client.get_run(run_id).info.artifact_uri}/{path}".rstrip("/")
    except MlflowException as e:
        raise ValueError(f"{value}: not found in the model registry at {store} ({e.message}); set "
                         "--tracking-uri or MLFLOW_TRACKING_URI to the store the model was registered in") from e
    local = _local(source)
    if local is not None and local.exists():
        return local
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=store))
