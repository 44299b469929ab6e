"""Sample corpora for tests, examples and benchmarks: `llmkit samples fetch`.

`SAMPLES` pins ten small public text files (English web / encyclopedia / Shakespeare, alpaca
instructions in English and Chinese, classical Chinese prose and poetry) by upstream URL and
sha256. `fetch_samples` installs them under ``data/samples/<lang-folder>/<file>``, either by
copying from a local mirror with the same layout (``--from DIR``, no network) or by downloading
from GitHub with the standard library only. Every file is written to a temporary name, checked,
then renamed, so a partly written or corrupted file never appears under its final name; and a
``SOURCES.md`` with each file's origin and licence is written next to the data, because
redistributed text has to carry its licence.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

__all__ = [
    "DEFAULT_OUT_DIR",
    "SAMPLES",
    "SOURCES_FILE",
    "ChecksumError",
    "FetchError",
    "MissingSamplesError",
    "Sample",
    "fetch_samples",
    "select_samples",
    "sha256_file",
    "write_sources",
]

log = logging.getLogger(__name__)

DEFAULT_OUT_DIR = "data/samples"
SOURCES_FILE = "SOURCES.md"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Sample:
    """One sample file.

    Attributes:
        path: location relative to the samples folder (and to a mirror), POSIX style: ``"en/tinyshakespeare.txt"``.
        url: raw download URL (https, percent-encoded).
        license: licence of the text (and of the repository it comes from, where they differ).
        language: BCP 47 tag (``en``, ``zh``, ``zh-Hant`` for traditional characters).
        description: what the file holds.
        sha256: hex digest of the expected content.
        size: expected size in bytes.
    """

    path: str
    url: str
    license: str
    language: str
    description: str
    sha256: str
    size: int


def _github_raw(repo: str, ref: str, path: str) -> str:
    # quote(): the chinese-poetry paths are Chinese folder names; a URL must be ASCII.
    return f"https://raw.githubusercontent.com/{repo}/{ref}/{quote(path)}"


# Refs: the commit named by the data README where it gives one, else the repository's default branch
# (the sha256 below then detects any upstream change).
_CHAR_RNN = ("karpathy/char-rnn", "6f9487a6fe5b")
_LLAMA_FACTORY = "hiyouga/LLaMA-Factory"
_POETRY = "chinese-poetry/chinese-poetry"
_LLAMA_FACTORY_LICENSE = "Apache-2.0 (LLaMA-Factory repository; no separate data licence stated)"

SAMPLES: list[Sample] = [
    Sample(
        path="en/tinyshakespeare.txt",
        url=_github_raw(*_CHAR_RNN, "data/tinyshakespeare/input.txt"),
        license="Public domain (Shakespeare's plays)",
        language="en",
        description="Shakespeare plays, plain text: the nanoGPT / char-rnn character-level benchmark corpus",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1115394,
    ),
    Sample(
        path="en/c4_demo.jsonl",
        url=_github_raw(_LLAMA_FACTORY, "ff6d4d12eeb0", "data/c4_demo.jsonl"),
        license="ODC-BY (C4 text); Apache-2.0 (LLaMA-Factory repository)",
        language="en",
        description='300 C4 web documents, one JSON object per line, field "text"',
        sha256="f51528081ef22279f2840c02c4cd7cdfc372138be0817c5b8714d200af692b78",
        size=747189,
    ),
    Sample(
        path="en/wiki_demo.txt",
        url=_github_raw(_LLAMA_FACTORY, "main", "data/wiki_demo.txt"),
        license="CC BY-SA (Wikipedia text)",
        language="en",
        description="30 English Wikipedia articles, one per line",
        sha256="69c0c4d067a95a1a65022f2ae1efff9654b1953b09f206f8832620ebbffa0daf",
        size=1028326,
    ),
    Sample(
        path="instruct/alpaca_en_demo.json",
        url=_github_raw(_LLAMA_FACTORY, "main", "data/alpaca_en_demo.json"),
        license=_LLAMA_FACTORY_LICENSE,
        language="en",
        description="Instruction records (instruction / input / output), English",
        sha256="bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
        size=859893,
    ),
    Sample(
        path="instruct/alpaca_zh_demo.json",
        url=_github_raw(_LLAMA_FACTORY, "main", "data/alpaca_zh_demo.json"),
        license=_LLAMA_FACTORY_LICENSE,
        language="zh",
        description="1,000 instruction records (instruction / input / output), Chinese",
        sha256="d5a4be46ae70d23a461ffc16048069324c0865ee9aa0c8730e21ac4b65ea0f08",
        size=636036,
    ),
    Sample(
        path="zh/guwenguanzhi.json",
        url=_github_raw(_POETRY, "99ebbef7e134", "蒙学/guwenguanzhi.json"),
        license="MIT",
        language="zh-Hant",
        description="古文观止: anthology of classical prose, 222 pieces in nested 'content' lists",
        sha256="ba10ec02849d58bebcc8da575dda3da07a1123e2a31dab3f734acd95d48c5cac",
        size=475985,
    ),
    Sample(
        path="zh/tangshisanbaishou.json",
        url=_github_raw(_POETRY, "master", "蒙学/tangshisanbaishou.json"),
        license="MIT",
        language="zh-Hant",
        description="唐诗三百首: 320 Tang poems in nested 'content' lists",
        sha256="8423b65d938d0327e369972e790549b42609fa7ac4a2a72df59f4cb5a49c08f8",
        size=148829,
    ),
    Sample(
        path="zh/lunyu.json",
        url=_github_raw(_POETRY, "master", "论语/lunyu.json"),
        license="MIT",
        language="zh",
        description="论语 (Analects): 20 chapters of 'paragraphs'",
        sha256="bc336a3839706377892719db44c48a09794a493190535a42bf1c7d4c4233e96c",
        size=74799,
    ),
    Sample(
        path="zh/mengzi.json",
        url=_github_raw(_POETRY, "master", "四书五经/mengzi.json"),
        license="MIT",
        language="zh-Hant",
        description="孟子 (Mencius): 14 chapters of 'paragraphs'",
        sha256="349888018acd0b3fea58de92e53403b8c77640d84b1ae9d37360d5ff1966bcdc",
        size=146745,
    ),
    Sample(
        path="zh/quantangshi_tang0_traditional.json",
        url=_github_raw(_POETRY, "master", "全唐诗/poet.tang.0.json"),
        license="MIT",
        language="zh-Hant",
        description="全唐诗 part 0: 1,000 Tang poems (title / author / paragraphs)",
        sha256="4f88f429938082523cdc72a1612bd7a7c3e3f7a33f8192c61ae51340efc3c92d",
        size=408405,
    ),
]


class ChecksumError(ValueError):
    """A fetched file's sha256 differs from the pinned one; the file was not installed."""


class MissingSamplesError(FileNotFoundError):
    """Some sample files are absent from the mirror; the others were installed."""


class FetchError(OSError):
    """A download failed (network, HTTP status)."""


def select_samples(only: list[str] | None = None) -> list[Sample]:
    """The `SAMPLES` named by `only` (relative paths like ``"zh/lunyu.json"`` or folders like ``"zh"``).

    None selects all. Raises ValueError listing the known names when an entry matches nothing.
    """
    if only is None:
        return list(SAMPLES)
    if isinstance(only, str):
        only = [only]
    chosen: set[str] = set()
    for name in only:
        key = name.strip().strip("/")
        matches = [s.path for s in SAMPLES if s.path == key or s.path.startswith(key + "/")]
        if not key or not matches:
            known = ", ".join(s.path for s in SAMPLES)
            raise ValueError(
                f"unknown sample {name!r}; known samples: {known} (or a folder: en, instruct, zh)"
            )
        chosen.update(matches)
    return [s for s in SAMPLES if s.path in chosen]  # keep SAMPLES order


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch_samples(
    out_dir: str | Path = DEFAULT_OUT_DIR,
    from_dir: str | Path | None = None,
    only: list[str] | None = None,
    verify: bool = True,
    timeout: float = 60,
) -> list[Path]:
    """Install the sample files into `out_dir` and write ``out_dir/SOURCES.md``.

    Args:
        out_dir: destination; files keep their relative layout (``out_dir/en/tinyshakespeare.txt``).
        from_dir: local mirror with the same layout to copy from; None downloads each `Sample.url`.
        only: subset to fetch, see `select_samples`; None fetches all.
        verify: check each new file's sha256 against the pinned value (``--no-verify`` turns it off).
        timeout: seconds per network operation when downloading.
    Returns:
        Paths of the selected files under `out_dir`, in `SAMPLES` order.
    Raises:
        ChecksumError: a file's content differs from the pinned sha256 (it is left uninstalled).
        MissingSamplesError: files absent from `from_dir`, all listed, raised after everything else
            was copied and SOURCES.md written.
        FetchError: a download failed.
        FileNotFoundError: `from_dir` does not exist.
    """
    out_dir = Path(out_dir)
    mirror = Path(from_dir) if from_dir is not None else None
    if mirror is not None and not mirror.is_dir():
        raise FileNotFoundError(f"sample mirror directory {mirror} does not exist")
    selected = select_samples(only)
    out_dir.mkdir(parents=True, exist_ok=True)

    installed: list[Path] = []
    missing: list[str] = []
    for sample in selected:
        dest = out_dir / sample.path
        # Hash check, not mere existence: an interrupted or edited file must be fetched again.
        if dest.is_file() and sha256_file(dest) == sample.sha256:
            log.info("%s: present, sha256 ok", sample.path)
            installed.append(dest)
            continue
        if mirror is not None:
            src = mirror / sample.path
            if not src.is_file():
                missing.append(sample.path)
                continue
            _install(sample, dest, lambda src=src: open(src, "rb"), str(src), verify)
            log.info("%s: copied from %s", sample.path, src)
        else:
            _install(sample, dest, lambda s=sample: _open_url(s, timeout), sample.url, verify)
            log.info("%s: downloaded from %s", sample.path, sample.url)
        installed.append(dest)

    # Before raising for missing files: whatever was installed must carry its licence.
    write_sources(out_dir)
    if missing:
        raise MissingSamplesError(
            f"{len(missing)} sample file(s) missing from mirror {mirror}: {', '.join(missing)}. "
            f"The other {len(installed)} are in {out_dir}."
        )
    return installed


def _open_url(sample: Sample, timeout: float) -> BinaryIO:
    request = urllib.request.Request(sample.url, headers={"User-Agent": "llmkit-samples"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(
            f"{sample.path}: download from {sample.url} failed: {e}. "
            "Without network access, copy from a local mirror: llmkit samples fetch --from DIR"
        ) from e


def _install(
    sample: Sample, dest: Path, open_source: Callable[[], BinaryIO], source: str, verify: bool
) -> None:
    """Stream `open_source()` into a temp file beside `dest`, check sha256, then rename into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A plain open() (not mkstemp) so the file gets the usual umask permissions, not 0600; the pid
    # keeps concurrent fetches into the same folder from writing the same temp file.
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with open_source() as src, open(tmp, "wb") as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        got = h.hexdigest()
        if verify and got != sample.sha256:
            raise ChecksumError(
                f"{sample.path}: sha256 mismatch for {source}: expected {sample.sha256}, got {got}. "
                "The file was not installed. If the upstream file changed on purpose, rerun with "
                "--no-verify (verify=False) to skip the check."
            )
        os.replace(tmp, dest)
    except FetchError:
        raise
    except (OSError, http.client.HTTPException) as e:
        # A dropped connection or a read error mid-file: name the file and where it came from.
        raise FetchError(f"{sample.path}: reading {source} failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def write_sources(out_dir: str | Path) -> Path:
    """Write ``out_dir/SOURCES.md``: origin, licence and sha256 of every sample present in `out_dir`."""
    out_dir = Path(out_dir)
    present = [s for s in SAMPLES if (out_dir / s.path).is_file()]
    lines = [
        "# Sample data: sources and licences",
        "",
        "Written by `llmkit samples fetch`. These files are copies of public upstream files; each keeps the",
        "licence of its source, listed below. Keep this file with the data when you redistribute it.",
        "",
        "| file | language | licence | source | sha256 |",
        "|---|---|---|---|---|",
    ]
    for s in present:
        lines.append(f"| {s.path} | {s.language} | {s.license} | <{s.url}> | `{s.sha256}` |")
    lines.append("")
    for s in present:
        lines.append(f"- `{s.path}`: {s.description}")
    path = out_dir / SOURCES_FILE
    tmp = path.with_name(f".{SOURCES_FILE}.{os.getpid()}.part")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
