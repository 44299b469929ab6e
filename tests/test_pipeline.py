import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmkit.cli import main
from llmkit.config import ConfigError, load_config
from llmkit.pipeline.config import PipelineConfig
from llmkit.pipeline.digests import path_digest
from llmkit.pipeline.run import load_state, run_pipeline
from llmkit.registry import resolve_model
from pipeline_recipe import write_tiny_recipe

ALL = ["data", "tokenizer", "tokens", "pretrain", "sft", "merge", "quantize", "eval", "register"]
# digests that depend only on content, so equal across run dirs (an adapter dir names its base model's path,
# so SFT shows in the merged weights instead; register's digest names a version)
CONTENT = ["data", "tokenizer", "tokens", "pretrain", "merge", "quantize"]


def _run(path: Path, *overrides: str) -> dict:
    return run_pipeline(load_config(PipelineConfig, path, list(overrides)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    recipe = write_tiny_recipe(root)
    return recipe, copy.deepcopy(_run(recipe))


def test_every_stage_runs_then_a_second_run_skips_them_all(finished):
    recipe, first = finished
    assert list(first["stages"]) == ALL
    assert all(r["status"] == "done" and not r["skipped_last"] for r in first["stages"].values())
    for name in ALL:
        assert path_digest(first["stages"][name]["artifact"]) == first["stages"][name]["artifact_digest"]
    mtime = os.path.getmtime(Path(first["stages"]["pretrain"]["artifact"]) / "model.safetensors")
    again = _run(recipe)
    assert all(r["skipped_last"] and r["runs"] == 1 for r in again["stages"].values())
    assert os.path.getmtime(Path(first["stages"]["pretrain"]["artifact"]) / "model.safetensors") == mtime
    assert {k: r["digest"] for k, r in again["stages"].items()} == {k: r["digest"] for k, r in first["stages"].items()}
    m = first["stages"]["eval"]["metrics"]
    assert m["ppl_fp32"] > 1 and abs(m["ppl_delta_rel"]) < 0.05  # INT8 keeps the held-out perplexity
    assert first["stages"]["quantize"]["metrics"]["linear_bytes_saved"] > 0.6
    ev = json.loads(Path(first["stages"]["eval"]["artifact"]).read_text(encoding="utf-8"))
    assert {i["lang"] for i in ev["instructions"]} == {"en", "zh"}
    assert len(ev["latency"]["ttft_s"]) == 4 and all(t > 0 for t in ev["latency"]["ttft_s"])


def test_report_of_a_real_pipeline_run_has_every_section_measured(finished, tmp_path):
    """The report over real stage outputs (not hand-made files): every section holds figures and plots."""
    import base64
    import re

    from llmkit.pipeline.report import NOT_RUN, render_report

    recipe, first = finished
    run_dir = recipe.parent / "runs" / "tiny"
    text = render_report(run_dir, out_dir=tmp_path / "report", log_to_mlflow=False).read_text(encoding="utf-8")
    for sid in ["data", "training", "finetune", "quantization", "latency", "cost", "instructions"]:
        section = re.search(rf'<section id="{sid}">(.*?)</section>', text, re.S)
        assert section and NOT_RUN not in section.group(1), sid
    pngs = [base64.b64decode(src) for src in re.findall(r'src="data:image/png;base64,([^"]*)"', text)]
    assert len(pngs) >= 5 and all(p[:4] == b"\x89PNG" and len(p) > 1024 for p in pngs)


def test_a_damaged_artifact_is_rebuilt_not_trusted(finished, tmp_path):
    recipe = write_tiny_recipe(tmp_path, name="damaged")
    first = _run(recipe)
    merged = Path(first["stages"]["merge"]["artifact"]) / "model.safetensors"
    merged.write_bytes(merged.read_bytes()[:-8] + b"\0" * 8)
    again = _run(recipe)
    ran = [k for k, r in again["stages"].items() if not r["skipped_last"]]
    assert ran[0] == "merge"  # everything before it is intact and skipped
    assert again["stages"]["merge"]["digest"] == first["stages"]["merge"]["digest"]  # rebuilt identically


def test_a_changed_stage_recipe_reruns_that_stage_and_what_follows(tmp_path):
    recipe = write_tiny_recipe(tmp_path, name="change")
    first = _run(recipe)
    changed = _run(recipe, "sft.overrides=[train.max_steps=8]")
    ran = [k for k, r in changed["stages"].items() if not r["skipped_last"]]
    assert ran == ["sft", "merge", "quantize", "eval", "register"]
    assert changed["stages"]["sft"]["metrics"]["step"] == 8
    assert changed["stages"]["pretrain"]["digest"] == first["stages"]["pretrain"]["digest"]
    assert changed["stages"]["register"]["metrics"]["version"] == 2


def test_registered_model_is_found_by_uri_and_traced_to_its_data(finished, monkeypatch, capsys):
    recipe, state = finished
    from mlflow.tracking import MlflowClient

    uri = state["tracking_uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for alias in ("candidate", "production"):
        assert str(client.get_model_version_by_alias("tiny", alias).version) == "1"
    mv = client.get_model_version("tiny", "1")
    for up in ("data", "tokens", "pretrain", "sft"):
        assert mv.tags[f"lineage.{up}"] == state["stages"][up]["digest"]
    assert mv.tags["llmkit.model_digest"] == state["stages"]["quantize"]["digest"]
    local = resolve_model("models:/tiny@production")
    assert path_digest(local) == state["stages"]["quantize"]["artifact_digest"]  # the registry's own copy
    assert resolve_model("models:/tiny/1") == local
    # runs:/ URIs: the pretrain stage's run logged its final model as the `model` artifact
    pre_uri = f"runs:/{state['stages']['pretrain']['run_id']}/model"
    assert path_digest(resolve_model(pre_uri)) == state["stages"]["pretrain"]["artifact_digest"]
    with pytest.raises(ValueError, match="models:/tiny@staging"):
        resolve_model("models:/tiny@staging")
    # a stage run per stage, children of the pipeline run, each with its input and output digests
    exp = client.get_experiment_by_name("llmkit")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
    assert {r.info.run_name for r in children} >= {f"tiny/{s}" for s in ALL}
    pre = client.get_run(state["stages"]["pretrain"]["run_id"])
    digests = {(d.dataset.digest, t.value) for d in pre.inputs.dataset_inputs for t in d.tags}
    assert (state["stages"]["tokens"]["digest"][:36], "input") in digests
    assert (state["stages"]["pretrain"]["digest"][:36], "output") in digests
    # every llmkit command takes the URI
    assert main(["--tracking-uri", uri, "generate", "--model", "models:/tiny@production", "--prompt", "Hi",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    capsys.readouterr()
    assert main(["pipeline", "status", str(Path(state["out_dir"]))]) == 0
    assert "register" in capsys.readouterr().out


def test_a_misspelt_stage_key_names_the_key_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npretrian:\n  config: a.yaml\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*pretrian"):
        load_config(PipelineConfig, bad)


# -- kill tests: SIGKILL during a stage, run again, same final result as never killed -------------------
KILL = ["pretrain.overrides=[train.max_steps=240, train.checkpoint_interval=40, train.eval_interval=80]",
        "sft.overrides=[train.max_steps=60, train.checkpoint_interval=10]"]
MARK = {  # a file that appears mid-stage: the kill lands after some work and before the stage ends
    "data": lambda run: any((run / "data" / "work" / "read").glob("*.done.json")),
    "pretrain": lambda run: any((run / "pretrain" / "checkpoints").glob("*")),
    "sft": lambda run: any((run / "sft" / "checkpoints").glob("*")),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    recipe = write_tiny_recipe(tmp_path_factory.mktemp("whole"), name="kill")
    return _run(recipe, *KILL)


@pytest.mark.parametrize("stage", ["data", "pretrain", "sft"])
def test_pipeline_killed_during_a_stage_resumes_to_the_same_result(uninterrupted, tmp_path, stage):
    recipe = write_tiny_recipe(tmp_path, name="kill")
    run = tmp_path / "runs" / "kill"
    cmd = [sys.executable, "-m", "llmkit", "pipeline", "run", str(recipe), *KILL]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not MARK[stage](run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the pipeline ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = load_state(run)["stages"]
    assert killed[stage]["status"] == "running" and "eval" not in killed
    resumed = _run(recipe, *KILL)
    assert resumed["stages"][stage]["runs"] == 2
    for name in CONTENT:
        assert resumed["stages"][name]["digest"] == uninterrupted["stages"][name]["digest"], name
    assert resumed["stages"]["eval"]["metrics"]["ppl_int8"] == uninterrupted["stages"]["eval"]["metrics"]["ppl_int8"]
    assert resumed["stages"]["sft"]["metrics"]["eval_loss"] == uninterrupted["stages"]["sft"]["metrics"]["eval_loss"]


def test_preference_after_sft_feeds_quantize_and_benchmarks_reach_the_report(finished, tmp_path):
    """sft -> merge -> preference (DPO, LoRA, merged back) -> quantize -> eval with `llmkit eval` tasks."""
    import re

    from llmkit.pipeline.report import NOT_RUN, render_report

    recipe, state = finished
    base = state["stages"]["pretrain"]["artifact"]
    other = write_tiny_recipe(tmp_path, name="aligned")
    pref = other.parent / "preference.yaml"
    overrides = ["pretrain.enabled=false", f"sft.overrides=[base_model={base}]", "preference.enabled=true",
                 f"preference.config={pref}", "eval.tasks=[sample_arc,sample_mmlu]", "eval.limit=4"]
    done = _run(other, *overrides)
    stages = done["stages"]
    assert list(stages) == ["data", "tokenizer", "tokens", "sft", "merge", "preference", "quantize", "eval", "register"]
    model = Path(stages["preference"]["artifact"])
    assert (model / "model.safetensors").is_file() and not (model / "adapter_config.json").exists()
    assert stages["preference"]["metrics"]["before_eval_reward_accuracy"] == 0.0  # equal to the reference at start
    assert 0.0 <= stages["preference"]["metrics"]["after_eval_reward_accuracy"] <= 1.0
    lineage = json.loads((Path(done["out_dir"]) / "lineage.json").read_text())
    assert lineage["stages"]["quantize"]["reads"]["preference"] == stages["preference"]["digest"]
    assert lineage["stages"]["preference"]["reads"]["merge"] == stages["merge"]["digest"]

    ev = json.loads(Path(stages["eval"]["artifact"]).read_text(encoding="utf-8"))
    final, flt = ev["benchmarks"]["final"]["tasks"], ev["benchmarks"]["float"]["tasks"]
    assert ev["benchmarks"]["final"]["model"] == str(Path(stages["quantize"]["artifact"]).resolve()) or \
        Path(ev["benchmarks"]["final"]["model"]) == Path(stages["quantize"]["artifact"])
    assert Path(ev["benchmarks"]["float"]["model"]) == model
    assert final["sample_arc"]["n"] == 4 and final["sample_mmlu"]["n"] == 4
    assert stages["eval"]["metrics"]["bench.sample_arc.acc"] == final["sample_arc"]["metrics"]["acc"]["value"]
    assert set(flt) == {"sample_arc", "sample_mmlu"}

    text = render_report(Path(done["out_dir"]), out_dir=tmp_path / "report", log_to_mlflow=False).read_text("utf-8")
    for sid in ("preference", "benchmarks"):
        section = re.search(rf'<section id="{sid}">(.*?)</section>', text, re.S)
        assert section and NOT_RUN not in section.group(1), sid
    assert "reward accuracy" in text and "sample_arc" in text

    again = _run(other, *overrides)  # nothing changed: every stage skipped, the benchmarks too
    assert all(r["skipped_last"] for r in again["stages"].values())


def test_without_pretraining_sft_starts_from_the_recipes_own_base_model(finished, tmp_path):
    recipe, state = finished
    base = state["stages"]["pretrain"]["artifact"]  # stands for a model brought in with `llmkit import hf`
    other = write_tiny_recipe(tmp_path, name="nobase")
    done = _run(other, "pretrain.enabled=false", f"sft.overrides=[base_model={base}]")
    assert "pretrain" not in done["stages"] and done["stages"]["register"]["status"] == "done"
    # the same base and data as the full run: the same adapter, merged model and INT8 model
    for name in ("merge", "quantize"):
        assert done["stages"][name]["digest"] == state["stages"][name]["digest"], name
