"""Every stage on a model brought in with `llmkit import hf`: random tiny transformers checkpoints of today's
architectures (Qwen2 with q/k/v biases, Llama 3 with llama3 RoPE scaling, Gemma 2, Phi-3 with fused qkv /
gate_up, Mistral with a sliding window), saved with save_pretrained beside a tokenizer that carries its own
chat template, and a padded embedding (more rows than the tokenizer has tokens, as Qwen2.5 ships).

Generation (Python and CLI) equals transformers' greedy tokens from transformers' own tokenization (bos
where the tokenizer declares it); SFT full / LoRA / prefix with the model's template; LoRA adapters load in
PEFT onto the original HF model with equal logits (and PEFT's own adapters load back); merge; INT8 in all
three modes; bench generate; the perplexity scorer equals transformers' loss; the lifecycle pipeline from an
imported base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from conftest import shared_file  # noqa: E402
from llmkit.chat import encode_chat, load_chat_template  # noqa: E402
from llmkit.cli import main  # noqa: E402
from llmkit.infer.generate import SamplingParams, generate, stream_tokens  # noqa: E402
from llmkit.models.io import load_model  # noqa: E402
from llmkit.models.lora import LoRAConfig, apply_lora, merge_lora  # noqa: E402
from llmkit.models.lora_peft import load_lora, save_lora  # noqa: E402
from llmkit.tokenizer import Tokenizer, iter_texts  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, max_position_embeddings=128)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' "
         "else m['role']) + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# tokenizer styles: specials, bos / eos / pad, template, whether raw text starts with bos (and how it says so)
STYLES = {
    "chatml": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                   pad="<|endoftext|>", template=CHATML, bos_by=None),
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>",
                   template=LLAMA3, bos_by="post_processor"),
    "gemma": dict(specials=["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>",
                  eos="<end_of_turn>", pad="<pad>", template=GEMMA, bos_by="post_processor"),
}
ARCHS = {
    "qwen2": ("Qwen2Config", "chatml", dict(tie_word_embeddings=True)),
    "llama3": ("LlamaConfig", "llama3", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "gemma2": ("Gemma2Config", "gemma", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                             attn_logit_softcapping=20.0, final_logit_softcapping=15.0)),
    "phi3": ("Phi3Config", "chatml", dict()),
    "mistral": ("MistralConfig", "chatml", dict(sliding_window=8)),
}
PROMPT = "Give me two tips for learning Chinese."
CONV = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]


@pytest.fixture(scope="module")
def base_tokenizer() -> str:
    texts = list(iter_texts(shared_file("instruct/alpaca_en_demo.json")))[:300]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + [PROMPT], trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


def write_tokenizer(d: Path, style: str, base: str) -> int:
    """The tokenizer files of `style` in `d`; returns the tokenizer's size."""
    s = STYLES[style]
    tok = HFTokenizer.from_str(base)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in s["specials"]])
    if s["bos_by"] == "post_processor":  # as Llama 3 / Gemma tokenizer.json files add bos
        bos_id = tok.token_to_id(s["bos"])
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{s['bos']} $A", pair=f"{s['bos']} $A {s['bos']} $B",
                                          special_tokens=[(s["bos"], bos_id)])])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "chat_template": s["template"], "bos_token": s["bos"], "eos_token": s["eos"], "pad_token": s["pad"]}
    if s["bos_by"]:
        cfg["add_bos_token"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok.get_vocab_size(with_added_tokens=True)


def randomize(model, std=0.2):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if "gemma" in type(model).__name__.lower() else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))


def make_hf(d: Path, arch: str, base: str, pad_to: int = 64, **extra) -> tuple[Path, int]:
    """A random tiny HF checkpoint of `arch` with its tokenizer in `d`; the embedding is padded to a multiple
    of `pad_to` rows. Returns (d, tokenizer size)."""
    cls, style, kw = ARCHS[arch]
    n_tok = write_tokenizer(d, style, base)
    s = STYLES[style]
    tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
    ids = {"bos_token_id": tok.token_to_id(s["bos"]) if s["bos"] else None,
           "eos_token_id": tok.token_to_id(s["eos"]), "pad_token_id": tok.token_to_id(s["pad"])}
    vocab = -(-n_tok // pad_to) * pad_to + (pad_to if n_tok % pad_to == 0 else 0)
    torch.manual_seed(0)
    cfg = getattr(transformers, cls)(**SMALL, vocab_size=vocab, **ids, **{**kw, **extra})
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    randomize(model)
    model.save_pretrained(d)
    return d, n_tok


@pytest.fixture(scope="module")
def imported(tmp_path_factory, base_tokenizer) -> dict[str, tuple[Path, Path, int]]:
    """arch -> (HF dir, llmkit dir from `llmkit import hf`, tokenizer size)."""
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for arch in ARCHS:
        hf_dir, n_tok = make_hf(root / f"hf_{arch}", arch, base_tokenizer)
        main(["import", "hf", "--from", str(hf_dir), "--out", str(root / arch)])
        out[arch] = (hf_dir, root / arch, n_tok)
    return out


def hf_model(hf_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()


# -- tokenizer: bos as the model declares ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama3", "gemma2"])
def test_raw_text_ids_equal_transformers_and_chat_prompts_keep_one_bos(imported, arch):
    hf_dir, model_dir, _ = imported[arch]
    ours, theirs = Tokenizer.load(model_dir), transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert ours.add_bos_token == (STYLES[ARCHS[arch][1]]["bos"] is not None)
    for text in (PROMPT, "hello  world\n用中文说", ""):
        assert ours.encode(text, add_bos=ours.add_bos_token) == theirs(text)["input_ids"], text
    template = load_chat_template(model_dir)
    ids, _ = encode_chat(ours, CONV, template)
    want = theirs.apply_chat_template(CONV, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert ids == list(want)
    if ours.bos_id is not None:
        assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1  # the template's bos, not doubled


def test_llmkit_tokenizers_declare_no_bos(tmp_path):
    from llmkit.tokenizer import train_bpe

    tok = train_bpe(["some text to train on"] * 20, vocab_size=300)
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert not tok.add_bos_token and not again.add_bos_token
    assert again.encode("some text") == tok.encode("some text")


# -- generate ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_python_and_cli_equal_transformers_greedy(imported, arch, capsys):
    hf_dir, model_dir, n_tok = imported[arch]
    hf = hf_model(hf_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    seq = theirs(PROMPT)["input_ids"]
    want = []
    with torch.no_grad():
        for _ in range(8):  # transformers' greedy choice among the tokenizer's ids
            nxt = int(hf(torch.tensor([seq])).logits[0, -1, :n_tok].argmax())
            want.append(nxt)
            seq = seq + [nxt]
    model, tok = load_model(model_dir), Tokenizer.load(model_dir)
    ids = tok.encode(PROMPT, add_bos=tok.add_bos_token)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    got = list(stream_tokens(model, ids, params, vocab_limit=len(tok)))
    assert got == want
    stop = next((i for i, t in enumerate(got) if t in tok.eos_ids), len(got))
    assert generate(model, tok, PROMPT, SamplingParams(max_new_tokens=8, temperature=0.0)) == tok.decode(got[:stop])
    capsys.readouterr()
    main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--raw", "--temperature", "0",
          "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert out == PROMPT + tok.decode(got[:stop], skip_special_tokens=True) + "\n"
    main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.endswith("\n")  # the chat path: the model's own template


def test_padded_rows_are_never_generated_and_decode_does_not_crash(tmp_path, base_tokenizer):
    # an untied head whose padding rows are 5x the real rows: unmasked, argmax would always be a padding id
    hf_dir, n_tok = make_hf(tmp_path / "hf", "qwen2", base_tokenizer, pad_to=n_tok_pad(base_tokenizer),
                            tie_word_embeddings=False)
    model_dir = tmp_path / "qwen"
    main(["import", "hf", "--from", str(hf_dir), "--out", str(model_dir)])
    model, tok = load_model(model_dir), Tokenizer.load(model_dir)
    V = model.config.vocab_size
    assert V >= 2 * n_tok and len(tok) == n_tok
    with torch.no_grad():
        w = model.lm_head.weight
        w[n_tok:2 * n_tok] = 5 * w[:n_tok]
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        first = model(torch.tensor([ids]))[0][0, -1]
    assert int(first.argmax()) >= n_tok  # the test has teeth
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_new_tokens=12, temperature=temperature, top_p=None, seed=0, stop_at_eos=False)
        got = list(stream_tokens(model, ids, params, vocab_limit=len(tok)))
        assert len(got) == 12 and all(t < n_tok for t in got)
        assert int(got[0]) == int(first[:n_tok].argmax()) or temperature > 0
        tok.decode(got)
    assert isinstance(generate(model, tok, PROMPT, SamplingParams(max_new_tokens=6, temperature=1.0, seed=1)), str)


def n_tok_pad(base: str) -> int:
    # pad so the embedding has at least twice the tokenizer's rows
    return 2 * (HFTokenizer.from_str(base).get_vocab_size(with_added_tokens=True) + 8)


# -- fine-tuning, PEFT, merge, quantize ----------------------------------------------------------------------


def sft_config(model_dir: Path, out: Path, method: str, data: Path):
    from llmkit.finetune.sft import SFTConfig

    cfg = SFTConfig(out_dir=str(out), base_model=str(model_dir), method=method,
                    lora=LoRAConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]))
    cfg.data.paths = [str(data)]
    cfg.data.mix_pretrain = 0.0
    cfg.data.max_len = 48
    cfg.data.eval_max = 2
    cfg.prefix.length = 4
    t = cfg.train
    t.batch_size, t.max_steps, t.warmup_steps, t.log_interval = 2, 3, 1, 1
    t.eval_interval = t.checkpoint_interval = 3
    t.device, t.precision, t.progress, t.lr = "cpu", "fp32", False, 1e-3
    cfg.eval.answers, cfg.eval.samples, cfg.eval.max_new_tokens, cfg.eval.loss_batches = 1, 0, 4, 1
    cfg.track.enabled = False
    return cfg


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    rows = json.loads(shared_file("instruct/alpaca_en_demo.json").read_text(encoding="utf-8"))[:16]
    path = tmp_path_factory.mktemp("sft_data") / "en.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("arch,method", [(a, "lora") for a in ARCHS] + [("qwen2", "full"), ("llama3", "prefix")])
def test_finetune_with_the_models_own_template(imported, instructions, tmp_path, arch, method):
    from llmkit.finetune.sft import finetune_sft
    from llmkit.finetune.sft_data import build_sft_data

    _, model_dir, _ = imported[arch]
    cfg = sft_config(model_dir, tmp_path / "sft", method, instructions)
    tok, template = Tokenizer.load(model_dir), load_chat_template(model_dir)
    data = build_sft_data(cfg.data, tok, template, 128)
    marker = tok.token_to_id(STYLES[ARCHS[arch][1]]["eos"])
    assert all(marker in ex.ids for ex in data.train)  # rows written in the model's own template
    result = finetune_sft(cfg)
    assert result["eval_loss"] is not None and result["eval_loss"] == result["eval_loss"] < 50
    assert result["batch_width"] <= 47  # rows as wide as the longest example, not the model's 128 context
    final = tmp_path / "sft" / "final"
    assert final.is_dir()
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(x == x and x < 50 for x in losses)
    if method == "lora":
        model = load_lora(load_model(model_dir), final)
        assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_adapter_loads_in_peft_onto_the_original_hf_model(imported, tmp_path, arch):
    hf_dir, model_dir, n_tok = imported[arch]
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = load_model(model_dir)
    apply_lora(model, LoRAConfig(r=4, alpha=12, targets=targets))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    idx = torch.randint(0, n_tok, (2, 12))
    model.eval()
    with torch.no_grad():
        ours = model(idx)[0]
        base = hf_model(hf_dir)(idx).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the function
    save_lora(model, tmp_path / "adapter", base_model=str(hf_dir))
    pm = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = pm(idx).logits
    assert (ours - theirs).abs().max() <= 1e-4
    if arch == "phi3":  # fused modules: q + v on qkv_proj, gate + up on gate_up_proj
        keys = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
        assert "qkv_proj" in keys and "gate_up_proj" in keys
    again = load_lora(load_model(model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx)[0], ours, rtol=0, atol=1e-5)
        merged = merge_lora(again)(idx)[0]
    torch.testing.assert_close(merged, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["phi3", "qwen2"])
def test_a_peft_trained_adapter_of_the_hf_model_loads_into_llmkit(imported, tmp_path, arch):
    hf_dir, model_dir, n_tok = imported[arch]
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if arch == "phi3" else \
        ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    pm = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "peft")
    idx = torch.randint(0, n_tok, (1, 10))
    with torch.no_grad():
        theirs = pm.eval()(idx).logits
        ours = load_lora(load_model(model_dir), tmp_path / "peft").eval()(idx)[0]
    assert (ours - theirs).abs().max() <= 1e-4


def test_merge_quantize_bench_on_an_imported_lora(imported, tmp_path, capsys):
    from llmkit.infer.quantize import load_quantized

    hf_dir, model_dir, n_tok = imported["qwen2"]
    model = load_model(model_dir)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    save_lora(model, tmp_path / "adapter")
    main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")])
    idx = torch.randint(0, n_tok, (1, 16))
    with torch.no_grad():
        adapted = model.eval()(idx)[0]
        merged = load_model(tmp_path / "m")(idx)[0]
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-4)
    assert load_chat_template(tmp_path / "m") is not None  # the template travels
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(list(iter_texts(shared_file("instruct/alpaca_en_demo.json")))[:50]))
    for mode in ("dynamic", "weight_only", "static"):
        out = tmp_path / f"q_{mode}"
        extra = ["--calibration", str(calib), "--calibration-batches", "2"] if mode == "static" else []
        main(["quantize", "--model", str(tmp_path / "m"), "--out", str(out), "--mode", mode, *extra])
        q = load_quantized(out)
        with torch.no_grad():
            logits = q(idx)[0]
        rel = (logits - merged).norm() / merged.norm()
        assert rel < 0.1, (mode, float(rel))
        assert Tokenizer.load(out).digest() == Tokenizer.load(model_dir).digest()
    capsys.readouterr()
    main(["bench", "generate", "--model", str(tmp_path / "m"), "--batch", "1,2", "--prompt-len", "8",
          "--new-tokens", "4"])
    out = capsys.readouterr().out
    assert "tokens_per_s" in out or "tok" in out


# -- perplexity scorer and the pipeline -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_perplexity_scorer_equals_transformers_loss(imported, arch):
    from llmkit.data.perplexity import LlmkitScorer

    hf_dir, model_dir, _ = imported[arch]
    texts = [PROMPT, "Write a short poem about the sea, please."]
    scorer = LlmkitScorer(model_dir, batch_size=2)
    got = scorer.perplexities(texts)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf = hf_model(hf_dir)
    eos = theirs.convert_tokens_to_ids(STYLES[ARCHS[arch][1]]["eos"])
    for text, ppl in zip(texts, got):
        ids = theirs(text)["input_ids"]
        if not scorer.tokenizer.add_bos_token:
            ids = [eos, *ids]  # llmkit's own convention: the context starts with EOS
        x = torch.tensor([ids + [eos]])
        with torch.no_grad():
            loss = hf(x, labels=x).loss
        assert abs(ppl - float(torch.exp(loss))) <= 1e-3 * ppl


def test_pipeline_from_an_imported_base(imported, instructions, tmp_path):
    from llmkit.config import load_config
    from llmkit.pipeline.config import PipelineConfig
    from llmkit.pipeline.run import run_pipeline

    _, model_dir, _ = imported["qwen2"]
    (tmp_path / "sft.yaml").write_text(f"""
task: sft
base_model: {model_dir}
method: lora
lora: {{r: 4, alpha: 8, targets: [q_proj, v_proj]}}
data: {{paths: [{instructions}], mix_pretrain: 0.0, max_len: 48, eval_max: 2}}
train: {{batch_size: 2, max_steps: 2, warmup_steps: 1, eval_interval: 2, checkpoint_interval: 2, log_interval: 1,
        progress: false, device: cpu}}
eval: {{answers: 1, samples: 0, max_new_tokens: 4}}
""", encoding="utf-8")
    (tmp_path / "pipe.yaml").write_text(f"""
name: imported
out_dir: {tmp_path / 'runs' / 'imported'}
samples: {{enabled: false}}
data: {{enabled: false}}
tokenizer: {{enabled: false}}
tokens: {{enabled: false}}
pretrain: {{enabled: false}}
sft: {{config: {tmp_path / 'sft.yaml'}}}
quantize: {{mode: dynamic}}
eval: {{load_requests: 2, load_concurrency: 2, max_new_tokens: 4}}
register: {{aliases: [candidate]}}
track: {{uri: sqlite:///{tmp_path / 'runs' / 'mlflow.db'}}}
""", encoding="utf-8")
    state = run_pipeline(load_config(PipelineConfig, tmp_path / "pipe.yaml"))
    stages = state["stages"]
    assert "pretrain" not in stages and list(stages)[0] == "sft"
    assert all(r["status"] == "done" for r in stages.values()), {k: r["status"] for k, r in stages.items()}
    assert stages["register"]["status"] == "done"
    merged = Path(stages["merge"]["artifact"])
    assert load_chat_template(merged) is not None and Tokenizer.load(merged).digest() == \
        Tokenizer.load(model_dir).digest()


def test_smollm2_lora_recipe_loads():
    from llmkit.config import load_config
    from llmkit.finetune.sft import SFTConfig

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(SFTConfig, root / "configs" / "smollm2_lora_zh.yaml")
    assert cfg.method == "lora" and cfg.base_model == "runs/smol"
    assert [Path(p).name for p in cfg.data.paths] == ["alpaca_zh_demo.json", "alpaca_en_demo.json"]
