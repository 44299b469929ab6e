"""§3.2: train LoRA at 5-10x the base model's learning rate.

A tiny decoder is pretrained on Wikipedia text (BPE vocabulary with the chat tokens), then LoRA-tuned
(r 16, alpha 32, q/v projections, the guide's settings) on the alpaca demo instructions with
`finetune_sft`, the base rate fixed and `lora.lr_ratio` in 1, 2, 5, 10, 20 (and 40), same steps, seeds
for the SFT run (data order, adapter init). The held-out instruction loss per ratio says which
multiplier is best; the guide's claim holds if the best ratio lies in 5-10 (or its loss is within
noise of the best).
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result
from llmkit.lab.plots import save_png, subplots

DATA = Path(__file__).resolve().parents[5] / "shared" / "data"
BASE_LR = 1e-4  # configs/sft_lora.yaml's train.lr


def data_file(rel: str) -> Path:
    for root in (DATA, Path(__file__).resolve().parents[4] / "data" / "samples"):
        if (root / rel).is_file():
            return root / rel
    raise FileNotFoundError(f"{rel} not found under {DATA} (run `llmkit samples fetch`)")


def tiny_base(root: Path, quick: bool) -> tuple[Path, Path]:
    """A small pretrained decoder (Llama style) on Wikipedia text, made once under root:
    (model dir, its pretraining token dir, whose val split probes forgetting)."""
    import torch

    from llmkit.config import load_config
    from llmkit.tokenizer import train_tokenizer
    from llmkit.train.pretrain import PretrainConfig, pretrain

    model_dir, tokens = root / "base" / "final", root / "tokens"
    if (model_dir / "config.json").is_file() or any(model_dir.glob("*.safetensors")):
        return model_dir, tokens
    root.mkdir(parents=True, exist_ok=True)
    text = data_file("en/wiki_demo.txt").read_text(encoding="utf-8")
    corpus = root / "wiki.txt"
    corpus.write_text(text[:150_000] if quick else text, encoding="utf-8")
    tok_dir = root / "tok"
    train_tokenizer([str(corpus), str(data_file("instruct/alpaca_en_demo.json"))],
                    vocab_size=1000).save(tok_dir)
    ov = {"out_dir": root / "base", "data.inputs": f"[{corpus}]", "data.tokenizer": tok_dir, "data.prepared": tokens,
          "model.n_layer": 2, "model.d_model": 64, "model.n_head": 4, "model.block_size": 128, "model.dropout": 0.0,
          "model.positions": "rope", "model.norm": "rmsnorm", "model.activation": "swiglu",
          "train.batch_size": 16, "train.max_steps": 30 if quick else 600, "train.warmup_steps": 20,
          "train.lr": 3e-3, "train.min_lr": 3e-4, "train.eval_interval": 100000, "train.eval_batches": 5,
          "train.log_interval": 50, "train.checkpoint_interval": 100000, "train.keep_checkpoints": 1,
          "train.progress": False, "train.device": "cpu", "train.seed": 0, "track.enabled": False}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(load_config(PretrainConfig, None, [f"{k}={v}" for k, v in ov.items()]))
    finally:
        torch.set_num_threads(threads)
    return model_dir, tokens


def sft(out: Path, base: Path, seed: int, steps: int, **overrides) -> dict:
    """`finetune_sft` of the tiny base on the English alpaca demo set, on CPU, no generation eval."""
    import torch

    from llmkit.config import load_config
    from llmkit.finetune.sft import SFTConfig, finetune_sft

    ov = {"out_dir": out, "base_model": base, "method": "lora",
          "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.1, "lora.targets": "[q_proj, v_proj]",
          "data.paths": f"[{data_file('instruct/alpaca_en_demo.json')}]", "data.eval_max": 50, "data.seed": seed,
          "data.mix_pretrain": 0.0, "train.batch_size": 8, "train.max_steps": steps, "train.lr": BASE_LR,
          "train.warmup_steps": max(1, steps // 10), "train.eval_interval": steps, "train.log_interval": max(1, steps // 20),
          "train.checkpoint_interval": steps, "train.keep_checkpoints": 1, "train.progress": False,
          "train.device": "cpu", "train.precision": "fp32", "train.seed": seed,
          "eval.answers": 0, "eval.samples": 0, "track.enabled": False}
    ov.update(overrides)
    shutil.rmtree(out, ignore_errors=True)  # a rerun starts fresh (finetune_sft refuses old checkpoints)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return finetune_sft(load_config(SFTConfig, None, [f"{k}={v}" for k, v in ov.items()]))
    finally:
        torch.set_num_threads(threads)


def verdict(loss: dict[float, list[float]]) -> tuple[str, str]:
    """(verdict, reason) from the held-out loss per LoRA/full learning-rate ratio (one value per seed, same
    seed at the same index). 'holds' = the best mean loss is at a ratio in 5-10; 'partly' = the best ratio
    in 5-10 is within 2 paired standard errors or 0.5% of the best; 'not measured' without a ratio in 5-10."""
    means = {r: statistics.fmean(v) for r, v in loss.items()}
    guide = [r for r in loss if 5.0 <= r <= 10.0]
    if not guide:
        return "not measured", "no ratio in 5-10 was run"
    best = min(means, key=means.get)
    best_guide = min(guide, key=means.get)
    if 5.0 <= best <= 10.0:
        return "holds", f"the best ratio is {best:g}x"
    diffs = [a - b for a, b in zip(loss[best_guide], loss[best])]
    gap = statistics.fmean(diffs)
    gap_se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    if gap <= 2 * gap_se or gap / means[best] < 0.005:  # within noise or within 0.5%
        return "partly holds", f"the best ratio is {best:g}x; {best_guide:g}x is {gap:.4f} behind, within noise or 0.5%"
    return "does not hold", f"the best ratio is {best:g}x; {best_guide:g}x is {gap:.4f} ± {gap_se:.4f} behind"


def run(ctx: ExperimentContext) -> Result:
    ratios = [1.0, 10.0] if ctx.quick else [1.0, 2.0, 5.0, 10.0, 20.0, 50.0]
    full_lrs = [1e-3] if ctx.quick else [3e-4, 1e-3, 3e-3, 1e-2]
    steps = 4 if ctx.quick else 120
    work = ctx.out_dir / "work"
    base, _ = tiny_base(work / "base", ctx.quick)
    base_loss = sft(work / "zero", base, 0, 1, **{"train.lr": 1e-12})["eval_loss"]  # ~ the untuned base
    # 1. the base rate: the best full fine-tuning learning rate of this setup (seed-averaged)
    full: dict[float, list[float]] = {lr: [] for lr in full_lrs}
    for seed in ctx.seeds:
        for lr in full_lrs:
            full[lr].append(sft(work / f"full{lr:g}-s{seed}", base, seed, steps,
                                **{"method": "full", "train.lr": lr})["eval_loss"])
    base_lr = min(full_lrs, key=lambda lr: statistics.fmean(full[lr]))
    edge = len(full_lrs) > 1 and base_lr in (full_lrs[0], full_lrs[-1])
    # 2. LoRA at lr_ratio x that base rate
    loss: dict[float, list[float]] = {r: [] for r in ratios}
    for seed in ctx.seeds:
        for r in ratios:
            s = sft(work / f"r{r:g}-s{seed}", base, seed, steps, **{"train.lr": base_lr, "lora.lr_ratio": r})
            loss[r].append(s["eval_loss"])
    means = {r: statistics.fmean(v) for r, v in loss.items()}
    best = min(means, key=means.get)
    # seed-paired comparison of the best guide ratio with the overall best
    guide = [r for r in ratios if 5.0 <= r <= 10.0]
    best_guide = min(guide, key=means.get) if guide else None
    n = len(ctx.seeds)
    if best_guide is None:
        verdict_, gap, gap_se = "not measured", float("nan"), 0.0
    else:
        diffs = [a - b for a, b in zip(loss[best_guide], loss[best])]
        gap = statistics.fmean(diffs)
        gap_se = statistics.stdev(diffs) / n ** 0.5 if n > 1 else 0.0
        verdict_, _ = verdict(loss)
    plots = []
    fig, ax = subplots(figsize=(5.5, 3.5))
    for i in range(n):
        ax.plot(ratios, [loss[r][i] for r in ratios], "o-", color="0.7", lw=0.8, ms=3)
    ax.errorbar(ratios, [means[r] for r in ratios],
                yerr=[statistics.stdev(loss[r]) if n > 1 else 0.0 for r in ratios], fmt="o-", color="tab:blue",
                capsize=3, label=f"mean of {n} seeds")
    ax.axvspan(5, 10, color="tab:green", alpha=0.15, label="guide: 5-10x")
    ax.axhline(base_loss, color="tab:red", ls=":", label="base, untuned")
    ax.set_xscale("log")
    ax.set_xlabel("LoRA lr / base lr")
    ax.set_ylabel("held-out instruction loss")
    ax.legend(fontsize=8)
    plots.append(save_png(fig, ctx.out_dir, "lora_lr.png"))
    ms = [Measurement(f"held-out loss at lr_ratio {r:g}", loss[r], "nats/token",
                      "best" if 5.0 <= r <= 10.0 else None) for r in ratios]
    ms += [Measurement(f"full fine-tuning held-out loss at lr {lr:g}", full[lr], "nats/token") for lr in full_lrs]
    ms.insert(0, Measurement("best lr_ratio (per seed)",
                             [float(min(ratios, key=lambda r, i=i: loss[r][i])) for i in range(n)], "x", "5-10x"))
    return Result(
        measurements=ms,
        verdict=verdict_,
        summary=(f"with the base rate {base_lr:g} (best full fine-tuning lr), LoRA's held-out loss is lowest at lr_ratio {best:g} ({means[best]:.3f}); the best guide ratio "
                 f"{best_guide:g} is {gap:+.3f} ± {gap_se:.3f} from it (untuned base {base_loss:.3f}): "
                 + {"holds": "the guide's 5-10x is the best multiplier here",
                    "partly holds": "5-10x is within noise (or 0.5%) of the best multiplier, not clearly best",
                    "does not hold": "another multiplier is clearly better than 5-10x",
                    "not measured": "no ratio in 5-10 was run"}[verdict_]
                 + (" (the best full fine-tuning lr is at the edge of its grid, so the base rate is uncertain)"
                    if edge else "") + "."),
        setup=(f"base: Llama-style decoder 2 layers x d_model 64, BPE 1000, block 128, pretrained "
               f"{30 if ctx.quick else 600} steps on wiki_demo; LoRA r 16 alpha 32 dropout 0.1 on q/v, base lr "
               f"= the best full fine-tuning lr of {', '.join(f'{lr:g}' for lr in full_lrs)} (found: {base_lr:g}) x lr_ratio {', '.join(f'{r:g}' for r in ratios)}, {steps} steps of batch 8 "
               "(10% warmup, cosine to 0.1x) on alpaca_en_demo, loss on responses only, held-out loss over 50 "
               "conversations; full fine-tuning runs use the same steps and schedule; seeds vary adapter init, data order and the held-out split. 'holds' = best mean loss in 5-10x."),
        plots=plots,
    )


CLAIM = Claim(
    id="lora-lr",
    section="§3.2",
    guide_zh="训练技巧:学习率设为基模型学习率的5-10倍,批大小可适当减小",
    guide_en="Training tip: set the learning rate to 5-10x the base model's learning rate; the batch size can be reduced.",
    claimed="LoRA lr 5-10x the base lr",
    run=run,
    minutes=4.5,
)
