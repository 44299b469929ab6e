"""Back-translation (Sennrich et al. 2016; Xie et al. 2020, UDA): a paraphrase by translating a text into
a pivot language and back with two seq2seq models, greedily.

`BackTranslator` loads local Hugging Face seq2seq models (`kind="hf"`, e.g. a Marian opus-mt pair) or
llmkit encoder-decoder model directories (`kind="llmkit"`), translates sentence by sentence (sentences
longer than the model's input budget in pieces), de-duplicates and length-sorts the units of a whole
batch of documents before batching, and reassembles each document with its line structure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol


def _is_zh(lang: str | None) -> bool:
    return (lang or "").split("-")[0].split("_")[0].lower() == "zh"


class Seq2SeqEngine(Protocol):
    """What `BackTranslator` needs from one translation direction (tests and custom engines implement
    it too): token counts of texts, and greedy translations of a batch."""

    def count_tokens(self, texts: list[str]) -> list[int]: ...

    def generate(self, texts: list[str], max_input_tokens: int, max_new_tokens: int) -> list[str]: ...


class HFSeq2Seq:
    """A local Hugging Face seq2seq model directory (AutoTokenizer + AutoModelForSeq2SeqLM, loaded with
    local_files_only=True: nothing is downloaded). `prefix` is prepended to every input (T5 task
    prefixes such as ``"translate English to German: "``; Marian opus-mt models need none).
    Needs `transformers` (llmkit's dev extra)."""

    def __init__(self, path: str | Path, device: str = "cpu", prefix: str = ""):
        try:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("back-translation kind 'hf' needs transformers (pip install transformers)") from e
        self.device, self.prefix = device, prefix
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(str(path), local_files_only=True).to(device).eval()
        # the prefix and the tokenizer's own special tokens (T5's </s>) ride on top of the input budget
        self._overhead = len(self.tokenizer(prefix)["input_ids"])

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def generate(self, texts: list[str], max_input_tokens: int, max_new_tokens: int) -> list[str]:
        import torch

        enc = self.tokenizer([self.prefix + t for t in texts], return_tensors="pt", padding=True,
                             truncation=True, max_length=max_input_tokens + self._overhead)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class LlmkitSeq2Seq:
    """An llmkit encoder-decoder model directory (`llmkit.models.io.save_model` layout: config.json with
    family encdec, model.safetensors, tokenizer.json). Inputs are `prefix + text` encoded with EOS
    appended (T5's framing); decoding is greedy (`EncoderDecoder.generate`) and stops at the
    generation config's eos_token_id."""

    def __init__(self, path: str | Path, device: str = "cpu", prefix: str = ""):
        from llmkit.models.encdec import EncoderDecoder
        from llmkit.models.io import load_generation_config, load_model
        from llmkit.tokenizer import Tokenizer

        self.device, self.prefix = device, prefix
        self.model = load_model(path, device=device)
        if not isinstance(self.model, EncoderDecoder):
            raise ValueError(f"{path}: back-translation needs an encoder-decoder model (family encdec), got "
                             f"{type(self.model).__name__}")
        self.tokenizer = Tokenizer.load(path)
        gen = load_generation_config(path)
        self.eos_id = int(gen.get("eos_token_id", self.tokenizer.eos_id))
        self.pad_id = int(self.model.config.pad_token_id)
        self._prefix_ids = self.tokenizer.encode(prefix) if prefix else []

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer.encode_batch(list(texts))]

    def generate(self, texts: list[str], max_input_tokens: int, max_new_tokens: int) -> list[str]:
        import torch

        rows = [self._prefix_ids + ids[:max_input_tokens] + [self.eos_id]
                for ids in self.tokenizer.encode_batch(list(texts))]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[k, :len(r)] = 1
        out = self.model.generate(ids.to(self.device), mask.to(self.device), max_new_tokens=max_new_tokens,
                                  eos_id=self.eos_id).tolist()
        texts_out = []
        for row in out:
            if self.eos_id in row:
                row = row[:row.index(self.eos_id)]
            texts_out.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts_out


# sentence ends: . ! ? (maybe a closing quote/bracket) then whitespace; 。！？ (maybe a closing quote)
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)\]])\s+")
_SENT_SPLIT_ZH = re.compile(r"(?<=[。！？!?；])(?![”」』\"'])\s*|(?<=[。！？!?；][”」』\"'])\s*")


class BackTranslator:
    """Paraphrase texts by translating them into a pivot language and back (greedy decoding).

    Args:
        forward: model translating the texts' language into the pivot: a model directory, or an object
            with `count_tokens` / `generate` (`Seq2SeqEngine`).
        backward: model translating the pivot back.
        kind: ``"hf"`` (local transformers seq2seq model, `HFSeq2Seq`) or ``"llmkit"`` (llmkit
            encoder-decoder directory, `LlmkitSeq2Seq`); ignored for engine objects.
        lang: language of the texts: sentence splitting and the joiner between translated sentences
            (" " for en and other space-delimited languages, "" for zh).
        max_input_tokens: longest model input (tokens, prefix excluded); longer sentences are cut into
            pieces that fit, at spaces (at characters for zh).
        max_new_tokens: longest translation of one sentence or piece (tokens).
        batch_size: sentences per generate call.
        device: torch device for the models.
        forward_prefix / backward_prefix: text prepended to each model input (T5 task prefixes).

    `translate(texts)` keeps each text's lines (blank lines and indentation included); every non-blank
    line is split into sentences, identical sentences across the whole batch are translated once, and
    the units are length-sorted before batching so padding stays small. Greedy decoding makes the
    result deterministic.
    """

    def __init__(self, forward: str | Path | Seq2SeqEngine, backward: str | Path | Seq2SeqEngine,
                 kind: str = "hf", lang: str = "en", max_input_tokens: int = 256, max_new_tokens: int = 256,
                 batch_size: int = 16, device: str = "cpu", forward_prefix: str = "",
                 backward_prefix: str = ""):
        if kind not in ("hf", "llmkit"):
            raise ValueError(f"kind: must be 'hf' or 'llmkit', got {kind!r}")
        if min(max_input_tokens, max_new_tokens, batch_size) < 1:
            raise ValueError("max_input_tokens, max_new_tokens and batch_size must be >= 1")
        engine_cls = HFSeq2Seq if kind == "hf" else LlmkitSeq2Seq
        self.forward = forward if hasattr(forward, "generate") else engine_cls(forward, device, forward_prefix)
        self.backward = backward if hasattr(backward, "generate") else engine_cls(backward, device,
                                                                                  backward_prefix)
        self.lang, self.zh = lang, _is_zh(lang)
        self.joiner = "" if self.zh else " "
        self.max_input_tokens, self.max_new_tokens, self.batch_size = max_input_tokens, max_new_tokens, batch_size

    def translate(self, texts: Sequence[str]) -> list[str]:
        """Back-translate each text: list of N strings -> list of N strings (same order)."""
        if isinstance(texts, str):
            raise TypeError("translate expects a list of texts, not a single string")
        # layout[t] = list of lines; a line is (lead, [sentences], trail) or a blank-line string
        layouts = []
        sentences: dict[str, None] = {}
        for text in texts:
            lines = []
            for line in text.split("\n"):
                body = line.strip()
                if not body:
                    lines.append(line)
                    continue
                lead = line[:len(line) - len(line.lstrip())]
                trail = line[len(line.rstrip()):]
                sents = [s for s in (_SENT_SPLIT_ZH if self.zh else _SENT_SPLIT).split(body) if s]
                for s in sents:
                    sentences.setdefault(s, None)
                lines.append((lead, sents, trail))
            layouts.append(lines)
        units = self._units(list(sentences))
        flat = sorted({u for pieces in units.values() for u in pieces})
        pivot = self._run(self.forward, flat, by_tokens=True)
        back_in = sorted(set(pivot.values()))
        back = self._run(self.backward, back_in, by_tokens=False)
        done = {s: self.joiner.join(back[pivot[p]] for p in pieces) for s, pieces in units.items()}
        out = []
        for lines in layouts:
            rendered = []
            for line in lines:
                if isinstance(line, str):
                    rendered.append(line)
                else:
                    lead, sents, trail = line
                    rendered.append(lead + self.joiner.join(done[s] for s in sents).strip() + trail)
            out.append("\n".join(rendered))
        return out

    def _units(self, sentences: list[str]) -> dict[str, list[str]]:
        """Sentence -> the pieces it is translated in: itself, or pieces of <= max_input_tokens tokens."""
        units: dict[str, list[str]] = {}
        if not sentences:
            return units
        counts = self.forward.count_tokens(sentences)
        for s, n in zip(sentences, counts):
            units[s] = [s] if n <= self.max_input_tokens else self._split_long(s, n)
        return units

    def _split_long(self, sentence: str, n_tokens: int) -> list[str]:
        """Cut a too-long sentence into ceil(n / limit) pieces of about equal length at spaces (zh: at
        characters), re-cutting any piece that still does not fit; a single word that alone exceeds the
        budget is left to the tokenizer's truncation."""
        k = math.ceil(n_tokens / self.max_input_tokens)
        atoms = list(sentence) if self.zh else sentence.split()
        if len(atoms) <= 1:
            return [sentence]
        k = min(k, len(atoms))
        size = math.ceil(len(atoms) / k)
        sep = "" if self.zh else " "
        pieces = [sep.join(atoms[i:i + size]) for i in range(0, len(atoms), size)]
        out = []
        for piece, n in zip(pieces, self.forward.count_tokens(pieces)):
            out.extend([piece] if n <= self.max_input_tokens or len(piece) >= len(sentence)
                       else self._split_long(piece, n))
        return out

    def _run(self, engine: Seq2SeqEngine, texts: list[str], by_tokens: bool) -> dict[str, str]:
        """Translate unique `texts` in length-sorted batches: {text: translation}."""
        if not texts:
            return {}
        lengths = engine.count_tokens(texts) if by_tokens else [len(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: (-lengths[i], texts[i]))
        result: dict[str, str] = {}
        for b in range(0, len(order), self.batch_size):
            batch = [texts[i] for i in order[b:b + self.batch_size]]
            outs = engine.generate(batch, self.max_input_tokens, self.max_new_tokens)
            if len(outs) != len(batch):
                raise RuntimeError(f"translation engine returned {len(outs)} outputs for {len(batch)} inputs")
            result.update(zip(batch, outs))
        return result


@dataclass
class BackTranslationConfig:
    forward: str | None = None
    """Model translating `lang` into the pivot language: a local HF seq2seq directory (kind hf) or an
    llmkit encoder-decoder model directory (kind llmkit)."""
    backward: str | None = None
    """Model translating the pivot language back into `lang`."""
    kind: Literal["hf", "llmkit"] = "hf"
    """`hf`: transformers AutoModelForSeq2SeqLM (e.g. a Marian opus-mt pair; needs transformers);
    `llmkit`: llmkit encoder-decoder directories."""
    lang: str = "en"
    """The language the models translate from (and back into): only documents in it are back-translated."""
    forward_prefix: str = ""
    """Prepended to every forward input (T5 task prefix, e.g. "translate English to German: ")."""
    backward_prefix: str = ""
    max_input_tokens: int = 256
    """Longest model input (tokens); longer sentences are translated in pieces."""
    max_new_tokens: int = 256
    """Longest translation of one sentence or piece (tokens)."""
    batch_size: int = 16
    """Sentences per generate call."""
    device: str = "cpu"
    """torch device for both models."""

    def validate(self) -> None:
        for name in ("max_input_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lang:
            raise ValueError("lang: must name the models' language, e.g. 'en'")
