"""§3.1 / §3.2: LoRA trains 0.5-2% of the parameters, prefix tuning 0.1-0.5%; rank r 8-64, alpha 2r-4r.

Part 1 (counting, exact): `llmkit.models.lora.apply_lora` and `llmkit.models.prefix.apply_prefix` on
decoders of several sizes built on the meta device (GPT-2 small/medium/large-like and a Llama-7B-like
shape), trainable share as PEFT's print_trainable_parameters reports it.
Part 2 (training): LoRA SFT (`llmkit.finetune.sft.finetune_sft`) of a tiny pretrained Llama-style base
(`llmkit.lab.common.tiny_base_model`) on the alpaca en + zh demo sets for a fixed number of steps,
sweeping alpha in {r, 2r, 4r, 8r} at r = 8 and r in {8, 16, 32, 64} at alpha = 2r; held-out loss per seed.

Verdict (`verdict`): one rule for both methods: a share claim passes when a majority (more than half) of
its model x setting points lies inside the guide's range; the alpha advice passes when 2r or 4r is within
one seed std of the best alpha. All three pass: holds; none: does not hold; otherwise partly holds.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import torch

from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result
from llmkit.lab.plots import bars, lines

LORA_RANGE = (0.5, 2.0)
PREFIX_RANGE = (0.1, 0.5)
MODELS = {  # name: (d_model, n_layer, vocab, llama-style)
    "GPT-2 small (124M)": (768, 12, 50257, False),
    "GPT-2 medium (355M)": (1024, 24, 50257, False),
    "GPT-2 large (774M)": (1280, 36, 50257, False),
    "Llama-7B shape": (4096, 32, 32000, True),
}
RANKS = [8, 16, 32, 64]


def _meta_decoder(d: int, n: int, vocab: int, llama: bool):
    from llmkit.models.decoder import Decoder, DecoderConfig

    extra = dict(positions="rope", norm="rmsnorm", activation="swiglu", d_ff=int(d * 8 / 3 // 256 + 1) * 256
                 if d >= 4096 else None, tie_embeddings=False) if llama else {}
    extra = {k: v for k, v in extra.items() if v is not None}
    with torch.device("meta"):
        return Decoder(DecoderConfig(vocab_size=vocab, d_model=d, n_layer=n, block_size=1024, **extra))


def lora_share(shape, r: int, targets: list[str]) -> float:
    from llmkit.models.lora import LoRAConfig, apply_lora, trainable_share

    model = _meta_decoder(*shape)
    with torch.device("meta"):
        apply_lora(model, LoRAConfig(r=r, alpha=2 * r, targets=targets))
    return 100.0 * trainable_share(model)[2]


def prefix_share(shape, tokens: int, projection: bool) -> float:
    from llmkit.models.prefix import PrefixConfig, apply_prefix, trainable_share

    model = _meta_decoder(*shape)
    with torch.device("meta"):
        apply_prefix(model, PrefixConfig(num_virtual_tokens=tokens, projection=projection, projection_dim=512))
    return 100.0 * trainable_share(model)[2]


def _sft(base: Path, out: Path, seed: int, r: int, alpha: float, steps: int) -> float:
    from llmkit.config import load_config
    from llmkit.finetune.sft import SFTConfig, finetune_sft
    from llmkit.lab.common import data_file

    ov = {"out_dir": str(out), "base_model": str(base), "method": "lora",
          "data.paths": f"[{data_file('instruct/alpaca_en_demo.json')}, {data_file('instruct/alpaca_zh_demo.json')}]",
          "data.eval_max": 48, "data.mix_pretrain": 0.0,
          "train.batch_size": 8, "train.max_steps": steps, "train.warmup_steps": max(1, steps // 10),
          "train.eval_interval": steps, "train.lr": 3e-4, "train.log_interval": steps,
          "train.checkpoint_interval": steps + 1, "train.keep_checkpoints": 1, "train.progress": False,
          "train.seed": seed, "train.device": "cpu", "eval.answers": 0, "eval.samples": 0, "eval.loss_batches": 6,
          "track.enabled": False, "lora.r": r, "lora.alpha": alpha, "lora.dropout": 0.0,
          "lora.targets": "[q_proj, v_proj]"}
    cfg = load_config(SFTConfig, None, [f"{k}={v}" for k, v in ov.items()])
    return float(finetune_sft(cfg)["eval_loss"])


MAJORITY = 0.5  # a share claim passes when more than this fraction of its points are inside the range


def verdict(lora_shares_pct: list[float], prefix_shares_pct: list[float], alpha_ok: bool) -> tuple[str, str]:
    """(verdict, reason) from every LoRA and prefix share point (%) and whether alpha 2r-4r trained as well as
    the best alpha. The same majority rule applies to LoRA and prefix."""
    if not lora_shares_pct or not prefix_shares_pct:
        return "not measured", "no trainable shares counted"
    lora_in = sum(LORA_RANGE[0] <= v <= LORA_RANGE[1] for v in lora_shares_pct)
    prefix_in = sum(PREFIX_RANGE[0] <= v <= PREFIX_RANGE[1] for v in prefix_shares_pct)
    parts = [lora_in > MAJORITY * len(lora_shares_pct), prefix_in > MAJORITY * len(prefix_shares_pct), alpha_ok]
    reason = (f"LoRA {lora_in}/{len(lora_shares_pct)} points inside 0.5-2% ({'majority' if parts[0] else 'no majority'}), "
              f"prefix {prefix_in}/{len(prefix_shares_pct)} inside 0.1-0.5% ({'majority' if parts[1] else 'no majority'}), "
              f"alpha 2r-4r {'as good as the best alpha' if alpha_ok else 'worse than the best alpha'}")
    if all(parts):
        return "holds", reason
    if not any(parts):
        return "does not hold", reason
    return "partly holds", reason


def _best_within_noise(losses: dict[str, list[float]], good: set[str]) -> tuple[str, bool]:
    """(label with the lowest mean loss, whether some `good` label is within one std of that best)."""
    means = {k: statistics.fmean(v) for k, v in losses.items()}
    best = min(means, key=means.get)
    spread = max(statistics.stdev(losses[best]) if len(losses[best]) > 1 else 0.0, 1e-4)
    return best, any(means[g] - means[best] <= spread for g in good if g in means)


def run(ctx: ExperimentContext) -> Result:
    from llmkit.lab.common import tiny_base_model

    models = dict(list(MODELS.items())[:2]) if ctx.quick else MODELS
    shapes = list(models.values())
    ms: list[Measurement] = []
    for r in RANKS:
        ms.append(Measurement(f"LoRA q,v r={r} trainable share (one value per model size)",
                              [lora_share(s, r, ["q_proj", "v_proj"]) for s in shapes], "%", "0.5-2%"))
    ms.append(Measurement("LoRA all-linear r=16 trainable share", [lora_share(s, 16, ["all-linear"]) for s in shapes],
                          "%", "0.5-2%"))
    ms.append(Measurement("Prefix P=20 (table) trainable share", [prefix_share(s, 20, False) for s in shapes],
                          "%", "0.1-0.5%"))
    ms.append(Measurement("Prefix P=20 + MLP(512) trainable share", [prefix_share(s, 20, True) for s in shapes],
                          "%", "0.1-0.5%"))
    lora_in = [LORA_RANGE[0] <= v <= LORA_RANGE[1] for m in ms[:4] for v in m.values]
    prefix_in = [PREFIX_RANGE[0] <= v <= PREFIX_RANGE[1] for m in ms[5:7] for v in m.values]

    # part 2: alpha and rank sweeps
    steps = 8 if ctx.quick else 100
    work = ctx.out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)  # finetune_sft refuses to start over an earlier run's checkpoints
    alpha_losses: dict[str, list[float]] = {}
    rank_losses: dict[str, list[float]] = {}
    seeds = ctx.seeds[:1] if ctx.quick else ctx.seeds
    alphas = [1, 2] if ctx.quick else [1, 2, 4, 8]
    ranks = [8, 16] if ctx.quick else RANKS
    base = tiny_base_model(ctx.out_dir.parent / "_shared", steps=20 if ctx.quick else 300, seed=0)
    for seed in seeds:
        cache: dict[tuple[int, int], float] = {}
        for k in alphas:
            cache[(8, 8 * k)] = _sft(base, work / f"r8_a{8 * k}_s{seed}", seed, 8, 8 * k, steps)
            alpha_losses.setdefault(f"{k}r" if k > 1 else "r", []).append(cache[(8, 8 * k)])
        for r in ranks:
            loss = cache.get((r, 2 * r)) or _sft(base, work / f"r{r}_a{2 * r}_s{seed}", seed, r, 2 * r, steps)
            rank_losses.setdefault(f"r={r}", []).append(loss)
    for label, v in alpha_losses.items():
        ms.append(Measurement(f"SFT held-out loss, r=8, alpha={label}", v, "", "alpha 2r-4r" if label in ("2r", "4r") else None))
    for label, v in rank_losses.items():
        ms.append(Measurement(f"SFT held-out loss, alpha=2r, {label}", v, "", "r 8-64"))
    best_alpha, alpha_ok = _best_within_noise(alpha_losses, {"2r", "4r"})
    best_rank, _ = _best_within_noise(rank_losses, set(rank_losses))
    rank_means = [statistics.fmean(v) for v in rank_losses.values()]
    rank_spread = max(rank_means) - min(rank_means)

    decided, reason = verdict([v for m in ms[:4] for v in m.values], [v for m in ms[5:7] for v in m.values],
                              alpha_ok)
    plots = [
        lines(ctx.out_dir, "lora_share", RANKS, {name: [[lora_share(s, r, ["q_proj", "v_proj"])] for r in RANKS]
                                                 for name, s in models.items()},
              "LoRA rank r (q_proj, v_proj)", "trainable share (%)", "LoRA trainable share vs rank",
              reference=LORA_RANGE, ref_label="guide: 0.5-2%", logx=True),
        bars(ctx.out_dir, "alpha_sweep", list(alpha_losses), list(alpha_losses.values()), "held-out loss",
             f"LoRA r=8, {steps} SFT steps: alpha sweep"),
        bars(ctx.out_dir, "rank_sweep", list(rank_losses), list(rank_losses.values()), "held-out loss",
             f"LoRA alpha=2r, {steps} SFT steps: rank sweep"),
    ]
    lora_vals = [v for m in ms[:4] for v in m.values]
    below = [f"r={r}" for r, m in zip(RANKS, ms[:4]) if min(m.values) < LORA_RANGE[0]]
    summary = (f"LoRA on q,v with r 8-64 trains {min(lora_vals):.2f}-{max(lora_vals):.2f}% of the parameters "
               f"({sum(lora_in)}/{len(lora_in)} model/rank points inside the guide's 0.5-2%"
               + (f"; below it for some sizes: {', '.join(below)}" if below else "") + f"); prefix tuning with 20 virtual tokens trains {ms[5].mean:.2f}% as a table and "
               f"{ms[6].mean:.2f}% with the 512-wide MLP ({sum(prefix_in)}/{len(prefix_in)} inside 0.1-0.5%). "
               f"In the SFT sweep the lowest held-out loss came from alpha={best_alpha} "
               f"({'2r-4r is within one std of it' if alpha_ok else '2r-4r is worse by more than one std'}); "
               f"ranks 8-64 differ by {rank_spread:.3f} in mean loss (best {best_rank}). Verdict: {reason}.")
    setup = (f"Counting: llmkit Decoder shapes {', '.join(models)} on the meta device; LoRA targets q_proj,v_proj "
             f"(guide's example) and all-linear; prefix num_virtual_tokens=20, projection_dim=512. Training: tiny "
             f"Llama-style base (d 64, 2 layers, rope/rmsnorm/swiglu, BPE 1000, 300 pretraining steps on wiki+c4+Tang "
             f"poems), LoRA q,v SFT on alpaca en+zh for {steps} steps (batch 8, lr 3e-4 x lr_ratio 10, no dropout), "
             f"held-out loss on 48 conversations, seeds {seeds}.")
    return Result(ms, decided, summary, setup, plots)


CLAIM = Claim(
    id="trainable-params", section="§3.1/§3.2",
    guide_zh="参数量调整:LoRA 0.5-2%,Prefix Tuning 0.1-0.5%(3.1 微调策略对比表);"
             "参数选择:秩r通常设为8-64,α值设为2r-4r",
    guide_en="LoRA adjusts 0.5-2% of the parameters, prefix tuning 0.1-0.5%; rank r is usually 8-64, alpha 2r-4r.",
    claimed="LoRA 0.5-2%, prefix 0.1-0.5%; r 8-64, alpha 2r-4r", run=run, minutes=2.5)
