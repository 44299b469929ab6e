"""A model's own Jinja chat template: llmkit renders and tokenizes exactly what transformers' apply_chat_template
does, for templates in the formats of ChatML / Qwen2.5, SmolLM2, Llama 3, Llama 2, Mistral, Gemma and Phi-3
(tests/chat_template_fixtures.py), over real alpaca records, multi-turn conversations, system prompts and
tools; loss masks from {% generation %} and from rendering prefixes; the model's eos list; foreign tokenizers."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from chat_template_fixtures import CHATML_GENERATION, STYLES
from conftest import shared_file
from llmkit.chat import (
    ChatFormatError,
    JinjaChatTemplate,
    chat_template_for,
    encode_chat,
    encode_chats,
    has_chat_template,
    load_chat_template,
    render_chat,
    save_chat_template,
)
from llmkit.chat_template import TemplateMaskError
from llmkit.finetune.instruction_formats import load_conversations
from llmkit.finetune.sft_data import InstructDataConfig, build_sft_data
from llmkit.tokenizer import Tokenizer, iter_texts

transformers = pytest.importorskip("transformers")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather <in °C> for a city, e.g. \"Zürich\" & 北京",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}]

SYSTEM = {"role": "system", "content": "You answer briefly."}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "用中文说。"},
    {"role": "assistant", "content": "四。\n"},
]
TOOL_CONV = [
    {"role": "user", "content": "What is the weather in Beijing?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Beijing"}}}]},
    {"role": "tool", "content": "{\"temperature\": 22}"},
    {"role": "assistant", "content": "It is 22 degrees."},
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return (list(iter_texts(shared_file("instruct/alpaca_en_demo.json")))
            + list(iter_texts(shared_file("instruct/alpaca_zh_demo.json"))) + ["四。用中文说 What is 2+2?"])


@pytest.fixture(scope="module")
def bases(texts) -> dict[str, str]:
    """Two small trained backends as JSON: GPT-2 style byte-level BPE and SentencePiece-style (Metaspace) BPE."""
    out = {}
    bl = HFTokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1200, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out["bytelevel"] = bl.to_str()
    sp = HFTokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    sp.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1200, show_progress=False,
                                                      special_tokens=[AddedToken("<unk>", special=True)]))
    out["metaspace"] = sp.to_str()
    return out


def write_model_dir(d: Path, style: str, bases: dict[str, str], template: str | None = None) -> Path:
    """The tokenizer files of a model in `style`, as an HF model dir holds them."""
    s = STYLES[style]
    backend = HFTokenizer.from_str(bases[s["kind"]])
    specials = [t for t in [s["bos"], s["eos"], s["pad"], s["unk"], *s["extra"]] if t is not None]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)])
    d.mkdir(parents=True, exist_ok=True)
    backend.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "chat_template": template or s["template"]}
    for name in ("bos", "eos", "pad", "unk"):
        cfg[f"{name}_token"] = s[name]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    gen = {"eos_token_id": [backend.token_to_id(t) for t in s["gen_eos"]]}
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d


@pytest.fixture(scope="module")
def alpaca() -> list[list[dict]]:
    en, _ = load_conversations(shared_file("instruct/alpaca_en_demo.json"))
    zh, _ = load_conversations(shared_file("instruct/alpaca_zh_demo.json"))
    return en[::40] + zh[::40]


def conversations(style: str, alpaca) -> list[list[dict]]:
    s = STYLES[style]
    convs = [TURNS, TURNS[:1], TURNS[:3], *alpaca]
    if s["system"]:
        convs += [[SYSTEM, *TURNS], [SYSTEM, TURNS[0]]]
    return convs


def mask_texts(text: str, offsets: list[tuple[int, int]], mask: list[bool]) -> list[str]:
    """The text of each run of masked tokens."""
    runs, cur, prev = [], None, False
    for (a, b), m in zip(offsets, mask):
        if m and not prev:
            cur = [a, b]
            runs.append(cur)
        elif m:
            cur[1] = b
        prev = m
    return [text[a:b] for a, b in runs]


@pytest.mark.parametrize("style", list(STYLES))
def test_render_and_ids_equal_transformers(tmp_path, style, bases, alpaca):
    d = write_model_dir(tmp_path / style, style, bases)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    tok = Tokenizer.load(d)
    template = load_chat_template(d)
    assert isinstance(template, JinjaChatTemplate) and has_chat_template(d)
    assert chat_template_for(tok) == template  # the tokenizer carries its template too
    cases = [(conv, {}) for conv in conversations(style, alpaca)]
    if STYLES[style]["tools"]:
        cases += [(TOOL_CONV, {"tools": TOOLS}), (TOOL_CONV[:1], {"tools": TOOLS})]
        if STYLES[style]["system"]:
            cases.append(([SYSTEM, *TOOL_CONV], {"tools": TOOLS}))
    for conv, kw in cases:
        for gen in (False, True):
            want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **kw)
            assert render_chat(conv, template, add_generation_prompt=gen, **kw) == want
            if "tools" in kw:
                assert '<in °C>' in want and "& 北京" in want  # tojson: no HTML escaping, no \\u escapes
            ids = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen, return_dict=True, **kw)
            assert tok.encode(want) == list(ids["input_ids"])
            try:
                assert encode_chat(tok, conv, template, add_generation_prompt=gen, **kw)[0] == list(ids["input_ids"])
            except TemplateMaskError:  # no loss mask for Mistral's system prompt / tools (moved to the last turn)
                assert style == "mistral" and not gen
    # a different template variable (Llama 3's date_string) reaches the template as in transformers
    if style == "llama3":
        want = hf.apply_chat_template(TURNS, tokenize=False, date_string="1 Jan 2030")
        assert "1 Jan 2030" in want and render_chat(TURNS, template, date_string="1 Jan 2030") == want


@pytest.mark.parametrize("style", [s for s in STYLES if s != "mistral"])
def test_mask_by_rendering_prefixes_covers_each_reply_and_its_end_of_turn(tmp_path, style, bases, alpaca):
    d = write_model_dir(tmp_path / style, style, bases)
    tok, template = Tokenizer.load(d), load_chat_template(d)
    reply = STYLES[style]["reply"]
    for conv in conversations(style, alpaca):
        if conv[-1]["role"] != "assistant":
            continue
        ids, mask = encode_chat(tok, conv, template)
        text = render_chat(conv, template)
        enc = tok.backend.encode(text, add_special_tokens=False)
        assert enc.ids == ids
        got = mask_texts(text, enc.offsets, mask)
        answers = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
        assert got == [reply(conv[i]["content"], i == len(conv) - 1) for i in answers]


def test_mistral_moves_the_system_prompt_so_prefixes_cannot_locate_replies(tmp_path, bases):
    d = write_model_dir(tmp_path / "m", "mistral", bases)
    tok, template = Tokenizer.load(d), load_chat_template(d)
    reply = STYLES["mistral"]["reply"]
    ids, mask = encode_chat(tok, TURNS, template)  # without a system prompt: prefix-stable
    text = render_chat(TURNS, template)
    assert mask_texts(text, tok.backend.encode(text, add_special_tokens=False).offsets, mask) == [
        reply(TURNS[1]["content"], False), reply(TURNS[3]["content"], True)]
    with pytest.raises(TemplateMaskError, match=r"message 2: .*\{% generation %\}"):
        encode_chat(tok, [SYSTEM, *TURNS], template)
    # counted as a malformed record in a batch, and prompts (no mask needed) still encode
    out = encode_chats(tok, [TURNS, [SYSTEM, *TURNS]], template)
    assert isinstance(out[1], ChatFormatError) and not isinstance(out[0], ChatFormatError)
    prompt_ids, prompt_mask = encode_chat(tok, [SYSTEM, *TURNS[:3]], template, add_generation_prompt=True)
    assert prompt_ids == tok.encode(render_chat([SYSTEM, *TURNS[:3]], template, add_generation_prompt=True))
    assert not any(prompt_mask)


def test_generation_blocks_give_transformers_assistant_mask_and_prefixes_agree(tmp_path, bases, alpaca):
    tagged = write_model_dir(tmp_path / "tagged", "smollm2", bases, template=CHATML_GENERATION)
    # the same template without the tags (a block tag in place of the end tag: trim_blocks eats the same newline)
    untagged_src = CHATML_GENERATION.replace("{% generation %}", "").replace("{% endgeneration %}",
                                                                             "{% if true %}{% endif %}")
    untagged = write_model_dir(tmp_path / "untagged", "smollm2", bases, template=untagged_src)
    hf = transformers.AutoTokenizer.from_pretrained(tagged)
    tok = Tokenizer.load(tagged)
    t_tagged, t_plain = load_chat_template(tagged), load_chat_template(untagged)
    assert t_tagged.has_generation_tags and not t_plain.has_generation_tags
    for conv in [TURNS, [SYSTEM, *TURNS], *alpaca]:
        out = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = encode_chat(tok, conv, t_tagged)
        assert ids == list(out["input_ids"])
        assert [int(m) for m in mask] == list(out["assistant_masks"]) and any(mask)
        assert render_chat(conv, t_plain) == render_chat(conv, t_tagged)
        assert encode_chat(tok, conv, t_plain) == (ids, mask)


def test_template_errors_carry_the_templates_own_message(tmp_path, bases):
    for style, conv, message in [
        ("llama2", [TURNS[0], TURNS[0]], "Conversation roles must alternate user/assistant/user/assistant/..."),
        ("gemma", [SYSTEM, *TURNS], "System role not supported"),
        ("llama3", TOOL_CONV[:2] + [{"role": "assistant", "tool_calls": TOOL_CONV[1]["tool_calls"] * 2}],
         "This model only supports single tool-calls at once!"),
    ]:
        d = write_model_dir(tmp_path / style, style, bases)
        template, tok = load_chat_template(d), Tokenizer.load(d)
        hf = transformers.AutoTokenizer.from_pretrained(d)
        with pytest.raises(Exception, match=message.replace(".", r"\.").replace("(", r"\(")):
            hf.apply_chat_template(conv, tokenize=False)
        with pytest.raises(ChatFormatError) as e:
            render_chat(conv, template)
        assert str(e.value) == message
        assert str(encode_chats(tok, [conv], template)[0]) == message


def test_sandbox_and_helpers():
    t = JinjaChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatFormatError, match="unsafe|not safely"):
        render_chat(TURNS, t)
    t = JinjaChatTemplate("{% set ns = namespace(_x=1) %}")
    with pytest.raises(ChatFormatError, match="underscore"):
        render_chat(TURNS, t)
    year = str(datetime.now().year)
    t = JinjaChatTemplate("{{ strftime_now('%Y') }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}"
                          "{% endif %}{{ m.content | tojson }}{% endfor %}|{{ dict(a=1) | tojson }}")
    assert render_chat([{"role": "user", "content": "<é>"}, TURNS[1]], t) in (
        f'{year}|"<é>"|{{"a": 1}}', f'{int(year) + 1}|"<é>"|{{"a": 1}}')
    with pytest.raises(ChatFormatError, match="syntax error"):
        JinjaChatTemplate("{% for %}").validate()


def test_special_token_text_in_content_is_refused(tmp_path, bases):
    d = write_model_dir(tmp_path / "q", "qwen2.5", bases)
    with pytest.raises(ChatFormatError, match=r"message 0: .*<\|im_end\|>"):
        encode_chat(Tokenizer.load(d), [{"role": "user", "content": "hi<|im_end|>"}], load_chat_template(d))


@pytest.mark.parametrize("style", list(STYLES))
def test_foreign_tokenizer_special_tokens_and_every_eos(tmp_path, style, bases):
    d = write_model_dir(tmp_path / style, style, bases)
    s = STYLES[style]
    tok = Tokenizer.load(d)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    for name in ("bos", "eos", "unk"):
        assert getattr(tok, f"{name}_token") == s[name]
        assert getattr(tok, f"{name}_id") == (hf.convert_tokens_to_ids(s[name]) if s[name] else None)
    assert tok.pad_id == hf.convert_tokens_to_ids(s["pad"] or s["eos"])
    want_eos = list(dict.fromkeys([tok.token_to_id(s["eos"])] + [tok.token_to_id(t) for t in s["gen_eos"]]))
    assert list(tok.eos_ids) == want_eos and len(want_eos) == len({s["eos"], *s["gen_eos"]})
    assert load_chat_template(d).stop_token_ids(tok) == want_eos
    text = "Wherefore art thou 罗密欧? " + " ".join(s["extra"])
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == hf.decode(
        hf.encode(text, add_special_tokens=False), skip_special_tokens=True)
    if s["bos"] is None:
        with pytest.raises(ValueError, match="no bos"):
            tok.encode("x", add_bos=True)
    # save + load keeps names, eos list (through generation_config) and template
    out = tmp_path / "copy"
    tok.save(out)
    (out / "generation_config.json").write_text((d / "generation_config.json").read_text())
    again = Tokenizer.load(out)
    assert (again.bos_id, again.eos_ids, again.digest()) == (tok.bos_id, tok.eos_ids, tok.digest())
    assert load_chat_template(out) == load_chat_template(d)


def test_added_tokens_decoder_is_applied_as_transformers_does(tmp_path, bases):
    d = write_model_dir(tmp_path / "q", "qwen2.5", bases)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    n = HFTokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    im_start = HFTokenizer.from_file(str(d / "tokenizer.json")).token_to_id("<|im_start|>")
    cfg["added_tokens_decoder"] = {
        str(im_start): {"content": "<|im_start|>", "special": True, "lstrip": False, "rstrip": False,
                        "normalized": False, "single_word": False},
        str(n): {"content": "<tool_call>", "special": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "single_word": False},
        str(n + 1): {"content": "<|fim_pad|>", "special": True, "lstrip": False, "rstrip": False,
                     "normalized": False, "single_word": False},
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.load(d)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert tok.vocab_size == len(hf) == n + 2
    assert (tok.token_to_id("<tool_call>"), tok.token_to_id("<|fim_pad|>")) == (n, n + 1)
    assert "<|fim_pad|>" in tok.special_tokens and "<tool_call>" not in tok.special_tokens
    text = "a<tool_call>{\"x\": 1}<|fim_pad|>b"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == hf.decode(
        hf.encode(text, add_special_tokens=False), skip_special_tokens=True)
    cfg["added_tokens_decoder"] = {str(n + 5): {"content": "<far>", "special": True}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="<far>.*id 1"):
        Tokenizer.load(d)


def test_sft_data_with_a_models_own_template(tmp_path, bases):
    """build_sft_data over the real alpaca files with Llama 3's template: every example's loss is exactly
    its replies + <|eot_id|>, and the digest follows the template."""
    d = write_model_dir(tmp_path / "l3", "llama3", bases)
    tok, template = Tokenizer.load(d), load_chat_template(d)
    cfg = InstructDataConfig(paths=[str(shared_file("instruct/alpaca_en_demo.json"))], mix_pretrain=0.0,
                             system="Be brief.")
    data = build_sft_data(cfg, tok, None, block_size=4096)  # None: the tokenizer's own template
    assert data.template == template and data.counts["malformed"] == 0 and data.counts["train"] > 100
    for ex in data.train[:50]:
        text = render_chat(ex.messages, template)
        offsets = tok.backend.encode(text, add_special_tokens=False).offsets
        assert mask_texts(text, offsets, ex.loss_mask.tolist()) == [
            m["content"].strip() + "<|eot_id|>" for m in ex.messages if m["role"] == "assistant"]
    other = build_sft_data(cfg, tok, load_chat_template(write_model_dir(tmp_path / "q", "llama3", bases,
                                                                        template=STYLES["smollm2"]["template"])),
                           block_size=4096)
    assert other.digest != data.digest


def test_save_chat_template_stores_a_jinja_template_where_transformers_reads_it(tmp_path, bases):
    src = write_model_dir(tmp_path / "src", "gemma", bases)
    template = load_chat_template(src)
    out = tmp_path / "out"
    Tokenizer.load(src).save(out)
    (out / "chat_template.json").write_text(json.dumps({"format_version": 1, "name": "stale"}))
    save_chat_template(out, template)
    assert not (out / "chat_template.json").exists()
    assert load_chat_template(out) == template
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.apply_chat_template(TURNS, tokenize=False) == render_chat(TURNS, template)
    assert np.array_equal(hf.apply_chat_template(TURNS, return_dict=True)["input_ids"],
                          encode_chat(Tokenizer.load(out), TURNS, template)[0])


def test_imported_model_keeps_its_tokenizer_template_and_stops_at_every_eos(tmp_path, bases):
    """HF dir (GPT-2 weights + Llama 3 style tokenizer files) -> import_hf -> load_for_inference: the prompt is
    transformers' apply_chat_template, and generate / the Engine stop at each id of generation_config's list
    (also with a LoRA adapter dir that carries the tokenizer but no generation_config); export_hf gives
    transformers the template back."""
    import torch

    from llmkit.infer.engine import Engine, RequestParams
    from llmkit.infer.generate import SamplingParams, stream_tokens
    from llmkit.infer.load import load_for_inference
    from llmkit.models.adapters import save_adapter
    from llmkit.models.hf import export_hf, import_hf
    from llmkit.models.io import load_model
    from llmkit.models.lora import LoRAConfig, apply_lora

    src = write_model_dir(tmp_path / "hf", "llama3", bases)
    n_vocab = HFTokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=n_vocab, n_positions=256, n_embd=32, n_layer=1, n_head=2)).eval()
    hf_model.save_pretrained(src, safe_serialization=True)
    gen_path = src / "generation_config.json"

    def write_eos(ids: list[int]) -> None:
        gen_path.write_text(json.dumps({"eos_token_id": ids}))

    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    prompt = [SYSTEM, TURNS[0]]
    want_ids = list(hf_tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"])
    write_eos([hf_tok.convert_tokens_to_ids("<|eot_id|>")])
    import_hf(src, tmp_path / "m")
    model, tok, template = load_for_inference(tmp_path / "m")
    assert isinstance(template, JinjaChatTemplate) and template == load_chat_template(src)
    ids = encode_chat(tok, prompt, template, add_generation_prompt=True)[0]
    assert ids == want_ids
    full = list(stream_tokens(model, ids, SamplingParams(max_new_tokens=24, temperature=0, stop_at_eos=False)))
    k = next((i for i in range(1, len(full)) if full[i] not in full[:i]), 0)
    assert tok.eos_id not in full[:k + 1]

    # the model declares a second end-of-sequence id: the first token of the greedy reply that is new at step k
    eot, end_of_text = (hf_tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>"))
    write_eos([end_of_text, full[k], eot])
    import_hf(src, tmp_path / "m2")
    assert json.loads((tmp_path / "m2" / "generation_config.json").read_text())["eos_token_id"] == [
        end_of_text, full[k], eot]
    model, tok, template = load_for_inference(tmp_path / "m2")
    assert set(tok.eos_ids) == {eot, end_of_text, full[k]} and tok.eos_ids[0] == eot
    assert full[k] in template.stop_token_ids(tok)
    greedy = SamplingParams(max_new_tokens=24, temperature=0)
    assert list(stream_tokens(model, ids, greedy, eos_id=tok.eos_ids)) == full[:k]
    assert list(stream_tokens(model, ids, greedy, eos_id=tok.eos_id)) != full[:k]  # one eos would not stop
    engine = Engine(model, tok, max_batch=2, prefix_cache_tokens=0)
    assert engine.generate([ids], RequestParams(max_new_tokens=24, temperature=0))[0] == full[:k]

    # a LoRA adapter dir with the tokenizer (as llmkit finetune saves it) but no generation_config.json
    base = load_model(tmp_path / "m2")
    apply_lora(base, LoRAConfig(r=2, targets=["all-linear"]))
    save_adapter(base, tmp_path / "adapter", str(tmp_path / "m2"))
    tok.save(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "generation_config.json").exists()
    model, tok_a, template_a = load_for_inference(tmp_path / "m2", adapter=tmp_path / "adapter")
    assert set(tok_a.eos_ids) == set(tok.eos_ids) and template_a == template
    assert Engine(model, tok_a).generate([ids], RequestParams(max_new_tokens=24, temperature=0))[0] == full[:k]

    # the server: /v1/chat/completions renders the model's template and stops at the declared eos
    import httpx

    from test_serve import running_server

    with running_server(tmp_path / "m2", served_model_name="imported", max_batch=2) as (base_url, _, _):
        r = httpx.post(f"{base_url}/v1/chat/completions", timeout=60, json={
            "model": "imported", "messages": prompt, "max_tokens": 24, "temperature": 0}).json()
    assert "usage" in r, r
    assert r["usage"]["prompt_tokens"] == len(want_ids) and r["usage"]["completion_tokens"] == k
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["message"]["content"] == tok.decode(full[:k], skip_special_tokens=True)

    out = export_hf(tmp_path / "m2", tmp_path / "back")
    back = transformers.AutoTokenizer.from_pretrained(out)
    assert back.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == render_chat(
        prompt, template, add_generation_prompt=True)


def test_foreign_tokenizer_without_a_template_gets_the_plain_one_with_its_own_eos(tmp_path, bases):
    """A base model's tokenizer (GPT-2 style: one <|endoftext|> token, names in special_tokens_map.json only,
    no chat template): fine-tuning falls back to llmkit's plain-text template ended by that token, and storing
    it names no token the vocabulary lacks."""
    d = tmp_path / "base"
    d.mkdir()
    backend = HFTokenizer.from_str(bases["bytelevel"])
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    backend.save(str(d / "tokenizer.json"))
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    tok = Tokenizer.load(d)
    eot = tok.token_to_id("<|endoftext|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (eot, eot, eot, (eot,))
    assert not has_chat_template(d)
    with pytest.warns(UserWarning, match="falling back"):
        template = chat_template_for(tok)
    assert (template.bos, template.end) == ("<|endoftext|>", "<|endoftext|>")
    ids, mask = encode_chat(tok, TURNS, template)
    text = render_chat(TURNS, template)
    assert mask_texts(text, tok.backend.encode(text, add_special_tokens=False).offsets, mask) == [
        "4.<|endoftext|>", "四。<|endoftext|>"]
    assert template.stop_token_ids(tok) == [eot]
    out = tmp_path / "sft"
    tok.save(out)
    save_chat_template(out, template)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>" and "pad_token" not in cfg  # no <|pad|> the vocabulary lacks
    assert load_chat_template(out) == template
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert len(hf) == tok.vocab_size
    assert hf.apply_chat_template(TURNS, tokenize=False) == text


def test_lora_finetune_of_a_model_with_its_own_template(tmp_path, bases):
    """llmkit finetune on a base whose tokenizer carries a Llama 3 style template: the adapter dir stores that
    template where transformers reads it, and inference through the adapter uses it and the eos list."""
    import torch

    from llmkit.config import load_config
    from llmkit.finetune.sft import SFTConfig, finetune_sft
    from llmkit.infer.load import load_for_inference
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import save_model

    src = write_model_dir(tmp_path / "tok", "llama3", bases)
    tok = Tokenizer.load(src)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=192, n_layer=1, d_model=32, n_head=2,
                                  positions="rope", norm="rmsnorm", activation="swiglu"))
    save_model(model, tmp_path / "base", tok, generation_config={"eos_token_id": list(tok.eos_ids)})
    overrides = {
        "out_dir": str(tmp_path / "sft"), "base_model": str(tmp_path / "base"), "method": "lora",
        "data.paths": f"[{shared_file('instruct/alpaca_en_demo.json')}]", "data.eval_max": 4,
        "data.mix_pretrain": 0.0, "train.batch_size": 4, "train.max_steps": 3, "train.decay_steps": 3,
        "train.warmup_steps": 1, "train.eval_interval": 3, "train.log_interval": 1, "train.checkpoint_interval": 3,
        "train.progress": False, "eval.answers": 1, "eval.samples": 1, "eval.max_new_tokens": 4,
        "eval.loss_batches": 1, "track.enabled": False}
    result = finetune_sft(load_config(SFTConfig, None, [f"{k}={v}" for k, v in overrides.items()]))
    final = Path(result["final"])
    template = load_chat_template(src)
    assert not (final / "chat_template.json").exists()
    assert json.loads((final / "tokenizer_config.json").read_text())["chat_template"] == template.source
    _, tok2, template2 = load_for_inference(tmp_path / "base", adapter=final)
    assert template2 == template and tok2.eos_ids == tok.eos_ids
    hf = transformers.AutoTokenizer.from_pretrained(final)
    assert hf.apply_chat_template(TURNS, tokenize=False) == render_chat(TURNS, template2)
