"""OpenAI wire format: request validation into engine params, response shapes, incremental detokenizing.

Requests are validated by hand (not pydantic) so that every error names the offending field in the
OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``. Unknown fields are ignored:
OpenAI clients send extras (``user``, ``metadata``, ...).

Policies (documented in docs/serve.md):

* ``max_tokens`` (or ``max_completion_tokens``) must be an int >= 1; a value beyond the context left
  after the prompt is clamped to it, as vLLM does, and the choice then ends with finish_reason "length".
  Default: 16 for completions (OpenAI's default), the whole remaining context for chat.
* A prompt of ``max_model_len`` tokens or more is refused (400 naming ``prompt`` / ``messages``) rather
  than silently cut from the left as the engine would.
* ``top_k`` <= 0 (-1 as in vLLM) switches top-k off, as does any value >= the vocabulary size; temperature 0
  is greedy, and so is a temperature below 1e-5 (`llmkit.sampling.MIN_TEMPERATURE`; dividing logits
  by 1e-40 would overflow). ``repetition_penalty`` is in [0.01, 10]: a smaller divisor overflows the
  logits too.
* A prompt list holds at most `MAX_PROMPTS` prompts. JSON that Python cannot hold (an integer literal of
  more than 4,300 digits) and strings with lone UTF-16 surrogates (``"\ud800"``, not encodable as UTF-8)
  are refused with 400.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmkit.infer.engine import RequestParams
from llmkit.serve import tools as tool_calling
from llmkit.serve.errors import APIError  # defined apart: the helpers called here raise it without a cycle
from llmkit.serve.structured import response_grammar
from llmkit.tokenizer import byte_level_decoder

MAX_N = 8
MAX_STOP = 4
MAX_PROMPTS = 64
"""Most prompts in one /v1/completions request (each is tokenized and becomes n engine requests)."""
MIN_REPETITION_PENALTY = 0.01


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or APIError (400) naming why not."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # e.g. 40 kB of [[[[...: Python's parser gives up before the size limit does
        raise APIError("request body is nested too deeply to parse", code="invalid_json") from None
    except ValueError:  # an integer literal past Python's int_max_str_digits (4300 digits)
        raise APIError("request body has a number too large to parse", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    bad = _surrogate_path(body)
    if bad is not None:
        raise APIError(f"'{bad}' contains a lone UTF-16 surrogate (not valid Unicode text)", bad,
                       code="invalid_unicode")
    return body


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _surrogate_path(body) -> str | None:
    """The dotted path of the first string (key or value) holding a lone surrogate such as "\ud800", else
    None. JSON allows such escapes, but the text can be neither tokenized nor written back as UTF-8.
    Iterative: the parsed body may be nested as deeply as the parser allows."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if _has_surrogate(v):
                return path or "body"
        elif isinstance(v, dict):
            for k, x in v.items():
                if _has_surrogate(k):
                    return f"{path}.<key>" if path else "<key>"
                stack.append((f"{path}.{k}" if path else k, x))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
    return None


# -- field checkers --------------------------------------------------------------------------------

def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v):
        raise APIError(f"'{name}' must be a number, got {json.dumps(v)[:40]}", name, code="invalid_type")
    if v != v or v > hi or v < lo or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise APIError(f"'{name}' must be in {rng}, got {v}", name, code="invalid_value")
    return float(v)


def _int(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise APIError(f"'{name}' must be an integer, got {json.dumps(v)[:40]}", name, code="invalid_type")
    if v < lo or (hi is not None and v > hi):
        raise APIError(f"'{name}' must be >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {v}",
                       name, code="invalid_value")
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(f"'{name}' must be a boolean, got {json.dumps(v)[:40]}", name, code="invalid_type")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise APIError("'stop' must be a string or a list of strings", "stop", code="invalid_type")
    if len(v) > MAX_STOP:
        raise APIError(f"'stop' takes at most {MAX_STOP} sequences, got {len(v)}", "stop", code="invalid_value")
    return tuple(s for s in v if s)


# -- parsed requests -------------------------------------------------------------------------------

@dataclass
class Context:
    """What validation needs to know about the served model."""

    model_name: str
    tokenizer: Any
    max_model_len: int
    template: Any = None  # llmkit.chat.ChatTemplate or None (the model is not instruction-tuned)


@dataclass
class Choice:
    """One engine request: choice `index` of the response, from prompt `prompt_index`."""

    index: int
    prompt_index: int
    params: RequestParams


@dataclass
class ParsedRequest:
    """A validated request: token prompts (each a list of ids) and one `Choice` per engine request."""

    prompts: list[list[int]]
    choices: list[Choice]
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    """Top alternatives per token (0: only the chosen token's logprob); None: no logprobs."""
    stop: tuple[str, ...] = ()
    echo: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    tools: Any = None
    """Chat with tools: the `llmkit.serve.tools.ToolRequest` whose calls are parsed from the reply; None: none."""


def _check_model(body: dict, ctx: Context) -> None:
    model = body.get("model")
    if model is None:
        return  # lenient: one model is served
    if not isinstance(model, str):
        raise APIError("'model' must be a string", "model", code="invalid_type")
    if model != ctx.model_name:
        raise APIError(f"The model '{model}' does not exist; this server serves '{ctx.model_name}'", "model",
                       status=404, code="model_not_found")


def _common(body: dict, ctx: Context, prompts: list[list[int]], prompt_param: str, default_max: int | None,
            logprobs: int | None, stop_ids: Sequence[int]) -> ParsedRequest:
    """Sampling fields shared by both endpoints -> a `ParsedRequest` with n choices per prompt."""
    for i, p in enumerate(prompts):
        if not p:
            raise APIError(f"'{prompt_param}' is empty", prompt_param, code="invalid_value")
        if len(p) >= ctx.max_model_len:
            raise APIError(f"'{prompt_param}'{'' if len(prompts) == 1 else f' [{i}]'} is {len(p)} tokens; this "
                           f"model's maximum context length is {ctx.max_model_len} tokens (prompt + completion)",
                           prompt_param, code="context_length_exceeded")
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = _int(body, "max_tokens", None, 1), "max_tokens"
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", -1, -1)
    if top_k >= ctx.tokenizer.vocab_size:  # keeps every token: the same as off (and fits a tensor)
        top_k = -1
    min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
    presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    repetition = _number(body, "repetition_penalty", 1.0, MIN_REPETITION_PENALTY, 10.0)
    n = _int(body, "n", 1, 1, MAX_N)
    seed = _int(body, "seed", None, -(2 ** 63), 2 ** 63 - 1)
    stream = _bool(body, "stream", False)
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise APIError("'stream_options' must be an object", "stream_options", code="invalid_type")
        if not stream:
            raise APIError("'stream_options' is only allowed with 'stream': true", "stream_options",
                           code="invalid_value")
        include_usage = _bool(so, "include_usage", False)
    stop = _stop(body)
    del name
    grammar = response_grammar(body, ctx.tokenizer)  # one compiled grammar; each choice gets its own matcher
    choices = []
    for pi, p in enumerate(prompts):
        room = ctx.max_model_len - len(p)
        want = max_tokens if max_tokens is not None else (default_max or room)
        for j in range(n):
            params = RequestParams(
                max_new_tokens=min(want, room), temperature=temperature, top_k=top_k if top_k > 0 else None,
                top_p=top_p, seed=None if seed is None else seed + j, stop_at_eos=True,
                stop_token_ids=tuple(stop_ids), stop=stop, min_p=min_p, repetition_penalty=repetition,
                presence_penalty=presence, frequency_penalty=frequency, logprobs=logprobs, grammar=grammar)
            choices.append(Choice(len(choices), pi, params))
    return ParsedRequest(prompts, choices, stream, include_usage, logprobs, stop)


def parse_chat(body: dict, ctx: Context) -> ParsedRequest:
    """Validate a /v1/chat/completions body; the prompt is the rendered conversation + generation prompt."""
    from llmkit.chat import ChatFormatError, encode_chat

    _check_model(body, ctx)
    messages = body.get("messages")
    if messages is None:
        raise APIError("'messages' is required", "messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list of {role, content} objects", "messages",
                       code="invalid_type")
    tool_req = tool_calling.parse_tools(body, ctx.template)
    with_tools = tool_req is not None or tool_calling.has_tool_messages(messages)
    for i, m in enumerate(() if with_tools else messages):  # with tools: checked by tool_calling.encode_prompt
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object", f"messages[{i}]", code="invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise APIError(f"messages[{i}].role must be 'system', 'user' or 'assistant', got "
                           f"{json.dumps(role)[:40]}", f"messages[{i}].role", code="invalid_value")
        if isinstance(content, list):  # content parts: only text parts are supported
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(f"messages[{i}].content: only text content parts are supported",
                               f"messages[{i}].content", code="invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string, got {json.dumps(content)[:40]}",
                           f"messages[{i}].content", code="invalid_type")
    if ctx.template is None:
        raise APIError(f"model '{ctx.model_name}' has no chat template (it is not instruction-tuned): use "
                       "/v1/completions with a text prompt", "messages", code="chat_template_missing")
    if with_tools:
        ids = tool_calling.encode_prompt(ctx.tokenizer, ctx.template, messages, tool_req)
    else:
        msgs = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                 else "".join(p["text"] for p in m["content"])} for m in messages]
        try:
            ids, _ = encode_chat(ctx.tokenizer, msgs, ctx.template, add_generation_prompt=True)
        except ChatFormatError as e:
            raise APIError(f"messages: {e}", "messages", code="invalid_value") from None
    lp = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, 20)
    if top is not None and not lp:
        raise APIError("'top_logprobs' needs 'logprobs': true", "top_logprobs", code="invalid_value")
    stop_ids = ctx.template.stop_token_ids(ctx.tokenizer)
    parsed = _common(body, ctx, [ids], "messages", None, (top or 0) if lp else None, stop_ids)
    if tool_req is not None:
        tool_calling.constrain(parsed.choices, tool_req, ctx.tokenizer)
        parsed.tools = tool_req
    return parsed


def _encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text. `encode_batch` where the tokenizer has it: the Rust encoder then runs
    without holding the GIL, while one `encode` per text holds it and, on a long prompt list, makes the
    engine thread wait for it at every torch call (other streams stall for the whole tokenization)."""
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return batch(texts)
    return [tokenizer.encode(t) for t in texts]


def parse_completion(body: dict, ctx: Context) -> ParsedRequest:
    """Validate a /v1/completions body. prompt: a string, a list of strings (one prompt each), a list of
    token ids, or a list of token-id lists."""
    _check_model(body, ctx)
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError("'prompt' is required", "prompt", code="missing_required_parameter")
    V = ctx.tokenizer.vocab_size

    def ids_of(x) -> list[int]:
        if isinstance(x, str):
            return _encode_texts(ctx.tokenizer, [x])[0]
        if isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            if any(t < 0 or t >= V for t in x):
                raise APIError(f"'prompt' has a token id outside [0, {V})", "prompt", code="invalid_value")
            return list(x)
        raise APIError("'prompt' must be a string, a list of strings, a list of token ids or a list of "
                       "token-id lists", "prompt", code="invalid_type")

    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        prompts = [ids_of(prompt)]
    elif isinstance(prompt, list) and prompt:
        if len(prompt) > MAX_PROMPTS:
            raise APIError(f"'prompt' holds at most {MAX_PROMPTS} prompts, got {len(prompt)}", "prompt",
                           code="invalid_value")
        texts = [p for p in prompt if isinstance(p, str)]
        encoded = iter(_encode_texts(ctx.tokenizer, texts)) if texts else iter(())
        prompts = [next(encoded) if isinstance(p, str) else ids_of(p) for p in prompt]
    else:
        raise APIError("'prompt' must be a non-empty string or list", "prompt", code="invalid_type")
    lp = _int(body, "logprobs", None, 0, 5)
    if _bool(body, "echo", False):
        raise APIError("'echo' is not supported", "echo", code="unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise APIError("'best_of' is not supported (only 1)", "best_of", code="unsupported_parameter")
    return _common(body, ctx, prompts, "prompt", 16, lp, ())


# -- responses -------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The raw UTF-8 bytes of one token (a byte-level BPE token may hold part of a character)."""
    if getattr(tokenizer, "kind", None) == "bpe" and token_id not in tokenizer.special_tokens.values():
        piece = tokenizer.id_to_token(token_id) or ""
        dec = byte_level_decoder()
        if all(c in dec for c in piece):
            return bytes(dec[c] for c in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def _tok_str(tokenizer, token_id: int) -> tuple[str, list[int]]:
    b = token_bytes(tokenizer, token_id)
    return b.decode("utf-8", errors="replace"), list(b)


def chat_logprobs(tokenizer, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> dict:
    """OpenAI chat logprobs {"content": [{token, logprob, bytes, top_logprobs}]} from
    (token id, logprob, [(alternative id, logprob)]) entries."""
    content = []
    for tid, lp, top in entries:
        s, b = _tok_str(tokenizer, tid)
        alts = []
        for aid, alp in top:
            a_s, a_b = _tok_str(tokenizer, aid)
            alts.append({"token": a_s, "logprob": alp, "bytes": a_b})
        content.append({"token": s, "logprob": lp, "bytes": b, "top_logprobs": alts})
    return {"content": content}


def completion_logprobs(tokenizer, entries, offset: int = 0) -> dict:
    """OpenAI (legacy) completions logprobs {tokens, token_logprobs, top_logprobs, text_offset};
    text_offset[i] is where token i's text starts in the completion text (special tokens add no text; a
    token ending inside a character starts where that character does), counted from `offset` (the start
    of this chunk's text)."""
    tokens, lps, tops, offs = [], [], [], []
    dec = IncrementalDecoder(tokenizer)
    for tid, lp, top in entries:
        s, _ = _tok_str(tokenizer, tid)
        tokens.append(s)
        lps.append(lp)
        tops.append({_tok_str(tokenizer, a)[0]: alp for a, alp in top})
        offs.append(offset + len(dec.text))
        dec.push(tid)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


# -- incremental detokenizing -----------------------------------------------------------------------

class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that never end inside a character or a stop string.

    Byte-level BPE can split one UTF-8 character (e.g. a Chinese one, 3 bytes) across tokens; decoding
    the partial bytes gives U+FFFD. As in vLLM's incremental detokenizer, only the tokens since the last
    clean boundary are decoded each time (O(1) per token) and text ending in U+FFFD is held back until
    the character completes. Text that could be the start of a stop string is also held back, since the
    engine cuts the reply before a stop string after the tokens were produced.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = 0  # ids[:prefix] are decoded into `self.text` up to a clean boundary
        self.read = 0
        self.text = ""  # all complete text so far
        self.sent = 0  # characters of `text` handed out

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to send (maybe "")."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        hold = 0
        for s in self.stop:  # the longest tail of the text that starts a stop string
            for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = len(self.text) - hold
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def finish(self, final_text: str | None = None) -> str:
        """The rest of the text at the end: `final_text` (the engine's text cut at a stop string) if given,
        else everything decoded."""
        full = final_text if final_text is not None else self._decode(self.ids)
        sent = self.text[:self.sent]
        rest = full[len(sent):] if full.startswith(sent) else ""
        self.sent += len(rest)
        return rest
