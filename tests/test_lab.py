"""`llmkit lab`: the registry, `lab list`, real quick runs through run_claims, docs regeneration, failures."""

import argparse
import json
import pkgutil

import pytest

from llmkit.lab import experiments
from llmkit.lab.registry import ORDER, all_claims, get
from llmkit.lab.run import NOT_RUN, add_lab_arguments, list_claims, run_claims

MINE = ["dedup", "encdec-params", "heads", "int8", "kv-cache", "trainable-params", "hardware"]


@pytest.fixture
def small_encdec(monkeypatch):
    """encdec-params on a 2-point grid: a full (non-quick) run in well under a second."""
    from llmkit.lab.experiments import encdec_params

    monkeypatch.setattr(encdec_params, "WIDTHS", [256, 512])
    monkeypatch.setattr(encdec_params, "DEPTHS", [4])
    monkeypatch.setattr(encdec_params, "VOCABS", [8192])


def test_registry_finds_every_module_in_guide_order():
    modules = [m.name for m in pkgutil.iter_modules(experiments.__path__) if not m.name.startswith("_")]
    claims = all_claims()
    ids = [c.id for c in claims]
    assert len(ids) == len(set(ids)) == len(modules)
    assert set(MINE) <= set(ids)
    known = [i for i in ids if i in ORDER]
    assert known == sorted(known, key=ORDER.index) and ids[:len(known)] == known
    for c in claims:
        assert c.guide_zh and c.guide_en and c.claimed and 0 < c.minutes <= 10, c.id


def test_get_unknown_id_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError, match="nope") as e:
        get(["int8", "nope"])
    assert "int8" in str(e.value) and "kv-cache" in str(e.value)
    assert [c.id for c in get(["hardware", "dedup"])] == ["dedup", "hardware"]  # registry order
    with pytest.raises(ValueError, match="nope"):
        run_claims(["nope"], quick=True, out_dir="unused", docs=None)


def test_lab_list_and_run_arguments(capsys):
    parser = argparse.ArgumentParser()
    add_lab_arguments(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lab", "list"])
    args.func(args)
    out = capsys.readouterr().out
    assert out == list_claims() + "\n"
    for cid in MINE:
        assert cid in out
    assert "§2.2" in out and "-75% size" in out
    args = parser.parse_args(["lab", "run", "int8", "kv-cache", "--seeds", "5", "--quick", "--out", "x"])
    assert args.ids == ["int8", "kv-cache"] and args.seeds == 5 and args.quick and args.out == "x"
    assert parser.parse_args(["lab", "run", "--all"]).all


def test_quick_runs_write_results_and_full_runs_regenerate_docs(tmp_path, small_encdec, capsys):
    out, docs = tmp_path / "lab", tmp_path / "docs" / "claims.md"
    results = run_claims(["hardware", "encdec-params"], seeds=2, quick=True, out_dir=out, docs=docs)
    assert list(results) == ["encdec-params", "hardware"]
    assert not docs.exists()  # quick runs are not evidence: the page is left alone
    stored = json.loads((out / "encdec-params" / "result.json").read_text(encoding="utf-8"))
    assert stored["quick"] and stored["seeds"] == [0, 1] and stored["machine"]["cpu_count"] >= 1
    assert stored["machine"]["gpu"] and stored["machine"]["torch"]
    assert stored["guide_zh"].startswith("Encoder-Decoder架构") and stored["measurements"][0]["values"]
    hw = results["hardware"]
    if hw.verdict == "not measured":  # no GPU: never a guessed number
        assert "no GPU" in hw.summary.lower() or "No GPU" in hw.summary

    # a full run of one claim regenerates the page: its row, every other claim "not run yet"
    res = run_claims(["encdec-params"], seeds=3, quick=False, out_dir=out, docs=docs)["encdec-params"]
    assert res.verdict in ("holds", "partly holds", "does not hold") and res.seconds > 0
    text = docs.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| ") and "[encdec-params]" in line)
    assert "+30% parameters" in row and f"**{res.verdict}**" in row and "`llmkit lab run encdec-params`" in row
    assert res.measurements[0].text() in row and "参数量" in row
    assert text.count(NOT_RUN) >= 2 and "llmkit lab run --all" in text
    assert sum(line.startswith("| ") for line in text.splitlines()) == len(all_claims()) + 1  # header + rows
    assert (docs.parent / "claims" / "encdec-params-extra_params_total.png").is_file()
    assert "](claims/encdec-params-extra_params_total.png)" in text
    # the quick hardware result was kept aside, not clobbering anything, and shows as a quick run
    assert "quick run" in next(line for line in text.splitlines() if "[hardware]" in line)


def test_a_failing_experiment_is_not_measured_and_the_others_still_run(tmp_path, small_encdec, monkeypatch):
    broken = get(["hardware"])[0]

    def boom(ctx):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(broken, "run", boom)
    docs = tmp_path / "claims.md"
    results = run_claims(["hardware", "encdec-params"], seeds=1, out_dir=tmp_path / "lab", docs=docs)
    assert results["hardware"].verdict == "not measured"
    assert "RuntimeError: simulated failure" in results["hardware"].summary
    assert results["encdec-params"].verdict != "not measured"
    stored = json.loads((tmp_path / "lab" / "hardware" / "result.json").read_text(encoding="utf-8"))
    assert stored["verdict"] == "not measured" and "simulated failure" in stored["summary"]
    assert "simulated failure" in docs.read_text(encoding="utf-8")


def test_quick_run_never_replaces_a_full_result(tmp_path, small_encdec):
    out = tmp_path / "lab"
    run_claims(["encdec-params"], seeds=2, out_dir=out, docs=None)
    run_claims(["encdec-params"], seeds=1, quick=True, out_dir=out, docs=None)
    assert not json.loads((out / "encdec-params" / "result.json").read_text())["quick"]
    assert json.loads((out / "encdec-params" / "result.quick.json").read_text())["quick"]


@pytest.mark.slow
def test_the_whole_lab_in_full(tmp_path):
    results = run_claims(None, seeds=3, quick=False, out_dir=tmp_path / "lab", docs=tmp_path / "claims.md")
    assert set(results) == {c.id for c in all_claims()}
    for cid, r in results.items():
        assert r.verdict in ("holds", "partly holds", "does not hold", "not measured"), cid
        assert not r.summary.startswith("the experiment failed"), (cid, r.summary)
    assert NOT_RUN not in (tmp_path / "claims.md").read_text(encoding="utf-8")
