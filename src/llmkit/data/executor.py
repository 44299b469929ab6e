"""Where the pipeline's per-shard work runs: in-process, a local process pool, or a Ray cluster.

Every executor runs the same picklable function over a list of argument tuples and returns the results
in input order; the work itself reads and writes files under the run directory, so on a cluster that
directory must be on storage every node sees (NFS, a mounted bucket). Near-duplicate detection never runs
inside a shard: workers only compute signatures, and the clustering is done once over all of them, so
its result does not depend on how documents were split across shards or workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class ExecutorConfig:
    kind: Literal["local", "ray"] = "local"
    """local: a process pool on this machine (in-process when workers == 1); ray: Ray tasks."""
    workers: int | None = None
    """Parallel tasks; None = every CPU core (local) / every CPU the Ray cluster has."""
    ray_address: str | None = None
    """Ray cluster to join (`auto`, `ray://host:10001`); None starts a local Ray instance."""
    split_mb: float = 64.0
    """Line-oriented input files larger than this are split into several shards (MB)."""
    progress: bool = True

    def validate(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers: {self.workers} must be >= 1")
        if self.split_mb <= 0:
            raise ValueError(f"split_mb: {self.split_mb} must be positive")


def run_tasks(fn: Callable[..., Any], args: Sequence[tuple], cfg: ExecutorConfig, desc: str) -> list[Any]:
    """`[fn(*a) for a in args]`, in parallel as `cfg` says; results in input order.

    A failing task raises its exception here (after the other running tasks finish), naming `desc`."""
    if not args:
        return []
    if cfg.kind == "ray":
        return _run_ray(fn, args, cfg, desc)
    workers = min(cfg.workers or os.cpu_count() or 1, len(args))
    bar = _progress(len(args), desc, cfg.progress)
    results: list[Any] = [None] * len(args)
    if workers == 1:
        for i, a in enumerate(args):
            results[i] = fn(*a)
            bar.update(1)
        bar.close()
        return results
    # spawn, not fork: the parent may hold torch / OpenMP threads that a forked child would inherit broken
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(fn, *a): i for i, a in enumerate(args)}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    bar.close()
    return results


def _run_ray(fn: Callable[..., Any], args: Sequence[tuple], cfg: ExecutorConfig, desc: str) -> list[Any]:
    try:
        import ray
    except ImportError as e:
        raise ImportError("executor.kind: ray needs Ray: pip install 'llmkit[ray]'") from e
    if not ray.is_initialized():
        init: dict[str, Any] = {"ignore_reinit_error": True, "include_dashboard": False,
                                "log_to_driver": False}
        if cfg.ray_address:
            init["address"] = cfg.ray_address
        elif cfg.workers:
            init["num_cpus"] = cfg.workers
        ray.init(**init)
    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    refs = [remote.remote(*a) for a in args]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(args)
    bar = _progress(len(args), desc, cfg.progress)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            results[index[ref]] = ray.get(ref)
            bar.update(1)
    bar.close()
    return results


def total_workers(cfg: ExecutorConfig) -> int:
    """How many cores the map phases use (for MB/s per core)."""
    if cfg.kind == "ray":
        try:
            import ray
            if ray.is_initialized():
                return int(ray.cluster_resources().get("CPU", 1))
        except ImportError:
            pass
    return cfg.workers or os.cpu_count() or 1


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="shard", disable=not enabled, leave=False)
