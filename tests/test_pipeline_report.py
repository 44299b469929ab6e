"""`llmkit report`: the monitoring page of a pipeline run, built from the outputs of real stage code.

The run directory is assembled from what the real data pipeline, a real tiny pretraining run and a real
tiny LoRA SFT run write (on the shared sample data); eval.json and pipeline.json are the pipeline's own
files and are written here. Checks: every section, every embedded PNG, escaping, "not run" for missing
inputs, the cost and percentile figures against an independent computation, MLflow artifacts/metrics,
and the page in a real headless Chromium.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shutil
from html import escape, unescape
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_file, tiny_overrides
from llmkit.pipeline.report import NOT_RUN, REPORT_DIR, render_report

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADINGS = ["Summary", "Data funnel", "Training curves", "Fine-tune accuracy", "Preference tuning", "Benchmarks",
            "Quantization: perplexity and size", "Latency", "Compute time and cost", "Instruction samples (English / Chinese)"]
PRICES = {"on_demand_usd_per_hour": 0.096, "spot_usd_per_hour": 0.034}
SECONDS = {"samples": 1.25, "data": 41.5, "tokenizer": 12.0, "tokens": 7.75, "pretrain": 1834.2, "sft": 422.9,
           "merge": 3.1, "preference": 95.0, "quantize": 9.4, "eval": 120.6, "register": 0.8}
EVIL = "<script>alert('x')</script> & <b>bold</b>"
ZH_ANSWER = "北京是中华人民共和国的首都，历史悠久。"


# ---------------------------------------------------------------- inputs from real stage code

def _data_manifest(root: Path) -> Path:
    """Run the real data pipeline over a small bilingual slice of the shared data; returns its out_dir."""
    from llmkit.config import load_config
    from llmkit.data.corpus import CorpusConfig, build_corpus

    src = root / "src"
    src.mkdir()
    web = shared_file("en/c4_demo.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    (src / "web.jsonl").write_text("\n".join(web + web[:4]) + "\n", encoding="utf-8")  # 4 exact copies
    zh = json.loads(shared_file("instruct/alpaca_zh_demo.json").read_text(encoding="utf-8"))[:80]
    (src / "zh.json").write_text(json.dumps(zh, ensure_ascii=False), encoding="utf-8")
    wiki = shared_file("en/wiki_demo.txt").read_text(encoding="utf-8").splitlines()[:10]
    (src / "wiki.txt").write_text("\n".join(wiki) + "\n", encoding="utf-8")
    out = root / "run" / "data"
    cfg = root / "data.yaml"
    cfg.write_text(f"""
out_dir: {out}
sources:
  - {{name: web, path: {src / 'web.jsonl'}, domain: web}}
  - {{name: wiki, path: {src / 'wiki.txt'}, domain: encyclopedia}}
  - {{name: zh, path: {src / 'zh.json'}, domain: instructions, text: [instruction, input, output]}}
perplexity:
  enabled: true
  scorer: {{kind: ngram, train_sources: [wiki, zh]}}
  percentile: 90.0
mix:
  enabled: true
  domains: {{encyclopedia: {{max_ratio: 0.4}}}}
executor: {{workers: 1, progress: false}}
track: {{enabled: false}}
""")
    build_corpus(load_config(CorpusConfig, cfg))
    return out


def _pretrain(out: Path, shakespeare: tuple[Path, Path]) -> dict:
    from llmkit.config import load_config
    from llmkit.train.pretrain import PretrainConfig, pretrain

    return pretrain(load_config(PretrainConfig, None, tiny_overrides(out, *shakespeare)))


def _sft(root: Path, out: Path) -> dict:
    """A real LoRA SFT run of a few steps on a tiny random decoder (writes metrics.jsonl and results.json)."""
    import torch

    from llmkit.config import load_config
    from llmkit.finetune.sft import SFTConfig, finetune_sft
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import save_model
    from llmkit.tokenizer import train_tokenizer

    alpaca = shared_file("instruct/alpaca_en_demo.json")
    tok = train_tokenizer([str(alpaca)], vocab_size=400)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, d_model=32, n_head=2,
                                  positions="rope", norm="rmsnorm", activation="swiglu"))
    base = save_model(model, root / "base", tok)
    overrides = {"out_dir": str(out), "base_model": str(base), "method": "lora", "data.paths": f"[{alpaca}]",
                 "data.eval_max": 4, "data.mix_pretrain": 0, "train.batch_size": 4, "train.max_steps": 6, "train.decay_steps": 6,
                 "train.warmup_steps": 1, "train.eval_interval": 3, "train.log_interval": 1,
                 "train.checkpoint_interval": 100, "train.progress": False, "eval.answers": 2, "eval.samples": 1,
                 "eval.max_new_tokens": 6, "eval.loss_batches": 1, "eval.baseline": True, "track.enabled": False}
    return finetune_sft(load_config(SFTConfig, None, [f"{k}={v}" for k, v in overrides.items()]))


def _eval_json(rng: np.random.Generator) -> dict:
    """eval/eval.json as the pipeline's eval stage writes it (plausible figures, real-looking latency)."""
    ttft = rng.lognormal(np.log(0.08), 0.5, 32)
    tpot = rng.lognormal(np.log(0.012), 0.3, 32)
    return {"perplexity": {"fp32": 123.4, "int8": 125.0, "delta_rel": 125.0 / 123.4 - 1, "tokens": 20000},
            "size_bytes": {"fp32_linear": 13_369_344, "int8_linear": 3_342_336 + 26_112, "fp32_dir": 14_950_000,
                           "int8_dir": 5_100_000},
            "finetune": {"exact_match": 0.1, "rouge_l": 0.31, "int8_rouge_l": 0.29, "n": 20},
            "latency": {"requests": 32, "concurrency": 4, "ttft_s": ttft.tolist(), "tpot_s": tpot.tolist(),
                        "e2e_s": (ttft + 64 * tpot).tolist(), "tokens_per_s": 123.0},
            "benchmarks": {"final": BENCH_FINAL, "float": BENCH_FLOAT},
            "instructions": [{"lang": "en", "prompt": "Repeat: " + EVIL, "answer": EVIL},
                             {"lang": "zh", "prompt": "请介绍一下北京。", "answer": ZH_ANSWER}]}


def _bench(acc: float, geo: float) -> dict:
    """`run_eval`'s results for two tasks, as the eval stage stores them under eval.json's `benchmarks`."""
    return {"model": "m", "shots": 0, "limit": None, "chat_template": False, "tasks": {
        "sample_mmlu": {"n": 50, "malformed_count": 1, "metrics": {"acc": {"value": acc, "stderr": 0.06},
                                                                   "acc_norm": {"value": acc + 0.02, "stderr": 0.06}},
                        "subjects": {"world_geography": {"n": 25, "acc": {"value": geo, "stderr": 0.09}},
                                     "中国历史": {"n": 25, "acc": {"value": 2 * acc - geo, "stderr": 0.09}}}},
        "sample_gsm8k": {"n": 16, "malformed_count": 0,
                         "metrics": {"exact_match_strict": {"value": 0.0625, "stderr": 0.06},
                                     "exact_match_flexible": {"value": 0.125, "stderr": 0.08}}}}}


BENCH_FINAL, BENCH_FLOAT = _bench(0.42, 0.48), _bench(0.44, 0.52)
PREFERENCE = {"method": "lora", "loss": "dpo", "beta": 0.1, "step": 60,
              "data": {"train": 88, "eval": 30, "malformed": 2, "too_long": 3},
              "before": {"eval_reward_accuracy": 0.0, "eval_reward_margin": 0.0, "eval_loss": 0.6931, "eval_kl": 0.0},
              "after": {"eval_reward_accuracy": 0.9333, "eval_reward_margin": 1.75, "eval_loss": 0.254, "eval_kl": -3.1}}


def _preference(out: Path) -> None:
    """preference/results.json and metrics.jsonl as the preference recipe writes them."""
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(PREFERENCE))
    rows = [{"step": s, "loss": 0.7 - s / 200} for s in range(5, 65, 5)]
    rows += [{"step": s, "rewards/accuracy": min(1.0, s / 40), "rewards/margin": s / 30, "kl": -s / 20}
             for s in range(5, 65, 5)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pipeline_json(run: Path, tracking_uri: str | None = None, parent: str | None = None) -> dict:
    stages = {name: {"status": "done", "fingerprint": f"{i:016x}", "seconds": s, "runs": 1 + (name == "pretrain"),
                     "skipped_last": name in ("samples", "data"), "started_at": "2026-11-28T05:00:00Z",
                     "finished_at": "2026-11-28T05:01:00Z", "artifact": f"{run}/{name}", "digest": f"{i:02d}" * 32,
                     "metrics": {}, "run_id": None}
              for i, (name, s) in enumerate(SECONDS.items())}
    return {"name": "quickstart", "out_dir": str(run), "tracking_uri": tracking_uri, "parent_run_id": parent,
            "cost": PRICES, "stages": stages}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shakespeare_small) -> Path:
    """A run directory with every input of the report, produced by real stage code where the stage has any."""
    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    _data_manifest(root)
    _pretrain(run / "pretrain", shakespeare_small)
    _sft(root, run / "sft")
    _preference(run / "preference")
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps(_eval_json(np.random.default_rng(0)), ensure_ascii=False),
                                            encoding="utf-8")
    (run / "pipeline.json").write_text(json.dumps(_pipeline_json(run)), encoding="utf-8")
    assert (run / "data" / "manifest.json").is_file() and (run / "sft" / "results.json").is_file()
    return run


@pytest.fixture(scope="module")
def report(run_dir) -> tuple[Path, str]:
    path = render_report(run_dir, log_to_mlflow=False)
    return path, path.read_text(encoding="utf-8")


# ---------------------------------------------------------------- helpers

def _images(text: str) -> list[bytes]:
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', text)
    assert srcs and len(srcs) == text.count("<img ")
    out = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        try:
            out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
        except binascii.Error as e:  # pragma: no cover - a failure message, not a path
            pytest.fail(f"bad base64 in an <img>: {e}")
    return out


def _section(text: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', text, re.S)
    assert m, sid
    return m.group(1)


def _rows(table_html: str) -> list[list[str]]:
    rows = re.findall(r"<tr>(.*?)</tr>", table_html, re.S)
    return [[unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", r, re.S)]
            for r in rows]


# ---------------------------------------------------------------- tests

def test_page_has_every_section_and_embedded_pngs(run_dir, report):
    path, text = report
    assert path == run_dir / REPORT_DIR / "index.html" and path.is_file()
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in text.replace("&amp;", "&"), heading
    images = _images(text)
    assert len(images) == 10  # funnel, domains, perplexity, training, finetune, preference, benchmarks, quantization,
    # latency, cost
    for png in images:
        assert png[:8] == PNG_MAGIC and len(png) > 1024
    beside = sorted(p.read_bytes() for p in path.parent.glob("*.png"))
    assert beside == sorted(images)  # the PNGs are also written beside the page, byte for byte
    assert "src=\"http" not in text and "<link" not in text and "<script" not in text  # self-contained, inert
    assert NOT_RUN not in text  # everything ran


def test_sections_show_the_real_stage_outputs(run_dir, report):
    _, text = report
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    funnel = _rows(_section(text, "data"))
    steps = {r[0]: r for r in funnel if len(r) == 5}
    for step in manifest["funnel"]:
        assert steps[step["step"]][1:4] == [str(step["in"]), str(sum(step.get("dropped", {}).values())),
                                            str(step["out"])]
    assert "dedup.exact" in text  # the injected copies are dropped by reason
    results = json.loads((run_dir / "sft" / "results.json").read_text())
    answer = results["answers"][0]["answer"]
    assert escape(answer) in _section(text, "finetune")
    before = {a["prompt"]: a["answer"] for a in results["baseline"]["answers"]}[results["answers"][0]["prompt"]]
    assert "answer before training</div><pre>" + escape(before) in _section(text, "finetune")
    assert "before training (base model)" in _section(text, "finetune")
    training = _rows(_section(text, "training"))
    assert [r[0] for r in training[1:]] == ["pretrain", "sft"]
    for row, stage in zip(training[1:], ["pretrain", "sft"]):
        rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        assert row[1] == str(max(r["step"] for r in rows))
        assert row[2] == f"{[r['loss'] for r in rows if 'loss' in r][-1]:.4g}"


def test_model_text_is_escaped_and_cjk_kept(report):
    _, text = report
    assert EVIL not in text and "<script>" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in text
    assert ZH_ANSWER in text and 'lang="zh"' in text and '<meta charset="utf-8">' in text


def test_cost_table_prices_compute_seconds(report):
    _, text = report
    rows = {r[0]: r for r in _rows(_section(text, "cost"))[1:]}
    for name, seconds in SECONDS.items():
        od = seconds / 3600 * PRICES["on_demand_usd_per_hour"]
        spot = seconds / 3600 * PRICES["spot_usd_per_hour"]
        assert rows[name][1:] == [f"{seconds:.2f}", f"${od:.6f}", f"${spot:.6f}"], name
    total = sum(SECONDS.values())
    assert rows["total"][1:] == [f"{total:.2f}", f"${total / 3600 * PRICES['on_demand_usd_per_hour']:.6f}",
                                 f"${total / 3600 * PRICES['spot_usd_per_hour']:.6f}"]
    saving = 100 * (1 - PRICES["spot_usd_per_hour"] / PRICES["on_demand_usd_per_hour"])
    assert f"spot saving: <b>{saving:.1f}%</b>" in text


def test_latency_percentiles_match_numpy(run_dir, report):
    _, text = report
    lat = json.loads((run_dir / "eval" / "eval.json").read_text())["latency"]
    rows = {r[0]: r for r in _rows(_section(text, "latency"))[1:]}
    for label, key in [("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("end to end", "e2e_s")]:
        values = np.array(lat[key])
        p50, p95, p99 = (np.percentile(values, p) * 1000 for p in (50, 95, 99))
        assert rows[label][:6] == [label, str(len(values)), f"{values.mean() * 1000:.2f}", f"{p50:.2f}",
                                   f"{p95:.2f}", f"{p99:.2f}"], label


def test_preference_and_benchmark_tables_hold_the_stage_figures(report):
    _, text = report
    pref = {r[0]: r[1:] for r in _rows(_section(text, "preference"))[1:]}
    acc = pref["reward accuracy (chosen beats rejected)"]
    assert [float(x) for x in acc] == pytest.approx([0.0, 0.9333, 0.9333])
    assert float(pref["loss"][2]) == pytest.approx(0.254 - 0.6931, abs=1e-4)
    assert "88 train, 30 held out, 2 malformed" in _section(text, "preference")
    bench = _rows(_section(text, "benchmarks"))
    rows = {(r[0], r[1]): r for r in bench if len(r) == 5 and r[0] != "task"}
    assert rows[("sample_mmlu", "acc")][2:] == ["50", "0.42 ± 0.06", "0.44"]
    assert rows[("sample_gsm8k", "exact_match_flexible")][3:] == ["0.125 ± 0.08", "0.125"]
    subjects = {r[1]: r for r in bench if len(r) == 4 and r[0] != "task"}
    assert subjects["中国历史"][3] == "0.36" and subjects["world_geography"][3] == "0.48"
    assert "1 malformed rows" in _section(text, "benchmarks")


def test_missing_inputs_say_not_run(tmp_path):
    empty = render_report(tmp_path / "nothing", log_to_mlflow=True).read_text()  # no pipeline.json at all
    for sid in ["summary", "data", "training", "finetune", "preference", "benchmarks", "quantization", "latency",
                "cost", "instructions"]:
        assert NOT_RUN in _section(empty, sid), sid
    assert "<img" not in empty
    # a run that stopped after pretraining: only pipeline.json and the pretrain metrics
    run = tmp_path / "partial"
    (run / "pretrain").mkdir(parents=True)
    (run / "pretrain" / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 5.0, "lr": 0.001, "tokens_per_s": 10}\n{"step": 2, "loss": 4.0, "lr": 0.001, '
        '"tokens_per_s": 11}\n{"step": 2, "train_loss": 4.1, "val_loss": 4.3, "val_bpb": 2.0}\n{"step": 3, "lo')
    pipe = _pipeline_json(run)
    pipe["stages"] = {k: pipe["stages"][k] for k in ("samples", "data", "pretrain")}
    pipe["stages"]["pretrain"]["status"] = "running"
    (run / "pipeline.json").write_text(json.dumps(pipe))
    text = render_report(run, out_dir=tmp_path / "out").read_text()
    assert (tmp_path / "out" / "training_loss.png").is_file()
    for sid in ["data", "finetune", "quantization", "latency", "instructions"]:
        assert NOT_RUN in _section(text, sid), sid
    assert NOT_RUN not in _section(text, "cost") and "running" in _section(text, "summary")
    assert [r[0] for r in _rows(_section(text, "training"))[1:]] == ["pretrain", "sft"]


def test_logs_page_and_metrics_to_the_parent_mlflow_run(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("pipeline", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(exp, run_name="quickstart").info.run_id
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns(REPORT_DIR))
    (run / "pipeline.json").write_text(json.dumps(_pipeline_json(run, uri, parent)))
    render_report(run)
    names = {Path(a.path).name for a in client.list_artifacts(parent, REPORT_DIR)}
    assert "index.html" in names and {p.name for p in (run / REPORT_DIR).glob("*.png")} <= names
    local = client.download_artifacts(parent, f"{REPORT_DIR}/index.html", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == (run / REPORT_DIR / "index.html").read_bytes()
    m = client.get_run(parent).data.metrics
    ev = json.loads((run / "eval" / "eval.json").read_text())
    total = sum(SECONDS.values())
    assert m["report.ppl_fp32"] == 123.4 and m["report.ppl_int8"] == 125.0
    assert m["report.ttft_p50_s"] == pytest.approx(np.percentile(ev["latency"]["ttft_s"], 50))
    assert m["report.tpot_p50_s"] == pytest.approx(np.percentile(ev["latency"]["tpot_s"], 50))
    assert m["report.cost_on_demand_usd"] == pytest.approx(total / 3600 * PRICES["on_demand_usd_per_hour"])
    assert m["report.cost_spot_usd"] == pytest.approx(total / 3600 * PRICES["spot_usd_per_hour"])
    assert all(m[f"stage.{name}.seconds"] == pytest.approx(s) for name, s in SECONDS.items())


def test_page_renders_in_headless_chromium(report):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright (python) is not installed")
    path, _ = report
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(path.as_uri(), wait_until="load", timeout=15_000)
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
            headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
            zh = page.inner_text('#instructions .card[lang="zh"]')
        finally:
            browser.close()
    assert len(widths) == 10 and all(w > 0 for w in widths), widths
    assert headings == HEADINGS
    assert ZH_ANSWER in zh
    assert not errors, errors
