"""Training checkpoints that survive kills, corrupt disks and preemption (guide §4).

Layout of one checkpoint, `<root>/step-000123/`:
    model.safetensors   model weights
    optimizer.pt        optimizer + LR-scheduler state (tensors and numbers only; read with weights_only=True)
    rng.pt              CPU / CUDA RNG states of every rank
    state.json          step, sampler positions of every rank, tracking run id, anything JSON-able
    meta.json           sha256 of every file above, written last

A distributed checkpoint (`save_sharded_checkpoint`, training under `train.parallel`) has `shards/` instead of
model.safetensors: every rank's shards of the model and optimizer, written by `torch.distributed.checkpoint`
and readable under any other layout; optimizer.pt then holds only the LR scheduler. meta.json covers every
file under shards/ too.

A checkpoint is written under a temporary name, fsynced and renamed, so a kill at any moment leaves
either the whole checkpoint or none (the next save removes a killed writer's temporary directory). Loading
verifies every checksum; a corrupt or incomplete latest checkpoint is skipped with a warning and the
previous one is used. Only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmkit.data.tokenized import file_sha256

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    step: int
    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]
    shards: Path | None = None
    """A distributed checkpoint's shards directory (then `model` is empty); None for a full checkpoint."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under root, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], rng_state: dict[str, Any], state: dict[str, Any],
                    keep: int = 3) -> Path:
    """Atomically write checkpoint `step` under `root` and delete all but the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # Tied weights share storage; safetensors refuses aliases, so store each distinct tensor by its own name
    # and let load_state_dict(strict=False) + tying restore the alias.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    return _finish(root, tmp, final, step, optimizer_state, rng_state, state, keep, ["model.safetensors"])


def save_sharded_checkpoint(root: str | Path, step: int, write_shards, scheduler_state: dict[str, Any],
                            rng_state: dict[str, Any], state: dict[str, Any], keep: int, info) -> Path:
    """A distributed checkpoint: every rank calls this (collective). `write_shards(dir)` writes this rank's
    shards of the model and optimizer into `dir` (`torch.distributed.checkpoint.save`); rank 0 then adds the
    scheduler, RNG and state files and meta.json, and renames the directory into place as `save_checkpoint`
    does. `info`: the `DistInfo` of this process."""
    from llmkit import runtime

    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-shards"  # one name for every rank
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    runtime.barrier(info)
    write_shards(tmp / "shards")
    runtime.barrier(info)
    if info.is_main:
        shard_files = sorted(str(f.relative_to(tmp)) for f in (tmp / "shards").rglob("*") if f.is_file())
        _finish(root, tmp, final, step, scheduler_state, rng_state, state, keep, shard_files)
    runtime.barrier(info)
    return final


def _finish(root: Path, tmp: Path, final: Path, step: int, optimizer_state, rng_state, state, keep: int,
            written: list[str]) -> Path:
    """Write the small files next to the already-written `written` ones, fsync, checksum, rename, prune."""
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_state, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    files = [*written, "optimizer.pt", "rng.pt", "state.json"]
    for name in files:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    meta = {"step": step, "sha256": {name: file_sha256(tmp / name) for name in files}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. the final step after a resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):  # half-written by a killed writer (one writer per root)
        shutil.rmtree(stale, ignore_errors=True)
    return final


class CorruptCheckpoint(RuntimeError):
    pass


def verify_checkpoint(path: str | Path) -> dict:
    """Check every file against meta.json; returns meta or raises CorruptCheckpoint saying what is wrong."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CorruptCheckpoint(f"{path}: meta.json missing (incomplete write?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptCheckpoint(f"{meta_path}: unreadable: {e}") from e
    for name, digest in meta["sha256"].items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{f}: missing")
        actual = file_sha256(f)
        if actual != digest:
            raise CorruptCheckpoint(f"{f}: checksum mismatch (expected {digest[:12]}…, got {actual[:12]}…)")
    return meta


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    meta = verify_checkpoint(path)
    shards = path / "shards"
    return Checkpoint(
        step=meta["step"],
        path=path,
        model={} if shards.is_dir() else load_file(str(path / "model.safetensors"), device=str(map_location)),
        optimizer=torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True),
        rng=torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
        state=json.loads((path / "state.json").read_text()),
        shards=shards if shards.is_dir() else None,
    )


def load_latest_checkpoint(root: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """Newest checkpoint under root that passes its checksums; None when there is none.

    A checkpoint that fails verification is reported with a warning and the next older one is tried.
    """
    for step, path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path, map_location)
        except (CorruptCheckpoint, OSError, RuntimeError, ValueError) as e:
            log.warning("checkpoint %s (step %d) is unusable, falling back to the previous one: %s", path, step, e)
    return None
