"""Encoder-decoder (T5) family: exact parity with transformers' T5ForConditionalGeneration, cached
generation, HF import/export, and a short learning run."""

from __future__ import annotations

import math

import pytest
import torch

from llmkit.models.encdec import EncDecConfig, EncoderDecoder, _DecoderCache, relative_position_bucket
from llmkit.models.hf_t5 import export_t5, import_t5, t5_config_from_hf

transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers")

V = 101
# (feed_forward_proj, tied, d_kv): d_kv 24 with 4 heads makes the attention width (96) differ from d_model
CASES = [("relu", True, 16), ("gated-gelu", False, 16), ("gated-gelu", True, 24), ("relu", False, 24)]
IDS = [f"{ff}-{'tied' if tied else 'untied'}-dkv{dkv}" for ff, tied, dkv in CASES]


def _hf_config(ff: str, tied: bool, d_kv: int):
    return transformers.T5Config(
        vocab_size=V, d_model=64, d_kv=d_kv, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj=ff, tie_word_embeddings=tied, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, relative_attention_num_buckets=8, relative_attention_max_distance=20,
    )


@torch.no_grad()
def _rerandomize(model: torch.nn.Module, seed: int) -> None:
    """Default inits hide mistakes (unit norms, tiny weights): give every tensor a distinct, larger spread."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif "shared" in name or "rel" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.15 * torch.randn(p.shape, generator=g))


def _hf_model(ff: str, tied: bool, d_kv: int, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.T5ForConditionalGeneration(_hf_config(ff, tied, d_kv))
    if not tied:  # transformers 5 shares lm_head with shared in memory; give the head its own tensor
        hf.lm_head.weight = torch.nn.Parameter(hf.shared.weight.detach().clone())
    _rerandomize(hf, seed + 1)
    if not tied:
        assert not torch.equal(hf.lm_head.weight, hf.shared.weight)
    return hf.eval()


def _inputs(seed: int = 0, B: int = 2, S: int = 25, T: int = 23):
    """Encoder ids with the second row right-padded (longer than max_distance=20: log buckets in use)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 6:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    dec = torch.randint(2, V, (B, T), generator=g)
    return ids, mask, dec


def test_relative_position_bucket_matches_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 20), (6, 7)):
            ours = relative_position_bucket(rel, bidirectional, nb, md)
            ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=nb,
                                                        max_distance=md)
            assert torch.equal(ours, ref), (bidirectional, nb, md)


@pytest.mark.parametrize(("ff", "tied", "d_kv"), CASES, ids=IDS)
def test_import_matches_hf(tmp_path, ff, tied, d_kv):
    hf = _hf_model(ff, tied, d_kv)
    hf.save_pretrained(tmp_path)
    model = import_t5(tmp_path)
    assert model.config.tie_embeddings == tied and model.config.activation == ff
    assert (model.lm_head is None) == tied
    ids, mask, dec = _inputs()
    labels = dec.clone()
    labels[0, -3:] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        ours, _ = model(ids, dec, attention_mask=mask)
        torch.testing.assert_close(ours, ref.logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(model.encode(ids, mask), ref.encoder_last_hidden_state, atol=1e-4, rtol=0)
        # labels only: decoder inputs = labels shifted right (start token, -100 -> pad), mean CE over labels
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        ours, loss = model(ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(ours, ref.logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(loss, ref.loss, atol=1e-4, rtol=1e-5)


def test_import_pytorch_bin(tmp_path):
    hf = _hf_model("gated-gelu", False, 16)
    hf.config.save_pretrained(tmp_path)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}  # older checkpoints: embed_tokens + lm_head
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = import_t5(tmp_path)
    ids, mask, dec = _inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, dec, attention_mask=mask)[0],
                                   hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   atol=1e-4, rtol=0)


def _llmkit_model(ff: str, tied: bool, d_kv: int, seed: int = 0) -> EncoderDecoder:
    torch.manual_seed(seed)
    cfg = EncDecConfig(vocab_size=V, d_model=64, n_layer=2, n_head=4, d_kv=d_kv, d_ff=128, activation=ff,
                       tie_embeddings=tied, dropout=0.0, relative_attention_num_buckets=8,
                       relative_attention_max_distance=20)
    model = EncoderDecoder(cfg)
    _rerandomize(model, seed + 1)
    return model.eval()


@pytest.mark.parametrize(("ff", "tied", "d_kv"), CASES, ids=IDS)
def test_export_loads_in_transformers(tmp_path, ff, tied, d_kv):
    model = _llmkit_model(ff, tied, d_kv)
    export_t5(model, tmp_path, eos_token_id=1)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask, dec = _inputs(2)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(model(ids, dec, attention_mask=mask)[0], ref, atol=1e-4, rtol=0)
    back = import_t5(tmp_path)  # and round-trips exactly
    assert back.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize(("ff", "tied", "d_kv"), CASES[:2], ids=IDS[:2])
def test_greedy_generate_matches_hf(tmp_path, ff, tied, d_kv):
    hf = _hf_model(ff, tied, d_kv, seed=3)
    hf.save_pretrained(tmp_path)
    model = import_t5(tmp_path)
    ids, mask, _ = _inputs(3, S=12)
    n = 10
    ours = model.generate(ids, mask, max_new_tokens=n)
    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                      eos_token_id=None, pad_token_id=0, decoder_start_token_id=0)
    assert ref[:, 0].eq(0).all()
    assert ours.shape == (2, n)
    assert torch.equal(ours, ref[:, 1:])
    # with an eos that row 0 produces mid-way: that row continues with pad, generation stops when all end
    eos = int(ours[0, 3])
    ours = model.generate(ids, mask, max_new_tokens=n, eos_id=eos)
    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                      eos_token_id=eos, pad_token_id=0, decoder_start_token_id=0)
    assert torch.equal(ours, ref[:, 1:])


@pytest.mark.parametrize(("ff", "tied", "d_kv"), CASES[1:3], ids=IDS[1:3])
def test_cached_decoding_equals_full_recompute(ff, tied, d_kv):
    model = _llmkit_model(ff, tied, d_kv, seed=5)
    ids, mask, _ = _inputs(5, S=14)
    n = 12
    tokens = model.generate(ids, mask, max_new_tokens=n)
    start = torch.zeros(2, 1, dtype=torch.long)
    dec_in = torch.cat([start, tokens[:, :-1]], dim=1)
    with torch.no_grad():
        full, _ = model(ids, dec_in, attention_mask=mask)
        assert torch.equal(full.argmax(-1), tokens)  # each greedy token = argmax of the full recompute
        # step-by-step logits through the caches equal the full decoder's, position by position
        memory = model.encode(ids, mask)
        cross = model._pad_bias(mask, memory.dtype)
        cache = _DecoderCache(model, memory, n)
        steps = [model._logits(model.decoder(model.shared(dec_in[:, t:t + 1]), None, cross, cache=cache))
                 for t in range(n)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)
        # a multi-token prefill followed by single steps also agrees
        cache = _DecoderCache(model, memory, n)
        pre = model._logits(model.decoder(model.shared(dec_in[:, :5]), None, cross, cache=cache))
        rest = [model._logits(model.decoder(model.shared(dec_in[:, t:t + 1]), None, cross, cache=cache))
                for t in range(5, n)]
        torch.testing.assert_close(torch.cat([pre, *rest], dim=1), full, atol=1e-4, rtol=0)
    # sampling: repeatable with a seed, shapes right
    a = model.generate(ids, mask, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=0)
    b = model.generate(ids, mask, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=0)
    assert a.shape == (2, 6) and torch.equal(a, b)


def test_config_validation_and_hf_refusals():
    cfg = EncDecConfig(vocab_size=10, d_model=128)
    assert (cfg.n_head, cfg.d_kv, cfg.d_ff, cfg.n_decoder_layer) == (2, 64, 512, 6)
    with pytest.raises(ValueError, match="^activation:"):
        EncDecConfig(vocab_size=10, activation="swiglu").validate()
    with pytest.raises(ValueError, match="^dropout:"):
        EncDecConfig(vocab_size=10, dropout=1.0).validate()
    with pytest.raises(ValueError, match="^decoder_start_token_id:"):
        EncDecConfig(vocab_size=10, decoder_start_token_id=10).validate()
    with pytest.raises(ValueError, match="^n_decoder_layer:"):
        EncDecConfig(vocab_size=10, n_decoder_layer=0).validate()
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5_config_from_hf({"model_type": "t5", "feed_forward_proj": "gated-silu"})
    c = t5_config_from_hf({"model_type": "t5", "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                           "num_layers": 3, "num_decoder_layers": 1})
    assert (c.activation, c.tie_embeddings, c.n_layer, c.n_decoder_layer) == ("gated-gelu", False, 3, 1)


def test_param_count_and_flops():
    model = _llmkit_model("relu", True, 16)
    c = model.config
    d, L = c.d_model, c.n_layer
    attn = 4 * d * c.n_head * c.d_kv
    expected = V * d + L * (attn + 2 * d * c.d_ff + 2 * d) + L * (2 * attn + 2 * d * c.d_ff + 3 * d) + 2 * d
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + 2 * 8 * c.n_head
    assert model.flops_per_token(32) == 6 * expected + 12 * 3 * L * c.n_head * c.d_kv * 32


def test_learns_copy_task(shakespeare_small):
    """60 steps of copying 8-character spans of tinyshakespeare: the loss drops well below its start, and
    the trained model relies on the encoder (a shuffled source costs much more than the true one)."""
    from llmkit.tokenizer import Tokenizer

    text_file, tok_dir = shakespeare_small
    tok = Tokenizer.load(tok_dir)
    data = torch.tensor(tok.encode(text_file.read_text(encoding="utf-8")[:20_000]), dtype=torch.long)
    torch.manual_seed(0)
    cfg = EncDecConfig(vocab_size=tok.vocab_size, block_size=16, d_model=64, n_layer=2, n_head=4, d_ff=128,
                       dropout=0.0, pad_token_id=0, decoder_start_token_id=0)
    model = EncoderDecoder(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        starts = torch.randint(0, len(data) - 8, (16,), generator=g)
        src = torch.stack([data[s:s + 8] for s in starts])
        _, loss = model(src, labels=src)  # target = the source span
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert model.encoder.rel_bias.weight.grad.abs().sum() > 0  # the bias trains through the attention mask
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert math.isfinite(last) and last < 0.7 * first, (first, last)
    model.eval()
    with torch.no_grad():
        _, true_src = model(src, labels=src)
        _, shuffled = model(src[torch.arange(15, -1, -1)], labels=src)
    assert true_src < shuffled - 0.5, (true_src.item(), shuffled.item())


def test_model_dir_round_trip_and_import_hf_dispatch(tmp_path):
    from llmkit.models import load_model, save_model
    from llmkit.models.hf import export_hf, import_hf

    torch.manual_seed(0)
    model = EncoderDecoder(EncDecConfig(vocab_size=101, n_layer=2, d_model=64, n_head=4, d_ff=128)).eval()
    save_model(model, tmp_path / "ours")
    loaded = load_model(tmp_path / "ours")
    src, tgt = torch.randint(0, 101, (2, 10)), torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(src, tgt)[0], model(src, tgt)[0])
    export_hf(tmp_path / "ours", tmp_path / "hf")
    again = import_hf(tmp_path / "hf", tmp_path / "back")
    assert isinstance(again, EncoderDecoder)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "back")(src, tgt)[0], model(src, tgt)[0], rtol=0, atol=1e-5)
