"""CPU decode kernels (llmkit.infer.kernels), group-wise INT4 / INT8 layers (llmkit.infer.weight_only), GGUF
Q4_0 / Q8_0 tensors loaded as they are, and the fp32 `KernelLinear` the engine decodes with."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn as nn
from gguf import GGMLQuantizationType as Q

from llmkit.cli import main
from llmkit.infer import kernels
from llmkit.infer.engine import Engine, RequestParams
from llmkit.infer.gguf_quantized import load_gguf_quantized
from llmkit.infer.kernels.linear import KernelLinear, use_decode_kernels
from llmkit.infer.quantize import (
    Int8Linear,
    QuantConfig,
    linear_weight_bytes,
    load_quantized,
    quantize_model,
    save_quantized,
)
from llmkit.infer.weight_only import WeightOnlyLinear, quantize_groups
from llmkit.models.decoder import Decoder, DecoderConfig
from llmkit.models.gguf import export_gguf, import_gguf
from llmkit.models.io import save_model
from llmkit.tokenizer import train_bpe


def test_kernels_build_here():
    """The setup provides a C compiler; without the kernels every decode falls back to the slow paths."""
    assert kernels.available(), kernels.why_not()


def _q8_reference(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: int8 per block of 32, times the block scale (fp32)."""
    xq, dx = kernels.quantize_rows_q8(x)
    return (xq.float().view(x.size(0), -1, 32) * dx[..., None]).view_as(x)


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("N, K", [(7, 45), (96, 64), (200, 576)])
def test_f32_kernel_is_the_matrix_product(M, N, K):
    torch.manual_seed(M * N + K)
    x, w = torch.randn(M, K), torch.randn(N, K)
    assert torch.allclose(kernels.linear_f32(x, w), x @ w.T, atol=1e-4, rtol=1e-4)


def test_activation_blocks_round_to_nearest_within_half_a_step():
    x = torch.randn(5, 96) * torch.tensor([0.01, 1.0, 100.0]).repeat_interleave(32)
    xq, dx = kernels.quantize_rows_q8(x)
    assert xq.abs().max() == 127  # each block's largest value lands on +-127
    err = (_q8_reference(x) - x).abs().view(5, 3, 32)
    assert (err <= dx[..., None] / 2 + 1e-7).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 2, 5])
def test_quantized_kernels_compute_exactly_on_the_quantized_operands(bits, group, M):
    """Integer accumulation is exact: the kernel equals (quantized x) @ (dequantized W).T up to fp32 rounding
    of the per-block sums. An odd number of output rows: the kernels take rows in pairs."""
    torch.manual_seed(bits + group + M)
    N, K = 73, 256
    q, s = quantize_groups(torch.randn(N, K), bits, group)
    w = kernels.dequantize_q4(q, s) if bits == 4 else kernels.dequantize_q8(q, s)
    x = torch.randn(M, K)
    y = (kernels.linear_q4 if bits == 4 else kernels.linear_q8)(x, q, s)
    want = _q8_reference(x) @ w.T
    assert torch.allclose(y, want, atol=1e-4 * want.abs().max().item(), rtol=1e-5)
    assert (y - x @ w.T).abs().max() < 0.02 * (x @ w.T).abs().max()  # and close to the fp32 activations


@pytest.mark.parametrize("bits, ggml", [(4, Q.Q4_0), (8, Q.Q8_0)])
def test_quantization_is_ggml_reference_byte_for_byte(bits, ggml):
    """Our rounding and block layout are llama.cpp's: the gguf package's own Q4_0 / Q8_0 encoder (a port of
    ggml-quants.c) produces the same codes, and our dequantization equals its dequantization."""
    torch.manual_seed(bits)
    w = torch.randn(16, 128) * torch.linspace(0.1, 3.0, 16)[:, None]
    raw = gguf.quants.quantize(w.numpy(), ggml)  # (16, 4 blocks x bytes per block) uint8
    ours = WeightOnlyLinear.from_gguf_blocks(raw, int(ggml), 16, 128)
    fresh = WeightOnlyLinear.from_linear(nn.Linear(128, 16, bias=False).requires_grad_(False), bits, 32)
    fresh.qweight.copy_(quantize_groups(w, bits, 32)[0])
    fresh.scales.copy_(quantize_groups(w, bits, 32)[1])
    assert torch.equal(ours.qweight, fresh.qweight)
    assert torch.allclose(ours.scales, fresh.scales, rtol=1e-3)  # GGUF keeps fp16 scales
    back = torch.from_numpy(gguf.quants.dequantize(raw, ggml).reshape(16, 128))
    assert torch.allclose(ours.dequantized_weight(), back, atol=1e-6)


def test_group_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="group_size 48"):
        quantize_groups(torch.randn(4, 96), 4, 48)
    with pytest.raises(ValueError, match="in_features 80"):
        WeightOnlyLinear(80, 4, False, 4, 32)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_group_that_does_not_divide_the_width_leaves_a_short_last_group(bits):
    """g = 128 on a 576-wide layer (SmolLM2): groups of 128 and a last one of 64, each quantized on its own."""
    torch.manual_seed(bits)
    w = torch.randn(6, 576)
    q, s = quantize_groups(w, bits, 128)
    assert s.shape == (6, 5)
    deq = (kernels.dequantize_q4 if bits == 4 else kernels.dequantize_q8)(q, s, 128)
    tail_q, tail_s = quantize_groups(w[:, 512:], bits, 64)  # the short group alone
    tail = (kernels.dequantize_q4 if bits == 4 else kernels.dequantize_q8)(tail_q, tail_s)
    assert torch.equal(deq[:, 512:], tail)
    x = torch.randn(2, 576)
    y = (kernels.linear_q4 if bits == 4 else kernels.linear_q8)(x, q, s, 128)
    assert torch.allclose(y, _q8_reference(x) @ deq.T, atol=1e-4)


def test_weight_only_layer_switches_to_the_matrix_product_for_long_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(128, 40)
    layer = WeightOnlyLinear.from_linear(lin, 4, 64)
    long_x = torch.randn(kernels.MAX_ROWS + 1, 128)
    assert torch.allclose(layer(long_x), nn.functional.linear(long_x, layer.dequantized_weight(), lin.bias),
                          atol=1e-5)
    short = long_x[:2]
    want = _q8_reference(short) @ layer.dequantized_weight().T + lin.bias
    assert torch.allclose(layer(short), want, atol=1e-4)


def _tiny_decoder(seed: int = 0, **kw) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=96, block_size=64, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                        activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=True, **kw)
    return Decoder(cfg).eval()


def test_int4_quantize_save_load_round_trip(tmp_path):
    model = quantize_model(_tiny_decoder(), QuantConfig(mode="int4", group_size=64))
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(layers) == 2 * 5 and all(m.bits == 4 and m.group_size == 64 for m in layers)
    sizes = linear_weight_bytes(model)
    assert sizes["int4"] > 0 and sizes["int8"] == 0
    save_quantized(model, tmp_path / "q4")
    meta = json.loads((tmp_path / "q4" / "quantization.json").read_text())
    assert meta["method"] == "int4" and "int4 group-wise, group 64" in meta["weight"]
    back = load_quantized(tmp_path / "q4")
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        assert torch.equal(back(ids)[0], model(ids)[0])


def test_int4_group_wider_than_a_layer_is_one_group_and_bad_sizes_are_named():
    model = quantize_model(_tiny_decoder(), QuantConfig(mode="int4", group_size=128))  # d_model 64
    assert {m.scales.size(1) for m in model.modules() if isinstance(m, WeightOnlyLinear)} == {1, 2}  # 64, 256 wide
    with pytest.raises(ValueError, match="group_size: must be a positive multiple of 32"):
        QuantConfig(mode="int4", group_size=40).validate()


def test_dynamic_int8_decodes_through_the_kernel_close_to_the_torch_path():
    torch.manual_seed(1)
    lin = nn.Linear(96, 50)
    layer = Int8Linear.from_linear(lin, "dynamic")
    x = torch.randn(2, 96)
    want = _q8_reference(x) @ layer.dequantized_weight().T + lin.bias
    assert torch.allclose(layer(x), want, atol=1e-4)


def test_cli_quantize_int4(tmp_path, capsys):
    tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=300)
    src = save_model(_tiny_decoder(), tmp_path / "plain", tokenizer=tok)
    main(["quantize", "--model", str(src), "--out", str(tmp_path / "q4"), "--mode", "int4", "--group-size", "32"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mode"] == "int4"
    model = load_quantized(tmp_path / "q4")
    assert sum(isinstance(m, WeightOnlyLinear) for m in model.modules()) == 10


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("kq")
    tok = train_bpe([Path(__file__).read_text(encoding="utf-8")], vocab_size=320)
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                        activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=True, norm_eps=1e-6)
    return save_model(Decoder(cfg).eval(), tmp / "plain", tokenizer=tok, generation_config={"eos_token_id": 0})


@pytest.mark.parametrize("kind, bits", [("q4_0", 4), ("q8_0", 8)])
def test_gguf_blocks_load_as_they_are(kind, bits, tiny_llama_dir, tmp_path, monkeypatch):
    """Every Linear of a Q4_0 / Q8_0 file keeps its codes (q, k and v fused in row order, llama.cpp's q/k
    permutation undone), dequantizes to exactly what the fp32 import reads, and the model computes the same
    logits once the decode kernels are out of the way."""
    path = export_gguf(tiny_llama_dir, tmp_path / f"m.{kind}.gguf", kind)
    fp32 = import_gguf(path)
    kept = load_gguf_quantized(path)
    layers = {n: m for n, m in kept.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert set(layers) == {f"blocks.{i}.{p}" for i in range(2)
                           for p in ("attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.down")} | {"lm_head"}
    ref = dict(fp32.named_modules())
    for name, layer in layers.items():
        assert layer.bits == bits
        assert torch.equal(layer.dequantized_weight(), ref[name].weight.detach()), name
    ids = torch.tensor([[5, 9, 40, 41, 7, 3, 99, 12, 64, 2]])
    monkeypatch.setattr(kernels, "MAX_ROWS", 0)
    with torch.no_grad():
        assert torch.allclose(kept(ids)[0], fp32(ids)[0], atol=1e-4)


def test_cli_import_gguf_keep_quantized_then_generate(tiny_llama_dir, tmp_path, capsys):
    path = export_gguf(tiny_llama_dir, tmp_path / "m.gguf", "q4_0")
    main(["import", "gguf", "--from", str(path), "--out", str(tmp_path / "kept"), "--keep-quantized"])
    assert json.loads(capsys.readouterr().out.strip())["quantized_linears"] == 11
    model = load_quantized(tmp_path / "kept")
    direct = load_gguf_quantized(path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids)[0], direct(ids)[0])
    assert (tmp_path / "kept" / "tokenizer.json").is_file()


def test_decode_kernels_keep_ties_and_values():
    model = _tiny_decoder(seed=3)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        want = model(ids)[0]
        assert use_decode_kernels(model) == 2 * 5 + 1
        assert isinstance(model.lm_head, KernelLinear) and model.lm_head.weight is model.tok_emb.weight
        assert torch.allclose(model(ids)[0], want, atol=1e-5)  # prefill: F.linear, as before
        assert torch.allclose(model(ids[:, :1])[0], want[:, :1], atol=1e-4)  # one token: the kernel


def test_int4_model_in_the_engine_matches_its_own_token_by_token_forward():
    """The engine's batched decode of an INT4 model equals running the same model one token at a time."""
    model = quantize_model(_tiny_decoder(seed=5), QuantConfig(mode="int4"))
    prompt = [7, 3, 11, 19]
    engine = Engine(model, max_batch=2)
    got = engine.generate([prompt], RequestParams(max_new_tokens=8, temperature=0, stop_at_eos=False))[0]
    from llmkit.infer.generate import SamplingParams, stream_tokens

    want = list(stream_tokens(model, prompt, SamplingParams(max_new_tokens=8, temperature=0, stop_at_eos=False)))
    assert got == want


def test_unavailable_kernels_leave_the_model_alone(monkeypatch):
    monkeypatch.setattr(kernels, "_load", lambda: None)
    model = _tiny_decoder()
    assert use_decode_kernels(model) == 0
    assert not any(isinstance(m, KernelLinear) for m in model.modules())
    with pytest.raises(RuntimeError, match="unavailable"):
        kernels.linear_f32(torch.randn(1, 64), torch.randn(3, 64))
    np.testing.assert_equal(WeightOnlyLinear.from_linear(nn.Linear(64, 3), 8, 32)(torch.ones(1, 64)).shape, (1, 3))


def test_turned_off_routes_every_layer_to_its_torch_path():
    torch.manual_seed(2)
    layer = WeightOnlyLinear.from_linear(nn.Linear(64, 8), 4, 32)
    x = torch.randn(1, 64)
    exact = nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    with kernels.turned_off():
        assert torch.allclose(layer(x), exact, atol=1e-6)
    assert not torch.allclose(layer(x), exact, atol=1e-6)  # the kernel quantizes activations: not bit-equal
    assert kernels.MAX_ROWS > 0


# -- the fused decode layer ----------------------------------------------------------------------------------

from llmkit.infer.kernels.fused import FusedLayers  # noqa: E402
from llmkit.models.decoder import KVCache  # noqa: E402

LLAMA = dict(vocab_size=96, block_size=64, n_layer=2, d_model=64, n_head=4, n_kv_head=2, activation="swiglu",
             norm="rmsnorm", positions="rope")


def _fused_next_logits(model, plan, prompt: torch.Tensor, token: int, block_size: int = 4):
    """Prefill `prompt` with the model's own cached forward, copy its keys/values into a block pool under a
    shuffled block table, run one fused decode step for `token`; returns (fused logits, the model's own
    cached-forward logits for the same token, the pool's copy of the new key, the model's new key)."""
    cfg = model.config
    T = prompt.size(1)
    cache = KVCache(cfg, 1, 64, rolling=False)
    with torch.no_grad():
        model(prompt, cache=cache)
    n_blocks = 16
    k_pool = torch.zeros(cfg.n_layer, n_blocks, cfg.kv_heads, block_size, cfg.head_dim)
    v_pool = torch.zeros_like(k_pool)
    table = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(T))[None]
    for t in range(T):
        b = table[0, t // block_size]
        k_pool[:, b, :, t % block_size] = cache.k[:, 0, :, t]
        v_pool[:, b, :, t % block_size] = cache.v[:, 0, :, t]
    with torch.no_grad():
        want = model(torch.tensor([[token]]), cache=cache)[0][0, -1]
        x = model.embed(torch.tensor([token])).contiguous()
        pos = torch.tensor([T])
        cos, sin = model.rope_at(pos, T + 1)
        for i in range(cfg.n_layer):
            plan.layer(i, x, cos.contiguous(), sin.contiguous(), k_pool[i], v_pool[i], table, pos, T + 1)
        got = model.head(x)[0]
    b = table[0, T // block_size]
    return got, want, k_pool[:, b, :, T % block_size], cache.k[:, 0, :, T]


@pytest.mark.parametrize("variant", ["fp32", "kernel-fp32", "int8", "int4", "qkv_bias", "qk_norm", "window",
                                     "attn_scale"])
def test_fused_layer_equals_the_models_own_decode_step(variant):
    torch.manual_seed(11)
    extra = {"qkv_bias": dict(qkv_bias=True), "qk_norm": dict(qk_norm=True, head_dim=32),
             "window": dict(sliding_window=4), "attn_scale": dict(attn_scale=0.3)}.get(variant, {})
    model = Decoder(DecoderConfig(**LLAMA, **extra)).eval()
    with torch.no_grad():  # biases and norms away from their initial values, so a skipped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    if variant == "kernel-fp32":
        use_decode_kernels(model)
    elif variant in ("int8", "int4"):
        quantize_model(model, QuantConfig(mode="dynamic" if variant == "int8" else "int4"))
    plan = FusedLayers.plan(model)
    assert not isinstance(plan, str), plan
    prompt = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(1))
    got, want, k_new, k_want = _fused_next_logits(model, plan, prompt, token=7)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.allclose(k_new, k_want, atol=1e-6)  # the new key went to its block, rotated and normed


@pytest.mark.parametrize("change, reason", [
    (dict(positions="learned", norm="layernorm", activation="gelu"), "learned position embeddings"),
    (dict(activation="geglu_tanh"), "MLP activation geglu_tanh"),
    (dict(post_norms=True), "post-norms"),
    (dict(attn_softcap=50.0), "soft-capped"),
])
def test_fused_plan_names_what_it_does_not_cover(change, reason):
    model = Decoder(DecoderConfig(**{**LLAMA, **change})).eval()
    plan = FusedLayers.plan(model)
    assert isinstance(plan, str) and reason in plan


# -- the engine on the kernels ------------------------------------------------------------------------------


def test_engine_greedy_is_unchanged_by_the_fused_decode(monkeypatch):
    prompts = [[5, 6, 7], [9, 1, 2, 3, 4, 8, 8], [42], [3] * 20]
    params = RequestParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
    plain = Engine(_tiny_decoder(seed=4), max_batch=4, column_major=False, kernels=False)
    fast = Engine(_tiny_decoder(seed=4), max_batch=4)
    assert fast.fused is not None and fast.fused_unavailable is None
    assert isinstance(fast.model.lm_head, KernelLinear)
    want = plain.generate(prompts, params)
    assert fast.generate(prompts, params) == want
    monkeypatch.setattr(kernels, "MAX_ROWS", 2)  # 4 rows > MAX_ROWS: the fused layers, the head in BLAS
    calls = []
    monkeypatch.setattr(type(fast.fused), "layer", _counting(type(fast.fused).layer, calls))
    assert fast.generate(prompts, params) == want
    assert calls  # the fused path ran with more rows than a lone kernel Linear takes
    calls.clear()
    monkeypatch.setattr(kernels, "FUSED_MAX_ROWS", 2)  # 4 rows > FUSED_MAX_ROWS: the PyTorch layers, same tokens
    assert fast.generate(prompts, params) == want
    assert not any(n > 2 for n in calls)


def _counting(fn, calls):
    """fn, recording the row count (its x argument's first dimension) of every call in `calls`."""
    def wrapped(self, i, x, *a, **kw):
        calls.append(x.size(0))
        return fn(self, i, x, *a, **kw)
    return wrapped


def test_engine_says_why_a_model_is_not_fused():
    gpt2 = Decoder(DecoderConfig(vocab_size=96, block_size=64, n_layer=2, d_model=64, n_head=4)).eval()
    engine = Engine(gpt2, max_batch=2)
    assert engine.fused is None and "learned position embeddings" in engine.fused_unavailable
    assert isinstance(engine.model.lm_head, KernelLinear)  # its Linears still decode through the kernels
    assert engine.generate([[1, 2, 3]], RequestParams(max_new_tokens=5, temperature=0, stop_at_eos=False))


@pytest.mark.parametrize("bits, group", [(4, 32), (4, 128), (8, 64), (8, 128), (8, 576)])
def test_c_dequantization_equals_the_torch_reference(bits, group, monkeypatch):
    torch.manual_seed(group)
    q, s = quantize_groups(torch.randn(10, 576), bits, group)
    fn = kernels.dequantize_q4 if bits == 4 else kernels.dequantize_q8
    fast = fn(q, s, group)
    monkeypatch.setattr(kernels, "_load", lambda: None)  # the PyTorch reference
    assert torch.equal(fast, fn(q, s, group))


@pytest.mark.parametrize("rows", [3, kernels.MAX_ROWS + 4])
def test_weight_only_prefill_keeps_its_weight_for_backward(rows):
    """Prefill dequantizes into a buffer shared by all layers; with autograd on, each layer must keep its own
    weight, or a second layer's call would overwrite what the first one's backward reads. Few rows that need
    a gradient (a LoRA on a quantized base) skip the kernels, which have no backward."""
    torch.manual_seed(0)
    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    qa, qb = WeightOnlyLinear.from_linear(a, 4, 32), WeightOnlyLinear.from_linear(b, 4, 32)
    x = torch.randn(rows, 64, requires_grad=True)
    qb(qa(x)).sum().backward()
    want = x.detach().clone().requires_grad_()
    F_ = torch.nn.functional
    F_.linear(F_.linear(want, qa.dequantized_weight(), qa.bias), qb.dequantized_weight(), qb.bias).sum().backward()
    assert torch.allclose(x.grad, want.grad, atol=1e-5)
