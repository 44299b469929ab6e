"""§1.2: GeLU instead of ReLU gives 0.5-1.5% more training stability.

The same small decoder is pretrained on tinyshakespeare (character level) with `model.activation` gelu
and relu, several seeds each, at a deliberately high learning rate with gradient clipping off, so that
instability has a chance to show. "Stability" is not defined by the guide; three readings are measured:
the final validation loss (lower is better), the number of loss spikes (a step whose training loss
exceeds the median of the previous 20 steps by more than 15%) and the spread of the final loss over
seeds, and the roughness of the training loss (std of step-to-step changes over the second half, in %
of the loss). The guide's 0.5-1.5% is compared with the relative final-loss difference (relu - gelu) / relu.
"""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path

from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result
from llmkit.lab.plots import save_png, subplots

SHAKESPEARE = Path(__file__).resolve().parents[5] / "shared" / "data" / "en" / "tinyshakespeare.txt"
SPIKE_WINDOW = 20
SPIKE_RATIO = 1.15


def shakespeare_path() -> Path:
    """The tinyshakespeare text (../shared/data beside the checkout, else data/samples)."""
    for p in (SHAKESPEARE, Path(__file__).resolve().parents[4] / "data" / "samples" / "en" / "tinyshakespeare.txt"):
        if p.is_file():
            return p
    raise FileNotFoundError(f"tinyshakespeare.txt not found at {SHAKESPEARE} (run `llmkit samples fetch`)")


def char_setup(root: Path, chars: int | None = None) -> tuple[Path, Path]:
    """(text file, char tokenizer dir) for tinyshakespeare (its first `chars` characters), made once under root."""
    from llmkit.tokenizer import Tokenizer, train_char

    root.mkdir(parents=True, exist_ok=True)
    text_file, tok_dir = root / "shakespeare.txt", root / "tok"
    if not text_file.is_file():
        text = shakespeare_path().read_text(encoding="utf-8")
        text_file.write_text(text[:chars] if chars else text, encoding="utf-8")
    try:
        Tokenizer.load(tok_dir)
    except Exception:
        train_char([text_file.read_text(encoding="utf-8")]).save(tok_dir)
    return text_file, tok_dir


def char_pretrain(out: Path, text_file: Path, tok_dir: Path, seed: int, **overrides) -> dict:
    """`llmkit.train.pretrain.pretrain` of a small char-level decoder on CPU; returns its summary."""
    import torch

    from llmkit.config import load_config
    from llmkit.train.pretrain import PretrainConfig, pretrain

    ov = {"out_dir": out, "data.inputs": f"[{text_file}]", "data.tokenizer": tok_dir,
          "data.prepared": text_file.parent / "tokens",
          "model.n_layer": 2, "model.d_model": 64, "model.n_head": 4, "model.block_size": 64, "model.dropout": 0.0,
          "train.batch_size": 16, "train.max_steps": 300, "train.warmup_steps": 10, "train.lr": 3e-3,
          "train.min_lr": 3e-4, "train.eval_interval": 100000, "train.eval_batches": 20, "train.log_interval": 1,
          "train.checkpoint_interval": 100000, "train.keep_checkpoints": 1, "train.progress": False,
          "train.device": "cpu", "train.seed": seed, "track.enabled": False}
    ov.update(overrides)
    shutil.rmtree(out, ignore_errors=True)  # a rerun starts fresh (pretrain refuses old checkpoints)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared 2-core box
    try:
        return pretrain(load_config(PretrainConfig, None, [f"{k}={v}" for k, v in ov.items()]))
    finally:
        torch.set_num_threads(threads)


def count_spikes(losses: list[float], window: int = SPIKE_WINDOW, ratio: float = SPIKE_RATIO) -> int:
    """Steps whose loss exceeds `ratio` x the median of the previous `window` losses."""
    return sum(1 for i in range(window, len(losses))
               if losses[i] > ratio * statistics.median(losses[i - window:i]))


def roughness(losses: list[float]) -> float:
    """Std of the step-to-step loss changes over the second half of training, in % of the mean loss there."""
    tail = losses[len(losses) // 2:]
    diffs = [b - a for a, b in zip(tail, tail[1:])]
    return 100.0 * statistics.pstdev(diffs) / statistics.fmean(tail) if len(diffs) > 1 else 0.0


def paired_better(a: list[float], b: list[float]) -> bool:
    """Is a lower than b by more than 2 standard errors of the paired difference (any difference for one pair)?"""
    d = [y - x for x, y in zip(a, b)]
    if len(d) < 2:
        return statistics.fmean(d) > 0
    return statistics.fmean(d) > 2 * statistics.stdev(d) / len(d) ** 0.5


def verdict(final: dict[str, list[float]], spikes: dict[str, list[float]],
            rough: dict[str, list[float]]) -> tuple[str, str]:
    """(verdict, reason) from per-seed readings of "gelu" and "relu" (same seed at the same index): final
    validation loss, loss spikes and roughness. 'holds' needs GeLU better beyond 2 paired standard errors,
    by 0.5-3% of ReLU's loss, and no more spikes; 'partly' = better on the loss or steadier beyond noise."""
    rel = [100.0 * (r - g) / r for g, r in zip(final["gelu"], final["relu"])]
    if not rel:
        return "not measured", "no seed ran both activations"
    m_rel = statistics.fmean(rel)
    gelu_better = paired_better(final["gelu"], final["relu"])
    spikes_fewer = statistics.fmean([r - g for g, r in zip(spikes["gelu"], spikes["relu"])]) >= 0
    steadier = paired_better(rough["gelu"], rough["relu"]) or paired_better(spikes["gelu"], spikes["relu"])
    if gelu_better and 0.5 <= m_rel <= 3.0 and spikes_fewer:
        return "holds", f"GeLU's loss is {m_rel:.2f}% lower beyond noise with no more spikes"
    if gelu_better or steadier:
        return "partly holds", (f"GeLU is better beyond noise on {'the final loss' if gelu_better else 'steadiness'}"
                                f" ({m_rel:+.2f}% loss), not by the guide's 0.5-3% with no more spikes")
    return "does not hold", f"GeLU's loss differs by {m_rel:+.2f}%, within seed noise, and it is not steadier"


def run(ctx: ExperimentContext) -> Result:
    steps = 40 if ctx.quick else 800
    lr = 2e-2
    work = ctx.out_dir / "work"
    from llmkit.tokenizer import Tokenizer

    text_file, tok_dir = char_setup(work / "data", chars=100_000 if ctx.quick else None)
    curves: dict[str, list[list[float]]] = {"gelu": [], "relu": []}
    final: dict[str, list[float]] = {"gelu": [], "relu": []}
    spikes: dict[str, list[float]] = {"gelu": [], "relu": []}
    rough: dict[str, list[float]] = {"gelu": [], "relu": []}
    diverged = {"gelu": 0, "relu": 0}
    for seed in ctx.seeds:
        for act in ("gelu", "relu"):
            s = char_pretrain(work / f"{act}-{seed}", text_file, tok_dir, seed, **{
                "model.activation": act, "train.max_steps": steps, "train.lr": lr, "train.min_lr": lr / 10,
                "train.grad_clip": 0.0, "train.eval_batches": 4 if ctx.quick else 40})
            losses = [r["loss"] for r in s["history"] if "loss" in r]
            curves[act].append(losses)
            val = s["val_loss"]
            if val is None or not math.isfinite(val):  # diverged: count it as the uniform predictor's loss
                val = math.log(Tokenizer.load(tok_dir).vocab_size)
                diverged[act] += 1
            final[act].append(val)
            spikes[act].append(float(count_spikes(losses)))
            rough[act].append(roughness(losses))
    rel = [100.0 * (r - g) / r for g, r in zip(final["gelu"], final["relu"])]
    m_rel = statistics.fmean(rel)
    sd_rel = statistics.stdev(rel) if len(rel) > 1 else 0.0
    std_g = statistics.stdev(final["gelu"]) if len(rel) > 1 else 0.0
    std_r = statistics.stdev(final["relu"]) if len(rel) > 1 else 0.0
    verdict_, _ = verdict(final, spikes, rough)
    plots = []
    fig, ax = subplots(figsize=(6, 3.5))
    for act, color in (("gelu", "tab:blue"), ("relu", "tab:red")):
        for i, c in enumerate(curves[act]):
            ax.plot(range(1, len(c) + 1), c, color=color, alpha=0.5, lw=0.8, label=act if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/char)")
    ax.set_title(f"GeLU vs ReLU, lr {lr:g}, no grad clipping ({len(ctx.seeds)} seeds)")
    ax.legend()
    plots.append(save_png(fig, ctx.out_dir, "activation_loss.png"))
    g_mean, r_mean = statistics.fmean(final["gelu"]), statistics.fmean(final["relu"])
    return Result(
        measurements=[
            Measurement("final val loss improvement of GeLU over ReLU, (relu - gelu) / relu", rel, "%", "+0.5-1.5%"),
            Measurement("final val loss, GeLU", final["gelu"], "nats/char"),
            Measurement("final val loss, ReLU", final["relu"], "nats/char"),
            Measurement("loss spikes, GeLU", spikes["gelu"], "steps"),
            Measurement("loss spikes, ReLU", spikes["relu"], "steps"),
            Measurement("training-loss roughness, GeLU", rough["gelu"], "%"),
            Measurement("training-loss roughness, ReLU", rough["relu"], "%"),
        ],
        verdict=verdict_,
        summary=(f"GeLU ends at val loss {g_mean:.3f} vs ReLU {r_mean:.3f} ({m_rel:+.2f}% ± {sd_rel:.2f}, guide "
                 f"+0.5-1.5%); spikes {statistics.fmean(spikes['gelu']):.1f} vs {statistics.fmean(spikes['relu']):.1f} "
                 f"per run; roughness {statistics.fmean(rough['gelu']):.2f}% vs {statistics.fmean(rough['relu']):.2f}%; "
                 f"seed spread {std_g:.3f} vs {std_r:.3f}"
                 + (f"; diverged runs {diverged['gelu']} vs {diverged['relu']}" if any(diverged.values()) else "")
                 + ": "
                 + {"holds": "GeLU is better by about the guide's margin",
                    "partly holds": "GeLU is measurably better on one reading of stability, not by the guide's margin "
                                    "on all",
                    "does not hold": "no advantage for GeLU beyond the seed-to-seed noise at this scale"}[verdict_] + "."),
        setup=(f"char-level tinyshakespeare ({'100k chars' if ctx.quick else '1.1 MB'}, 90/10 split), decoder 2 layers "
               f"x d_model 64 x 4 heads, block 64, batch 16, {steps} steps, AdamW lr {lr:g} (10 warmup, cosine to "
               f"lr/10), grad clipping off, dropout 0; activation gelu vs relu, same seed per pair; spike = loss > "
               f"{SPIKE_RATIO:g} x median of the previous {SPIKE_WINDOW} steps; 'holds' needs GeLU better by more than "
               "2 standard errors (paired by seed), 0.5-3% (up to twice the guide's top figure) and no more spikes; "
               "'partly' = better beyond noise on final loss, spikes or roughness (std of step-to-step loss changes in "
               "the second half, % of the loss)."),
        plots=plots,
    )


CLAIM = Claim(
    id="activation",
    section="§1.2",
    guide_zh="激活函数优先选择GeLU而非ReLU,可提升0.5-1.5%的训练稳定性",
    guide_en="Prefer GeLU over ReLU as the activation function: it improves training stability by 0.5-1.5%.",
    claimed="+0.5-1.5% training stability",
    run=run,
    minutes=3.0,
)
