import math

import torch

from llmkit.infer.engine import RequestParams
from llmkit.sampling import (
    BatchSampling,
    apply_penalties,
    filter_logits,
    filter_logits_batched,
    process_logits,
    sample_batch,
    token_counts,
    top_logprobs,
)


def bs(n=1, **kw):
    return BatchSampling.from_params([RequestParams(**kw)] * n)


def test_min_p_keeps_tokens_above_fraction_of_top():
    # probs 0.5, 0.3, 0.15, 0.05: min_p 0.5 keeps p >= 0.25 -> first two; min_p 0.1 keeps p >= 0.05 -> all
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(filter_logits(logits, min_p=0.5))[0].tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, min_p=0.3))[0].tolist() == [True, True, True, False]
    assert torch.isfinite(filter_logits(logits, min_p=0.09))[0].tolist() == [True] * 4
    # batched, per-row thresholds; a row with min_p 0 is untouched
    two = logits.repeat(2, 1)
    out = filter_logits_batched(two, torch.tensor([0, 0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [True] * 4]


def test_batched_filter_matches_scalar_filter_per_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    ks, ps, ms = [0, 5, 20, 0], [1.0, 0.9, 0.5, 0.7], [0.0, 0.0, 0.1, 0.2]
    got = filter_logits_batched(logits, torch.tensor(ks), torch.tensor(ps), torch.tensor(ms))
    for i in range(4):
        want = filter_logits(logits[i:i + 1], ks[i] or None, ps[i], ms[i])
        assert torch.equal(got[i:i + 1], want)


def test_repetition_penalty_ctrl_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_penalties(logits, bs(repetition_penalty=2.0), seen, None)
    assert out.tolist() == [[1.0, -2.0, 3.0, -4.0]]


def test_presence_and_frequency_penalties_openai():
    logits = torch.zeros(1, 4)
    counts = token_counts([[1, 1, 1, 3]], 4)
    assert counts.tolist() == [[0, 3, 0, 1]]
    out = apply_penalties(logits, bs(presence_penalty=0.5, frequency_penalty=0.25), None, counts)
    # token 1: -(0.5 + 3 * 0.25) = -1.25; token 3: -(0.5 + 0.25) = -0.75
    assert out.tolist() == [[0.0, -1.25, 0.0, -0.75]]


def test_process_order_penalty_then_temperature_and_greedy_keeps_t1():
    logits = torch.tensor([[4.0, 2.0], [4.0, 2.0]])
    sp = BatchSampling.from_params([RequestParams(temperature=2.0, repetition_penalty=4.0),
                                    RequestParams(temperature=0, repetition_penalty=4.0)])
    seen = torch.tensor([[True, False], [True, False]])
    out = process_logits(logits, sp, seen, None)
    assert out.tolist() == [[0.5, 1.0], [1.0, 2.0]]  # (4/4)/2, 2/2 and greedy at temperature 1
    assert sample_batch(out, sp, [None, None])[1].item() == 1  # the penalty flips the greedy choice


def test_top_logprobs_hand_computed():
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    c, v, i = top_logprobs(logits, torch.tensor([1]), 2)
    assert math.isclose(c.item(), math.log(0.25), rel_tol=1e-6)
    assert i.tolist() == [[0, 1]] or i.tolist() == [[0, 2]]
    assert math.isclose(v[0, 0].item(), math.log(0.5), rel_tol=1e-6)
    c0, v0, _ = top_logprobs(logits, torch.tensor([0]), 0)
    assert v0.shape == (1, 0) and math.isclose(c0.item(), math.log(0.5), rel_tol=1e-6)


def test_defaults_are_off():
    sp = bs(2)
    assert not sp.any_penalty
    logits = torch.randn(2, 10)
    assert torch.equal(process_logits(logits, sp), logits / 0.7)  # only the default temperature acts
    assert torch.equal(filter_logits_batched(logits, sp.top_k, torch.ones(2), sp.min_p), logits)
