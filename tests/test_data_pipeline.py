"""The data pipeline end to end on real sample text with injected duplicates, PII and malformed records."""

import gzip
import json
import os
import random
from pathlib import Path

import pytest

from conftest import shared_file
from llmkit.cli import main
from llmkit.config import load_config
from llmkit.data.corpus import CorpusConfig, build_corpus
from llmkit.data.report import load_manifest


def _read_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small bilingual corpus with known problems: copies, near copies, PII, a broken line."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    web = [json.loads(line)["text"] for line in shared_file("en/c4_demo.jsonl").read_text().splitlines()][:120]
    records = [{"text": t, "url": f"https://example.org/{i}"} for i, t in enumerate(web)]
    # 5 exact copies and 5 near copies (one word changed in ~2% of positions) of long documents
    long_docs = [i for i, t in enumerate(web) if len(t.split()) > 300][:10]
    for i in long_docs[:5]:
        records.append({"text": web[i], "url": "copy", "of": i})
    for i in long_docs[5:]:
        words = web[i].split(" ")
        for _ in range(max(1, len(words) // 100)):
            words[rng.randrange(len(words))] = "changed"
        records.append({"text": " ".join(words), "url": "near", "of": i})
    pii = next(i for i in range(len(web)) if i not in long_docs)
    records[pii]["text"] += " Contact me at jane.doe@example.com or 13812345678."
    records[pii]["pii"] = True
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines.insert(7, '{"text": "this line is broken')
    (root / "web.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    zh = json.loads(shared_file("instruct/alpaca_zh_demo.json").read_text())[:150]
    (root / "zh.json").write_text(json.dumps(zh, ensure_ascii=False), encoding="utf-8")
    wiki = shared_file("en/wiki_demo.txt").read_text().splitlines()[:12]
    (root / "wiki.txt").write_text("\n".join(wiki) + "\n", encoding="utf-8")
    return root


def _config(corpus: Path, out: Path, **overrides) -> CorpusConfig:
    text = f"""
out_dir: {out}
sources:
  - {{name: web, path: {corpus / 'web.jsonl'}, domain: web}}
  - {{name: wiki, path: {corpus / 'wiki.txt'}, domain: encyclopedia}}
  - {{name: zh, path: {corpus / 'zh.json'}, domain: instructions, text: [instruction, input, output]}}
perplexity:
  enabled: true
  scorer: {{kind: ngram, train_sources: [wiki, zh]}}
  percentile: 90.0
mix:
  enabled: true
  domains: {{encyclopedia: {{max_ratio: 0.4}}}}
executor: {{workers: 1, progress: false}}
track: {{enabled: false}}
"""
    path = out.parent / f"{out.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return load_config(CorpusConfig, path, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory) -> tuple[CorpusConfig, dict]:
    cfg = _config(corpus, tmp_path_factory.mktemp("runs") / "base")
    return cfg, build_corpus(cfg)


def _all_ids(out: Path) -> tuple[list[str], list[dict]]:
    kept = [d for f in sorted((out / "data").glob("part-*.jsonl.gz")) for d in _read_gz(f)]
    rejected = [d for f in sorted((out / "rejected").glob("*.jsonl.gz")) for d in _read_gz(f)]
    return kept, rejected


def test_every_document_is_accounted_for(finished):
    cfg, manifest = finished
    out = Path(cfg.out_dir)
    kept, rejected = _all_ids(out)
    originals = [d["id"] for d in kept if "augmented" not in d and not d.get("repeat")]
    rejected_ids = [d["id"] for d in rejected]
    docs_in = manifest["funnel"][0]["in"]
    assert len(originals) + len(rejected_ids) == docs_in
    assert len(set(originals) | set(rejected_ids)) == docs_in  # each exactly once
    # the funnel adds up step by step and its reasons match the rejected files
    for row in manifest["funnel"][:-1]:
        assert row["out"] == row["in"] - sum(row["dropped"].values())
    from collections import Counter
    assert Counter(d["reason"] for d in rejected) == Counter(manifest["reasons"])
    assert manifest["output"]["docs"] == len(kept)


def test_duplicates_pii_and_malformed_lines(finished):
    cfg, manifest = finished
    kept, rejected = _all_ids(Path(cfg.out_dir))
    reasons = manifest["reasons"]
    # a copy meets its original in dedup unless the original already fell to a per-document filter
    fate = {d["id"]: d["reason"] for d in rejected}
    read_phase = ("read", "normalize", "quality", "safety")

    def web_id(i):  # record i sits on line i + 1, or i + 2 after the broken line inserted at index 7
        return f"web:web.jsonl:{i + 1 if i < 7 else i + 2}"

    copies = [d for d in rejected if d["meta"].get("url") == "copy"]
    deduped = [d for d in copies if d["reason"] == "dedup.exact"]
    assert len(deduped) == reasons["dedup.exact"] >= 3
    assert all(d["detail"]["duplicate_of"] == web_id(d["meta"]["of"]) for d in deduped)
    # the other copies fell to the same per-document filter as their original
    assert all(d["reason"] == fate[web_id(d["meta"]["of"])] for d in copies if d not in deduped)
    near = [d for d in kept + rejected if d["meta"].get("url") == "near"]
    expected_near = [d for d in near if not fate.get(web_id(d["meta"]["of"]), "").startswith(read_phase)]
    assert len(expected_near) >= 3
    # near copies at ~1% word edits (Jaccard ~0.95) form a cluster with their original: one survives
    for d in expected_near:
        pair = {d["id"], web_id(d["meta"]["of"])}
        assert sum(fate.get(x) == "dedup.near" for x in pair) == 1
    broken = [d for d in rejected if d["reason"] == "read.malformed_json"]
    assert len(broken) == 1 and broken[0]["detail"]["where"] == "web.jsonl:8"
    kept_ids = {d["id"] for d in kept}
    rejected_near = [d for d in rejected if d["reason"] == "dedup.near"]
    assert all(d["detail"]["duplicate_of"] in kept_ids | set(fate) for d in rejected_near)
    pii_doc = next(d for d in kept + rejected if d["meta"].get("pii"))
    assert "jane.doe@example.com" not in pii_doc["text"] and "13812345678" not in pii_doc["text"]
    assert pii_doc["stats"]["pii"]


def test_perplexity_and_mix_reported(finished):
    cfg, manifest = finished
    ppl = manifest["perplexity"]
    assert set(ppl["thresholds"]) >= {"en", "zh"}
    assert set(ppl["by_domain"]) == {"web", "encyclopedia", "instructions"}
    assert manifest["reasons"]["perplexity.high"] > 0
    mix = manifest["mix"]
    assert mix["achieved_share"]["encyclopedia"] <= 0.4 + 0.02
    kept, _ = _all_ids(Path(cfg.out_dir))
    assert all("perplexity" in d["stats"] for d in kept)


def test_manifest_digests_and_review(finished):
    cfg, manifest = finished
    out = Path(cfg.out_dir)
    import hashlib
    for f in manifest["output"]["files"]:
        assert hashlib.sha256((out / "data" / f["file"]).read_bytes()).hexdigest() == f["sha256"]
    assert manifest["inputs"][0]["sha256"] == hashlib.sha256(Path(manifest["inputs"][0]["path"]).read_bytes()
                                                             ).hexdigest()
    html = (out / "review" / "review.html").read_text()
    assert "dedup.exact" in html and "kept" in html
    assert (out / "report.md").read_text().startswith("# Data pipeline report")


def test_rerun_skips_finished_work_and_resumes_lost_work(finished):
    cfg, manifest = finished
    out = Path(cfg.out_dir)
    read_done = sorted((out / "work" / "read").glob("*.done.json"))
    stamp = {p: p.stat().st_mtime_ns for p in read_done}
    # lose one shard of the write phase, as a kill would
    victim = sorted((out / "work" / "write").glob("*.done.json"))[0]
    victim.unlink()
    again = build_corpus(cfg)
    assert again["output"]["digest"] == manifest["output"]["digest"]
    assert all(p.stat().st_mtime_ns == stamp[p] for p in read_done)  # read phase not redone
    assert victim.is_file()


def test_changed_mix_reuses_earlier_phases(finished, tmp_path):
    cfg, manifest = finished
    out = Path(cfg.out_dir)
    stamp = {p: p.stat().st_mtime_ns for p in (out / "work" / "read").glob("*.done.json")}
    cfg.mix.domains["encyclopedia"].max_ratio = 0.1
    changed = build_corpus(cfg)
    assert changed["mix"]["achieved_share"]["encyclopedia"] <= 0.1 + 0.02
    assert changed["output"]["digest"] != manifest["output"]["digest"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    cfg.mix.domains["encyclopedia"].max_ratio = 0.4
    assert build_corpus(cfg)["output"]["digest"] == manifest["output"]["digest"]


def test_sharding_and_workers_do_not_change_the_result(corpus, tmp_path, finished):
    _, manifest = finished
    # many small shards (50 kB ranges of the jsonl file), two worker processes
    cfg = _config(corpus, tmp_path / "split", **{"executor.workers": 2, "executor.split_mb": 0.05})
    split = build_corpus(cfg)
    assert len(split["output"]["files"]) > len(manifest["output"]["files"])
    assert split["reasons"] == manifest["reasons"]
    kept_a, _ = _all_ids(Path(finished[0].out_dir))
    kept_b, _ = _all_ids(Path(cfg.out_dir))
    assert sorted(d["id"] for d in kept_a) == sorted(d["id"] for d in kept_b)


def test_tokenized_output_feeds_pretraining(corpus, tmp_path):
    from llmkit.data.tokenized import open_split
    from llmkit.tokenizer import train_char

    tok = train_char(["abc"] + [shared_file("en/wiki_demo.txt").read_text()[:200_000]])
    tok.save(tmp_path / "tok")
    cfg = _config(corpus, tmp_path / "tokrun", **{"output.tokenizer": str(tmp_path / "tok"),
                                                 "perplexity.enabled": False, "mix.enabled": False,
                                                 "output.format": "parquet"})
    manifest = build_corpus(cfg)
    assert manifest["tokens"]["train"] > 0 and manifest["tokens"]["val"] > 0
    split = open_split(Path(cfg.out_dir) / "tokens", "train")
    assert sum(len(s) for s in split.shards) == split.tokens == manifest["tokens"]["train"]
    import pyarrow.parquet as pq
    table = pq.read_table(Path(cfg.out_dir) / "data" / manifest["output"]["files"][0]["file"])
    assert set(table.column_names) >= {"id", "text", "domain", "meta"}
    # the tokens feed pretraining as they are
    from llmkit.train.pretrain import PretrainConfig, pretrain
    overrides = {"out_dir": str(tmp_path / "gpt"), "data.tokenizer": str(tmp_path / "tok"),
                 "data.prepared": str(Path(cfg.out_dir) / "tokens"), "model.n_layer": 1, "model.d_model": 32,
                 "model.n_head": 2, "model.block_size": 32, "train.batch_size": 4, "train.max_steps": 3,
                 "train.warmup_steps": 1, "train.eval_interval": 3, "train.eval_batches": 1,
                 "train.progress": False, "track.enabled": False}
    summary = pretrain(load_config(PretrainConfig, None, [f"{k}={v}" for k, v in overrides.items()]))
    assert summary["step"] == 3
    other = train_char(["xyz"])
    other.save(tmp_path / "other")
    overrides["data.tokenizer"] = str(tmp_path / "other")
    overrides["out_dir"] = str(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="another tokenizer"):
        pretrain(load_config(PretrainConfig, None, [f"{k}={v}" for k, v in overrides.items()]))


def test_cli_run_and_report(corpus, tmp_path, capsys):
    cfg = _config(corpus, tmp_path / "cli")
    config_path = tmp_path / "cli.yaml"
    assert main(["data", "run", "--config", str(config_path), "perplexity.enabled=false"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["docs_out"] > 0 and line["out_dir"] == cfg.out_dir
    assert main(["data", "report", cfg.out_dir]) == 0
    report = capsys.readouterr().out
    manifest = load_manifest(cfg.out_dir)
    assert manifest["config"]["perplexity"]["enabled"] is False
    assert "| dedup |" in report and f"dedup.exact {manifest['reasons']['dedup.exact']}" in report
    assert f"| quality | {manifest['funnel'][2]['in']} |" in report
    assert main(["data", "run", "--config", str(config_path), "dedup.threshhold=0.8"]) == 2
    assert "threshhold" in capsys.readouterr().err


def test_tracked_as_mlflow_run(corpus, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = _config(corpus, tmp_path / "runs" / "tracked", **{"perplexity.enabled": False, "track.enabled": True})
    manifest = build_corpus(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("llmkit").experiment_id])
    digests = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert digests["tracked"] == manifest["output"]["digest"][:36]
    assert run.data.metrics["docs_out"] == manifest["output"]["docs"]
    assert "manifest.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_ray_executor_matches_local(corpus, tmp_path, finished):
    pytest.importorskip("ray")
    import ray

    cfg = _config(corpus, tmp_path / "ray", **{"executor.kind": "ray", "executor.workers": 2})
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        manifest = build_corpus(cfg)
    finally:
        ray.shutdown()
    assert manifest["output"]["digest"] == finished[1]["output"]["digest"]
    assert manifest["reasons"] == finished[1]["reasons"]


def test_a_source_can_skip_filters(corpus, tmp_path, finished):
    _, manifest = finished
    cfg = _config(corpus, tmp_path / "skip")
    zh = next(s for s in cfg.sources if s.name == "zh")
    zh.skip = ["quality", "perplexity"]
    skipped = build_corpus(cfg)
    _, rejected = _all_ids(Path(cfg.out_dir))
    zh_reasons = {d["reason"] for d in rejected if d["source"] == "zh"}
    assert not any(r.startswith(("quality.", "perplexity.")) for r in zh_reasons)
    _, rejected_before = _all_ids(Path(finished[0].out_dir))
    assert any(d["reason"].startswith("quality.") for d in rejected_before if d["source"] == "zh")
    assert skipped["sources"]["zh"]["after_read_phase"] > manifest["sources"]["zh"]["after_read_phase"]


def test_augmented_copies_are_marked(corpus, tmp_path):
    synonyms = Path(__file__).parent / "data" / "synonyms_en.tsv"
    cfg = _config(corpus, tmp_path / "aug", **{
        "perplexity.enabled": False, "mix.enabled": False, "augment.enabled": True,
        "augment.methods": "[synonym_replace, random_swap]", "augment.synonyms": str(synonyms),
        "augment.domains": "[web]", "augment.langs": "[en]"})
    manifest = build_corpus(cfg)
    kept, _ = _all_ids(Path(cfg.out_dir))
    augmented = [d for d in kept if "augmented" in d]
    assert len(augmented) == manifest["funnel"][-1]["added"] > 0
    originals = {d["id"]: d for d in kept if "augmented" not in d}
    for d in augmented:
        assert d["domain"] == "web" and d["augmented"]["of"] in originals
        assert d["id"].startswith(d["augmented"]["of"] + "#aug-" + d["augmented"]["method"])
        assert d["text"] != originals[d["augmented"]["of"]]["text"]
    assert manifest["output"]["docs"] == len(originals) + len(augmented)


def test_a_killed_run_resumes_to_the_same_result(corpus, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    overrides = ["executor.split_mb=0.02", "perplexity.enabled=false", "track.enabled=false"]
    cfg = _config(corpus, tmp_path / "killed")
    config_path = tmp_path / "killed.yaml"
    cmd = [sys.executable, "-m", "llmkit", "data", "run", "--config", str(config_path), *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    read_dir = Path(cfg.out_dir) / "work" / "read"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(read_dir.glob("*.done.json"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before_kill = len(list(read_dir.glob("*.done.json")))
    assert not (Path(cfg.out_dir) / "manifest.json").exists(), "the run finished before it could be killed"
    assert finished_before_kill >= 3
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    _config(corpus, tmp_path / "clean")
    clean = subprocess.run([sys.executable, "-m", "llmkit", "data", "run", "--config",
                            str(tmp_path / "clean.yaml"), *overrides], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    assert load_manifest(cfg.out_dir)["output"]["digest"] == load_manifest(tmp_path / "clean")["output"]["digest"]
    assert load_manifest(cfg.out_dir)["reasons"] == load_manifest(tmp_path / "clean")["reasons"]


def test_a_changed_input_is_read_again(corpus, tmp_path):
    import shutil
    local = tmp_path / "corpus"
    shutil.copytree(corpus, local)
    cfg = _config(local, tmp_path / "changed", **{"perplexity.enabled": False, "mix.enabled": False})
    before = build_corpus(cfg)
    wiki = local / "wiki.txt"
    extra = shared_file("en/wiki_demo.txt").read_text().splitlines()[20]
    wiki.write_text(wiki.read_text() + extra + "\n")
    after = build_corpus(cfg)
    assert after["sources"]["wiki"]["docs_in"] == before["sources"]["wiki"]["docs_in"] + 1
    assert after["output"]["docs"] == before["output"]["docs"] + 1
    assert after["output"]["digest"] != before["output"]["digest"]
