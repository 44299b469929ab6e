"""Tokenizer tests on the real reference corpora in ../shared/data (skipped, with the reason, if absent)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
import torch

from conftest import shared_file
from llmkit.tokenizer import (
    CHAT_TOKENS,
    SPECIAL_TOKENS,
    Tokenizer,
    iter_texts,
    train_bpe,
    train_char,
    train_tokenizer,
)

ALL_SPECIALS = list(SPECIAL_TOKENS.values()) + CHAT_TOKENS
# Text no training corpus here contains: emoji (4-byte UTF-8), a combining accent, CRLF, tabs,
# leading/trailing/multiple spaces, and a lone surrogate-free astral CJK character.
UNSEEN = "  Hello,\tworld!\r\n🚀 café\u0301 𠀀 中文 混合 text   "


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return shared_file("en/tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def zh_docs() -> list[str]:
    docs = list(iter_texts(shared_file("zh/guwenguanzhi.json")))
    docs += list(iter_texts(shared_file("zh/lunyu.json")))
    docs += list(iter_texts(shared_file("instruct/alpaca_zh_demo.json")))[:300]
    return docs


@pytest.fixture(scope="module")
def corpus(shakespeare, zh_docs) -> list[str]:
    """~450 KB bilingual corpus: 150 KB Shakespeare + classical and modern Chinese."""
    return [shakespeare[:150_000], *zh_docs]


@pytest.fixture(scope="module")
def bpe(corpus) -> Tokenizer:
    return train_bpe(corpus, vocab_size=2000, min_frequency=2)


@pytest.fixture(scope="module")
def char(corpus) -> Tokenizer:
    return train_char(corpus)


@pytest.fixture(scope="module", params=["char", "bpe"])
def tok(request, char, bpe) -> Tokenizer:
    return {"char": char, "bpe": bpe}[request.param]


# -- vocabulary layout ----------------------------------------------------------------------------


def test_char_vocab_is_nanogpt_layout(shakespeare):
    tok = train_char([shakespeare])
    chars = sorted(set(shakespeare))  # exactly nanoGPT's shakespeare_char/prepare.py
    assert len(chars) == 65
    assert tok.kind == "char"
    assert tok.vocab_size == 65 + len(ALL_SPECIALS)
    assert [tok.token_to_id(c) for c in chars] == list(range(65))
    assert [tok.token_to_id(t) for t in ALL_SPECIALS] == list(range(65, 65 + len(ALL_SPECIALS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (65, 66, 67, 68)
    head = shakespeare[:100_000]
    stoi = {c: i for i, c in enumerate(chars)}
    assert tok.encode(head) == [stoi[c] for c in head]
    assert tok.decode(tok.encode(head)) == head


def test_bpe_layout(bpe):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 2000  # the corpus is large enough to fill the requested size
    assert [bpe.token_to_id(t) for t in ALL_SPECIALS] == list(range(len(ALL_SPECIALS)))
    assert bpe.special_tokens == {t: i for i, t in enumerate(ALL_SPECIALS)}
    # All 256 byte symbols are in the vocabulary, so nothing can ever be unknown.
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256
    assert all(bpe.token_to_id(sym) is not None for sym in alphabet)


def test_bpe_learns_merges_for_both_languages(bpe, shakespeare, zh_docs):
    en, zh = shakespeare[200_000:210_000], zh_docs[0]
    # Byte-level BPE starts from bytes; merges must beat one token per byte by a clear margin.
    assert len(bpe.encode(en)) < 0.5 * len(en.encode("utf-8"))
    assert len(bpe.encode(zh)) < 0.6 * len(zh.encode("utf-8"))


# -- round trips ----------------------------------------------------------------------------------


def test_roundtrip_real_text(tok, shakespeare, zh_docs):
    samples = [shakespeare[:5000], shakespeare[-5000:], *zh_docs[:20], zh_docs[-1]]
    for text in samples:
        assert tok.decode(tok.encode(text)) == text


def test_roundtrip_mixed_with_special_tokens(tok, zh_docs):
    text = f"<|system|>You are helpful.<|end|>\n<|user|> {zh_docs[0][:40]} <|end|><|assistant|>好的。<|eos|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<|system|>", "").replace(
        "<|end|>", ""
    ).replace("<|user|>", "").replace("<|assistant|>", "").replace("<|eos|>", "")


def test_bpe_roundtrips_any_text(bpe):
    for text in [UNSEEN, "", " ", "\n\n\n", "\x00\x7f\u2028", "ＡＢＣ（全角）", "a" * 1000]:
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.unk_id not in bpe.encode(UNSEEN)


def test_char_unknown_characters_map_to_unk(shakespeare):
    tok = train_char([shakespeare])
    ids = tok.encode("ab中c")
    assert ids == [tok.token_to_id("a"), tok.token_to_id("b"), tok.unk_id, tok.token_to_id("c")]
    assert tok.decode(ids) == "ab<|unk|>c"


def test_char_keeps_every_character_separate(char):
    # Newlines, spaces and CRLF pieces are single characters, never merged or dropped.
    text = "一\n\n 二  三\n"
    assert len(char.encode(text)) == len(text)
    assert char.decode(char.encode(text)) == text


# -- special tokens and encode options -----------------------------------------------------------


@pytest.mark.parametrize("special", ALL_SPECIALS)
def test_special_tokens_are_single_ids_never_split(tok, special):
    tid = tok.token_to_id(special)
    assert tid is not None
    assert tok.encode(special) == [tid]
    ids = tok.encode(f"ab{special}cd")
    assert ids.count(tid) == 1
    assert tok.decode(ids) == f"ab{special}cd"
    assert tok.decode(ids, skip_special_tokens=True) == "abcd"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_extra_special_tokens(kind, corpus):
    extra = ["<|tool|>", "<|思考|>"]
    if kind == "char":
        tok = train_char(corpus[:3], extra_special_tokens=extra)
    else:
        tok = train_bpe(corpus[:3], vocab_size=400, extra_special_tokens=extra)
    ids = [tok.token_to_id(t) for t in extra]
    assert None not in ids
    assert tok.special_tokens[extra[1]] == ids[1]
    assert tok.encode("x<|思考|>y")[1] == ids[1]
    assert tok.decode(tok.encode("x<|思考|>y")) == "x<|思考|>y"


def test_add_bos_eos_and_batch(tok):
    texts = ["To be, or not to be", "学而时习之", ""]
    plain = [tok.encode(t) for t in texts]
    assert tok.encode(texts[0], add_bos=True) == [tok.bos_id, *plain[0]]
    assert tok.encode(texts[0], add_eos=True) == [*plain[0], tok.eos_id]
    assert tok.encode("", add_bos=True, add_eos=True) == [tok.bos_id, tok.eos_id]
    assert tok.encode_batch(texts) == plain
    assert tok.encode_batch(texts, add_bos=True, add_eos=True) == [
        [tok.bos_id, *p, tok.eos_id] for p in plain
    ]


def test_decode_accepts_tensors_and_arrays(tok):
    ids = tok.encode("学而时习之 and so on", add_bos=True)
    expected = tok.decode(ids)
    assert tok.decode(torch.tensor(ids)) == expected
    assert tok.decode(torch.tensor(ids, dtype=torch.int32)) == expected
    assert tok.decode(np.array(ids, dtype=np.int64)) == expected
    assert tok.decode(tuple(ids)) == expected


def test_decode_rejects_bad_input(tok):
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError):
        tok.encode(["not", "a", "string"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tok.encode_batch("a single string")  # type: ignore[arg-type]


# -- persistence and lineage ----------------------------------------------------------------------


def test_save_load_roundtrip(tok, tmp_path, zh_docs):
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    text = zh_docs[3][:500] + UNSEEN
    for loaded in (Tokenizer.load(tmp_path / "tok"), Tokenizer.load(path)):
        assert loaded.kind == tok.kind
        assert loaded.vocab_size == tok.vocab_size
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.unk_id) == (
            tok.bos_id,
            tok.eos_id,
            tok.pad_id,
            tok.unk_id,
        )
        assert loaded.encode(text, add_bos=True) == tok.encode(text, add_bos=True)
        assert loaded.digest() == tok.digest()
    assert not list((tmp_path / "tok").glob(".*.tmp"))  # no temp file left behind


def test_hf_tokenizers_reads_saved_file(tok, tmp_path):
    path = tok.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    text = "<|user|>Wherefore art thou 罗密欧？<|end|>"
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert hf.get_vocab_size() == tok.vocab_size
    # The file is plain JSON with the model type HF expects.
    assert (
        json.loads(path.read_text(encoding="utf-8"))["model"]["type"]
        == {"char": "WordLevel", "bpe": "BPE"}[tok.kind]
    )


def test_digest_tracks_vocabulary(shakespeare):
    a = train_char([shakespeare[:50_000]])
    b = train_char([shakespeare[:50_000]])
    c = train_char([shakespeare[:50_000] + "中"])
    assert len(a.digest()) == 64 and int(a.digest(), 16) >= 0
    assert a.digest() == b.digest()  # deterministic
    assert a.digest() != c.digest()
    d = train_bpe([shakespeare[:50_000]], vocab_size=400)
    e = train_bpe([shakespeare[:50_000]], vocab_size=420)
    assert d.digest() == train_bpe([shakespeare[:50_000]], vocab_size=400).digest()
    assert d.digest() != e.digest()


def test_load_missing_path_is_clear(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        Tokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer\.json"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid HF tokenizers file"):
        Tokenizer.load(bad)


def test_foreign_tokenizer_without_any_special_token_loads(tmp_path):
    # A valid HF tokenizer without llmkit's special tokens and without a tokenizer_config.json: every
    # special token is absent, encoding still works, asking for a bos/eos it does not have is an error.
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.eos_ids) == (None, None, None, ())
    assert tok.pad_id == 0 and tok.kind == "char"
    assert tok.encode("abba") == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="no bos token"):
        tok.encode("a", add_bos=True)
    with pytest.raises(ValueError, match="no eos token"):
        tok.encode("a", add_eos=True)


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_foreign_wordpiece_and_unigram_tokenizers_load_as_transformers_loads_them(tmp_path, kind, corpus):
    """A BERT-style WordPiece tokenizer (cls/sep, no bos/eos) and a T5-style Unigram one (eos, pad, no bos),
    with their tokenizer_config.json: same ids and text as transformers, absent tokens are None."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        hf = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        hf.normalizer = normalizers.BertNormalizer(lowercase=True)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=1500, special_tokens=specials, show_progress=False)
        config = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                  "mask_token": "[MASK]"}
    else:
        specials = ["<pad>", "</s>", "<unk>"]
        hf = tokenizers.Tokenizer(models.Unigram())
        hf.pre_tokenizer = pre_tokenizers.Metaspace()
        hf.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=4000, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
        config = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    hf.train_from_iterator([t[:2000] for t in corpus[:200]], trainer=trainer)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    tok = Tokenizer.load(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.kind == kind and tok.vocab_size == len(ref)
    assert tok.bos_id is None and tok.unk_id == ref.unk_token_id and tok.pad_id == ref.pad_token_id
    assert tok.eos_id == ref.eos_token_id and tok.eos_ids == (() if tok.eos_id is None else (tok.eos_id,))
    for text in ["Wherefore art thou Romeo?", "学而时习之，不亦说乎？", UNSEEN]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == ref.decode(
            ref.encode(text, add_special_tokens=False), skip_special_tokens=True)


# -- training entry points -------------------------------------------------------------------------


def test_train_tokenizer_from_files(tmp_path):
    files = [shared_file("en/tinyshakespeare.txt"), shared_file("zh/lunyu.json"), shared_file("instruct/alpaca_zh_demo.json")]
    char = train_tokenizer(files[:2], kind="char")
    lunyu = list(iter_texts(files[1]))
    assert char.decode(char.encode(lunyu[0])) == lunyu[0]
    assert char.token_to_id("学") is not None and char.token_to_id("\n") is not None
    # 350 KB of alpaca_zh + lunyu with a small vocabulary: seconds, not minutes.
    bpe = train_tokenizer(files[1:], kind="bpe", vocab_size=600)
    assert bpe.vocab_size == 600
    record = next(iter_texts(files[2]))
    assert bpe.decode(bpe.encode(record)) == record


def test_train_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope1\.txt.*nope2\.txt"):
        train_tokenizer([tmp_path / "nope1.txt", tmp_path / "nope2.txt"])
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer([tmp_path], kind="wordpiece")
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["abc"], vocab_size=100)
    with pytest.raises(TypeError, match="not a single string"):
        train_bpe("a string is not a corpus")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a single string"):
        train_char("a string is not a corpus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no characters"):
        train_char([""])
    with pytest.raises(ValueError, match="no training texts"):
        train_bpe([], vocab_size=300)


# -- iter_texts ------------------------------------------------------------------------------------


def test_iter_texts_txt_is_one_verbatim_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("line one\r\nline 二\n".encode())
    assert list(iter_texts(p)) == ["line one\r\nline 二\n"]


def test_iter_texts_jsonl(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "first"}\n\n{"body": "second", "text": "第二"}\n', encoding="utf-8")
    assert list(iter_texts(p)) == ["first", "第二"]
    # Strict: with text_field="body" the first record has no text, which is an error, not a skip.
    with pytest.raises(ValueError, match=r"a\.jsonl:1: record has no 'body' field"):
        list(iter_texts(p, text_field="body"))


def test_iter_texts_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "broken\n{"text": "ok"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_texts(p))
    p.write_text('{"text": "ok"}\n{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: record has no 'text' field"):
        list(iter_texts(p))
    p.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'text' is a int"):
        list(iter_texts(p))


def test_iter_texts_json_shapes(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(["one", "two"]), encoding="utf-8")
    assert list(iter_texts(p)) == ["one", "two"]
    p.write_text(
        json.dumps([{"text": "x"}, {"instruction": "问", "input": "", "output": "答"}]), encoding="utf-8"
    )
    assert list(iter_texts(p)) == ["x", "问\n答"]
    p.write_text(json.dumps([{"instruction": "I", "input": "In", "output": "O"}]), encoding="utf-8")
    assert list(iter_texts(p)) == ["I\nIn\nO"]
    poetry = {
        "title": "collection",
        "content": [{"type": "五言", "content": [{"chapter": "题", "paragraphs": ["甲，乙。", "丙，丁。"]}]}],
    }
    p.write_text(json.dumps(poetry, ensure_ascii=False), encoding="utf-8")
    assert list(iter_texts(p)) == ["题\n甲，乙。\n丙，丁。"]


def test_iter_texts_json_errors_name_the_record(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"text": "ok"}, {"id": 7}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"a\.json: record \[1\]: record has no 'text' field"):
        list(iter_texts(p))
    p.write_text(json.dumps({"content": [{"content": [{"paragraphs": []}]}]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"content\[0\]\.content\[0\]: 'paragraphs' must be a non-empty"):
        list(iter_texts(p))
    p.write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ValueError, match=r"a\.json:1: not valid JSON"):
        list(iter_texts(p))
    p.write_text(json.dumps({"text": "a dict is not a list"}), encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON list"):
        list(iter_texts(p))
    with pytest.raises(ValueError, match="unsupported file type"):
        list(iter_texts(tmp_path / "a.csv"))


def test_iter_texts_real_files():
    counts = {
        "en/c4_demo.jsonl": 300,
        "instruct/alpaca_zh_demo.json": 1000,
        "zh/guwenguanzhi.json": 222,
        "zh/tangshisanbaishou.json": 320,
        "zh/lunyu.json": 20,
        "zh/mengzi.json": 14,
        "zh/quantangshi_tang0_traditional.json": 1000,
    }
    for rel, n in counts.items():
        docs = list(iter_texts(shared_file(rel)))
        assert len(docs) == n, rel
        assert all(isinstance(d, str) and d for d in docs), rel
    tang = list(iter_texts(shared_file("zh/tangshisanbaishou.json")))
    assert tang[0] == "行宮\n寥落古行宮，宮花寂寞紅。\n白頭宮女在，閒坐說玄宗。"
    lunyu = list(iter_texts(shared_file("zh/lunyu.json")))
    assert lunyu[0].startswith("学而篇\n子曰：“学而时习之，不亦说乎？")
    alpaca = json.loads(shared_file("instruct/alpaca_zh_demo.json").read_text(encoding="utf-8"))
    first = list(iter_texts(shared_file("instruct/alpaca_zh_demo.json")))[0]
    assert first == f"{alpaca[0]['instruction']}\n{alpaca[0]['output']}"  # empty input left out
