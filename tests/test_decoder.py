import pytest
import torch

from llmkit.config import ConfigError, load_config
from llmkit.models import Decoder, DecoderConfig, KVCache, load_model, save_model

VARIANTS = [
    dict(),  # GPT-2 style: learned positions, layernorm, gelu
    dict(positions="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False, bias=True),
    dict(activation="relu", bias=True),
    # Llama-style with grouped-query attention: 4 query heads share 2 key/value heads
    dict(positions="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False, n_kv_head=2),
    dict(activation="gelu_tanh", bias=True, n_kv_head=1),  # multi-query attention
]


def tiny(**kw):
    cfg = dict(vocab_size=97, block_size=32, n_layer=2, d_model=64, n_head=4)
    cfg.update(kw)
    return DecoderConfig(**cfg)


@pytest.mark.parametrize("kw", VARIANTS)
def test_kv_cache_logits_equal_full_forward(kw):
    torch.manual_seed(0)
    model = Decoder(tiny(**kw)).eval()
    idx = torch.randint(0, 97, (3, 20))
    full, _ = model(idx)
    cache = KVCache(model.config, batch_size=3)
    # prefill 7 tokens, then one at a time, then a chunk of 4 after a prefix (exercises the offset mask)
    pieces = [idx[:, :7]] + [idx[:, i:i + 1] for i in range(7, 16)] + [idx[:, 16:20]]
    outs = [model(p, cache=cache)[0] for p in pieces]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == 20


def test_default_heads_follow_guide():
    assert DecoderConfig(d_model=768).n_head == 12
    assert DecoderConfig(d_model=1024).n_head == 16


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Decoder(tiny()).eval()
    a = torch.randint(0, 97, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 97
    la, _ = model(a)
    lb, _ = model(b)
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_loss_matches_manual_cross_entropy_and_ignores_minus_100():
    torch.manual_seed(0)
    model = Decoder(tiny()).eval()
    idx = torch.randint(0, 97, (2, 8))
    tgt = torch.randint(0, 97, (2, 8))
    tgt[0, :3] = -100
    logits, loss = model(idx, tgt)
    keep = tgt != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], tgt[keep])
    torch.testing.assert_close(loss, manual)


def test_param_count_and_flops():
    c = tiny()
    m = Decoder(c)
    per_block = 4 * 64 * 64 + 2 * 4 * 64 * 64 + 2 * 64  # attn + mlp weights + 2 layernorm weights (no bias)
    expected = 97 * 64 + 2 * per_block + 64  # tied embedding + blocks + final norm
    assert m.num_params() == expected
    assert m.flops_per_token(32) == 6 * expected + 12 * 2 * 64 * 32


def test_sequence_longer_than_block_is_refused():
    model = Decoder(tiny())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_save_load_roundtrip_keeps_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = Decoder(tiny()).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.lm_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()
    idx = torch.randint(0, 97, (1, 10))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])


def test_config_refuses_head_count_that_does_not_divide(tmp_path):
    from dataclasses import dataclass, field

    @dataclass
    class Top:
        model: DecoderConfig = field(default_factory=DecoderConfig)

    p = tmp_path / "c.yaml"
    p.write_text("model:\n  d_model: 128\n  n_head: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: model\.n_head: 3 does not divide"):
        load_config(Top, p)


def test_chunked_training_loss_equals_the_full_loss_and_its_gradients(monkeypatch):
    import llmkit.models.decoder as decoder_mod

    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=300, n_layer=2, n_head=2, d_model=32, block_size=64, positions="rope",
                        norm="rmsnorm", activation="swiglu", final_softcap=5.0)
    model = Decoder(cfg)
    x = torch.randint(0, 300, (3, 40))
    y = x.clone()
    y[0, :10] = -100
    full = model(x, y)[1]
    full.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(decoder_mod, "LOSS_CHUNK", 7)  # 120 positions in 18 chunks, the last one short
    logits, loss = model(x, y, return_logits=False)
    loss.backward()
    assert logits is None
    torch.testing.assert_close(loss, full)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
