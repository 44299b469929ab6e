"""Open-weight decoder architectures against `transformers`, on random tiny configs: Llama (with every RoPE
scaling), Qwen2, Qwen3, Mistral (sliding window), Phi-3 (fused projections, LongRoPE) and Gemma 2.

For each: import logits equal HF's (fp32, 1e-4) over a sequence longer than the sliding window and the
original RoPE context; greedy generation from llmkit's KV cache equals HF `generate`; the export loads in
transformers as the same architecture with equal logits; and the continuous-batching Engine (its own
batched prefill/decode over the model's layers) gives the model's own greedy tokens.
"""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[dev]'); HF interop tests need it"
)

from llmkit.infer.engine import Engine, RequestParams  # noqa: E402
from llmkit.models import Decoder, DecoderConfig, KVCache  # noqa: E402
from llmkit.models.hf import export_hf, import_hf  # noqa: E402

VOCAB = 96
T_LONG = 40  # longer than every window (8) and original RoPE context (16) below
SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
             pad_token_id=0)


def rope(kind, **kw):
    return {"rope_type": kind, "rope_theta": 10000.0, **kw}


ARCHS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "llama-explicit-head-dim": lambda: transformers.LlamaConfig(**SMALL, head_dim=24),
    "llama2-linear": lambda: transformers.LlamaConfig(**SMALL, rope_parameters=rope("linear", factor=2.0)),
    "llama-dynamic": lambda: transformers.LlamaConfig(
        **{**SMALL, "max_position_embeddings": 16}, rope_parameters=rope("dynamic", factor=4.0)),
    "llama-yarn": lambda: transformers.LlamaConfig(**SMALL, rope_parameters=rope(
        "yarn", factor=4.0, original_max_position_embeddings=16)),
    "llama3": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True, rope_parameters=rope(
        "llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "qwen2-sliding-upper-layers": lambda: transformers.Qwen2Config(
        **SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=32),
    "mistral-sliding-window": lambda: transformers.MistralConfig(**SMALL, sliding_window=8),
    "phi3": lambda: transformers.Phi3Config(**SMALL),
    "phi3-longrope-window": lambda: transformers.Phi3Config(
        **SMALL, sliding_window=12, original_max_position_embeddings=16, rope_parameters=rope(
            "longrope", short_factor=[1.0 + 0.1 * i for i in range(8)], long_factor=[1.0 + 0.5 * i for i in range(8)],
            original_max_position_embeddings=16)),
    "phi4-mini-partial-rotary": lambda: transformers.Phi3Config(
        **SMALL, partial_rotary_factor=0.75, original_max_position_embeddings=16, rope_parameters=rope(
            "longrope", short_factor=[1.0 + 0.1 * i for i in range(6)], long_factor=[1.0 + 0.5 * i for i in range(6)],
            original_max_position_embeddings=16, partial_rotary_factor=0.75)),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, head_dim=32),
    "gemma2": lambda: transformers.Gemma2Config(
        **SMALL, head_dim=32, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=5.0,
        final_logit_softcapping=4.0),
}
ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
              "gemma": "GemmaForCausalLM", "phi4": "Phi3ForCausalLM"}


def randomize(model, std=0.15):
    # Default inits keep activations so small that a wrong norm, scale or rotation would stay under the
    # tolerance; re-draw every parameter so such mistakes show up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if "gemma" in type(model).__name__.lower() else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))


def hf_model(name):
    torch.manual_seed(0)
    cfg = ARCHS[name]()
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    randomize(model)
    return model


def max_diff(ours, hf, idx):
    with torch.no_grad():
        a, _ = ours.eval()(idx)
        b = hf.eval()(idx).logits
    return (a - b).abs().max().item()


def greedy(model, prompt, n):
    cache = KVCache(model.config, batch_size=1)
    out = []
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt]), cache=cache)
        for _ in range(n):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            logits, _ = model(torch.tensor([[nxt]]), cache=cache)
    return out


@pytest.fixture(scope="module")
def figures():
    """Max abs logit differences per architecture and direction, printed at the end (docs/hf.md)."""
    got: dict[str, dict[str, float]] = {}
    yield got
    print("\n" + json.dumps(got, indent=1))


@pytest.mark.parametrize("name", ARCHS)
def test_architecture_parity_both_directions_and_generation(name, tmp_path, figures):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="tokenizer"):
        model = import_hf(tmp_path / "hf", tmp_path / "ours")
    arch = next(cls for prefix, cls in ARCH_CLASS.items() if name.startswith(prefix))
    assert model.config.hf_architecture == arch
    assert model.config.rope_dim == (12 if "partial" in name else model.config.head_dim)
    torch.manual_seed(1)
    T = min(T_LONG, model.config.block_size)
    idx = torch.randint(0, VOCAB, (2, T))
    d_import = max_diff(model, hf, idx)
    d_short = max_diff(model, hf, idx[:, :10])  # within the window / original context
    assert d_import <= 1e-4 and d_short <= 1e-4, (d_import, d_short)

    # greedy generation through llmkit's KV cache = HF generate (with its own cache), past the window
    prompt = torch.randint(2, VOCAB, (6,)).tolist()
    n_new = T - len(prompt) - 2
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy(model, prompt, n_new) == expected

    # export: transformers loads the same architecture with the same logits
    out = export_hf(tmp_path / "ours", tmp_path / "back")
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(back).__name__ == arch
    d_export = max_diff(model, back, idx)
    assert d_export <= 1e-4, d_export
    # and the exported checkpoint imports back to the same function
    assert max_diff(import_hf(out), back, idx) <= 1e-4
    figures[name] = {"import": d_import, "export": d_export}


@pytest.mark.parametrize("name", ["llama3", "llama-dynamic", "qwen2-sliding-upper-layers", "qwen3",
                                  "mistral-sliding-window", "phi3-longrope-window", "phi4-mini-partial-rotary",
                                  "gemma2"])
def test_engine_greedy_equals_model_generate(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    model = import_hf(tmp_path / "hf")
    torch.manual_seed(2)
    shared = torch.randint(2, VOCAB, (17,)).tolist()
    prompts = [shared + [5, 6, 7], torch.randint(2, VOCAB, (5,)).tolist(), shared + [9]]  # 3rd: prefix-cache hit
    n_new = 20  # past the sliding windows and the original RoPE context
    expected = [greedy(model, p, n_new) for p in prompts]
    engine = Engine(model, max_batch=2, prefix_block=8)  # 2 slots: the third request joins a running batch
    got = engine.generate(prompts, RequestParams(max_new_tokens=n_new, temperature=0.0, stop_at_eos=False))
    assert got == expected
    # prompts beyond the original context (16 here) of a longrope / dynamic model skip the prefix cache:
    # their keys use frequencies of their own length throughout
    assert (engine.stats()["prefix_hits"] > 0) == (name not in ("phi3-longrope-window", "phi4-mini-partial-rotary",
                                                                "llama-dynamic"))


def test_sliding_window_is_real():
    # The parity above would also hold if both sides ignored the window: check that it changes the logits
    # exactly from the first position whose window excludes a key, in the full pass and from the cache.
    hf = hf_model("mistral-sliding-window")
    cfg = transformers.MistralConfig(**SMALL, sliding_window=8)
    assert cfg.sliding_window == 8
    model = import_hf_from(hf)
    assert model.config.sliding_window == 8 and all(b.attn.window == 8 for b in model.blocks)
    full = Decoder(DecoderConfig(**{**model.config.__dict__, "sliding_window": None}))
    full.load_state_dict(model.state_dict())
    idx = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        a, b = model.eval()(idx)[0], full.eval()(idx)[0]
        # the KV cache is a rolling buffer of 8 slots; feed it chunks (also one longer than the window, after
        # it has wrapped) and single tokens
        cache = KVCache(model.config, 1)
        assert cache.k.shape[3] == 8 and cache.max_len == model.config.block_size
        chunks = [(0, 5), (5, 12)] + [(t, t + 1) for t in range(12, 20)] + [(20, 30)]
        stepwise = torch.cat([model(idx[:, i:j], cache=cache)[0] for i, j in chunks], dim=1)
        kept = KVCache(model.config, 1, rolling=False)
        assert kept.k.shape[3] == model.config.block_size
        in_place = torch.cat([model(idx[:, i:j], cache=kept)[0] for i, j in chunks], dim=1)
    diff = (a - b).abs().amax(-1)[0]
    assert diff[:8].max() < 1e-6 and diff[8:].min() > 1e-4  # position 8 is the first that cannot see key 0
    torch.testing.assert_close(stepwise, a, rtol=0, atol=1e-4)
    torch.testing.assert_close(in_place, a, rtol=0, atol=1e-4)


def import_hf_from(hf):
    import tempfile
    import warnings
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(Path(d))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return import_hf(d)


def test_default_options_add_no_parameters_or_modules():
    # existing llmkit checkpoints keep loading: a default config has exactly the old parameter names
    cfg = DecoderConfig(vocab_size=VOCAB, block_size=16, n_layer=1, d_model=64, n_head=4, positions="rope",
                        norm="rmsnorm", activation="swiglu")
    names = sorted(Decoder(cfg).state_dict())
    assert names == sorted(["tok_emb.weight", "lm_head.weight", "norm_f.weight", "blocks.0.norm1.weight",
                            "blocks.0.norm2.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                            "blocks.0.mlp.gate.weight", "blocks.0.mlp.up.weight", "blocks.0.mlp.down.weight"])
    block = Decoder(cfg).blocks[0]
    assert block.attn_out_norm is None and block.attn.q_norm is None and block.attn.window is None
    assert block.attn.softcap is None and cfg.head_dim == 16


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "phi3", "gemma2"])
def test_lora_targets_resolve_and_merge_on_new_options(name):
    from llmkit.models.lora import LoRAConfig, apply_lora, merge_lora

    model = import_hf_from(hf_model(name))
    idx = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        before = model(idx)[0]
    adapted = apply_lora(model, LoRAConfig(r=4, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"]))
    assert len(adapted) == 5 * model.config.n_layer  # qkv (three slices), proj, gate, up, down per block
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], before)  # a fresh adapter changes nothing
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        adapted_logits = model(idx)[0]
        assert (adapted_logits - before).abs().max() > 1e-3
        torch.testing.assert_close(merge_lora(model)(idx)[0], adapted_logits, rtol=0, atol=1e-4)


def test_padded_vocabulary_keeps_every_row(tmp_path):
    # checkpoints often pad the embedding past the tokenizer (Qwen2.5: 151936 rows, 151665 tokens):
    # every row is kept both ways, and the logits keep their width
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**SMALL, "vocab_size": 128})).eval()
    model = import_hf_from(hf)
    assert model.config.vocab_size == 128 and model.tok_emb.weight.shape[0] == 128
    out = export_hf(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128
    idx = torch.randint(0, VOCAB, (1, 8))
    assert max_diff(model, transformers.AutoModelForCausalLM.from_pretrained(out), idx) <= 1e-4


def write_config(path, **cfg):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
            max_position_embeddings=64)


@pytest.mark.parametrize("arch, extra, field", [
    ("Qwen3ForCausalLM", dict(attention_bias=True), "attention_bias"),
    ("Gemma2ForCausalLM", dict(hidden_activation="relu"), "hidden_activation"),
    ("Gemma2ForCausalLM", dict(sliding_window=8, layer_types=["sliding_attention", "chunked_attention"]),
     "layer_types"),
    ("MistralForCausalLM", dict(hidden_act="gelu"), "hidden_act"),
    ("Phi3ForCausalLM", dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 8}), "rope_scaling"),
    ("LlamaForCausalLM", dict(partial_rotary_factor=0.75), "partial_rotary_factor"),
    ("LlamaForCausalLM", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
    ("Qwen2MoeForCausalLM", dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                 mlp_only_layers=[1]), "mlp_only_layers"),
    ("Qwen2MoeForCausalLM", {}, "num_experts"),
    ("MixtralForCausalLM", {}, "num_local_experts"),
])
def test_unsupported_options_are_refused_naming_the_key(tmp_path, arch, extra, field):
    d = write_config(tmp_path / "m", architectures=[arch], **{**BASE, **extra})
    with pytest.raises(ValueError, match=f"^{field}"):
        import_hf(d)


@pytest.mark.parametrize("kw, field", [
    (dict(hf_architecture="LlamaForCausalLM", sliding_window=8), "sliding_window"),
    (dict(hf_architecture="MistralForCausalLM", qkv_bias=True), "qkv_bias"),
    (dict(hf_architecture="Phi3ForCausalLM", rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(hf_architecture="Qwen2ForCausalLM", qk_norm=True), "qk_norm"),
    (dict(hf_architecture="LlamaForCausalLM", attn_softcap=50.0), "attn_softcap"),
    (dict(hf_architecture="GemmaForCausalLM", activation="geglu_tanh", scale_embeddings=True,
          norm_unit_offset=True, post_norms=True), "post_norms"),
    (dict(hf_architecture="FalconForCausalLM"), "hf_architecture"),
])
def test_export_refuses_options_the_architecture_lacks(tmp_path, kw, field):
    model = Decoder(DecoderConfig(vocab_size=VOCAB, block_size=16, n_layer=2, d_model=64, n_head=4,
                                  positions="rope", norm="rmsnorm", **{"activation": "swiglu", **kw}))
    with pytest.raises(ValueError, match=f"^{field}"):
        export_hf(model, tmp_path / "hf")


@pytest.mark.parametrize("kw, arch", [
    (dict(qkv_bias=True), "Qwen2ForCausalLM"),
    (dict(qk_norm=True, head_dim=32), "Qwen3ForCausalLM"),
    (dict(sliding_window=6), "MistralForCausalLM"),
    (dict(activation="geglu_tanh", scale_embeddings=True, norm_unit_offset=True, head_dim=32), "GemmaForCausalLM"),
    (dict(activation="geglu_tanh", scale_embeddings=True, norm_unit_offset=True, post_norms=True,
          attn_softcap=20.0, final_softcap=10.0, sliding_window=6,
          layer_types=["sliding_attention", "full_attention"]), "Gemma2ForCausalLM"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
     "LlamaForCausalLM"),
])
def test_llmkit_options_export_to_the_architecture_that_has_them(tmp_path, kw, arch):
    # a model configured in llmkit (no hf_architecture) exports as the HF architecture its options need
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=VOCAB, block_size=32, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                                  positions="rope", norm="rmsnorm", **{"activation": "swiglu", **kw})).eval()
    randomize(model)
    out = export_hf(model, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(back).__name__ == arch
    assert max_diff(model, back, torch.randint(0, VOCAB, (2, 20))) <= 1e-4


def test_model_info_sizes_the_new_options():
    from llmkit.models.info import model_info

    cfg = DecoderConfig(vocab_size=VOCAB, block_size=32, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=32,
                        positions="rope", norm="rmsnorm", activation="geglu_tanh", qk_norm=True, post_norms=True,
                        sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    info = model_info(cfg, batch_size=2, seq_len=32)
    model = Decoder(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert info["parameters"]["total"] == n
    # q/k/v to 4 + 2 + 2 heads of 32, output from 4 x 32, q/k norms of 32: per layer
    assert info["parameters"]["attention"] == 2 * (64 * 8 * 32 + 4 * 32 * 64 + 2 * 32)
    assert info["parameters"]["norms"] == 2 * 4 * 64 + 64  # norm1, norm2 and the two post-norms; final norm
    assert info["memory_bytes"]["kv_cache"] == 2 * 2 * 2 * 32 * 2 * 32 * 2  # k+v, layers, batch, seq, kv heads, hd, bf16
    assert info["flops_per_token"] == 6 * n + 12 * 128 * (8 + 32)  # the sliding layer attends to 8 keys
    # every layer sliding: the cache is a rolling buffer of 8 positions
    all_sliding = model_info(dataclasses.replace(cfg, layer_types=None), batch_size=2, seq_len=32)
    assert all_sliding["memory_bytes"]["kv_cache"] == 2 * 2 * 2 * 8 * 2 * 32 * 2


@pytest.mark.parametrize("option, off", [("attn_softcap", None), ("final_softcap", None), ("attn_scale", None),
                                         ("scale_embeddings", False), ("sliding_window", None),
                                         ("norm_unit_offset", False)])
def test_each_gemma2_option_is_exercised_by_the_parity_config(option, off):
    # Gemma 2 matches HF bit for bit here; make sure each option actually bites on the tiny config, so the
    # parity test would catch it being wrong
    model = import_hf_from(hf_model("gemma2"))
    changed = Decoder(DecoderConfig(**{**model.config.__dict__, option: off}))
    changed.load_state_dict(model.state_dict())
    idx = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        assert (model.eval()(idx)[0] - changed.eval()(idx)[0]).abs().max() > 1e-3


# config.json as checkpoints on the hub write it (transformers 4.x: rope_theta + rope_scaling with "type" or
# "rope_type", Phi-3's top-level original_max_position_embeddings, no layer_types), at tiny sizes
HUB_4X = {
    "llama-3.2": dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0, head_dim=16,
                      rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                    "original_max_position_embeddings": 16, "rope_type": "llama3"},
                      tie_word_embeddings=True, attention_bias=False, mlp_bias=False, rms_norm_eps=1e-5),
    "llama-2-linear": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                           rope_scaling={"type": "linear", "factor": 4.0}),
    "qwen2.5": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
                    use_sliding_window=False, sliding_window=64, max_window_layers=21, tie_word_embeddings=True),
    "phi-3-128k": dict(architectures=["Phi3ForCausalLM"], model_type="phi3", original_max_position_embeddings=16,
                       rope_scaling={"type": "longrope", "long_factor": [1.0 + 0.5 * i for i in range(8)],
                                     "short_factor": [1.0 + 0.05 * i for i in range(8)]}, sliding_window=60),
    "gemma-2": dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", head_dim=32, query_pre_attn_scalar=32,
                    hidden_activation="gelu_pytorch_tanh", sliding_window=8, final_logit_softcapping=30.0,
                    attn_logit_softcapping=50.0, cache_implementation="hybrid"),
    "mistral-7b-v0.1": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8),
}


@pytest.mark.parametrize("name", HUB_4X)
def test_hub_style_4x_config_files(name, tmp_path):
    from safetensors.torch import save_file

    d = write_config(tmp_path / "hf", **{**SMALL, "num_hidden_layers": 2, "transformers_version": "4.45.0",
                                         **HUB_4X[name]})
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.from_pretrained(d)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    randomize(hf)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()
               if not (cfg.tie_word_embeddings and k == "lm_head.weight")}, str(d / "model.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    model = import_hf(d)
    assert max_diff(model, hf, torch.randint(0, VOCAB, (2, T_LONG))) <= 1e-4
    back = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "back"))
    assert type(back).__name__ == HUB_4X[name]["architectures"][0]
    assert max_diff(model, back, torch.randint(0, VOCAB, (2, T_LONG))) <= 1e-4
