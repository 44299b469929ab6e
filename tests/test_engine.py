import pytest
import torch

from llmkit.infer.engine import Engine, RequestParams
from llmkit.infer.generate import SamplingParams, stream_tokens
from llmkit.models.decoder import Decoder, DecoderConfig

V = 97
GREEDY = RequestParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
FAMILIES = {
    "gpt2": dict(n_head=4),
    "llama_gqa": dict(n_head=4, n_kv_head=2, positions="rope", norm="rmsnorm", activation="swiglu"),
}


def make_model(family: str) -> Decoder:
    """A random model whose greedy continuations vary (the default init repeats one token: a wrong cache
    would go unseen)."""
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=V, block_size=96, n_layer=2, d_model=64, **FAMILIES[family])
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mixed_batch_joining_at_different_steps_equals_stream_tokens(family):
    model = make_model(family)
    eng = Engine(model, max_batch=3, prefix_cache_tokens=0)  # 3 slots for 6 requests: a queue forms
    ps = prompts((5, 17, 30, 9, 40, 3))
    lens = (12, 4, 9, 12, 7, 12)
    params = [RequestParams(max_new_tokens=n, temperature=0, stop_at_eos=False) for n in lens]
    ids = [eng.add_request(ps[0], params[0]), eng.add_request(ps[1], params[1])]
    eng.step()
    eng.step()
    ids.append(eng.add_request(ps[2], params[2]))  # joins while two are mid-decode
    eng.step()
    ids += [eng.add_request(p, sp) for p, sp in zip(ps[3:], params[3:])]
    streamed = {i: [] for i in ids}
    steps = 0
    while eng.has_unfinished():
        assert len(eng.running) <= 3
        for rid, t in eng.step().items():
            streamed[rid].append(t)
        steps += 1
    for i, p, sp in zip(ids, ps, params):
        want = list(stream_tokens(model, p, sp))
        assert eng.requests[i].output == want
        assert len(want) == sp.max_new_tokens
    assert streamed[ids[-1]] == eng.requests[ids[-1]].output
    assert eng.free_slots == 3


def test_seeded_sampling_independent_of_batch():
    model = make_model("llama_gqa")
    ps = prompts((11, 23, 6, 31))
    sampled = RequestParams(max_new_tokens=15, temperature=1.0, top_k=20, top_p=0.9, seed=123, stop_at_eos=False)
    alone = Engine(model, max_batch=4).generate([ps[0]], sampled)[0]
    eng = Engine(model, max_batch=4)
    others = [RequestParams(max_new_tokens=15, temperature=0.8, seed=s, stop_at_eos=False) for s in (1, 2)]
    eng.add_request(ps[1], others[0])
    eng.step()
    rid = eng.add_request(ps[0], sampled)
    eng.add_request(ps[2], others[1])
    eng.add_request(ps[3], GREEDY)
    eng.run()
    assert eng.requests[rid].output == alone
    # the same request and seed through the reference path, which samples the same way
    assert list(stream_tokens(model, ps[0], SamplingParams(**{k: getattr(sampled, k) for k in (
        "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_at_eos")}))) == alone
    other_seed = Engine(model).generate([ps[0]], RequestParams(max_new_tokens=15, temperature=1.0, seed=7,
                                                                stop_at_eos=False))[0]
    assert other_seed != alone


def test_cancel_frees_slot_and_others_continue():
    model = make_model("gpt2")
    eng = Engine(model, max_batch=2, prefix_cache_tokens=0)
    ps = prompts((8, 13, 5))
    a = eng.add_request(ps[0], RequestParams(max_new_tokens=30, temperature=0, stop_at_eos=False))
    b = eng.add_request(ps[1], GREEDY)
    c = eng.add_request(ps[2], GREEDY)
    eng.step()
    assert len(eng.running) == 2 and len(eng.waiting) == 1
    eng.cancel(a)  # slot 0: b moves into it, and c can start at the next step
    assert eng.requests[a].finish_reason == "cancelled" and eng.free_slots == 1
    eng.step()
    assert len(eng.running) == 2 and not eng.waiting
    eng.run()
    assert eng.requests[b].output == list(stream_tokens(model, ps[1], GREEDY))
    assert eng.requests[c].output == list(stream_tokens(model, ps[2], GREEDY))
    # cancelling a queued request removes it from the queue
    eng2 = Engine(model, max_batch=1)
    eng2.add_request(ps[0], GREEDY)
    q = eng2.add_request(ps[1], GREEDY)
    eng2.cancel(q)
    assert [r.request_id for r in eng2.waiting] == ["req-0"]


def test_stop_ids_eos_and_max_tokens():
    model = make_model("gpt2")
    p = prompts((10,))[0]
    full = list(stream_tokens(model, p, GREEDY))
    stop = full[5]
    cut = full[:full.index(stop)]
    eng = Engine(model, eos_id=None)
    out = eng.generate([p], RequestParams(max_new_tokens=12, temperature=0, stop_token_ids=(stop,)))[0]
    assert out == cut
    eng_eos = Engine(model, eos_id=stop)
    assert eng_eos.generate([p], RequestParams(max_new_tokens=12, temperature=0))[0] == cut
    assert eng_eos.generate([p], RequestParams(max_new_tokens=12, temperature=0, stop_at_eos=False))[0] == full
    assert eng.generate([p], RequestParams(max_new_tokens=3, temperature=0))[0] == full[:3]
    # the context length bounds generation as in stream_tokens
    small = Engine(model, max_len=16)
    assert len(small.generate([p], GREEDY)[0]) == 6


def test_stream_iterator_and_callback():
    model = make_model("gpt2")
    p = prompts((7,))[0]
    eng = Engine(model)
    got = []
    eng.add_request(p, GREEDY, request_id="x", on_token=lambda rid, t: got.append((rid, t)))
    streamed = list(eng.stream(prompts((9,))[0], GREEDY))
    assert streamed == list(stream_tokens(model, prompts((9,))[0], GREEDY))
    eng.run()
    assert [t for _, t in got] == list(stream_tokens(model, p, GREEDY)) and {r for r, _ in got} == {"x"}
    assert [r.request_id for r in eng.pop_finished()] == ["x"] and not eng.requests
    it = eng.stream(p, GREEDY, request_id="early")
    assert [next(it), next(it)] == list(stream_tokens(model, p, GREEDY))[:2]
    it.close()  # the consumer stops: the request is cancelled and its slot freed
    assert not eng.running and "early" not in eng.requests


def test_prefix_cache_warm_prefix_identical_and_fewer_prefill_tokens():
    model = make_model("llama_gqa")
    shared = prompts((40,), seed=5)[0]
    a, b = shared + prompts((6,), seed=6)[0], shared + prompts((9,), seed=7)[0]
    cold = Engine(model, prefix_cache_tokens=0)
    want = cold.generate([a, b], GREEDY)
    eng = Engine(model, prefix_cache_tokens=40, prefix_block=8)  # room for five blocks
    assert eng.generate([a], GREEDY)[0] == want[0]
    before = eng.prefill_tokens
    assert eng.generate([b], GREEDY)[0] == want[1]
    assert eng.prefill_tokens - before == len(b) - 40  # five 8-token blocks reused
    st = eng.stats()
    assert st["prefix_hits"] == 5 and st["prefix_blocks"] == 5
    assert st["prefix_evictions"] == 1  # b's own sixth block, the chain's tail, went first
    assert eng.generate([a], GREEDY)[0] == want[0]
    assert eng.stats()["prefix_hits"] == 10


def test_prefix_cache_lru_evicts_tail_first():
    from llmkit.infer.engine import PrefixCache

    pc = PrefixCache(max_tokens=4 * 4, block_size=4)
    toks = list(range(24))
    chain = pc.chain(toks, 6)
    pc.insert(chain, lambda j: (torch.zeros(1), torch.zeros(1)))
    assert len(pc.blocks) == 4 and len(pc.lookup(chain)) == 4  # the first four blocks survive
    assert pc.hits == 4 and pc.misses == 2


def test_refuses_prefix_models_and_other_families():
    model = make_model("gpt2")
    model.prefix = torch.nn.Identity()
    with pytest.raises(ValueError, match="prefix"):
        Engine(model)
    with pytest.raises(TypeError, match="Decoder"):
        Engine(torch.nn.Linear(2, 2))


@torch.no_grad()
def reference_greedy(model, prompt, n, rep=1.0, presence=0.0, frequency=0.0):
    """Uncached greedy decoding with the penalties written out by hand, one row at a time."""
    ids, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0][0, -1].tolist()
        for t in set(ids):
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(out):
            logits[t] -= presence + frequency * out.count(t)
        t = max(range(len(logits)), key=logits.__getitem__)
        ids.append(t)
        out.append(t)
    return out


def test_penalties_per_request_in_one_batch_match_hand_reference():
    model = make_model("gpt2")
    ps = prompts((6, 11, 4))
    settings = [dict(rep=1.8), dict(presence=2.0, frequency=1.0), dict()]
    params = [RequestParams(max_new_tokens=10, temperature=0, stop_at_eos=False,
                            repetition_penalty=s.get("rep", 1.0), presence_penalty=s.get("presence", 0.0),
                            frequency_penalty=s.get("frequency", 0.0)) for s in settings]
    out = Engine(model, max_batch=3).generate(ps, params)
    for o, p, s in zip(out, ps, settings):
        assert o == reference_greedy(model, p, 10, **s)
    assert out[2] == list(stream_tokens(model, ps[2], GREEDY))[:10]
    assert out[0] != list(stream_tokens(model, ps[0], GREEDY))[:10]  # the penalty changed something


def test_min_p_one_is_greedy_and_logprobs():
    model = make_model("llama_gqa")
    p = prompts((9,))[0]
    want = list(stream_tokens(model, p, GREEDY))
    # min_p 1 keeps only the most likely token: sampling becomes greedy whatever the seed
    mp = RequestParams(max_new_tokens=12, temperature=1.5, min_p=1.0, seed=3, stop_at_eos=False)
    assert Engine(model).generate([p], mp)[0] == want
    eng = Engine(model)
    rid = eng.add_request(p, RequestParams(max_new_tokens=12, temperature=0, stop_at_eos=False, logprobs=3))
    eng.run()
    req = eng.requests[rid]
    assert req.output == want and len(req.logprobs) == 12
    ids = list(p)
    with torch.no_grad():
        for t, (lp, top) in zip(req.output, req.logprobs):
            ref = model(torch.tensor([ids]))[0][0, -1].log_softmax(-1)
            assert abs(lp - ref[t].item()) < 1e-4
            assert [i for i, _ in top] == ref.topk(3).indices.tolist() and top[0][0] == t
            assert all(abs(v - ref[i].item()) < 1e-4 for i, v in top)
            ids.append(t)
    # with temperature 2 the reported distribution is the tempered one
    eng2 = Engine(model)
    r2 = eng2.add_request(p, RequestParams(max_new_tokens=1, temperature=2.0, seed=0, stop_at_eos=False,
                                           logprobs=0))
    eng2.run()
    t = eng2.requests[r2].output[0]
    with torch.no_grad():
        ref = (model(torch.tensor([p]))[0][0, -1] / 2.0).log_softmax(-1)
    assert abs(eng2.requests[r2].logprobs[0][0] - ref[t].item()) < 1e-4 and eng2.requests[r2].logprobs[0][1] == []


class CharTok:
    """Token id -> one character (ids 0..25 'a'..'z', others '_')."""

    eos_id = None

    def decode(self, ids):
        return "".join(chr(97 + i) if i < 26 else "_" for i in ids)


def test_stop_strings_trim_text_and_output():
    model = make_model("gpt2")
    p = prompts((10,))[0]
    full = list(stream_tokens(model, p, GREEDY))
    tok = CharTok()
    text = tok.decode(full)
    stop = text[4:6]  # two tokens long: ends at the first occurrence
    cut = text.find(stop)
    eng = Engine(model, tokenizer=tok)
    rid = eng.add_request(p, RequestParams(max_new_tokens=12, temperature=0, stop_at_eos=False, stop=(stop, "#")))
    eng.run()
    req = eng.requests[rid]
    assert req.finish_reason == "stop" and req.text == text[:cut] and req.output == full[:cut]
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model).add_request(p, RequestParams(stop=("x",)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_prefill_one_forward_identical_outputs(family):
    model = make_model(family)
    shared = prompts((16,), seed=3)[0]
    ps = prompts((5, 17, 30, 1, 12)) + [shared + [1, 2, 3], shared + [4] * 9]
    want = [list(stream_tokens(model, p, GREEDY)) for p in ps]
    eng = Engine(model, max_batch=8, prefix_block=8)
    eng.add_request(shared + [7])  # leaves the shared prefix blocks in the cache: mixed starts below
    eng.run()
    calls = []
    orig = eng._prefill_batch
    eng._prefill_batch = lambda reqs: calls.append(len(reqs)) or orig(reqs)
    ids = [eng.add_request(p, GREEDY) for p in ps]
    eng.step()
    # all 7 prefilled in this step, in forwards of similar lengths (padding_groups), some holding several
    assert sum(calls) == 7 and max(calls) >= 2 and len(eng.running) == 7
    assert [eng.requests[i].cached_tokens for i in ids[-2:]] == [16, 16]
    eng.run()
    assert [eng.requests[i].output for i in ids] == want
    # the padded-token cap splits the waiting queue over several forwards
    small = Engine(model, max_batch=8, prefix_cache_tokens=0, max_prefill_tokens=40)
    calls.clear()
    orig2 = small._prefill_batch
    small._prefill_batch = lambda reqs: calls.append(len(reqs) * max(len(r.prompt) for r in reqs)) or orig2(reqs)
    assert small.generate(ps[:5], GREEDY) == want[:5]
    assert len(calls) > 1 and max(calls) <= 40  # padded tokens per forward stay under the cap


def test_prefill_groups_bound_padding_and_keep_every_request():
    from llmkit.infer.engine import Request, padding_groups

    reqs = [Request(str(i), [0] * n, GREEDY, 1, None) for i, n in enumerate((127, 37, 120, 40, 64, 125, 38))]
    groups = padding_groups(reqs)
    assert sorted(r.request_id for g in groups for r in g) == sorted(r.request_id for r in reqs)
    for g in groups:
        real = sum(len(r.prompt) for r in g)
        assert len(g) * max(len(r.prompt) for r in g) <= 1.25 * real
    assert len(groups) < len(reqs)  # similar lengths still share a forward
    assert [[len(r.prompt) for r in g] for g in groups] == [[127, 125, 120, 64], [40, 38, 37]]


# -- failures stay with the request that caused them ------------------------------------------------

def test_failed_multi_group_prefill_requeues_and_cancel_is_defensive():
    """A prefill that fails in its second length group: the requests it had taken off the queue go back
    (cancel used to call waiting.remove() on them and raise ValueError, killing the server's engine thread),
    and after the failure the engine still produces the reference outputs."""
    model = make_model("gpt2")
    eng = Engine(model, max_batch=4, prefix_cache_tokens=0)
    ps = prompts((60, 3, 4))  # 60 vs 3-4 tokens: two padding groups
    ids = [eng.add_request(p, GREEDY) for p in ps]
    real_prefill, calls = eng._prefill_batch, []

    def failing_second_group(group):
        calls.append(len(group))
        if len(calls) == 2:
            raise RuntimeError("device error")
        return real_prefill(group)

    eng._prefill_batch = failing_second_group
    with pytest.raises(RuntimeError):
        eng.step()
    assert len(calls) == 2
    # the first group's request is running, the other two are back in the queue, in order
    assert [r.request_id for r in eng.running] == [ids[0]]
    assert [r.request_id for r in eng.waiting] == ids[1:]
    assert all(r.blocks == [] and r.length == 0 for r in eng.waiting)
    eng._prefill_batch = real_prefill
    eng.run()
    for rid, p in zip(ids, ps):
        assert eng.requests[rid].output == list(stream_tokens(model, p, GREEDY))
    # cancel: finished, unknown and popped ids are no-ops; a request in neither queue nor batch is marked
    eng.cancel(ids[0])
    assert eng.requests[ids[0]].finish_reason == "length"
    eng.pop_finished()
    eng.cancel(ids[0])
    eng.cancel("no-such-request")
    rid = eng.add_request(ps[1], GREEDY)
    eng.waiting.clear()  # as if a failed step had dropped it
    eng.cancel(rid)
    assert eng.requests[rid].finish_reason == "cancelled" and not eng.has_unfinished()


def test_hostile_sampling_row_fails_alone_and_the_batch_goes_on():
    """repetition_penalty 1e-45 divides positive logits into +inf (softmax: NaN); torch.multinomial would
    raise for the whole batch. Only that request ends, with finish_reason 'error'; the others are
    untouched (same tokens as alone, full length)."""
    model = make_model("gpt2")
    eng = Engine(model, max_batch=4, prefix_cache_tokens=0)
    ps = prompts((8, 9, 10))
    long = RequestParams(max_new_tokens=40, temperature=0, stop_at_eos=False)
    sampled = RequestParams(max_new_tokens=40, temperature=0.8, seed=3, stop_at_eos=False)
    hostile = RequestParams(max_new_tokens=40, temperature=1.0, repetition_penalty=1e-45, stop_at_eos=False)
    a = eng.add_request(ps[0], long)
    b = eng.add_request(ps[1], sampled)
    h = eng.add_request(ps[2], hostile)
    eng.run()
    assert eng.requests[h].finish_reason == "error" and "NaN" in eng.requests[h].error
    assert eng.requests[h].output == []
    assert eng.requests[a].output == list(stream_tokens(model, ps[0], long))
    alone = Engine(model, max_batch=1, prefix_cache_tokens=0)
    assert eng.requests[b].output == alone.generate([ps[1]], sampled)[0]
    assert len(eng.requests[a].output) == len(eng.requests[b].output) == 40
    # NaN logits from the model itself (any cause) fail the row on the greedy fast path too
    eng2 = Engine(model, max_batch=2, prefix_cache_tokens=0)
    x = eng2.add_request(ps[0], GREEDY)
    y = eng2.add_request(ps[1], GREEDY)
    eng2.step()
    real_decode = eng2._decode

    def nan_in_row_0():
        logits = real_decode()
        logits[0] = float("nan")
        return logits

    eng2._decode = nan_in_row_0
    eng2.step()
    eng2._decode = real_decode
    eng2.run()
    failed = {rid for rid in (x, y) if eng2.requests[rid].finish_reason == "error"}
    assert len(failed) == 1
    ok = ({x, y} - failed).pop()
    assert eng2.requests[ok].output == list(stream_tokens(model, ps[0 if ok == x else 1], GREEDY))


def test_tiny_temperature_is_greedy_and_huge_top_k_is_off():
    model = make_model("gpt2")
    p = prompts((7,))[0]
    want = list(stream_tokens(model, p, GREEDY))
    eng = Engine(model, max_batch=2, prefix_cache_tokens=0)
    tiny = RequestParams(max_new_tokens=12, temperature=1e-40, stop_at_eos=False)
    huge_k = RequestParams(max_new_tokens=12, temperature=1e-30, top_k=2 ** 63, stop_at_eos=False)
    assert eng.generate([p, p], [tiny, huge_k]) == [want, want]


def test_padded_embedding_rows_are_never_sampled():
    # the embedding has V rows, the tokenizer 40 tokens (as Qwen2.5 pads 151665 tokens to 151936 rows); the
    # head is rigged so that unmasked, a padding row would win every greedy step
    model = make_model("llama_gqa")
    n_tok = 40
    with torch.no_grad():
        model.lm_head.weight[n_tok:] = 5 * model.lm_head.weight[:V - n_tok]
    ps = [p for p in prompts([5, 9, 3]) if p]
    raw = Engine(model, max_batch=3, prefix_cache_tokens=0).generate(ps, GREEDY)
    assert any(t >= n_tok for out in raw for t in out)  # the test has teeth
    eng = Engine(model, max_batch=3, prefix_cache_tokens=0, vocab_limit=n_tok)
    for params in (GREEDY, RequestParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False,
                                         repetition_penalty=1.2)):
        outs = eng.generate(ps, params)
        assert all(len(o) == 12 and max(o) < n_tok for o in outs)
    greedy = eng.generate(ps, GREEDY)
    for p, out in zip(ps, greedy):  # the best real token, as stream_tokens picks it with the same limit
        assert out == list(stream_tokens(model, p, SamplingParams(max_new_tokens=12, temperature=0,
                                                                  stop_at_eos=False), vocab_limit=n_tok))
