"""Mixture-of-experts feed-forward layers: token-choice top-k routing (guide §5, "动态路由架构").

Each token's hidden state goes to the `top_k` of `experts` SwiGLU MLPs that a linear router scores highest,
and the layer's output is their weighted sum (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2022;
Mixtral, Jiang et al. 2024). Parameters grow with the experts while the compute per token stays that of
`top_k` experts. Optional shared experts see every token (DeepSeekMoE, Qwen2-MoE).

Compute is grouped by expert, never a loop over tokens. The (token, expert) assignments are sorted by
expert, and each expert runs one batched SwiGLU over its own tokens. The results are scattered back with
`index_add_`. Dropless by default: every assignment is computed. With `capacity_factor` c, an expert takes
at most ceil(c x tokens x top_k / experts) assignments, in token order, and drops the rest (the token keeps
its residual and its other experts).

Router losses, added to the training loss by `Decoder.forward` (coefficients in `MoEConfig`):
- load balancing (Switch): experts x sum_e f_e P_e. Here f_e is the share of assignments routed to e, and
  P_e is the mean router probability of e. It is 1 when the load is uniform and grows as it concentrates.
- z-loss (ST-MoE, Zoph et al. 2022): the mean of logsumexp(router logits)^2, which keeps logits small.

`expert_parallel` shards the experts over processes (all-to-all dispatch), for training under torchrun.

LoRA (`llmkit.models.lora`, targets "router" and "experts"): the router is a Linear like any other, and
`lora_experts` holds per-expert factors that `_expert` applies on each expert's own tokens.

`stats` after a forward holds each expert's share of the load, the assignments dropped and the mean
entropy of the router's distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from llmkit.models import expert_parallel


@dataclass
class MoEConfig:
    """`model.moe` of a decoder config."""

    experts: int = 8
    top_k: int = 2
    expert_d_ff: int | None = None
    """Hidden width of each expert; None -> the model's d_ff."""
    shared_experts: int = 0
    """Experts every token goes through (no routing), as one MLP of shared_experts x expert_d_ff (or
    `shared_d_ff`)."""
    shared_d_ff: int | None = None
    shared_gate: bool = False
    """Scale the shared experts' output by sigmoid(a learned linear of x) (Qwen2-MoE)."""
    norm_topk_prob: bool = True
    """Renormalise the top-k probabilities to sum to 1 (Mixtral; Qwen2-MoE's default is False)."""
    capacity_factor: float | None = None
    """None: dropless. Else each expert takes at most ceil(c x tokens x top_k / experts) assignments."""
    router_aux_loss: float = 0.01
    """Coefficient of the load-balancing loss (Switch: 0.01)."""
    router_z_loss: float = 0.001
    """Coefficient of the router z-loss (ST-MoE: 0.001)."""

    def validate(self) -> None:
        if self.experts < 1:
            raise ValueError(f"moe.experts: must be >= 1, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"moe.top_k: must be in [1, experts={self.experts}], got {self.top_k}")
        if self.shared_experts < 0:
            raise ValueError(f"moe.shared_experts: must be >= 0, got {self.shared_experts}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"moe.capacity_factor: must be > 0 (or null for dropless), got {self.capacity_factor}")
        if self.router_aux_loss < 0 or self.router_z_loss < 0:
            raise ValueError("moe.router_aux_loss / router_z_loss: must be >= 0")


class MoEFeedForward(nn.Module):
    """x (..., d_model) -> (..., d_model): routed SwiGLU experts (+ shared experts).

    Weights: router (experts, d_model); gate / up (experts, ff, d_model); down (experts, d_model, ff), the
    (out, in) layout of nn.Linear per expert, so HF's per-expert Linears copy in as slices.
    """

    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig, bias: bool = False):
        super().__init__()
        cfg.validate()
        if bias:
            raise ValueError("moe: experts have no biases (bias: true is not supported with moe)")
        self.cfg = cfg
        ff = cfg.expert_d_ff or d_ff
        self.router = nn.Linear(d_model, cfg.experts, bias=False)
        self.gate = nn.Parameter(torch.empty(cfg.experts, ff, d_model))
        self.up = nn.Parameter(torch.empty(cfg.experts, ff, d_model))
        self.down = nn.Parameter(torch.empty(cfg.experts, d_model, ff))
        for w in (self.gate, self.up, self.down):
            nn.init.normal_(w, std=0.02)
        self.shared = None
        self.shared_gate = None
        if cfg.shared_experts:
            from llmkit.models.layers import FeedForward

            self.shared = FeedForward(d_model, cfg.shared_d_ff or cfg.shared_experts * ff, "swiglu", False, 0.0)
            if cfg.shared_gate:
                self.shared_gate = nn.Linear(d_model, 1, bias=False)
        self.aux_loss: torch.Tensor | None = None
        """The last forward's weighted router losses (load balancing + z), a scalar; None before any."""
        self.stats: dict[str, float | list[float]] = {}
        self.expert_group = None
        """The process group the experts are sharded over (`expert_parallel.shard_experts`); None: all here."""
        self.lora_experts: nn.Module | None = None
        """Per-expert low-rank updates of gate / up / down (`llmkit.models.lora.LoRAExperts`, set by
        `apply_lora` for the `experts*` targets); None: the experts are plain."""

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> router logits (N, E), probabilities (N, E) fp32, top-k weights (N, k), expert ids (N, k)."""
        logits = self.router(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = probs.topk(self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, probs, weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        n, E, k = flat.size(0), self.cfg.experts, self.cfg.top_k
        logits, probs, weights, experts = self.route(flat)
        expert_of = experts.reshape(-1)  # (n k,) assignment -> expert
        token_of = torch.arange(n, device=x.device).repeat_interleave(k)
        weight_of = weights.reshape(-1)
        order = torch.argsort(expert_of, stable=True)  # grouped by expert, token order within
        counts = torch.bincount(expert_of, minlength=E)
        keep = counts
        if self.cfg.capacity_factor is not None:
            capacity = math.ceil(self.cfg.capacity_factor * n * k / E)
            keep = counts.clamp(max=capacity)
        if self.expert_group is not None:
            out = self._sharded_experts(flat, order, expert_of, token_of, weight_of, counts, keep)
        else:
            out = torch.zeros_like(flat)
            start = 0
            for e, (c, kept) in enumerate(zip(counts.tolist(), keep.tolist())):
                if kept:
                    idx = order[start:start + kept]
                    tokens = token_of[idx]
                    y = self._expert(e, flat[tokens])
                    out.index_add_(0, tokens, y * weight_of[idx, None])
                start += c
        if self.shared is not None:
            s = self.shared(flat)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(flat)) * s
            out = out + s
        mean_probs = probs.mean(0)
        if self.expert_group is not None:  # the load and the mean probabilities of every process's tokens
            counts, keep = counts.clone(), keep.clone()
            dist.all_reduce(counts, group=self.expert_group)
            dist.all_reduce(keep, group=self.expert_group)
            tokens = torch.tensor(float(n), device=x.device)
            dist.all_reduce(tokens, group=self.expert_group)
            mean_probs = expert_parallel.all_reduce_sum(probs.sum(0), self.expert_group) / tokens.clamp_min(1)
        assignments = int(counts.sum())
        self._router_losses(logits, mean_probs, counts, assignments)
        p = probs.detach()
        self.stats = {"load": (counts.float() / max(1, assignments)).tolist(), "dropped": int((counts - keep).sum()),
                      "entropy": float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()) if n else 0.0}
        return out.reshape(shape)

    def _expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU over its tokens h (n, d), with its LoRA updates when it carries unmerged ones:
        each adapted projection adds s * (x A_e^T) B_e^T on these tokens, no merged weight is formed."""
        lora = self.lora_experts
        if lora is None or lora.merged:
            return F.linear(F.silu(F.linear(h, self.gate[e])) * F.linear(h, self.up[e]), self.down[e])
        a = F.silu(lora(F.linear(h, self.gate[e]), "gate", e, h)) * lora(F.linear(h, self.up[e]), "up", e, h)
        return lora(F.linear(a, self.down[e]), "down", e, a)

    def _sharded_experts(self, flat, order, expert_of, token_of, weight_of, counts, keep) -> torch.Tensor:
        """The experts' output when they are sharded over processes (`expert_parallel.shard_experts`)."""
        if self.lora_experts is not None and not self.lora_experts.merged:
            raise ValueError("LoRA on the experts does not run under expert parallelism (train.expert_parallel): "
                             "merge the adapter (merge_lora) or train it on unsharded experts")
        sorted_expert = expert_of[order]
        first_of_expert = counts.cumsum(0) - counts
        place_in_expert = torch.arange(order.numel(), device=flat.device) - first_of_expert[sorted_expert]
        kept = order[place_in_expert < keep[sorted_expert]]
        weights = tuple(expert_parallel.local_experts(w, self.expert_group) for w in (self.gate, self.up, self.down))
        return expert_parallel.experts_forward(flat, token_of[kept], weight_of[kept], expert_of[kept], keep,
                                               weights, self.expert_group)

    def _router_losses(self, logits: torch.Tensor, mean_probs: torch.Tensor, counts: torch.Tensor,
                       assignments: int) -> None:
        if logits.size(0) == 0:
            self.aux_loss = logits.sum() * 0.0
            return
        load = counts.float() / assignments  # f_e: not differentiable (an argmax), P_e carries the gradient
        balance = self.cfg.experts * (load * mean_probs).sum()
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        self.aux_loss = self.cfg.router_aux_loss * balance + self.cfg.router_z_loss * z


def load_balance(stats_load: list[float]) -> float:
    """Coefficient of variation of the experts' load shares (0: perfectly balanced)."""
    t = torch.tensor(stats_load)
    return float(t.std(unbiased=False) / t.mean()) if len(stats_load) and t.mean() > 0 else 0.0
