"""Structured output on the OpenAI-compatible server: request fields -> a compiled `Grammar` for the engine.

Accepted (on /v1/chat/completions and /v1/completions, streaming or not, any n: every choice of a request
shares one compiled grammar and gets its own matcher in the engine):

* ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any JSON object),
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}`` (OpenAI), and
  the extensions ``{"type": "regex", "regex": "..."}`` and ``{"type": "grammar", "grammar": "..."}``
  (llguidance Lark, or llama.cpp GBNF).
* vLLM's body fields ``guided_json`` (a schema, object or string), ``guided_regex``, ``guided_grammar`` and
  ``guided_choice`` (a list of strings: the output is exactly one of them).

At most one of these may be given. A malformed field, or a schema / pattern / grammar that is unsupported or
unsatisfiable, is an OpenAI 400 error (`APIError`) whose ``param`` is the field (``response_format``, ``guided_json``,
...) and whose message names the construct (`llmkit.infer.constrained.ConstraintError`).

``strict`` is accepted either way: the output always follows the schema (OpenAI's non-strict mode only
promises "valid JSON" and may drift from the schema; following it exactly is what a caller wants).
"""

from __future__ import annotations

import json
from typing import Any

from llmkit.infer.constrained import (
    ConstraintError,
    Grammar,
    compile_grammar,
    compile_json_object,
    compile_json_schema,
    compile_regex,
)
from llmkit.serve.errors import APIError

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_grammar", "guided_choice")
MAX_CHOICES = 256


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(message, param, code=code)


def _compile(param: str, fn, *args) -> Grammar:
    try:
        return fn(*args)
    except ConstraintError as e:
        raise _bad(f"{param}: {e}", param, "unsupported_schema") from None


def _response_format(rf: Any, tokenizer) -> Grammar | None:
    p = "response_format"
    if not isinstance(rf, dict):
        raise _bad("'response_format' must be an object like {\"type\": \"json_object\"}", p, "invalid_type")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _compile(p, compile_json_object, tokenizer)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise _bad("response_format.json_schema must be an object {name, schema, strict}", p, "invalid_type")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise _bad("response_format.json_schema.name must be a string", p, "invalid_type")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _bad("response_format.json_schema.strict must be a boolean", p, "invalid_type")
        schema = js.get("schema")
        if schema is None:  # OpenAI allows it: then any JSON object
            return _compile(p, compile_json_object, tokenizer)
        if not isinstance(schema, (dict, bool)):
            raise _bad("response_format.json_schema.schema must be a JSON schema object", p, "invalid_type")
        return _compile(p, compile_json_schema, tokenizer, schema)
    if kind == "regex":
        pattern = rf.get("regex", rf.get("pattern"))
        if not isinstance(pattern, str) or not pattern:
            raise _bad("response_format of type 'regex' needs a non-empty string 'regex'", p, "invalid_type")
        return _compile(p, compile_regex, tokenizer, pattern)
    if kind == "grammar":
        source = rf.get("grammar")
        if not isinstance(source, str) or not source.strip():
            raise _bad("response_format of type 'grammar' needs a non-empty string 'grammar' (Lark or GBNF)",
                       p, "invalid_type")
        return _compile(p, compile_grammar, tokenizer, source)
    raise _bad(f"response_format.type must be 'text', 'json_object', 'json_schema', 'regex' or 'grammar', "
               f"got {json.dumps(kind)[:40]}", p)


def _choice_grammar(choices: Any, tokenizer) -> Grammar:
    p = "guided_choice"
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise _bad("'guided_choice' must be a non-empty list of non-empty strings", p, "invalid_type")
    if len(choices) > MAX_CHOICES:
        raise _bad(f"'guided_choice' takes at most {MAX_CHOICES} strings, got {len(choices)}", p)
    return _compile(p, compile_grammar, tokenizer, "start: " + " | ".join(json.dumps(c) for c in choices))


def response_grammar(body: dict, tokenizer) -> Grammar | None:
    """The grammar a request body asks for (see the module doc), compiled for `tokenizer` (cached), or None
    for unconstrained output. Raises APIError (400, param = the field) for a bad field or construct."""
    given = [f for f in ("response_format", *GUIDED_FIELDS) if body.get(f) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise _bad(f"give at most one of response_format, {', '.join(GUIDED_FIELDS)}; got {', '.join(given)}",
                   given[1])
    field = given[0]
    v = body[field]
    if field == "response_format":
        return _response_format(v, tokenizer)
    if field == "guided_json":
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise _bad(f"'guided_json' is not valid JSON: {e}", field, "invalid_type") from None
        if not isinstance(v, (dict, bool)):
            raise _bad("'guided_json' must be a JSON schema (an object, or its JSON text)", field, "invalid_type")
        return _compile(field, compile_json_schema, tokenizer, v)
    if field == "guided_regex":
        if not isinstance(v, str) or not v:
            raise _bad("'guided_regex' must be a non-empty string", field, "invalid_type")
        return _compile(field, compile_regex, tokenizer, v)
    if field == "guided_grammar":
        if not isinstance(v, str) or not v.strip():
            raise _bad("'guided_grammar' must be a non-empty grammar string (Lark or GBNF)", field, "invalid_type")
        return _compile(field, compile_grammar, tokenizer, v)
    return _choice_grammar(v, tokenizer)
