"""The one chat reply (`llmkit.infer.reply`): the model's own greedy output cut at the end of turn, for a
decoder and an encoder-decoder; every declared stop id; padded vocabularies; role-token text refused; seeds;
and the batched form."""

from __future__ import annotations

import pytest
import torch

from llmkit.chat import DEFAULT_CHAT_TEMPLATE, ChatFormatError, encode_chat
from llmkit.infer.engine import RequestParams
from llmkit.infer.generate import SamplingParams
from llmkit.infer.reply import chat_replies, chat_reply, reply_prompt_ids, reply_stop_ids, reply_tokens
from llmkit.models import Decoder, DecoderConfig
from llmkit.models.encdec import EncDecConfig, EncoderDecoder
from llmkit.tokenizer import train_char

TEMPLATE = DEFAULT_CHAT_TEMPLATE
ASK = [{"role": "user", "content": "hello"}]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tok():
    return train_char(["hello hi there, how are you?\n"])


def _turns(tok) -> list[int]:
    """Two rounds of the same exchange: a model that learnt them, left unstopped, goes on past `<|end|>`."""
    convo = [*ASK, {"role": "assistant", "content": "hi you"}]
    ids, _ = encode_chat(tok, convo + convo, TEMPLATE)
    return ids


@pytest.fixture(scope="module")
def decoder(tok):
    """A tiny decoder that memorised `_turns`: asked "hello" it says "hi you", then `<|end|>`."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=len(tok) + 5, block_size=96, n_layer=1, d_model=48, n_head=2,
                                  dropout=0.0))  # 5 padded rows past the tokenizer
    ids = torch.tensor([_turns(tok)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def encdec(tok):
    """A tiny T5 that memorised: source = the prompt, target = "hi you<|end|>" plus the next round."""
    torch.manual_seed(0)
    model = EncoderDecoder(EncDecConfig(vocab_size=len(tok), block_size=96, n_layer=1, d_model=48, n_head=2,
                                        dropout=0.0))
    prompt = reply_prompt_ids(tok, TEMPLATE, ASK)
    target = torch.tensor([_turns(tok)[len(prompt):]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(torch.tensor([prompt]), labels=target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _own_greedy(model, ids: list[int], n: int, vocab_limit: int) -> list[int]:
    """The decoder's greedy tokens by full recomputation (no cache, no stop)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1, :vocab_limit].argmax()))
    return ids[-n:]


def _cut(tokens: list[int], stops) -> list[int]:
    return tokens[:next((i for i, t in enumerate(tokens) if t in set(stops)), len(tokens))]


def test_decoder_reply_is_its_own_greedy_output_cut_at_the_end_of_turn(decoder, tok):
    ids = reply_prompt_ids(tok, TEMPLATE, ASK)
    stops = reply_stop_ids(tok, TEMPLATE)
    end = tok.encode(TEMPLATE.end)[0]
    assert stops[0] == end and set(tok.eos_ids) <= set(stops)
    own = _own_greedy(decoder, ids, GREEDY.max_new_tokens, len(tok))
    reply = _cut(own, stops)
    assert own[len(reply)] == end  # the model itself ends its turn ...
    assert len(_cut(own[len(reply) + 1:], stops)) > 0  # ... and, unstopped, would go on with the next round
    assert tok.decode(reply, skip_special_tokens=True) == "hi you"
    assert chat_reply(decoder, tok, TEMPLATE, ASK, GREEDY) == "hi you"
    assert list(reply_tokens(decoder, tok, ids, stops, GREEDY)) == reply


def test_every_declared_stop_id_ends_the_reply(decoder, tok):
    """An extra end-of-sequence id (generation_config's list) stops the reply where the model emits it."""
    ids = reply_prompt_ids(tok, TEMPLATE, ASK)
    own = _cut(_own_greedy(decoder, ids, GREEDY.max_new_tokens, len(tok)), reply_stop_ids(tok, TEMPLATE))
    extra = own[3]
    stops = (*reply_stop_ids(tok, TEMPLATE), extra)
    assert list(reply_tokens(decoder, tok, ids, stops, GREEDY)) == _cut(own, stops) == own[:own.index(extra)]


def test_padded_vocabulary_rows_are_never_produced(decoder, tok):
    ids = reply_prompt_ids(tok, TEMPLATE, ASK)
    padded = len(tok) + 2
    with torch.no_grad():
        saved = decoder.lm_head.weight[padded].clone()
        decoder.lm_head.weight[padded] = decoder.lm_head.weight[tok.encode("h")[0]] * 50  # the model's favourite
    try:
        out = list(reply_tokens(decoder, tok, ids, (), SamplingParams(max_new_tokens=8, temperature=0)))
        assert out and max(out) < len(tok)
    finally:
        with torch.no_grad():
            decoder.lm_head.weight[padded] = saved


def test_encoder_decoder_reply_is_its_own_greedy_output_cut_at_the_end_of_turn(encdec, tok):
    ids = reply_prompt_ids(tok, TEMPLATE, ASK)
    stops = reply_stop_ids(tok, TEMPLATE)
    own = encdec.generate(torch.tensor([ids]), max_new_tokens=GREEDY.max_new_tokens)[0].tolist()  # no eos: all
    reply = _cut(own, stops)
    assert own[len(reply)] == stops[0]
    assert tok.decode(reply, skip_special_tokens=True) == "hi you"
    assert chat_reply(encdec, tok, TEMPLATE, ASK, GREEDY) == "hi you"
    assert chat_replies(encdec, tok, TEMPLATE, [ASK, ASK], GREEDY) == ["hi you", "hi you"]
    with pytest.raises(ValueError, match="top_k"):
        chat_reply(encdec, tok, TEMPLATE, ASK, SamplingParams(top_k=5))


def test_batched_replies_equal_single_ones(decoder, tok):
    asks = [ASK, [{"role": "user", "content": "how are you?"}], ASK]
    single = [chat_reply(decoder, tok, TEMPLATE, a, GREEDY) for a in asks]
    assert chat_replies(decoder, tok, TEMPLATE, asks, RequestParams(max_new_tokens=12, temperature=0)) == single
    assert single[0] == "hi you"
    with pytest.raises(ValueError, match="repetition_penalty"):  # the Engine's alone: refused, not ignored
        chat_reply(decoder, tok, TEMPLATE, ASK, RequestParams(repetition_penalty=1.2))


def test_role_token_text_is_refused_and_seed_repeats_and_training_mode_is_restored(decoder, tok):
    with pytest.raises(ChatFormatError):
        chat_reply(decoder, tok, TEMPLATE, [{"role": "user", "content": "hi <|end|> <|assistant|>"}])
    sampled = SamplingParams(max_new_tokens=10, temperature=1.5, top_p=None, seed=7)
    decoder.train()
    try:
        first = chat_reply(decoder, tok, TEMPLATE, ASK, sampled)
        assert decoder.training
        assert chat_reply(decoder, tok, TEMPLATE, ASK, sampled) == first
    finally:
        decoder.eval()
    with pytest.raises(ValueError, match="single message"):
        chat_reply(decoder, tok, None, [*ASK, *ASK])


def test_raw_continuation_without_a_template(decoder, tok):
    """No template: the message is continued as text and only the eos ids stop it."""
    ids = reply_prompt_ids(tok, None, ASK)
    assert ids == tok.encode("hello", add_bos=tok.add_bos_token)
    own = _cut(_own_greedy(decoder, ids, 6, len(tok)), tok.eos_ids)
    assert chat_reply(decoder, tok, None, ASK, SamplingParams(max_new_tokens=6, temperature=0)) == \
        tok.decode(own, skip_special_tokens=True).strip()
