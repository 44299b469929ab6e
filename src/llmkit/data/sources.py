"""Read documents from the sources of a data-pipeline config (guide §1.1, "数据采集").

A source is a file, a directory or a glob, with a format and a domain label. Every record becomes a
*document* - a plain dict that passes through every later step:

    {"id", "text", "source", "domain", "lang", "meta", "stats"}

`id` is the source's own id field when the config names one, else a stable `<source>:<file>:<position>`
(line number for line-oriented files, record index for JSON / parquet / Arrow), so a document can be traced
back to its origin from any output. `meta` holds the record's other fields, untouched.

Nothing is dropped silently: a line that is not JSON, a record without the text field, bytes that are not
UTF-8 come out as *malformed* documents (`doc["error"] = {"reason", "where", "detail"}`, with the raw text
kept) that the pipeline counts and writes to the rejected output with their `file:line`.

Formats:
* ``txt``: one document per file, per line, or per blank-line-separated block (`txt_mode`).
* ``jsonl``: one JSON value per line.
* ``json``: a JSON document; `records` is a path to the record list inside it (default: the top-level list).
* ``parquet``: one record per row (pyarrow, streamed by batches).
* ``hf_disk``: a Hugging Face dataset written with `save_to_disk` (its Arrow files are read with pyarrow,
  so the `datasets` package is not needed); ``hf``: a dataset name on the Hub (needs `datasets` and network).

Field paths (`records`, `text`, `id_field`) are dotted keys; ``[*]`` walks every item of a list and ``[N]``
takes one, e.g. ``content[*].content[*]`` reaches the prose pieces of a chinese-poetry anthology, whose
text is then ``paragraphs`` (a list of strings, joined with `join`).
"""

from __future__ import annotations

import glob
import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SKIPPABLE = ("quality", "safety", "perplexity")
FORMATS = ("txt", "jsonl", "json", "parquet", "hf_disk", "hf")
_SUFFIX_FORMAT = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class SourceConfig:
    name: str = ""
    """Unique name; it prefixes generated ids and names the source in the report."""
    path: str = ""
    """A file, a directory (every file inside, recursively, sorted) or a glob; relative to the working
    directory. For format `hf`, the dataset name on the Hub."""
    format: Literal["auto", "txt", "jsonl", "json", "parquet", "hf_disk", "hf"] = "auto"
    """`auto` picks by file suffix (.txt .jsonl .json .parquet); a directory holding state.json or
    dataset_dict.json is `hf_disk`."""
    domain: str = "web"
    """Domain label used by mixing and the report: news, encyclopedia, code, literature, web, instructions..."""
    lang: str | None = None
    """Declared language of every document (skips detection); None = detect per document."""
    txt_mode: Literal["file", "line", "block"] = "line"
    """txt files: one document per file, per non-blank line, or per block separated by blank lines."""
    records: str | None = None
    """json/jsonl/parquet: path to the records inside each value, e.g. `content[*].content[*]`;
    None = a top-level list is the records, anything else is one record."""
    text: list[str] = field(default_factory=lambda: ["text"])
    """Field path(s) of the text. A list value is joined with `join`; several fields are joined with
    `field_join`, skipping empty ones (e.g. [instruction, input, output] for alpaca records)."""
    join: str = "\n"
    field_join: str = "\n"
    id_field: str | None = None
    """Field path of the record's own id; None = `<source>:<file>:<line or index>`."""
    split: str = "train"
    """hf_disk / hf: which split of a DatasetDict."""
    max_docs: int | None = None
    """Read at most this many documents (malformed ones included) per file; None = all."""
    skip: list[str] = field(default_factory=list)
    """Filters this source is exempt from: any of quality, safety, perplexity (e.g. [quality] for
    instruction data, whose short answers the web-text rules would drop)."""

    def validate(self) -> None:
        if not self.name:
            raise ValueError("name: every source needs a name")
        if not re.fullmatch(r"[\w.-]+", self.name):
            raise ValueError(f"name: {self.name!r} may only hold letters, digits, '_', '-' and '.'")
        if not self.path:
            raise ValueError("path: every source needs a path")
        if not self.text:
            raise ValueError("text: give at least one field path")
        unknown = sorted(set(self.skip) - set(SKIPPABLE))
        if unknown:
            raise ValueError(f"skip: {unknown} cannot be skipped (choose from {list(SKIPPABLE)})")
        for key, paths in (("text", self.text), ("records", [self.records]), ("id_field", [self.id_field])):
            for p in paths:
                if p is not None:
                    try:
                        parse_field_path(p)
                    except ValueError as e:
                        raise ValueError(f"{key}: {e}") from e


def parse_field_path(path: str) -> list[str | int | None]:
    """`"content[*].paragraphs[0]"` -> `["content", None, "paragraphs", 0]` (None = every list item).

    Raises ValueError on an empty or malformed path."""
    steps: list[str | int | None] = []
    if not path or path.startswith(".") or path.endswith(".") or ".." in path:
        raise ValueError(f"malformed field path {path!r}")
    for part in path.split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[(?:\*|-?\d+)\])*)", part)
        if m is None:
            raise ValueError(f"malformed field path {path!r} at {part!r}")
        if m.group(1):
            steps.append(m.group(1))
        for index in re.findall(r"\[(\*|-?\d+)\]", m.group(2)):
            steps.append(None if index == "*" else int(index))
        if not m.group(1) and not m.group(2):
            raise ValueError(f"malformed field path {path!r}")
    return steps


def walk(value: Any, steps: list[str | int | None]) -> Iterator[Any]:
    """Every value reached by `steps` (see `parse_field_path`); missing keys reach nothing."""
    if not steps:
        yield value
        return
    step, rest = steps[0], steps[1:]
    if step is None:
        if isinstance(value, list):
            for item in value:
                yield from walk(item, rest)
    elif isinstance(step, int):
        if isinstance(value, list) and -len(value) <= step < len(value):
            yield from walk(value[step], rest)
    elif isinstance(value, dict) and step in value:
        yield from walk(value[step], rest)


def source_files(src: SourceConfig) -> list[Path]:
    """The files (or hf_disk dataset directories) of a source, sorted, so positions are stable.

    Raises FileNotFoundError naming the source when nothing matches."""
    if src.format == "hf":
        return []
    p = Path(src.path)
    if p.is_dir() and (_is_hf_disk(p) or src.format == "hf_disk"):
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(src.path, recursive=True) if Path(f).is_file() or
                       _is_hf_disk(Path(f)))
    if not files:
        raise FileNotFoundError(f"source {src.name!r}: nothing found at {src.path!r}")
    return files


def file_format(src: SourceConfig, path: Path) -> str:
    if src.format != "auto":
        return src.format
    if path.is_dir():
        return "hf_disk"
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    fmt = _SUFFIX_FORMAT.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise ValueError(f"source {src.name!r}: cannot tell the format of {path} from its suffix; "
                         f"set `format:` to one of {list(FORMATS)}")
    return fmt


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading work: a file, or a byte range of a line-oriented file (for parallelism).

    `first_line` is the 1-based line number at `start`, so ids and error locations stay file-global."""
    source: str
    path: str
    start: int = 0
    end: int | None = None
    first_line: int = 1

    @property
    def key(self) -> str:
        """A name that is unique within a run, usable as a file stem."""
        stem = re.sub(r"[^\w.-]+", "_", self.path.strip("/"))[-80:]
        return f"{self.source}__{stem}__{self.start}"


def plan_tasks(src: SourceConfig, split_bytes: int = 64 << 20) -> list[ReadTask]:
    """Split a source into read tasks: one per file, and line-oriented files (jsonl, txt per line, not
    gzipped) larger than `split_bytes` into ranges that start on a line boundary."""
    if src.format == "hf":
        return [ReadTask(src.name, src.path)]
    tasks = []
    for path in source_files(src):
        fmt = file_format(src, path)
        line_oriented = fmt == "jsonl" or (fmt == "txt" and src.txt_mode == "line")
        size = path.stat().st_size if path.is_file() else 0
        if not line_oriented or path.suffix == ".gz" or size <= split_bytes or src.max_docs is not None:
            tasks.append(ReadTask(src.name, str(path)))
            continue
        tasks.extend(_line_ranges(src.name, path, size, split_bytes))
    return tasks


def _line_ranges(name: str, path: Path, size: int, split_bytes: int) -> list[ReadTask]:
    tasks, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            end = min(start + split_bytes, size)
            if end < size:
                f.seek(end)
                f.readline()  # move the cut to the next line start
                end = f.tell()
            f.seek(start)
            newlines, remaining = 0, end - start
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 24))
                newlines += chunk.count(b"\n")
                remaining -= len(chunk)
            tasks.append(ReadTask(name, str(path), start, end, line))
            start, line = end, line + newlines
    return tasks


def read_task(src: SourceConfig, task: ReadTask) -> Iterator[dict]:
    """Yield the documents (and malformed documents, marked with an `error`) of one read task."""
    if src.format == "hf":
        yield from _limit(_read_hf_hub(src), src.max_docs)
        return
    path = Path(task.path)
    fmt = file_format(src, path)
    rel = _display_path(src, path)
    if fmt == "txt":
        docs = _read_txt(src, task, rel)
    elif fmt == "jsonl":
        docs = _read_jsonl(src, task, rel)
    elif fmt == "json":
        docs = _read_json(src, path, rel)
    elif fmt == "parquet":
        docs = _read_parquet(src, path, rel)
    else:
        docs = _read_hf_disk(src, path, rel)
    yield from _limit(docs, src.max_docs)


def read_source(src: SourceConfig) -> Iterator[dict]:
    """Every document of a source, in order (the sequential form of `plan_tasks` + `read_task`)."""
    for task in plan_tasks(src):
        yield from read_task(src, task)


def _limit(docs: Iterator[dict], n: int | None) -> Iterator[dict]:
    for i, doc in enumerate(docs):
        if n is not None and i >= n:
            return
        yield doc


def _display_path(src: SourceConfig, path: Path) -> str:
    """The file's name relative to the source root (a file source: its name; a directory: the path inside
    it; a glob: the path below its first wildcard-free directory), so ids do not depend on the working
    directory the pipeline runs from."""
    root = Path(src.path)
    if root.is_file():
        return path.name
    if not root.is_dir():
        fixed = []
        for part in root.parts:
            if glob.has_magic(part):
                break
            fixed.append(part)
        root = Path(*fixed) if fixed else Path(".")
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.as_posix()
    return rel if rel != "." else path.name


def new_doc(src: SourceConfig, doc_id: str, text: str, meta: dict) -> dict:
    return {"id": doc_id, "text": text, "source": src.name, "domain": src.domain, "lang": src.lang,
            "meta": meta, "stats": {}}


def malformed(src: SourceConfig, where: str, reason: str, detail: str, raw: str) -> dict:
    doc = new_doc(src, f"{src.name}:{where}", raw, {})
    doc["error"] = {"reason": reason, "where": where, "detail": detail}
    return doc


def _open_text_lines(path: Path, task: ReadTask) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes without the newline) of the task's range."""
    if path.suffix == ".gz":
        f = gzip.open(path, "rb")
    else:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    try:
        if task.start:
            f.seek(task.start)
        pos, line_no = task.start, task.first_line
        for raw in f:
            if task.end is not None and pos >= task.end:
                break
            pos += len(raw)
            yield line_no, raw.rstrip(b"\r\n")
            line_no += 1
    finally:
        f.close()


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_txt(src: SourceConfig, task: ReadTask, rel: str) -> Iterator[dict]:
    path = Path(task.path)
    if src.txt_mode == "file":
        data = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
        text = _decode(data)
        if text is None:
            e = _utf8_error(data)
            yield malformed(src, f"{rel}:{e[0]}", "read.bad_utf8", e[1], data.decode("utf-8", "replace"))
        else:
            yield new_doc(src, f"{src.name}:{rel}", text, {"file": rel})
        return
    if src.txt_mode == "line":
        for line_no, raw in _open_text_lines(path, task):
            text = _decode(raw)
            where = f"{rel}:{line_no}"
            if text is None:
                yield malformed(src, where, "read.bad_utf8", "not valid UTF-8", raw.decode("utf-8", "replace"))
            elif text.strip():
                yield new_doc(src, f"{src.name}:{where}", text, {"file": rel, "line": line_no})
        return
    # blocks separated by blank lines; a block's position is its first line
    block: list[str] = []
    first = 0
    bad: list[int] = []
    for line_no, raw in _open_text_lines(path, task):
        text = _decode(raw)
        if text is None:
            bad.append(line_no)
            text = raw.decode("utf-8", "replace")
        if text.strip():
            if not block:
                first = line_no
            block.append(text)
            continue
        if block:
            yield _block_doc(src, rel, first, block, bad)
            block, bad = [], []
    if block:
        yield _block_doc(src, rel, first, block, bad)


def _block_doc(src: SourceConfig, rel: str, first: int, lines: list[str], bad: list[int]) -> dict:
    where = f"{rel}:{first}"
    if bad:
        return malformed(src, where, "read.bad_utf8", f"lines {bad} are not valid UTF-8", "\n".join(lines))
    return new_doc(src, f"{src.name}:{where}", "\n".join(lines), {"file": rel, "line": first})


def _utf8_error(data: bytes) -> tuple[int, str]:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return data.count(b"\n", 0, e.start) + 1, f"{e.reason} at byte {e.start}"
    return 1, ""


def _read_jsonl(src: SourceConfig, task: ReadTask, rel: str) -> Iterator[dict]:
    for line_no, raw in _open_text_lines(Path(task.path), task):
        where = f"{rel}:{line_no}"
        text = _decode(raw)
        if text is None:
            yield malformed(src, where, "read.bad_utf8", "not valid UTF-8", raw.decode("utf-8", "replace"))
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            yield malformed(src, where, "read.malformed_json", e.msg, text)
            continue
        yield from _records_of(src, value, where, f"{src.name}:{where}")


def _read_json(src: SourceConfig, path: Path, rel: str) -> Iterator[dict]:
    data = path.read_bytes()
    text = _decode(data)
    if text is None:
        line, detail = _utf8_error(data)
        yield malformed(src, f"{rel}:{line}", "read.bad_utf8", detail, data.decode("utf-8", "replace"))
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        yield malformed(src, f"{rel}:{e.lineno}", "read.malformed_json", f"{e.msg} (column {e.colno})", text)
        return
    yield from _records_of(src, value, rel, f"{src.name}:{rel}")


def _records_of(src: SourceConfig, value: Any, where: str, id_prefix: str) -> Iterator[dict]:
    """The records inside one JSON value: via `src.records`, or a top-level list, or the value itself."""
    if src.records:
        records = list(walk(value, parse_field_path(src.records)))
        if not records:
            yield malformed(src, where, "read.no_records", f"path {src.records!r} reaches nothing",
                            json.dumps(value, ensure_ascii=False)[:100_000])
            return
        indexed = True
    elif isinstance(value, list):
        records, indexed = value, True
    else:
        records, indexed = [value], False
    for i, record in enumerate(records):
        rec_where = f"{where}#{i}" if indexed else where
        yield _record_doc(src, record, rec_where, f"{id_prefix}#{i}" if indexed else id_prefix)


def _record_doc(src: SourceConfig, record: Any, where: str, default_id: str) -> dict:
    if isinstance(record, str) and src.text == ["text"]:
        return new_doc(src, default_id, record, {})
    if not isinstance(record, dict):
        return malformed(src, where, "read.no_text", f"record is a {type(record).__name__}, not an object",
                         json.dumps(record, ensure_ascii=False, default=str))
    parts, used = [], set()
    for field_path in src.text:
        steps = parse_field_path(field_path)
        for value in walk(record, steps):
            used.add(steps[0])
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                value = src.join.join(value)
            if isinstance(value, str):
                if value.strip():
                    parts.append(value)
            elif value is not None:
                return malformed(src, where, "read.no_text", f"field {field_path!r} holds a "
                                 f"{type(value).__name__}, not text",
                                 json.dumps(record, ensure_ascii=False, default=str))
    if not parts:
        return malformed(src, where, "read.no_text", f"no text in field(s) {src.text}",
                         json.dumps(record, ensure_ascii=False, default=str))
    doc_id = default_id
    if src.id_field:
        ids = list(walk(record, parse_field_path(src.id_field)))
        if not ids or ids[0] is None or isinstance(ids[0], (dict, list)):
            return malformed(src, where, "read.no_id", f"no id in field {src.id_field!r}",
                             json.dumps(record, ensure_ascii=False, default=str))
        doc_id = str(ids[0])
    meta = {k: v for k, v in record.items() if k not in used}
    return new_doc(src, doc_id, src.field_join.join(parts), meta)


def _read_parquet(src: SourceConfig, path: Path, rel: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield _record_doc(src, record, f"{rel}#{row}", f"{src.name}:{rel}#{row}")
            row += 1


def _is_hf_disk(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _read_hf_disk(src: SourceConfig, path: Path, rel: str) -> Iterator[dict]:
    """A `datasets.save_to_disk` directory: Arrow IPC stream files listed in state.json."""
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if src.split not in splits:
            raise ValueError(f"source {src.name!r}: {path} has splits {splits}, not {src.split!r} "
                             "(set `split:`)")
        path, rel = path / src.split, f"{rel}/{src.split}"
    state = json.loads((path / "state.json").read_text())
    row = 0
    for entry in state["_data_files"]:
        with pa.memory_map(str(path / entry["filename"])) as f:
            for batch in pa.ipc.open_stream(f):
                for record in batch.to_pylist():
                    yield _record_doc(src, record, f"{rel}#{row}", f"{src.name}:{rel}#{row}")
                    row += 1


def _read_hf_hub(src: SourceConfig) -> Iterator[dict]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"source {src.name!r}: format `hf` needs the `datasets` package "
                          "(pip install datasets) and network access; save the dataset with "
                          "`save_to_disk` and use format `hf_disk` offline") from e
    ds = datasets.load_dataset(src.path, split=src.split, streaming=True)
    for row, record in enumerate(ds):
        yield _record_doc(src, record, f"{src.path}#{row}", f"{src.name}:{src.path}#{row}")
