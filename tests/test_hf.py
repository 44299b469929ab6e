"""Hugging Face interop: logits parity with `transformers` in both directions, GQA generation, refusals."""

import json

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[dev]'); HF interop tests need it"
)

from llmkit.models import Decoder, DecoderConfig, KVCache, load_model  # noqa: E402
from llmkit.models.hf import export_hf, import_hf  # noqa: E402

VOCAB = 101


def gpt2_hf(**kw):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=1, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def llama_hf(tie=False, **kw):
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=160, vocab_size=VOCAB,
                                   max_position_embeddings=64, tie_word_embeddings=tie,
                                   bos_token_id=0, eos_token_id=1, **kw)
    return transformers.LlamaForCausalLM(cfg)


def randomize(model, std=0.15):
    # Default inits (std 0.02, norms at 1/0) keep activations so small that e.g. exact vs tanh GELU or a
    # swapped norm would stay under the tolerance; re-draw every parameter so such mistakes show up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))


def assert_same_logits(llm, hf_model, T=24):
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        ours, _ = llm.eval()(idx)
        theirs = hf_model.eval()(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: gpt2_hf(), id="gpt2"),
    pytest.param(lambda: gpt2_hf(tie_word_embeddings=False, activation_function="gelu"), id="gpt2-untied-gelu"),
    pytest.param(lambda: llama_hf(tie=False), id="llama-gqa"),
    pytest.param(lambda: llama_hf(tie=True, rope_theta=500000.0), id="llama-tied-theta"),
])
def test_import_matches_transformers_logits(make, tmp_path):
    torch.manual_seed(0)
    hf_model = make().eval()
    randomize(hf_model)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    with pytest.warns(UserWarning, match="tokenizer"):
        model = import_hf(tmp_path / "hf", tmp_path / "llmkit")
    assert_same_logits(model, hf_model)
    # the written llmkit model dir loads back to the same function
    assert_same_logits(load_model(tmp_path / "llmkit"), hf_model)
    assert json.loads((tmp_path / "llmkit" / "generation_config.json").read_text())["eos_token_id"] == 1


LLMKIT_FLAVOURS = {
    "gpt2-gelu-tanh": dict(activation="gelu_tanh", bias=True),
    "gpt2-default-nobias-exact-gelu": dict(),
    "llama-gqa": dict(positions="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False,
                      n_kv_head=2, norm_eps=1e-6, rope_base=50000.0),
    "llama-tied-bias": dict(positions="rope", norm="rmsnorm", activation="swiglu", bias=True),
}


@pytest.mark.parametrize("kw", LLMKIT_FLAVOURS.values(), ids=LLMKIT_FLAVOURS.keys())
def test_export_loads_in_transformers_with_same_logits(kw, tmp_path):
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=VOCAB, block_size=64, n_layer=2, d_model=64, n_head=4, **kw)).eval()
    randomize(model)
    out = export_hf(model, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf_model.dtype == torch.float32
    assert_same_logits(model, hf_model)
    # and back again
    assert_same_logits(import_hf(out), hf_model)


def test_imported_llama_greedy_generation_matches_hf_generate(tmp_path):
    torch.manual_seed(0)
    hf_model = llama_hf().eval()
    hf_model.save_pretrained(tmp_path / "hf")
    model = import_hf(tmp_path / "hf")
    prompt = torch.randint(2, VOCAB, (1, 6))
    n_new = 12
    with torch.no_grad():
        expected = hf_model.generate(prompt, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new,
                                     eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:]
        cache = KVCache(model.config, batch_size=1)
        assert cache.k.shape[2] == 2  # the cache stores the 2 key/value heads, not the 4 query heads
        logits, _ = model(prompt, cache=cache)
        got = []
        for _ in range(n_new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            got.append(nxt.item())
            logits, _ = model(nxt, cache=cache)
    assert got == expected.tolist()


def write_hf_config(path, **cfg):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_unsupported_architecture_is_refused_listing_supported(tmp_path):
    d = write_hf_config(tmp_path / "m", architectures=["FalconForCausalLM"], model_type="falcon")
    with pytest.raises(ValueError, match=r"architectures: 'FalconForCausalLM'.*LlamaForCausalLM"):
        import_hf(d)


@pytest.mark.parametrize("extra, field", [
    (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling"),  # no factor
    (dict(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4, "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"}}), "rope_parameters"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_llama_features_llmkit_cannot_reproduce_are_refused(tmp_path, extra, field):
    base = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=160, vocab_size=VOCAB, max_position_embeddings=64)
    d = write_hf_config(tmp_path / "m", **{**base, **extra})
    with pytest.raises(ValueError, match=f"^{field}"):
        import_hf(d)


@pytest.mark.parametrize("kw, field", [
    (dict(positions="rope", norm="layernorm", activation="swiglu"), "norm"),
    (dict(positions="rope", norm="rmsnorm", activation="gelu"), "activation"),
    (dict(norm="rmsnorm"), "norm"),
    (dict(n_kv_head=2), "n_kv_head"),
])
def test_export_refuses_combinations_without_hf_architecture(tmp_path, kw, field):
    model = Decoder(DecoderConfig(vocab_size=VOCAB, block_size=16, n_layer=1, d_model=64, n_head=4, **kw))
    with pytest.raises(ValueError, match=f"^{field}"):
        export_hf(model, tmp_path / "hf")


@pytest.mark.parametrize("layout", ["sharded-safetensors", "pytorch_model.bin"])
def test_import_reads_sharded_and_bin_checkpoints(tmp_path, layout):
    torch.manual_seed(0)
    hf_model = llama_hf().eval()
    randomize(hf_model)
    d = tmp_path / "hf"
    if layout == "sharded-safetensors":
        hf_model.save_pretrained(d, max_shard_size="40KB")
        assert (d / "model.safetensors.index.json").is_file()
    else:
        hf_model.config.save_pretrained(d)
        torch.save(hf_model.state_dict(), d / "pytorch_model.bin")
    assert_same_logits(import_hf(d), hf_model)


def test_tokenizer_travels_both_ways(tmp_path):
    import warnings

    from llmkit.models import save_model
    from llmkit.tokenizer import train_char

    tok = train_char(["hello world"])
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, d_model=64, n_head=4))
    save_model(model, tmp_path / "m", tokenizer=tok)
    out = export_hf(tmp_path / "m", tmp_path / "hf")
    assert (out / "tokenizer.json").read_text() == (tmp_path / "m" / "tokenizer.json").read_text()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eos_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an llmkit tokenizer is copied without a warning
        import_hf(out, tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_cli_import_then_export_round_trip(tmp_path):
    import subprocess
    import sys

    hf = llama_hf()
    randomize(hf)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    run = lambda *a: subprocess.run([sys.executable, "-m", "llmkit", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=120)
    r = run("import", "hf", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"))
    assert r.returncode == 0, r.stderr
    r = run("export", "hf", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert_same_logits(load_model(tmp_path / "ours"), back)
    assert_same_logits(load_model(tmp_path / "ours"), hf)
    r = run("import", "hf", "--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "nowhere" in r.stderr
