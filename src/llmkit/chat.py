"""The chat template: how a conversation becomes one string, one token sequence and one loss mask.

Training, ``llmkit generate`` and the server all go through this module, so a fine-tuned model is
prompted at inference exactly as it was trained. A conversation is a list of messages
``{"role": "system" | "user" | "assistant", "content": str}`` and renders as::

    <|bos|><|system|>You are terse.<|end|>\\n<|user|>Hi<|end|>\\n<|assistant|>Hello.<|end|>\\n

i.e. ``bos``, then per message ``<role marker> + content.strip() + end + separator``; with
``add_generation_prompt`` the string ends with the assistant marker, where the model takes over. The
model ends its turn by emitting ``end`` (``<|end|>``), which is therefore the stop token of generation.

Design choices, and why:

* **Content sits between two special tokens.** The role markers and ``end`` are special tokens of
  llmkit tokenizers (`llmkit.tokenizer.CHAT_TOKENS`), matched in the raw text before pre-tokenization,
  so no BPE merge can cross a turn boundary: tokenizing the rendered string in one go gives exactly the
  tokens of each piece tokenized alone. That is what makes the loss mask exact, and makes
  ``tokenizer.encode(render_chat(...))`` (what any HF tool does) equal to `encode_chat`'s ids.
  The generation prompt ends in a special token for the same reason: the classic template bug of a
  prompt ending in ``"\\n"`` that tokenizes differently from the same ``"\\n"`` inside training text
  cannot happen.
* **Loss only on what the assistant says** (assistant content + its ``end`` token): the instruction
  tuning recipe of Alpaca (Taori et al. 2023) / Vicuna and LIMA (Zhou et al. 2023); every assistant turn
  of a multi-turn conversation is trained. ``end`` is in the mask so the model learns to stop.
* **Content is stripped** (Python ``str.strip``, Jinja ``| trim``: the same function), so stray
  whitespace in datasets never decides where a turn starts, and the plain-text fallback below stays
  exact.
* **Content may not contain special-token text** (``"<|end|>"`` typed by a user or found in scraped
  data): it would become a real control token and forge a turn. `encode_chat` raises `ChatFormatError`;
  the data loader counts such records as malformed, the server can answer 400.
* **Fallback for tokenizers without chat-role tokens** (e.g. a tokenizer imported from elsewhere that
  only has bos/eos/pad/unk): `chat_template_for` returns `PLAIN_CHAT_TEMPLATE`, whose role markers are
  plain text (``"User:\\n"``) and whose end of turn is ``<|eos|>`` (a foreign tokenizer's own bos / eos
  token in their place). Content still
  ends at a special token, and starts after a ``"\\n"`` that the byte-level pre-tokenizer always keeps
  apart from the non-space first character of stripped content, so the mask is still exact (checked on
  every encode: a token straddling a turn boundary raises instead of training on a wrong mask).

**A model's own Jinja template** (an imported checkpoint's ``chat_template``): `load_chat_template` returns a
`llmkit.chat_template.JinjaChatTemplate`, and every function here takes it in place of a `ChatTemplate`:
`render_chat` gives ``apply_chat_template(..., tokenize=False)``'s string, `encode_chat` its ids, with the loss
mask from the template's ``{% generation %}`` blocks or, without them, from rendering prefixes of the
conversation; stop ids are every end-of-sequence id the model declares (`Tokenizer.eos_ids`). Template errors
raise `ChatFormatError` with the template's own message.

Storage: `save_chat_template` writes ``chat_template.json`` (the fields of `ChatTemplate`, the source of
truth for llmkit) beside ``tokenizer.json`` and the same template as Jinja in ``tokenizer_config.json``
(``chat_template`` key), so ``transformers.AutoTokenizer.from_pretrained(dir).apply_chat_template``
renders the identical string. The Jinja wraps assistant content + end in ``{% generation %}`` tags, so
HF's ``return_assistant_tokens_mask=True`` (and TRL's ``assistant_only_loss``) yields the same mask as
`encode_chat`.
"""

from __future__ import annotations

import json
import re
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.chat_template import SPECIAL_TOKEN_VARIABLES, ChatFormatError, JinjaChatTemplate
from llmkit.tokenizer import atomic_write_text

__all__ = [
    "CHAT_TEMPLATE_FILE",
    "DEFAULT_CHAT_TEMPLATE",
    "PLAIN_CHAT_TEMPLATE",
    "ROLES",
    "TOKENIZER_CONFIG_FILE",
    "ChatFormatError",
    "ChatTemplate",
    "JinjaChatTemplate",
    "chat_template_for",
    "encode_chat",
    "encode_chats",
    "end_token_id",
    "has_chat_template",
    "jinja_template_from_config",
    "load_chat_template",
    "render_chat",
    "save_chat_template",
]

CHAT_TEMPLATE_FILE = "chat_template.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
ROLES = ("system", "user", "assistant")
_FORMAT_VERSION = 1
# A special-token-looking marker: "<|...|>" (llmkit's naming of every special token).
_SPECIAL_LIKE = re.compile(r"<\|[^<>|\s]+\|>")


@dataclass
class ChatTemplate:
    """The strings a conversation is assembled from (see the module docstring for the layout).

    Loads with `llmkit.config.load_config` like every config dataclass (e.g. as a ``chat:`` section).
    """

    name: str = "llmkit-chat-v1"
    """Identifier stored with the template (for humans and lineage; not rendered)."""
    bos: str = "<|bos|>"
    """Text at the start of every conversation ("" for none)."""
    system: str = "<|system|>"
    """Marker before a system message."""
    user: str = "<|user|>"
    """Marker before a user message."""
    assistant: str = "<|assistant|>"
    """Marker before an assistant message; also the generation prompt."""
    end: str = "<|end|>"
    """End of every turn; the token the model emits to stop (a single token of the tokenizer)."""
    separator: str = "\n"
    """Text after each `end` (between turns); never in the loss."""
    default_system: str | None = None
    """System message rendered when a conversation has none (None: no system turn)."""

    def validate(self) -> None:
        for f in ("system", "user", "assistant", "end"):
            value = getattr(self, f)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{f}: the role marker / end of turn must be a non-empty string, got {value!r}")
        if len({self.system, self.user, self.assistant}) < 3:
            raise ValueError("system/user/assistant: the three role markers must differ")
        if self.end in (self.system, self.user, self.assistant):
            raise ValueError("end: must differ from the role markers")
        for f in ("bos", "separator", "name"):
            if not isinstance(getattr(self, f), str):
                raise ValueError(f"{f}: must be a string")
        if self.default_system is not None and not isinstance(self.default_system, str):
            raise ValueError("default_system: must be a string or null")

    @property
    def end_of_turn(self) -> str:
        """Alias of `end`."""
        return self.end

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Ids that end the assistant's reply in generation: the end-of-turn token first, then every EOS id."""
        end = end_token_id(tokenizer, self)
        eos = list(getattr(tokenizer, "eos_ids", None) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else []))
        return [end] + [i for i in eos if i != end]

    def fingerprint(self) -> str:
        """A canonical JSON string of the template (for digests)."""
        return json.dumps(asdict(self), sort_keys=True)

    def marker(self, role: str) -> str:
        """The marker of `role` ("system" / "user" / "assistant")."""
        if role not in ROLES:
            raise ChatFormatError(f"unknown role {role!r}; expected one of {list(ROLES)}")
        return getattr(self, role)

    def to_jinja(self) -> str:
        """The template as a Hugging Face ``chat_template`` (Jinja), rendering exactly what `render_chat` does.

        One line with whitespace control on every tag, so HF's ``trim_blocks`` / ``lstrip_blocks`` settings
        change nothing. String constants are JSON string literals, which Jinja's lexer decodes the same way.
        """
        def lit(s: str) -> str:
            return json.dumps(s, ensure_ascii=False)

        content = "(message['content'] | trim)"
        parts = [
            f"{{{{- {lit(self.bos)} -}}}}" if self.bos else "",
            "{%- if messages[0]['role'] != 'system' -%}"
            f"{{{{- {lit(self.system + self.default_system.strip() + self.end + self.separator)} -}}}}"
            "{%- endif -%}" if self.default_system is not None else "",
            "{%- for message in messages -%}",
            "{%- if message['role'] == 'system' -%}",
            "{%- if not loop.first -%}{{- raise_exception('a system message must come first') -}}{%- endif -%}",
            f"{{{{- {lit(self.system)} + {content} + {lit(self.end + self.separator)} -}}}}",
            "{%- elif message['role'] == 'user' -%}",
            f"{{{{- {lit(self.user)} + {content} + {lit(self.end + self.separator)} -}}}}",
            "{%- elif message['role'] == 'assistant' -%}",
            f"{{{{- {lit(self.assistant)} -}}}}",
            f"{{%- generation -%}}{{{{- {content} + {lit(self.end)} -}}}}{{%- endgeneration -%}}",
            f"{{{{- {lit(self.separator)} -}}}}" if self.separator else "",
            "{%- else -%}{{- raise_exception('unknown role: ' + message['role']) -}}",
            "{%- endif -%}",
            "{%- endfor -%}",
            f"{{%- if add_generation_prompt -%}}{{{{- {lit(self.assistant)} -}}}}{{%- endif -%}}",
        ]
        return "".join(parts)


DEFAULT_CHAT_TEMPLATE = ChatTemplate()
"""llmkit's template: role and end-of-turn special tokens (every llmkit-trained tokenizer has them)."""

PLAIN_CHAT_TEMPLATE = ChatTemplate(
    name="llmkit-plain-v1", bos="<|bos|>", system="System:\n", user="User:\n", assistant="Assistant:\n",
    end="<|eos|>", separator="\n\n",
)
"""Fallback for tokenizers without the chat-role tokens: plain-text roles, ``<|eos|>`` ends a turn."""


# -- choosing a template for a tokenizer ----------------------------------------------------------


def chat_template_for(tokenizer, template: ChatTemplate | None = None) -> ChatTemplate | JinjaChatTemplate:
    """The template to use with `tokenizer`.

    Without `template`, a tokenizer that carries its model's own Jinja template (``chat_template`` in its
    ``tokenizer_config.json``, e.g. an imported model's) gets that (`JinjaChatTemplate`). Otherwise `template`
    (default `DEFAULT_CHAT_TEMPLATE`) if the tokenizer has every ``<|...|>`` token it uses, else
    `PLAIN_CHAT_TEMPLATE` (keeping `template.default_system`; a foreign tokenizer's own bos / eos text as
    its bos / end of turn), with a warning.

    Call it once when fine-tuning starts and store the result with `save_chat_template`: generation and
    serving then load exactly that template.
    """
    if template is None and (getattr(tokenizer, "config", None) or {}).get("chat_template"):
        return jinja_template_from_config(tokenizer.config)
    t = template or DEFAULT_CHAT_TEMPLATE
    t.validate()
    missing = sorted({m for m in _special_like(t) if tokenizer.token_to_id(m) is None})
    if not missing:
        return t
    plain = replace(PLAIN_CHAT_TEMPLATE, default_system=t.default_system)
    if tokenizer.token_to_id(plain.end) is None:  # a foreign tokenizer: its own bos / eos
        if getattr(tokenizer, "eos_token", None) is None:
            raise ChatFormatError(f"the tokenizer has no token(s) {missing} used by chat template {t.name!r} and "
                                  "no eos token to end a turn with; give the model a chat template")
        plain = replace(plain, bos=tokenizer.bos_token or "", end=tokenizer.eos_token)
    warnings.warn(
        f"the tokenizer has no token(s) {missing} used by chat template {t.name!r}; falling back to "
        f"{plain.name!r} (plain-text role markers, {plain.end} ends a turn)",
        stacklevel=2,
    )
    return plain


def jinja_template_from_config(config: Mapping[str, Any], name: str = "tokenizer_config.json") -> JinjaChatTemplate:
    """The `JinjaChatTemplate` of a ``tokenizer_config.json`` dict: its ``chat_template`` (a string, HF's list of
    ``{"name", "template"}`` or a dict of named templates) with its named special tokens as variables."""
    source = config.get("chat_template")
    if isinstance(source, list):
        source = {t["name"]: t["template"] for t in source}
    if not source:
        raise ValueError(f"{name}: no chat_template")
    special = {}
    for var in SPECIAL_TOKEN_VARIABLES:
        value = config.get(var)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[var] = value
    return JinjaChatTemplate(source, special, name=name)


def _special_like(t: ChatTemplate) -> list[str]:
    return [m for s in (t.bos, t.system, t.user, t.assistant, t.end) for m in _SPECIAL_LIKE.findall(s)]


def end_token_id(tokenizer, template: ChatTemplate) -> int:
    """Id of the template's end-of-turn token: the stop token for generation with this template."""
    ids = tokenizer.encode(template.end)
    if len(ids) != 1:
        raise ChatFormatError(
            f"end of turn {template.end!r} is {len(ids)} tokens for this tokenizer; it must be one token "
            "(use chat_template_for(tokenizer) to get a template the tokenizer supports)"
        )
    return ids[0]


# -- rendering -------------------------------------------------------------------------------------


def _check_messages(messages: Any) -> list[tuple[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatFormatError("messages is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ChatFormatError(f"message {i}: unknown role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ChatFormatError(f"message {i}: a system message must come first")
        out.append((role, content))
    return out


def _render(messages: Any, template: ChatTemplate, add_generation_prompt: bool
            ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """(text, loss spans, content spans): character ranges [start, end) of assistant content + end, and of
    every message's content (the text that must hold no special token)."""
    msgs = _check_messages(messages)
    pieces: list[str] = []
    loss: list[tuple[int, int]] = []
    contents: list[tuple[int, int]] = []
    pos = 0

    def emit(s: str) -> int:
        nonlocal pos
        pieces.append(s)
        pos += len(s)
        return pos

    emit(template.bos)
    if template.default_system is not None and msgs[0][0] != "system":
        emit(template.system + template.default_system.strip() + template.end + template.separator)
    for role, content in msgs:
        start = emit(template.marker(role))
        end = emit(content.strip())
        contents.append((start, end))
        end = emit(template.end)
        if role == "assistant":
            loss.append((start, end))
        emit(template.separator)
    if add_generation_prompt:
        emit(template.assistant)
    return "".join(pieces), loss, contents


def render_chat(messages: Sequence[Mapping[str, Any]], template: ChatTemplate | JinjaChatTemplate | None = None,
                add_generation_prompt: bool = False, **template_kwargs) -> str:
    """The conversation as one string (identical to HF ``apply_chat_template(..., tokenize=False)`` with
    `template.to_jinja()`, or with a `JinjaChatTemplate`'s own source).

    Args:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``; a system message may
            only come first. Extra keys are ignored. A Jinja template decides for itself what it accepts
            (other roles, ``tool_calls``, content parts, ...).
        template: default `DEFAULT_CHAT_TEMPLATE`.
        add_generation_prompt: end with the assistant marker (a prompt for the model's reply).
        template_kwargs: Jinja templates only: ``tools``, ``documents`` and any other template variable.
    Raises:
        ChatFormatError for an empty list, an unknown role, non-string content or a late system message; for a
        Jinja template, with the template's own message when it fails (``raise_exception``).
    """
    if isinstance(template, JinjaChatTemplate):
        return template.render(messages, add_generation_prompt, **template_kwargs)
    _no_kwargs(template_kwargs)
    return _render(messages, template or DEFAULT_CHAT_TEMPLATE, add_generation_prompt)[0]


def _no_kwargs(template_kwargs: Mapping[str, Any]) -> None:
    if template_kwargs:
        raise ChatFormatError(f"llmkit's chat template takes no {sorted(template_kwargs)} (only a model's own "
                              "Jinja template renders tools, documents or other variables)")


# -- encoding --------------------------------------------------------------------------------------

_special_res: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _special_re(tokenizer) -> re.Pattern | None:
    """Regex matching any special-token text of `tokenizer` (cached per tokenizer object)."""
    try:
        return _special_res[tokenizer]
    except KeyError:
        pass
    # whitespace-only special tokens (Gemma's runs of spaces / newlines) are ordinary text in messages
    specials = sorted((t for t in tokenizer.special_tokens if t.strip()), key=len, reverse=True)
    pat = re.compile("|".join(map(re.escape, specials))) if specials else None
    _special_res[tokenizer] = pat
    return pat


def _mask_from_offsets(offsets: np.ndarray, loss: list[tuple[int, int]], boundaries: list[tuple[int, int]]
                       ) -> np.ndarray:
    """Loss mask (n,) bool from token character offsets (n, 2): True for tokens inside a loss span.

    Raises ChatFormatError if a token straddles any content/loss boundary: the tokenizer merged text
    across a turn boundary and no mask would be exact for that template / tokenizer pair.
    """
    n = len(offsets)
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    starts, ends = offsets[:, 0], offsets[:, 1]
    for a, b in loss:
        mask |= (starts >= a) & (ends <= b)
    cuts = np.array(sorted({c for span in (*loss, *boundaries) for c in span}), dtype=np.int64)
    if len(cuts):
        # a token [s, e) straddles cut c when s < c < e
        crossing = (starts[:, None] < cuts[None, :]) & (ends[:, None] > cuts[None, :])
        if crossing.any():
            i = int(np.nonzero(crossing.any(axis=1))[0][0])
            raise ChatFormatError(
                f"token {i} (characters {int(starts[i])}..{int(ends[i])}) crosses a turn boundary: this "
                "tokenizer merges template text with message content, so the loss mask cannot be exact; "
                "use chat_template_for(tokenizer) or end role markers with a special token or a newline"
            )
    return mask


def _prepare(tokenizer, messages, template: ChatTemplate, add_generation_prompt: bool):
    text, loss, contents = _render(messages, template, add_generation_prompt)
    pat = _special_re(tokenizer)
    if pat is not None:
        for i, (a, b) in enumerate(contents):
            m = pat.search(text, a, b)
            if m:
                raise ChatFormatError(
                    f"message {i}: content contains the special-token text {m.group()!r}, which would become a "
                    "control token (a forged turn); remove or escape it"
                )
    return text, loss, contents


def encode_chats(tokenizer, conversations: Sequence[Sequence[Mapping[str, Any]]],
                 template: ChatTemplate | JinjaChatTemplate | None = None, add_generation_prompt: bool = False,
                 **template_kwargs) -> list[tuple[np.ndarray, np.ndarray] | ChatFormatError]:
    """`encode_chat` for many conversations at once (one parallel Rust batch encode), untruncated.

    Returns, per conversation, ``(ids int64 (n,), loss_mask bool (n,))`` or the `ChatFormatError` that
    conversation raised (so a data loader can count it and go on).
    """
    if isinstance(template, JinjaChatTemplate):
        return _encode_jinja(tokenizer, conversations, template, add_generation_prompt, template_kwargs)
    _no_kwargs(template_kwargs)
    template = template or DEFAULT_CHAT_TEMPLATE
    prepared: list[Any] = []
    for conv in conversations:
        try:
            prepared.append(_prepare(tokenizer, conv, template, add_generation_prompt))
        except ChatFormatError as e:
            prepared.append(e)
    texts = [p[0] for p in prepared if not isinstance(p, ChatFormatError)]
    encodings = iter(tokenizer.backend.encode_batch(texts, add_special_tokens=False))
    out: list[Any] = []
    for p in prepared:
        if isinstance(p, ChatFormatError):
            out.append(p)
            continue
        enc = next(encodings)
        _, loss, contents = p
        try:
            mask = _mask_from_offsets(np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2), loss, contents)
        except ChatFormatError as e:
            out.append(e)
            continue
        out.append((np.asarray(enc.ids, dtype=np.int64), mask))
    return out


def encode_chat(tokenizer, messages: Sequence[Mapping[str, Any]], template: ChatTemplate | JinjaChatTemplate | None = None,
                max_len: int | None = None, add_generation_prompt: bool = False, **template_kwargs
                ) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and its loss mask.

    ``ids == tokenizer.encode(render_chat(messages, template, add_generation_prompt))`` always (the
    tokens are those of the whole rendered string); ``loss_mask[i]`` is True exactly for the tokens of
    assistant content and the `end` token closing each assistant turn. Inference prompts use
    ``add_generation_prompt=True`` and ignore the mask.

    With a `JinjaChatTemplate` the ids are ``apply_chat_template(..., tokenize=True)``'s (the rendered string
    encoded without added special tokens: the template writes its own bos) and the mask covers every token
    overlapping an assistant span (`JinjaChatTemplate.assistant_spans`): the ``{% generation %}`` blocks, as
    transformers' ``return_assistant_tokens_mask``, or each reply plus the template's end of turn (then a
    prompt, ``add_generation_prompt=True``, gets an all-False mask). ``template_kwargs`` (``tools``,
    ``documents``, ...) go to a Jinja template.

    Args:
        tokenizer: an `llmkit.tokenizer.Tokenizer` (or anything with ``.backend`` = HF `tokenizers.Tokenizer`
            and ``.special_tokens``).
        max_len: keep the first `max_len` tokens (None: all).
    Returns:
        ``(ids, loss_mask)``: two lists of the same length.
    Raises:
        ChatFormatError: bad message list, content holding special-token text, or a template whose text
        the tokenizer merges with content.
    """
    result = encode_chats(tokenizer, [messages], template, add_generation_prompt, **template_kwargs)[0]
    if isinstance(result, ChatFormatError):
        raise result
    ids, mask = result
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ids, mask = ids[:max_len], mask[:max_len]
    return ids.tolist(), mask.tolist()


def _message_texts(message: Any) -> list[str]:
    """The strings a message's content holds (a string, or the "text" of content parts)."""
    if not isinstance(message, Mapping):
        return []
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, Sequence):
        return [p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
    return []


def _encode_jinja(tokenizer, conversations, template: JinjaChatTemplate, add_generation_prompt: bool,
                  template_kwargs: Mapping[str, Any]) -> list[tuple[np.ndarray, np.ndarray] | ChatFormatError]:
    pat = _special_re(tokenizer)
    prepared: list[Any] = []
    for conv in conversations:
        try:
            if isinstance(conv, (str, bytes)) or not isinstance(conv, Sequence) or not conv:
                raise ChatFormatError("messages must be a non-empty list of {'role', 'content'} dicts")
            for i, m in enumerate(conv):
                for text in _message_texts(m):
                    hit = pat.search(text) if pat is not None else None
                    if hit:
                        raise ChatFormatError(
                            f"message {i}: content contains the special-token text {hit.group()!r}, which would "
                            "become a control token (a forged turn); remove or escape it")
            if add_generation_prompt and not template.has_generation_tags:
                # a prompt for the model's reply: no loss, and no need for the template to be prefix-stable
                prepared.append((template.render(conv, True, **template_kwargs), []))
            else:
                prepared.append(template.assistant_spans(conv, add_generation_prompt=add_generation_prompt,
                                                          **template_kwargs))
        except ChatFormatError as e:
            prepared.append(e)
    texts = [p[0] for p in prepared if not isinstance(p, ChatFormatError)]
    encodings = iter(tokenizer.backend.encode_batch(texts, add_special_tokens=False))
    out: list[Any] = []
    for p in prepared:
        if isinstance(p, ChatFormatError):
            out.append(p)
            continue
        enc = next(encodings)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(offsets), dtype=bool)
        tagged = template.has_generation_tags
        for a, b in p[1]:
            # transformers: every token overlapping a {% generation %} span; a span found by rendering
            # prefixes leaves out a token that runs past its end (into the next turn)
            mask |= (offsets[:, 1] > a) & (offsets[:, 0] < b) & (tagged | (offsets[:, 1] <= b))
        out.append((np.asarray(enc.ids, dtype=np.int64), mask))
    return out


# -- storage ---------------------------------------------------------------------------------------


def save_chat_template(directory: str | Path, template: ChatTemplate | JinjaChatTemplate) -> Path:
    """Store `template` in `directory` (a model or tokenizer dir, beside ``tokenizer.json``).

    Writes ``chat_template.json`` and sets ``chat_template`` (Jinja) in ``tokenizer_config.json``, creating
    that file when absent with the entries HF needs to load ``tokenizer.json`` as a fast tokenizer
    (other keys of an existing file are kept). Returns the ``chat_template.json`` path.

    A `JinjaChatTemplate` (a model's own) is stored where transformers keeps it: ``chat_template`` in
    ``tokenizer_config.json`` (with its special tokens' names when the file has none); a stale llmkit
    ``chat_template.json`` is removed. Returns the ``tokenizer_config.json`` path.
    """
    template.validate()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(template, JinjaChatTemplate):
        cfg_path = d / TOKENIZER_CONFIG_FILE
        cfg = _read_config(cfg_path)
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for var, token in template.special_tokens.items():
            cfg.setdefault(var, token)
        cfg["chat_template"] = template.source
        atomic_write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        (d / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
        (d / "chat_template.jinja").unlink(missing_ok=True)
        return cfg_path
    path = d / CHAT_TEMPLATE_FILE
    atomic_write_text(path, json.dumps({"format_version": _FORMAT_VERSION, **asdict(template)}, indent=2,
                                   ensure_ascii=False) + "\n")
    cfg_path = d / TOKENIZER_CONFIG_FILE
    cfg = _read_config(cfg_path)
    from llmkit.tokenizer import SPECIAL_TOKENS

    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    vocab = _vocabulary(d)
    for name, token in SPECIAL_TOKENS.items():
        if vocab is None or token in vocab:  # never name a token the tokenizer lacks: HF would add it
            cfg.setdefault(f"{name}_token", token)
    # llmkit decodes byte-exactly; HF's default clean-up would rewrite " ." -> "."
    cfg.setdefault("clean_up_tokenization_spaces", False)
    cfg["chat_template"] = template.to_jinja()
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return path


def _vocabulary(d: Path) -> set[str] | None:
    """The token strings of ``d/tokenizer.json`` (None when there is none)."""
    if not (d / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer as HFTokenizer

    return set(HFTokenizer.from_file(str(d / "tokenizer.json")).get_vocab(with_added_tokens=True))


def _read_config(cfg_path: Path) -> dict[str, Any]:
    if not cfg_path.is_file():
        return {}
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e.msg}); not overwriting it") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    return cfg


def _jinja_in_dir(d: Path) -> JinjaChatTemplate | None:
    """A model's own Jinja template in `d`, where transformers looks: ``chat_template.jinja``, a processor-style
    ``chat_template.json`` (``{"chat_template": ...}``), or ``chat_template`` in ``tokenizer_config.json``."""
    cfg = _read_config(d / TOKENIZER_CONFIG_FILE)
    if (d / "special_tokens_map.json").is_file():
        cfg = {**_read_config(d / "special_tokens_map.json"), **cfg}
    if (d / "chat_template.jinja").is_file():
        cfg = {**cfg, "chat_template": (d / "chat_template.jinja").read_text(encoding="utf-8")}
        name = "chat_template.jinja"
    elif (d / CHAT_TEMPLATE_FILE).is_file():
        data = _read_config(d / CHAT_TEMPLATE_FILE)
        if "format_version" in data or "chat_template" not in data:
            return None  # llmkit's own format
        cfg = {**cfg, "chat_template": data["chat_template"]}
        name = CHAT_TEMPLATE_FILE
    else:
        name = TOKENIZER_CONFIG_FILE
    if not cfg.get("chat_template"):
        return None
    return jinja_template_from_config(cfg, name=f"{d.name}/{name}")


def _is_llmkit_template_file(file: Path) -> bool:
    try:
        return file.is_file() and "format_version" in _read_config(file)
    except ValueError:
        return True  # malformed: load_chat_template reports it


def has_chat_template(directory: str | Path) -> bool:
    """Whether `directory` holds a stored template, e.g. an instruction-tuned model: llmkit's
    ``chat_template.json``, or the model's own Jinja template (``chat_template`` in ``tokenizer_config.json``,
    ``chat_template.jinja``)."""
    d = Path(directory)
    return _is_llmkit_template_file(d / CHAT_TEMPLATE_FILE) or (d.is_dir() and _jinja_in_dir(d) is not None)


def load_chat_template(directory: str | Path) -> ChatTemplate | JinjaChatTemplate:
    """The template stored in `directory` (or the ``chat_template.json`` file itself).

    llmkit's ``chat_template.json`` first; else the model's own Jinja template (a `JinjaChatTemplate`, from
    ``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``, with its special tokens).
    A directory with neither but with ``tokenizer.json`` (e.g. a pretrained base model) gets
    ``chat_template_for(its tokenizer)``: the template fine-tuning would have stored for it.
    Raises FileNotFoundError when there is nothing, ValueError for a malformed file.
    """
    p = Path(directory)
    file = p if p.is_file() else p / CHAT_TEMPLATE_FILE
    if p.is_dir() and not _is_llmkit_template_file(file):
        jinja = _jinja_in_dir(p)
        if jinja is not None:
            return jinja
    if not file.is_file():
        if p.is_dir() and (p / "tokenizer.json").is_file():
            from llmkit.tokenizer import Tokenizer

            return chat_template_for(Tokenizer.load(p))
        raise FileNotFoundError(f"{p}: no {CHAT_TEMPLATE_FILE} and no tokenizer.json to derive a template from")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON: {e.msg}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    version = data.pop("format_version", None)
    if version != _FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {version!r} is not supported (expected {_FORMAT_VERSION})")
    known = {f.name for f in fields(ChatTemplate)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{file}: unknown key(s) {unknown}")
    template = ChatTemplate(**data)
    try:
        template.validate()
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    cfg_path = file.parent / TOKENIZER_CONFIG_FILE
    if cfg_path.is_file():
        try:
            jinja = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            jinja = None
        if jinja is not None and jinja != template.to_jinja():
            warnings.warn(f"{cfg_path}: its chat_template differs from {file.name}; llmkit uses {file.name}, "
                          "HF tools use the other: save_chat_template again to re-sync them", stacklevel=2)
    return template
