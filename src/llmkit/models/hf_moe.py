"""The mixture-of-experts part of the Hugging Face decoder mapping (`llmkit.models.hf`): config keys, expert
tensors and the export rules of ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM`` and ``Qwen3MoeForCausalLM``.

The three share llmkit's `MoEFeedForward` (`llmkit.models.moe`) and differ in what surrounds it:

* Mixtral: Mistral attention, experts `intermediate_size` wide, top-k weights always renormalised.
* Qwen2-MoE: Qwen2 attention (q/k/v biases), experts of `moe_intermediate_size` plus one shared expert
  scaled by sigmoid(`shared_expert_gate`), `norm_topk_prob` as configured.
* Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm, explicit `head_dim`), experts of
  `moe_intermediate_size`, no shared expert, `norm_topk_prob` as configured.

llmkit's decoder has experts in every layer, so the Qwen layouts with dense MLP layers in between
(`mlp_only_layers`, `decoder_sparse_step`) are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from llmkit.models.decoder import DecoderConfig

MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


def _refuse(field: str, value: Any, arch: str, why: str) -> None:
    """The export refusal of `llmkit.models.hf`, message starting with the field (kept here to avoid a
    circular import)."""
    raise ValueError(f"{field}: {value!r} cannot be exported as {arch}: {why}")


# -- import ---------------------------------------------------------------------------------------------


def _check_every_layer_sparse(hf: dict[str, Any], arch: str, n_layer: int) -> None:
    """Refuse a Qwen-MoE config whose layers are not all sparse. transformers makes layer i a dense MLP when
    i is in `mlp_only_layers` or (i + 1) % `decoder_sparse_step` != 0 (so any step but 1 leaves layer 0
    dense); llmkit's `DecoderConfig.moe` puts experts in every layer and has no per-layer switch."""
    listed = hf.get("mlp_only_layers") or []
    dense = sorted({i for i in listed if 0 <= i < n_layer})
    if dense:
        raise ValueError(f"mlp_only_layers: {listed} makes layers {dense} of {arch} dense MLPs; llmkit's MoE "
                         "decoder has experts in every layer (supported: mlp_only_layers [])")
    step = hf.get("decoder_sparse_step", 1)
    if step != 1:
        raise ValueError(f"decoder_sparse_step: {step} makes every layer i with (i + 1) % {step} != 0 of {arch} a "
                         "dense MLP; llmkit's MoE decoder has experts in every layer (supported: 1)")


def moe_config(hf: dict[str, Any], arch: str, n_layer: int) -> dict[str, Any]:
    """`DecoderConfig.moe` of a Mixtral / Qwen2-MoE / Qwen3-MoE config.json dict; ValueError (starting with the
    config key) for what llmkit does not reproduce exactly."""
    hf = dict(hf)
    if arch == "Qwen3MoeForCausalLM" and "num_experts" not in hf and "num_local_experts" in hf:
        # transformers 5 writes Qwen3-MoE's expert count as num_local_experts (an attribute_map alias); the hub
        # checkpoints (Qwen/Qwen3-30B-A3B, ...) and transformers 4 write num_experts
        hf["num_experts"] = hf["num_local_experts"]
    need = {"MixtralForCausalLM": ("num_local_experts",),
            "Qwen2MoeForCausalLM": ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size"),
            "Qwen3MoeForCausalLM": ("num_experts", "moe_intermediate_size")}[arch]
    missing = [k for k in need if k not in hf]
    if missing:
        raise ValueError(f"{missing[0]}: missing from the {arch} config (needed: {', '.join(need)})")
    if arch == "MixtralForCausalLM":
        return {"experts": hf["num_local_experts"], "top_k": hf.get("num_experts_per_tok", 2),
                "norm_topk_prob": True, "router_aux_loss": float(hf.get("router_aux_loss_coef", 0.02)),
                "router_z_loss": 0.0}
    _check_every_layer_sparse(hf, arch, n_layer)
    out = {"experts": hf["num_experts"], "expert_d_ff": hf["moe_intermediate_size"],
           "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
           "router_aux_loss": float(hf.get("router_aux_loss_coef", 0.001)), "router_z_loss": 0.0}
    if arch == "Qwen2MoeForCausalLM":
        out.update(top_k=hf.get("num_experts_per_tok", 4), shared_experts=1,
                   shared_d_ff=hf["shared_expert_intermediate_size"], shared_gate=True)
    else:  # Qwen3-MoE: no shared expert
        out["top_k"] = hf.get("num_experts_per_tok", 8)
    return out


def experts_to_llmkit(sd: dict[str, torch.Tensor], h: str, b: str, experts: int) -> dict[str, torch.Tensor]:
    """One layer's router, experts (and Qwen2-MoE's shared expert) popped from `sd` (HF prefix `h`), under
    llmkit's names (prefix `b`).

    Experts come fused (transformers 5 in memory, and the files llmkit writes: gate_up_proj (E, 2 ff, d) rows
    [gate; up], down_proj (E, d, ff)) or one Linear per expert, as older files and transformers 5's
    save_pretrained of the Qwen MoEs store them (Mixtral's w1 gate / w3 up / w2 down, the Qwen MoEs'
    gate/up/down_proj, each (ff, d) or (d, ff)); llmkit stacks them into (E, ff, d) / (E, d, ff).
    """
    out = {}
    if h + "block_sparse_moe.gate.weight" in sd:  # Mixtral before transformers 5
        out[b + "mlp.router.weight"] = sd.pop(h + "block_sparse_moe.gate.weight")
        e = h + "block_sparse_moe.experts."
        for dst, src in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            out[b + f"mlp.{dst}"] = torch.stack([sd.pop(f"{e}{j}.{src}.weight") for j in range(experts)])
    else:
        out[b + "mlp.router.weight"] = sd.pop(h + "mlp.gate.weight")
        e = h + "mlp.experts."
        if e + "gate_up_proj" in sd:
            out[b + "mlp.gate"], out[b + "mlp.up"] = sd.pop(e + "gate_up_proj").chunk(2, dim=1)
            out[b + "mlp.down"] = sd.pop(e + "down_proj")
        else:
            for dst in ("gate", "up", "down"):
                out[b + f"mlp.{dst}"] = torch.stack([sd.pop(f"{e}{j}.{dst}_proj.weight") for j in range(experts)])
    if h + "mlp.shared_expert_gate.weight" in sd:  # Qwen2-MoE
        out[b + "mlp.shared_gate.weight"] = sd.pop(h + "mlp.shared_expert_gate.weight")
        for dst in ("gate", "up", "down"):
            out[b + f"mlp.shared.{dst}.weight"] = sd.pop(h + f"mlp.shared_expert.{dst}_proj.weight")
    return {k: v.contiguous() for k, v in out.items()}


# -- export ---------------------------------------------------------------------------------------------


def native_moe_arch(cfg: DecoderConfig) -> str:
    """The architecture a MoE model configured in llmkit (no MoE `hf_architecture`) exports as; the first rule
    that matches wins, so the choice depends on the config alone:

    1. shared experts or q/k/v biases -> Qwen2-MoE (the only one with either);
    2. q/k norms -> Qwen3-MoE;
    3. otherwise Mixtral.

    A combination no architecture has (shared experts with q/k norms, say) is then refused by the export
    checks, naming the field the chosen architecture lacks.
    """
    if cfg.moe.shared_experts or cfg.qkv_bias:
        return "Qwen2MoeForCausalLM"
    if cfg.qk_norm:
        return "Qwen3MoeForCausalLM"
    return "MixtralForCausalLM"


def check_moe_exportable(cfg: DecoderConfig, arch: str) -> None:
    """Refuse, naming the `moe.` field, a MoE setting `arch` cannot express (attention options are checked by
    `llmkit.models.hf`)."""
    moe = cfg.moe
    if moe.capacity_factor is not None:
        _refuse("moe.capacity_factor", moe.capacity_factor, arch, "Hugging Face MoE layers are dropless")
    if arch == "MixtralForCausalLM":
        if moe.shared_experts:
            _refuse("moe.shared_experts", moe.shared_experts, arch, "Mixtral has no shared experts (Qwen2-MoE has)")
        if not moe.norm_topk_prob:
            _refuse("moe.norm_topk_prob", False, arch, "Mixtral always renormalises the top-k weights")
        if moe.expert_d_ff not in (None, cfg.d_ff):
            _refuse("moe.expert_d_ff", moe.expert_d_ff, arch, "Mixtral's experts are intermediate_size wide")
    elif arch == "Qwen2MoeForCausalLM":
        if moe.shared_experts != 1 or not moe.shared_gate:
            _refuse("moe.shared_experts", moe.shared_experts, arch, "Qwen2-MoE has one sigmoid-gated shared expert")
    elif moe.shared_experts:
        _refuse("moe.shared_experts", moe.shared_experts, arch, "Qwen3-MoE has no shared experts (Qwen2-MoE has)")


def moe_hf_config(cfg: DecoderConfig, arch: str) -> dict[str, Any]:
    """The MoE keys of `arch`'s config.json for `cfg.moe` (every layer sparse)."""
    moe = cfg.moe
    if arch == "MixtralForCausalLM":
        return {"num_local_experts": moe.experts, "num_experts_per_tok": moe.top_k,
                "router_aux_loss_coef": moe.router_aux_loss, "output_router_logits": False,
                "router_jitter_noise": 0.0}
    ff = moe.expert_d_ff or cfg.d_ff
    # num_experts, as the hub's Qwen-MoE checkpoints spell it (transformers 5 reads it for Qwen3-MoE too)
    out = {"num_experts": moe.experts, "num_experts_per_tok": moe.top_k, "moe_intermediate_size": ff,
           "norm_topk_prob": moe.norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": [],
           "router_aux_loss_coef": moe.router_aux_loss, "output_router_logits": False}
    if arch == "Qwen2MoeForCausalLM":
        out["shared_expert_intermediate_size"] = moe.shared_d_ff or ff
    return out


def experts_from_llmkit(sd: dict[str, torch.Tensor], b: str, h: str) -> dict[str, torch.Tensor]:
    """One layer's router and experts (and Qwen2-MoE's shared expert) in transformers 5's fused layout:
    gate_up_proj (E, 2 ff, d) = llmkit's gate and up (E, ff, d) concatenated on dim 1, down_proj (E, d, ff)."""
    out = {h + "mlp.gate.weight": sd[b + "mlp.router.weight"],
           h + "mlp.experts.gate_up_proj": torch.cat((sd[b + "mlp.gate"], sd[b + "mlp.up"]), dim=1),
           h + "mlp.experts.down_proj": sd[b + "mlp.down"]}
    if b + "mlp.shared_gate.weight" in sd:
        out[h + "mlp.shared_expert_gate.weight"] = sd[b + "mlp.shared_gate.weight"]
        for n in ("gate", "up", "down"):
            out[h + f"mlp.shared_expert.{n}_proj.weight"] = sd[b + f"mlp.shared.{n}.weight"]
    return out
