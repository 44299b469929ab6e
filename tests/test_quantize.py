"""INT8 quantization: kernels, observers, whole-model quality, size, and the saved model dir."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from llmkit.infer.quantize import (
    HistogramObserver,
    Int8Linear,
    MinMaxObserver,
    PercentileObserver,
    QuantConfig,
    int8_matmul,
    linear_weight_bytes,
    load_quantized,
    quantize_model,
    quantize_per_channel,
    save_quantized,
    target_linears,
)
from llmkit.models.decoder import Decoder, DecoderConfig


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _fake_quant(x: torch.Tensor, amax: float) -> torch.Tensor:
    s = amax / 127
    return torch.round(x / s).clamp(-127, 127) * s


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=256, block_size=64, n_layer=2, d_model=64, activation="swiglu",
                        norm="rmsnorm", positions="rope")
    return Decoder(cfg).eval()


def test_int8_matmul_exact_integers():
    g = torch.Generator().manual_seed(0)
    for M, K, N in [(1, 64, 48), (17, 128, 96), (5, 30, 7)]:
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        out = int8_matmul(a, w.t())
        assert out.dtype == torch.int32
        assert torch.equal(out, (a.long() @ w.long().t()).int())


def test_per_channel_weight_roundtrip():
    w = torch.randn(32, 16)
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.shape == (32,)
    assert q.abs().amax(1).eq(127).all()  # each row uses the full range
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("mode,bound", [("dynamic", 0.02), ("weight_only", 0.01), ("static", 0.03)])
def test_int8_linear_close_to_fp32(mode, bound):
    torch.manual_seed(1)
    lin = nn.Linear(96, 80, bias=True)
    x = torch.randn(3, 7, 96)
    q = Int8Linear.from_linear(lin, mode, input_scale=float(x.abs().max()) / 127)
    y, ref = q(x), lin(x)
    assert y.shape == ref.shape
    assert _rel(y, ref) < bound


def test_weight_only_kernels_agree_and_beat_dynamic():
    torch.manual_seed(2)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(9, 64)
    limbs = Int8Linear.from_linear(lin, "weight_only", weight_only_kernel="limbs")(x)
    deq = Int8Linear.from_linear(lin, "weight_only", weight_only_kernel="dequant")(x)
    dyn = Int8Linear.from_linear(lin, "dynamic")(x)
    assert _rel(limbs, deq) < 1e-3  # activations at ~15 bits: the same as the dequantized fp32 matmul
    assert _rel(deq, lin(x)) < _rel(dyn, lin(x))


def test_minmax_exact():
    obs = MinMaxObserver()
    obs.observe(torch.tensor([0.5, -3.25, 2.0]))
    obs.observe(torch.tensor([[1.0, 3.0]]))
    assert obs.amax() == 3.25


def test_percentile_ignores_outlier():
    torch.manual_seed(3)
    x = torch.randn(200_000)
    x[17] = 1000.0
    obs = PercentileObserver(99.99)
    obs.observe(x[:100_000])
    obs.observe(x[100_000:])  # the range grows across batches
    amax = obs.amax()
    assert 3.0 < amax < 6.0


def test_histogram_range_growth_keeps_counts():
    obs = HistogramObserver(bins=64)
    obs.observe(torch.linspace(-1, 1, 1000))
    obs.observe(torch.full((10,), 5.0))
    assert obs.hist.sum() == 1010 and obs.max_abs >= 5.0


@pytest.mark.parametrize("objective", ["mse", "kl"])
def test_histogram_clipping_lowers_mse_on_heavy_tails(objective):
    torch.manual_seed(4)
    x = torch.distributions.StudentT(4.0).sample((100_000,))
    mm, hist = MinMaxObserver(), HistogramObserver(objective=objective)
    mm.observe(x)
    hist.observe(x[:50_000])
    hist.observe(x[50_000:])
    assert hist.amax() < mm.amax()
    mse_mm = float((_fake_quant(x, mm.amax()) - x).pow(2).mean())
    mse_hist = float((_fake_quant(x, hist.amax()) - x).pow(2).mean())
    if objective == "kl":  # KL trades the tail for resolution of the bulk: bulk error drops, total need not
        bulk = x.abs() < x.abs().quantile(0.999)
        assert float((_fake_quant(x, hist.amax()) - x)[bulk].pow(2).mean()) < 0.5 * float(
            (_fake_quant(x, mm.amax()) - x)[bulk].pow(2).mean())
    else:
        assert mse_hist < 0.85 * mse_mm
        # and close to the empirical optimum over a fine grid of thresholds
        best = min(float((_fake_quant(x, t) - x).pow(2).mean()) for t in torch.linspace(2, mm.amax(), 300).tolist())
        assert mse_hist < 1.05 * best


def test_targets_default_and_configurable(tiny):
    names = target_linears(tiny, QuantConfig())
    assert names and all(n.startswith("blocks.") for n in names)
    assert "lm_head" not in names
    assert "lm_head" in target_linears(tiny, QuantConfig(targets=[r"blocks\..*", "lm_head"]))
    assert not any(".mlp." in n for n in target_linears(tiny, QuantConfig(exclude=[r".*\.mlp\..*"])))


@pytest.mark.parametrize("mode,observer", [("dynamic", "minmax"), ("weight_only", "minmax"), ("static", "minmax"),
                                           ("static", "percentile"), ("static", "histogram")])
def test_decoder_quality(tiny, mode, observer):
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 256, (2, 48), generator=g)
    calib = [torch.randint(0, 256, (4, 48), generator=g) for _ in range(4)]
    with torch.no_grad():
        ref, _ = tiny(idx)
        q = quantize_model(copy.deepcopy(tiny), QuantConfig(mode=mode, observer=observer), calib)
        out, _ = q(idx)
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 5 * 2
    assert _rel(out, ref) < 0.03
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_static_needs_calibration(tiny):
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(copy.deepcopy(tiny), QuantConfig(mode="static"))


def test_weight_bytes_drop_75_percent(tiny):
    before = linear_weight_bytes(tiny)
    q = quantize_model(copy.deepcopy(tiny), QuantConfig(mode="dynamic"))
    after = linear_weight_bytes(q)
    assert before["int8"] == 0 and after["fp32"] == 0
    assert 0.72 < 1 - after["total"] / before["total"] <= 0.75


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_save_load_roundtrip_bit_exact(tiny, tmp_path, mode):
    calib = [torch.randint(0, 256, (2, 32))]
    q = quantize_model(copy.deepcopy(tiny), QuantConfig(mode=mode), calib)
    out = save_quantized(q, tmp_path / "int8")
    assert {"config.json", "quantization.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["config"]["mode"] == mode and len(meta["layers"]) == 10
    back = load_quantized(out)
    sd, sd2 = q.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    idx = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(q(idx)[0], back(idx)[0])
    assert back.blocks[0].attn.qkv.mode == mode


def test_cli_quantize_then_generate(tmp_path, capsys):
    """`llmkit quantize` writes a dir that `llmkit generate` loads with its int8 layers."""
    from llmkit.cli import main
    from llmkit.infer.load import load_for_inference
    from llmkit.infer.quantize import Int8Linear
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import save_model
    from llmkit.tokenizer import train_char

    text = "the quick brown fox jumps over the lazy dog. " * 200
    tok = train_char([text])
    torch.manual_seed(0)
    save_model(Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, d_model=32, n_head=2)),
               tmp_path / "fp32", tok)
    (tmp_path / "calib.txt").write_text(text)
    for mode in ("dynamic", "static"):
        extra = ["--calibration", str(tmp_path / "calib.txt"), "--calibration-batches", "4"] if mode == "static" else []
        assert main(["quantize", "--model", str(tmp_path / "fp32"), "--out", str(tmp_path / mode), "--mode", mode,
                     *extra]) == 0
        model, _, _ = load_for_inference(tmp_path / mode)
        assert any(isinstance(m, Int8Linear) for m in model.modules())
        assert main(["generate", "--model", str(tmp_path / mode), "--prompt", "the ", "--max-new-tokens", "8",
                     "--temperature", "0", "--seed", "0"]) == 0
    assert main(["quantize", "--model", str(tmp_path / "fp32"), "--out", str(tmp_path / "x"), "--mode", "static"]) == 2
    assert "command line: calibration: quant.mode static needs a calibration file" in capsys.readouterr().err


def test_cli_quantize_config_file_with_flags_and_overrides(tmp_path, capsys):
    """`llmkit quantize --config FILE`: the file's keys, a flag as a shorthand, an explicit `key=value` that
    wins over the flag for the same key; a wrong key names the key and the file."""
    import json

    from llmkit.cli import main
    from llmkit.infer.quantize import QuantizeDirConfig, load_quantized
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import save_model
    from llmkit.tokenizer import train_char

    tok = train_char(["the quick brown fox jumps over the lazy dog. "])
    torch.manual_seed(0)
    save_model(Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, d_model=32, n_head=2)),
               tmp_path / "fp32", tok)
    recipe = tmp_path / "quant.yaml"
    recipe.write_text(f"model: {tmp_path / 'fp32'}\nout: {tmp_path / 'q'}\nwith_head: true\n"
                      "quant:\n  mode: dynamic\n")
    # --mode weight_only is a shorthand for quant.mode=weight_only; the explicit override after it wins
    assert main(["quantize", "--config", str(recipe), "--mode", "weight_only", "quant.mode=dynamic"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "dynamic"
    q = load_quantized(tmp_path / "q")
    assert q.quant_config.mode == "dynamic" and "lm_head" in q.quant_config.targets
    assert main(["quantize", "--config", str(recipe), "--mode", "weight_only", f"out={tmp_path / 'w'}"]) == 0
    assert load_quantized(tmp_path / "w").quant_config.mode == "weight_only"
    capsys.readouterr()
    recipe.write_text(f"model: {tmp_path / 'fp32'}\nout: {tmp_path / 'x'}\nquant:\n  moed: static\n")
    assert main(["quantize", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'quant.moed'" in err and str(recipe) in err
    recipe.write_text(f"model: {tmp_path / 'fp32'}\nout: {tmp_path / 'x'}\nquant:\n  mode: static\n")
    assert main(["quantize", "--config", str(recipe)]) == 2
    assert f"{recipe}: calibration: quant.mode static needs" in capsys.readouterr().err
    cfg = QuantizeDirConfig(model="m", out="o", with_head=True)
    assert cfg.quant_config().targets[-1] == "lm_head" and cfg.quant.targets[-1] != "lm_head"
