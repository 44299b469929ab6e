"""LoRA (llmkit.models.lora) and adapter dispatch (llmkit.models.adapters) on every family.

Behaviour checked: a fresh adapter is the identity, only adapter parameters train (and a few steps
reduce the loss), dropout acts only in training, merge / unmerge and save / load are exact, target names
resolve (HF names, aliases, all-linear, re:) with errors that name the bad target, GQA slices have the
right sizes, and the encoder / encoder-decoder families work like the decoder.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import llmkit.models as llmkit_models
from llmkit.config import load_config
from llmkit.models.adapters import (
    adapter_base_model,
    adapter_kind,
    is_adapter_dir,
    load_adapter,
    save_adapter,
)
from llmkit.models.decoder import Decoder, DecoderConfig, KVCache
from llmkit.models.encdec import EncDecConfig, EncoderDecoder
from llmkit.models.encoder import Encoder, EncoderClassifier, EncoderConfig
from llmkit.models.io import load_model, save_model
from llmkit.models.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    available_targets,
    has_lora,
    lora_parameters,
    merge_lora,
    trainable_share,
    unmerge_lora,
)
from llmkit.models.lora_peft import load_lora, save_lora

V = 61


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These matrices are tiny: a second thread only adds synchronisation, which on a loaded 2-core
    # machine made each matmul ~100x slower. Restored afterwards for the other test modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def llama(**kw) -> Decoder:
    cfg = dict(vocab_size=V, block_size=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64,
               activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=False)
    cfg.update(kw)
    return Decoder(DecoderConfig(**cfg))


def gpt2(**kw) -> Decoder:
    return Decoder(DecoderConfig(vocab_size=V, block_size=32, n_layer=2, d_model=32, n_head=4, **kw))


def bert() -> Encoder:
    return Encoder(EncoderConfig(vocab_size=V, block_size=32, n_layer=2, d_model=32, n_head=4, dropout=0.0))


def bert_cls() -> EncoderClassifier:
    return EncoderClassifier(EncoderConfig(vocab_size=V, block_size=32, n_layer=2, d_model=32, n_head=4,
                                           dropout=0.0, n_labels=3))


def t5(activation: str = "gated-gelu") -> EncoderDecoder:
    return EncoderDecoder(EncDecConfig(vocab_size=V, n_layer=2, d_model=32, n_head=4, d_kv=8, d_ff=64,
                                       activation=activation, dropout=0.0, tie_embeddings=False))


FAMILIES = {"llama": llama, "gpt2": gpt2, "bert": bert, "bert_cls": bert_cls, "t5": t5}


def ids(B: int = 2, T: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The family's main output for input ids x."""
    if isinstance(model, EncoderDecoder):
        return model(x, decoder_input_ids=x[:, :7])[0]
    return model(x)[0]


def perturb(model: nn.Module, std: float = 0.3, seed: int = 1) -> None:
    """Stand-in for training: nonzero A and B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(std * torch.randn(p.shape, generator=g))


def pretrained_like(model: nn.Module, std: float = 0.15, seed: int = 0) -> nn.Module:
    """Re-draw the base weights at a scale where the model's outputs depend on them (fresh inits are
    so small that an adapter on top learns slowly), as a trained checkpoint would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else std * noise)
    return model


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


# -- identity at init, freezing, trainable share ----------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fresh_adapter_changes_nothing(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    x = ids()
    with torch.no_grad():
        before = run(model, x)
    wrapped = apply_lora(model, LoRAConfig(r=4, targets=["all-linear"]))
    assert wrapped and all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    with torch.no_grad():
        assert torch.equal(run(model, x), before)  # B = 0 exactly
    # A is Kaiming-uniform (nonzero), B zero: the first gradient step reaches B
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_lora_parameters_train(family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    apply_lora(model, LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {n for n in trainable if n.startswith(("pooler.", "classifier."))}
    assert trainable - heads == {n for n, _ in model.named_parameters() if ".lora_" in n}
    # a classifier's fresh head trains in full (modules_to_save); no other family has one
    assert heads == ({"pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias"}
                     if family == "bert_cls" else set())
    ids_in_lora = {id(p) for p in lora_parameters(model)}
    assert ids_in_lora == {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    # backward leaves every frozen parameter without a gradient
    perturb(model)
    run(model, ids()).float().pow(2).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_trainable_share_matches_the_count():
    """r * (in + out) per adapted slice: q (d_model rows) and v (kv_dim rows) on every layer."""
    model = llama(n_layer=3, d_model=64, n_head=4, n_kv_head=1)
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoRAConfig(r=8, targets=["q_proj", "v_proj"]))
    C, kv = 64, 16
    expected = 3 * (8 * (C + C) + 8 * (C + kv))
    n_train, n_all, share = trainable_share(model)
    assert n_train == expected and n_all == total + expected
    assert share == pytest.approx(expected / (total + expected))


def test_trainable_share_on_meta_gpt2_small_is_in_the_guides_range():
    """GPT-2-small-sized decoder (12 x 768, vocab 32000), r=16 on q and v: about half a percent."""
    with torch.device("meta"):
        model = Decoder(DecoderConfig(vocab_size=32000, block_size=1024, n_layer=12, d_model=768))
        apply_lora(model, LoRAConfig(r=16, targets=["q_proj", "v_proj"]))
    n_train, _, share = trainable_share(model)
    assert n_train == 12 * 2 * 16 * (768 + 768)
    assert 0.005 <= share <= 0.02


def test_config_loads_from_yaml_and_validates(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("r: 8\nalpha: 16\ntargets: [query, value]\nrslora: true\n")
    cfg = load_config(LoRAConfig, path, ["dropout=0.05"])
    assert (cfg.r, cfg.alpha, cfg.targets) == (8, 16.0, ["query", "value"])
    assert cfg.rslora is True and cfg.dropout == 0.05
    assert cfg.scaling == pytest.approx(16 / 8 ** 0.5)
    assert LoRAConfig().scaling == 2.0  # alpha 32 / r 16 (guide §3.2)
    for bad, field in ((dict(r=0), "r:"), (dict(dropout=1.0), "dropout:"), (dict(targets=[]), "targets:"),
                       (dict(targets=["re:("]), "targets:"), (dict(alpha=0), "alpha:")):
        with pytest.raises(ValueError, match=field):
            LoRAConfig(**bad).validate()


# -- forward behaviour ------------------------------------------------------------------------------


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = llama()
    apply_lora(model, LoRAConfig(r=4, dropout=0.5, targets=["all-linear"]))
    perturb(model)
    x = ids()
    model.train()
    a, b = run(model, x), run(model, x)
    assert not torch.allclose(a, b)  # different dropout masks on the adapter input
    model.eval()
    with torch.no_grad():
        assert torch.equal(run(model, x), run(model, x))
    # the frozen path never sees the adapter's dropout: with B = 0 training mode is deterministic
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    model.train()
    assert torch.equal(run(model, x), run(model, x))


def test_wrapping_an_eval_model_keeps_it_in_eval():
    model = llama().eval()
    apply_lora(model, LoRAConfig(r=4, dropout=0.5))
    assert not any(m.training for m in model.modules())


def test_a_few_optimizer_steps_reduce_the_loss_and_leave_the_base_alone():
    torch.manual_seed(0)
    model = pretrained_like(llama())
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["all-linear"]))
    frozen = base_state(model)
    x = ids(B=4, T=16, seed=3)
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for k, v in base_state(model).items():
        assert torch.equal(v, frozen[k]), k


def test_kv_cached_decoding_equals_full_forward_with_lora():
    torch.manual_seed(0)
    model = llama().eval()
    apply_lora(model, LoRAConfig(r=4, targets=["all-linear"]))
    perturb(model)
    x = ids(B=2, T=10)
    with torch.no_grad():
        full = model(x)[0]
        cache = KVCache(model.config, batch_size=2)
        model(x[:, :6], cache=cache)
        steps = [model(x[:, t:t + 1], cache=cache)[0] for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 6:], rtol=0, atol=1e-5)


def test_bf16_base_keeps_fp32_adapter():
    model = llama().to(torch.bfloat16).eval()
    apply_lora(model, LoRAConfig(r=4))
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert run(model, ids()).dtype == torch.bfloat16


# -- merge ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_equals_unmerged_forward_and_saves_a_plain_model(family, tmp_path):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    apply_lora(model, LoRAConfig(r=4, targets=["all-linear"], rslora=True))
    perturb(model)
    x = ids()
    with torch.no_grad():
        adapted = run(model, x)
    merge_lora(model)
    assert not has_lora(model) and not hasattr(model, "lora_config")
    assert not any(".lora_" in k or ".base." in k for k in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():  # fp32 rounding of W + s B A vs W x + s B (A x): relative 1e-6 or so
        torch.testing.assert_close(run(model, x), adapted, rtol=1e-4, atol=1e-5)
    # a plain model directory: load_model reads it without knowing about LoRA
    save_model(model, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(run(load_model(tmp_path / "merged"), x), run(model, x), rtol=0, atol=0)


def test_unmerge_restores_the_base_weights():
    torch.manual_seed(0)
    model = gpt2(bias=True).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=4, targets=["q_proj", "v_proj", "c_fc"]))
    perturb(model)
    x = ids()
    with torch.no_grad():
        adapted = run(model, x)
    merge_lora(model, keep_adapters=True)
    qkv = model.blocks[0].attn.qkv
    assert qkv.merged and has_lora(model)
    # the merged weight changed exactly in the q and v rows, not in the k rows
    w0 = before["blocks.0.attn.qkv.weight"]
    assert not torch.allclose(qkv.weight[:32], w0[:32]) and torch.equal(qkv.weight[32:64], w0[32:64])
    with torch.no_grad():
        torch.testing.assert_close(run(model, x), adapted, rtol=0, atol=1e-5)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, before[k.replace(".base.", ".")], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(run(model, x), adapted, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="merged"):
        merge_lora(model, keep_adapters=True)
        save_lora(model, "/nonexistent/never-written")


# -- save / load ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all-linear"], ["c_attn", "o_proj"]])
def test_save_load_round_trip_is_exact(family, targets, tmp_path):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    base = base_state(model)
    apply_lora(model, LoRAConfig(r=4, alpha=12, targets=targets))
    perturb(model)
    with torch.no_grad():
        for p in (*model.pooler.parameters(), *model.classifier.parameters()) if family == "bert_cls" else ():
            p.add_(1.0)  # a trained head travels with the adapter
    x = ids()
    with torch.no_grad():
        adapted = run(model, x)
    out = save_lora(model, tmp_path / "a", base_model="some/base")
    assert is_adapter_dir(out) and adapter_kind(out) == "lora" and adapter_base_model(out) == "some/base"
    fresh = FAMILIES[family]().eval()
    fresh.load_state_dict({k: v for k, v in base.items()})
    load_adapter(fresh, out)
    with torch.no_grad():
        assert torch.equal(run(fresh, x), adapted)
    # the same modules and slices come back, and re-saving writes the same tensors
    assert {n: m.ranges for n, m in fresh.named_modules() if isinstance(m, LoRALinear)} == \
        {n: m.ranges for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    save_adapter(fresh, tmp_path / "b")
    first = load_file(out / "adapter_model.safetensors")
    second = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert fresh.lora_config.targets == targets and fresh.lora_config.r == 4


def test_saved_keys_use_hf_names_and_gqa_slice_sizes(tmp_path):
    model = llama(n_layer=1, d_model=32, n_head=4, n_kv_head=1)
    apply_lora(model, LoRAConfig(r=2, targets=["q_proj", "k_proj", "v_proj"]))
    qkv = model.blocks[0].attn.qkv
    assert qkv.ranges == {"q": (0, 32), "k": (32, 40), "v": (40, 48)}  # one kv head of 8
    assert [tuple(qkv.lora_B[n].shape) for n in "qkv"] == [(32, 2), (8, 2), (8, 2)]
    assert all(tuple(qkv.lora_A[n].shape) == (2, 32) for n in "qkv")
    tensors = load_file(save_lora(model, tmp_path) / "adapter_model.safetensors")
    p = "base_model.model.model.layers.0.self_attn."
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        p + "q_proj.lora_A.weight": (2, 32), p + "q_proj.lora_B.weight": (32, 2),
        p + "k_proj.lora_A.weight": (2, 32), p + "k_proj.lora_B.weight": (8, 2),
        p + "v_proj.lora_A.weight": (2, 32), p + "v_proj.lora_B.weight": (8, 2)}
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == ["k_proj", "q_proj", "v_proj"] and cfg["rank_pattern"] == {}


def test_hf_names_of_bert_and_t5(tmp_path):
    model = t5("relu")
    apply_lora(model, LoRAConfig(r=2, targets=["q", "wi"]))  # T5 names: self- and cross-attention q, relu wi
    keys = set(load_file(save_lora(model, tmp_path / "t5") / "adapter_model.safetensors"))
    assert "base_model.model.encoder.block.1.layer.0.SelfAttention.q.lora_A.weight" in keys
    assert "base_model.model.decoder.block.0.layer.1.EncDecAttention.q.lora_B.weight" in keys
    assert "base_model.model.decoder.block.1.layer.2.DenseReluDense.wi.lora_A.weight" in keys
    assert len(keys) == 2 * (2 * 2 + 2 * 3)  # A and B; encoder q + wi, decoder self q + cross q + wi
    enc = bert_cls()
    apply_lora(enc, LoRAConfig(r=2, targets=["value"]))
    keys = set(load_file(save_lora(enc, tmp_path / "bert") / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.bert.encoder.layer.{i}.attention.self.value.lora_{ab}.weight"
                    for i in range(2) for ab in "AB"} | {
        "base_model.model.bert.pooler.dense.weight", "base_model.model.bert.pooler.dense.bias",
        "base_model.model.classifier.weight", "base_model.model.classifier.bias"}


def test_load_refuses_an_adapter_for_another_model(tmp_path):
    model = llama()
    apply_lora(model, LoRAConfig(r=2))
    save_lora(model, tmp_path)
    for other in (llama(n_layer=1), gpt2()):  # fewer layers; GPT-2 names instead of Llama's
        with pytest.raises(ValueError, match="does not exist"):
            load_lora(other, tmp_path)
    with pytest.raises(ValueError, match="A \\(2, 32\\)"):  # wider model: shapes disagree
        load_lora(llama(d_model=64, n_head=4, n_kv_head=2), tmp_path)
    with pytest.raises(ValueError, match="already carries"):
        load_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_lora(llama(), tmp_path)


# -- target names -----------------------------------------------------------------------------------


def test_unknown_target_names_the_target_and_the_choices():
    with pytest.raises(ValueError, match=r"'q_porj'.*available: q_proj, k_proj, v_proj, o_proj"):
        apply_lora(llama(), LoRAConfig(targets=["q_porj"]))
    # a real name this family lacks: GPT-2-style blocks have no gate
    with pytest.raises(ValueError, match=r"'gate_proj' matches no layer.*available here: q_proj"):
        apply_lora(gpt2(), LoRAConfig(targets=["gate_proj"]))
    with pytest.raises(ValueError, match=r"matches no module path.*paths look like: blocks\.0\.attn\.qkv,"):
        apply_lora(gpt2(), LoRAConfig(targets=[r"re:blocks\.9\..*"]))
    with pytest.raises(ValueError, match="both whole and as slices"):
        apply_lora(gpt2(), LoRAConfig(targets=["c_attn", "q_proj"]))
    model = llama()
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already carries"):
        apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="modules_to_save: 'lm_head'"):
        apply_lora(llama(), LoRAConfig(modules_to_save=["lm_head"]))


def test_aliases_all_linear_and_regex_select_the_right_slices():
    m = bert()
    apply_lora(m, LoRAConfig(r=2, targets=["query", "value", "dense"]))
    assert m.blocks[0].attn.qkv.ranges == {"q": (0, 32), "v": (64, 96)}
    assert {n for n, x in m.named_modules() if isinstance(x, LoRALinear)} == {
        f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")}
    assert not isinstance(m.mlm_head.dense, LoRALinear)  # heads are never adapted
    m = t5()
    wrapped = apply_lora(m, LoRAConfig(r=2, targets=["all-linear"]))
    per_enc, per_dec = 2 + 3, 2 + 3 + 3  # qkv, proj, mlp x3 | self qkv, proj, cross q, kv, proj, mlp x3
    assert len(wrapped) == 2 * per_enc + 2 * per_dec
    assert m.decoder.blocks[1].cross_attn.kv.ranges == {"k": (0, 32), "v": (32, 64)}
    assert not isinstance(m.lm_head, LoRALinear)
    m = llama()
    targets = [r"re:blocks\.0\.attn\.qkv\.v", r"re:blocks\.1\.mlp\.up"]
    wrapped = apply_lora(m, LoRAConfig(r=2, targets=targets))
    assert wrapped == ["blocks.0.attn.qkv", "blocks.1.mlp.up"]
    assert list(m.blocks[0].attn.qkv.ranges) == ["v"] and list(m.blocks[1].mlp.up.ranges) == ["full"]
    assert "c_attn" in available_targets(m) and "wi_0" in available_targets(m)


# -- families -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "bert_cls", "t5"])
def test_encoder_and_encoder_decoder_train_with_lora(family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    if family != "t5":  # T5's own init is already unit-scale
        pretrained_like(model)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["all-linear"]))
    x = ids(B=4, T=12, seed=5)
    if family == "bert":
        def loss_fn():
            return model(x, labels=x)[1]
    elif family == "bert_cls":
        labels = torch.tensor([0, 1, 2, 1])

        def loss_fn():
            return model(x, labels=labels)[1]
    else:
        def loss_fn():
            return model(x, labels=x[:, :7])[1]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    first = loss_fn().item()
    for _ in range(20):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.8 * first


# -- adapters.py dispatch -----------------------------------------------------------------------------


def test_adapter_dispatch_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="carries no adapter"):
        save_adapter(llama(), tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        adapter_kind(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="'IA3' is not supported"):
        load_adapter(llama(), tmp_path)
    # a prefix adapter when llmkit.models.prefix is absent: the error names the missing module
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    assert adapter_kind(tmp_path) == "prefix"
    monkeypatch.setitem(sys.modules, "llmkit.models.prefix", None)
    monkeypatch.delattr(llmkit_models, "prefix", raising=False)
    with pytest.raises(ModuleNotFoundError, match="llmkit.models.prefix"):
        load_adapter(llama(), tmp_path)
    # ... while LoRA saving still works without it
    model = llama()
    apply_lora(model, LoRAConfig(r=2))
    assert adapter_kind(save_adapter(model, tmp_path / "lora")) == "lora"


def test_adapter_dispatch_reaches_prefix_tuning(tmp_path):
    prefix = pytest.importorskip("llmkit.models.prefix", reason="llmkit.models.prefix is not installed")
    torch.manual_seed(0)
    model = llama().eval()
    prefix.apply_prefix(model, prefix.PrefixConfig(num_virtual_tokens=4, projection=False))
    out = save_adapter(model, tmp_path / "p", base_model="base")
    assert adapter_kind(out) == "prefix" and adapter_base_model(out) == "base"
    fresh = llama().eval()
    fresh.load_state_dict(base_state(model), strict=False)
    load_adapter(fresh, out)
    assert prefix.prefix_parameters(fresh) and not has_lora(fresh)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, x), run(model, x), rtol=0, atol=1e-5)
    both = llama()
    apply_lora(both, LoRAConfig(r=2))
    prefix.apply_prefix(both, prefix.PrefixConfig(num_virtual_tokens=4, projection=False))
    with pytest.raises(ValueError, match="both LoRA and prefix"):
        save_adapter(both, tmp_path / "both")
