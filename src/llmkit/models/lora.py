"""Low-rank adaptation (LoRA, Hu et al. 2021) for every llmkit family, saved in Hugging Face PEFT's layout.

LoRA freezes a pretrained weight W (out, in) and learns a low-rank update beside it:

    y = W x + b + s * B A dropout(x),    A: (r, in),  B: (out, r),  s = alpha / r

A starts Kaiming-uniform and B at zero, so a fresh adapter leaves the model's function unchanged; only
r * (in + out) numbers per adapted matrix train (guide §3.1: 0.5-2% of the model). rsLoRA
(Kalajdzievski 2023) scales by alpha / sqrt(r) instead, which keeps the update's size stable as r grows.
After training, `merge_lora` folds s * B A into W and hands back plain `nn.Linear` layers, so the merged
model is an ordinary llmkit model directory and costs nothing extra at inference.

llmkit fuses projections that Hugging Face keeps apart: self-attention has one `qkv` Linear (rows
[q; k; v], k and v smaller under grouped-query attention), cross-attention `q` plus a fused `kv`.
`LoRALinear` therefore carries one (A, B) pair per *output slice* (as litgpt's LoRAQKVLinear does): a
"q_proj, v_proj" adapter on `qkv` learns rank-r updates of the q rows and the v rows only, exactly the
model PEFT trains on a Llama checkpoint. Target names follow Hugging Face (see `CANONICAL_TARGETS`,
`TARGET_ALIASES`); "all-linear" takes every projection inside the blocks, and "re:<regex>" selects by
llmkit module path (`blocks.0.attn.qkv` = the whole fused matrix, `blocks.0.attn.qkv.q` = its q slice).
Embeddings, norms and output heads are never adapted.

Mixture-of-experts layers (`llmkit.models.moe`) add `MOE_TARGETS`: "router" (the router Linear, a plain
`LoRALinear`), "shared_expert_gate" (Qwen2-MoE's shared-expert gate) and "experts.gate_proj" /
"experts.up_proj" / "experts.down_proj" ("experts" = all three) on the stacked expert weights. There
`LoRAExperts` keeps per-expert factors, A (experts, r, in) and B (experts, out, r), and the layer's expert
loop adds s * (x A_e^T) B_e^T on each expert's own tokens (W_e + s B_e A_e, as separate LoRAs per expert
would, without forming a merged weight). "all-linear" does not include them: name them beside it.

`save_lora` / `load_lora` in `llmkit.models.lora_peft` keep adapters on disk in Hugging Face PEFT's layout
(that module builds on this one; this one does not import it).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.models.encdec import T5FeedForward
from llmkit.models.encoder import EncoderClassifier
from llmkit.models.layers import Attention, FeedForward
from llmkit.models.moe import MoEFeedForward
from llmkit.models.trainable_tokens import apply_trainable_tokens, merge_trainable_tokens, trainable_tokens

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "CANONICAL_TARGETS", "FUSED_QKV", "MOE_TARGETS", "TARGET_ALIASES",
    "AdapterSite", "LoRAConfig", "LoRAExperts", "LoRALinear", "adaptable_sites", "apply_lora", "available_targets",
    "base_linear", "freeze_all_but_lora", "has_lora", "lora_expert_modules", "lora_modules", "lora_parameters",
    "merge_lora", "replace_module", "trainable_share", "unmerge_lora",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Hugging Face (Llama) names for the projections every family has; the order is the block's order.
CANONICAL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Other families' HF names -> canonical names. Only projections inside the blocks are meant: BERT's
# "dense" does not reach the pooler or the MLM head, as those are heads (PEFT's "dense" would).
TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    # BERT
    "query": ("q_proj",), "key": ("k_proj",), "value": ("v_proj",),
    "dense": ("o_proj", "up_proj", "down_proj"),
    # T5 (self- and cross-attention alike, as PEFT matches them); wi = relu T5's up,
    # wi_0 / wi_1 = T5 v1.1's gate / up
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",),
    "wi": ("up_proj",), "wi_0": ("gate_proj",), "wi_1": ("up_proj",), "wo": ("down_proj",),
    # GPT-2: c_proj is both the attention output and the MLP down projection, as in PEFT
    "c_proj": ("o_proj", "down_proj"), "c_fc": ("up_proj",),
    # mixture of experts: the routed experts' three projections
    "experts": ("experts.gate_proj", "experts.up_proj", "experts.down_proj"),
}
# Mixture-of-experts pieces (`llmkit.models.moe.MoEFeedForward`), never part of "all-linear": the router and
# Qwen2-MoE's shared-expert gate (Linears) and the stacked experts' projections (per-expert LoRA, `LoRAExperts`).
# Shared experts are an ordinary MLP: gate_proj / up_proj / down_proj reach them.
MOE_TARGETS = ("router", "shared_expert_gate", "experts.gate_proj", "experts.up_proj", "experts.down_proj")
_EXPERT_WEIGHTS = {"experts.gate_proj": "gate", "experts.up_proj": "up", "experts.down_proj": "down"}
# The whole fused self-attention matrix as one adapter (GPT-2's c_attn, PEFT's meaning of that name).
FUSED_QKV = "c_attn"
_FULL = "full"  # slice name of an adapter over a linear's whole output


# -- config -----------------------------------------------------------------------------------------


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters (guide §3.2: r 8-64, alpha 2r-4r, learning rate 5-10x the base one)."""

    r: int = 16
    """Rank of each update B A."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with `rslora`)."""
    dropout: float = 0.1
    """Dropout on the adapter's input (training only; the frozen path never sees it)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """What to adapt: HF-style names (`CANONICAL_TARGETS`, aliases in `TARGET_ALIASES`, `c_attn` = the
    whole fused q/k/v matrix), "all-linear" (every projection in the blocks), mixture-of-experts pieces
    (`MOE_TARGETS`: router, shared_expert_gate, experts.gate_proj / up_proj / down_proj, "experts" = all
    three), or "re:<regex>" matched in full against llmkit module paths (`blocks.3.attn.qkv`, slices as
    `blocks.3.attn.qkv.v`, expert weights as `blocks.3.mlp.gate`)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)."""
    lr_ratio: float = 10.0
    """LoRA parameters train at lr_ratio x the base learning rate (used by the fine-tuning recipe)."""
    modules_to_save: list[str] | None = None
    """Non-LoRA modules trained in full and saved with the adapter (PEFT's modules_to_save). None -> the
    family's default: ["pooler", "classifier"] for `EncoderClassifier` (its head is new), [] otherwise."""
    trainable_tokens: list[str] = field(default_factory=list)
    """Tokens (e.g. the chat template's `<|assistant|>`, `<|end|>`) whose embedding rows train beside the
    adapters: PEFT's trainable_token_indices (`llmkit.models.trainable_tokens`). Decoders only; needs the
    tokenizer to turn them into ids."""
    init_from: str | None = None
    """Start from a saved LoRA adapter instead of fresh factors (A Kaiming, B = 0): an adapter directory
    (PEFT layout, e.g. what `llmkit meta-lora` or a LoRA fine-tune writes) or a run directory with one in
    `final/`. Its A and B are loaded as they are; its rank, scale (alpha), targets and trainable tokens must
    equal this config's (a ValueError names the mismatch). Loaded by the SFT recipe
    (`llmkit.finetune.sft.init_lora_from`); `apply_lora` itself refuses it."""

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("targets: must name at least one target (e.g. [q_proj, v_proj] or [all-linear])")
        for t in self.targets:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as e:
                    raise ValueError(f"targets: {t!r} is not a valid regular expression: {e}") from None
        if self.lr_ratio <= 0:
            raise ValueError(f"lr_ratio: must be > 0, got {self.lr_ratio}")

    @property
    def scaling(self) -> float:
        """The factor s applied to B A x: alpha / r, or alpha / sqrt(r) with rslora."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


# -- the layer --------------------------------------------------------------------------------------


class LinearStandIn(nn.Module):
    """A module wrapping a Linear as `self.base` that stands in for it: code reading .weight / .bias /
    .in_features / .out_features keeps working (LoRALinear here, the serving engine's MultiLoRALinear)."""

    base: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


class LoRALinear(LinearStandIn):
    """A frozen `nn.Linear` plus low-rank updates on slices of its output rows.

    `slices` maps a name to (start, end, rank, scaling): output rows [start, end) get
    ``scaling * B_name A_name dropout(x)`` with A_name (rank, in_features), B_name (end - start, rank).
    A plain adapter is one slice "full" = (0, out_features, r, s); the fused qkv carries "q"/"k"/"v".
    Parameters: `base.weight` / `base.bias` (frozen), `lora_A.<name>`, `lora_B.<name>`.

    forward(x: (..., in_features)) -> (..., out_features). When the base weight is fp16/bf16 the adapter
    keeps fp32 parameters (as PEFT does) and computes its branch in fp32.
    """

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int, int, float]], dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, not {type(base).__name__}")
        self.base = base
        w = base.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.ranges: dict[str, tuple[int, int]] = {}
        self.scaling: dict[str, float] = {}
        # adapters in row order, so the forward pass walks the output left to right
        for name, (start, end, rank, scale) in sorted(slices.items(), key=lambda kv: kv[1][0]):
            if not 0 <= start < end <= base.out_features:
                raise ValueError(f"slice {name!r}: rows [{start}, {end}) outside [0, {base.out_features})")
            if self.ranges and start < max(e for _, e in self.ranges.values()):
                raise ValueError(f"slice {name!r}: rows [{start}, {end}) overlap another slice")
            self.lora_A[name] = nn.Parameter(torch.empty(rank, base.in_features, device=w.device,
                                                         dtype=dtype))
            self.lora_B[name] = nn.Parameter(torch.zeros(end - start, rank, device=w.device, dtype=dtype))
            # Kaiming-uniform A (nn.Linear's default, as in the LoRA reference code and PEFT); B = 0
            nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
            self.ranges[name] = (start, end)
            self.scaling[name] = float(scale)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.train(base.training)  # a wrapper put into an eval-mode model must not start dropping out

    def extra_repr(self) -> str:
        parts = [f"{n}[{s}:{e}] r={self.lora_A[n].shape[0]} s={self.scaling[n]:g}"
                 for n, (s, e) in self.ranges.items()]
        return ", ".join(parts) + (", merged" if self.merged else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or not self.ranges:
            return y
        names = list(self.ranges)
        a_dtype = self.lora_A[names[0]].dtype
        # one matmul reads x for all slices: h = x A_cat^T, (..., sum of ranks)
        a_cat = self.lora_A[names[0]] if len(names) == 1 else torch.cat([self.lora_A[n] for n in names])
        h = F.linear(self.lora_dropout(x).to(a_dtype), a_cat)
        col = 0
        for n in names:
            start, end = self.ranges[n]
            rank = self.lora_A[n].shape[0]
            delta = (F.linear(h[..., col:col + rank], self.lora_B[n]) * self.scaling[n]).to(y.dtype)
            col += rank
            if start == 0 and end == y.shape[-1]:
                y = y + delta
            else:
                # y is the fresh output of base(x) (not saved for backward), so adding into a view is safe
                y[..., start:end] += delta
        return y

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A for slice `name`: (end - start, in_features), the rows it adds to base.weight."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every slice into base.weight (W[start:end] += s B A); forward then skips the adapter."""
        if self.merged:
            return
        for n, (start, end) in self.ranges.items():
            self.base.weight[start:end] += self.delta_weight(n).to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (W[start:end] -= s B A): equal to the original weight up to float rounding."""
        if not self.merged:
            return
        for n, (start, end) in self.ranges.items():
            self.base.weight[start:end] -= self.delta_weight(n).to(self.base.weight.dtype)
        self.merged = False


class LoRAExperts(nn.Module):
    """Per-expert LoRA on a mixture-of-experts layer's stacked expert weights (`MoEFeedForward.gate` / `up`
    (experts, ff, d), `down` (experts, d, ff), each expert's slice in nn.Linear's (out, in) layout).

    `adapters` maps a weight name ("gate", "up", "down") to (rank, scaling). Each gets
    ``lora_A[name]`` (experts, rank, in), Kaiming-uniform per expert as LoRA's A, and ``lora_B[name]``
    (experts, out, rank) = 0, so expert e's weight acts as W_e + scaling * B_e A_e. The layer keeps it as
    `lora_experts` and calls it inside its expert loop: ``self(y, name, e, x)`` = y + scaling * B_e A_e
    dropout(x) for expert e's tokens x (n, in) and its base output y (n, out). fp16/bf16 experts get fp32
    factors (the branch computes in fp32), as `LoRALinear` does.
    """

    def __init__(self, moe: nn.Module, adapters: dict[str, tuple[int, float]], dropout: float = 0.0):
        super().__init__()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        for name in ("gate", "up", "down"):  # the forward order
            if name not in adapters:
                continue
            rank, scale = adapters[name]
            w = getattr(moe, name)
            if w.dim() != 3:
                raise ValueError(f"LoRAExperts: {name} must be a stacked (experts, out, in) weight, "
                                 f"got shape {tuple(w.shape)}")
            experts, out_f, in_f = w.shape
            dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
            a = torch.empty(experts, rank, in_f, device=w.device, dtype=dtype)
            for e in range(experts):  # fan_in = in_f, per expert, as nn.Linear(in_f, rank) would have
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(experts, out_f, rank, device=w.device, dtype=dtype))
            self.scaling[name] = float(scale)
        unknown = set(adapters) - set(self.scaling)
        if unknown or not self.scaling:
            raise ValueError(f"LoRAExperts: adapters must name some of gate, up, down; got {sorted(adapters)}")
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.train(moe.training)

    def extra_repr(self) -> str:
        parts = [f"{n}: experts={self.lora_A[n].shape[0]} r={self.lora_A[n].shape[1]} s={self.scaling[n]:g}"
                 for n in self.scaling]
        return ", ".join(parts) + (", merged" if self.merged else "")

    def forward(self, y: torch.Tensor, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.merged or name not in self.scaling:
            return y
        a = self.lora_A[name]
        h = F.linear(self.lora_dropout(x).to(a.dtype), a[e])
        return y + (F.linear(h, self.lora_B[name][e]) * self.scaling[name]).to(y.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B_e A_e for every expert: (experts, out, in), what merging adds to the stacked weight."""
        return torch.bmm(self.lora_B[name], self.lora_A[name]) * self.scaling[name]

    @torch.no_grad()
    def merge(self, moe: nn.Module) -> None:
        """Fold every adapter into `moe`'s stacked weights (W_e += s B_e A_e); forward then skips them."""
        if self.merged:
            return
        for n in self.scaling:
            w = getattr(moe, n)
            w += self.delta_weight(n).to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, moe: nn.Module) -> None:
        """Undo `merge` (W_e -= s B_e A_e), up to float rounding."""
        if not self.merged:
            return
        for n in self.scaling:
            w = getattr(moe, n)
            w -= self.delta_weight(n).to(w.dtype)
        self.merged = False


# -- where adapters can go --------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSite:
    """One adaptable piece: rows [start, end) of the Linear at `module` (`slice` "full" = all of it), or
    (kind "experts") the stacked expert weight `slice` ("gate" / "up" / "down", `end` = its rows per expert)
    of the mixture-of-experts layer at `module`."""

    module: str
    slice: str
    start: int
    end: int
    canonical: str | None  # CANONICAL_TARGETS / MOE_TARGETS name, "c_attn" for the whole fused qkv, None otherwise
    kind: str = "linear"  # "linear" (a LoRALinear slice) or "experts" (a LoRAExperts weight)

    @property
    def path(self) -> str:
        """The name "re:" targets match: the module path, plus ".q"/".k"/".v" for a slice (an expert weight's
        parameter path, e.g. blocks.0.mlp.gate)."""
        if self.slice == _FULL:
            return self.module
        return f"{self.module}.{self.slice}" if self.module else self.slice


def adaptable_sites(model: nn.Module) -> list[AdapterSite]:
    """Every projection inside the model's attention and feed-forward blocks, in module order (for a
    mixture-of-experts layer: its router, shared-expert gate and stacked expert weights)."""
    out: list[AdapterSite] = []
    for name, mod in model.named_modules():
        p = f"{name}." if name else ""
        if isinstance(mod, MoEFeedForward):
            out.append(AdapterSite(p + "router", _FULL, 0, base_linear(mod.router).out_features, "router"))
            if mod.shared_gate is not None:
                out.append(AdapterSite(p + "shared_gate", _FULL, 0, base_linear(mod.shared_gate).out_features,
                                       "shared_expert_gate"))
            for target, attr in _EXPERT_WEIGHTS.items():
                out.append(AdapterSite(name, attr, 0, getattr(mod, attr).shape[1], target, "experts"))
        elif isinstance(mod, Attention):
            qd, kvd = mod.n_head * mod.head_dim, mod.n_kv_head * mod.head_dim
            if mod.cross:
                out.append(AdapterSite(p + "q", _FULL, 0, qd, "q_proj"))
                out.append(AdapterSite(p + "kv", _FULL, 0, 2 * kvd, None))
                out += [AdapterSite(p + "kv", "k", 0, kvd, "k_proj"), AdapterSite(p + "kv", "v", kvd, 2 * kvd, "v_proj")]
            else:
                out.append(AdapterSite(p + "qkv", _FULL, 0, qd + 2 * kvd, FUSED_QKV))
                out += [AdapterSite(p + "qkv", "q", 0, qd, "q_proj"), AdapterSite(p + "qkv", "k", qd, qd + kvd, "k_proj"),
                        AdapterSite(p + "qkv", "v", qd + kvd, qd + 2 * kvd, "v_proj")]
            out.append(AdapterSite(p + "proj", _FULL, 0, base_linear(mod.proj).out_features, "o_proj"))
        elif isinstance(mod, (FeedForward, T5FeedForward)):
            for attr, canon in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                if hasattr(mod, attr):
                    out.append(AdapterSite(p + attr, _FULL, 0, base_linear(getattr(mod, attr)).out_features, canon))
    return out


def base_linear(mod: nn.Module) -> nn.Linear:
    return mod.base if isinstance(mod, LoRALinear) else mod


def available_targets(model: nn.Module) -> list[str]:
    """The target names that select something in `model` (canonical names first, then aliases)."""
    present = {s.canonical for s in adaptable_sites(model)}
    names = [t for t in CANONICAL_TARGETS if t in present]
    if FUSED_QKV in present:
        names.append(FUSED_QKV)
    names += [t for t in MOE_TARGETS if t in present]
    names += [a for a, canon in TARGET_ALIASES.items() if any(c in present for c in canon)]
    return names


def _resolve(model: nn.Module, targets: list[str]) -> list[AdapterSite]:
    """The sites `targets` select; ValueError naming a target that is unknown or selects nothing."""
    sites = adaptable_sites(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no attention / feed-forward projections to adapt")
    kind = type(model).__name__
    chosen: dict[tuple[str, str], AdapterSite] = {}
    for t in targets:
        if t == "all-linear":
            sel = [s for s in sites if s.canonical in CANONICAL_TARGETS]
        elif t.startswith("re:"):
            pat = re.compile(t[3:])
            sel = [s for s in sites if pat.fullmatch(s.path)]
            if not sel:
                examples = ", ".join(s.path for s in sites[:6])
                raise ValueError(f"targets: {t!r} matches no module path of this {kind} "
                                 f"(paths look like: {examples}, ...)")
        else:
            if t in CANONICAL_TARGETS or t == FUSED_QKV or t in MOE_TARGETS:
                canon: tuple[str, ...] = (t,)
            elif t in TARGET_ALIASES:
                canon = TARGET_ALIASES[t]
            else:
                raise ValueError(
                    f"targets: unknown target {t!r}; available: {', '.join(CANONICAL_TARGETS)}, "
                    f"{FUSED_QKV}, mixture-of-experts {', '.join(MOE_TARGETS)}, "
                    f"aliases {', '.join(TARGET_ALIASES)}, 'all-linear', or 're:<regex on module paths>'")
            sel = [s for s in sites if s.canonical in canon]
            if not sel:
                raise ValueError(f"targets: {t!r} matches no layer of this {kind}; available here: "
                                 f"{', '.join(available_targets(model))}")
        for s in sel:
            chosen[(s.module, s.slice)] = s
    by_module: dict[str, set[str]] = {}
    for s in chosen.values():
        if s.kind == "linear":
            by_module.setdefault(s.module, set()).add(s.slice)
    for module, names in by_module.items():
        if _FULL in names and len(names) > 1:
            raise ValueError(f"targets: {module} is selected both whole and as slices "
                             f"{sorted(names - {_FULL})}; choose one (e.g. c_attn or q_proj/k_proj/v_proj)")
    return [s for s in sites if (s.module, s.slice) in chosen]  # module order


# -- apply / merge ----------------------------------------------------------------------------------


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_expert_modules(model: nn.Module) -> list[tuple[str, LoRAExperts]]:
    """(path of the mixture-of-experts layer, its `LoRAExperts`) for every layer with expert adapters."""
    return [(n, m.lora_experts) for n, m in model.named_modules()
            if isinstance(m, MoEFeedForward) and m.lora_experts is not None]


def _default_modules_to_save(model: nn.Module) -> list[str]:
    # A classifier's pooler and head start untrained (finetune/classify.py builds them fresh): freezing
    # them would leave a random head, so they train in full, as PEFT's SEQ_CLS task does for `classifier`.
    return ["pooler", "classifier"] if isinstance(model, EncoderClassifier) else []


def _check_modules_to_save(model: nn.Module, names: list[str]) -> None:
    allowed = _default_modules_to_save(model)
    for n in names:
        if n not in allowed:
            raise ValueError(f"modules_to_save: {n!r} is not supported for {type(model).__name__} "
                             f"(supported: {allowed or 'none'})")


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def freeze_all_but_lora(model: nn.Module, modules_to_save: list[str]) -> None:
    """Only LoRA parameters (and modules_to_save) train; everything else is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    for n in modules_to_save:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)


def apply_lora(model: nn.Module, cfg: LoRAConfig, tokenizer=None) -> list[str]:
    """Wrap the Linear layers `cfg.targets` selects in `LoRALinear` (in place) and freeze the rest.

    Each module gets one adapter per selected slice (q/k/v of a fused qkv, k/v of a cross-attention kv)
    of rank `cfg.r`, scale `cfg.scaling`; a mixture-of-experts layer whose expert weights are selected gets
    a `LoRAExperts` (`<layer>.lora_experts`) with per-expert factors of that rank. Returns the wrapped (or
    added) module paths in model order. The config is
    kept as `model.lora_config` (save_lora writes it). ValueError for unknown targets, for targets that
    select nothing in this model, and for a model that already carries LoRA. `cfg.trainable_tokens` are
    looked up in `tokenizer` (ValueError when a token is not in its vocabulary or no tokenizer is given).
    """
    cfg.validate()
    if cfg.init_from:
        raise ValueError(f"init_from: {cfg.init_from!r}: apply_lora makes fresh adapters; a saved adapter is "
                         "loaded by llmkit.finetune.sft.init_lora_from (the SFT recipe), not by this recipe")
    if has_lora(model):
        raise ValueError("model already carries LoRA adapters (merge_lora them, or start from the base "
                         "model)")
    modules_to_save = cfg.modules_to_save
    if modules_to_save is None:
        modules_to_save = _default_modules_to_save(model)
    _check_modules_to_save(model, modules_to_save)
    slices: dict[str, dict[str, tuple[int, int, int, float]]] = {}
    experts: dict[str, dict[str, tuple[int, float]]] = {}
    order: list[str] = []
    for s in _resolve(model, cfg.targets):
        if s.kind == "experts":
            if s.module not in experts:
                order.append(f"{s.module}.lora_experts" if s.module else "lora_experts")
            experts.setdefault(s.module, {})[s.slice] = (cfg.r, cfg.scaling)
            continue
        if s.module not in slices:
            order.append(s.module)
        slices.setdefault(s.module, {})[s.slice] = (s.start, s.end, cfg.r, cfg.scaling)
    for path in experts:
        if model.get_submodule(path).expert_group is not None:
            raise ValueError(f"targets: {path}'s experts are sharded (train.expert_parallel); LoRA on the experts "
                             "needs unsharded experts (the router and attention can still be adapted)")
    for path, sl in slices.items():
        replace_module(model, path, LoRALinear(model.get_submodule(path), sl, cfg.dropout))
    for path, ad in experts.items():
        moe = model.get_submodule(path)
        moe.lora_experts = LoRAExperts(moe, ad, cfg.dropout)
    model.lora_config = dataclasses.replace(cfg, modules_to_save=list(modules_to_save))
    freeze_all_but_lora(model, modules_to_save)
    if cfg.trainable_tokens:
        if tokenizer is None:
            raise ValueError("trainable_tokens: a tokenizer is needed to look the tokens up")
        ids = [tokenizer.token_to_id(t) for t in cfg.trainable_tokens]
        missing = [t for t, i in zip(cfg.trainable_tokens, ids) if i is None]
        if missing:
            raise ValueError(f"trainable_tokens: {missing} are not tokens of this tokenizer")
        apply_trainable_tokens(model, ids).values.requires_grad_(True)
    return order


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every LoRA A and B matrix of `model`, in module order, then the trainable token rows if any (for an
    optimizer group at lr_ratio x lr)."""
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, LoRALinear):
            for n in m.ranges:
                params += [m.lora_A[n], m.lora_B[n]]
        elif isinstance(m, LoRAExperts):
            for n in m.scaling:
                params += [m.lora_A[n], m.lora_B[n]]
    tokens = trainable_tokens(model)
    if tokens is not None:
        params.append(tokens.values)
    return params


def trainable_share(model: nn.Module) -> tuple[int, int, float]:
    """(trainable parameters, all parameters, trainable / all); shared (tied) tensors count once."""
    total = trainable = 0
    for p in model.parameters():  # .parameters() yields a tied tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total, trainable / max(total, 1)


def merge_lora(model: nn.Module, keep_adapters: bool = False) -> nn.Module:
    """Fold every adapter into its base weight (W += s B A; per expert W_e += s B_e A_e); returns `model`
    (changed in place).

    By default the wrappers are replaced by their plain `nn.Linear` layers (and expert adapters dropped),
    every parameter becomes trainable again and `model.lora_config` is dropped: `save_model` then writes an
    ordinary model dir. `keep_adapters=True` merges in place but keeps the wrappers, so `unmerge_lora` can
    take it back.
    """
    mods = lora_modules(model)
    for path, m in mods:
        m.merge()
        if not keep_adapters:
            replace_module(model, path, m.base)
    for path, m in lora_expert_modules(model):
        moe = model.get_submodule(path)
        m.merge(moe)
        if not keep_adapters:
            moe.lora_experts = None
    if not keep_adapters:
        merge_trainable_tokens(model)
        for p in model.parameters():
            p.requires_grad_(True)
        if hasattr(model, "lora_config"):
            del model.lora_config
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract merged adapters again (after `merge_lora(model, keep_adapters=True)`)."""
    for _, m in lora_modules(model):
        m.unmerge()
    for path, m in lora_expert_modules(model):
        m.unmerge(model.get_submodule(path))
    return model
