import logging

import torch

from llmkit.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint


def _save(root, step, keep=3):
    model = {"w": torch.full((3, 3), float(step)), "b": torch.arange(3.0)}
    return save_checkpoint(root, step, model, {"optimizer": {"state": {}}}, {"ranks": [{"torch": torch.get_rng_state()}]},
                           {"data": [{"batches_drawn": step}]}, keep=keep)


def test_roundtrip_and_keep_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30, 40]
    ck = load_latest_checkpoint(tmp_path)
    assert ck.step == 40 and ck.state["data"][0]["batches_drawn"] == 40
    assert torch.equal(ck.model["w"], torch.full((3, 3), 40.0))


def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, caplog):
    _save(tmp_path, 10)
    latest = _save(tmp_path, 20)
    data = bytearray((latest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    (latest / "model.safetensors").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        ck = load_latest_checkpoint(tmp_path)
    assert ck.step == 10
    assert "step-000020" in caplog.text and "checksum mismatch" in caplog.text


def test_incomplete_checkpoint_without_meta_is_skipped(tmp_path, caplog):
    _save(tmp_path, 10)
    latest = _save(tmp_path, 20)
    (latest / "meta.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert load_latest_checkpoint(tmp_path).step == 10
    assert "meta.json missing" in caplog.text


def test_interrupted_write_leaves_no_visible_checkpoint(tmp_path):
    _save(tmp_path, 10)
    (tmp_path / ".step-000020.tmp-123").mkdir()  # what a kill during save_checkpoint leaves behind
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]
    assert load_latest_checkpoint(tmp_path).step == 10


def test_no_checkpoint_gives_none(tmp_path):
    assert load_latest_checkpoint(tmp_path / "missing") is None
