"""Prefix tuning (Li & Liang 2021): training, KV-cache agreement, positions, masks, save/load, PEFT parity."""

from __future__ import annotations

import json

import pytest
import torch

from llmkit.infer.generate import SamplingParams, stream_tokens
from llmkit.models import Decoder, DecoderConfig, KVCache
from llmkit.models.encdec import EncDecConfig, EncoderDecoder, _DecoderCache
from llmkit.models.encoder import Encoder, EncoderClassifier, EncoderConfig
from llmkit.models.prefix import (
    PrefixConfig,
    apply_prefix,
    load_prefix,
    prefix_parameters,
    remove_prefix,
    save_prefix,
    trainable_share,
)

VOCAB = 97
GPT2 = dict(activation="gelu_tanh", bias=True)
LLAMA = dict(positions="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False, n_kv_head=2, d_ff=96)
MQA = dict(positions="rope", norm="rmsnorm", activation="swiglu", n_kv_head=1)
DECODERS = {"gpt2": GPT2, "llama_gqa": LLAMA, "rope_mqa": MQA}


def decoder(seed: int = 0, **kw) -> Decoder:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, block_size=32, n_layer=2, d_model=64, n_head=4)
    cfg.update(kw)
    return Decoder(DecoderConfig(**cfg)).eval()


def encdec(seed: int = 0) -> EncoderDecoder:
    torch.manual_seed(seed)
    cfg = EncDecConfig(vocab_size=VOCAB, n_layer=2, n_decoder_layer=3, d_model=32, n_head=2, d_kv=8, d_ff=64,
                       dropout=0.0, activation="gated-gelu")
    return EncoderDecoder(cfg).eval()


def encoder_cfg() -> EncoderConfig:
    return EncoderConfig(vocab_size=VOCAB, block_size=32, n_layer=2, d_model=32, n_head=2, dropout=0.0, n_labels=3)


def randomize_prefix(model, std: float = 0.5, seed: int = 1) -> None:
    """A trained-looking prefix, large enough to change the outputs clearly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prefix_parameters(model):
            p.copy_(std * torch.randn(p.shape, generator=g))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- training ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_fresh_prefix_trains_and_only_prefix_changes(name, projection):
    model = decoder(**DECODERS[name])
    _randomize_base(model)  # a "pretrained" base whose attention outputs matter (not near-zero init weights)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=6, projection=projection, projection_dim=32), seed=0)
    model.train()
    before = snapshot(model)
    params = prefix_parameters(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n in before if n.startswith("prefix.")]
    opt = torch.optim.AdamW(params, lr=3e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (4, 16), generator=g)
    y = torch.randint(0, VOCAB, (4, 16), generator=g)
    losses = []
    for _ in range(15):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    after = snapshot(model)
    for n in before:
        if n.startswith("prefix."):
            assert not torch.equal(before[n], after[n]), n
        else:
            assert torch.equal(before[n], after[n]), n
            assert dict(model.named_parameters())[n].grad is None, n


def test_trainable_share_counts_and_gpt2_small_figure():
    # exact counts on a GQA model: kv_dim = n_kv_head * head_dim = 2 * 16 = 32, 2 layers, P = 6
    model = decoder(**LLAMA)
    n_base = sum(p.numel() for p in model.parameters())
    apply_prefix(model, PrefixConfig(num_virtual_tokens=6, projection=False))
    assert trainable_share(model)[:2] == (6 * 2 * 2 * 32, n_base + 6 * 2 * 2 * 32)
    model = decoder(**LLAMA)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=6, projection=True, projection_dim=40))
    n_proj = 6 * 32 + (32 * 40 + 40) + (40 * 128 + 128)
    assert trainable_share(model)[:2] == (n_proj, n_base + n_proj)
    # GPT-2 small with a 32k vocabulary (built on the meta device: no memory, no time): the stored table
    # is 20 x 12 x 2 x 768 = 368,640 numbers, 0.33% - inside the guide's 0.1-0.5% for prefix tuning
    for projection, lo, hi in ((False, 0.001, 0.005), (True, 0.05, 0.12)):
        with torch.device("meta"):
            big = Decoder(DecoderConfig(vocab_size=32000, d_model=768, n_layer=12, block_size=1024))
        apply_prefix(big, PrefixConfig(num_virtual_tokens=20, projection=projection))
        trainable, total, share = trainable_share(big)
        assert lo < share < hi, (projection, trainable, total)
        if not projection:
            assert trainable == 368_640


def test_dropout_only_in_training():
    model = decoder(**GPT2)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=4, dropout=0.5), seed=0)
    x = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(x)[0], model(x)[0])
        model.train()
        assert not torch.equal(model(x)[0], model(x)[0])


# -- KV cache, positions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DECODERS))
def test_kv_cache_with_prefix_equals_full_forward(name):
    model = decoder(**DECODERS[name])
    idx = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        base, _ = model(idx)
        apply_prefix(model, PrefixConfig(num_virtual_tokens=5, projection_dim=32), seed=0)
        randomize_prefix(model)
        full, _ = model(idx)
        assert (full - base).abs().max() > 0.1  # the prefix really acts
        cache = KVCache(model.config, batch_size=3, max_len=model.num_prefix_tokens + 20)
        pieces = [idx[:, :7]] + [idx[:, i:i + 1] for i in range(7, 16)] + [idx[:, 16:20]]
        outs = [model(p, cache=cache)[0] for p in pieces]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)
    assert (cache.length, cache.prefix_len) == (25, 5)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_stream_tokens_with_prefix_equals_uncached_greedy(name):
    model = decoder(**DECODERS[name])
    apply_prefix(model, PrefixConfig(num_virtual_tokens=7, projection=False), seed=0)
    randomize_prefix(model)
    ids = [3, 14, 15, 9, 26]
    ref = list(ids)
    with torch.no_grad():
        for _ in range(27):  # up to block_size: the prefix takes no positions
            ref.append(int(model(torch.tensor([ref]))[0][0, -1].argmax()))
    out = list(stream_tokens(model, ids, SamplingParams(max_new_tokens=100, temperature=0, stop_at_eos=False)))
    assert out == ref[len(ids):]
    assert len(ids) + len(out) == model.config.block_size


def test_prefix_takes_no_positions():
    model = decoder(**GPT2)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=8), seed=0)
    seen = []
    model.pos_emb.register_forward_hook(lambda m, inp, out: seen.append(inp[0].tolist()))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 32)))  # a full block still fits
        cache = KVCache(model.config, 1, max_len=8 + 5)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model(torch.tensor([[4]]), cache=cache)
    assert seen == [list(range(32)), [0, 1, 2], [3]]
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, VOCAB, (1, 33)))


def test_no_prefix_model_unchanged_and_remove_prefix_restores_it():
    model = decoder(**LLAMA)
    keys = set(model.state_dict())
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        base, _ = model(x)
        apply_prefix(model, PrefixConfig(num_virtual_tokens=4), seed=0)
        assert set(model.state_dict()) - keys == {n for n in model.state_dict() if n.startswith("prefix.")}
        assert not torch.equal(model(x)[0], base)
        assert remove_prefix(model) is not None and model.prefix is None
        assert torch.equal(model(x)[0], base)
        assert set(model.state_dict()) == keys and model.num_prefix_tokens == 0


# -- encoder-decoder and encoder ----------------------------------------------------------------------------

def _seq2seq_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    labels = torch.randint(1, VOCAB, (2, 7), generator=g)
    return ids, mask, labels


def test_encdec_prefix_trains_all_three_sites_and_only_prefix_changes():
    model = encdec()
    apply_prefix(model, PrefixConfig(num_virtual_tokens=4, projection_dim=24), seed=0)
    model.train()
    kv = model.prefix()
    assert kv.shape == (3 + 3 + 2, 2, 2, 4, 8)  # decoder self x3, cross x3, encoder x2
    before = snapshot(model)
    opt = torch.optim.AdamW(prefix_parameters(model), lr=1e-2, weight_decay=0.0)
    ids, mask, labels = _seq2seq_batch()
    losses = []
    for _ in range(15):
        _, loss = model(ids, attention_mask=mask, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) != n.startswith("prefix.") for n in before)
    # each group of sites is wired in: perturbing only its slice of the table changes the logits
    model.eval()
    remove_prefix(model)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=4, projection=False), seed=0)
    table = model.prefix.embedding.weight
    width = 2 * 2 * 8
    with torch.no_grad():
        ref, _ = model(ids, attention_mask=mask, labels=labels)
        for sites in (range(0, 3), range(3, 6), range(6, 8)):
            saved = table.clone()
            table[:, sites.start * width:sites.stop * width] += 1.0
            assert not torch.allclose(model(ids, attention_mask=mask, labels=labels)[0], ref)
            table.copy_(saved)


def test_encdec_generate_and_cache_match_full_forward_with_prefix():
    model = encdec()
    apply_prefix(model, PrefixConfig(num_virtual_tokens=5, projection_dim=24), seed=0)
    randomize_prefix(model)
    ids, mask, _ = _seq2seq_batch()
    n = 9
    tokens = model.generate(ids, mask, max_new_tokens=n)
    dec_in = torch.cat([torch.zeros(2, 1, dtype=torch.long), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        full, _ = model(ids, dec_in, attention_mask=mask)
        assert torch.equal(full.argmax(-1), tokens)
        memory = model.encode(ids, mask)
        cross = model._pad_bias(mask, memory.dtype)
        cache = _DecoderCache(model, memory, n)
        assert (cache.length, cache.prefix_len) == (5, 5)
        pre = model._logits(model.decoder(model.shared(dec_in[:, :4]), None, cross, cache=cache))
        rest = [model._logits(model.decoder(model.shared(dec_in[:, t:t + 1]), None, cross, cache=cache))
                for t in range(4, n)]
    torch.testing.assert_close(torch.cat([pre, *rest], dim=1), full, atol=1e-4, rtol=0)


def test_padding_masks_extend_over_prefix():
    """A padded row gives the same outputs on its tokens as the row alone: pads stay hidden, prefix seen."""
    ids, mask, labels = _seq2seq_batch()
    model = encdec()
    apply_prefix(model, PrefixConfig(num_virtual_tokens=3), seed=0)
    randomize_prefix(model)
    with torch.no_grad():
        both, _ = model(ids, attention_mask=mask, labels=labels)
        alone, _ = model(ids[1:, :6], labels=labels[1:])
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    enc = Encoder(encoder_cfg()).eval()
    apply_prefix(enc, PrefixConfig(num_virtual_tokens=3), seed=0)
    randomize_prefix(enc)
    with torch.no_grad():
        both, _ = enc(ids, attention_mask=mask)
        alone, _ = enc(ids[1:, :6])
    torch.testing.assert_close(both[1:, :6], alone, atol=1e-5, rtol=1e-5)


def test_encoder_classifier_prefix_keeps_head_trainable():
    torch.manual_seed(0)
    model = EncoderClassifier(encoder_cfg()).eval()
    apply_prefix(model, PrefixConfig(num_virtual_tokens=4, projection_dim=16), seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [n for n, _ in model.named_parameters()
                         if n.startswith("encoder.prefix.") or n.startswith("classifier.")]
    assert {id(p) for p in prefix_parameters(model)} == {id(p) for p in model.encoder.prefix.parameters()}


# -- save / load ------------------------------------------------------------------------------------------

def _roundtrip(make, tmp_path, forward):
    model = make()
    apply_prefix(model, PrefixConfig(num_virtual_tokens=5, projection=True, projection_dim=24), seed=0)
    randomize_prefix(model)
    with torch.no_grad():
        ref = forward(model)
    out = save_prefix(model, tmp_path / "adapter", base_model="runs/base/final")
    loaded = load_prefix(make(), out)
    with torch.no_grad():
        assert torch.equal(forward(loaded), ref)
    return json.loads((out / "adapter_config.json").read_text()), loaded


def test_save_load_round_trip_exact_decoder(tmp_path):
    x = torch.randint(0, VOCAB, (2, 10))
    cfg, loaded = _roundtrip(lambda: decoder(**LLAMA), tmp_path, lambda m: m(x)[0])
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["num_virtual_tokens"], cfg["num_layers"], cfg["num_attention_heads"], cfg["token_dim"]) == (5, 2, 2, 32)
    assert cfg["prefix_projection"] is True and cfg["encoder_hidden_size"] == 24 and cfg["inference_mode"] is True
    assert cfg["base_model_name_or_path"] == "runs/base/final"
    from safetensors.torch import load_file

    assert {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items()} == {
        "prompt_embeddings": (5, 2 * 2 * 32)}
    # the loaded prefix is the stored table: trainable, without the MLP
    assert loaded.prefix.projection is False
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == ["prefix.embedding.weight"]


def test_save_load_round_trip_exact_encdec_and_classifier(tmp_path):
    ids, mask, labels = _seq2seq_batch()
    cfg, _ = _roundtrip(encdec, tmp_path / "t5", lambda m: m(ids, attention_mask=mask, labels=labels)[0])
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and cfg["num_transformer_submodules"] == 2

    def classifier():
        torch.manual_seed(0)
        return EncoderClassifier(encoder_cfg()).eval()

    def trained_head_forward(m):
        return m(ids, attention_mask=mask)[0]

    model = classifier()
    apply_prefix(model, PrefixConfig(num_virtual_tokens=3), seed=0)
    randomize_prefix(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # a trained head travels with the adapter
        ref = trained_head_forward(model)
    out = save_prefix(model, tmp_path / "cls")
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    with torch.no_grad():
        assert torch.equal(trained_head_forward(load_prefix(classifier(), out)), ref)


def test_load_refuses_wrong_model_or_adapter_type(tmp_path):
    model = decoder(**GPT2)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=4), seed=0)
    out = save_prefix(model, tmp_path / "a")
    with pytest.raises(ValueError, match="prompt_embeddings has shape"):
        load_prefix(decoder(**GPT2, n_layer=3), out)
    with pytest.raises(ValueError, match="already has a prefix"):
        apply_prefix(model, PrefixConfig())
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="not PREFIX_TUNING"):
        load_prefix(decoder(**GPT2), out)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixConfig(num_virtual_tokens=0).validate()


def test_determinism(tmp_path):
    def run():
        model = decoder(**LLAMA)
        apply_prefix(model, PrefixConfig(num_virtual_tokens=4, projection_dim=16, dropout=0.1), seed=7)
        model.train()
        torch.manual_seed(123)  # dropout draws
        opt = torch.optim.AdamW(prefix_parameters(model), lr=1e-2)
        x = torch.arange(24).view(2, 12) % VOCAB
        losses = []
        for _ in range(4):
            _, loss = model(x, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in prefix_parameters(model)]

    a = decoder(**GPT2)
    state = torch.random.get_rng_state()
    apply_prefix(a, PrefixConfig(num_virtual_tokens=4), seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # a seeded init leaves the global RNG alone
    (la, pa), (lb, pb) = run(), run()
    assert la == lb and all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


# -- PEFT parity -----------------------------------------------------------------------------------------

def _randomize_base(model) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.15 * noise)


def _hf_and_peft(tmp_path, model, adapter_dir):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from llmkit.models.hf import export_hf

    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    return peft.PeftModel.from_pretrained(hf, adapter_dir).eval() if adapter_dir else hf


def test_peft_loads_ours_with_equal_logits_rope(tmp_path):
    """Llama-style (rope, GQA): HF + PEFT place tokens after the P virtual ones; rope makes that a fixed
    rotation of the stored keys, so the logits agree exactly."""
    pytest.importorskip("peft")
    model = decoder(**LLAMA)
    _randomize_base(model)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=5, projection=True, projection_dim=24), seed=0)
    out = save_prefix(model, tmp_path / "adapter")
    base = decoder(**LLAMA)
    _randomize_base(base)
    pm = _hf_and_peft(tmp_path, base, out)
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        theirs = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits
        ours, _ = model(x)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_peft_trained_adapter_loads_into_llmkit(tmp_path):
    peft = pytest.importorskip("peft")
    base = decoder(**LLAMA)
    _randomize_base(base)
    hf = _hf_and_peft(tmp_path, base, None)
    pm = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                                         prefix_projection=True, encoder_hidden_size=20))
    x = torch.randint(0, VOCAB, (2, 12))
    pm.eval()
    with torch.no_grad():
        theirs = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits
    pm.save_pretrained(tmp_path / "peft_adapter")
    ours = load_prefix(base, tmp_path / "peft_adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs, atol=1e-4, rtol=0)


def test_peft_gpt2_differs_only_by_its_position_shift(tmp_path):
    """Learned positions: PEFT reads tokens at positions P..P+T-1, llmkit keeps 0..T-1 (the file loads,
    the logits differ); shifting our position table by P reproduces PEFT's logits."""
    pytest.importorskip("peft")
    model = decoder(**GPT2)
    _randomize_base(model)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=5, projection=False), seed=0)
    out = save_prefix(model, tmp_path / "adapter")
    base = decoder(**GPT2)
    _randomize_base(base)
    pm = _hf_and_peft(tmp_path, base, out)
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        theirs = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits
        assert (model(x)[0] - theirs).abs().max() > 1e-2
        model.pos_emb.weight[:-5] = model.pos_emb.weight[5:].clone()
        torch.testing.assert_close(model(x)[0], theirs, atol=1e-4, rtol=0)


def test_peft_refuses_encdec_adapter(tmp_path):
    """PEFT prefixes only T5's decoder; our encoder + cross-attention prefix is wider and refused loudly."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from llmkit.models.hf import export_hf

    model = EncoderDecoder(EncDecConfig(vocab_size=VOCAB, n_layer=2, d_model=32, n_head=2, dropout=0.0))
    export_hf(model, tmp_path / "hf")
    apply_prefix(model, PrefixConfig(num_virtual_tokens=4), seed=0)
    out = save_prefix(model, tmp_path / "adapter")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf")
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(hf, out)
