import numpy as np
import pytest

from llmkit.data.tokenized import open_split, prepare_tokens, read_meta, token_dtype
from llmkit.tokenizer import Tokenizer, train_bpe
from llmkit.train.sampler import WindowSampler


def test_token_dtype_by_vocab():
    assert token_dtype(65) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_prepare_splits_each_file_and_records_lineage(shakespeare_small, tmp_path):
    text_file, tok_dir = shakespeare_small
    tok = Tokenizer.load(tok_dir)
    meta = prepare_tokens([text_file], tok, tmp_path / "d", val_fraction=0.1, shard_tokens=50_000)
    text = text_file.read_text(encoding="utf-8")
    ids = np.array(tok.encode(text) + [tok.eos_id])
    train, val = open_split(tmp_path / "d", "train"), open_split(tmp_path / "d", "val")
    assert len(train.shards) > 1  # sharded at 50k tokens
    got = np.concatenate([np.asarray(s) for s in train.shards + val.shards])
    np.testing.assert_array_equal(got, ids)  # same ids as encoding the whole text at once
    assert val.tokens == len(ids) - int(len(ids) * 0.9)
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len(text.encode())
    assert read_meta(tmp_path / "d")["tokenizer_digest"] == tok.digest()
    # the digest is of the token stream: another split gives another digest
    other = prepare_tokens([text_file], tok, tmp_path / "e", val_fraction=0.2)
    assert other["splits"]["train"]["sha256"] != meta["splits"]["train"]["sha256"]


def test_jsonl_documents_are_separated_by_eos(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "alpha beta"}\n{"text": "gamma 伽马"}\n', encoding="utf-8")
    tok = train_bpe(["alpha beta gamma 伽马"] * 10, vocab_size=300)
    prepare_tokens([src], tok, tmp_path / "d", val_fraction=0.0)
    ids = np.asarray(open_split(tmp_path / "d", "train").shards[0]).tolist()
    assert ids.count(tok.eos_id) == 2
    first, second = ids[: ids.index(tok.eos_id)], ids[ids.index(tok.eos_id) + 1 : -1]
    assert tok.decode(first) == "alpha beta" and tok.decode(second) == "gamma 伽马"


def test_sampler_state_replays_the_same_batches(shakespeare_small, tmp_path):
    text_file, tok_dir = shakespeare_small
    prepare_tokens([text_file], Tokenizer.load(tok_dir), tmp_path / "d", shard_tokens=30_000)
    split = open_split(tmp_path / "d", "train")
    a = WindowSampler(split, batch_size=8, block_size=16, seed=5)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(4)]
    b = WindowSampler(split, batch_size=8, block_size=16, seed=5)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (b.next_batch() for _ in range(4))):
        assert (x1 == x2).all() and (y1 == y2).all()
    x, y = expected[0]
    assert x.shape == (8, 16) and (x[:, 1:] == y[:, :-1]).all()  # targets are inputs shifted by one
    other_rank = WindowSampler(split, batch_size=8, block_size=16, seed=5, rank=1)
    assert not (other_rank.next_batch()[0] == WindowSampler(split, 8, 16, seed=5).next_batch()[0]).all()


def test_missing_input_is_an_error(shakespeare_small, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare_tokens([tmp_path / "nope.txt"], Tokenizer.load(shakespeare_small[1]), tmp_path / "d")


def test_epoch_sampler_covers_each_window_once_and_resumes(shakespeare_small, tmp_path):
    from llmkit.train.sampler import EpochSampler

    text_file, tok_dir = shakespeare_small
    prepare_tokens([text_file], Tokenizer.load(tok_dir), tmp_path / "d", shard_tokens=40_000)
    split = open_split(tmp_path / "d", "train")
    s = EpochSampler(split, batch_size=16, block_size=32, seed=3)
    per_epoch = len(s.windows) // 16
    for shard in np.unique(s.windows[:, 0]):  # the windows tile each shard: every token once per epoch
        starts = np.sort(s.windows[s.windows[:, 0] == shard, 1])
        assert (np.diff(starts) == 32).all() and starts[0] < 32
        assert starts[-1] + 2 * 32 + 1 > len(split.shards[shard])
    first = s.next_batch()[0]
    shard, start = s.windows[0]
    np.testing.assert_array_equal(first[0].numpy(), split.shards[shard][start:start + 32])
    s.position = 0
    state = s.state_dict()
    expected = [s.next_batch()[0] for _ in range(per_epoch + 3)]  # crosses into the next epoch
    assert s.epoch == 1
    r = EpochSampler(split, batch_size=16, block_size=32, seed=3)
    r.load_state_dict(state)
    for a, b in zip(expected, (r.next_batch()[0] for _ in range(per_epoch + 3))):
        assert (a == b).all()
    ranks = [EpochSampler(split, 16, 32, seed=3, rank=k, world_size=2) for k in (0, 1)]
    assert not set(map(tuple, ranks[0].windows.tolist())) & set(map(tuple, ranks[1].windows.tolist()))
