"""`llmkit samples fetch`: mirror copies, checksums, missing files, SOURCES.md. No network access."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import SAMPLES as FETCHED
from llmkit.data import samples as samples_mod
from llmkit.data.samples import (
    SAMPLES,
    ChecksumError,
    MissingSamplesError,
    Sample,
    fetch_samples,
    select_samples,
    sha256_file,
)

# The samples `make test` fetched have a mirror's layout, so they serve as the mirror here.
MIRROR = FETCHED
needs_mirror = pytest.mark.skipif(
    not MIRROR.is_dir(), reason=f"sample data {MIRROR} not found: run `llmkit samples fetch` (make test does)"
)


def _fake(path: str, content: bytes) -> Sample:
    return Sample(
        path=path,
        url=f"https://example.org/{path}",
        license="CC0-1.0",
        language="en",
        description=f"fake {path}",
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
    )


@pytest.fixture
def fake_mirror(tmp_path, monkeypatch):
    """A two-file mirror in tmp_path whose files are the only SAMPLES for the duration of a test."""
    contents = {"en/a.txt": b"alpha\n", "zh/b.json": '["乙"]'.encode()}
    mirror = tmp_path / "mirror"
    for rel, data in contents.items():
        (mirror / rel).parent.mkdir(parents=True, exist_ok=True)
        (mirror / rel).write_bytes(data)
    monkeypatch.setattr(samples_mod, "SAMPLES", [_fake(rel, data) for rel, data in contents.items()])
    return mirror


# -- the pinned list --------------------------------------------------------------------------------


def test_sample_list_is_well_formed():
    assert len(SAMPLES) == 10
    assert len({s.path for s in SAMPLES}) == len(SAMPLES)
    for s in SAMPLES:
        url = urlparse(s.url)
        assert url.scheme == "https" and url.netloc == "raw.githubusercontent.com", s.url
        assert s.url.isascii() and " " not in s.url, s.url
        # /owner/repo/ref/path...: the file name on GitHub ends like ours (json/txt/jsonl).
        assert len(url.path.strip("/").split("/")) >= 4, s.url
        assert Path(url.path).suffix == Path(s.path).suffix, s.url
        assert re.fullmatch(r"[0-9a-f]{64}", s.sha256), s.path
        assert s.license.strip() and s.language and s.description and s.size > 0
        assert not Path(s.path).is_absolute() and ".." not in Path(s.path).parts


def test_select_samples():
    assert select_samples() == SAMPLES
    assert [s.path for s in select_samples(["zh/lunyu.json"])] == ["zh/lunyu.json"]
    assert {s.path.split("/")[0] for s in select_samples(["instruct"])} == {"instruct"}
    assert len(select_samples(["zh/", "en/c4_demo.jsonl"])) == 6
    with pytest.raises(ValueError, match=r"unknown sample 'zh/nope.json'.*en/tinyshakespeare\.txt"):
        select_samples(["zh/nope.json"])


# -- fetching from the real mirror -----------------------------------------------------------------


@needs_mirror
def test_fetch_all_from_mirror(tmp_path):
    out = tmp_path / "samples"
    paths = fetch_samples(out, from_dir=MIRROR)
    assert paths == [out / s.path for s in SAMPLES]
    for s, p in zip(SAMPLES, paths):
        assert p.stat().st_size == s.size
        assert sha256_file(p) == s.sha256
    sources = (out / "SOURCES.md").read_text(encoding="utf-8")
    for s in SAMPLES:
        assert s.path in sources and s.url in sources and s.sha256 in sources
    assert "MIT" in sources and "CC BY-SA" in sources
    assert not list(out.rglob(".*.part"))

    # A second run skips files already present with the right hash (they are not rewritten) ...
    before = {p: p.stat().st_mtime_ns for p in paths}
    assert fetch_samples(out, from_dir=MIRROR) == paths
    assert {p: p.stat().st_mtime_ns for p in paths} == before
    # ... but replaces a damaged one.
    paths[0].write_text("truncated", encoding="utf-8")
    fetch_samples(out, from_dir=MIRROR, only=[SAMPLES[0].path])
    assert sha256_file(paths[0]) == SAMPLES[0].sha256


@needs_mirror
def test_fetch_only_subset(tmp_path):
    paths = fetch_samples(tmp_path, from_dir=MIRROR, only=["zh/lunyu.json", "instruct"])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "instruct/alpaca_en_demo.json",
        "instruct/alpaca_zh_demo.json",
        "zh/lunyu.json",
    ]
    assert not (tmp_path / "en").exists()
    sources = (tmp_path / "SOURCES.md").read_text(encoding="utf-8")
    assert "zh/lunyu.json" in sources and "tinyshakespeare" not in sources


# -- failures, with a fake mirror ------------------------------------------------------------------


def test_checksum_mismatch_is_refused(fake_mirror, tmp_path):
    (fake_mirror / "en/a.txt").write_bytes(b"alpha, edited upstream\n")
    out = tmp_path / "out"
    with pytest.raises(ChecksumError) as err:
        fetch_samples(out, from_dir=fake_mirror)
    msg = str(err.value)
    expected = samples_mod.SAMPLES[0].sha256
    got = hashlib.sha256(b"alpha, edited upstream\n").hexdigest()
    assert "en/a.txt" in msg and expected in msg and got in msg and "--no-verify" in msg
    assert not (out / "en/a.txt").exists()  # never installed under its final name
    assert not list(out.rglob(".*.part"))

    paths = fetch_samples(out, from_dir=fake_mirror, verify=False)
    assert paths[0].read_bytes() == b"alpha, edited upstream\n"


def test_missing_files_are_listed_after_copying_the_rest(fake_mirror, tmp_path):
    (fake_mirror / "zh/b.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(MissingSamplesError, match=r"1 sample file\(s\) missing from mirror .*: zh/b\.json"):
        fetch_samples(out, from_dir=fake_mirror)
    assert (out / "en/a.txt").read_bytes() == b"alpha\n"
    sources = (out / "SOURCES.md").read_text(encoding="utf-8")
    assert "en/a.txt" in sources and "zh/b.json" not in sources


def test_missing_mirror_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_mirror"):
        fetch_samples(tmp_path / "out", from_dir=tmp_path / "no_mirror")


def test_download_path_with_local_url(fake_mirror, tmp_path, monkeypatch):
    # Exercises the urllib download/verify/rename code offline, through file:// URLs.
    local = [Sample(**{**s.__dict__, "url": (fake_mirror / s.path).as_uri()}) for s in samples_mod.SAMPLES]
    monkeypatch.setattr(samples_mod, "SAMPLES", local)
    out = tmp_path / "out"
    paths = fetch_samples(out)
    assert [p.read_bytes() for p in paths] == [b"alpha\n", '["乙"]'.encode()]
    broken = [Sample(**{**local[0].__dict__, "url": (tmp_path / "gone.txt").as_uri()})]
    monkeypatch.setattr(samples_mod, "SAMPLES", broken)
    (out / "en/a.txt").unlink()
    with pytest.raises(samples_mod.FetchError, match=r"en/a\.txt: download from .*gone\.txt failed"):
        fetch_samples(out)
