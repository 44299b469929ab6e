"""LoRA adapters agree with Hugging Face `transformers` + `peft`, in both directions.

llmkit model + random nonzero LoRA -> export_hf(base) + save_lora -> AutoModel + PeftModel.from_pretrained
gives the same logits (within 1e-4) for every family: Llama-style and GPT-2-style decoders (GPT-2's
fused Conv1D c_attn carries a q + v adapter as one rank-2r LoRA), BERT (masked LM and sequence
classification with modules_to_save) and T5. The other way, an adapter that PEFT trained and saved on
the exported model loads into llmkit with the same logits. Merging agrees with PEFT's merge_and_unload.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="PEFT parity tests need transformers")
peft = pytest.importorskip("peft", reason="PEFT parity tests need peft (pip install peft)")

from llmkit.models.decoder import Decoder, DecoderConfig  # noqa: E402
from llmkit.models.encdec import EncDecConfig, EncoderDecoder  # noqa: E402
from llmkit.models.encoder import Encoder, EncoderClassifier, EncoderConfig  # noqa: E402
from llmkit.models.hf import export_hf, import_hf  # noqa: E402
from llmkit.models.lora import LoRAConfig, apply_lora, lora_parameters, merge_lora  # noqa: E402
from llmkit.models.lora_peft import load_lora, save_lora  # noqa: E402

VOCAB = 97
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matrices: extra threads only add synchronisation (very slow on a loaded 2-core machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(model: torch.nn.Module, std: float = 0.15) -> None:
    """Re-draw every parameter (norm weights around 1), so a wrong mapping cannot hide under tiny inits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))


def randomize_lora(model: torch.nn.Module, std: float = 0.2) -> None:
    """A trained-looking adapter: B nonzero, so the adapter really changes the function."""
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(std * torch.randn_like(p))


def llama_decoder(**kw) -> Decoder:
    cfg = DecoderConfig(vocab_size=VOCAB, block_size=32, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                        d_ff=96, activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=False,
                        **kw)
    return Decoder(cfg)


def gpt2_decoder(**kw) -> Decoder:
    cfg = DecoderConfig(vocab_size=VOCAB, block_size=32, n_layer=2, d_model=64, n_head=4,
                        activation="gelu_tanh", bias=True, **kw)
    return Decoder(cfg)


def adapted(make, lora: LoRAConfig, tmp_path, seed: int = 0):
    """(llmkit model with a random adapter, HF base dir, adapter dir)."""
    torch.manual_seed(seed)
    model = make().eval()
    randomize(model)
    base_dir = export_hf(model, tmp_path / "hf_base")
    apply_lora(model, lora)
    randomize_lora(model)
    adapter_dir = save_lora(model, tmp_path / "adapter", base_model=str(base_dir))
    return model, base_dir, adapter_dir


def ids(B: int = 2, T: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("targets,rslora", [
    (["q_proj", "v_proj"], False),
    (["all-linear"], True),
])
def test_llama_adapter_loads_in_peft(tmp_path, targets, rslora):
    model, base_dir, adapter_dir = adapted(llama_decoder, LoRAConfig(r=4, alpha=8, targets=targets,
                                                                     rslora=rslora), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    x = ids()
    with torch.no_grad():
        ours = model(x)[0]
        theirs = pm(x).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    # the adapter matters: without it the logits differ clearly
    with pm.disable_adapter(), torch.no_grad():
        base = pm(x).logits
    assert (base - theirs).abs().max() > 0.1
    # every PEFT module we wrote is targeted exactly: k_proj of a q,v adapter has no LoRA in PEFT
    lora_mods = {n.rsplit(".lora_A", 1)[0] for n, _ in pm.named_parameters() if ".lora_A." in n}
    expected = 2 * (2 if targets == ["q_proj", "v_proj"] else 7)
    assert len(lora_mods) == expected
    # merge agrees with PEFT's merge_and_unload
    merged_hf = pm.merge_and_unload()
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], merged_hf(x).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("rslora", [False, True])
def test_gpt2_fused_c_attn_is_a_rank_2r_adapter(tmp_path, rslora):
    lora = LoRAConfig(r=4, alpha=16, targets=["q_proj", "v_proj", "o_proj", "up_proj"], rslora=rslora)
    model, base_dir, adapter_dir = adapted(gpt2_decoder, lora, tmp_path)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    assert sorted(cfg["target_modules"]) == ["attn.c_proj", "c_attn", "c_fc"]  # not mlp.c_proj
    assert cfg["rank_pattern"] == {"c_attn": 8}
    assert cfg["alpha_pattern"]["c_attn"] == pytest.approx(16 * (2 ** 0.5 if rslora else 2))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    a = pm.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight
    assert tuple(a.shape) == (8, 64)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], pm(x).logits, rtol=0, atol=ATOL)
    merged_hf = pm.merge_and_unload()  # Conv1D merge uses fan_in_fan_out
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], merged_hf(x).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_peft_trained_adapter_loads_into_llmkit(tmp_path, kind):
    """The other direction: PEFT's own adapter (GPT-2: a full-width c_attn LoRA) on the exported model."""
    torch.manual_seed(0)
    model = (gpt2_decoder if kind == "gpt2" else llama_decoder)().eval()
    randomize(model)
    base_dir = export_hf(model, tmp_path / "hf_base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    targets = ["c_attn", "c_fc"] if kind == "gpt2" else ["q_proj", "k_proj", "down_proj"]
    pcfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, fan_in_fan_out=kind == "gpt2",
                           task_type="CAUSAL_LM", rank_pattern={targets[-1]: 2},
                           alpha_pattern={targets[-1]: 5})
    pm = peft.get_peft_model(hf, pcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft_adapter")
    load_lora(model, tmp_path / "peft_adapter")
    model.eval()
    pm.eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], pm(x).logits, rtol=0, atol=ATOL)
    if kind == "gpt2":  # c_attn was one full-width adapter in PEFT and stays one in llmkit
        assert list(model.blocks[0].attn.qkv.ranges) == ["full"]
    # and it saves back in the same layout PEFT reads
    save_lora(model, tmp_path / "again")
    pm2 = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                         tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm2(x).logits, pm(x).logits, rtol=0, atol=ATOL)


def small_bert(**kw) -> EncoderConfig:
    return EncoderConfig(vocab_size=VOCAB, block_size=32, n_layer=2, d_model=64, n_head=4, d_ff=128,
                         dropout=0.1, **kw)


def test_bert_masked_lm_adapter_loads_in_peft(tmp_path):
    lora = LoRAConfig(r=4, alpha=8, targets=["query", "value", "dense"])
    model, base_dir, adapter_dir = adapted(lambda: Encoder(small_bert()), lora, tmp_path)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    # "dense" means the blocks' projections only, never the MLM head's transform.dense
    assert "dense" not in cfg["target_modules"]
    hf = transformers.AutoModelForMaskedLM.from_pretrained(base_dir)
    pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    assert not hasattr(pm.base_model.model.cls.predictions.transform.dense, "lora_A")
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 15:] = 0
    with torch.no_grad():
        ours = model(x, attention_mask=mask)[0]
        theirs = pm(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_bert_classifier_adapter_with_trained_head_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    model = EncoderClassifier(small_bert(n_labels=3)).eval()
    randomize(model)
    base_dir = export_hf(model, tmp_path / "hf_base")
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["query", "value"]))
    randomize_lora(model)
    with torch.no_grad():  # the head trains in full (modules_to_save): give it new weights
        for p in (*model.pooler.parameters(), *model.classifier.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    adapter_dir = save_lora(model, tmp_path / "adapter")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["pooler", "classifier"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir)
    pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    x = ids(B=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], pm(input_ids=x).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("activation,tied", [("gated-gelu", False), ("relu", True)])
def test_t5_adapter_loads_in_peft(tmp_path, activation, tied):
    cfg = EncDecConfig(vocab_size=VOCAB, n_layer=2, d_model=32, n_head=4, d_kv=8, d_ff=64,
                       activation=activation, tie_embeddings=tied, dropout=0.1,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16)
    lora = LoRAConfig(r=4, alpha=8, targets=["all-linear"])
    model, base_dir, adapter_dir = adapted(lambda: EncoderDecoder(cfg), lora, tmp_path)
    # cross-attention k/v are slices of llmkit's fused kv and separate modules in HF
    assert list(model.decoder.blocks[0].cross_attn.kv.ranges) == ["k", "v"]
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(base_dir)
    pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    src, tgt = ids(T=15), ids(T=11, seed=2)
    with torch.no_grad():
        ours = model(src, decoder_input_ids=tgt)[0]
        theirs = pm(input_ids=src, decoder_input_ids=tgt).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_merged_model_reimports_from_hf_with_the_same_logits(tmp_path):
    """merge -> export_hf -> import_hf: the merged plain model is an ordinary checkpoint."""
    model, _, _ = adapted(llama_decoder, LoRAConfig(r=4, alpha=8, targets=["all-linear"]), tmp_path)
    x = ids()
    with torch.no_grad():
        before = model(x)[0]
    merge_lora(model)
    back = import_hf(export_hf(model, tmp_path / "merged_hf"))
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], before, rtol=0, atol=ATOL)


@pytest.mark.parametrize("make", [gpt2_decoder, llama_decoder], ids=["gpt2-tied", "llama-untied"])
def test_trainable_token_rows_match_peft_both_ways(tmp_path, make):
    from llmkit.models.trainable_tokens import apply_trainable_tokens

    torch.manual_seed(0)
    model = make().eval()
    randomize(model)
    base_dir = export_hf(model, tmp_path / "hf_base")
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    tokens = apply_trainable_tokens(model, [50, 3, 7])
    randomize_lora(model)  # the token rows too: they are among lora_parameters
    assert any(p is tokens.values for p in lora_parameters(model))
    adapter_dir = save_lora(model, tmp_path / "adapter", base_model=str(base_dir))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["trainable_token_indices"] == [3, 7, 50]
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    x = ids()
    x[0, :3] = torch.tensor([3, 7, 50])  # the trained rows are read
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], pm(x).logits, rtol=0, atol=ATOL)
    # the other way: an adapter PEFT made with trainable_token_indices loads into llmkit
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    pm2 = peft.get_peft_model(hf2, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"] if make is llama_decoder
                                                   else ["c_attn"], trainable_token_indices=[9, 4])).eval()
    with torch.no_grad():
        for p in pm2.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    pm2.save_pretrained(tmp_path / "peft_made")
    again = import_hf(base_dir, tmp_path / "reimported")  # the base, as the export holds it
    load_lora(again, tmp_path / "peft_made")
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], pm2(x).logits, rtol=0, atol=ATOL)
