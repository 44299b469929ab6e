"""A model's reply to a conversation: the one place a chat reply is generated.

`chat_reply` (and `stream_chat_reply`, its text as it is decoded) is what `llmkit generate`, the pipeline's
eval stage and SFT's held-out answers call. It

* renders the conversation with the chat template and appends the generation prompt (`encode_chat`: a
  message whose text holds a role marker or other special-token text is refused, never tokenized as one);
  without a template the single message is continued as raw text, with bos where the model declares one;
* stops before the first of every id that ends a reply (`reply_stop_ids`: the template's end of turn, then
  every end-of-sequence id the tokenizer and generation_config declare); the stop id is not part of the reply;
* never samples an id at or above ``len(tokenizer)`` (the rows of a padded embedding);
* decodes greedily at temperature 0, else samples with top-k / top-p, repeatably with a seed;
* runs decoder-only models through the KV-cached `stream_tokens` and encoder-decoders through their
  `generate` (the encoder reads the prompt, the decoder writes the reply);
* puts the model in eval mode for the reply and restores its training mode after (SFT calls it mid-training).

`chat_replies` answers many conversations at once: decoder-only models go through the continuous-batching
`Engine` (which also honours the engine-only settings of `RequestParams`: repetition penalty, min-p, ...);
encoder-decoders and prefix-tuned models, which the Engine does not take, reply one by one via `chat_reply`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from llmkit.infer.generate import SamplingParams, stream_tokens

Messages = Sequence[Mapping[str, str]]


def reply_prompt_ids(tokenizer, template, messages: Messages) -> list[int]:
    """Prompt ids of a reply to `messages`: the rendered conversation plus the generation prompt.

    `template` None (a model without a chat template, or raw continuation): `messages` must be one message,
    whose content is encoded as text with bos where the model declares it (`Tokenizer.add_bos_token`).
    Raises `ChatFormatError` for a message holding special-token text (e.g. a typed ``<|im_end|>``)."""
    if template is None:
        if len(messages) != 1:
            raise ValueError(f"without a chat template only a single message can be continued as text, got "
                             f"{len(messages)} messages")
        return tokenizer.encode(messages[0]["content"], add_bos=bool(getattr(tokenizer, "add_bos_token", False)))
    from llmkit.chat import encode_chat

    ids, _ = encode_chat(tokenizer, messages, template, add_generation_prompt=True)
    return ids


def reply_stop_ids(tokenizer, template) -> tuple[int, ...]:
    """Every id that ends a reply, the most specific first: with a template its end of turn, then each
    end-of-sequence id the model declares (`Tokenizer.eos_ids`); without one the eos ids alone."""
    if template is not None:
        return tuple(template.stop_token_ids(tokenizer))
    ids = tuple(getattr(tokenizer, "eos_ids", None) or ())
    if not ids and getattr(tokenizer, "eos_id", None) is not None:
        ids = (tokenizer.eos_id,)
    return ids


_ENGINE_ONLY = {"stop": (), "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                "frequency_penalty": 0.0, "logprobs": None}
"""`RequestParams` settings only the Engine applies, with their 'off' values."""


def reply_tokens(model, tokenizer, prompt_ids: Sequence[int], stop_ids: Iterable[int],
                 params: SamplingParams) -> Iterator[int]:
    """New token ids after `prompt_ids`, ending before the first of `stop_ids` (with ``params.stop_at_eos``).

    Decoder: streamed one at a time from the KV cache, ids >= ``len(tokenizer)`` never sampled. Encoder-
    decoder: its `generate` (greedy at temperature 0, else top-p sampling; top_k is refused) with the first
    stop id as its end, then cut at the first of any stop id. Settings only the Engine applies (repetition
    penalty, min-p, stop strings, logprobs) are refused rather than ignored."""
    for name, off in _ENGINE_ONLY.items():
        value = getattr(params, name, off)
        if value != off and not (off == () and not value):
            raise ValueError(f"{name}: not applied by a single reply (stream_tokens / generate); use "
                             "chat_replies, which runs decoder-only models through the Engine")
    stops = tuple(stop_ids) if params.stop_at_eos else ()
    if getattr(model.config, "FAMILY", None) == "encdec":
        if params.top_k is not None:
            raise ValueError("top_k: an encoder-decoder samples with temperature and top_p only")
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model.generate(torch.tensor([list(prompt_ids)], device=device), max_new_tokens=params.max_new_tokens,
                                 eos_id=stops[0] if stops else None, temperature=params.temperature,
                                 top_p=params.top_p, seed=params.seed)
        ended = set(stops)
        for t in out[0].tolist():
            if t in ended:
                return
            yield t
        return
    yield from stream_tokens(model, list(prompt_ids), params, eos_id=stops, vocab_limit=len(tokenizer))


def stream_text(tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """The text of `tokens` in pieces as they arrive (special tokens skipped). The whole continuation is
    decoded each time and a piece is held back while it ends inside a multi-byte character (U+FFFD)."""
    new: list[int] = []
    shown = ""
    for t in tokens:
        new.append(t)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(new, skip_special_tokens=True)
    if len(text) > len(shown):
        yield text[len(shown):]


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def stream_chat_reply(model, tokenizer, template, messages: Messages, params: SamplingParams | None = None
                      ) -> Iterator[str]:
    """`chat_reply`'s text in pieces as it is generated (not stripped); see the module docstring."""
    params = params or SamplingParams()
    ids = reply_prompt_ids(tokenizer, template, messages)
    stops = reply_stop_ids(tokenizer, template)
    with _eval_mode(model):
        yield from stream_text(tokenizer, reply_tokens(model, tokenizer, ids, stops, params))


def chat_reply(model, tokenizer, template, messages: Messages, params: SamplingParams | None = None) -> str:
    """The model's reply to `messages` (a list of ``{"role", "content"}``), stripped of surrounding space.

    model: a loaded llmkit decoder or encoder-decoder (`load_for_inference`, or a model being fine-tuned);
    template: its chat template (`ChatTemplate` / `JinjaChatTemplate`), or None to continue one message as
    raw text; params: max_new_tokens, temperature (0: greedy), top_k, top_p, seed (default `SamplingParams()`).
    """
    params = params or SamplingParams()
    ids = reply_prompt_ids(tokenizer, template, messages)
    stops = reply_stop_ids(tokenizer, template)
    with _eval_mode(model):
        new = list(reply_tokens(model, tokenizer, ids, stops, params))
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def chat_replies(model, tokenizer, template, conversations: Sequence[Messages],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[str]:
    """`chat_reply` to each conversation, the decoder-only ones batched through the `Engine`.

    params: one setting for all or one per conversation; `RequestParams` adds the engine's repetition /
    presence / frequency penalties and min-p. The Engine re-stores a CPU model's Linear weights column-major
    (same values). Encoder-decoders and prefix-tuned decoders (the Engine takes neither) reply one by one."""
    from llmkit.infer.engine import Engine, RequestParams
    from llmkit.models.decoder import Decoder

    per = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(conversations)
    if len(per) != len(conversations):
        raise ValueError(f"params: {len(per)} settings for {len(conversations)} conversations")
    if not isinstance(model, Decoder) or model.prefix is not None:
        return [chat_reply(model, tokenizer, template, c, p) for c, p in zip(conversations, per)]
    ids = [reply_prompt_ids(tokenizer, template, c) for c in conversations]
    stops = reply_stop_ids(tokenizer, template)
    requests = []
    for p in per:
        fields = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
        fields["stop_token_ids"] = tuple(dict.fromkeys([*fields.get("stop_token_ids", ()), *stops]))
        requests.append(RequestParams(**fields))
    with _eval_mode(model):
        # KV slots sized to these requests, not to the model's context (32k+ for imported models)
        engine = Engine(model, tokenizer, max_batch=min(16, max(1, len(ids))), prefix_cache_tokens=0,
                        max_len=max(map(len, ids), default=1) + max((p.max_new_tokens for p in per), default=1))
        outs = engine.generate(ids, requests)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]


# -- `llmkit generate` ------------------------------------------------------------------------------
@dataclass
class GenerateConfig:
    """Settings of `llmkit generate` (every flag is a shorthand for one of these keys)."""

    model: str = ""
    """Model directory or registry URI (models:/NAME@ALIAS, runs:/...)."""
    prompt: str = ""
    adapter: str | None = None
    """A LoRA or prefix adapter directory to apply."""
    raw: bool = False
    """Continue the prompt as text even when the model has a chat template (by default an instruction-tuned
    model gets the prompt as a user turn)."""
    parallel: Literal["tp", "pp"] | None = None
    """Under torchrun: tensor- (tp) or pipeline- (pp) parallel decoding across the ranks."""
    max_new_tokens: int = 256
    temperature: float = 0.7
    """0: greedy."""
    top_k: int | None = None
    top_p: float | None = 0.9
    seed: int | None = None
    device: str = "auto"
    """cpu, cuda[:i] or auto (a GPU when one is visible)."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    speculative: Literal["ngram", "draft"] | None = None
    """Speculative decoding (`llmkit.infer.speculative`, docs/speculative.md): prompt lookup (ngram) or a draft
    model (draft); the output is distributed as without it (greedy: the same tokens). Stats go to stderr."""
    draft_model: str | None = None
    """speculative=draft: a model directory with the same tokenizer, "int8" (the default: an INT8 copy of the
    model), "layers:K" (the model's first K layers, its final norm and head) or "exit:DIR" (the first K layers
    and a trained exit adapter, `llmkit distill-exit`)."""
    num_draft: int = 4
    """Draft tokens proposed per target forward pass."""
    draft_confidence: float = 0.0
    """speculative=draft: stop drafting at a token the draft gives less than this probability."""

    def validate(self) -> None:
        if self.speculative is not None and self.speculative not in ("ngram", "draft"):
            raise ValueError(f"speculative: must be ngram or draft, got {self.speculative!r}")
        if self.num_draft < 1:
            raise ValueError(f"num_draft: must be >= 1, got {self.num_draft}")
        if not 0.0 <= self.draft_confidence < 1.0:
            raise ValueError(f"draft_confidence: must be in [0, 1), got {self.draft_confidence}")
        if self.speculative and self.parallel:
            raise ValueError("speculative: not with parallel decoding")
        if not self.model:
            raise ValueError("model: required (a model directory or registry URI)")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.parallel and self.adapter:
            raise ValueError("adapter: parallel decoding runs plain model dirs: merge a LoRA adapter first "
                             "(llmkit merge)")

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed)


def generate_text(cfg: GenerateConfig) -> Iterator[str]:
    """What `llmkit generate` prints, in pieces: the reply to `cfg.prompt` as a user turn when the model has a
    chat template (and not `cfg.raw`), else the prompt followed by its continuation; then a newline."""
    from llmkit.infer.load import load_for_inference

    if cfg.parallel:
        yield from _generate_parallel(cfg)
        return
    model, tok, template = load_for_inference(cfg.model, cfg.adapter, cfg.device, cfg.dtype)
    if cfg.raw:
        template = None
    if template is None:
        yield cfg.prompt
    messages = [{"role": "user", "content": cfg.prompt}]
    if cfg.speculative:
        yield from _generate_speculative(cfg, model, tok, template, messages)
    else:
        yield from stream_chat_reply(model, tok, template, messages, cfg.sampling())
    yield "\n"


def _generate_speculative(cfg: GenerateConfig, model, tok, template, messages: Messages) -> Iterator[str]:
    """`stream_chat_reply` through `stream_speculative`; its `SpecStats` as one JSON line on stderr."""
    import json

    from llmkit.infer.speculative import SpecStats, drafter_from_config, stream_speculative

    drafter = drafter_from_config(cfg.speculative, model, cfg.draft_model, cfg.device, cfg.dtype,
                                  cfg.draft_confidence, target_dir=None if cfg.adapter else str(cfg.model))
    stats = SpecStats()
    ids, stops = reply_prompt_ids(tok, template, messages), reply_stop_ids(tok, template)
    with _eval_mode(model):
        yield from stream_text(tok, stream_speculative(model, ids, cfg.sampling(), drafter, cfg.num_draft, stops,
                                                       len(tok), stats))
    print(json.dumps({"speculative": cfg.speculative, **stats.as_dict()}), file=sys.stderr)


def _generate_parallel(cfg: GenerateConfig) -> Iterator[str]:
    """Every rank decodes (`parallel_generate` is collective); only rank 0 yields the text."""
    from llmkit import runtime as D
    from llmkit.chat import has_chat_template, load_chat_template
    from llmkit.infer.parallel import parallel_generate
    from llmkit.tokenizer import Tokenizer

    info = D.setup("auto")
    try:
        tok = Tokenizer.load(cfg.model)
        template = load_chat_template(cfg.model) if has_chat_template(cfg.model) and not cfg.raw else None
        messages = [{"role": "user", "content": cfg.prompt}]
        new = parallel_generate(cfg.model, reply_prompt_ids(tok, template, messages), cfg.sampling(),
                                mode=cfg.parallel, eos_id=reply_stop_ids(tok, template), device=info.device)
        if info.is_main:
            yield ("" if template is not None else cfg.prompt) + tok.decode(new, skip_special_tokens=True) + "\n"
    finally:
        D.teardown(info)


def print_generate(cfg: GenerateConfig, out=None) -> None:
    """Write `generate_text(cfg)` to `out` (default stdout) as it comes."""
    out = out or sys.stdout
    for piece in generate_text(cfg):
        out.write(piece)
        out.flush()
