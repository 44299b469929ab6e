"""One C call per decoder layer for a decode step: `FusedLayers.plan(model)` then `FusedLayers.layer(...)`.

A batch-1 decode step of a 30-layer model runs ~40 PyTorch operators per layer (norms, projections, head
splits, RoPE, cache writes, attention, residuals). Each costs a few microseconds of dispatch and the Python
between them more; on a 135M model that overhead was larger than the time spent reading the weights
(docs/engine.md, the decode profile). `decode_layer` in gemv.c does the whole Llama-style layer in C: RMSNorm,
fused qkv (+ bias), optional per-head q/k RMSNorm (Qwen3), RoPE (the cos/sin rows come from the model's own
`rope_at`, so every RoPE scaling variant is covered), the new key/value written into a block-paged KV cache,
grouped-query attention over it (optionally a sliding window), output projection, RMSNorm, SwiGLU and the
down projection, with the weights in fp32, INT8 or INT4 (`kernels.linear_*` formats).

`plan` returns None (and `why_not_fused` says why) for layers it does not cover: LayerNorm or unit-offset
norms, non-SwiGLU or mixture-of-experts MLPs, post-norms, soft-capped attention, partial rotary, adapters (LoRA / prefix), dtypes
other than fp32, static / weight-only-limbs INT8. Those decode through PyTorch as before.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn

from llmkit.infer import kernels
from llmkit.infer.kernels.linear import KernelLinear
from llmkit.infer.weight_only import WeightOnlyLinear
from llmkit.models.layers import RMSNorm
from llmkit.models.moe import MoEFeedForward


class _Linear(ctypes.Structure):
    _fields_ = [("fmt", ctypes.c_int32), ("_pad", ctypes.c_int32), ("w", ctypes.c_void_p), ("s", ctypes.c_void_p),
                ("g", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("bias", ctypes.c_void_p)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _describe(mod: nn.Module, keep: list) -> _Linear | str:
    """The C view of a Linear layer, or why it has none. Tensors the view points into are appended to `keep`."""
    from llmkit.infer.quantize import Int8Linear

    bias = getattr(mod, "bias", None)
    if bias is not None:
        bias = bias.detach().float().contiguous()
        keep.append(bias)
    if type(mod) in (nn.Linear, KernelLinear):
        w = mod.weight.detach()
        if w.dtype != torch.float32:
            return f"{type(mod).__name__} weight is {w.dtype}"
        w = w.contiguous()
        keep.append(w)
        return _Linear(0, 0, w.data_ptr(), None, w.size(1), w.size(0), w.size(1), _ptr(bias))
    if isinstance(mod, WeightOnlyLinear):
        fmt = 2 if mod.bits == 4 else 1
        return _Linear(fmt, 0, mod.qweight.data_ptr(), mod.scales.data_ptr(), mod.group_size, mod.out_features,
                       mod.in_features, _ptr(bias))
    if isinstance(mod, Int8Linear) and mod.mode == "dynamic" and mod.in_features % 32 == 0:
        s = mod.weight_scale[:, None].contiguous()
        keep.append(s)
        return _Linear(1, 0, mod.qweight.data_ptr(), s.data_ptr(), mod.in_features, mod.out_features,
                       mod.in_features, _ptr(bias))
    return f"{type(mod).__name__}" + (f" mode {mod.mode}" if hasattr(mod, "mode") else "")


def _plain_rms(norm: nn.Module) -> bool:
    return type(norm) is RMSNorm and not norm.unit_offset and norm.weight.dtype == torch.float32


class FusedLayers:
    """The per-layer C views of a decoder's blocks (built once; the model must not change afterwards)."""

    def __init__(self, layers: list[dict], keep: list, config):
        self.layers, self._keep, self.config = layers, keep, config
        self._lib = kernels.library()
        self._scratch = torch.empty(0)

    @classmethod
    def plan(cls, model) -> FusedLayers | str:
        """A plan for `model` (an llmkit `Decoder`), or a string saying why its layers cannot be fused."""
        if not kernels.available():
            return f"kernels unavailable: {kernels.why_not()}"
        if getattr(model, "prefix", None) is not None:
            return "prefix-tuned model"
        if model.pos_emb is not None:
            return "learned position embeddings (GPT-2 style layers: LayerNorm, GELU)"
        if next(model.parameters()).device.type != "cpu":
            return "model not on CPU"
        keep: list = []
        layers = []
        for i, block in enumerate(model.blocks):
            attn, mlp = block.attn, block.mlp
            why = None
            if not (_plain_rms(block.norm1) and _plain_rms(block.norm2)) or block.norm1.eps != block.norm2.eps:
                why = "norms are not plain RMSNorm with one eps"
            elif block.attn_out_norm is not None or block.mlp_out_norm is not None:
                why = "post-norms"
            elif isinstance(mlp, MoEFeedForward):
                why = "mixture-of-experts MLP (routed experts decode through PyTorch)"
            elif getattr(mlp, "activation", None) != "swiglu":
                why = f"MLP activation {getattr(mlp, 'activation', type(mlp).__name__)}"
            elif attn.softcap is not None or attn.rotary_dim is not None or attn.cross:
                why = "soft-capped, partial-rotary or cross attention"
            elif attn.q_norm is not None and not (_plain_rms(attn.q_norm) and _plain_rms(attn.k_norm)):
                why = "q/k norms are not plain RMSNorm"
            if why:
                return f"block {i}: {why}"
            views = {}
            for name, mod in (("qkv", attn.qkv), ("proj", attn.proj), ("gate", mlp.gate), ("up", mlp.up),
                              ("down", mlp.down)):
                view = _describe(mod, keep)
                if isinstance(view, str):
                    return f"block {i} {name}: {view}"
                views[name] = view
            for norm in (block.norm1, block.norm2, attn.q_norm, attn.k_norm):
                if norm is not None:
                    keep.append(norm.weight.detach().contiguous())
            scale = attn.scale if attn.scale is not None else attn.head_dim ** -0.5
            layers.append({"views": views, "norm1": block.norm1.weight.detach().contiguous(),
                           "norm2": block.norm2.weight.detach().contiguous(), "eps": block.norm1.eps,
                           "q_norm": None if attn.q_norm is None else attn.q_norm.weight.detach().contiguous(),
                           "k_norm": None if attn.k_norm is None else attn.k_norm.weight.detach().contiguous(),
                           "qk_eps": attn.q_norm.eps if attn.q_norm is not None else 0.0,
                           "H": attn.n_head, "Hkv": attn.n_kv_head, "hd": attn.head_dim, "scale": scale,
                           "window": attn.window or 0, "ff": mlp.gate.out_features})
        keep.extend(t for layer in layers for t in (layer["norm1"], layer["norm2"], layer["q_norm"], layer["k_norm"])
                    if t is not None)
        return cls(layers, keep, model.config)

    def layer(self, i: int, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
              k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor, pos: torch.Tensor,
              max_keys: int) -> None:
        """Run layer `i` on x (n, d_model) fp32 contiguous, in place, for n tokens of n requests.

        cos / sin: (n, head_dim / 2) fp32 contiguous, the rows' RoPE angles (None without RoPE).
        k_pool / v_pool: this layer's cache, (num_blocks, H_kv, block_size, head_dim) fp32 contiguous; the new
        key / value of row r is written at position pos[r] (int64 (n,)) through block_table (int64 (n, max
        blocks)), and row r attends to its positions 0..pos[r] (or the last `window`). max_keys >= max(pos)+1.
        """
        L = self.layers[i]
        n, d = x.shape
        v = L["views"]
        need = self._lib.decode_layer_scratch(n, d, v["qkv"].N, L["H"] * L["hd"], L["ff"], L["H"], max_keys)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need)
        self._lib.decode_layer(
            x.data_ptr(), n, d, L["norm1"].data_ptr(), L["norm2"].data_ptr(), L["eps"],
            ctypes.byref(v["qkv"]), ctypes.byref(v["proj"]), ctypes.byref(v["gate"]), ctypes.byref(v["up"]),
            ctypes.byref(v["down"]), _ptr(L["q_norm"]), _ptr(L["k_norm"]), L["qk_eps"],
            L["H"], L["Hkv"], L["hd"], L["scale"], L["window"], _ptr(cos), _ptr(sin),
            k_pool.data_ptr(), v_pool.data_ptr(), k_pool.size(2), block_table.data_ptr(), block_table.size(1),
            pos.data_ptr(), max_keys, self._scratch.data_ptr(), torch.get_num_threads())

    def decode_hidden(self, model, tokens: torch.Tensor, pos: torch.Tensor, seq_lens: list[int],
                      k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """One decode step of n requests through every layer: their last hidden states (n, d_model), before the
        model's final norm and head.

        tokens / pos: int64 (n,) each row's newest token and its position; seq_lens: pos + 1 per row (for
        length-dependent RoPE); k_cache / v_cache: (n_layer, num_blocks, H_kv, block_size, head_dim) fp32, written
        at each row's position through block_table (int64 (n, max blocks)).
        """
        x = model.embed(tokens).float().contiguous()
        cos, sin = model.rope_at(pos, seq_lens)
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        pos = pos.to(torch.int64).contiguous()
        table = block_table.to(torch.int64).contiguous()
        max_keys = int(pos.max()) + 1
        for i in range(len(self.layers)):
            self.layer(i, x, cos, sin, k_cache[i], v_cache[i], table, pos, max_keys)
        return x
