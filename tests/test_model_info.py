import json
import subprocess
import sys

import pytest

from llmkit.models import Decoder, DecoderConfig
from llmkit.models.info import model_info


@pytest.mark.parametrize("kw", [dict(), dict(positions="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False)])
def test_counts_match_a_real_model(kw):
    cfg = DecoderConfig(vocab_size=100, block_size=32, n_layer=3, d_model=64, n_head=4, **kw)
    info = model_info(cfg, batch_size=2)
    model = Decoder(cfg)
    p = info["parameters"]
    assert p["total"] == sum(t.numel() for t in model.parameters())
    assert p["attention"] == 3 * 4 * 64 * 64
    assert p["embeddings"] == 100 * 64 + (32 * 64 if cfg.positions == "learned" else 0)
    assert p.get("heads", 0) == (0 if cfg.tie_embeddings else 100 * 64)
    assert info["flops_per_token"] == model.flops_per_token(32)
    assert info["memory_bytes"]["adamw_states"] == 8 * p["total"]


def test_activation_memory_follows_the_formula():
    cfg = DecoderConfig(vocab_size=1000, block_size=128, n_layer=2, d_model=64, n_head=4)
    fused = model_info(cfg, batch_size=4, activation_bytes=2)["memory_bytes"]["activations"]
    unfused = model_info(cfg, batch_size=4, activation_bytes=2, fused_attention=False)["memory_bytes"]["activations"]
    s, b, h, a, L = 128, 4, 64, 4, 2
    assert fused == L * s * b * h * 34 + s * b * 1000 * 4
    assert unfused - fused == L * 5 * a * s * s * b


def test_a_7b_config_is_sized_without_allocating_it():
    cfg = DecoderConfig(vocab_size=32000, block_size=4096, n_layer=32, d_model=4096, n_head=32, d_ff=11008,
                        positions="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False)
    info = model_info(cfg)
    assert 6.7e9 < info["parameters"]["total"] < 6.8e9  # Llama-2-7B: 6.74B


def test_cli_model_info(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  n_layer: 2\n  d_model: 64\n  vocab_size: 50\ndata:\n  tokenizer: none\n")
    r = subprocess.run([sys.executable, "-m", "llmkit", "model", "info", "--config", str(cfg), "--seq-len", "16"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["config"]["n_head"] == 1 and info["shape"]["seq_len"] == 16
