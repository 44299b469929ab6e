"""Content digests of the pipeline: a stage's fingerprint and the digest of the artifact it wrote.

Both the runner (skip / resume decisions, lineage) and the stages (a base model given by path) use them,
so they live apart from both.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmkit.data.tokenized import file_sha256

__all__ = ["fingerprint", "path_digest"]


def fingerprint(material: dict) -> str:
    """sha256 of JSON-able material (keys sorted), e.g. a stage's resolved config and upstream digests."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def path_digest(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (relative paths and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: the stage's artifact is missing")
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0" + file_sha256(p).encode() + b"\n")
    return h.hexdigest()
