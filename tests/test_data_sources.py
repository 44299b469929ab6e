import gzip
import json

import pytest

from conftest import shared_file
from llmkit.config import ConfigError, load_config
from llmkit.data.sources import (
    SourceConfig,
    parse_field_path,
    plan_tasks,
    read_source,
    read_task,
    walk,
)


def src(**kw) -> SourceConfig:
    cfg = SourceConfig(**{"name": "s", **kw})
    cfg.validate()
    return cfg


def test_field_paths():
    assert parse_field_path("content[*].paragraphs[0]") == ["content", None, "paragraphs", 0]
    value = {"content": [{"p": ["a", "b"]}, {"p": ["c"]}, {"q": 1}]}
    assert list(walk(value, parse_field_path("content[*].p[-1]"))) == ["b", "c"]
    for bad in ["", "a..b", ".a", "a[x]", "a]"]:
        with pytest.raises(ValueError):
            parse_field_path(bad)


def test_chinese_poetry_anthology_by_config():
    path = shared_file("zh/guwenguanzhi.json")
    docs = list(read_source(src(path=str(path), records="content[*].content[*]", text=["chapter", "paragraphs"])))
    assert len(docs) == 222  # the anthology's 222 pieces, as its abstract says
    first = docs[0]
    assert first["text"].startswith("鄭伯克段於鄢\n初，鄭武公娶於申")
    assert first["id"] == "s:guwenguanzhi.json#0"
    assert first["meta"]["source"] == "《左傳》"  # the record's other fields travel as metadata
    assert "error" not in first


def test_alpaca_fields_joined_and_own_ids(tmp_path):
    path = shared_file("zh/quantangshi_tang0_traditional.json")
    docs = list(read_source(src(path=str(path), text=["title", "paragraphs"], id_field="id")))
    assert len(docs) == 1000 and len({d["id"] for d in docs}) == 1000
    assert docs[0]["id"] == "3ad6d468-7ff1-4a7b-8b24-a27d70d00ed4"
    alpaca = list(read_source(src(path=str(shared_file("instruct/alpaca_en_demo.json")),
                                  text=["instruction", "input", "output"], field_join="\n\n")))
    records = json.loads(shared_file("instruct/alpaca_en_demo.json").read_text())
    assert len(alpaca) == len(records) and "error" not in alpaca[0]
    rec = records[0]
    parts = [rec[k] for k in ("instruction", "input", "output") if rec[k].strip()]
    assert alpaca[0]["text"] == "\n\n".join(parts)


def test_txt_modes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("para one\nstill one\n\n\npara two\n\nthree\n")
    lines = list(read_source(src(path=str(f), txt_mode="line")))
    assert [d["text"] for d in lines] == ["para one", "still one", "para two", "three"]
    assert [d["meta"]["line"] for d in lines] == [1, 2, 5, 7]
    blocks = list(read_source(src(path=str(f), txt_mode="block")))
    assert [d["text"] for d in blocks] == ["para one\nstill one", "para two", "three"]
    assert [d["id"] for d in blocks] == ["s:t.txt:1", "s:t.txt:5", "s:t.txt:7"]
    whole = list(read_source(src(path=str(f), txt_mode="file")))
    assert len(whole) == 1 and whole[0]["text"] == f.read_text()


def test_malformed_records_are_reported_with_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"text": "good one"}\n{"text": broken\n{"other": 1}\n\xff\xfe\n{"text": ["a", "b"]}\n'
                  b'{"text": 5}\n')
    docs = list(read_source(src(path=str(f))))
    errors = [(d["error"]["reason"], d["error"]["where"]) for d in docs if "error" in d]
    assert errors == [("read.malformed_json", "bad.jsonl:2"), ("read.no_text", "bad.jsonl:3"),
                      ("read.bad_utf8", "bad.jsonl:4"), ("read.no_text", "bad.jsonl:6")]
    good = [d["text"] for d in docs if "error" not in d]
    assert good == ["good one", "a\nb"]
    assert '{"text": broken' in docs[1]["text"]  # the raw line is kept for the rejected output


def test_json_file_that_is_not_json(tmp_path):
    f = tmp_path / "x.json"
    f.write_text('[{"text": "a"},\n {"text": }]')
    (doc,) = read_source(src(path=str(f)))
    assert doc["error"]["reason"] == "read.malformed_json" and doc["error"]["where"] == "x.json:2"


def test_directory_glob_gzip_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    with gzip.open(d / "sub" / "a.jsonl.gz", "wt") as g:
        g.write('{"text": "zipped"}\n')
    (d / "b.jsonl").write_text('{"text": "plain", "id": 7}\n')
    pq.write_table(pa.table({"text": ["row0", "row1"], "n": [1, 2]}), d / "c.parquet")
    docs = list(read_source(src(path=str(d))))
    assert [(x["id"], x["text"]) for x in docs] == [
        ("s:b.jsonl:1", "plain"), ("s:c.parquet#0", "row0"), ("s:c.parquet#1", "row1"),
        ("s:sub/a.jsonl.gz:1", "zipped")]
    assert docs[1]["meta"] == {"n": 1}
    globbed = list(read_source(src(path=str(d / "*.jsonl"), id_field="id")))
    assert [x["id"] for x in globbed] == ["7"]


def test_hf_save_to_disk_without_datasets_at_read_time(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]}),
                               "test": datasets.Dataset.from_dict({"text": ["z"], "label": [1]})})
    dd.save_to_disk(str(tmp_path / "hf"))
    docs = list(read_source(src(path=str(tmp_path / "hf"), split="test")))
    assert [(d["text"], d["meta"]) for d in docs] == [("z", {"label": 1})]
    with pytest.raises(ValueError, match="splits"):
        list(read_source(src(path=str(tmp_path / "hf"), split="validation")))


def test_large_line_files_split_into_ranges_that_read_the_same(tmp_path):
    f = tmp_path / "big.jsonl"
    f.write_text("".join(json.dumps({"text": f"document number {i} " + "x" * (i % 50)}) + "\n"
                         for i in range(2000)))
    s = src(path=str(f))
    whole = list(read_source(s))
    tasks = plan_tasks(s, split_bytes=10_000)
    assert len(tasks) > 5
    parts = [d for t in tasks for d in read_task(s, t)]
    assert [(d["id"], d["text"]) for d in parts] == [(d["id"], d["text"]) for d in whole]


def test_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: s\npath: x\nrecords: 'a[b]'\n")
    with pytest.raises(ConfigError, match="records"):
        load_config(SourceConfig, cfg)
    with pytest.raises(FileNotFoundError, match="nothing found"):
        list(read_source(src(path=str(tmp_path / "missing*.jsonl"))))
