import torch

from llmkit.train.objectives import mlm, span_corruption, span_lengths


def test_mlm_masks_fifteen_percent_with_80_10_10():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(10, 200, (64, 256), generator=g)
    x[:, ::50] = 3  # a special token (e.g. EOS) that must never be masked
    out = mlm(x, None, mask_id=2, special_ids=[0, 1, 2, 3], vocab_size=200, generator=g)
    chosen = out["labels"] != -100
    assert not chosen[:, ::50].any()
    assert abs(chosen.float().mean().item() - 0.15 * (1 - 1 / 50)) < 0.01
    assert torch.equal(out["labels"][chosen], x[chosen])
    masked = (out["input_ids"] == 2) & chosen
    unchanged = (out["input_ids"] == x) & chosen
    swapped = chosen & ~masked & ~unchanged
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(unchanged.sum().item() / n - 0.1) < 0.02 + 1 / 196  # a random swap may hit the same id
    assert abs(swapped.sum().item() / n - 0.1) < 0.02
    assert not torch.isin(out["input_ids"][swapped], torch.tensor([0, 1, 2, 3])).any()
    assert torch.equal(out["input_ids"][~chosen], x[~chosen])


def test_span_corruption_inputs_and_targets_rebuild_the_original():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(20, 100, (8, 64), generator=g)
    sentinels = list(range(5, 15))
    out = span_corruption(x, None, sentinel_ids=sentinels, eos_id=4, generator=g)
    noise, spans = span_lengths(64)
    assert (noise, spans) == (10, 3)
    assert out["input_ids"].shape == (8, 64 - noise + spans) and out["labels"].shape == (8, noise + spans + 1)
    for row, inp, tgt in zip(x, out["input_ids"].tolist(), out["labels"].tolist()):
        assert tgt[-1] == 4
        # split the target at its sentinels and put every span back in place of its sentinel
        pieces, current = {}, None
        for t in tgt[:-1]:
            if t in sentinels:
                current = t
                pieces[t] = []
            else:
                pieces[current].append(t)
        assert all(pieces[s] for s in pieces)  # no empty span
        rebuilt = [tok for t in inp for tok in (pieces[t] if t in sentinels else [t])]
        assert rebuilt == row.tolist()


def test_objectives_are_reproducible_with_a_generator():
    x = torch.randint(20, 100, (4, 32))
    a = span_corruption(x, None, sentinel_ids=list(range(5, 15)), eos_id=4, generator=torch.Generator().manual_seed(7))
    b = span_corruption(x, None, sentinel_ids=list(range(5, 15)), eos_id=4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
