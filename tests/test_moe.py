"""Mixture-of-experts decoders: routing invariants against a per-token reference, capacity drops, the router
losses' closed forms, training, save / load, the Engine and the CLI config."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmkit.models.decoder import Decoder, DecoderConfig
from llmkit.models.moe import MoEConfig, MoEFeedForward, load_balance


def _moe(seed=0, **kw) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(16, 24, MoEConfig(**{"experts": 4, "top_k": 2, **kw}))
    with torch.no_grad():
        for w in (layer.gate, layer.up, layer.down):
            w.normal_(0, 0.3)
        layer.router.weight.normal_(0, 1.0)
    return layer


def _per_token_reference(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Each token through its own top-k experts, one at a time: what the grouped computation must equal."""
    out = torch.zeros_like(x)
    for t in range(x.size(0)):
        probs = torch.softmax(layer.router(x[t]), -1)
        w, e = probs.topk(layer.cfg.top_k)
        if layer.cfg.norm_topk_prob:
            w = w / w.sum()
        for wi, ei in zip(w, e):
            h = x[t]
            out[t] += wi * F.linear(F.silu(F.linear(h, layer.gate[ei])) * F.linear(h, layer.up[ei]), layer.down[ei])
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_grouped_experts_equal_the_per_token_reference(norm):
    layer = _moe(norm_topk_prob=norm)
    x = torch.randn(3, 7, 16)
    got = layer(x)
    assert got.shape == x.shape
    assert torch.allclose(got.reshape(-1, 16), _per_token_reference(layer, x.reshape(-1, 16)), atol=1e-5)
    assert layer.stats["dropped"] == 0 and sum(layer.stats["load"]) == pytest.approx(1.0)


def test_capacity_drops_the_assignments_past_it_in_token_order():
    layer = _moe(capacity_factor=0.5)
    x = torch.randn(20, 16)
    with torch.no_grad():
        _, _, weights, experts = layer.route(x)
    cap = math.ceil(0.5 * 20 * 2 / 4)
    counts = torch.bincount(experts.reshape(-1), minlength=4)
    assert layer(x) is not None and layer.stats["dropped"] == int((counts - counts.clamp(max=cap)).sum()) > 0
    # reference: per expert, only its first `cap` assignments (token order) contribute
    want = torch.zeros_like(x)
    seen = [0] * 4
    for t in range(20):
        for j in range(2):
            e = int(experts[t, j])
            seen[e] += 1
            if seen[e] <= cap:
                h = x[t]
                want[t] += weights[t, j] * F.linear(F.silu(F.linear(h, layer.gate[e])) * F.linear(h, layer.up[e]),
                                                    layer.down[e])
    assert torch.allclose(layer(x), want, atol=1e-5)


def test_router_losses_are_the_closed_forms():
    layer = _moe(router_aux_loss=1.0, router_z_loss=0.0)
    x = torch.randn(10, 16)
    layer(x)
    logits = layer.router(x)
    probs = torch.softmax(logits, -1)
    f = torch.bincount(probs.topk(2).indices.reshape(-1), minlength=4).float() / 20
    assert layer.aux_loss.item() == pytest.approx(4 * (f * probs.mean(0)).sum().item(), rel=1e-5)
    z = _moe(router_aux_loss=0.0, router_z_loss=1.0)
    z(x)
    assert z.aux_loss.item() == pytest.approx(torch.logsumexp(z.router(x), -1).pow(2).mean().item(), rel=1e-5)


def test_balance_loss_is_one_for_a_uniform_router_and_larger_when_routing_concentrates():
    layer = _moe(router_aux_loss=1.0, router_z_loss=0.0, top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
    x = torch.randn(16, 16)
    layer(x)
    assert layer.aux_loss.item() == pytest.approx(1.0)  # P uniform: E * sum f_e / E
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 5 * x.mean(0) / x.mean(0).norm() ** 2  # expert 2 favoured by most tokens
    layer(x)
    assert layer.aux_loss.item() > 1.2 and load_balance(layer.stats["load"]) > 0.5


def test_shared_experts_add_a_dense_mlp_every_token_sees():
    layer = _moe(shared_experts=1, shared_gate=True)
    x = torch.randn(5, 16)
    routed = _per_token_reference(layer, x)
    shared = torch.sigmoid(layer.shared_gate(x)) * layer.shared(x)
    assert torch.allclose(layer(x), routed + shared, atol=1e-5)


def _moe_decoder(seed=0, model_kw=None, **moe) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(**{"vocab_size": 96, "block_size": 64, "n_layer": 2, "d_model": 32, "n_head": 4,
                           "n_kv_head": 2, "positions": "rope", "norm": "rmsnorm", "activation": "swiglu",
                           "moe": {"experts": 4, "top_k": 2, **moe}, **(model_kw or {})})
    return Decoder(cfg)


def test_active_parameters_and_flops_count_top_k_experts():
    moe = _moe_decoder()
    per_expert = 3 * 32 * moe.config.d_ff  # gate, up, down of one expert
    assert moe.num_params() - moe.num_active_params() == 2 * (4 - 2) * per_expert  # 2 layers, 2 idle experts
    dense_cfg = DecoderConfig(**{**moe.config.__dict__, "moe": None, "d_ff": 2 * moe.config.d_ff})
    torch.manual_seed(0)
    dense = Decoder(dense_cfg)
    routers = 2 * 4 * 32
    assert moe.num_active_params() == dense.num_active_params() + routers
    assert moe.flops_per_token() - dense.flops_per_token() == 6 * routers


def test_training_adds_the_router_losses_and_evaluation_does_not():
    model = _moe_decoder(router_aux_loss=0.5)
    idx = torch.randint(0, 96, (2, 12))
    model.train()
    train_loss = model(idx, idx)[1]
    aux = sum(b.mlp.aux_loss for b in model.blocks)
    model.eval()
    eval_loss = model(idx, idx)[1]
    assert train_loss.item() == pytest.approx(eval_loss.item() + aux.item(), rel=1e-5)
    model.train()
    chunked = model(idx, idx, return_logits=False)[1]
    assert chunked.item() == pytest.approx(train_loss.item(), rel=1e-5)


def test_a_moe_decoder_learns_and_round_trips_through_a_model_dir(tmp_path):
    from llmkit.models.io import load_model, save_model

    model = _moe_decoder()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    first = model(idx, idx)[1].item()
    for _ in range(30):
        loss = model(idx, idx)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0  # the router learns
    model.eval()
    back = load_model(save_model(model, tmp_path / "moe"))
    assert isinstance(back.config.moe, MoEConfig) and back.config.moe.experts == 4
    assert torch.equal(back(idx)[0], model(idx)[0])


def test_the_engine_decodes_a_moe_model_like_its_own_forward():
    from llmkit.infer.engine import Engine, RequestParams

    model = _moe_decoder(seed=3).eval()
    with torch.no_grad():
        for b in model.blocks:
            for w in (b.mlp.gate, b.mlp.up, b.mlp.down):
                w.normal_(0, 0.3)
    prompts = [[5, 6, 7], [9, 1, 2, 3, 4, 8, 8], [42]]
    params = RequestParams(max_new_tokens=8, temperature=0, stop_at_eos=False)
    engine = Engine(model, max_batch=3)
    assert engine.fused is None and "mixture-of-experts" in engine.fused_unavailable
    got = engine.generate(prompts, params)
    for prompt, out in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        assert out == ids[len(prompt):]


def test_bad_moe_settings_are_named():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(experts=2, top_k=3).validate()
    with pytest.raises(ValueError, match="swiglu"):
        Decoder(DecoderConfig(vocab_size=10, block_size=8, n_layer=1, d_model=8, n_head=2, activation="gelu",
                              moe={"experts": 2}))
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(capacity_factor=0).validate()


# -- Hugging Face mixture-of-experts checkpoints -----------------------------------------------------------
MOE_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, vocab_size=96, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                 pad_token_id=0)


def _hf_moe(name: str, **extra):
    transformers = pytest.importorskip("transformers")
    from test_hf_architectures import randomize

    if name == "mixtral":
        cfg = transformers.MixtralConfig(**MOE_SMALL, num_local_experts=4, num_experts_per_tok=2, sliding_window=8)
    elif name.startswith("qwen2-moe"):
        cfg = transformers.Qwen2MoeConfig(**MOE_SMALL, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=48, shared_expert_intermediate_size=80,
                                          norm_topk_prob=name.endswith("norm"))
    else:  # qwen3-moe: head_dim != hidden_size / heads; the -norm variant also slides an 8-token window
        norm = name.endswith("norm")
        cfg = transformers.Qwen3MoeConfig(**{**MOE_SMALL, "num_experts": 4, "num_experts_per_tok": 2,
                                             "moe_intermediate_size": 48, "head_dim": 24, "norm_topk_prob": norm,
                                             "use_sliding_window": norm, "sliding_window": 8, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    randomize(model)
    return model


@pytest.mark.parametrize("name, arch", [("mixtral", "MixtralForCausalLM"), ("qwen2-moe", "Qwen2MoeForCausalLM"),
                                        ("qwen2-moe-norm", "Qwen2MoeForCausalLM"),
                                        ("qwen3-moe", "Qwen3MoeForCausalLM"),
                                        ("qwen3-moe-norm", "Qwen3MoeForCausalLM")])
def test_hf_moe_checkpoints_import_with_equal_logits_and_decode_in_the_engine(name, arch, tmp_path):
    from llmkit.infer.engine import Engine, RequestParams
    from llmkit.models.hf import import_hf

    hf = _hf_moe(name)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="tokenizer"):
        model = import_hf(tmp_path / "hf", tmp_path / "ours")
    assert model.config.hf_architecture == arch and model.config.moe.experts == 4
    assert model.config.moe.norm_topk_prob == (name == "mixtral" or name.endswith("norm"))
    assert model.config.qk_norm == (arch == "Qwen3MoeForCausalLM")
    assert model.config.sliding_window == (8 if name in ("mixtral", "qwen3-moe-norm") else None)
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4, diff
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = RequestParams(max_new_tokens=6, temperature=0, stop_at_eos=False)
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert Engine(model, max_batch=2).generate(prompts, params) == want
    # export: transformers loads the same architecture with the same logits
    from llmkit.models.hf import export_hf

    transformers = pytest.importorskip("transformers")
    back = transformers.AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "ours", tmp_path / "back"),
                                                             attn_implementation="eager")
    assert type(back).__name__ == arch
    with torch.no_grad():
        assert (model(idx)[0] - back(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model_kw, moe, arch", [
    ({}, {}, "MixtralForCausalLM"),
    ({"sliding_window": 5}, {}, "MixtralForCausalLM"),
    ({"qkv_bias": True}, {"shared_experts": 1, "shared_gate": True, "expert_d_ff": 24}, "Qwen2MoeForCausalLM"),
    ({"qk_norm": True, "head_dim": 16}, {"norm_topk_prob": False, "expert_d_ff": 40}, "Qwen3MoeForCausalLM"),
    ({"qk_norm": True, "sliding_window": 5}, {}, "Qwen3MoeForCausalLM"),
])
def test_a_native_moe_model_exports_as_the_architecture_that_expresses_it(model_kw, moe, arch, tmp_path):
    """Shared experts or q/k/v biases -> Qwen2-MoE, else q/k norms -> Qwen3-MoE, else Mixtral (docs/moe.md)."""
    from llmkit.models.hf import export_hf
    from llmkit.models.io import save_model
    from test_hf_architectures import randomize

    transformers = pytest.importorskip("transformers")
    model = _moe_decoder(seed=5, model_kw=model_kw, **moe).eval()
    randomize(model)  # q/k norms away from 1, so a misplaced norm changes the logits
    out = export_hf(save_model(model, tmp_path / "ours"), tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(back).__name__ == arch
    idx = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(idx)[0] - back(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model_kw, moe, field", [
    ({}, {"capacity_factor": 1.0}, "moe.capacity_factor"),
    ({"qk_norm": True}, {"shared_experts": 1, "shared_gate": True}, "qk_norm"),  # Qwen2-MoE has no q/k norms
    ({"qkv_bias": True}, {}, "moe.shared_experts"),  # Qwen2-MoE always has a gated shared expert
    ({"qk_norm": True, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]}, {},
     "layer_types"),  # Qwen3-MoE's window covers every layer
    ({}, {"norm_topk_prob": False}, "moe.norm_topk_prob"),  # Mixtral always renormalises
])
def test_a_native_moe_model_no_architecture_expresses_is_refused_by_name(model_kw, moe, field, tmp_path):
    from llmkit.models.hf import export_hf

    with pytest.raises(ValueError, match=f"^{field}"):
        export_hf(_moe_decoder(model_kw=model_kw, **moe), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("extra, field", [({"mlp_only_layers": [1]}, "mlp_only_layers"),
                                          ({"mlp_only_layers": [0]}, "mlp_only_layers"),
                                          ({"decoder_sparse_step": 2}, "decoder_sparse_step")])
def test_qwen3_moe_with_dense_layers_is_refused_naming_the_setting(extra, field, tmp_path):
    # transformers builds those layers as dense MLPs; llmkit's MoE decoder has experts in every layer
    from llmkit.models.hf import import_hf

    hf = _hf_moe("qwen3-moe", **extra)
    assert any(not hasattr(layer.mlp, "experts") for layer in hf.model.layers)  # really a mixed checkpoint
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=f"^{field}: .*dense MLP"):
        import_hf(tmp_path / "hf")


def test_qwen3_moe_imports_from_the_fused_layout_and_the_hub_config_spelling():
    """transformers 5 holds Qwen3-MoE experts fused (gate_up_proj, down_proj) in memory and writes them per
    expert; its config.json says num_local_experts, the hub's num_experts. The save_pretrained test covers
    per-expert files with num_local_experts; this one the fused tensors with num_experts."""
    from llmkit.models.hf import decoder_from_hf

    hf = _hf_moe("qwen3-moe-norm")
    sd = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    config = hf.config.to_dict()
    config["num_experts"] = config.pop("num_local_experts")
    model = decoder_from_hf(config, sd)
    assert model.config.moe.experts == 4 and model.config.moe.expert_d_ff == 48
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max() <= 1e-4


def test_per_expert_checkpoints_of_older_transformers_import_too(tmp_path):
    """Mixtral files written before transformers 5 hold one Linear per expert (w1 gate, w3 up, w2 down)."""
    from llmkit.models.hf import decoder_from_hf

    hf = _hf_moe("mixtral")
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    for i in range(2):
        h = f"model.layers.{i}."
        gate, up = sd.pop(h + "mlp.experts.gate_up_proj").chunk(2, dim=1)
        down = sd.pop(h + "mlp.experts.down_proj")
        sd[h + "block_sparse_moe.gate.weight"] = sd.pop(h + "mlp.gate.weight")
        for j in range(4):
            e = h + f"block_sparse_moe.experts.{j}."
            sd[e + "w1.weight"], sd[e + "w3.weight"], sd[e + "w2.weight"] = gate[j], up[j], down[j]
    model = decoder_from_hf(hf.config.to_dict(), sd)
    idx = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max() <= 1e-4
