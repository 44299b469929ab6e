"""LoRA adapters on disk in Hugging Face PEFT's layout: `save_lora` and `load_lora`.

`save_lora` writes `adapter_config.json` + `adapter_model.safetensors` with keys in the Hugging Face
names of the architecture `llmkit.models.hf.export_hf` writes for the family (GPT-2 / Llama / BERT / T5),
so ``peft.PeftModel.from_pretrained(AutoModel...(exported_dir), adapter_dir)`` reproduces our logits.
GPT-2 keeps q, k and v in one Conv1D `c_attn`; there a q + v adapter of rank r is written as the exact
rank-2r adapter on `c_attn` with A = [A_q; A_v] and block-structured B (zero rows for k), with
`rank_pattern` / `alpha_pattern` entries keeping the scale s (and `fan_in_fan_out: true` for Conv1D).
llmkit's own slice layout rides in the safetensors metadata, so a save / load round trip is exact;
adapters that PEFT itself saved load too.

Mixture-of-experts layers are written as PEFT (>= 0.17) adapts transformers 5's Mixtral / Qwen2-MoE:
through `target_parameters`, which wraps a parameter (`lora.ParamWrapper`) rather than a Linear. The
router is the parameter `mlp.gate.weight` (A (r, d), B (experts, r)). The experts are the 3-d parameters
`mlp.experts.gate_up_proj` (experts, 2 ff, d), rows [gate; up], and `mlp.experts.down_proj`
(experts, d, ff): PEFT keeps the factors of all experts in one A (experts r, in), expert e's rows
[e r, (e + 1) r), and one B (out, r experts), expert e's columns e, e + experts, ... . llmkit's separate
gate and up adapters become the exact per-expert rank-2r adapter on gate_up_proj (A_e = [A_gate,e; A_up,e],
block-diagonal B_e), as Phi-3's gate_up_proj is written. When one module's gate_up_proj and down_proj are
both adapted PEFT nests the wrappers: gate_up_proj's tensors are `mlp.experts.base_layer.lora_*`,
down_proj's `mlp.experts.lora_*`. PEFT refuses `lora_dropout` on parameter targets, so such an adapter is
written with lora_dropout 0 (dropout only acts in training) and llmkit's dropout rides in the metadata.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from llmkit.models.decoder import Decoder
from llmkit.models.encdec import EncoderDecoder
from llmkit.models.encoder import Encoder, EncoderClassifier
from llmkit.models.layers import Attention
from llmkit.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CANONICAL_TARGETS,
    FUSED_QKV,
    MOE_TARGETS,
    LoRAConfig,
    LoRAExperts,
    LoRALinear,
    adaptable_sites,
    base_linear,
    freeze_all_but_lora,
    has_lora,
    lora_expert_modules,
    lora_modules,
    replace_module,
)
from llmkit.models.moe import MoEFeedForward
from llmkit.models.trainable_tokens import apply_trainable_tokens, trainable_tokens

_PEFT_PREFIX = "base_model.model."
_TOKENS_SUFFIX = "token_adapter.trainable_tokens_delta"  # PEFT's name; it holds the rows' values
_META_KEY = "llmkit_lora"  # safetensors metadata: llmkit's slice layout (PEFT ignores it)


# -- Hugging Face names -----------------------------------------------------------------------------


@dataclass
class _HFLayout:
    """How a family's export_hf architecture names what llmkit adapts."""

    arch: str
    task_type: str | None
    fan_in_fan_out: bool
    # llmkit Linear path -> [(HF module, first row, end row)] covering its output rows
    linears: dict[str, list[tuple[str, int, int]]]
    heads: list[str]  # further HF Linear / Conv1D modules (never adapted), so target names stay exact
    # modules_to_save: llmkit module -> (HF module, {llmkit param: HF tensor})
    saved: dict[str, tuple[str, dict[str, str]]]
    # HF modules that fuse several llmkit Linears (Phi-3's gate_up_proj = [gate; up]): HF module -> its rows,
    # and (llmkit path, HF module) -> the HF row where that Linear's rows start
    fused_rows: dict[str, int] = None
    offsets: dict[tuple[str, str], int] = None
    # mixture of experts: HF modules PEFT adapts through `target_parameters` -> the parameter (the router's
    # "weight"), and llmkit MoE layer -> its HF experts module (gate_up_proj / down_proj parameters)
    params: dict[str, str] = None
    experts: dict[str, str] = None

    def __post_init__(self) -> None:
        self.fused_rows = self.fused_rows or {}
        self.offsets = self.offsets or {}
        self.params = self.params or {}
        self.experts = self.experts or {}

    def all_hf_linears(self) -> list[str]:
        return [hf for parts in self.linears.values() for hf, _, _ in parts] + self.heads

    def all_hf_params(self) -> list[str]:
        """Every parameter `target_parameters` could name (the router's, the experts', every Linear's weight)."""
        return ([f"{hf}.weight" for hf in self.all_hf_linears()]
                + [f"{hf}.{p}" for hf in self.experts.values() for p in _EXPERT_PARAMS])


def _attn_names(out: dict, attn: Attention, path: str, q: str, k: str, v: str, o: str) -> None:
    qd, kvd = attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim
    if attn.cross:
        out[f"{path}.q"] = [(q, 0, qd)]
        out[f"{path}.kv"] = [(k, 0, kvd), (v, kvd, 2 * kvd)]
    else:
        out[f"{path}.qkv"] = [(q, 0, qd), (k, qd, qd + kvd), (v, qd + kvd, qd + 2 * kvd)]
    out[f"{path}.proj"] = [(o, 0, base_linear(attn.proj).out_features)]


def _mlp_names(out: dict, mlp: nn.Module, path: str, names: dict[str, str]) -> None:
    for attr in ("gate", "up", "down"):
        if hasattr(mlp, attr):
            out[f"{path}.{attr}"] = [(names[attr], 0, base_linear(getattr(mlp, attr)).out_features)]


_EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # transformers 5's fused expert parameters, in declaration order


def _moe_names(lin: dict, params: dict, experts: dict, heads: list, mlp: MoEFeedForward, b: str, h: str) -> None:
    """One mixture-of-experts layer under transformers 5's Mixtral / Qwen2-MoE names (hf.py's export):
    router `mlp.gate` (a parameter target), experts `mlp.experts`, Qwen2-MoE's shared expert and its gate."""
    lin[b + "mlp.router"] = [(h + "mlp.gate", 0, base_linear(mlp.router).out_features)]
    params[h + "mlp.gate"] = "weight"
    experts[b + "mlp"] = h + "mlp.experts"
    heads.append(h + "mlp.experts")  # not a Linear: target_modules suffixes must never reach it
    if mlp.shared is not None:
        _mlp_names(lin, mlp.shared, b + "mlp.shared", {a: h + f"mlp.shared_expert.{a}_proj"
                                                       for a in ("gate", "up", "down")})
    if mlp.shared_gate is not None:
        lin[b + "mlp.shared_gate"] = [(h + "mlp.shared_expert_gate", 0, 1)]


def _hf_layout(model: nn.Module) -> _HFLayout:
    """Names of `llmkit.models.hf*.export_*` for `model`'s family (see hf.py, hf_bert.py, hf_t5.py).

    A decoder is named as GPT-2 when it has learned positions and as Llama with rope, whichever its
    export would be; a combination export_hf refuses keeps these names (and invents `mlp.c_gate` for a
    learned-position swiglu), so llmkit still reloads it even though no HF model matches.
    """
    lin: dict[str, list[tuple[str, int, int]]] = {}
    if isinstance(model, Decoder):
        gpt2 = model.config.positions == "learned"
        arch = "GPT2LMHeadModel" if gpt2 else _decoder_arch(model)
        fused_rows: dict[str, int] = {}
        offsets: dict[tuple[str, str], int] = {}
        params: dict[str, str] = {}
        experts: dict[str, str] = {}
        heads = ["lm_head"]
        for i, blk in enumerate(model.blocks):
            b = f"blocks.{i}."
            if isinstance(blk.mlp, MoEFeedForward):
                h = f"transformer.h.{i}." if gpt2 else f"model.layers.{i}."
                if gpt2:
                    qkv = base_linear(blk.attn.qkv)
                    lin[b + "attn.qkv"] = [(h + "attn.c_attn", 0, qkv.out_features)]
                    lin[b + "attn.proj"] = [(h + "attn.c_proj", 0, base_linear(blk.attn.proj).out_features)]
                else:
                    _attn_names(lin, blk.attn, b + "attn", *(h + f"self_attn.{p}_proj" for p in "qkvo"))
                _moe_names(lin, params, experts, heads, blk.mlp, b, h)
            elif gpt2:
                h = f"transformer.h.{i}."
                qkv = base_linear(blk.attn.qkv)
                lin[b + "attn.qkv"] = [(h + "attn.c_attn", 0, qkv.out_features)]
                lin[b + "attn.proj"] = [(h + "attn.c_proj", 0, base_linear(blk.attn.proj).out_features)]
                _mlp_names(lin, blk.mlp, b + "mlp", {"gate": h + "mlp.c_gate", "up": h + "mlp.c_fc",
                                                     "down": h + "mlp.c_proj"})
            elif arch == "Phi3ForCausalLM" and hasattr(blk.mlp, "gate"):
                # Phi-3 keeps q, k, v in one qkv_proj (rows [q; k; v], as llmkit's qkv) and gate and up in one
                # gate_up_proj (rows [gate; up]): an adapter on gate and up is written as the exact adapter of
                # rank r_gate + r_up on gate_up_proj with A = [A_gate; A_up] and block-diagonal B
                h = f"model.layers.{i}."
                lin[b + "attn.qkv"] = [(h + "self_attn.qkv_proj", 0, base_linear(blk.attn.qkv).out_features)]
                lin[b + "attn.proj"] = [(h + "self_attn.o_proj", 0, base_linear(blk.attn.proj).out_features)]
                g, u = base_linear(blk.mlp.gate).out_features, base_linear(blk.mlp.up).out_features
                gu = h + "mlp.gate_up_proj"
                lin[b + "mlp.gate"], lin[b + "mlp.up"] = [(gu, 0, g)], [(gu, 0, u)]
                fused_rows[gu] = g + u
                offsets[(b + "mlp.gate", gu)], offsets[(b + "mlp.up", gu)] = 0, g
                lin[b + "mlp.down"] = [(h + "mlp.down_proj", 0, base_linear(blk.mlp.down).out_features)]
            else:
                h = f"model.layers.{i}."
                _attn_names(lin, blk.attn, b + "attn", *(h + f"self_attn.{p}_proj" for p in "qkvo"))
                _mlp_names(lin, blk.mlp, b + "mlp", {a: h + f"mlp.{a}_proj" for a in ("gate", "up", "down")})
        return _HFLayout(arch, "CAUSAL_LM", gpt2, lin, heads, {}, fused_rows, offsets, params, experts)
    if isinstance(model, (Encoder, EncoderClassifier)):
        enc, p = (model.encoder, "encoder.") if isinstance(model, EncoderClassifier) else (model, "")
        for i, blk in enumerate(enc.blocks):
            h = f"bert.encoder.layer.{i}."
            _attn_names(lin, blk.attn, f"{p}blocks.{i}.attn", *(h + f"attention.self.{n}" for n in
                                                                ("query", "key", "value")),
                        h + "attention.output.dense")
            _mlp_names(lin, blk.mlp, f"{p}blocks.{i}.mlp", {"up": h + "intermediate.dense",
                                                            "down": h + "output.dense"})
        if isinstance(model, EncoderClassifier):
            saved = {"pooler": ("pooler", {"weight": "bert.pooler.dense.weight",
                                           "bias": "bert.pooler.dense.bias"}),
                     "classifier": ("classifier", {"weight": "classifier.weight", "bias": "classifier.bias"})}
            return _HFLayout("BertForSequenceClassification", "SEQ_CLS", False, lin,
                             ["bert.pooler.dense", "classifier"], saved)
        # no PEFT task type for masked LM: PeftModel.from_pretrained gives the generic PeftModel
        return _HFLayout("BertForMaskedLM", None, False, lin,
                         ["cls.predictions.transform.dense", "cls.predictions.decoder"], {})
    if isinstance(model, EncoderDecoder):
        gated = model.config.activation == "gated-gelu"
        mlp_hf = {"gate": "wi_0", "up": "wi_1" if gated else "wi", "down": "wo"}
        for stack, n_mlp in (("encoder", 1), ("decoder", 2)):
            for i, blk in enumerate(getattr(model, stack).blocks):
                h, b = f"{stack}.block.{i}.", f"{stack}.blocks.{i}."
                self_attn = "attn" if stack == "encoder" else "self_attn"
                sa = h + "layer.0.SelfAttention."
                _attn_names(lin, getattr(blk, self_attn), b + self_attn, *(sa + c for c in "qkvo"))
                if stack == "decoder":
                    ca = h + "layer.1.EncDecAttention."
                    _attn_names(lin, blk.cross_attn, b + "cross_attn", *(ca + c for c in "qkvo"))
                ff = h + f"layer.{n_mlp}.DenseReluDense."
                _mlp_names(lin, blk.mlp, b + "mlp", {a: ff + n for a, n in mlp_hf.items()})
        return _HFLayout("T5ForConditionalGeneration", "SEQ_2_SEQ_LM", False, lin, ["lm_head"], {})
    raise TypeError(f"LoRA save/load knows the llmkit families, not {type(model).__name__}")


def _decoder_arch(model: Decoder) -> str:
    """The HF architecture `export_hf` writes for a rope decoder (Llama, Qwen2, Phi-3, Gemma 2, ...); a
    combination it refuses keeps Llama's names, so llmkit still reloads the adapter."""
    from llmkit.models.hf import _hf_arch

    try:
        return _hf_arch(model.config)
    except ValueError:
        moe = model.config.moe
        if moe is not None:  # named as the MoE architecture that comes closest (hf.py's choice)
            return "Qwen2MoeForCausalLM" if moe.shared_experts or model.config.qkv_bias else "MixtralForCausalLM"
        return "LlamaForCausalLM"


def _suffixes(selected: list[str], universe: list[str], min_parts: int = 1) -> list[str]:
    """Shortest dotted suffixes (of at least `min_parts` parts) that select exactly `selected` among
    `universe` under PEFT's rule (a name matches target t when it equals t or ends with "." + t), e.g.
    ["q_proj", "v_proj"]."""
    chosen = set(selected)
    out: list[str] = []
    left = set(selected)
    for name in selected:
        if name not in left:
            continue
        parts = name.split(".")
        for k in range(min(min_parts, len(parts)), len(parts) + 1):
            suf = ".".join(parts[-k:])
            hits = {u for u in universe if u == suf or u.endswith("." + suf)}
            if hits <= chosen:
                out.append(suf)
                left -= hits
                break
    return out


def _pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# -- save / load ------------------------------------------------------------------------------------


def save_lora(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write the adapters of `model` in PEFT's layout; returns `out_dir`.

    `adapter_model.safetensors` holds ``base_model.model.<HF module>.lora_{A,B}.weight`` (A: (r, in),
    B: (out, r), Linear layout also for GPT-2's Conv1D) plus the modules_to_save tensors;
    `adapter_config.json` is a PEFT `LoraConfig` (peft_type LORA, r, lora_alpha, target_modules,
    rank_pattern / alpha_pattern where a HF module's rank differs from r, fan_in_fan_out for GPT-2,
    use_rslora, base_model_name_or_path = `base_model`). A mixture-of-experts model's router and experts go
    to `target_parameters` (see the module docstring). llmkit's slice layout rides along in the
    safetensors metadata so `load_lora` restores the exact same modules.
    """
    from safetensors.torch import save_file

    mods = lora_modules(model)
    expert_mods = lora_expert_modules(model)
    if not mods and not expert_mods:
        raise ValueError("model carries no LoRA adapters (apply_lora or load_lora first)")
    cfg: LoRAConfig = getattr(model, "lora_config", None) or LoRAConfig()
    layout = _hf_layout(model)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    slice_meta: dict[str, list] = {}
    # per HF module: [(row offset in the HF module, rows, [(slice, lo, hi, A, B, scale)])] from every llmkit
    # Linear it covers (two for Phi-3's gate_up_proj, one otherwise)
    blocks: dict[str, list] = {}
    for path, m in mods:
        if m.merged:
            raise ValueError(f"{path}: adapter is merged into the base weight; unmerge_lora before saving")
        for hf, hs, he in layout.linears[path]:
            parts = [(n, s, e) for n, (s, e) in m.ranges.items() if s < he and e > hs]
            if not parts:
                continue
            for n, s, e in parts:
                if not ((hs <= s and e <= he) or (s <= hs and he <= e)):
                    raise ValueError(f"{path}: slice {n!r} rows [{s}, {e}) straddle {hf} rows [{hs}, {he})")
            off = layout.offsets.get((path, hf), 0)
            pieces = []
            for n, s, e in parts:
                a, b = m.lora_A[n].detach().float().cpu(), m.lora_B[n].detach().float().cpu()
                lo, hi = max(s, hs), min(e, he)
                pieces.append((n, lo - hs + off, hi - hs + off, a, b[lo - s:hi - s], m.scaling[n], path))
            blocks.setdefault(hf, []).extend(pieces)
    for hf, pieces in blocks.items():
        if hf in layout.fused_rows:
            rows = layout.fused_rows[hf]
        else:  # one llmkit Linear: the HF module has exactly the rows mapped to it
            rows = next(he - hs for h2, hs, he in layout.linears[pieces[0][6]] if h2 == hf)
        ref = pieces[0][5]
        r_hf = sum(p[3].shape[0] for p in pieces)
        b_hf = torch.zeros(rows, r_hf)
        a_list, meta, col = [], [], 0
        for n, lo, hi, a, b, scale, path in pieces:
            rank = a.shape[0]
            # PEFT has one scale per module: fold any other slice's scale into its B
            b_hf[lo:hi, col:col + rank] = b * (scale / ref)
            a_list.append(a)
            meta.append([n, lo, hi, rank] + ([path] if hf in layout.fused_rows else []))
            col += rank
        tensors[f"{_PEFT_PREFIX}{hf}.lora_A.weight"] = torch.cat(a_list).contiguous()
        tensors[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = b_hf.contiguous()
        key = f"{hf}.{layout.params[hf]}" if hf in layout.params else hf  # what PEFT's patterns match
        ranks[key] = r_hf
        # alpha_hf / r_hf (or / sqrt(r_hf)) must equal our scale
        alphas[key] = ref * (math.sqrt(r_hf) if cfg.rslora else r_hf)
        slice_meta[hf] = meta
    param_keys = [f"{hf}.{layout.params[hf]}" for hf in blocks if hf in layout.params]
    for path, lx in expert_mods:
        if lx.merged:
            raise ValueError(f"{path}: expert adapter is merged into the experts; unmerge_lora before saving")
        if path not in layout.experts:
            raise ValueError(f"{path}: no Hugging Face name for these experts")
        for key, r_hf, scale, meta in _save_experts(tensors, lx, layout.experts[path],
                                                           model.get_submodule(path)):
            ranks[key] = r_hf
            alphas[key] = scale * (math.sqrt(r_hf) if cfg.rslora else r_hf)
            slice_meta[key] = meta
            param_keys.append(key)
    for name in cfg.modules_to_save or []:
        hf_mod, names = layout.saved[name]
        mod = model.get_submodule(name)
        for pname, hf_key in names.items():
            p = getattr(mod, pname)
            if p is None:  # bias=False llmkit model: HF always has one, zero is the same function
                p = torch.zeros(mod.out_features)
            tensors[_PEFT_PREFIX + hf_key] = p.detach().float().cpu().contiguous().clone()
    tokens = trainable_tokens(model)
    if tokens is not None:
        tensors[f"{_PEFT_PREFIX}{_embed_name(layout)}.{_TOKENS_SUFFIX}"] = \
            tokens.values.detach().float().cpu().contiguous().clone()
    adapted = list(ranks)
    modules = [k for k in adapted if k not in param_keys]
    rank_pattern = _group_patterns(ranks, cfg.r, adapted, param_keys)
    alpha_pattern = _group_patterns(alphas, cfg.alpha, adapted, param_keys)
    config = {
        "peft_type": "LORA", "task_type": layout.task_type, "base_model_name_or_path": base_model,
        # PEFT's parameter targets refuse dropout (it only acts in training): 0 there, llmkit's in the metadata
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": 0.0 if param_keys else cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": sorted(_suffixes(modules, layout.all_hf_linears())), "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "fan_in_fan_out": layout.fan_in_fan_out, "bias": "none",
        "modules_to_save": [layout.saved[n][0] for n in cfg.modules_to_save or []] or None,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False, "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "revision": None, "peft_version": _peft_version(),
        "trainable_token_indices": tokens.ids.tolist() if tokens is not None else None,
    }
    if param_keys:  # only then: PEFT before 0.17 knows no target_parameters
        config["target_parameters"] = sorted(_suffixes(param_keys, layout.all_hf_params(), min_parts=3))
    meta = {"architecture": layout.arch, "family": type(model).__name__, "targets": cfg.targets,
            "lr_ratio": cfg.lr_ratio, "dropout": cfg.dropout, "slices": slice_meta}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt", _META_KEY: json.dumps(meta)})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _save_experts(tensors: dict[str, torch.Tensor], lx: LoRAExperts, hf: str, moe: MoEFeedForward) -> list:
    """Write one layer's expert adapters as PEFT's ParamWrapper tensors on `hf` (`...mlp.experts`); returns
    [(pattern key: the parameter's name, rank per expert, scale, slice metadata)]."""
    ff = moe.gate.shape[1]
    written = []
    # gate_up_proj rows [gate; up]: per expert A_e = [A_gate,e; A_up,e], B_e block-diagonal; one scale per
    # parameter in PEFT, so another slice's scale is folded into its B
    gate_up = [(n, off) for n, off in (("gate", 0), ("up", ff)) if n in lx.scaling]
    if gate_up:
        ref = lx.scaling[gate_up[0][0]]
        r_hf = sum(lx.lora_A[n].shape[1] for n, _ in gate_up)
        E, d = moe.gate.shape[0], moe.gate.shape[2]
        a3 = torch.zeros(E, r_hf, d)
        b3 = torch.zeros(E, 2 * ff, r_hf)
        meta, col = [], 0
        for n, off in gate_up:
            a, b = lx.lora_A[n].detach().float().cpu(), lx.lora_B[n].detach().float().cpu()
            rank = a.shape[1]
            a3[:, col:col + rank] = a
            b3[:, off:off + ff, col:col + rank] = b * (lx.scaling[n] / ref)
            meta.append([n, off, off + ff, rank])
            col += rank
        # PEFT nests the wrappers in parameter order: with down_proj adapted too, gate_up_proj is the inner one
        module = f"{hf}.base_layer" if "down" in lx.scaling else hf
        _put_expert_factors(tensors, module, a3, b3)
        written.append((f"{hf}.gate_up_proj", r_hf, ref, meta))
    if "down" in lx.scaling:
        a, b = lx.lora_A["down"].detach().float().cpu(), lx.lora_B["down"].detach().float().cpu()
        _put_expert_factors(tensors, hf, a, b)
        rows = b.shape[1]
        written.append((f"{hf}.down_proj", a.shape[1], lx.scaling["down"], [["down", 0, rows, a.shape[1]]]))
    return written


def _put_expert_factors(tensors: dict[str, torch.Tensor], module: str, a3: torch.Tensor, b3: torch.Tensor) -> None:
    """A (E, r, in), B (E, out, r) -> PEFT's ParamWrapper lora_A (E r, in), rows e r + j, and lora_B
    (out, r E), columns j E + e (peft.tuners.lora.layer.ParamWrapper.get_delta_weight)."""
    E, r, d_in = a3.shape
    tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a3.reshape(E * r, d_in).contiguous()
    tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b3.permute(1, 2, 0).reshape(b3.shape[1], r * E).contiguous()


def _expert_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `_put_expert_factors`: PEFT's lora_A (E r, in), lora_B (out, r E) -> (E, r, in), (E, out, r)."""
    r = a.shape[0] // experts
    return a.reshape(experts, r, a.shape[1]), b.reshape(b.shape[0], r, experts).permute(2, 0, 1)


def _peft_version() -> str:
    # PEFT records the version that wrote a config; an adapter written without peft installed says so
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return "0.0.0+llmkit"


def _group_patterns(values: dict[str, float], default: float, adapted: list[str],
                    params: list[str] = ()) -> dict[str, float]:
    """{suffix: value} for the modules whose value differs from `default` (PEFT rank/alpha_pattern).
    Parameter targets (`params`, matched by PEFT under their parameter name) get suffixes of at least three
    parts, as `target_parameters` does (mlp.gate.weight, not weight)."""
    out: dict[str, float] = {}
    for v in sorted({v for v in values.values() if v != default}):
        group = [n for n in adapted if values[n] == v]
        for names, min_parts in (([n for n in group if n not in params], 1), ([n for n in group if n in params], 3)):
            for suf in _suffixes(names, adapted, min_parts):
                out[suf] = int(v) if float(v).is_integer() else v
    return out


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: not an adapter directory (no {ADAPTER_CONFIG})")
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("lora_bias", False), ("bias", "none")):
        if config.get(key, ok) not in (ok, None):
            raise ValueError(f"{cfg_path}: {key}: {config[key]!r} is not supported "
                             "(LoRA without DoRA / biases)")
    st = adapter_dir / ADAPTER_WEIGHTS
    meta: dict = {}
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
    elif (adapter_dir / "adapter_model.bin").is_file():  # older PEFT versions
        tensors = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    return config, tensors, meta


_LORA_KEY = re.compile(r"(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight")


def load_lora(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Attach the LoRA adapter in `adapter_dir` (written by `save_lora` or by PEFT for the exported HF
    model) to the base `model`, in place; returns `model` with only the adapter trainable.

    ValueError when a tensor names a module this model does not have (an adapter for another family or
    size), when shapes disagree, or for PEFT features llmkit lacks (DoRA, LoRA biases).
    """
    adapter_dir = Path(adapter_dir)
    if has_lora(model):
        raise ValueError("model already carries LoRA adapters; load into the base model")
    config, tensors, meta = _read_adapter(adapter_dir)
    layout = _hf_layout(model)
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}  # ranks come from the tensors' shapes
    hf_to_llmkit: dict[str, list[tuple[str, int, int, int]]] = {}
    for path, parts in layout.linears.items():
        for hf, hs, he in parts:
            hf_to_llmkit.setdefault(hf, []).append((path, hs, he, layout.offsets.get((path, hf), 0)))
    saved_keys = {_PEFT_PREFIX + hf_key: (mod, pname) for mod, (_, names) in layout.saved.items()
                  for pname, hf_key in names.items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    to_save: dict[tuple[str, str], torch.Tensor] = {}
    token_values = None
    for key, t in tensors.items():
        if key.endswith("." + _TOKENS_SUFFIX):
            if key != f"{_PEFT_PREFIX}{_embed_name(layout)}.{_TOKENS_SUFFIX}":
                raise ValueError(f"{adapter_dir}: trainable tokens on {key!r}, not on this "
                                 f"{layout.arch}'s input embedding")
            token_values = t
            continue
        if key in saved_keys:
            to_save[saved_keys[key]] = t
            continue
        m = _LORA_KEY.fullmatch(key.removeprefix(_PEFT_PREFIX))
        if m is None:
            raise ValueError(f"{adapter_dir}: unexpected tensor {key!r} "
                             f"(not a LoRA A/B matrix of {layout.arch})")
        pairs.setdefault(m["mod"], {})[m["ab"]] = t
    if not pairs:
        raise ValueError(f"{adapter_dir}: no LoRA tensors in {ADAPTER_WEIGHTS}")
    sites = {(s.module, s.start, s.end): s.slice for s in adaptable_sites(model) if s.kind == "linear"}
    hf_experts = {hf: path for path, hf in layout.experts.items()}
    pieces: dict[str, list] = {}
    expert_pieces: dict[str, dict[str, tuple]] = {}
    for hf, ab in pairs.items():
        outer = hf
        while outer.endswith(".base_layer"):  # PEFT's nested ParamWrappers (gate_up_proj inside down_proj)
            outer = outer.removesuffix(".base_layer")
        if outer in hf_experts:
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{adapter_dir}: {hf} lacks lora_{'A' if 'A' not in ab else 'B'}")
            path = hf_experts[outer]
            got = expert_pieces.setdefault(path, {})
            for name, a3, b3, scale in _expert_pieces(adapter_dir, hf, outer, model.get_submodule(path),
                                                      ab["A"].float(), ab["B"].float(), alpha_pattern, alpha0,
                                                      rslora, meta.get("slices", {})):
                if name in got:
                    raise ValueError(f"{adapter_dir}: {outer} carries two adapters for the experts' {name}")
                got[name] = (a3, b3, scale)
            continue
        if hf not in hf_to_llmkit:
            raise ValueError(f"{adapter_dir}: adapter module {hf!r} does not exist in this "
                             f"{layout.arch}-named {type(model).__name__} (wrong base model?)")
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: {hf} lacks lora_{'A' if 'A' not in ab else 'B'}")
        a, b = ab["A"].float(), ab["B"].float()
        # PEFT matches a parameter target's patterns against the parameter's name (the router's mlp.gate.weight)
        alpha = _pattern_value(alpha_pattern, f"{hf}.{layout.params[hf]}" if hf in layout.params else hf, alpha0)
        if hf in layout.fused_rows:  # several llmkit Linears in one HF module (Phi-3's gate_up_proj)
            for name, path, start, end, a_part, b_part in _split_fused(
                    adapter_dir, hf, hf_to_llmkit[hf], layout.fused_rows[hf], meta.get("slices", {}).get(hf),
                    a, b, sites, model):
                scale = alpha / (math.sqrt(a.shape[0]) if rslora else a.shape[0])
                pieces.setdefault(path, []).append((name, start, end, a_part, b_part, scale))
            continue
        path, hs, he, _ = hf_to_llmkit[hf][0]
        lin = base_linear(model.get_submodule(path))
        r_hf = a.shape[0]
        if a.shape != (r_hf, lin.in_features) or b.shape != (he - hs, r_hf):
            raise ValueError(f"{adapter_dir}: {hf} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                             f"this model needs A ({r_hf}, {lin.in_features}), B ({he - hs}, {r_hf})")
        scale = alpha / (math.sqrt(r_hf) if rslora else r_hf)
        for name, lo, hi, a_part, b_part in _split(meta.get("slices", {}).get(hf), a, b, sites, path, hs, he):
            pieces.setdefault(path, []).append((name, hs + lo, hs + hi, a_part, b_part, scale))
    # PEFT's parameter targets need lora_dropout 0 in the file: llmkit's own dropout rides in the metadata
    dropout = float(meta.get("dropout", config.get("lora_dropout", 0.0)))
    for path, ad in expert_pieces.items():
        moe = model.get_submodule(path)
        lx = LoRAExperts(moe, {n: (a3.shape[1], sc) for n, (a3, _, sc) in ad.items()}, dropout)
        with torch.no_grad():
            for n, (a3, b3, _) in ad.items():
                lx.lora_A[n].copy_(a3)
                lx.lora_B[n].copy_(b3)
        moe.lora_experts = lx
    for path, plist in pieces.items():
        sl = _assemble(path, plist, sites)
        wrapper = LoRALinear(model.get_submodule(path), {n: (s, e, a.shape[0], sc) for n, (s, e, a, _, sc)
                                                         in sl.items()}, dropout)
        with torch.no_grad():
            for name, (_, _, a, b, _) in sl.items():
                wrapper.lora_A[name].copy_(a)
                wrapper.lora_B[name].copy_(b)
        replace_module(model, path, wrapper)
    modules_to_save = sorted({mod for mod, _ in to_save})
    with torch.no_grad():
        for (mod, pname), t in to_save.items():
            p = getattr(model.get_submodule(mod), pname)
            if p is None:
                if torch.count_nonzero(t):
                    raise ValueError(f"{adapter_dir}: {mod}.{pname} is nonzero but this model has no {pname}")
                continue
            if p.shape != t.shape:
                raise ValueError(f"{adapter_dir}: {mod}.{pname} has shape {tuple(t.shape)}, "
                                 f"model {tuple(p.shape)}")
            p.copy_(t)
    indices = config.get("trainable_token_indices")
    if isinstance(indices, dict):  # PEFT's {module name: ids} form; llmkit decoders have one embedding
        indices = next(iter(indices.values()), None)
    if (token_values is None) != (not indices):
        raise ValueError(f"{adapter_dir}: trainable_token_indices and the token rows in {ADAPTER_WEIGHTS} "
                         "must come together")
    if indices:
        if len(indices) != token_values.shape[0] or len(set(indices)) != len(indices):
            raise ValueError(f"{adapter_dir}: {len(indices)} trainable token ids for {token_values.shape[0]} rows")
        rows = torch.as_tensor(token_values, dtype=torch.float32)[torch.argsort(torch.tensor(indices))]
        tokens = apply_trainable_tokens(model, indices)
        if rows.shape != tokens.values.shape:
            raise ValueError(f"{adapter_dir}: token rows of shape {tuple(rows.shape)}, model needs "
                             f"{tuple(tokens.values.shape)}")
        with torch.no_grad():
            tokens.values.copy_(rows)
    targets = meta.get("targets") or _canonical_targets(model)
    model.lora_config = LoRAConfig(r=r0, alpha=alpha0, dropout=dropout,
                                   targets=list(targets), rslora=rslora,
                                   lr_ratio=float(meta.get("lr_ratio", LoRAConfig.lr_ratio)),
                                   modules_to_save=modules_to_save)
    freeze_all_but_lora(model, modules_to_save)
    if indices:
        tokens.values.requires_grad_(True)
    return model


def _embed_name(layout: _HFLayout) -> str:
    """The HF module PEFT's trainable_token_indices target by default: the input embedding."""
    names = {"GPT2LMHeadModel": "transformer.wte"}
    if layout.arch.endswith("ForCausalLM"):  # Llama, Mistral, Qwen2/3, Phi-3, Gemma (2)
        names[layout.arch] = "model.embed_tokens"
    if layout.arch not in names:
        raise ValueError(f"trainable tokens are supported on decoders, not {layout.arch}")
    return names[layout.arch]


def _expert_pieces(adapter_dir, hf: str, experts_hf: str, moe: MoEFeedForward, a: torch.Tensor, b: torch.Tensor,
                   alpha_pattern: dict, alpha0: float, rslora: bool, meta_slices: dict) -> list:
    """One PEFT ParamWrapper on a layer's experts (`hf`: `experts_hf` or a nested `.base_layer`) -> the llmkit
    expert adapters [(gate / up / down, A (E, r, in), B (E, out, r), scale)]. Which parameter it adapts
    follows from the shapes (gate_up_proj: A (E r, d), B (2 ff, r E); down_proj: A (E r, ff), B (d, r E)).
    A gate_up_proj adapter splits back into the gate and up adapters save_lora wrote (its metadata, B zero
    off their blocks); otherwise gate and up each get the whole A and their rows of B (the same function)."""
    E, ff, d = moe.gate.shape
    found = []
    if a.dim() == 2 and b.dim() == 2 and a.shape[0] % E == 0 and a.shape[0] and b.shape[1] == a.shape[0]:
        if a.shape[1] == d and b.shape[0] == 2 * ff:
            found.append("gate_up_proj")
        if a.shape[1] == ff and b.shape[0] == d:
            found.append("down_proj")
    if len(found) != 1:
        raise ValueError(f"{adapter_dir}: {hf} has A {tuple(a.shape)}, B {tuple(b.shape)}; these experts need "
                         f"gate_up_proj A ({E} r, {d}), B ({2 * ff}, r {E}) or down_proj A ({E} r, {ff}), "
                         f"B ({d}, r {E})")
    param = found[0]
    a3, b3 = _expert_factors(a, b, E)
    r_hf = a3.shape[1]
    key = f"{experts_hf}.{param}"
    scale = _pattern_value(alpha_pattern, key, alpha0) / (math.sqrt(r_hf) if rslora else r_hf)
    if param == "down_proj":
        return [("down", a3, b3, scale)]
    recorded = meta_slices.get(key)
    if recorded and all(len(m) == 4 and m[0] in ("gate", "up") for m in recorded) \
            and sum(m[3] for m in recorded) == r_hf:
        out, col = [], 0
        mask = torch.zeros(b3.shape[1:], dtype=torch.bool)
        for name, lo, hi, rank in recorded:
            if (lo, hi) != ((0, ff) if name == "gate" else (ff, 2 * ff)):
                break
            mask[lo:hi, col:col + rank] = True
            out.append((name, a3[:, col:col + rank], b3[:, lo:hi, col:col + rank], scale))
            col += rank
        else:
            if not torch.count_nonzero(b3[:, ~mask]):
                return out
    return [("gate", a3, b3[:, :ff], scale), ("up", a3, b3[:, ff:], scale)]


def _split(meta_slices, a: torch.Tensor, b: torch.Tensor, sites: dict, path: str, hs: int, he: int):
    """Turn one HF module's (A, B) into pieces [(name, lo, hi, A_part, B_part)], rows relative to hs.

    With save_lora's metadata (and B really zero outside the recorded blocks) the module splits back into
    the slices it was written from (GPT-2's c_attn into q and v), named as they were; otherwise it is one
    piece named by its rows (q/k/v of a fused matrix, "full" for a whole Linear).
    """
    if meta_slices and sum(m[3] for m in meta_slices) == a.shape[0]:
        parts, col = [], 0
        mask = torch.zeros_like(b, dtype=torch.bool)
        for name, lo, hi, rank in meta_slices:
            if not 0 <= lo < hi <= he - hs:
                break
            mask[lo:hi, col:col + rank] = True
            parts.append((name, lo, hi, a[col:col + rank], b[lo:hi, col:col + rank]))
            col += rank
        else:
            if not torch.count_nonzero(b[~mask]):
                return parts
    name = sites.get((path, hs, he))
    if name is None:
        raise ValueError(f"{path}: rows [{hs}, {he}) are not an adaptable slice")
    return [(name, 0, he - hs, a, b)]


def _split_fused(adapter_dir, hf: str, targets: list, rows: int, meta_slices, a: torch.Tensor, b: torch.Tensor,
                 sites: dict, model: nn.Module):
    """One HF module that fuses several llmkit Linears (Phi-3's gate_up_proj) -> pieces
    [(slice, llmkit path, first row, end row, A, B)]: back into the slices save_lora wrote (from its
    metadata, when B is zero outside their blocks), otherwise each Linear gets the whole A and its rows of B
    (the same function, at the module's rank)."""
    r_hf = a.shape[0]
    for path, _, _, _ in targets:
        lin = base_linear(model.get_submodule(path))
        if a.shape != (r_hf, lin.in_features) or b.shape != (rows, r_hf):
            raise ValueError(f"{adapter_dir}: {hf} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                             f"this model needs A ({r_hf}, {lin.in_features}), B ({rows}, {r_hf})")
    where = {path: (hs, he, off) for path, hs, he, off in targets}
    if meta_slices and all(len(m) == 5 and m[4] in where for m in meta_slices) \
            and sum(m[3] for m in meta_slices) == r_hf:
        out, col = [], 0
        mask = torch.zeros_like(b, dtype=torch.bool)
        for name, lo, hi, rank, path in meta_slices:
            hs, he, off = where[path]
            if not off <= lo < hi <= off + he - hs:
                break
            mask[lo:hi, col:col + rank] = True
            out.append((name, path, hs + lo - off, hs + hi - off, a[col:col + rank], b[lo:hi, col:col + rank]))
            col += rank
        else:
            if not torch.count_nonzero(b[~mask]):
                return out
    out = []
    for path, hs, he, off in targets:
        name = sites.get((path, hs, he))
        if name is None:
            raise ValueError(f"{path}: rows [{hs}, {he}) are not an adaptable slice")
        out.append((name, path, hs, he, a, b[off:off + he - hs]))
    return out


def _assemble(path: str, pieces: list, sites: dict) -> dict[str, tuple]:
    """Join the pieces of one llmkit Linear into its slices: {name: (start, end, A, B, scale)}.

    A slice that covered several HF modules (a whole fused qkv saved as Llama's q_proj, k_proj, v_proj)
    comes back whole when its pieces share A and scale and tile its rows; otherwise each piece becomes
    the slice its rows are (the same function, with A repeated).
    """
    groups: dict[str, list] = {}
    for name, start, end, a, b, scale in pieces:
        groups.setdefault(name, []).append((start, end, a, b, scale))
    out: dict[str, tuple[int, int, torch.Tensor, torch.Tensor, float]] = {}
    for name, group in groups.items():
        group.sort(key=lambda g: g[0])
        joinable = all(torch.equal(g[2], group[0][2]) and g[4] == group[0][4] for g in group) and all(
            group[i][1] == group[i + 1][0] for i in range(len(group) - 1))
        if joinable:
            b = torch.cat([g[3] for g in group])
            out[name] = (group[0][0], group[-1][1], group[0][2], b, group[0][4])
            continue
        for start, end, a, b, scale in group:
            site = sites.get((path, start, end))
            if site is None or site in out:
                raise ValueError(f"{path}: adapter rows [{start}, {end}) do not form llmkit slices")
            out[site] = (start, end, a, b, scale)
    return out


def _canonical_targets(model: nn.Module) -> list[str]:
    """Target names that describe the adapters `model` carries (for a PEFT-written adapter)."""
    sites = {(s.module, s.slice): s.canonical for s in adaptable_sites(model)}
    names = {sites.get((path, n)) for path, m in lora_modules(model) for n in m.ranges}
    names |= {sites.get((path, n)) for path, m in lora_expert_modules(model) for n in m.scaling}
    return [t for t in (*CANONICAL_TARGETS, FUSED_QKV, *MOE_TARGETS) if t in names] or ["all-linear"]
