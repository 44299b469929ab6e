"""INT8 post-training quantization of llmkit models: dynamic, weight-only and static (calibrated).

Every target `nn.Linear` (by default each Linear inside the transformer blocks; embeddings and the output
head stay fp32 unless named) becomes an `Int8Linear` holding

    qweight: int8 (out, in),  weight_scale: fp32 (out,)   with   W ~= weight_scale[:, None] * qweight

i.e. symmetric per-output-channel weights (LLM.int8's "vector-wise" weight scaling, Dettmers et al. 2022,
arXiv:2208.07339, without its fp16 outlier decomposition). The three modes differ in the activations:

- ``dynamic``: each token row x_m of the input gets its own scale s_m = max|x_m| / 127 computed at run
  time (per-token activation quantization, LLM.int8 §3.2 / ZeroQuant), then
  ``y = (s_m * weight_scale_n) * (q(x) @ qweight^T)`` with the int8 x int8 -> int32 product from
  `torch._int_mm` (exact integer accumulation; on CPU it uses the oneDNN VNNI kernels).
- ``static``: one per-tensor activation scale per Linear, fixed before inference by running calibration
  batches through the model with an observer on each target's input (SmoothQuant's "O1-O3" static
  per-tensor setting, Xiao et al. 2023, arXiv:2211.10438 — without its smoothing of outlier channels).
- ``int4``: group-wise INT4 weights (`llmkit.infer.weight_only.WeightOnlyLinear`, one scale per `group_size`
  input columns, ggml's Q4_0 rounding), activations fp32 between layers.
- ``weight_only``: weights int8, activations keep (nearly) full precision. Kernel "limbs" (default)
  writes x as two int8 limbs, x ~= s1 q1 + s2 q2 with q2 quantizing the residual x - s1 q1 (error
  <= max|x| / (2 * 127 * 254) per element, about bf16's), and runs both through one `torch._int_mm`;
  kernel "dequant" dequantizes the weight to fp32 on the fly and calls `F.linear`.

Observers (the calibration range of a static scale), modelled on PyTorch's `torch.ao.quantization`
observers (MinMaxObserver, HistogramObserver) but written here:

- ``minmax``: max |x| seen.
- ``percentile``: the p-th percentile of |x| (e.g. 99.99) over all calibration values, read from a
  running histogram (Wu et al. 2020, "Integer Quantization for Deep Learning Inference", arXiv:2004.09602).
- ``histogram``: the clipping threshold t minimising the expected quantization error over the histogram
  of |x|: values below t cost the rounding noise (t/127)^2 / 12, values above it the clipping error
  (|x| - t)^2 (PyTorch's HistogramObserver searches the same L2 objective; TensorRT's entropy
  calibrator, Migacz 2017, minimises KL instead — ``histogram_objective="kl"`` does that).

Decoding (at most `llmkit.infer.kernels.MAX_ROWS` tokens per call) in ``dynamic`` mode goes through the CPU
kernels of `llmkit.infer.kernels` when they are built: activations are quantized per block of 32 instead of per
token (finer, so no less accurate) and the int8 weight streams once at 1 byte per weight.

`torch._int_mm` constraints: on CUDA it needs M > 16 and K, N multiples of 8 (int8 tensor-core tiles);
on CPU (torch 2.13) it takes any shape, and at M = 1 (decode steps) it beat the fp32 GEMV by ~8x on a
768 x 2304 matrix here, so CPU always takes it; shapes it refuses fall back to an fp32 matmul of the
int8 values (exact while K * 127^2 < 2^24).

Model directory of a quantized model: `config.json` (as `llmkit.models.io.save_model`),
`quantization.json` (mode, observer, the quantized module paths and shapes) and `model.safetensors`
holding the int8 weights, their scales and every other (fp32) tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model as _load_weights

from llmkit.infer import kernels
from llmkit.infer.weight_only import WeightOnlyLinear

__all__ = [
    "QUANT_CONFIG", "HistogramObserver", "Int8Linear", "MinMaxObserver", "PercentileObserver", "QuantConfig",
    "QuantizeDirConfig", "int8_matmul", "linear_weight_bytes", "load_quantized", "make_observer", "quantize_model",
    "quantize_from_config", "quantize_per_channel", "quantize_per_token", "save_quantized", "target_linears",
]

QUANT_CONFIG = "quantization.json"
QMAX = 127  # symmetric int8: [-127, 127], so -q is representable and zero maps to zero
DEFAULT_TARGETS = (r"(.*\.)?blocks\.\d+\..+",)


@dataclass
class QuantConfig:
    """What to quantize and how."""

    mode: Literal["dynamic", "weight_only", "static", "int4"] = "dynamic"
    observer: Literal["minmax", "percentile", "histogram"] = "histogram"
    """Static mode only: how calibration activations become a clipping range."""
    percentile: float = 99.99
    """Observer "percentile": the percentile of |x| (0-100] used as the range."""
    bins: int = 2048
    """Histogram bins of the percentile / histogram observers."""
    histogram_objective: Literal["mse", "kl"] = "mse"
    """Observer "histogram": minimise expected squared error (PyTorch) or KL divergence (TensorRT)."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Regexes matched in full against module paths (`blocks.3.attn.qkv`); only `nn.Linear` modules are
    taken. Default: every Linear in the blocks; add "lm_head" to quantize the output head too."""
    exclude: list[str] = field(default_factory=list)
    """Regexes of module paths to leave in fp32 even if a target matches."""
    weight_only_kernel: Literal["limbs", "dequant"] = "limbs"
    group_size: int = 32
    """Mode int4: input columns per scale, a multiple of 32 (32 / 64 / 128 are the usual choices: smaller
    groups, smaller error, more scale bytes); a layer whose width it does not divide gets a shorter last group."""

    def validate(self) -> None:
        if self.mode not in ("dynamic", "weight_only", "static", "int4"):
            raise ValueError(f"mode: must be dynamic, weight_only, static or int4, got {self.mode!r}")
        if self.group_size < 32 or self.group_size % 32:
            raise ValueError(f"group_size: must be a positive multiple of 32, got {self.group_size}")
        if self.observer not in ("minmax", "percentile", "histogram"):
            raise ValueError(f"observer: must be minmax, percentile or histogram, got {self.observer!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile: must be in (0, 100], got {self.percentile}")
        if self.bins < 16:
            raise ValueError(f"bins: must be >= 16, got {self.bins}")
        if self.histogram_objective not in ("mse", "kl"):
            raise ValueError(f"histogram_objective: must be mse or kl, got {self.histogram_objective!r}")
        if self.weight_only_kernel not in ("limbs", "dequant"):
            raise ValueError(f"weight_only_kernel: must be limbs or dequant, got {self.weight_only_kernel!r}")
        for t in [*self.targets, *self.exclude]:
            re.compile(t)


@dataclass
class QuantizeDirConfig:
    """Settings of `llmkit quantize` (`quantize_from_config`): a plain model dir in, an INT8 model dir out."""

    model: str = ""
    """The model directory (or a registry URI: models:/NAME@ALIAS, runs:/...)."""
    out: str = ""
    """The quantized model directory written."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """Mode, observer, targets ... (stored in the out dir's quantization.json)."""
    with_head: bool = False
    """Quantize the output head too (fastest decode): adds "lm_head" to quant.targets."""
    calibration: str | None = None
    """Static mode: the text (txt / jsonl / json) whose activations set the ranges."""
    calibration_windows: int = 16
    """Static mode: windows of block_size tokens read from `calibration`."""

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model: required (the model directory to quantize)")
        if not self.out:
            raise ValueError("out: required (the directory the INT8 model is written to)")
        if self.quant.mode == "static" and not self.calibration:
            raise ValueError("calibration: quant.mode static needs a calibration file (text / jsonl / json) to "
                             "measure activations")
        if self.calibration_windows < 1:
            raise ValueError(f"calibration_windows: must be >= 1, got {self.calibration_windows}")

    def quant_config(self) -> QuantConfig:
        """`quant`, with "lm_head" among the targets when `with_head`."""
        head = ["lm_head"] if self.with_head and "lm_head" not in self.quant.targets else []
        return dataclasses.replace(self.quant, targets=[*self.quant.targets, *head])


def quantize_from_config(cfg: QuantizeDirConfig) -> Path:
    """`quantize_dir` as `llmkit quantize` runs it: validates `cfg`, resolves a registry URI; returns the out dir."""
    from llmkit.registry import resolve_model

    cfg.validate()
    return quantize_dir(resolve_model(cfg.model), cfg.out, cfg.quant_config(), cfg.calibration,
                        cfg.calibration_windows)


# -- quantization primitives -------------------------------------------------------------------------


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (out, in) float -> (int8 (out, in), fp32 scale (out,)), symmetric, scale = max|w_row| / 127."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / QMAX).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, K) float -> (int8 (M, K), fp32 scale (M,)) with one symmetric scale per row (token)."""
    scale = (x.abs().amax(dim=1) / QMAX).clamp_min(1e-12)
    q = torch.round(x / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _int_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device.type == "cuda":  # cuBLASLt int8 tiles
        return a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0
    return a.device.type == "cpu"


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: int8 (M, K), b: int8 (K, N) -> int32 (M, N), exact where `torch._int_mm` takes the shapes.

    The fallback multiplies the int8 values in fp32 (exact while K * 127^2 < 2^24, i.e. K <= 1040;
    beyond that rounded like any fp32 GEMM)."""
    if _int_mm_supported(a, b):
        try:
            return torch._int_mm(a, b)
        except RuntimeError:
            pass
    return (a.float() @ b.float()).round_().to(torch.int32)


# -- the layer ---------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """A Linear with int8 per-output-channel weights; replaces an `nn.Linear` in place.

    Buffers (all saved): `qweight` int8 (out, in); `weight_scale` fp32 (out,); `bias` fp32 (out,) or
    absent; `input_scale` fp32 () — the static activation scale (1.0 and unused in other modes).
    forward(x: (..., in) float) -> (..., out) in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str = "dynamic",
                 weight_only_kernel: str = "limbs"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode = mode
        self.weight_only_kernel = weight_only_kernel
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None
        self.register_buffer("input_scale", torch.ones(()))

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "dynamic", input_scale: float | None = None,
                    weight_only_kernel: str = "limbs") -> Int8Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, weight_only_kernel)
        q, s = quantize_per_channel(linear.weight)
        dev = linear.weight.device
        m.qweight.copy_(q)
        m.weight_scale.copy_(s)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        if input_scale is not None:
            m.input_scale.fill_(float(input_scale))
        return m.to(dev)

    def extra_repr(self) -> str:
        extra = f", input_scale={self.input_scale.item():.4g}" if self.mode == "static" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}{extra}")

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 (out, in): weight_scale[:, None] * qweight."""
        return self.qweight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if (self.mode == "dynamic" and x2.size(0) <= kernels.MAX_ROWS and self.in_features % 32 == 0
                and x2.device.type == "cpu" and kernels.available()):
            y = kernels.linear_q8(x2, self.qweight, self.weight_scale[:, None])  # decode: the streaming kernel
        elif self.mode == "weight_only":
            if self.weight_only_kernel == "dequant":
                y = F.linear(x2, self.dequantized_weight())
            else:
                q1, s1 = quantize_per_token(x2)
                r = x2 - q1.float() * s1[:, None]
                q2, s2 = quantize_per_token(r)
                M = x2.shape[0]
                acc = int8_matmul(torch.cat((q1, q2)), self.qweight.t()).float()  # (2M, out)
                y = (acc[:M] * s1[:, None] + acc[M:] * s2[:, None]) * self.weight_scale
        else:
            if self.mode == "static":
                s = self.input_scale
                q = torch.round(x2 / s).clamp_(-QMAX, QMAX).to(torch.int8)
                acc = int8_matmul(q, self.qweight.t())
                y = acc.float() * (s * self.weight_scale)
            else:
                q, s = quantize_per_token(x2)
                acc = int8_matmul(q, self.qweight.t())
                y = acc.float() * s[:, None] * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


# -- observers ---------------------------------------------------------------------------------------


class MinMaxObserver:
    """Running max |x| over everything observed; `amax()` -> float (0.0 before any data)."""

    def __init__(self):
        self.max_abs = 0.0

    def observe(self, x: torch.Tensor) -> None:
        if x.numel():
            self.max_abs = max(self.max_abs, float(x.detach().abs().max()))

    def amax(self) -> float:
        return self.max_abs


class _HistObserver:
    """A running histogram of |x| over [0, max_abs] in `bins` equal bins.

    When a batch exceeds the range, the range grows (to the next power-of-two multiple of the old one,
    so old bins merge exactly: 2^k old bins -> one new bin, as PyTorch's HistogramObserver combines
    histograms by upsampling) and the batch is added into the new bins.
    """

    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.max_abs = 0.0

    def observe(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().flatten()
        if not a.numel():
            return
        m = float(a.max())
        if m <= 0:
            self.hist[0] += a.numel()
            return
        if self.max_abs == 0.0:
            self.max_abs = m
        elif m > self.max_abs:
            factor = 2 ** math.ceil(math.log2(m / self.max_abs))
            merged = torch.zeros_like(self.hist)
            merged.index_add_(0, torch.arange(self.bins) // factor, self.hist)
            self.hist = merged
            self.max_abs *= factor
        self.hist += torch.histc(a, bins=self.bins, min=0.0, max=self.max_abs).double()

    @property
    def edges(self) -> torch.Tensor:
        """(bins + 1,) bin edges over [0, max_abs]."""
        return torch.linspace(0.0, self.max_abs, self.bins + 1, dtype=torch.float64)


class PercentileObserver(_HistObserver):
    """Range = the `percentile`-th percentile of |x| (upper edge of the bin where the CDF reaches it)."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048):
        super().__init__(bins)
        self.percentile = percentile

    def amax(self) -> float:
        total = float(self.hist.sum())
        if total == 0 or self.max_abs == 0:
            return 0.0
        cdf = torch.cumsum(self.hist, 0) / total
        i = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100.0, dtype=torch.float64)))
        return float(self.edges[min(i + 1, self.bins)])


class HistogramObserver(_HistObserver):
    """Range = the clipping threshold t (a bin edge) with the least expected quantization error of |x|.

    objective "mse": sum over bins of n_i * [c_i <= t] (t/127)^2/12 + n_i * [c_i > t] (c_i - t)^2,
    c_i the bin centres. objective "kl": TensorRT's entropy calibration — KL(P || Q) between the clipped
    histogram P (outliers folded into the last bin) and Q, P re-binned into 128 levels and expanded back.
    Candidates start at bin 128 (below that the int8 grid is finer than the histogram)."""

    def __init__(self, bins: int = 2048, objective: str = "mse"):
        super().__init__(bins)
        self.objective = objective

    def amax(self) -> float:
        if self.hist.sum() == 0 or self.max_abs == 0:
            return 0.0
        return self._mse() if self.objective == "mse" else self._kl()

    def _mse(self) -> float:
        edges = self.edges
        centres = (edges[:-1] + edges[1:]) / 2
        t = edges[1:]  # candidate thresholds (bins,)
        inside = centres[None, :] <= t[:, None]  # (T, bins)
        n = self.hist[None, :]
        rounding = (n * inside).sum(1) * (t / QMAX) ** 2 / 12
        clipping = (n * (~inside) * (centres[None, :] - t[:, None]).clamp_min(0) ** 2).sum(1)
        return float(t[torch.argmin(rounding + clipping)])

    def _kl(self) -> float:
        levels = QMAX + 1
        hist = self.hist
        best, best_i = math.inf, self.bins
        for i in range(levels, self.bins + 1):
            p = hist[:i].clone()
            p[-1] += hist[i:].sum()
            nonzero = hist[:i] > 0
            # quantize the i reference bins into `levels` groups, spread each group's mass evenly over
            # its non-empty bins
            group = torch.arange(i) * levels // i
            mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, hist[:i])
            count = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, nonzero.double())
            q = torch.where(nonzero, mass[group] / count[group].clamp_min(1), torch.zeros(()))
            p, q = p / p.sum(), q / q.sum().clamp_min(1e-30)
            m = p > 0
            kl = float((p[m] * torch.log(p[m] / q[m].clamp_min(1e-30))).sum())
            if kl < best:
                best, best_i = kl, i
        return float(self.edges[best_i])


def make_observer(cfg: QuantConfig):
    if cfg.observer == "minmax":
        return MinMaxObserver()
    if cfg.observer == "percentile":
        return PercentileObserver(cfg.percentile, cfg.bins)
    return HistogramObserver(cfg.bins, cfg.histogram_objective)


# -- whole models ------------------------------------------------------------------------------------


def target_linears(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Module paths of the `nn.Linear` layers `cfg` selects, in module order."""
    inc = [re.compile(t) for t in cfg.targets]
    exc = [re.compile(t) for t in cfg.exclude]
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and any(r.fullmatch(name) for r in inc)
            and not any(r.fullmatch(name) for r in exc)]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _as_batches(batches) -> Iterable[torch.Tensor]:
    for b in batches:
        if isinstance(b, dict):
            b = b["idx"] if "idx" in b else b["input_ids"]
        b = torch.as_tensor(b)
        yield b[None] if b.dim() == 1 else b


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig | None = None,
                   calibration_batches: Iterable[torch.Tensor] | None = None) -> nn.Module:
    """Replace the target Linears of `model` by `Int8Linear` (mode int4: `WeightOnlyLinear`, 4 bits, groups of
    `cfg.group_size`) in place and return the model (eval mode).

    Static mode needs `calibration_batches`: token-id tensors (B, T) (or (T,), or dicts with "idx"),
    run through `model(idx)` with an observer on each target's input before anything is replaced.
    """
    from llmkit.models.io import require_plain

    cfg = cfg or QuantConfig()
    cfg.validate()
    require_plain(model, "quantize_model")
    names = target_linears(model, cfg)
    if not names:
        raise ValueError(f"no nn.Linear matches targets={cfg.targets} (exclude={cfg.exclude})")
    model.eval()
    scales: dict[str, float] = {}
    if cfg.mode == "static":
        if calibration_batches is None:
            raise ValueError("static quantization needs calibration_batches (token ids)")
        observers = {n: make_observer(cfg) for n in names}
        hooks = [model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, obs=observers[n]: obs.observe(args[0])) for n in names]
        seen = 0
        try:
            device = next(model.parameters()).device
            for idx in _as_batches(calibration_batches):
                model(idx.to(device))
                seen += 1
        finally:
            for h in hooks:
                h.remove()
        if not seen:
            raise ValueError("calibration_batches is empty")
        for n, obs in observers.items():
            scales[n] = max(obs.amax(), 1e-8) / QMAX
    if cfg.mode == "int4":
        bad = [n for n in names if model.get_submodule(n).in_features % 32]
        if bad:
            raise ValueError(f"mode int4: in_features of {', '.join(bad[:3])} ({model.get_submodule(bad[0]).in_features}) "
                             "is not a multiple of 32; exclude those layers (quant.exclude)")
    for n in names:
        linear = model.get_submodule(n)
        _set_module(model, n, WeightOnlyLinear.from_linear(linear, 4, cfg.group_size) if cfg.mode == "int4" else
                    Int8Linear.from_linear(linear, cfg.mode, scales.get(n), cfg.weight_only_kernel))
    model.quant_config = cfg
    return model


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of Linear weights (+ biases, + scales): {"fp32": ..., "int8": ..., "int4": ..., "total": ...}.

    The tied output head (its weight *is* the embedding) is not counted."""
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out = {"fp32": 0, "int8": 0, "int4": 0}
    for m in model.modules():
        if type(m) is nn.Linear and id(m.weight) not in emb:
            out["fp32"] += sum(t.numel() * t.element_size() for t in (m.weight, m.bias) if t is not None)
        elif isinstance(m, Int8Linear):
            out["int8"] += sum(t.numel() * t.element_size() for t in (m.qweight, m.weight_scale, m.bias)
                               if t is not None)
        elif isinstance(m, WeightOnlyLinear):
            out[f"int{m.bits}"] += m.weight_bytes()
    out["total"] = out["fp32"] + out["int8"] + out["int4"]
    return out


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer=None,
                   generation_config: dict[str, Any] | None = None) -> Path:
    """Write a quantized model dir: config.json, quantization.json, model.safetensors (+ tokenizer)."""
    from llmkit.models.io import save_model

    layers = {n: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                  "mode": m.mode, "weight_only_kernel": m.weight_only_kernel}
              for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    layers |= {n: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                   "mode": "grouped", "bits": m.bits, "group_size": m.group_size}
               for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}
    if not layers:
        raise ValueError("save_quantized: the model has no quantized Linear (run quantize_model first)")
    out = save_model(model, out_dir, tokenizer, generation_config)  # state_dict holds the int8 buffers
    cfg = getattr(model, "quant_config", None)
    grouped = {(v["bits"], v["group_size"]) for v in layers.values() if v["mode"] == "grouped"}
    weight = "; ".join([*(["int8 symmetric per-output-channel"] if len(grouped) < len(layers) else []),
                        *(f"int{b} group-wise, group {g}" for b, g in sorted(grouped))])
    meta = {"format_version": 1, "method": "int4" if any(b == 4 for b, _ in grouped) else "int8", "weight": weight,
            "config": dataclasses.asdict(cfg) if cfg is not None else None, "layers": layers}
    (out / QUANT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def calibration_batches(path: str | Path, tokenizer, block_size: int, n: int) -> list[torch.Tensor]:
    """Up to `n` windows (1, block_size) of token ids from a text file (txt / jsonl / json), for static
    activation ranges. Raises ValueError when the file holds less than one window."""
    from llmkit.tokenizer import iter_texts

    ids: list[int] = []
    for text in iter_texts(path):
        ids.extend(tokenizer.encode(text))
        if len(ids) >= n * block_size:
            break
    if len(ids) < block_size:
        raise ValueError(f"calibration {path}: {len(ids)} tokens, fewer than one window of {block_size}")
    return [torch.tensor(ids[i:i + block_size])[None] for i in range(0, len(ids) - block_size + 1, block_size)][:n]


def quantize_dir(model_dir: str | Path, out_dir: str | Path, cfg: QuantConfig | None = None,
                 calibration: str | Path | None = None, calibration_windows: int = 16) -> Path:
    """Quantize a plain model dir into `out_dir` (what `llmkit quantize` does); returns `out_dir`.

    The tokenizer, generation config and chat template travel with it. Static mode needs `calibration`
    (a text file): `calibration_windows` windows of block_size tokens measure the activation ranges.
    """
    from llmkit.models.io import load_generation_config, load_model
    from llmkit.tokenizer import Tokenizer

    cfg = cfg or QuantConfig()
    cfg.validate()
    model = load_model(model_dir)
    tok = Tokenizer.load(model_dir)
    batches = None
    if cfg.mode == "static":
        if not calibration:
            raise ValueError("mode static needs a calibration file (text / jsonl / json) to measure activations")
        batches = calibration_batches(calibration, tok, model.config.block_size, calibration_windows)
    quantize_model(model, cfg, batches)
    out = save_quantized(model, out_dir, tok, load_generation_config(model_dir))
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, out / name)
    return out


def is_quantized_dir(model_dir: str | Path) -> bool:
    return (Path(model_dir) / QUANT_CONFIG).is_file()


def load_quantized(model_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Read a dir written by `save_quantized` into a model with its `Int8Linear` / `WeightOnlyLinear` layers, in
    eval mode."""
    from llmkit.models.io import load_model_config

    config, model_cls = load_model_config(model_dir)
    meta = json.loads((Path(model_dir) / QUANT_CONFIG).read_text())
    model = model_cls(config)
    for n, spec in meta["layers"].items():
        if spec["mode"] == "grouped":
            layer = WeightOnlyLinear(spec["in_features"], spec["out_features"], spec["bias"], spec["bits"],
                                     spec["group_size"])
        else:
            layer = Int8Linear(spec["in_features"], spec["out_features"], spec["bias"], spec["mode"],
                               spec.get("weight_only_kernel", "limbs"))
        _set_module(model, n, layer)
    _load_weights(model, str(Path(model_dir) / "model.safetensors"), strict=True)
    if meta.get("config"):
        model.quant_config = QuantConfig(**meta["config"])
    return model.to(device).eval()
