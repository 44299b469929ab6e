"""LoRA on mixture-of-experts layers: the router (a Linear) and the stacked experts (per-expert factors).

Checked: a fresh adapter changes nothing; the layer equals an explicit per-token reference that uses
W_e + s B_e A_e and W_router + s B A; only the adapters train and the loss falls; the router adapter gets
gradients through the routing weights; merge equals the unmerged forward; save / load round trips are exact
and PEFT (target_parameters on transformers' Mixtral / Qwen2-MoE) gives the same logits both ways; expert
parallelism refuses expert adapters; `finetune_sft` trains experts and router end to end, and `llmkit merge`
folds them in.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llmkit.models.decoder import Decoder, DecoderConfig
from llmkit.models.io import save_model
from llmkit.models.lora import (
    LoRAConfig,
    LoRAExperts,
    LoRALinear,
    apply_lora,
    available_targets,
    has_lora,
    lora_parameters,
    merge_lora,
    unmerge_lora,
)
from llmkit.models.lora_peft import load_lora, save_lora
from llmkit.models.moe import MoEConfig, MoEFeedForward

V = 97


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matrices: a second thread only adds synchronisation on a loaded machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def moe_decoder(seed: int = 0, shared: bool = False, **moe) -> Decoder:
    """A 2-layer Mixtral-like decoder (Qwen2-MoE-like with `shared`), weights redrawn so routing is not flat."""
    torch.manual_seed(seed)
    spec = {"experts": 4, "top_k": 2, **moe}
    if shared:
        spec.update(shared_experts=1, shared_gate=True)
    model = Decoder(DecoderConfig(vocab_size=V, block_size=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                                  d_ff=24, activation="swiglu", norm="rmsnorm", positions="rope",
                                  tie_embeddings=False, moe=spec))
    randomize(model)
    return model


def randomize(model: torch.nn.Module, std: float = 0.15) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))


def randomize_lora(model: torch.nn.Module, std: float = 0.2, seed: int = 7) -> None:
    """A trained-looking adapter (B nonzero), so the adapter really changes the function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(std * torch.randn(p.shape, generator=g))


def ids(B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def plain_copy(model: Decoder) -> Decoder:
    """The same base weights without any adapter."""
    fresh = Decoder(model.config)
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k})
    return fresh


# -- the layer ------------------------------------------------------------------------------------------


def test_fresh_adapter_leaves_the_outputs_unchanged():
    model = moe_decoder(shared=True).eval()
    x = ids()
    with torch.no_grad():
        before = model(x)[0]
    wrapped = apply_lora(model, LoRAConfig(r=4, targets=["q_proj", "router", "shared_expert_gate", "experts"]))
    assert wrapped == ["blocks.0.attn.qkv", "blocks.0.mlp.router", "blocks.0.mlp.shared_gate",
                       "blocks.0.mlp.lora_experts", "blocks.1.attn.qkv", "blocks.1.mlp.router",
                       "blocks.1.mlp.shared_gate", "blocks.1.mlp.lora_experts"]
    mlp = model.blocks[0].mlp
    assert isinstance(mlp.router, LoRALinear) and isinstance(mlp.lora_experts, LoRAExperts)
    lx = mlp.lora_experts
    # per-expert factors: gate / up (E, ff, d) -> A (E, r, d), B (E, ff, r); down (E, d, ff) -> A (E, r, ff)
    assert tuple(lx.lora_A["gate"].shape) == (4, 4, 32) and tuple(lx.lora_B["gate"].shape) == (4, 24, 4)
    assert tuple(lx.lora_A["down"].shape) == (4, 4, 24) and tuple(lx.lora_B["down"].shape) == (4, 32, 4)
    assert all(torch.count_nonzero(b) == 0 for b in lx.lora_B.values())
    assert all(torch.count_nonzero(a[e]) > 0 for a in lx.lora_A.values() for e in range(4))
    with torch.no_grad():
        assert torch.equal(model(x)[0], before)


def _layer_with_adapters(seed: int = 0, **lora_kw) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(16, 24, MoEConfig(experts=4, top_k=2))
    with torch.no_grad():
        for w in (layer.gate, layer.up, layer.down):
            w.normal_(0, 0.3)
        layer.router.weight.normal_(0, 1.0)
    apply_lora(_Holder(layer), LoRAConfig(**{"r": 3, "alpha": 6.0, "dropout": 0.0,
                                            "targets": ["router", "experts"], **lora_kw}))
    randomize_lora(layer, std=0.3)
    return layer


class _Holder(torch.nn.Module):
    """apply_lora takes a model: a bare layer as one."""

    def __init__(self, layer):
        super().__init__()
        self.mlp = layer


def test_per_expert_update_equals_an_explicit_reference():
    layer = _layer_with_adapters()
    lx = layer.lora_experts
    s = 6.0 / 3
    x = torch.randn(23, 16)
    # reference: every token through its own top-k experts, with explicit adapted weights
    w_router = layer.router.base.weight + s * layer.router.lora_B["full"] @ layer.router.lora_A["full"]
    adapted = {n: torch.stack([getattr(layer, n)[e] + s * lx.lora_B[n][e] @ lx.lora_A[n][e] for e in range(4)])
               for n in ("gate", "up", "down")}
    want = torch.zeros_like(x)
    for t in range(x.size(0)):
        probs = torch.softmax(F.linear(x[t], w_router), -1)
        w, e = probs.topk(2)
        w = w / w.sum()
        for wi, ei in zip(w, e):
            h = F.silu(F.linear(x[t], adapted["gate"][ei])) * F.linear(x[t], adapted["up"][ei])
            want[t] += wi * F.linear(h, adapted["down"][ei])
    with torch.no_grad():
        got = layer(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert (got - _plain_layer_output(layer, x)).abs().max() > 1e-2  # the adapters matter
        for n in ("gate", "up", "down"):
            torch.testing.assert_close(lx.delta_weight(n), adapted[n] - getattr(layer, n), rtol=0, atol=1e-6)


def _plain_layer_output(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    lx, router = layer.lora_experts, layer.router
    layer.lora_experts, layer.router = None, router.base
    try:
        return layer(x)
    finally:
        layer.lora_experts, layer.router = lx, router


def test_each_expert_target_adapts_only_its_weight():
    layer = _layer_with_adapters(targets=["experts.up_proj"])
    assert list(layer.lora_experts.scaling) == ["up"] and isinstance(layer.router, torch.nn.Linear)
    x = torch.randn(9, 16)
    with torch.no_grad():
        ref_up = layer.up + layer.lora_experts.delta_weight("up")
        merged = MoEFeedForward(16, 24, MoEConfig(experts=4, top_k=2))
        merged.load_state_dict({"router.weight": layer.router.weight, "gate": layer.gate, "up": ref_up,
                                "down": layer.down})
        torch.testing.assert_close(layer(x), merged(x), rtol=0, atol=1e-5)


# -- training -------------------------------------------------------------------------------------------


def test_a_few_steps_train_only_the_adapters_and_lower_the_loss():
    model = moe_decoder(seed=1)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["router", "experts"]))
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora)
    assert len(lora) == 2 * (2 + 6)  # per layer: router A, B and three expert weights' A, B
    start = {n: p.detach().clone() for n, p in lora.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(4, 16, seed=3)
    model.train()
    first = model(x, x)[1].item()
    for _ in range(25):
        loss = model(x, x)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.3
    for k, v in model.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, base[k]), k
    for n, p in lora.items():
        assert not torch.equal(p, start[n]), n  # every A and B moved, the routers' and each expert weight's


def test_the_router_adapter_gets_gradients_through_the_routing_weights():
    model = moe_decoder(seed=2, router_aux_loss=0.0, router_z_loss=0.0)  # the LM loss alone
    apply_lora(model, LoRAConfig(r=4, dropout=0.0, targets=["router"]))
    x = ids(2, 16, seed=4)
    model.train()
    model(x, x)[1].backward()
    for blk in model.blocks:
        router = blk.mlp.router
        assert router.lora_B["full"].grad is not None and router.lora_B["full"].grad.abs().sum() > 0
        assert router.base.weight.grad is None  # frozen
    # and it reroutes: a trained-looking router adapter changes which experts tokens go to
    randomize_lora(model, std=0.5)
    flat = torch.randn(64, 32)
    with torch.no_grad():
        mlp = model.blocks[0].mlp
        adapted = mlp.route(flat)[3]
        plain = torch.softmax(mlp.router.base(flat), -1).topk(2).indices
    assert (adapted.sort(-1).values != plain.sort(-1).values).any()


# -- merge, save, load ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_merge_equals_the_unmerged_forward(shared, tmp_path):
    model = moe_decoder(seed=3, shared=shared).eval()
    targets = ["q_proj", "v_proj", "router", "experts"] + (["gate_proj", "shared_expert_gate"] if shared else [])
    apply_lora(model, LoRAConfig(r=4, alpha=12, targets=targets))
    randomize_lora(model)
    base = {k.replace(".base.", "."): v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    x = ids()
    with torch.no_grad():
        unmerged = model(x)[0]
        assert (unmerged - plain_copy(model)(x)[0]).abs().max() > 0.05
        merge_lora(model, keep_adapters=True)
        torch.testing.assert_close(model(x)[0], unmerged, rtol=0, atol=1e-5)
        unmerge_lora(model)
        for k, v in model.state_dict().items():
            if ".lora_" not in k:
                torch.testing.assert_close(v, base[k.replace(".base.", ".")], rtol=0, atol=1e-6)
        merge_lora(model)
        assert not has_lora(model) and all(b.mlp.lora_experts is None for b in model.blocks)
        torch.testing.assert_close(model(x)[0], unmerged, rtol=0, atol=1e-5)
    save_model(model, tmp_path / "merged")  # a plain model directory


@pytest.mark.parametrize("shared,targets", [
    (False, ["q_proj", "router", "experts"]),
    (True, ["all-linear", "router", "shared_expert_gate", "experts"]),
    (False, ["experts.gate_proj", "experts.down_proj"]),
])
def test_save_load_round_trip_is_exact(shared, targets, tmp_path):
    model = moe_decoder(seed=4, shared=shared).eval()
    apply_lora(model, LoRAConfig(r=3, alpha=5, dropout=0.05, targets=targets, lr_ratio=4.0))
    randomize_lora(model)
    out = save_lora(model, tmp_path / "adapter")
    fresh = plain_copy(model).eval()
    load_lora(fresh, out)
    assert fresh.lora_config.targets == targets and fresh.lora_config.dropout == 0.05
    assert fresh.lora_config.lr_ratio == 4.0
    ours = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    theirs = {k: v for k, v in fresh.state_dict().items() if ".lora_" in k}
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(theirs)
    x = ids()
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], model(x)[0])


def test_saved_tensors_and_config_use_peft_parameter_targets(tmp_path):
    model = moe_decoder(seed=5).eval()
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=["q_proj", "router", "experts"]))
    randomize_lora(model)
    out = save_lora(model, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj"]
    assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]
    # gate + up: one rank-2r adapter per expert on gate_up_proj, the scale kept by alpha_pattern
    assert cfg["rank_pattern"] == {"mlp.experts.gate_up_proj": 4}
    assert cfg["alpha_pattern"] == {"mlp.experts.gate_up_proj": 8}
    assert cfg["lora_dropout"] == 0.0  # PEFT's parameter targets refuse dropout
    t = load_file(out / "adapter_model.safetensors")
    h = "base_model.model.model.layers.0.mlp."
    assert tuple(t[h + "gate.lora_A.weight"].shape) == (2, 32) and tuple(t[h + "gate.lora_B.weight"].shape) == (4, 2)
    # nested wrappers: gate_up_proj (E 2r, d) / (2 ff, 2r E) inside, down_proj (E r, ff) / (d, r E) outside
    assert tuple(t[h + "experts.base_layer.lora_A.weight"].shape) == (4 * 4, 32)
    assert tuple(t[h + "experts.base_layer.lora_B.weight"].shape) == (48, 4 * 4)
    assert tuple(t[h + "experts.lora_A.weight"].shape) == (4 * 2, 24)
    assert tuple(t[h + "experts.lora_B.weight"].shape) == (32, 2 * 4)
    # PEFT's ParamWrapper layout: expert e's A rows [e r, (e+1) r), its B columns e, e + E, ...
    lx = model.blocks[0].mlp.lora_experts
    a, b = t[h + "experts.lora_A.weight"], t[h + "experts.lora_B.weight"]
    for e in range(4):
        assert torch.equal(a[2 * e:2 * e + 2], lx.lora_A["down"][e].detach())
        assert torch.equal(b[:, e::4], lx.lora_B["down"][e].detach())


def test_merge_cli_folds_expert_and_router_adapters(tmp_path):
    from llmkit.cli import main
    from llmkit.models.adapters import load_adapter
    from llmkit.models.io import load_model
    from llmkit.tokenizer import train_char

    model = moe_decoder(seed=6).eval()
    save_model(model, tmp_path / "base", train_char(["a tiny alphabet: abcdefghij"]))
    apply_lora(model, LoRAConfig(r=2, targets=["router", "experts"]))
    randomize_lora(model)
    save_lora(model, tmp_path / "adapter")
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged").eval()
    adapted = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter").eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], adapted(x)[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(x)[0], model(x)[0], rtol=0, atol=1e-5)
        assert (merged(x)[0] - load_model(tmp_path / "base")(x)[0]).abs().max() > 0.05


# -- targets and refusals ----------------------------------------------------------------------------------


def test_target_names_select_the_right_pieces():
    model = moe_decoder(shared=True)
    names = available_targets(model)
    assert {"router", "shared_expert_gate", "experts", "experts.gate_proj", "experts.up_proj",
            "experts.down_proj"} <= set(names)
    apply_lora(model, LoRAConfig(r=2, targets=["all-linear"]))  # projections only, shared expert included
    mlp = model.blocks[0].mlp
    assert isinstance(mlp.shared.gate, LoRALinear) and mlp.lora_experts is None
    assert not isinstance(mlp.router, LoRALinear) and not isinstance(mlp.shared_gate, LoRALinear)
    m = moe_decoder()
    apply_lora(m, LoRAConfig(r=2, targets=[r"re:blocks\.1\.mlp\.(down|router)"]))
    assert m.blocks[0].mlp.lora_experts is None and not isinstance(m.blocks[0].mlp.router, LoRALinear)
    assert list(m.blocks[1].mlp.lora_experts.scaling) == ["down"] and isinstance(m.blocks[1].mlp.router, LoRALinear)
    with pytest.raises(ValueError, match="mixture-of-experts router"):
        apply_lora(moe_decoder(), LoRAConfig(targets=["experts.w1"]))
    dense = Decoder(DecoderConfig(vocab_size=V, block_size=16, n_layer=1, d_model=16, n_head=2, norm="rmsnorm",
                                  positions="rope", activation="swiglu"))
    with pytest.raises(ValueError, match="'router' matches no layer"):
        apply_lora(dense, LoRAConfig(targets=["router"]))


def test_expert_parallelism_refuses_expert_adapters():
    from llmkit.models.expert_parallel import shard_experts

    model = moe_decoder()
    apply_lora(model, LoRAConfig(r=2, targets=["router", "experts"]))
    with pytest.raises(ValueError, match="LoRA on its experts"):
        shard_experts(model)
    layer = model.blocks[0].mlp
    layer.expert_group = object()  # as if sharded: the forward refuses before any communication
    with pytest.raises(ValueError, match="expert parallelism"):
        layer(torch.randn(3, 32))
    sharded = moe_decoder()
    sharded.blocks[0].mlp.expert_group = object()
    with pytest.raises(ValueError, match="sharded"):
        apply_lora(sharded, LoRAConfig(targets=["experts"]))


# -- PEFT ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_peft_loads_the_adapter_with_the_same_logits(shared, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from llmkit.models.hf import export_hf

    model = moe_decoder(seed=8, shared=shared).eval()
    base_dir = export_hf(model, tmp_path / "hf")
    targets = ["q_proj", "v_proj", "router", "experts"] + (["down_proj", "shared_expert_gate"] if shared else [])
    apply_lora(model, LoRAConfig(r=3, alpha=7, targets=targets, rslora=shared))
    randomize_lora(model)
    adapter = save_lora(model, tmp_path / "adapter", base_model=str(base_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    assert type(hf).__name__ == ("Qwen2MoeForCausalLM" if shared else "MixtralForCausalLM")
    pm = peft.PeftModel.from_pretrained(hf, adapter).eval()
    x = ids()
    with torch.no_grad():
        theirs = pm(x).logits
        torch.testing.assert_close(model(x)[0], theirs, rtol=0, atol=1e-4)
        with pm.disable_adapter():
            assert (pm(x).logits - theirs).abs().max() > 0.1
    wrapped = {type(m).__name__ for n, m in pm.named_modules() if n.endswith(("mlp.gate", "mlp.experts"))}
    assert wrapped == {"ParamWrapper"}
    merged_hf = pm.merge_and_unload()
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], merged_hf(x).logits, rtol=0, atol=1e-4)


def test_a_peft_trained_expert_adapter_loads_into_llmkit(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from llmkit.models.hf import export_hf

    model = moe_decoder(seed=9).eval()
    base_dir = export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["o_proj"],
                          target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                          rank_pattern={"mlp.experts.down_proj": 3}, alpha_pattern={"mlp.gate.weight": 9})
    pm = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.eval().save_pretrained(tmp_path / "peft_adapter")
    load_lora(model, tmp_path / "peft_adapter")
    lx = model.blocks[0].mlp.lora_experts
    # PEFT's one gate_up_proj adapter: gate and up each take its A and their rows of B
    assert {n: lx.lora_A[n].shape[1] for n in lx.scaling} == {"gate": 2, "up": 2, "down": 3}
    assert lx.scaling == {"gate": 2.5, "up": 2.5, "down": 5 / 3}
    assert model.blocks[0].mlp.router.scaling["full"] == pytest.approx(9 / 2)
    assert model.lora_config.targets == ["o_proj", "router", "experts.gate_proj", "experts.up_proj",
                                         "experts.down_proj"]
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], pm(x).logits, rtol=0, atol=1e-4)


# -- fine-tuning end to end ---------------------------------------------------------------------------------


def test_finetune_sft_trains_experts_and_router_and_merges(tmp_path):
    from conftest import shared_file
    from llmkit.cli import main
    from llmkit.config import load_config
    from llmkit.finetune.sft import SFTConfig, finetune_sft
    from llmkit.infer.load import load_for_inference
    from llmkit.tokenizer import train_tokenizer

    data = shared_file("instruct/alpaca_en_demo.json")
    tok = train_tokenizer([str(data)], vocab_size=400)
    torch.manual_seed(0)
    base = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, d_model=32, n_head=2,
                                 d_ff=32, positions="rope", norm="rmsnorm", activation="swiglu",
                                 moe={"experts": 4, "top_k": 2}))
    save_model(base, tmp_path / "base", tok)
    overrides = {
        "out_dir": str(tmp_path / "run"), "base_model": str(tmp_path / "base"), "method": "lora",
        "data.paths": f"[{data}]", "data.eval_max": 8, "data.mix_pretrain": 0,
        "train.batch_size": 4, "train.max_steps": 8, "train.decay_steps": 8, "train.warmup_steps": 1,
        "train.lr": 3e-3, "train.eval_interval": 4, "train.log_interval": 1, "train.checkpoint_interval": 100,
        "train.progress": False, "eval.answers": 1, "eval.samples": 1, "eval.max_new_tokens": 4,
        "eval.loss_batches": 2, "track.enabled": False,
        "lora.r": 4, "lora.targets": "[q_proj, v_proj, router, experts]", "lora.dropout": 0.0,
    }
    cfg = load_config(SFTConfig, None, [f"{k}={v}" for k, v in overrides.items()])
    summary = finetune_sft(cfg)
    assert summary["step"] == 8 and summary["final"]
    evals = [r["eval_loss"] for r in summary["history"] if "eval_loss" in r]
    assert evals[-1] < evals[0], evals
    final = summary["final"]
    pcfg = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert pcfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]
    adapted, tok2, _ = load_for_inference(tmp_path / "base", final)
    for blk in adapted.blocks:  # trained: the B factors moved off zero
        assert blk.mlp.lora_experts.lora_B["down"].abs().sum() > 0
        assert blk.mlp.router.lora_B["full"].abs().sum() > 0
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", final,
                 "--out", str(tmp_path / "merged")]) == 0
    merged, _, _ = load_for_inference(tmp_path / "merged")
    x = torch.tensor([tok2.encode("Give three tips for staying healthy.")])
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], adapted(x)[0], rtol=0, atol=1e-5)
    assert math.isfinite(summary["eval_loss"])
