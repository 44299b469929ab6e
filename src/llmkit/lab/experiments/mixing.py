"""§3.3: mixing 10-20% pretraining data into the instruction data prevents catastrophic forgetting.

The tiny Wikipedia-pretrained decoder of the lora-lr experiment is fully fine-tuned (every weight
trains, which forgets more than LoRA) on the alpaca demo instructions with `data.mix_pretrain` 0, 0.1
and 0.2 (share of batch rows that are pretraining windows from the base's own training split), same
steps and learning rate. Forgetting = the exact loss on the pretraining validation split after SFT minus
before; the instruction held-out loss shows what the mixing costs. The claim holds if 10-20% mixing
removes most (>= 80%) of the forgetting that unmixed SFT causes at a small instruction-loss cost;
a clear reduction (>= 25%, beyond noise) that falls short of that is a partial verdict.
"""

from __future__ import annotations

import statistics

from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result
from llmkit.lab.experiments.lora_lr import sft, tiny_base
from llmkit.lab.plots import save_png, subplots


def pretrain_val_loss(model_dir, tokens, adapter=None) -> float:
    import torch

    from llmkit.data.tokenized import open_split
    from llmkit.infer.load import load_for_inference
    from llmkit.train.heldout_loss import split_loss

    model, _, _ = load_for_inference(model_dir, adapter)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return split_loss(model, open_split(tokens, "val"), model.config.block_size)
    finally:
        torch.set_num_threads(threads)


def sig_lower(values: list[float]) -> float:
    """mean - 2 standard errors (the mean itself for one value)."""
    if len(values) < 2:
        return statistics.fmean(values)
    return statistics.fmean(values) - 2 * statistics.stdev(values) / len(values) ** 0.5


def verdict(forget: dict[float, list[float]]) -> tuple[str, str]:
    """(verdict, reason) from the pretraining val-loss increase after SFT per pretraining-data share (one
    value per seed, share 0.0 = unmixed). 'holds' = every mixed share removes >= 80% of the unmixed
    forgetting; 'partly' = every share removes >= 25% and more than 2 standard errors above 0; 'not
    measured' when unmixed SFT did not forget."""
    if 0.0 not in forget or len(forget) < 2:
        return "not measured", "an unmixed and at least one mixed run are needed"
    if statistics.fmean(forget[0.0]) <= 0:
        return "not measured", "unmixed SFT did not forget: nothing to prevent"
    kept = {m: [100.0 * (1 - f / a) if a > 0 else float("nan") for f, a in zip(forget[m], forget[0.0])]
            for m in forget if m > 0}
    worst = min(statistics.fmean(v) for v in kept.values())
    if worst >= 80.0:
        return "holds", f"every share removes >= {worst:.0f}% of the forgetting"
    if worst >= 25.0 and all(sig_lower(v) > 0 for v in kept.values()):
        return "partly holds", f"every share removes at least {worst:.0f}% of the forgetting, beyond noise"
    return "does not hold", f"the weakest share removes {worst:.0f}% of the forgetting"


def run(ctx: ExperimentContext) -> Result:
    mixes = [0.0, 0.2] if ctx.quick else [0.0, 0.1, 0.2]
    steps = 4 if ctx.quick else 150
    lr = 1e-3
    work = ctx.out_dir / "work"
    base, tokens = tiny_base(work / "base", ctx.quick)
    before = pretrain_val_loss(base, tokens)
    forget: dict[float, list[float]] = {m: [] for m in mixes}
    instr: dict[float, list[float]] = {m: [] for m in mixes}
    for seed in ctx.seeds:
        for m in mixes:
            out = work / f"mix{m:g}-s{seed}"
            s = sft(out, base, seed, steps, **{"method": "full", "train.lr": lr, "data.mix_pretrain": m,
                                                 "data.pretrain": tokens})
            instr[m].append(s["eval_loss"])
            forget[m].append(pretrain_val_loss(out / "final", tokens) - before)
    f0 = statistics.fmean(forget[0.0])
    kept = {m: [100.0 * (1 - f / a) if a > 0 else float("nan") for f, a in zip(forget[m], forget[0.0])]
            for m in mixes if m > 0}
    kept_mean = {m: statistics.fmean(v) for m, v in kept.items()}
    cost = {m: 100.0 * (statistics.fmean(instr[m]) / statistics.fmean(instr[0.0]) - 1) for m in mixes if m > 0}
    verdict_, _ = verdict(forget)
    plots = []
    fig, axes = subplots(1, 2, figsize=(8, 3.3))
    xs = [100 * m for m in mixes]
    for ax, data, label in ((axes[0], forget, "pretraining val loss increase (forgetting)"),
                            (axes[1], instr, "instruction held-out loss")):
        ax.errorbar(xs, [statistics.fmean(data[m]) for m in mixes],
                    yerr=[statistics.stdev(data[m]) if len(data[m]) > 1 else 0 for m in mixes],
                    fmt="o-", capsize=3)
        ax.set_xlabel("pretraining rows mixed in (%)")
        ax.set_title(label, fontsize=9)
    axes[0].axhline(0, color="0.5", lw=0.8)
    plots.append(save_png(fig, ctx.out_dir, "mixing.png"))
    ms = [Measurement(f"forgetting removed by {100 * m:g}% mixing", kept[m], "%", "prevents forgetting")
          for m in mixes if m > 0]
    ms += [Measurement(f"pretraining val loss increase, mix {100 * m:g}%", forget[m], "nats/token") for m in mixes]
    ms += [Measurement(f"instruction held-out loss, mix {100 * m:g}%", instr[m], "nats/token") for m in mixes]
    return Result(
        measurements=ms,
        verdict=verdict_,
        summary=(f"unmixed full SFT raises the pretraining val loss by {f0:+.3f} (from {before:.3f}); mixing "
                 + ", ".join(f"{100 * m:g}% removes {kept_mean[m]:.0f}% of that at {cost[m]:+.1f}% instruction loss"
                             for m in kept_mean) + ": "
                 + {"holds": "10-20% mixing prevents most forgetting",
                    "partly holds": "mixing reduces forgetting clearly but does not prevent it",
                    "does not hold": "mixing leaves most of the forgetting",
                    "not measured": "SFT did not forget here, so there was nothing to prevent"}[verdict_] + "."),
        setup=(f"base: Llama-style decoder 2 layers x d_model 64, BPE 1000, block 128, pretrained "
               f"{30 if ctx.quick else 600} steps on wiki_demo; full fine-tuning, lr {lr:g}, {steps} steps of batch "
               f"8 on alpaca_en_demo with data.mix_pretrain {', '.join(f'{m:g}' for m in mixes)} (windows from the "
               "base's training split); forgetting = exact loss on the pretraining val split after - before; "
               "'holds' = every 10-20% share removes >= 80% of the unmixed forgetting, 'partly' = every share removes >= 25% and more than 2 standard errors above 0."),
        plots=plots,
    )


CLAIM = Claim(
    id="mixing",
    section="§3.3",
    guide_zh="混合训练:在指令数据中混入10-20%的原始预训练数据,防止灾难性遗忘",
    guide_en="Mixed training: mix 10-20% of the original pretraining data into the instruction data to prevent "
             "catastrophic forgetting.",
    claimed="10-20% pretraining data prevents forgetting",
    run=run,
    minutes=2.0,
)
