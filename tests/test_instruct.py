"""Instruction data tests: alpaca / sharegpt readers with malformed-record accounting, the SFT build (dedup,
split, truncation), pretraining-mixed batches with exact resume, and the answer metrics (real alpaca data)."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch

from conftest import shared_file
from llmkit.chat import DEFAULT_CHAT_TEMPLATE, encode_chat, render_chat
from llmkit.config import ConfigError, load_config
from llmkit.data.tokenized import open_split, prepare_tokens
from llmkit.finetune.answer_metrics import _lcs_len, exact_match, rouge_l
from llmkit.finetune.instruction_formats import load_conversations
from llmkit.finetune.sft_batches import (
    IGNORE_INDEX,
    MixedBatches,
    eval_batches,
    load_pretrain_tokens,
    open_pretrain_tokens,
)
from llmkit.finetune.sft_data import InstructDataConfig, build_sft_data
from llmkit.tokenizer import iter_texts, train_bpe


@pytest.fixture(scope="module")
def en_path():
    return str(shared_file("instruct/alpaca_en_demo.json"))


@pytest.fixture(scope="module")
def zh_path():
    return str(shared_file("instruct/alpaca_zh_demo.json"))


@pytest.fixture(scope="module")
def tok(en_path, zh_path):
    texts = list(iter_texts(en_path)) + list(iter_texts(zh_path))
    return train_bpe(texts, vocab_size=2000)


@pytest.fixture(scope="module")
def sft(tok, en_path, zh_path):
    return build_sft_data(InstructDataConfig(paths=[en_path, zh_path], mix_pretrain=0.0), tok, None, 256)


@pytest.fixture(scope="module")
def small(tok, zh_path, tmp_path_factory):
    """30 real zh records: small enough that a few batches cross epoch boundaries."""
    path = tmp_path_factory.mktemp("small") / "zh30.json"
    path.write_text(json.dumps(json.loads(open(zh_path, encoding="utf-8").read())[:30], ensure_ascii=False))
    return build_sft_data(InstructDataConfig(paths=[str(path)], mix_pretrain=0.0, eval_fraction=0.1), tok, None, 128)


@pytest.fixture(scope="module")
def pretrain(tok):
    text = shared_file("en/tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]
    return np.asarray(tok.encode(text), dtype=np.int64)


# -- readers ---------------------------------------------------------------------------------------


def test_alpaca_readers_on_the_real_files(en_path, zh_path):
    en, bad = load_conversations(en_path)
    assert len(en) == 999 and bad == []
    raw = json.loads(open(en_path, encoding="utf-8").read())
    assert raw[5]["input"]  # a record with an input: the user turn is instruction + "\n" + input
    assert en[5] == [{"role": "user", "content": raw[5]["instruction"] + "\n" + raw[5]["input"]},
                     {"role": "assistant", "content": raw[5]["output"]}]
    assert en[0][0]["content"] == raw[0]["instruction"]  # no input -> instruction alone
    zh, bad = load_conversations(zh_path, "alpaca")
    assert len(zh) == 1000 and bad == []


def test_alpaca_malformed_records_are_listed_with_index_and_reason(tmp_path):
    records = [
        {"instruction": "Add.", "input": "1 2", "output": "3"},                       # 0 ok
        {"instruction": "Add.", "input": ""},                                         # 1 no output
        {"instruction": "  ", "input": "", "output": "x"},                            # 2 empty instruction
        {"instruction": "Add.", "output": 3},                                         # 3 output not a string
        ["not", "an", "object"],                                                      # 4
        {"instruction": "Go on.", "output": "b", "system": "Be brief.",
         "history": [["q1", "a1"], ["q2", "a2"]]},                                    # 5 ok, multi-turn
        {"instruction": "x", "output": "y", "history": [["only one"]]},              # 6 bad history
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records))
    convs, bad = load_conversations(path)
    assert [b["where"] for b in bad] == [f"{path}: record [{i}]" for i in (1, 2, 3, 4, 6)]
    reasons = [b["reason"] for b in bad]
    assert "missing 'output'" in reasons[0] and "'instruction' is empty" in reasons[1]
    assert "'output' is a int" in reasons[2] and "list" in reasons[3] and "history[0]" in reasons[4]
    assert len(convs) == 2
    assert [m["role"] for m in convs[1]] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert convs[1][1]["content"] == "q1" and convs[1][-1]["content"] == "b"


def test_sharegpt_both_spellings_and_malformed_ones(tmp_path):
    lines = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},   # 1 ok
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]},                                       # 2 ok
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},    # 3 role
        {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},       # 4 order
        {"conversations": [{"from": "human", "value": "q"}]},                                      # 5 no answer
        {"system": "S", "conversations": [{"from": "human", "value": "q"},
                                          {"from": "gpt", "value": "a"}]},                          # 6 ok
        {"conversations": []},                                                                      # 7 empty
    ]
    path = tmp_path / "s.jsonl"
    text = "\n".join(json.dumps(r) for r in lines[:3]) + "\n{not json\n\n" + "\n".join(json.dumps(r) for r in lines[3:])
    path.write_text(text + "\n")
    convs, bad = load_conversations(path)
    assert len(convs) == 3
    assert convs[0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert convs[2][0] == {"role": "system", "content": "S"}
    where = {b["where"]: b["reason"] for b in bad}
    assert set(where) == {f"{path}:{n}" for n in (3, 4, 6, 7, 9)}
    assert "unknown role 'robot'" in where[f"{path}:3"] and "not valid JSON" in where[f"{path}:4"]
    assert "alternate" in where[f"{path}:6"] and "ends with a user turn" in where[f"{path}:7"]
    assert "non-empty list" in where[f"{path}:9"]


def test_format_errors_are_loud(tmp_path, tok):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"text": "plain"}]))
    with pytest.raises(ValueError, match="cannot detect the format"):
        load_conversations(p)
    # a sharegpt file read as alpaca: records exist but none is usable -> the build refuses
    q = tmp_path / "q.json"
    q.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]))
    with pytest.raises(ValueError, match="none of its 1 records"):
        build_sft_data(InstructDataConfig(paths=[str(q)], format="alpaca", mix_pretrain=0), tok, None, 64)
    with pytest.raises(FileNotFoundError):
        load_conversations(tmp_path / "missing.json")
    p.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_conversations(p)


# -- SFT build -------------------------------------------------------------------------------------


def test_build_counts_split_and_truncation_on_the_real_data(sft, tok, en_path, zh_path):
    c = sft.counts
    assert c["records"] == 1999 and c["conversations"] == 1999 and c["malformed"] == 0
    raw = json.loads(open(en_path, encoding="utf-8").read()) + json.loads(open(zh_path, encoding="utf-8").read())
    distinct = {json.dumps([r["instruction"], r["input"], r["output"]]) for r in raw}
    assert c["duplicates"] == 1999 - len(distinct)
    n = len(distinct)
    assert c["eval"] == min(200, round(0.05 * n)) and c["train"] + c["eval"] + c["too_long_dropped"] == n
    keys = lambda exs: {json.dumps(e.messages, ensure_ascii=False) for e in exs}  # noqa: E731
    assert not keys(sft.train) & keys(sft.eval)
    # truncation: exactly the examples longer than 256 tokens were cut, to 256
    all_ex = sft.train + sft.eval
    assert sft.truncated == sum(e.full_len > 256 for e in all_ex) > 0
    assert max(len(e.ids) for e in all_ex) == 256
    for e in all_ex[:50]:
        ids, mask = encode_chat(tok, e.messages, sft.template)
        assert e.full_len == len(ids) and e.ids.tolist() == ids[:256] and e.loss_mask.tolist() == mask[:256]
    assert sft.eval_conversations == [e.messages for e in sft.eval]
    assert c["train_loss_tokens"] == sum(int(e.loss_mask.sum()) for e in sft.train)
    assert 0.5 < sft.loss_share < 1.0


def test_split_is_deterministic_and_independent_of_file_order_and_max_len(sft, tok, en_path, zh_path):
    again = build_sft_data(InstructDataConfig(paths=[en_path, zh_path], mix_pretrain=0.0), tok, None, 256)
    assert again.digest == sft.digest
    eval_keys = lambda d: sorted(json.dumps(e.messages, ensure_ascii=False) for e in d.eval)  # noqa: E731
    swapped = build_sft_data(InstructDataConfig(paths=[zh_path, en_path], mix_pretrain=0.0), tok, None, 512)
    assert eval_keys(swapped) == eval_keys(sft)
    other = build_sft_data(InstructDataConfig(paths=[en_path, zh_path], mix_pretrain=0.0, seed=1), tok, None, 256)
    assert eval_keys(other) != eval_keys(sft) and other.digest != sft.digest


def test_system_prompt_and_special_text_records(tmp_path, tok):
    records = [{"instruction": "Name a colour.", "input": "", "output": "Red."},
               {"instruction": "Repeat <|end|> please", "input": "", "output": "no"},
               {"instruction": "Own system.", "input": "", "output": "ok", "system": "Mine."}]
    p = tmp_path / "r.json"
    p.write_text(json.dumps(records))
    cfg = InstructDataConfig(paths=[str(p)], system="Be brief.", eval_fraction=0.0, mix_pretrain=0)
    d = build_sft_data(cfg, tok, None, 64)
    assert d.counts["malformed"] == 1 and d.malformed[0]["where"] == f"{p}: record [1]"
    assert "<|end|>" in d.malformed[0]["reason"]
    assert [e.messages[0]["content"] for e in d.train] == ["Be brief.", "Mine."]
    ex = d.train[0]
    assert tok.decode(ex.ids[ex.loss_mask]) == "Red.<|end|>"
    assert render_chat(ex.messages).startswith("<|bos|><|system|>Be brief.<|end|>")


def test_examples_whose_prompt_fills_max_len_are_dropped_and_counted(tmp_path, tok):
    records = [{"instruction": "word " * 100, "input": "", "output": "long prompt"},
               {"instruction": "Hi", "input": "", "output": "Hello " * 40},
               {"instruction": "Hi?", "input": "", "output": "Yes."}]
    p = tmp_path / "r.json"
    p.write_text(json.dumps(records))
    d = build_sft_data(InstructDataConfig(paths=[str(p)], eval_fraction=0.0, mix_pretrain=0, max_len=20),
                       tok, DEFAULT_CHAT_TEMPLATE, 32)
    assert d.counts["too_long_dropped"] == 1 and d.counts["truncated"] == 1 and d.counts["train"] == 2
    with pytest.raises(ValueError, match="block_size"):
        build_sft_data(InstructDataConfig(paths=[str(p)], mix_pretrain=0, max_len=40), tok, None, 32)


def test_config_loads_and_validates(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("paths: [a.json]\nmix_pretrain: 0.1\npretrain: tokens/\nmax_len: 128\n")
    cfg = load_config(InstructDataConfig, y, ["format=sharegpt", "eval_max=10"])
    assert cfg.format == "sharegpt" and cfg.eval_max == 10 and cfg.max_len == 128
    for bad in (["format=csv"], ["mix_pretrain=1.0"], ["eval_fraction=-0.1"], ["pretrain=null"], ["paths=[]"]):
        with pytest.raises(ConfigError):
            load_config(InstructDataConfig, y, bad)


# -- batches ---------------------------------------------------------------------------------------


def test_sft_rows_carry_ids_and_response_only_targets(small, tok):
    mb = MixedBatches(small, None, batch_size=4, block_size=128, mix_pretrain=0.0, seed=3)
    seen = []
    for _ in range(math.ceil(len(small.train) / 4)):
        x, y = mb.next()
        assert x.shape == y.shape == (4, 128) and x.dtype == y.dtype == torch.int64
        for r in range(4):
            n = int((x[r] != small.pad_id).sum())  # pad never occurs inside an example
            ex = next(e for e in small.train if len(e.ids) == n + 1 and e.ids[:-1].tolist() == x[r, :n].tolist())
            seen.append(ex.source)
            assert (x[r, n:] == small.pad_id).all() and (y[r, n:] == IGNORE_INDEX).all()
            targets = y[r][y[r] != IGNORE_INDEX]
            assert tok.decode(targets) == ex.messages[-1]["content"].strip() + "<|end|>" or ex.truncated
            assert y[r, 0] == IGNORE_INDEX
    # the first epoch visits every training example exactly once
    first_epoch = seen[:len(small.train)]
    assert sorted(first_epoch) == sorted(e.source for e in small.train)
    assert mb.epoch == (1 if len(seen) > len(small.train) else 0)


def test_pretrain_share_is_exact_and_rows_are_real_windows(small, pretrain):
    B, T, mix = 8, 128, 0.15
    mb = MixedBatches(small, pretrain, batch_size=B, block_size=T, mix_pretrain=mix, seed=0)
    stream = pretrain.tolist()
    total = 0
    for k in range(1, 41):
        x, y = mb.next()
        is_pre = (y != IGNORE_INDEX).all(dim=1)
        assert int(is_pre.sum()) == mb.last_pretrain_rows
        assert bool(is_pre[B - mb.last_pretrain_rows:].all())  # pretraining rows come last
        total += mb.last_pretrain_rows
        assert total == k * B * 3 // 20 == mb.pretrain_rows  # mix = 3/20 exactly: no drift
        for r in np.nonzero(is_pre.numpy())[0]:
            row = x[r].tolist()
            assert y[r, :-1].tolist() == row[1:]  # next-token targets everywhere
            start = next(i for i in range(len(stream) - T) if stream[i:i + T] == row)
            assert stream[start + T] == int(y[r, -1])
    assert mb.sft_rows + mb.pretrain_rows == 40 * B


def test_resumed_iterator_yields_bit_identical_batches(small, pretrain):
    def make():
        return MixedBatches(small, pretrain, batch_size=5, block_size=128, mix_pretrain=0.2, seed=11)

    straight = make()
    ref = [straight.next() for _ in range(30)]  # 30 batches x 4 SFT rows: several epochs of 27 examples
    interrupted = make()
    for _ in range(13):
        interrupted.next()
    state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint would store
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.epoch >= 1
    for k in range(13, 30):
        x, y = resumed.next()
        assert torch.equal(x, ref[k][0]) and torch.equal(y, ref[k][1])
    # another seed gives other batches; other settings refuse to resume
    other = MixedBatches(small, pretrain, batch_size=5, block_size=128, mix_pretrain=0.2, seed=12)
    assert not torch.equal(other.next()[0], ref[0][0])
    for kwargs in ({"batch_size": 4}, {"mix_pretrain": 0.1}, {"seed": 1}):
        args = {"batch_size": 5, "block_size": 128, "mix_pretrain": 0.2, "seed": 11, **kwargs}
        with pytest.raises(ValueError, match="cannot resume"):
            MixedBatches(small, pretrain, **args).load_state_dict(copy.deepcopy(state))


def test_mixed_batches_argument_errors(small, pretrain):
    with pytest.raises(ValueError, match="no pretraining tokens"):
        MixedBatches(small, None, 4, 128, 0.15)
    with pytest.raises(ValueError, match="block_size"):
        MixedBatches(small, None, 4, 16, 0.0)
    with pytest.raises(ValueError, match="longer than block_size"):
        MixedBatches(small, pretrain[:100], 4, 128, 0.15)


def test_pretrain_from_a_token_dir_and_from_text_files(tmp_path, tok, small):
    text = shared_file("en/tinyshakespeare.txt").read_text(encoding="utf-8")[:30_000]
    src = tmp_path / "shakespeare.txt"
    src.write_text(text, encoding="utf-8")
    prepare_tokens([src], tok, tmp_path / "tokens", val_fraction=0.1)
    split = load_pretrain_tokens(str(tmp_path / "tokens"), tok)
    cfg = InstructDataConfig(paths=["x.json"], pretrain=str(tmp_path / "tokens"))
    assert open_pretrain_tokens(cfg, tok).sha256 == split.sha256
    assert split.sha256 == open_split(tmp_path / "tokens", "train").sha256
    mb = MixedBatches(small, split, 4, 128, 0.5, seed=0)
    x, y = mb.next()
    assert (y[2:] != IGNORE_INDEX).all() and x.max() < tok.vocab_size
    # text on the fly: documents + EOS, the same stream `prepare` would write (without the val tail)
    on_the_fly = load_pretrain_tokens(str(src), tok)
    assert on_the_fly.shards[0].tolist() == tok.encode(text) + [tok.eos_id]
    globbed = load_pretrain_tokens(str(tmp_path / "*.txt"), tok)
    assert globbed.sha256 == on_the_fly.sha256
    other = train_bpe([text], vocab_size=400)
    with pytest.raises(ValueError, match="another tokenizer"):
        load_pretrain_tokens(str(tmp_path / "tokens"), other)
    with pytest.raises(FileNotFoundError):
        load_pretrain_tokens(str(tmp_path / "nothing*.txt"), tok)


def test_eval_batches(small):
    batches = eval_batches(small, batch_size=2, block_size=128)
    assert sum(len(x) for x, _ in batches) == len(small.eval) == 3
    assert [tuple(x.shape) for x, _ in batches] == [(2, 128), (1, 128)]
    x, y = batches[0]
    ex = small.eval[0]
    n = len(ex.ids) - 1
    assert x[0, :n].tolist() == ex.ids[:-1].tolist()
    assert y[0, :n].tolist() == np.where(ex.loss_mask[1:], ex.ids[1:], IGNORE_INDEX).tolist()


# -- metrics ---------------------------------------------------------------------------------------


def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel   tower") == 1.0
    assert exact_match("Paris", "Paris, France") == 0.0
    assert exact_match("北京。", "北 京") == 1.0
    assert exact_match("北京", "南京") == 0.0
    assert exact_match("", "") == 1.0


def test_rouge_l_against_hand_computed_values():
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5; P = R = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # pred 4 words, ref 6 words, LCS "cat on the mat" = 4: P = 1, R = 4/6 -> F = 2*(2/3)/(5/3) = 0.8
    assert rouge_l("cat on the mat", "The cat sat on the mat.") == pytest.approx(0.8)
    # CJK by character: 我爱北京天安门 vs 我爱天安门广场: LCS 我爱天安门 = 5 of 7 each
    assert rouge_l("我爱北京天安门", "我爱天安门广场") == pytest.approx(5 / 7)
    # mixed: [我, 用, python, 写, 代, 码] vs [我, 用, rust, 写, 代, 码]: LCS 5 of 6
    assert rouge_l("我用Python写代码", "我用 Rust 写代码") == pytest.approx(5 / 6)
    # order matters (a subsequence, not a bag): LCS("a b c d", "d c b a") = 1 -> P = R = 1/4
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)
    assert rouge_l("", "x") == 0.0 and rouge_l("x", "") == 0.0 and rouge_l("same", "Same!") == 1.0


def test_bit_parallel_lcs_matches_the_dynamic_programme():
    rng = random.Random(0)

    def dp(a, b):
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, z in enumerate(b):
                cur.append(prev[j] + 1 if x == z else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 90))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 90))]
        assert _lcs_len(a, b) == dp(a, b)
