"""Group-wise weight-only quantization: INT4 and INT8 Linears with one scale per group of input columns.

`WeightOnlyLinear` replaces an `nn.Linear` (out = N, in = K) by

    bits 4:  qweight uint8 (N, K/2), scales fp32 (N, K/g),  W[n, k] ~= scales[n, k // g] * (nibble - 8)
    bits 8:  qweight int8  (N, K),   scales fp32 (N, K/g),  W[n, k] ~= scales[n, k // g] * q

with g (`group_size`) a multiple of 32 (a last group shorter than g when g does not divide K). Small groups follow the weights' local range, which is
what makes 4 bits usable: GPTQ / AWQ and llama.cpp's Q4_0 (Frantar et al. 2023, arXiv:2210.17323; Lin et
al. 2024, arXiv:2306.00978) all quantize in groups of 32-128. The rounding is ggml's Q4_0 / Q8_0 reference
(ggml-quants.c): per group, d = (the weight of largest magnitude) / -8 for INT4 (so that weight lands on
code 0 exactly and the 16 codes span [-8d, 7d]) or max |w| / 127 for INT8, q = round(w / d). (A search for
the scale with the least squared weight error, llama.cpp's k-quant recipe, cut SmolLM2's weight error by a
quarter but moved perplexity both ways, -2.6% at g 32 and +5.7% at g 64, so it is not used; docs/quantize.md.) The INT4
nibble order is Q4_0's (within a block of 32, byte j holds weight j low and weight j + 16 high), so GGUF
Q4_0 and Q8_0 tensors load with `from_gguf_blocks` as they are, without a round trip through fp32
(`llmkit.infer.gguf_quantized` loads whole GGUF files that way).

Forward: up to `kernels.MAX_ROWS` tokens (decode steps) go through `llmkit.infer.kernels`: the weight is read
once at its packed size and multiplied with the activations quantized to int8 per block of 32 (as ggml's
Q4_0 / Q8_0 dot products do; ~0.4% relative error per block); more tokens (prefill), or no kernels, dequantize
the weight and call `F.linear` on the fp32 activations. Between layers activations stay fp32.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.infer import kernels

__all__ = ["WeightOnlyLinear", "quantize_groups"]

GGUF_Q4_0, GGUF_Q8_0 = 2, 8  # ggml type ids
_SCRATCH = threading.local()  # per thread: the dequantized weight of the layer running now; see _dequantized_into_scratch
_BLOCK_BYTES = {GGUF_Q4_0: 18, GGUF_Q8_0: 34}  # fp16 scale + 16 bytes of nibbles / + 32 int8


def quantize_groups(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: float (N, K), K % 32 == 0 -> (qweight, scales) in the layout above, ggml's reference rounding per group.

    bits 4: qweight uint8 (N, K/2); bits 8: int8 (N, K); scales fp32 (N, ceil(K / group_size)): when the group
    size does not divide K (128 on a 576-wide model) the last group is shorter.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits: must be 4 or 8, got {bits}")
    N, K = w.shape
    if group_size < 32 or group_size % 32 or K % 32:
        raise ValueError(f"group_size {group_size}: must be a multiple of 32 (and in_features {K} too)")
    G = -(-K // group_size)
    wg = torch.zeros(N, G * group_size)  # zero padding of a short last group changes neither its max nor its codes
    wg[:, :K] = w.detach().float()
    wg = wg.view(N, G, group_size)
    if bits == 8:
        d = wg.abs().amax(-1) / 127.0
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round(wg * inv[..., None]).clamp_(-127, 127).to(torch.int8).reshape(N, -1)[:, :K]
        return q.contiguous(), d
    idx = wg.abs().argmax(-1, keepdim=True)
    d = wg.gather(-1, idx).squeeze(-1) / -8.0  # the largest-magnitude weight lands on code 0 (= -8 d) exactly
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    codes = torch.floor(wg * inv[..., None] + 8.5).clamp_(0, 15).to(torch.uint8).reshape(N, -1)[:, :K]
    codes = codes.reshape(N, K // 32, 2, 16)
    packed = codes[:, :, 0] | (codes[:, :, 1] << 4)  # weights j (low nibble) and j + 16 (high) of each block
    return packed.reshape(N, K // 2).contiguous(), d


class WeightOnlyLinear(nn.Module):
    """A Linear with group-wise INT4 or INT8 weights (see the module docstring); replaces an `nn.Linear`.

    Buffers (all saved): `qweight` (uint8 (out, in/2) or int8 (out, in)), `scales` fp32 (out, in/group_size),
    `bias` fp32 (out,) or absent. forward(x: (..., in) float) -> (..., out) in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int = 4, group_size: int = 32):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits: must be 4 or 8, got {bits}")
        if group_size < 32 or group_size % 32 or in_features % 32:
            raise ValueError(f"group_size {group_size}: must be a multiple of 32 (and in_features {in_features} too)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        shape, dtype = ((out_features, in_features // 2), torch.uint8) if bits == 4 else \
            ((out_features, in_features), torch.int8)
        self.register_buffer("qweight", torch.zeros(shape, dtype=dtype))
        self.register_buffer("scales", torch.zeros(out_features, -(-in_features // group_size)))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 32) -> WeightOnlyLinear:
        """Quantize `linear`'s weight (`quantize_groups`)."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size)
        q, s = quantize_groups(linear.weight, bits, group_size)
        m.qweight.copy_(q)
        m.scales.copy_(s)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m.to(linear.weight.device)

    @classmethod
    def from_gguf_blocks(cls, raw: np.ndarray, ggml_type: int, out_features: int, in_features: int,
                         bias: torch.Tensor | None = None) -> WeightOnlyLinear:
        """A GGUF Q4_0 (type 2) or Q8_0 (type 8) tensor's raw blocks (uint8, out * in / 32 blocks of 18 / 34
        bytes: an fp16 scale, then the 16 nibble bytes / 32 int8) as an INT4 / INT8 layer with group 32:
        the codes are taken as stored, only the fp16 scales widen to fp32."""
        if ggml_type not in _BLOCK_BYTES:
            raise ValueError(f"ggml type {ggml_type}: only Q4_0 (2) and Q8_0 (8) load as WeightOnlyLinear")
        nb = _BLOCK_BYTES[ggml_type]
        blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(out_features, in_features // 32, nb)
        scales = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
        bits = 4 if ggml_type == GGUF_Q4_0 else 8
        m = cls(in_features, out_features, bias is not None, bits, 32)
        codes = torch.from_numpy(blocks[..., 2:].copy())
        m.qweight.copy_(codes.reshape(out_features, -1) if bits == 4 else
                        codes.view(torch.int8).reshape(out_features, in_features))
        m.scales.copy_(scales)
        if bias is not None:
            m.bias.copy_(bias.float())
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}")

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 (out, in)."""
        if self.bits == 4:
            return kernels.dequantize_q4(self.qweight, self.scales, self.group_size)
        return kernels.dequantize_q8(self.qweight, self.scales, self.group_size)

    def _dequantized_into_scratch(self) -> torch.Tensor:
        """The fp32 weight in a buffer shared by every layer (valid until the next layer's call): a fresh
        allocation per call would cost more in page faults than the dequantization itself."""
        fn = kernels.dequantize_q4 if self.bits == 4 else kernels.dequantize_q8
        if self.qweight.device.type != "cpu":
            return fn(self.qweight, self.scales, self.group_size)
        n = self.out_features * self.in_features
        buf = getattr(_SCRATCH, "buf", None)
        if buf is None or buf.numel() < n:
            buf = _SCRATCH.buf = torch.empty(n)
        return fn(self.qweight, self.scales, self.group_size, out=buf[:n].view(self.out_features, self.in_features))

    def weight_bytes(self) -> int:
        """Bytes this layer holds: codes + scales + bias."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.bias) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        grad = torch.is_grad_enabled() and x2.requires_grad  # the kernels have no backward
        if x2.size(0) <= kernels.MAX_ROWS and not grad and x2.device.type == "cpu" and kernels.available():
            fn = kernels.linear_q4 if self.bits == 4 else kernels.linear_q8
            y = fn(x2, self.qweight, self.scales, self.group_size)
            if self.bias is not None:
                y = y + self.bias
        else:
            # autograd keeps the weight for backward: the shared scratch buffer would be overwritten by then
            w = self.dequantized_weight() if grad else self._dequantized_into_scratch()
            y = F.linear(x2, w, self.bias)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
