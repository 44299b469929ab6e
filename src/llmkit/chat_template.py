"""A model's own Jinja chat template, rendered exactly as transformers' ``apply_chat_template`` renders it.

Imported checkpoints (``llmkit import hf``, ``llmkit import gguf``) bring their chat template as Jinja source in
``tokenizer_config.json`` (``chat_template``), in a ``chat_template.jinja`` file, or in the GGUF metadata. llmkit
renders it with the same environment transformers builds (``transformers.utils.chat_template_utils``): an
``ImmutableSandboxedEnvironment`` (templates from the Hub are untrusted code) with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, the ``{% generation %}`` tag, the globals
``raise_exception`` / ``strftime_now`` / ``dict`` / ``namespace``, and transformers' ``tojson`` filter (no HTML
escaping, ``ensure_ascii=False``). The template sees ``messages``, ``tools``, ``documents``,
``add_generation_prompt`` and the tokenizer's named special tokens (``bos_token``, ``eos_token``, ``unk_token``,
``sep_token``, ``pad_token``, ``cls_token``, ``mask_token``), plus any extra keyword arguments.
transformers is not needed at run time: the environment is rebuilt here (it is a dev dependency only, used by
the tests to check that both render identical strings).

The assistant loss mask (`JinjaChatTemplate.assistant_spans`): character spans of what the assistant says,
taken from ``{% generation %}...{% endgeneration %}`` blocks when the template has them (what transformers'
``return_assistant_tokens_mask`` uses), and otherwise by rendering prefixes: the span of assistant turn ``i``
is ``render(messages[:i+1])`` minus ``render(messages[:i], add_generation_prompt=True)``, i.e. the reply and
whatever the template writes after it (its end-of-turn token), cut where the whole conversation's render
departs from it. That needs a template that renders the conversation before each assistant turn as a prefix
of the whole; one that does not (it moves the system prompt to the last user turn, or drops the reasoning
of earlier turns) raises `TemplateMaskError` naming the turn, and should get ``{% generation %}`` tags.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = [
    "SPECIAL_TOKEN_VARIABLES",
    "ChatFormatError",
    "JinjaChatTemplate",
    "TemplateMaskError",
    "TemplateRenderError",
    "compile_template",
]

SPECIAL_TOKEN_VARIABLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                           "mask_token")
"""Named special tokens a template sees as variables (transformers' ``special_tokens_map``)."""

_GENERATION_TAG = re.compile(r"\{\%-?\s*generation\s*-?\%\}")


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered or encoded (bad role, reserved text, boundary merge, template error).

    Re-exported by `llmkit.chat`, where llmkit's own template raises it too."""


class TemplateRenderError(ChatFormatError):
    """The template failed to render; the message is the template's own (e.g. its ``raise_exception`` text)."""


class TemplateMaskError(TemplateRenderError):
    """No exact assistant mask: the template's renders of a conversation's prefixes are not prefixes of it."""


@lru_cache(maxsize=32)
def compile_template(source: str):
    """The compiled `jinja2.Template` of `source`, in transformers' chat-template environment (cached)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class AssistantTracker(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: records the character span its body renders to."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(activate_tracker=self.activate_tracker)
            self._tracking: ContextVar = ContextVar("llmkit_assistant_tracker", default=None)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation_support(self, context, caller):
            rv = caller()
            tracking = self._tracking.get()
            if tracking is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(rv)))
            return rv

        @contextmanager
        def activate_tracker(self, blocks: list, spans: list):
            token = self._tracking.set((blocks, spans))
            try:
                yield
            finally:
                self._tracking.reset(token)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' override: Jinja's own tojson escapes HTML characters (<, >, &, ')
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # a callable that builds plain dicts: no attribute access to the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespaces refuse underscore attributes (no route to CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[AssistantTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateRenderError(f"chat template syntax error (line {e.lineno}): {e.message}") from e


def _plain(value: Any) -> Any:
    """The data a template may see: plain JSON types only (as transformers' `_plain_template_data`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # numpy scalars: np.bool_(False) must stay falsy
        return _plain(value.item())
    if callable(getattr(value, "model_dump", None)):  # pydantic message objects
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def normalize_messages(messages: Any) -> list[dict]:
    """Messages as transformers hands them to a template: dicts, keys whose value is None dropped, the
    reasoning field copied under its names (``reasoning_content`` / ``thinking``)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateRenderError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TemplateRenderError(f"message {i}: expected a dict, got {type(m).__name__}")
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


@dataclass(frozen=True)
class JinjaChatTemplate:
    """A model's Jinja chat template with the special-token strings it is rendered with.

    Drop-in for `llmkit.chat.ChatTemplate` wherever llmkit takes a template (`llmkit.chat.render_chat`,
    `encode_chat`, `encode_chats`, fine-tuning, generation, serving): those functions dispatch on the type.
    """

    source: str | dict[str, str]
    """The Jinja source, or HF's named templates (``{"default": ..., "tool_use": ...}``)."""
    special_tokens: dict[str, str] = field(default_factory=dict)
    """Template variables for the named special tokens (``bos_token`` -> ``"<s>"``, ...); absent ones left out."""
    name: str = field(default="jinja", compare=False)
    """Where the template came from (for humans; not compared)."""

    def __post_init__(self):
        if isinstance(self.source, dict):
            if not self.source or not all(isinstance(v, str) for v in self.source.values()):
                raise ValueError("chat_template: a dict of named templates must map names to Jinja strings")
        elif not isinstance(self.source, str) or not self.source.strip():
            raise ValueError("chat_template: must be a non-empty Jinja string")

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def validate(self) -> None:
        """Compile the template (raises `TemplateRenderError` for a syntax error)."""
        for src in (self.source.values() if isinstance(self.source, dict) else [self.source]):
            compile_template(src)

    def fingerprint(self) -> str:
        """A canonical JSON string of everything that decides the rendering (for digests)."""
        return json.dumps({"source": self.source, "special_tokens": self.special_tokens}, sort_keys=True,
                          ensure_ascii=False)

    def select(self, tools: Any = None) -> str:
        """The Jinja source to use (HF's choice among named templates: ``tool_use`` with tools, else ``default``)."""
        if isinstance(self.source, str):
            return self.source
        if tools is not None and "tool_use" in self.source:
            return self.source["tool_use"]
        if "default" in self.source:
            return self.source["default"]
        raise ValueError(f"chat_template: several named templates and no 'default' among {sorted(self.source)}")

    @property
    def has_generation_tags(self) -> bool:
        """Whether the template marks the assistant's text with ``{% generation %}`` blocks."""
        srcs = self.source.values() if isinstance(self.source, dict) else [self.source]
        return any(_GENERATION_TAG.search(s) for s in srcs)

    # -- rendering ---------------------------------------------------------------------------------

    def _variables(self, messages, add_generation_prompt, tools, documents, kwargs) -> dict:
        if tools is not None:
            if not isinstance(tools, Sequence) or not all(isinstance(t, Mapping) for t in tools):
                raise TemplateRenderError("tools: expected a list of JSON-schema dicts")
        if documents is not None:
            if not isinstance(documents, Sequence) or not all(isinstance(d, Mapping) for d in documents):
                raise TemplateRenderError("documents: expected a list of dicts with 'title' and 'text' keys")
        # transformers: {**special_tokens_map, **kwargs}; explicit kwargs win
        variables = {**self.special_tokens, **_plain(kwargs)}
        return {"messages": normalize_messages(messages), "tools": _plain(list(tools) if tools is not None else None),
                "documents": _plain(list(documents) if documents is not None else None),
                "add_generation_prompt": bool(add_generation_prompt), **variables}

    def render_with_spans(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                          tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
                          **kwargs) -> tuple[str, list[tuple[int, int]]]:
        """(text, spans): the rendered conversation and the character spans of its ``{% generation %}`` blocks.

        Raises `TemplateRenderError` carrying the template's own message (``raise_exception('...')`` text, an
        undefined-variable error, ...).
        """
        import jinja2

        template = compile_template(self.select(tools))
        variables = self._variables(messages, add_generation_prompt, tools, documents, kwargs)
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        try:
            with template.environment.activate_tracker(blocks, spans):
                for block in template.generate(**variables):
                    blocks.append(block)
        except jinja2.exceptions.TemplateError as e:
            raise TemplateRenderError(e.message or str(e)) from e
        return "".join(blocks), spans

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
               tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
               **kwargs) -> str:
        """The conversation as one string: ``apply_chat_template(..., tokenize=False)``'s result."""
        return self.render_with_spans(messages, add_generation_prompt, tools, documents, **kwargs)[0]

    def assistant_spans(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
                        documents: Sequence[Mapping] | None = None, add_generation_prompt: bool = False,
                        **kwargs) -> tuple[str, list[tuple[int, int]]]:
        """(text, spans): the rendered conversation and the character spans that carry the loss.

        With ``{% generation %}`` tags: their spans (transformers' ``return_assistant_tokens_mask``). Without:
        per assistant message ``i``, the text ``render(messages[:i+1])`` adds to
        ``render(messages[:i], add_generation_prompt=True)`` (the reply and the template's end of turn).
        When the template writes something after the last message only (Phi-3's trailing eos), a turn ends
        where the whole conversation's render and the render up to that turn part; `llmkit.chat.encode_chat`
        then leaves out a token that straddles that end. Raises `TemplateMaskError` when the render before an
        assistant turn is not a prefix of the whole conversation's.
        """
        text, spans = self.render_with_spans(messages, add_generation_prompt, tools, documents, **kwargs)
        if self.has_generation_tags:
            return text, spans
        msgs = list(messages)
        spans = []
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping) or m.get("role") != "assistant":
                continue
            try:
                before = self.render(msgs[:i], True, tools, documents, **kwargs)
            except TemplateRenderError:
                if i:
                    raise
                before = ""  # a template that cannot render an empty conversation
            upto = self.render(msgs[:i + 1], False, tools, documents, **kwargs)
            if not text.startswith(before):
                raise TemplateMaskError(
                    f"message {i}: this chat template renders the conversation before this assistant turn "
                    "differently from the start of the whole conversation, so the assistant's text cannot be "
                    "located by rendering prefixes; add {% generation %} ... {% endgeneration %} around the "
                    "assistant's text in the template")
            # The turn ends where the whole conversation and its render up to this turn part: a template may
            # write something after the last message only (e.g. an eos) that is not in the longer render.
            end = len(os.path.commonprefix([upto, text]))
            if end > len(before):
                spans.append((len(before), end))
        return text, spans

    # -- generation ----------------------------------------------------------------------------------

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Ids that end the assistant's reply: every end-of-sequence id the model declares
        (``tokenizer.eos_ids``: tokenizer_config's ``eos_token`` and generation_config's ``eos_token_id`` list)."""
        ids = list(getattr(tokenizer, "eos_ids", None) or ())
        if not ids and getattr(tokenizer, "eos_id", None) is not None:
            ids = [tokenizer.eos_id]
        if not ids:
            raise ValueError("the tokenizer declares no end-of-sequence token, so generation with this chat "
                             "template would never stop: set eos_token in tokenizer_config.json or eos_token_id "
                             "in generation_config.json")
        return ids
