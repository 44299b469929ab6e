"""Data-parallel training under torchrun: DDP, or FSDP2 (`fully_shard`) for models too big to replicate.

The same code runs on one CPU process, on gloo across CPU processes, and on nccl across GPUs:
`torchrun --nproc_per_node N -m llmkit pretrain --config ...` sets RANK / WORLD_SIZE / LOCAL_RANK and
`llmkit.runtime.setup()` joins the process group. Checkpoints always hold *full* (unsharded) state dicts,
gathered through `torch.distributed.checkpoint.state_dict`, so a run can resume on a different
number of processes and the saved model loads anywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from llmkit.runtime import DistInfo


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
