"""Expert parallelism: a mixture-of-experts layer's experts sharded over processes (GShard, Lepikhin et al.
2021; Switch Transformer; DeepSpeed-MoE).

With W processes and E experts, process r holds experts [r E/W, (r+1) E/W) and only those: expert weights
cost 1/W of the memory each, while attention, norms, embeddings and routers stay replicated and
data-parallel (DDP). A MoE layer's forward on each process:

1. route its own tokens (the router is replicated), sort the (token, expert) assignments by expert, which
   also groups them by the process that owns the expert;
2. all-to-all #1: every process sends each other process the hidden states of the assignments to its
   experts (the counts go first, in a small all-to-all of E integers);
3. run its local experts over what it received, grouped by expert;
4. all-to-all #2: send the results back where they came from, in the order they came;
5. weight them by the router and sum them per token, as the one-process layer does.

Both all-to-alls are differentiable (backward is the all-to-all with the splits swapped), so an expert's
weight gradient sums every process's tokens. DDP averages the replicated gradients over processes, so the
expert gradients are scaled by 1/W to match (`_scale_grad`). The load-balancing loss uses the global load
and mean router probabilities (summed over processes), so the loss and the updates equal those of one
process that sees every process's batch, up to float rounding (tests/test_expert_parallel.py).

Expert weights are DTensors sharded on dim 0 over a one-dimensional device mesh, so
`torch.distributed.checkpoint`'s full state dicts gather them like FSDP's shards: checkpoints and the final
model hold every expert, and a run resumes on any number of processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllToAll(torch.autograd.Function):
    """x (sum(send), ...) -> (sum(recv), ...): rows [send[:i].sum(), send[:i+1].sum()) go to process i."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; backward sums the gradients too (every process's loss depends on every input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


def local_experts(weight: torch.Tensor, group) -> torch.Tensor:
    """This process's slice (E/W, ...) of a sharded expert weight, with its gradient scaled by 1/W."""
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return _ScaleGrad.apply(local, 1.0 / dist.get_world_size(group))


def experts_forward(flat: torch.Tensor, token_of: torch.Tensor, weight_of: torch.Tensor, expert_of: torch.Tensor,
                    kept_per_expert: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    group) -> torch.Tensor:
    """The routed experts' weighted outputs summed per token, the experts sharded over `group`.

    flat (N, d): this process's tokens. token_of / weight_of / expert_of (A,): the assignments kept, sorted
    by expert (global ids). kept_per_expert (E,) int64: how many of them each expert takes. weights: this
    process's gate / up (E/W, ff, d) and down (E/W, d, ff). Returns (N, d).
    """
    world = dist.get_world_size(group)
    gate, up, down = weights
    local_n = gate.size(0)
    send_per_expert = kept_per_expert.view(world, local_n)
    recv_per_expert = torch.empty_like(kept_per_expert)
    dist.all_to_all_single(recv_per_expert, kept_per_expert, group=group)
    recv_per_expert = recv_per_expert.view(world, local_n)  # [source process, local expert]
    send, recv = send_per_expert.sum(1).tolist(), recv_per_expert.sum(1).tolist()

    received = _AllToAll.apply(flat[token_of], send, recv, group)
    # rows arrive grouped by source process, then by expert; regroup them by local expert
    expert_of_row = torch.arange(local_n, device=flat.device).repeat(world).repeat_interleave(
        recv_per_expert.reshape(-1))
    by_expert = torch.argsort(expert_of_row, stable=True)
    h = received[by_expert]
    outputs, start = [], 0
    for e, count in enumerate(recv_per_expert.sum(0).tolist()):
        if count:
            x = h[start:start + count]
            outputs.append(F.linear(F.silu(F.linear(x, gate[e])) * F.linear(x, up[e]), down[e]))
        start += count
    y = torch.cat(outputs) if outputs else h.new_zeros((0, down.size(1)))
    y = y[torch.argsort(by_expert)]  # back to the order the rows arrived in
    returned = _AllToAll.apply(y, recv, send, group)
    out = torch.zeros_like(flat)
    return out.index_add(0, token_of, returned * weight_of[:, None])


def shard_experts(model: torch.nn.Module, group=None) -> list[str]:
    """Shard every `MoEFeedForward`'s experts over the processes of `group` (default: all of them) in place.

    Call on the full model (every process holds the same weights, e.g. after loading a checkpoint) before
    building the optimizer. Returns the names of the sharded parameters, which DDP must leave alone.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    # a mixture-of-experts layer (`llmkit.models.moe.MoEFeedForward`, which imports this module) is what has an
    # `expert_group`
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "expert_group")]
    adapted = [n for n, m in layers if getattr(m, "lora_experts", None) is not None]
    if adapted:
        raise ValueError(f"train.expert_parallel: {adapted[0]} carries LoRA on its experts, which does not run on "
                         "sharded experts; merge the adapter (merge_lora) first, or train it without expert_parallel")
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    device = next(model.parameters()).device
    mesh = DeviceMesh.from_group(group, device.type)
    names = []
    for module_name, module in layers:
        if module.cfg.experts % world:
            raise ValueError(f"train.expert_parallel: {module.cfg.experts} experts do not split evenly over "
                             f"{world} processes (use a world size that divides moe.experts)")
        for name in ("gate", "up", "down"):
            param = getattr(module, name)
            setattr(module, name, torch.nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)])))
            names.append(f"{module_name}.{name}")
        module.expert_group = group
    if not names:
        raise ValueError("train.expert_parallel: the model has no mixture-of-experts layers (set model.moe)")
    return names
