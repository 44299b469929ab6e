"""Shard files of the data pipeline: streamed jsonl.gz and parquet writers that commit atomically.

A writer fills `<name>.tmp` and renames it into place on `commit()`, so a killed run never leaves a
half-written shard under its final name (the rerun rewrites it from the start).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path


class JsonlGzWriter:
    """Streams records to a .jsonl.gz under a temporary name; `commit()` renames it into place.

    The gzip header carries no timestamp, so identical content gives identical bytes (stable digests)."""

    def __init__(self, path: Path, level: int):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self._raw = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit()
        self._gz = gzip.GzipFile(filename="", fileobj=self._raw, mode="wb", compresslevel=level, mtime=0)
        self.count = 0

    def write(self, record: dict) -> None:
        self._gz.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.count += 1

    def commit(self) -> None:
        self._gz.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self.tmp, self.path)


class ParquetWriter:
    """Output shard as parquet: nested fields (meta, stats, augmented) are JSON strings."""

    COLUMNS = ("id", "text", "source", "domain", "lang", "meta", "stats", "augmented", "repeat")

    def __init__(self, path: Path, level: int, batch: int = 2048):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self._rows: list[dict] = []
        self._writer = None
        self._batch = batch
        self.count = 0

    def write(self, record: dict) -> None:
        row = {k: record.get(k) for k in self.COLUMNS}
        for k in ("meta", "stats", "augmented"):
            row[k] = json.dumps(row[k], ensure_ascii=False) if row[k] is not None else None
        row["repeat"] = int(row["repeat"] or 0)
        self._rows.append(row)
        self.count += 1
        if len(self._rows) >= self._batch:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(c, pa.int64() if c == "repeat" else pa.string()) for c in self.COLUMNS])
        table = pa.Table.from_pylist(self._rows, schema=schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self._writer.write_table(table)
        self._rows = []

    def commit(self) -> None:
        if self._rows or self._writer is None:
            self._flush()
        self._writer.close()
        os.replace(self.tmp, self.path)


def read_jsonl_gz(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)

