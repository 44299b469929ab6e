"""Tool calling for /v1/chat/completions: OpenAI's ``tools`` / ``tool_choice`` / ``parallel_tool_calls``, tool
messages in the prompt, and the model's text turned back into ``tool_calls`` (whole or as streamed deltas).

Request side (`parse_tools`, `encode_prompt`): ``tools`` are validated (function names ``[A-Za-z0-9_-]{1,64}``,
unique; ``parameters`` a JSON-schema object, checked with `jsonschema`), ``tool_choice``
is ``"auto"`` (default with tools), ``"none"``, ``"required"`` or ``{"type": "function", "function": {"name"}}``
naming a declared tool. Assistant messages may carry ``tool_calls`` (content then may be null) and
``role: "tool"`` messages answer them by ``tool_call_id``; an id that no earlier assistant call carries is a
400 naming the message. Every failure is an OpenAI-style 400 naming the parameter.

Rendering: the model's own Jinja template renders ``tools`` and the tool messages when it can (probed once per
template: a probe tool and a probe call must appear in its output), with each call's ``arguments`` handed over
as a dict, as transformers and vLLM do (templates write ``arguments | tojson``). A template that cannot (llmkit's
own template, SmolLM2's) gets the documented fallback: a system message listing the tools in the style's
words (merged into the conversation's own system message), assistant calls written into the content in the
style's syntax, and tool results as user turns ``<tool_response>\\n...\\n</tool_response>``.

Styles (`detect_style`, from the template source):

* ``hermes`` (Qwen2.5, and the fallback): ``<tool_call>\\n{"name": f, "arguments": {...}}\\n</tool_call>``, one
  block per call.
* ``llama3`` (Llama 3.1/3.2: the template mentions ``<|python_tag|>`` or ``"parameters"`` beside Llama headers):
  the reply *is* the call, ``{"name": f, "parameters": {...}}`` (optionally after ``<|python_tag|>``), several
  separated by ``;``. Only a reply that starts with such an object is a call.
* ``smollm2`` (the template names SmolLM): ``<tool_call>[{"name": f, "arguments": {...}}, ...]</tool_call>``.

Response side: `llmkit.serve.tool_calls` turns the reply back into ``tool_calls``, whole or as streamed
deltas, with one incremental parser.

Constrained calls (`constrain`): ``tool_choice: "required"`` or a named function make generation follow a
grammar from `llmkit.infer.constrained.compile_tagged_json`: one (``parallel_tool_calls: false``) or more
calls, each in the style's tags (`TAGS`), whose ``name`` is a chosen function and whose ``arguments`` match its
schema. ``"auto"`` with any ``strict: true`` tool gets a Lark grammar (`auto_grammar_source`): free text, but
once the model opens a call tag (lazily matched, as llguidance's structural tags do) the call must name a
declared function, and a strict one's arguments must match its schema. The parser also checks strict
arguments with `jsonschema`. ``"none"``: tools are still rendered, nothing is parsed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from llmkit.serve.errors import APIError

STYLES = ("hermes", "llama3", "smollm2")
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128

# -- request validation ----------------------------------------------------------------------------------


@dataclass
class ToolRequest:
    """The validated tool fields of one chat request.

    tools: OpenAI tool dicts ``{"type": "function", "function": {name, description?, parameters, strict?}}``
    (``parameters`` defaulted to an empty object schema). choice: "auto", "none", "required" or "named"
    (then `named` is the function). style: the template's call syntax (one of `STYLES`).
    """

    tools: list[dict]
    choice: str = "auto"
    named: str | None = None
    parallel: bool = True
    style: str = "hermes"

    @property
    def functions(self) -> dict[str, dict]:
        """name -> the tool's ``function`` dict."""
        return {t["function"]["name"]: t["function"] for t in self.tools}

    @property
    def parses(self) -> bool:
        """Whether the reply is parsed for calls (not with tool_choice "none")."""
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """Whether the reply must be a call: tool_choice "required" or a named function."""
        return self.choice in ("required", "named")


def _schema_error(schema: Any) -> str | None:
    """Why `schema` is no usable JSON schema for a function's parameters (None: fine)."""
    if not isinstance(schema, dict):
        return f"must be a JSON schema object, got {json.dumps(schema)[:40]}"
    t = schema.get("type", "object")
    if t != "object":
        return f"must be a schema of type 'object' (the arguments are a JSON object), got type {json.dumps(t)[:40]}"
    props = schema.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(v, (dict, bool)) for v in props.values()):
        return "'properties' must map argument names to schemas"
    req = schema.get("required", [])
    if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
        return "'required' must be a list of argument names"
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return f"is not a valid JSON schema: {e.message}"
    return None


def _check_tools(raw: Any) -> list[dict]:
    if not isinstance(raw, list):
        raise APIError("'tools' must be a list of {type: 'function', function: {...}} objects", "tools",
                       code="invalid_type")
    if len(raw) > MAX_TOOLS:
        raise APIError(f"'tools' holds at most {MAX_TOOLS} tools, got {len(raw)}", "tools", code="invalid_value")
    out, seen = [], set()
    for i, t in enumerate(raw):
        p = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise APIError(f"{p}.type must be 'function'", f"{p}.type", code="invalid_value")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise APIError(f"{p}.function must be an object", f"{p}.function", code="invalid_type")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise APIError(f"{p}.function.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -, got "
                           f"{json.dumps(name)[:70]}", f"{p}.function.name", code="invalid_value")
        if name in seen:
            raise APIError(f"{p}.function.name: '{name}' is declared twice", f"{p}.function.name",
                           code="invalid_value")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise APIError(f"{p}.function.description must be a string", f"{p}.function.description",
                           code="invalid_type")
        params = fn.get("parameters")
        if params is None:  # OpenAI: omitted parameters = a function without arguments
            params = {"type": "object", "properties": {}}
        why = _schema_error(params)
        if why is not None:
            raise APIError(f"{p}.function.parameters {why}", f"{p}.function.parameters", code="invalid_value")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise APIError(f"{p}.function.strict must be a boolean", f"{p}.function.strict", code="invalid_type")
        clean = {"name": name}
        if desc is not None:
            clean["description"] = desc
        clean["parameters"] = params
        if strict is not None:
            clean["strict"] = strict
        out.append({"type": "function", "function": clean})
    return out


def parse_tools(body: dict, template: Any) -> ToolRequest | None:
    """`ToolRequest` of a chat body, or None when it declares no tools (``tools`` absent or empty).

    Raises APIError (400) naming ``tools[i]...``, ``tool_choice`` or ``parallel_tool_calls``."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise APIError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls", code="invalid_type")
    tools = _check_tools(raw) if raw is not None else []
    names = {t["function"]["name"] for t in tools}
    kind, named = "auto", None
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise APIError(f"'tool_choice' must be 'auto', 'none', 'required' or {{\"type\": \"function\", "
                           f"\"function\": {{\"name\": ...}}}}, got {json.dumps(choice)[:40]}", "tool_choice",
                           code="invalid_value")
        kind = choice
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError("'tool_choice' as an object must be {\"type\": \"function\", \"function\": {\"name\": "
                           "...}}", "tool_choice", code="invalid_value")
        kind, named = "named", fn["name"]
        if named not in names:
            known = ", ".join(sorted(names)[:10]) + (", ..." if len(names) > 10 else "")
            raise APIError(f"tool_choice names the function '{named[:64]}', which is not among 'tools' "
                           f"({known or 'none declared'})", "tool_choice.function.name", code="invalid_value")
    elif choice is not None:
        raise APIError("'tool_choice' must be a string or an object", "tool_choice", code="invalid_type")
    if not tools:
        if kind == "required":
            raise APIError("tool_choice 'required' needs 'tools'", "tool_choice", code="invalid_value")
        return None  # "auto" / "none" without tools: a plain chat request
    return ToolRequest(tools, kind, named, True if parallel is None else parallel, detect_style(template))


# -- messages --------------------------------------------------------------------------------------------


def has_tool_messages(messages: list) -> bool:
    """Whether any message is a tool result or an assistant message with tool calls."""
    return any(isinstance(m, dict) and (m.get("role") == "tool" or (m.get("role") == "assistant"
                                                                    and m.get("tool_calls") is not None))
               for m in messages)


def _text(content: Any, param: str, allow_null: bool = False) -> str | None:
    """A message's content as text (text parts joined); APIError naming `param` otherwise."""
    if content is None and allow_null:
        return None
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(f"{param}: only text content parts are supported", param, code="invalid_value")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(f"{param} must be a string, got {json.dumps(content)[:40]}", param, code="invalid_type")
    return content


def check_messages(messages: list) -> list[dict]:
    """Validate a conversation that may hold tool calls and results -> plain message dicts for a template:
    ``{"role", "content"}`` plus, on assistant calls, ``tool_calls`` with ``arguments`` parsed to a dict, and
    on tool results ``tool_call_id`` (and ``name``: the function it answers, for templates that print it).

    Raises APIError naming e.g. ``messages[3].tool_call_id`` for a result whose id no earlier assistant call
    carries."""
    out: list[dict] = []
    calls: dict[str, str] = {}  # call id -> function name, of the assistant calls so far
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"{p} must be an object", p, code="invalid_type")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(f"{p}.role must be 'system', 'user', 'assistant' or 'tool', got "
                           f"{json.dumps(role)[:40]}", f"{p}.role", code="invalid_value")
        if role == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str) or not cid:
                raise APIError(f"{p}.tool_call_id is required on a tool message", f"{p}.tool_call_id",
                               code="missing_required_parameter")
            if cid not in calls:
                raise APIError(f"{p}.tool_call_id '{cid[:80]}' matches no tool call of an earlier assistant "
                               "message", f"{p}.tool_call_id", code="invalid_value")
            out.append({"role": "tool", "content": _text(m.get("content"), f"{p}.content"), "tool_call_id": cid,
                        "name": calls[cid]})
            continue
        tcs = m.get("tool_calls") if role == "assistant" else None
        content = _text(m.get("content"), f"{p}.content", allow_null=tcs is not None)
        msg: dict[str, Any] = {"role": role, "content": content}
        if tcs is not None:
            if not isinstance(tcs, list) or not tcs:
                raise APIError(f"{p}.tool_calls must be a non-empty list", f"{p}.tool_calls", code="invalid_type")
            msg["tool_calls"] = []
            for j, tc in enumerate(tcs):
                q = f"{p}.tool_calls[{j}]"
                if not isinstance(tc, dict) or tc.get("type", "function") != "function":
                    raise APIError(f"{q} must be {{id, type: 'function', function: {{name, arguments}}}}", q,
                                   code="invalid_value")
                cid, fn = tc.get("id"), tc.get("function")
                if not isinstance(cid, str) or not cid:
                    raise APIError(f"{q}.id must be a non-empty string", f"{q}.id", code="invalid_value")
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise APIError(f"{q}.function.name must be a string", f"{q}.function.name",
                                   code="invalid_value")
                args = fn.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        raise APIError(f"{q}.function.arguments is not valid JSON", f"{q}.function.arguments",
                                       code="invalid_value") from None
                if not isinstance(args, dict):
                    raise APIError(f"{q}.function.arguments must be a JSON object", f"{q}.function.arguments",
                                   code="invalid_value")
                calls[cid] = fn["name"]
                msg["tool_calls"].append({"id": cid, "type": "function",
                                          "function": {"name": fn["name"], "arguments": args}})
        out.append(msg)
    return out


# -- templates -------------------------------------------------------------------------------------------


def _source(template: Any) -> str:
    src = getattr(template, "source", None)
    if isinstance(src, dict):
        return src.get("tool_use") or src.get("default") or next(iter(src.values()))
    return src if isinstance(src, str) else ""


def detect_style(template: Any) -> str:
    """The call syntax a template's model writes, read from its Jinja source (llmkit's own template and
    unrecognized ones: "hermes")."""
    src = _source(template)
    if "<|python_tag|>" in src or ("<|start_header_id|>" in src and ('"parameters"' in src or "ipython" in src)):
        return "llama3"
    if "SmolLM" in src and "<tool_call>" not in src:  # SmolLM2's template: tools only via its system prompt
        return "smollm2"
    return "hermes"


_PROBE_FN = "llmkit_probe_fn_7q"
_PROBE_ARG = "llmkit_probe_arg_3z"
_PROBE_RESULT = "llmkit_probe_result_9x"


def native_support(template: Any) -> tuple[bool, bool]:
    """(renders tools, renders tool calls and results) of a Jinja template, found by rendering probes: a
    probe tool must show up in the prompt, and a probe call's name, argument and result in the conversation
    (cached per template). llmkit's own template: (False, False)."""
    from llmkit.chat_template import JinjaChatTemplate

    if not isinstance(template, JinjaChatTemplate):
        return False, False
    return _probe(template)


@lru_cache(maxsize=16)
def _probe(template: Any) -> tuple[bool, bool]:
    from llmkit.chat_template import TemplateRenderError

    tool = {"type": "function", "function": {"name": _PROBE_FN, "description": "probe", "parameters": {
        "type": "object", "properties": {_PROBE_ARG: {"type": "integer"}}}}}
    user = {"role": "user", "content": "hi"}
    try:
        tools_ok = _PROBE_FN in template.render([user], True, tools=[tool])
    except (TemplateRenderError, TypeError, ValueError):
        tools_ok = False
    conv = [user, {"role": "assistant", "tool_calls": [{"id": "call_probe", "type": "function", "function": {
        "name": _PROBE_FN, "arguments": {_PROBE_ARG: 1}}}]},
        {"role": "tool", "tool_call_id": "call_probe", "name": _PROBE_FN, "content": _PROBE_RESULT}]
    try:
        text = template.render(conv, True, tools=[tool] if tools_ok else None)
        calls_ok = all(s in text for s in (_PROBE_FN, _PROBE_ARG, _PROBE_RESULT))
    except (TemplateRenderError, TypeError, ValueError):
        calls_ok = False
    return tools_ok, calls_ok


def _signature(tool: dict) -> str:
    return json.dumps(tool, ensure_ascii=False)


def fallback_system_prompt(tools: list[dict], style: str) -> str:
    """The system text listing `tools` for a template that cannot render them, in the style's own words
    (Qwen2.5's Hermes prompt, SmolLM2's function-calling prompt, Llama 3.1's JSON prompt)."""
    if style == "smollm2":
        listed = json.dumps([t["function"] for t in tools], ensure_ascii=False)
        return ("You are an expert in composing functions. You are given a question and a set of possible "
                "functions.\nBased on the question, you will need to make one or more function/tool calls to "
                "achieve the purpose.\nIf none of the functions can be used, point it out and refuse to answer.\n"
                "If the given question lacks the parameters required by the function, also point it out.\n\n"
                f"You have access to the following tools:\n<tools>{listed}</tools>\n\n"
                "The output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
                "The example format is as follows. Please make sure the parameter type is correct. If no function "
                "call is needed, please make the tool calls an empty list '[]'.\n<tool_call>[\n"
                '{"name": "func_name1", "arguments": {"argument1": "value1", "argument2": "value2"}},\n'
                "... (more tool calls as required)\n]</tool_call>")
    if style == "llama3":
        listed = "\n\n".join(json.dumps(t, ensure_ascii=False, indent=4) for t in tools)
        return ("You have access to the following functions. To call a function, please respond with JSON for a "
                'function call. Respond in the format {"name": function name, "parameters": dictionary of '
                f"argument name and its value}}. Do not use variables.\n\n{listed}")
    listed = "\n".join(_signature(t) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
            f"with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def format_calls(calls: list[dict], style: str) -> str:
    """Assistant tool calls (``{"function": {"name", "arguments": dict}}``) as the text the model writes."""
    objs = [{"name": c["function"]["name"], ("parameters" if style == "llama3" else "arguments"):
             c["function"]["arguments"]} for c in calls]
    if style == "smollm2":
        return "<tool_call>[" + ", ".join(json.dumps(o, ensure_ascii=False) for o in objs) + "]</tool_call>"
    if style == "llama3":
        return "; ".join(json.dumps(o, ensure_ascii=False) for o in objs)
    return "\n".join(f"<tool_call>\n{json.dumps(o, ensure_ascii=False)}\n</tool_call>" for o in objs)


def fallback_messages(messages: list[dict], tools: list[dict] | None, style: str, render_tools: bool,
                      render_calls: bool) -> list[dict]:
    """`messages` rewritten for a template that cannot render tools (`render_tools` False: a system message
    lists them, merged into a leading system message) or tool calls and results (`render_calls` False:
    calls become assistant text, each run of tool results one user turn of ``<tool_response>`` blocks)."""
    out: list[dict] = []
    for m in messages:
        if not render_calls and m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
            continue
        if not render_calls and m.get("tool_calls"):
            text = format_calls(m["tool_calls"], style)
            content = f"{m['content']}\n{text}" if m.get("content") else text
            out.append({"role": "assistant", "content": content})
            continue
        out.append(dict(m))
    for m in out:
        m.pop("_tool_turn", None)
    if tools and not render_tools:
        prompt = fallback_system_prompt(tools, style)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def encode_prompt(tokenizer, template: Any, messages: list, req: ToolRequest | None) -> list[int]:
    """Token ids of the conversation + generation prompt, tools rendered (natively or by the fallback).

    Raises APIError (400) naming ``messages`` when the template refuses the conversation (e.g. Llama 3.1's
    "only supports single tool-calls at once")."""
    from llmkit.chat import ChatFormatError, encode_chat
    from llmkit.chat_template import JinjaChatTemplate

    msgs = check_messages(messages)
    tools = req.tools if req is not None else None
    style = req.style if req is not None else detect_style(template)
    render_tools, render_calls = native_support(template)
    msgs = fallback_messages(msgs, tools, style, render_tools, render_calls)
    if not render_calls:  # plain {role, content} messages: drop the keys llmkit's own template refuses
        msgs = [{"role": m["role"], "content": m["content"] or ""} for m in msgs]
    kwargs = {"tools": tools} if tools and render_tools and isinstance(template, JinjaChatTemplate) else {}
    try:
        ids, _ = encode_chat(tokenizer, msgs, template, add_generation_prompt=True, **kwargs)
    except ChatFormatError as e:
        raise APIError(f"messages: {e}", "messages", code="invalid_value") from None
    return ids


# -- constrained generation ------------------------------------------------------------------------------

TAGS = {  # style -> (begin, end) around each call of a constrained reply, and the separator between calls
    # SmolLM2 writes several calls in one list; the grammar writes one list per call, which it also reads
    "hermes": ("<tool_call>\n", "\n</tool_call>", "\n"),
    "smollm2": ("<tool_call>[", "]</tool_call>", ""),
    "llama3": ("", "", "; "),
}


def call_schema(fn: dict, style: str) -> dict:
    """JSON schema of one call object of function `fn` in `style` (Llama names the arguments "parameters")."""
    key = "parameters" if style == "llama3" else "arguments"
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, key: fn["parameters"]},
            "required": ["name", key], "additionalProperties": False}


def _lark_literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal is a JSON string


def auto_grammar_source(req: ToolRequest) -> str:
    """Lark source (llguidance's dialect) of an ``auto`` reply with ``strict`` tools: free text, in which
    every call (hermes / smollm2: after the lazily matched ``<tool_call>`` trigger, as llguidance's structural
    tags do; llama3: only a reply that opens with ``{``) must be a declared function, a ``strict`` one's
    arguments matching its schema (the others' any JSON object)."""
    from llmkit.infer.constrained import JSON_OPTIONS

    key = "parameters" if req.style == "llama3" else "arguments"
    rules = []
    for i, fn in enumerate(req.functions.values()):
        params = fn["parameters"] if fn.get("strict") else {"type": "object"}
        schema = {"type": "object", "properties": {"name": {"const": fn["name"]}, key: params},
                  "required": ["name", key], "additionalProperties": False, "x-guidance": JSON_OPTIONS}
        rules.append(f"body{i}: %json {json.dumps(schema)}")
    body = "body: " + " | ".join(f"body{i}" for i in range(len(rules)))
    many = "*" if req.parallel else "?"
    if req.style == "llama3":  # a reply is calls (it opens with "{") or text that does not open with "{"
        sep = _lark_literal(TAGS["llama3"][2])
        calls = f"body ({sep} body)*" if req.parallel else "body"
        head = [f"start: {calls} | TEXT", r"TEXT: /([^{](.|\n)*)?/"]
    else:
        begin, end, _ = TAGS[req.style]
        trigger = "<tool_call>"
        rest = begin[len(trigger):]
        head = [f"start: call{many} tail", "tail: TEXT", r"TEXT: /(.|\n)*/",
                f"trig[lazy]: TEXT {_lark_literal(trigger)}",  # free text up to the first trigger
                f"call: trig {_lark_literal(rest) + ' ' if rest else ''}body {_lark_literal(end)}"]
    return "\n".join(["%llguidance {}", *head, body, *rules])


def constrain(choices: list, req: ToolRequest, tokenizer) -> None:
    """Put the call grammar on every choice's `RequestParams.grammar` when the reply must be a call
    (tool_choice "required" or named: `compile_tagged_json` over the chosen functions' call schemas), or when
    ``auto`` comes with ``strict`` tools (`auto_grammar_source`: text with schema-checked calls). Raises
    APIError (400) when the grammar cannot be built (a schema construct the grammar engine does not support,
    named in the message) or when the request is constrained otherwise too (``response_format``)."""
    import dataclasses

    strict_auto = req.choice == "auto" and any(f.get("strict") for f in req.functions.values())
    if not req.forced and not strict_auto:
        return
    from llmkit.infer.constrained import ConstraintError, compile_grammar, compile_tagged_json

    fns = req.functions
    try:
        if req.forced:
            chosen = [fns[req.named]] if req.choice == "named" else list(fns.values())
            schemas = [call_schema(f, req.style) for f in chosen]
            begin, end, sep = TAGS[req.style]
            grammar = compile_tagged_json(tokenizer, begin, schemas, end, min_items=1,
                                          max_items=None if req.parallel else 1, separator=sep)
        else:
            grammar = compile_grammar(tokenizer, auto_grammar_source(req))
    except ConstraintError as e:  # the grammar engine's message names the construct (and schema index)
        raise APIError(f"tools: the function schemas cannot be enforced: {e}", "tools",
                       code="invalid_value") from None
    for c in choices:
        if getattr(c.params, "grammar", None) is not None:
            raise APIError("constrained tool calls (tool_choice 'required', a named function or strict tools) "
                           "cannot be combined with response_format", "tool_choice", code="invalid_value")
        c.params = dataclasses.replace(c.params, grammar=grammar)
