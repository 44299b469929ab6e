"""Setup shared by several lab experiments: where the reference data lives, a char-level Shakespeare
corpus, and a tiny pretrained Llama-style base model with a bilingual BPE tokenizer.

Keep these signatures stable: experiments of other claims import them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve()


def data_root() -> Path:
    """The reference corpora: $LLMKIT_SHARED_DATA, else ../shared/data beside the checkout, else
    data/samples in the project (what `llmkit samples fetch` writes)."""
    candidates = [os.environ.get("LLMKIT_SHARED_DATA"), _HERE.parents[4] / "shared" / "data",
                  _HERE.parents[3] / "data" / "samples", Path("data/samples")]
    for c in candidates:
        if c and (Path(c) / "en" / "tinyshakespeare.txt").is_file():
            return Path(c)
    raise FileNotFoundError("reference data not found: set LLMKIT_SHARED_DATA or run `llmkit samples fetch` "
                            "(expected en/tinyshakespeare.txt under ../shared/data or data/samples)")


def data_file(rel: str) -> Path:
    path = data_root() / rel
    if not path.is_file():
        raise FileNotFoundError(f"reference data file {path} is missing")
    return path


def char_corpus(work_dir: str | Path | None = None, chars: int | None = None) -> tuple[Path, Path]:
    """tinyshakespeare (the first `chars` characters, all by default) and a char tokenizer trained on it:
    (text file, tokenizer dir), written under `work_dir` (default: runs/lab/_shared/char)."""
    from llmkit.tokenizer import train_char

    root = Path(work_dir or "runs/lab/_shared/char") / (f"first{chars}" if chars else "full")
    text_file, tok_dir = root / "shakespeare.txt", root / "tok"
    if text_file.is_file() and (tok_dir / "tokenizer.json").is_file():
        return text_file, tok_dir
    root.mkdir(parents=True, exist_ok=True)
    text = data_file("en/tinyshakespeare.txt").read_text(encoding="utf-8")
    text = text[:chars] if chars else text
    train_char([text]).save(tok_dir)
    text_file.write_text(text, encoding="utf-8")
    return text_file, tok_dir


def tiny_pretrain(out_dir: Path, text_file: Path, tok_dir: Path, seed: int, steps: int, **overrides) -> dict:
    """`llmkit.train.pretrain.pretrain` on one text file with a tiny fast config; `overrides` are
    `key=value` config keys with dots replaced by `__` (e.g. model__n_head=4). Returns pretrain's summary."""
    from llmkit.config import load_config
    from llmkit.train.pretrain import PretrainConfig, pretrain

    base = {
        "out_dir": str(out_dir), "data.inputs": f"[{text_file}]", "data.tokenizer": str(tok_dir),
        "model.n_layer": 2, "model.d_model": 64, "model.n_head": 4, "model.block_size": 64, "model.dropout": 0.0,
        "train.batch_size": 16, "train.max_steps": steps, "train.warmup_steps": max(1, steps // 10),
        "train.lr": 2e-3, "train.min_lr": 2e-4, "train.eval_interval": steps, "train.eval_batches": 8,
        "train.log_interval": max(1, steps // 4), "train.checkpoint_interval": steps + 1,
        "train.keep_checkpoints": 1, "train.progress": False, "train.seed": seed, "train.device": "cpu",
        "track.enabled": False,
    }
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    cfg = load_config(PretrainConfig, None, [f"{k}={v}" for k, v in base.items()])
    return pretrain(cfg)


def bilingual_tokenizer(work_dir: str | Path | None = None, vocab_size: int = 1000) -> Path:
    """A byte-level BPE tokenizer (with the chat tokens) trained on the alpaca en + zh instruction sets:
    its directory (cached under `work_dir`, default runs/lab/_shared)."""
    from llmkit.tokenizer import train_tokenizer

    tok_dir = Path(work_dir or "runs/lab/_shared") / f"bpe{vocab_size}"
    if not (tok_dir / "tokenizer.json").is_file():
        tok = train_tokenizer([data_file("instruct/alpaca_en_demo.json"), data_file("instruct/alpaca_zh_demo.json")],
                              vocab_size=vocab_size)
        tok.save(tok_dir)
    return tok_dir


def pretrain_text(work_dir: str | Path | None = None, chars: int = 400_000) -> Path:
    """Plain text for the tiny base model: wiki articles and c4 web documents (en) and Tang poems (zh),
    the first `chars` characters, cached as one .txt file."""
    from llmkit.tokenizer import iter_texts

    path = Path(work_dir or "runs/lab/_shared") / f"pretrain_{chars}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = list(iter_texts(data_file("en/wiki_demo.txt")))[0].splitlines()
        parts += list(iter_texts(data_file("en/c4_demo.jsonl")))
        parts += list(iter_texts(data_file("zh/tangshisanbaishou.json")))
        text = "\n\n".join(p for p in parts if p.strip())
        path.write_text(text[:chars], encoding="utf-8")
    return path


def tiny_base_model(work_dir: str | Path | None = None, steps: int = 300, seed: int = 0,
                    d_model: int = 64, n_layer: int = 2) -> Path:
    """A tiny Llama-style decoder (rope, rmsnorm, swiglu) pretrained for `steps` steps on wiki + c4 + Tang
    poems with the bilingual BPE tokenizer: its model directory (`final`), cached by its arguments under
    `work_dir` (default runs/lab/_shared). A base for SFT / LoRA / prefix experiments."""
    work = Path(work_dir or "runs/lab/_shared")
    out = work / f"base_d{d_model}_l{n_layer}_s{steps}_seed{seed}"
    final = out / "final"
    if (final / "config.json").is_file() and (out / "lab_done.json").is_file():
        return final
    tok_dir = bilingual_tokenizer(work)
    text = pretrain_text(work)
    t = time.perf_counter()
    summary = tiny_pretrain(out, text, tok_dir, seed, steps, model__d_model=d_model, model__n_layer=n_layer,
                            model__n_head=max(1, d_model // 32), model__positions="rope", model__norm="rmsnorm",
                            model__activation="swiglu", model__block_size=128)
    (out / "lab_done.json").write_text(json.dumps({"val_loss": summary["val_loss"], "steps": steps,
                                                   "seconds": time.perf_counter() - t}))
    return Path(summary["final_model"])


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
