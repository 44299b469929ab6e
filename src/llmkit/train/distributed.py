"""Data-parallel training under torchrun: DDP, or FSDP2 (`fully_shard`) for models too big to replicate.

The same code runs on one CPU process, on gloo across CPU processes, and on nccl across GPUs:
`torchrun --nproc_per_node N -m llmkit pretrain --config ...` sets RANK / WORLD_SIZE / LOCAL_RANK and
`setup()` picks the backend from the device. Checkpoints always hold *full* (unsharded) state dicts,
gathered through `torch.distributed.checkpoint.state_dict`, so a run can resume on a different
number of processes and the saved model loads anywhere.
"""

from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def setup(requested_device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; a plain process gets world size 1.

    Backend: nccl when the device is a GPU (each process takes GPU `LOCAL_RANK`), gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(requested_device)
    if world == 1:
        return DistInfo(device=device)
    if "RANK" not in os.environ:
        raise RuntimeError(f"WORLD_SIZE={world} but RANK is not set: launch with torchrun "
                           f"(torchrun --nproc_per_node N -m llmkit pretrain ...)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {visible} GPU(s) are visible: "
                               f"--nproc_per_node must not exceed the GPUs of one node")
        device = torch.device("cuda", local_rank)  # one GPU per process, whatever index was requested
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            # device_id binds the process group to this GPU: eager NCCL init, and barriers use the right GPU
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        _keep_until_exit(dist.group.WORLD)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


# Shutting down a gloo process group: a known PyTorch hazard (pytorch/pytorch#56297), seen here as a hang
# in about 1 run in 10. Gloo's worker threads free each finished collective, and the Python tensors it
# holds, after the caller has already seen it complete; that needs the GIL. ~ProcessGroupGloo joins those
# threads. When the last reference to the group goes away inside a C++ destructor that keeps the GIL
# (DDP's Reducer, freed when the trainer returns), the join waits for a thread that waits for the GIL:
# deadlock. At interpreter exit (FSDP's device mesh keeps the group alive until then) the same thread
# can abort the process instead (SIGABRT). Hence: teardown() waits, GIL released, until the workers are done, and we
# hold a Python reference to the group until exit, so it is freed from Python, which releases the GIL.
_KEEP_ALIVE: list = []


def _keep_until_exit(group) -> None:
    if not _KEEP_ALIVE:
        atexit.register(_KEEP_ALIVE.clear)
    _KEEP_ALIVE[:] = [group]  # a group from an earlier setup() in this process is idle by now


def _drain_gloo(timeout_s: float = 5.0) -> None:
    """Return once gloo's worker threads have freed the collectives they ran (see _KEEP_ALIVE)."""
    for _ in range(2):  # the default group runs collectives on 2 worker threads
        probe = torch.zeros(1)
        dist.all_reduce(probe)
        deadline = time.monotonic() + timeout_s
        while probe._use_count() > 1 and time.monotonic() < deadline:  # the finished work still holds it
            time.sleep(0.001)


def teardown(info: DistInfo) -> None:
    """Destroy the process group (collective: every rank calls it after its last collective)."""
    if info.enabled and dist.is_initialized():
        if dist.get_backend() == "gloo":
            _drain_gloo()
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, info: DistInfo, strategy: str) -> torch.nn.Module:
    """strategy: "ddp" replicates the model; "fsdp" shards every block and the root (FSDP2).

    Call after the weights are loaded (a resume loads the full state dict into the plain model first) and
    before the optimizer is built: FSDP replaces the parameters with sharded DTensors. Under FSDP the root
    group holds the token embedding, the LM head and the final norm, so tied embeddings stay one parameter.
    A single process gets the model back unchanged.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"train.strategy: expected 'ddp' or 'fsdp', got {strategy!r}")
    if not info.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _full_options() -> StateDictOptions:
    # cpu_offload gathers onto rank 0 only (other ranks get an empty dict). Without a process group it must
    # stay off: older torch releases then call dist.get_rank(), which fails in a plain process, so the
    # callers below move the tensors to CPU themselves.
    return StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded model state on CPU, keyed like `Decoder.state_dict()` (tied weights under both names).

    Collective under DDP/FSDP: call it on every rank. Only rank 0 receives the tensors; the other ranks get
    an empty dict. In a single process the tensors are CPU views of the live weights (copy before mutating).
    """
    state = get_model_state_dict(unwrap(model), options=_full_options())
    return state if dist.is_initialized() else _to_cpu(state)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Unsharded optimizer state on CPU with parameters named by their fully qualified names.

    The format does not depend on the strategy or the world size, so a checkpoint written by FSDP on 8 GPUs
    resumes under DDP on 2 or in one process. Collective: call on every rank; only rank 0 gets the tensors.
    """
    state = get_optimizer_state_dict(unwrap(model), optimizer, options=_full_options())
    return state if dist.is_initialized() else _to_cpu(state)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of full_optimizer_state: every rank passes the full dict and keeps its own shard."""
    set_optimizer_state_dict(unwrap(model), optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is true on any rank (e.g. one rank received SIGTERM)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
