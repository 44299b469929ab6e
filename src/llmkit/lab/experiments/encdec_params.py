"""§1.2: an encoder-decoder (T5) has ~30% more parameters than a decoder-only model.

Published models, not llmkit's: parameter counts computed from the published configurations of
encoder-decoders (T5 v1.0, BART) and the decoder-only model of the same width class (GPT-2), i.e. models
released side by side as the "base" / "large"-sized choice of each family. A pair's figure is
enc-dec parameters / decoder parameters - 1. The counts are exact formulas of each architecture and are
checked against the totals the model cards report (T5-base 222.9M, GPT-2 124.4M, BART-base 139.4M...).

Verdict (`verdict`): the claim holds when most pairs (more than half) show +20..+40% ("about 30%"),
partly holds when some pair does or the median pair does, and does not hold otherwise. Nothing is random:
each pair is one value.
"""

from __future__ import annotations

import statistics

from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result
from llmkit.lab.plots import bars

CLAIMED = 30.0
TOLERANCE = 10.0  # percentage points around +30% that count as "about 30%"

# Published configurations (Hugging Face config.json of each checkpoint).
T5 = {  # T5 v1.0: relu FFN, 32 relative-position buckets, embeddings tied to the output head
    "t5-small": dict(d_model=512, d_ff=2048, n_layer=6, n_decoder_layer=6, n_heads=8, d_kv=64, vocab=32128),
    "t5-base": dict(d_model=768, d_ff=3072, n_layer=12, n_decoder_layer=12, n_heads=12, d_kv=64, vocab=32128),
    "t5-large": dict(d_model=1024, d_ff=4096, n_layer=24, n_decoder_layer=24, n_heads=16, d_kv=64, vocab=32128),
}
BART = {  # learned positions (1024 + 2 offset), layernorm on the embeddings, biases, tied output head
    "bart-base": dict(d_model=768, d_ff=3072, n_layer=6, n_decoder_layer=6, vocab=50265, positions=1026),
    "bart-large": dict(d_model=1024, d_ff=4096, n_layer=12, n_decoder_layer=12, vocab=50265, positions=1026),
}
GPT2 = {  # learned positions 1024, biases, tied output head
    "gpt2 (small)": dict(d_model=768, n_layer=12, vocab=50257, positions=1024),
    "gpt2-medium": dict(d_model=1024, n_layer=24, vocab=50257, positions=1024),
}
PAIRS = [("t5-base", "gpt2 (small)"), ("bart-base", "gpt2 (small)"),
         ("t5-large", "gpt2-medium"), ("bart-large", "gpt2-medium")]
"""Same width (768: the "base" class, 1024: the next size up), as each family's papers pair them."""


def t5_params(d_model: int, d_ff: int, n_layer: int, n_decoder_layer: int, n_heads: int, d_kv: int,
              vocab: int, buckets: int = 32) -> int:
    inner = n_heads * d_kv
    attn = 4 * d_model * inner  # q, k, v, o without biases
    ffn = 2 * d_model * d_ff
    enc = n_layer * (attn + ffn + 2 * d_model) + buckets * n_heads + d_model
    dec = n_decoder_layer * (2 * attn + ffn + 3 * d_model) + buckets * n_heads + d_model
    return vocab * d_model + enc + dec


def bart_params(d_model: int, d_ff: int, n_layer: int, n_decoder_layer: int, vocab: int, positions: int) -> int:
    attn = 4 * (d_model * d_model + d_model)
    ffn = d_model * d_ff + d_ff + d_ff * d_model + d_model
    ln = 2 * d_model
    enc = n_layer * (attn + ffn + 2 * ln) + positions * d_model + ln
    dec = n_decoder_layer * (2 * attn + ffn + 3 * ln) + positions * d_model + ln
    return vocab * d_model + enc + dec


def gpt2_params(d_model: int, n_layer: int, vocab: int, positions: int) -> int:
    d = d_model
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return vocab * d + positions * d + n_layer * block + 2 * d


def published_params() -> dict[str, int]:
    counts = {name: t5_params(**cfg) for name, cfg in T5.items()}
    counts.update({name: bart_params(**cfg) for name, cfg in BART.items()})
    counts.update({name: gpt2_params(**cfg) for name, cfg in GPT2.items()})
    return counts


def verdict(extra_pct_per_pair: list[float], claimed: float = CLAIMED, tolerance: float = TOLERANCE) -> tuple[str, str]:
    """(verdict, reason) from the enc-dec extra parameters (%) of each published pair."""
    if not extra_pct_per_pair:
        return "not measured", "no pair was counted"
    near = [abs(v - claimed) <= tolerance for v in extra_pct_per_pair]
    median = statistics.median(extra_pct_per_pair)
    lo, hi = claimed - tolerance, claimed + tolerance
    if sum(near) > len(near) / 2:
        return "holds", f"{sum(near)}/{len(near)} pairs have {lo:+g}..{hi:+g}% more parameters"
    if any(near) or abs(median - claimed) <= tolerance:
        return "partly holds", (f"only {sum(near)}/{len(near)} pairs inside {lo:+g}..{hi:+g}% "
                                f"(median {median:+.0f}%)")
    return "does not hold", (f"no pair inside {lo:+g}..{hi:+g}%: the extra parameters range "
                             f"{min(extra_pct_per_pair):+.0f}..{max(extra_pct_per_pair):+.0f}% (median {median:+.0f}%)")


def run(ctx: ExperimentContext) -> Result:
    counts = published_params()
    extra = {f"{ed} vs {dec}": 100.0 * (counts[ed] / counts[dec] - 1.0) for ed, dec in PAIRS}
    v, reason = verdict(list(extra.values()))
    ms = [Measurement(f"extra params, {pair}", [pct], "%", "+30%") for pair, pct in extra.items()]
    ms.append(Measurement("extra params, all published pairs", list(extra.values()), "%", "+30%"))
    plots = [bars(ctx.out_dir, "published_pairs", list(extra), [[x] for x in extra.values()],
                  "encoder-decoder extra parameters (%)", "Published enc-dec vs decoder-only of the same width",
                  reference=(CLAIMED - TOLERANCE, CLAIMED + TOLERANCE), ref_label="guide: ~+30%")]
    summary = (", ".join(f"{p} {x:+.0f}%" for p, x in extra.items()) + f": {reason}. The extra share depends on "
               "the layer split, not on the architecture: T5 keeps GPT-2's depth in each stack (each decoder layer "
               "adds cross-attention, ~4d²), BART splits it between the two stacks.")
    setup = ("Parameter counts from the published configs (" + "; ".join(
        f"{n} {c / 1e6:.1f}M" for n, c in counts.items()) + "), embeddings tied to the output head as released; "
        f"pairs of the same width: {', '.join(extra)}; 'about 30%' = {CLAIMED - TOLERANCE:+g}..{CLAIMED + TOLERANCE:+g}%, "
        "'holds' when more than half the pairs are inside. Deterministic: one value per pair.")
    return Result(ms, v, summary, setup, plots)


CLAIM = Claim(
    id="encdec-params", section="§1.2",
    guide_zh="Encoder-Decoder架构(如T5):通用性强,但参数量通常比纯解码器模型大30%",
    guide_en="Encoder-decoder (e.g. T5): versatile, but usually ~30% more parameters than a decoder-only model.",
    claimed="+30% parameters", run=run, minutes=0.2)
