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


def wrap_model(model: torch.nn.Module, info: DistInfo, strategy: str, expert_parallel: bool = False
               ) -> torch.nn.Module:
    """strategy: "ddp" replicates the model; "fsdp" shards every block and the root (FSDP2).

    expert_parallel (with "ddp"): a mixture-of-experts model's experts are sharded over all processes
    (`llmkit.models.expert_parallel`) and DDP replicates the rest.

    Call after the weights are loaded (a resume loads the full state dict into the plain model first) and
    before the optimizer is built: FSDP replaces the parameters with sharded DTensors. Under FSDP the root
    group holds the token embedding, the LM head and the final norm, so tied embeddings stay one parameter.
    A single process gets the model back unchanged.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"train.strategy: expected 'ddp' or 'fsdp', got {strategy!r}")
    if expert_parallel and strategy != "ddp":
        raise ValueError("train.expert_parallel: needs train.strategy ddp (experts are sharded over the "
                         "processes, the rest is replicated)")
    if expert_parallel and getattr(getattr(model, "config", None), "moe", None) is None:
        raise ValueError("train.expert_parallel: the model has no mixture-of-experts layers (set model.moe)")
    if not info.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if expert_parallel:
        from llmkit.models.expert_parallel import shard_experts

        DDP._set_params_and_buffers_to_ignore_for_model(model, shard_experts(model))
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


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, across=None,
                   counted: list[torch.nn.Parameter] | None = None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over parameters some of which may be sharded DTensors (FSDP, tensor or
    expert parallelism) and the rest plain tensors: the total norm covers every shard, so every process scales
    its gradients by the same factor. `across`: a process group whose ranks hold *other* parameters (pipeline
    stages); their squared norms are summed in. `counted`: the parameters whose gradients the norm counts (a
    copy of a weight held twice counts once); all of `params` are clipped. Returns the total norm before
    clipping."""
    from torch.distributed.tensor import DTensor

    with_grad = [p for p in params if p.grad is not None]
    sharded = [p for p in with_grad if isinstance(p.grad, DTensor)]
    if not sharded and across is None and counted is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [p for p in with_grad if not isinstance(p.grad, DTensor)]
    device = with_grad[0].grad.device if with_grad else torch.device("cpu")
    counted_ids = {id(p) for p in (counted if counted is not None else with_grad)}
    squared = torch.zeros((), device=device)
    sharded_counted = [p.grad for p in sharded if id(p) in counted_ids]
    plain_counted = [p.grad for p in plain if id(p) in counted_ids]
    if sharded_counted:
        squared = squared + torch.nn.utils.get_total_norm(sharded_counted).full_tensor() ** 2
    if plain_counted:
        squared = squared + torch.nn.utils.get_total_norm(plain_counted) ** 2
    if across is not None:
        dist.all_reduce(squared, group=across)
    total = torch.sqrt(squared)
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def local_state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of model state this process holds: its shards of the parameters (a sharded DTensor counts its
    local part) and of the optimizer state (AdamW's moments). Gradients are freed between steps and not
    counted. A tied weight counts once."""
    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    params = {id(p): p for p in module.parameters()}
    total = sum(nbytes(p) for p in params.values())
    for state in optimizer.state.values():
        total += sum(nbytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total
