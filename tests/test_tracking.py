"""MLflow tracking of `pretrain`, read back through MLflow itself (its client and a real `mlflow server`).

One tiny model (1 layer, d_model 32) is trained once for the module on the first 100 KB of
tinyshakespeare into the default embedded store, `sqlite:///<tmp>/runs/mlflow.db`; the tests then check
what the run holds against what the trainer wrote locally (config.yaml, metrics.jsonl, data/meta.json).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from tests (and the server)
pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")

from mlflow.tracking import MlflowClient  # noqa: E402

from llmkit.config import flatten, load_config, to_dict  # noqa: E402
from llmkit.tokenizer import train_char  # noqa: E402
from llmkit.track import TrackConfig, Tracker, default_tracking_uri, sqlite_path  # noqa: E402
from llmkit.train.pretrain import PretrainConfig, pretrain  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32", "train.batch_size=4",
        "train.max_steps=20", "train.eval_interval=10", "train.eval_batches=2", "train.log_interval=5",
        "train.checkpoint_interval=10", "train.progress=false", "train.warmup_steps=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    src = DATA / "en" / "tinyshakespeare.txt"
    if not src.is_file():
        pytest.skip(f"reference data {src} not found (expected the shared data mirror at ../shared/data)")
    root = tmp_path_factory.mktemp("tracking")
    text = src.read_bytes()[:100_000].decode("utf-8", errors="ignore")
    text_file = root / "shakespeare-100k.txt"
    text_file.write_text(text, encoding="utf-8")
    tok_dir = root / "tok"
    train_char([text]).save(tok_dir)
    return {"root": root, "text": text_file, "tok": tok_dir}


def tiny_config(corpus: dict, name: str, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [f"out_dir={corpus['root'] / 'runs' / name}",
                                              f"data.inputs=[{corpus['text']}]", f"data.tokenizer={corpus['tok']}",
                                              *TINY, *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def trained(corpus) -> dict:
    """A 20-step run, and a snapshot of what the store holds right after it (before any resume)."""
    cfg = tiny_config(corpus, "tiny")
    summary = pretrain(cfg)
    out = Path(cfg.out_dir)
    uri = f"sqlite:///{corpus['root'] / 'runs' / 'mlflow.db'}"
    assert default_tracking_uri(out) == uri
    client = MlflowClient(tracking_uri=uri)
    run_id = summary["tracking_run_id"]
    run = client.get_run(run_id)
    rows = read_jsonl(out / "metrics.jsonl")
    keys = {k for row in rows for k in row if k != "step"}
    return {"cfg": cfg, "summary": summary, "out": out, "uri": uri, "client": client, "run_id": run_id,
            "run": run, "rows": rows, "histories": {k: history(client, run_id, k) for k in keys}}


@pytest.fixture(scope="module")
def resumed(trained, corpus) -> dict:
    """The same job resumed from its step-20 checkpoint and trained on to step 30."""
    summary = pretrain(tiny_config(corpus, "tiny", "train.max_steps=30"), resume=True)
    client, run_id = trained["client"], summary["tracking_run_id"]
    return {"summary": summary, "run": client.get_run(run_id), "loss": history(client, run_id, "loss")}


def test_params_are_the_flattened_resolved_config(trained):
    params = trained["run"].data.params
    resolved = flatten(to_dict(trained["cfg"]))  # pretrain filled in model.vocab_size
    assert resolved["model.vocab_size"] is not None
    missing = sorted(set(resolved) - set(params))
    assert not missing, f"config keys not logged as params: {missing}"
    assert {k: params[k] for k in resolved} == {k: str(v) for k, v in resolved.items()}
    # the same values as the config.yaml written beside the run
    on_disk = flatten(yaml.safe_load((trained["out"] / "config.yaml").read_text()))
    assert {k: params[k] for k in on_disk} == {k: str(v) for k, v in on_disk.items()}
    assert params["model.n_layer"] == "1" and params["train.lr"] == "0.001" and params["train.max_steps"] == "20"
    assert params["n_params"] == str(trained["summary"]["n_params"])
    assert {"flops_per_token", "world_size", "tokens_per_step"} <= set(params)
    assert params["tokens_per_step"] == str(4 * 32)


def test_metric_history_matches_metrics_jsonl(trained):
    rows, histories = trained["rows"], trained["histories"]
    assert [s for s, _ in histories["loss"]] == [5, 10, 15, 20]
    for key in ("val_loss", "val_bpb", "train_loss"):
        assert [s for s, _ in histories[key]] == [10, 20]
    assert {"lr", "tokens_per_s"} <= set(histories)
    for key, points in histories.items():
        assert all(math.isfinite(v) for _, v in points), key
        local = sorted((row["step"], row[key]) for row in rows if key in row)
        assert points == local, f"{key}: MLflow history differs from metrics.jsonl"
    summary = trained["summary"]
    assert histories["val_loss"][-1][1] == summary["val_loss"]
    assert histories["val_bpb"][-1][1] == summary["val_bpb"]


def test_artifacts_hold_config_tokenizer_and_model(trained, tmp_path):
    client, run_id, out = trained["client"], trained["run_id"], trained["out"]
    top = {a.path: a for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "tokenizer", "model"} <= set(top)
    assert top["model"].is_dir and top["tokenizer"].is_dir
    assert "tokenizer/tokenizer.json" in {a.path for a in client.list_artifacts(run_id, "tokenizer")}
    model_files = {a.path: a.file_size for a in client.list_artifacts(run_id, "model")}
    assert {"model/model.safetensors", "model/config.json"} <= set(model_files)
    assert model_files["model/model.safetensors"] == (out / "final" / "model.safetensors").stat().st_size
    # the store keeps artifacts beside the database, not in the working directory
    artifact_uri = trained["run"].info.artifact_uri
    assert artifact_uri.startswith((out.parent / "mlartifacts").resolve().as_uri() + "/")
    got = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    assert got.read_bytes() == (out / "config.yaml").read_bytes()
    got = Path(client.download_artifacts(run_id, "model/model.safetensors", str(tmp_path)))
    assert got.read_bytes() == (out / "final" / "model.safetensors").read_bytes()
    got = Path(client.download_artifacts(run_id, "tokenizer/tokenizer.json", str(tmp_path)))
    assert got.read_bytes() == (Path(trained["cfg"].data.tokenizer) / "tokenizer.json").read_bytes()


def test_dataset_inputs_link_to_the_token_digests(trained):
    meta = json.loads((trained["out"] / "data" / "meta.json").read_text())
    by_context = {}
    for inp in trained["run"].inputs.dataset_inputs:
        tags = {t.key: t.value for t in inp.tags}
        by_context[tags["mlflow.data.context"]] = inp.dataset
    assert set(by_context) == {"training", "validation"}
    for context, split in (("training", "train"), ("validation", "val")):
        ds, sha = by_context[context], meta["splits"][split]["sha256"]
        assert len(ds.digest) == 36 and sha.startswith(ds.digest), (context, ds.digest, sha)
        assert json.loads(ds.source) == {"uri": str((trained["out"] / "data").resolve())}
        assert json.loads(ds.profile)["tokens"] == meta["splits"][split]["tokens"]
    assert by_context["training"].name == "tok-tokens"
    assert json.loads(by_context["training"].profile)["sources"] == [s["sha256"] for s in meta["sources"]]


def test_run_is_finished_and_named(trained):
    client, info = trained["client"], trained["run"].info
    assert info.status == "FINISHED" and info.end_time is not None and info.lifecycle_stage == "active"
    assert info.run_name == "tiny"
    assert client.get_experiment(info.experiment_id).name == "llmkit"
    tags = trained["run"].data.tags
    assert tags.get("mlflow.source.type") == "LOCAL" and tags.get("mlflow.user")


def test_resume_logs_into_the_same_run(trained, resumed):
    assert resumed["summary"]["tracking_run_id"] == trained["run_id"]
    run = resumed["run"]
    assert run.info.status == "FINISHED"
    assert [s for s, _ in resumed["loss"]] == [5, 10, 15, 20, 25, 30]
    assert resumed["loss"][:4] == trained["histories"]["loss"]
    # params are immutable in MLflow: the original stays, the changed value is kept as a tag
    assert run.data.params["train.max_steps"] == "20"
    assert run.data.tags["resume.train.max_steps"] == "30"
    assert run.data.tags["llmkit.resumes"] == "1"
    assert len(run.inputs.dataset_inputs) == 2  # the same data: no duplicate lineage entries
    runs = trained["client"].search_runs([run.info.experiment_id], "attributes.run_name = 'tiny'")
    assert [r.info.run_id for r in runs] == [trained["run_id"]]


def test_steps_replayed_after_a_crash_are_logged_once(corpus, trained):
    """A job killed between checkpoints replays steps on resume: MLflow keeps one point per step."""
    short = ("train.max_steps=10", "train.checkpoint_interval=5", "train.log_interval=2",
             f"data.prepared={trained['out'] / 'data'}")  # the shards the first run tokenized
    cfg = tiny_config(corpus, "replay", *short)
    first = pretrain(cfg)
    shutil.rmtree(Path(cfg.out_dir) / "checkpoints" / "step-000010")  # as if killed before that checkpoint
    again = pretrain(tiny_config(corpus, "replay", *short), resume=True)
    assert again["tracking_run_id"] == first["tracking_run_id"]
    client = trained["client"]
    loss = history(client, first["tracking_run_id"], "loss")
    assert [s for s, _ in loss] == [2, 4, 6, 8, 10]
    rows = [r for r in read_jsonl(Path(cfg.out_dir) / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]  # the resume dropped the rows after step 5
    assert loss == [(r["step"], r["loss"]) for r in rows]  # replayed steps reproduce the logged values
    assert [s for s, _ in history(client, first["tracking_run_id"], "val_loss")] == [10]
    assert client.get_run(first["tracking_run_id"]).info.status == "FINISHED"


def test_disabled_tracking_writes_no_store(corpus, tmp_path):
    cfg = load_config(PretrainConfig, None, [f"out_dir={tmp_path / 'runs' / 'off'}", f"data.inputs=[{corpus['text']}]",
                                             f"data.tokenizer={corpus['tok']}", *TINY, "train.max_steps=5",
                                             "track.enabled=false"])
    summary = pretrain(cfg)
    assert summary["tracking_run_id"] is None
    assert (tmp_path / "runs" / "off" / "final" / "model.safetensors").is_file()
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    assert not (tmp_path / "runs" / "mlartifacts").exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["off"]


def test_sqlite_path():
    assert sqlite_path("sqlite:////abs/runs/mlflow.db") == Path("/abs/runs/mlflow.db")
    assert sqlite_path("sqlite:///runs/mlflow.db") == Path("runs/mlflow.db")
    assert sqlite_path("sqlite:///runs/mlflow.db?timeout=30") == Path("runs/mlflow.db")
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("http://127.0.0.1:5000") is None


def test_tracker_outside_the_trainer(trained, tmp_path):
    """Unknown run ids start a new run; an exception inside `with tracker` ends the run FAILED;
    a deleted experiment is refused with the key to change."""
    client, uri = trained["client"], trained["uri"]
    tracker = Tracker(TrackConfig(uri=uri, experiment="unit"), tmp_path / "job")
    with pytest.raises(RuntimeError), tracker:
        run_id = tracker.start("0" * 32)
        tracker.log_metrics({"x": 1.0}, step=1)
        raise RuntimeError("boom")
    assert run_id != "0" * 32
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.info.run_name == "job" and run.data.metrics == {"x": 1.0}

    client.delete_experiment(run.info.experiment_id)
    with pytest.raises(ValueError, match="track.experiment"):
        Tracker(TrackConfig(uri=uri, experiment="unit"), tmp_path / "job").start()
    client.restore_experiment(run.info.experiment_id)

    disabled = Tracker(TrackConfig(enabled=False, uri=uri), tmp_path / "job")
    assert disabled.start() is None
    disabled.log_metrics({"x": 1.0}, step=1)  # all no-ops
    disabled.end()


def test_run_left_open_is_failed_at_exit(trained):
    """A job that raises out of the trainer (no `end()`) leaves no run stuck in RUNNING."""
    script = textwrap.dedent(f"""
        from pathlib import Path
        from llmkit.track import TrackConfig, Tracker
        t = Tracker(TrackConfig(uri={trained['uri']!r}, experiment="unit"), Path("crashed"))
        print(t.start(), flush=True)
        t.log_metrics({{"loss": 1.0}}, step=1)
        raise SystemExit("crash")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    run_id = proc.stdout.strip().splitlines()[-1]
    assert trained["client"].get_run(run_id).info.status == "FAILED"


# -- the store as `mlflow ui` / `mlflow server` sees it ---------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def mlflow_server(trained, resumed):
    """`mlflow server` on the run store, bound to 127.0.0.1 only; killed (its whole process group) after."""
    pytest.importorskip("mlflow.server", reason="`mlflow server` needs the full mlflow distribution")
    root = trained["out"].parent
    port = _free_port()
    log_path = root / "mlflow-server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", trained["uri"],
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=root, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield base
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


def test_mlflow_server_reads_the_run(trained, resumed, mlflow_server):
    run_id = trained["run_id"]
    run = _get(mlflow_server, f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "tiny"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == resumed["run"].data.params
    assert params["model.n_layer"] == "1" and "train.lr" in params
    metrics = {m["key"]: (m["step"], m["value"]) for m in run["data"]["metrics"]}
    assert metrics["loss"] == resumed["loss"][-1]
    assert {"val_loss", "val_bpb", "train_loss", "lr"} <= set(metrics)
    contexts = {t["value"] for d in run["inputs"]["dataset_inputs"] for t in d["tags"]}
    assert contexts == {"training", "validation"}

    hist = _get(mlflow_server, f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=loss")
    assert sorted((m["step"], m["value"]) for m in hist["metrics"]) == resumed["loss"]
    files = _get(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=model")["files"]
    assert {"model/model.safetensors", "model/config.json"} <= {f["path"] for f in files}
