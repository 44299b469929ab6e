"""Tool calls out of a reply: the model's text turned back into OpenAI ``tool_calls``, whole or as streamed
deltas (the request side, templates and constrained calls are `llmkit.serve.tools`).

One incremental parser serves both the streamed and the whole reply (the
whole reply is the concatenation of what the stream sends), so both agree. A call is announced once its name
is read and is a declared tool (first delta: ``index``, ``id``, ``type``, ``function.name``, ``arguments: ""``),
then its arguments stream as the model writes them, each character checked to keep a valid JSON prefix
(`JsonPrefix`); text that might be the start of a call tag is held back until it is clear. A call that turns
out malformed (bad JSON, unknown function, arguments not an object, a ``strict`` function's arguments failing
its schema, a reply cut inside a call) is returned as plain content in a whole reply, never a 500. A stream
cannot recall a call it announced: one whose JSON breaks after its name was read (or that max_tokens cuts)
stays as streamed, its arguments the valid JSON prefix sent so far (vLLM's streaming parsers cannot take
one back either), and its text then follows as content, so the streamed content equals the whole reply's; before the
name is read, nothing is announced and the broken text streams as content. Constrained calls
(`llmkit.serve.tools.constrain`) cannot break.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from llmkit.serve.tools import STYLES, ToolRequest

# -- incremental JSON ------------------------------------------------------------------------------------

_WS = " \t\n\r"
_NUM = set("-+.eE0123456789")
_NUM_RE = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?$")


class JsonPrefix:
    """Checks, one character at a time, that text is a prefix of one JSON value (RFC 8259).

    `push(ch)` returns True when `ch` belongs to the value, False when the value was already complete
    before it (`ch` is not consumed), and raises ValueError when `ch` cannot continue any JSON value. `done`:
    the value is complete. A number at the top level is never complete (its end is only known from the next
    character); arguments are objects, so that case does not arise.
    """

    def __init__(self):
        self.stack: list[str] = []  # open containers, "{" or "["
        # value | value_or_close (after "[") | key_or_close (after "{") | key | colon | comma_or_close |
        # string | num | lit
        self.state = "value"
        self.in_key = False
        self.esc = 0  # 0: no escape; 1: after a backslash; 2..5: hex digits of a \uXXXX escape left + 1
        self.num = ""
        self.lit = ""
        self.done = False

    def _closed(self) -> None:
        """A value (scalar or container) just ended."""
        if not self.stack:
            self.done = True
        self.state = "comma_or_close"

    def push(self, ch: str) -> bool:
        if self.done:
            return False
        s = self.state
        if s == "string":
            if self.esc == 1:
                if ch == "u":
                    self.esc = 5
                elif ch in '"\\/bfnrt':
                    self.esc = 0
                else:
                    raise ValueError(f"bad escape \\{ch}")
            elif self.esc > 1:
                if ch not in "0123456789abcdefABCDEF":
                    raise ValueError("bad \\u escape")
                self.esc = 0 if self.esc == 2 else self.esc - 1
            elif ch == "\\":
                self.esc = 1
            elif ch == '"':
                if self.in_key:
                    self.in_key, self.state = False, "colon"
                else:
                    self._closed()
            elif ord(ch) < 0x20:
                raise ValueError("control character in a string")
            return True
        if s == "num":
            if ch in _NUM:
                self.num += ch
                return True
            if not _NUM_RE.match(self.num):
                raise ValueError(f"bad number {self.num!r}")
            self._closed()
            return self.push(ch)  # the character after a number is the container's
        if s == "lit":
            self.lit += ch
            for word in ("true", "false", "null"):
                if word.startswith(self.lit):
                    if word == self.lit:
                        self._closed()
                    return True
            raise ValueError(f"bad literal {self.lit!r}")
        if ch in _WS:
            return True
        if s == "colon":
            if ch != ":":
                raise ValueError("expected ':'")
            self.state = "value"
            return True
        if s in ("key_or_close", "key"):
            if ch == "}" and s == "key_or_close":
                self.stack.pop()
                self._closed()
            elif ch == '"':
                self.state, self.in_key = "string", True
            else:
                raise ValueError("expected a key")
            return True
        if s == "comma_or_close":
            top = self.stack[-1]
            if ch == ",":
                self.state = "key" if top == "{" else "value"
            elif ch == ("}" if top == "{" else "]"):
                self.stack.pop()
                self._closed()
            else:
                raise ValueError(f"unexpected {ch!r}")
            return True
        if s == "value_or_close" and ch == "]":
            self.stack.pop()
            self._closed()
            return True
        # a value starts
        if ch == "{":
            self.stack.append("{")
            self.state = "key_or_close"
        elif ch == "[":
            self.stack.append("[")
            self.state = "value_or_close"
        elif ch == '"':
            self.state, self.in_key = "string", False
        elif ch in "-0123456789":
            self.state, self.num = "num", ch
        elif ch in "tfn":
            self.state, self.lit = "lit", ch
        else:
            raise ValueError(f"unexpected {ch!r}")
        return True


# -- parsing the reply -----------------------------------------------------------------------------------

_HEAD = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*\{$')
"""The start of a call object up to the opening brace of its arguments: from here they can stream."""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _strict_error(fn: dict, args: dict) -> str | None:
    if not fn.get("strict"):
        return None
    import jsonschema

    err = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(fn["parameters"])(
        fn["parameters"]).iter_errors(args))
    return None if err is None else err.message


@dataclass
class _Region:
    """A call region being read: `raw` its text so far, `state` what comes next."""

    raw: str = ""
    state: str = "open"  # open | obj | obj_or_close | in_obj | between | end
    listed: bool = False  # smollm2: the calls sit in a JSON list
    emitted: list[int] = field(default_factory=list)  # indices of calls announced from this region
    end: str = ""  # characters of the closing tag read so far
    obj: JsonPrefix | None = None
    obj_text: str = ""
    fast: int | None = None  # index of the call whose arguments are streaming
    streaming: bool = False  # inside the streamed arguments
    head_checked: bool = False


class ToolCallParser:
    """Incremental parser of a reply into text and tool calls, in one of `STYLES`.

    `feed(text)` and, at the end, `finish()` return events: ``("text", str)``, ``("start", index, id,
    name)``, ``("args", index, str)`` (argument text to append) and ``("retract", [index...], raw)`` (those
    calls turned out malformed: `raw` is their text, to be content instead; a stream that already sent them
    sends it as content). `max_calls` (1 with ``parallel_tool_calls: false``): further calls are read and dropped.

    Whitespace: what stands between calls and at the ends of a reply with calls is dropped; text before and
    after a call is joined by the whitespace that preceded the call; a reply without calls keeps all of it."""

    def __init__(self, style: str, functions: Mapping[str, dict], max_calls: int | None = None):
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        self.style, self.fns, self.max_calls = style, dict(functions), max_calls
        self.tag = "<|python_tag|>" if style == "llama3" else "<tool_call>"
        self.end_tag = "" if style == "llama3" else "</tool_call>"
        self.buf = ""
        self.region: _Region | None = None
        self.started = style != "llama3"  # llama: a call is only recognized at the start of the reply
        self.ws = ""  # whitespace held back: sent before the next text; dropped at the end of a reply with calls
        self.after_call = False  # drop whitespace right after a call region
        self.n_calls = 0  # calls read (announced or dropped)
        self.calls: list[dict | None] = []  # announced: {"id", "name", "arguments"}; None once retracted
        self.events: list[tuple] = []
        self.finished = False

    # -- events
    def _emit(self, ev: tuple) -> None:
        last = self.events[-1] if self.events else None
        if last is not None and ev[0] == "text" and last[0] == "text":
            self.events[-1] = ("text", last[1] + ev[1])
        elif last is not None and ev[0] == "args" and last[0] == "args" and last[1] == ev[1]:
            self.events[-1] = ("args", ev[1], last[2] + ev[2])
        else:
            self.events.append(ev)

    def _text(self, s: str) -> None:
        if self.after_call:
            s = s.lstrip(_WS)
            if not s:
                return
            self.after_call = False
        s = self.ws + s
        body = s.rstrip(_WS)
        self.ws = s[len(body):]
        if body:
            self._emit(("text", body))

    def _take(self) -> list[tuple]:
        out, self.events = self.events, []
        return out

    @property
    def live_calls(self) -> list[dict]:
        """The calls announced and not retracted: {"id", "name", "arguments"} each."""
        return [c for c in self.calls if c is not None]

    # -- driving
    def feed(self, text: str) -> list[tuple]:
        """Events for `text`, the next piece of the reply."""
        if self.finished:
            raise ValueError("feed after finish")
        self.buf += text
        self._run()
        return self._take()

    def finish(self) -> list[tuple]:
        """Events for the end of the reply: held-back text, a region left open."""
        if self.finished:
            return []
        self.finished = True
        self._run()
        r = self.region
        if r is not None:
            if r.state in ("between", "end"):
                self._close_region()  # complete calls without (all of) their closing tag: the reply stopped
            else:
                self._fail_region()  # cut inside a call
        rest, self.buf = self.buf, ""
        if rest:
            self._text(rest)
        if self.ws and not self.live_calls:
            self._emit(("text", self.ws))
        self.ws = ""
        return self._take()

    def _run(self) -> None:
        while self.buf:
            if self.region is not None:
                ch, self.buf = self.buf[0], self.buf[1:]
                if not self._region_char(ch):
                    self.buf = ch + self.buf  # not the region's: read again as text
                continue
            if not self._text_mode():
                return

    def _text_mode(self) -> bool:
        """Consume text up to a call region; False when the rest must wait for more text."""
        if not self.started:  # llama: a reply that opens with "{" may be a call
            stripped = self.buf.lstrip(_WS)
            if not stripped:
                return False
            if stripped[0] == "{":
                self.ws, self.buf = "", stripped
                self.region = _Region(state="obj")
                self.started = True
                return True
            if self.tag.startswith(stripped[:len(self.tag)]) and len(stripped) < len(self.tag):
                return False
            self.started = True
        p = self.buf.find(self.tag)
        if p >= 0:
            if p:
                self._text(self.buf[:p])
            # whitespace before the call stays held: it separates the text around the call, if any follows
            self.buf = self.buf[p + len(self.tag):]
            self.region = _Region(raw=self.tag, state="obj" if self.style == "llama3" else "open")
            return True
        k = next((k for k in range(min(len(self.tag) - 1, len(self.buf)), 0, -1)
                  if self.tag.startswith(self.buf[-k:])), 0)  # held: it may become the tag
        if len(self.buf) > k:
            self._text(self.buf[:len(self.buf) - k])
            self.buf = self.buf[len(self.buf) - k:]
        return False

    # -- regions
    def _region_char(self, ch: str) -> bool:
        """Read one character of the current region; False: the region ended before it (llama: text
        after the calls) or broke (its text became content), and `ch` is to be read as text."""
        r = self.region
        s = r.state
        if s == "in_obj":
            r.raw += ch
            try:
                self._obj_char(ch)
            except ValueError:
                r.raw = r.raw[:-1]
                return self._fail_region(ch)
            return True
        if ch in _WS and s != "end":
            r.raw += ch
            return True
        if s == "end":
            if not r.end and ch in _WS:
                r.raw += ch
                return True
            r.end += ch
            if not self.end_tag.startswith(r.end):
                r.end = r.end[:-1]
                return self._fail_region(ch)
            r.raw += ch
            if r.end == self.end_tag:
                self._close_region()
            return True
        if ch == "{" and s in ("open", "obj", "obj_or_close") or (ch == "{" and s == "between"
                                                                   and self.style != "smollm2"):
            r.raw += ch
            r.state, r.obj, r.obj_text = "in_obj", JsonPrefix(), ""
            r.fast, r.streaming, r.head_checked = None, False, False
            self._obj_char(ch)
            return True
        if s == "open" and ch == "[" and self.style == "smollm2":
            r.raw += ch
            r.state, r.listed = "obj_or_close", True
            return True
        if s == "obj_or_close" and ch == "]":  # an empty list: no calls
            r.raw += ch
            r.state = "end"
            return True
        if s == "between":
            if r.listed and ch == ",":
                r.raw += ch
                r.state = "obj"
                return True
            if r.listed and ch == "]":
                r.raw += ch
                r.state = "end"
                return True
            if self.style == "llama3":
                if ch == ";":
                    r.raw += ch
                    r.state = "obj"
                    return True
                self._close_region()  # text after the calls
                return False
            if not r.listed and ch == self.end_tag[0]:
                r.state = "end"
                return self._region_char(ch)
        return self._fail_region(ch)

    def _obj_char(self, ch: str) -> None:
        """One character of a call object (ValueError: not JSON)."""
        r = self.region
        was_streaming = r.streaming
        if not r.obj.push(ch):
            raise ValueError("text after the call object")
        r.obj_text += ch
        if was_streaming:
            self.calls[r.fast]["arguments"] += ch
            self._emit(("args", r.fast, ch))
            if len(r.obj.stack) == 1:
                r.streaming = False  # the arguments closed
        elif not r.head_checked and len(r.obj.stack) == 2:
            r.head_checked = True  # the first nested value opened: is it a call's arguments?
            m = _HEAD.fullmatch(r.obj_text)
            if m and m.group(1) in self.fns and (self.max_calls is None or self.n_calls < self.max_calls):
                idx = len(self.calls)
                self.calls.append({"id": new_call_id(), "name": m.group(1), "arguments": "{"})
                r.fast, r.streaming = idx, True
                r.emitted.append(idx)
                self._emit(("start", idx, self.calls[idx]["id"], m.group(1)))
                self._emit(("args", idx, "{"))
        if r.obj.done:
            self._end_obj()

    def _end_obj(self) -> None:
        """A call object is complete: check it, announce it (if not streamed already)."""
        r = self.region
        try:
            obj = json.loads(r.obj_text)
        except json.JSONDecodeError as e:  # e.g. a duplicate-free but bad number the prefix check let by
            raise ValueError(str(e)) from None
        name = obj.get("name") if isinstance(obj, dict) else None
        key = "parameters" if "parameters" in obj and "arguments" not in obj else "arguments"
        args = obj.get(key, {}) if isinstance(obj, dict) else None
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(name, str) or name not in self.fns or not isinstance(args, dict):
            raise ValueError("not a call of a declared function")
        if _strict_error(self.fns[name], args) is not None:
            raise ValueError("arguments do not match the strict schema")
        r.state = "between"
        self.n_calls += 1
        if r.fast is not None:
            return  # announced and streamed already
        if self.max_calls is not None and self.n_calls > self.max_calls:
            return  # parallel_tool_calls false: only the first call counts
        idx = len(self.calls)
        text = json.dumps(args, ensure_ascii=False)
        self.calls.append({"id": new_call_id(), "name": name, "arguments": text})
        r.emitted.append(idx)
        self._emit(("start", idx, self.calls[idx]["id"], name))
        self._emit(("args", idx, text))

    def _close_region(self) -> None:
        r = self.region
        self.region = None
        if r.emitted:
            self.after_call = True

    def _fail_region(self, ch: str | None = None) -> bool:
        """The region is no call after all: its text becomes content (calls it announced are retracted)."""
        r = self.region
        self.region = None
        if r.emitted:
            self._emit(("retract", list(r.emitted), r.raw))
            for i in r.emitted:
                self.calls[i] = None
        else:
            self.after_call = False
            self._text(r.raw)
        if self.style == "llama3":
            self.started = True
        return False


def parser_for(req: ToolRequest | None) -> ToolCallParser | None:
    """The reply parser of a request (None: tools absent or tool_choice "none")."""
    if req is None or not req.parses:
        return None
    return ToolCallParser(req.style, req.functions, None if req.parallel else 1)


def assemble(events: list[tuple]) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole reply's events: content None when there is no text, tool_calls in
    OpenAI's shape ``{"id", "type": "function", "function": {"name", "arguments": str}}``."""
    texts: list[str] = []
    calls: dict[int, dict] = {}
    for ev in events:
        if ev[0] == "text":
            texts.append(ev[1])
        elif ev[0] == "start":
            calls[ev[1]] = {"id": ev[2], "type": "function", "function": {"name": ev[3], "arguments": ""}}
        elif ev[0] == "args":
            calls[ev[1]]["function"]["arguments"] += ev[2]
        elif ev[0] == "retract":
            for i in ev[1]:
                calls.pop(i, None)
            texts.append(ev[2])
    text = "".join(texts)
    return (text or None), [calls[i] for i in sorted(calls)]


def reply_message(text: str, req: ToolRequest | None, finish_reason: str) -> tuple[dict, str]:
    """The assistant message of a whole reply and its finish_reason ("tool_calls" when the reply stopped
    after calls). Without parsing (no tools, tool_choice "none"), the text is the content."""
    parser = parser_for(req)
    if parser is None:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = assemble(parser.feed(text) + parser.finish())
    if not calls:
        # content None here: every character was call syntax without a call (SmolLM2's "[]": no call)
        return {"role": "assistant", "content": content or ""}, finish_reason
    msg = {"role": "assistant", "content": content, "tool_calls": calls}
    return msg, "tool_calls" if finish_reason == "stop" else finish_reason


class ToolStream:
    """One streamed choice's chat deltas with tool calls, as OpenAI streams them: a call's first delta
    ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}``, then
    ``{"tool_calls": [{"index", "function": {"arguments": piece}}]}``; text as ``{"content": piece}``."""

    def __init__(self, req: ToolRequest):
        self.parser = parser_for(req)

    def deltas(self, text: str, final: bool = False) -> list[dict]:
        """Deltas for the next `text` of the reply (`final`: it is the last)."""
        if self.parser is None:
            return [{"content": text}] if text else []
        evs = self.parser.feed(text) if text else []
        if final:
            evs += self.parser.finish()
        out = []
        for ev in evs:
            if ev[0] == "text":
                out.append({"content": ev[1]})
            elif ev[0] == "start":
                out.append({"tool_calls": [{"index": ev[1], "id": ev[2], "type": "function",
                                            "function": {"name": ev[3], "arguments": ""}}]})
            elif ev[0] == "args":
                out.append({"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]})
            elif ev[0] == "retract":  # the calls were sent and stay; their text follows as content, as in
                out.append({"content": ev[2]})  # the whole reply
        return out

    def finish_reason(self, reason: str) -> str:
        called = self.parser is not None and bool(self.parser.calls)
        return "tool_calls" if called and reason == "stop" else reason
