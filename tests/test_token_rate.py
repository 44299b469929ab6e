"""The one tokens/s estimator: total tokens / total seconds, not a mean of per-interval rates."""

from llmkit.train.loop import TokenRate


def test_token_rate_is_total_tokens_over_total_seconds():
    rate = TokenRate()
    assert rate.per_s is None
    rate.add(100, 1.0)   # 100 tok/s
    rate.add(100, 3.0)   # 33 tok/s
    assert rate.tokens == 200 and rate.seconds == 4.0
    assert rate.per_s == 50.0  # not (100 + 33.3) / 2
