from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(rel: str) -> Path:
    path = SHARED_DATA / rel
    if not path.is_file():
        pytest.skip(f"reference data {path} is missing (expected ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def shakespeare_small(tmp_path_factory) -> tuple[Path, Path]:
    """First 200 KB of tinyshakespeare and a char tokenizer trained on it: (text file, tokenizer dir)."""
    from llmkit.tokenizer import train_char

    root = tmp_path_factory.mktemp("shakespeare")
    text = shared_file("en/tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    text_file = root / "shakespeare.txt"
    text_file.write_text(text, encoding="utf-8")
    tok_dir = root / "tok"
    train_char([text]).save(tok_dir)
    return text_file, tok_dir


def tiny_overrides(out_dir: Path, text_file: Path, tok_dir: Path, **extra) -> list[str]:
    """`key=value` overrides for a model that trains a step in milliseconds."""
    base = {
        "out_dir": str(out_dir), "data.inputs": f"[{text_file}]", "data.tokenizer": str(tok_dir),
        "model.n_layer": 2, "model.d_model": 32, "model.n_head": 2, "model.block_size": 32,
        "model.dropout": 0.1,  # dropout consumes RNG: exact resume must restore it
        "train.batch_size": 4, "train.max_steps": 40, "train.warmup_steps": 5, "train.eval_interval": 20,
        "train.eval_batches": 2, "train.log_interval": 1, "train.checkpoint_interval": 10,
        "train.progress": False, "track.enabled": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
