"""Config-driven commands: `--config FILE`, flags as shorthands for config keys, `key=value` overrides (an
explicit override wins over a flag for the same key), errors naming the key and the file. Nothing heavy runs:
the library entry points are replaced by recorders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from llmkit.cli import main
from llmkit.config import ConfigError, load_config_union


@dataclass
class _Lr:
    lr: float = 1e-3


@dataclass
class _A:
    task: Literal["a"] = "a"
    out_dir: str = "a"
    only_a: int = 0


@dataclass
class _B:
    task: Literal["b"] = "b"
    out_dir: str = "b"
    only_b: int = 0
    train: _Lr = field(default_factory=_Lr)


def test_load_config_union_picks_by_key_then_by_declared_keys(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("task: b\nout_dir: x\n")
    assert type(load_config_union([_A, _B], f)) is _B
    assert type(load_config_union([_A, _B], f, ["task=a"])) is _A
    f.write_text("only_b: 3\n")
    got = load_config_union([_A, _B], f, ["train.lr=0.5"])
    assert type(got) is _B and got.only_b == 3 and got.train.lr == 0.5
    f.write_text("out_dir: x\n")  # declared by both: the first listed
    assert type(load_config_union([_A, _B], f)) is _A
    f.write_text("task: c\n")
    with pytest.raises(ConfigError, match=rf"{f}: task: 'c' is not one of \['a', 'b'\]"):
        load_config_union([_A, _B], f)
    f.write_text("only_b: 1\ntrain:\n  lr: 1\n  lrr: 2\n")
    with pytest.raises(ConfigError, match=rf"{f}: unknown key 'train.lrr'"):
        load_config_union([_A, _B], f)


@pytest.fixture
def served(monkeypatch):
    got = []
    monkeypatch.setattr("llmkit.serve.app.serve", got.append)
    return got


def test_serve_config_file_flags_and_overrides(tmp_path, served, capsys):
    recipe = tmp_path / "serve.yaml"
    recipe.write_text("model: runs/m\nport: 9000\nmax_batch: 4\n")
    assert main(["serve", "--config", str(recipe), "--port", "9001", "--host", "0.0.0.0", "port=9002"]) == 0
    cfg = served.pop()
    assert (cfg.model, cfg.port, cfg.host, cfg.max_batch, cfg.device) == ("runs/m", 9002, "0.0.0.0", 4, "auto")
    assert main(["serve", "--model", "runs/m", "--kv-cache-gb", "0.5", "--device", "cpu"]) == 0  # flags alone
    cfg = served.pop()
    assert (cfg.kv_cache_gb, cfg.device, cfg.port) == (0.5, "cpu", 8000)
    recipe.write_text("model: runs/m\nprot: 9000\n")
    assert main(["serve", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'prot'" in err and str(recipe) in err
    assert main(["serve", "--model", "m", "port=eighty"]) == 2
    assert "command line: port: expected an integer" in capsys.readouterr().err
    assert not served


def test_pipeline_run_takes_config_flag_or_positional(tmp_path, monkeypatch, capsys):
    got = []
    monkeypatch.setattr("llmkit.pipeline.run.run_pipeline", lambda cfg, restart: got.append(cfg) or {"stages": {}})
    recipe = tmp_path / "pipe.yaml"
    recipe.write_text(f"name: demo\nout_dir: {tmp_path / 'run'}\n")
    assert main(["pipeline", "run", "--config", str(recipe), "name=other"]) == 0
    assert main(["pipeline", "run", str(recipe), "name=other"]) == 0  # the older positional form
    assert [c.name for c in got] == ["other", "other"]
    with pytest.raises(SystemExit):
        main(["pipeline", "run", "--config", str(recipe), str(recipe)])
    recipe.write_text("nmae: demo\n")
    assert main(["pipeline", "run", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'nmae'" in err and str(recipe) in err


def test_finetune_picks_the_recipe_class(tmp_path, monkeypatch, capsys):
    """A classification recipe without `task:` stays classify even with `method=lora` (the old rule made any
    recipe naming a method SFT); a wrong key names the key and the file."""
    ran = []
    monkeypatch.setattr("llmkit.finetune.classify.finetune_classifier",
                        lambda cfg, resume: ran.append(type(cfg).__name__) or {})
    monkeypatch.setattr("llmkit.finetune.sft.finetune_sft", lambda cfg, resume: ran.append(type(cfg).__name__) or {})
    recipe = tmp_path / "cls.yaml"
    recipe.write_text("out_dir: runs/x\nmodel:\n  n_layer: 1\n")
    assert main(["finetune", "--config", str(recipe), "method=lora"]) == 0
    recipe.write_text("base_model: runs/base\nmethod: lora\n")
    assert main(["finetune", "--config", str(recipe)]) == 0
    assert ran == ["ClassifyConfig", "SFTConfig"]
    recipe.write_text("base_model: runs/base\nlora:\n  rnak: 4\n")
    assert main(["finetune", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lora.rnak'" in err and str(recipe) in err


def test_generate_config_file_flags_and_overrides(tmp_path, capsys):
    """`llmkit generate --config FILE`: an explicit `temperature=0` wins over `--temperature 1.5` (greedy,
    so the same text as greedy alone); a wrong key names the key and the file; `model` is required."""
    import torch

    from llmkit.chat import DEFAULT_CHAT_TEMPLATE, save_chat_template
    from llmkit.models import Decoder, DecoderConfig, save_model
    from llmkit.tokenizer import train_char

    tok = train_char(["hello hi there, how are you?\n"])
    torch.manual_seed(0)
    save_model(Decoder(DecoderConfig(vocab_size=len(tok), block_size=64, n_layer=1, d_model=32, n_head=2)),
               tmp_path / "m", tok)
    save_chat_template(tmp_path / "m", DEFAULT_CHAT_TEMPLATE)
    recipe = tmp_path / "gen.yaml"
    recipe.write_text(f"model: {tmp_path / 'm'}\nprompt: hello\nmax_new_tokens: 12\ndevice: cpu\n")
    assert main(["generate", "--config", str(recipe), "temperature=0"]) == 0
    greedy = capsys.readouterr().out
    for seed in (1, 2):
        assert main(["generate", "--config", str(recipe), "--temperature", "1.5", "--seed", str(seed),
                     "temperature=0"]) == 0
        assert capsys.readouterr().out == greedy
    assert main(["generate", "--config", str(recipe), "--raw", "temperature=0", "max_new_tokens=3"]) == 0
    assert capsys.readouterr().out.startswith("hello")  # raw: the prompt, then its continuation
    recipe.write_text(f"model: {tmp_path / 'm'}\nprompt: hello\ntemprature: 0\n")
    assert main(["generate", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'temprature'" in err and str(recipe) in err
    assert main(["generate", "--prompt", "hello"]) == 2
    assert "command line: model: required" in capsys.readouterr().err
