"""§1.2: attention heads = hidden size / 64 (768 -> 12 heads).

At a fixed width (d_model 128) and everything else equal, a character-level decoder is pretrained with
`llmkit.train.pretrain.pretrain` on tinyshakespeare for the same number of steps with head sizes 16, 32, 64
and 128 (8 / 4 / 2 / 1 heads), 3 seeds each; the validation loss at the end and the training tokens/s are
compared. The guide's rule picks head size 64 (2 heads at d 128): does it win, or tie within the noise?
"""

from __future__ import annotations

import shutil
import statistics

from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result
from llmkit.lab.plots import bars

D_MODEL = 128
HEAD_DIMS = [16, 32, 64, 128]



def verdict(val_loss: dict[int, list[float]]) -> tuple[str, str]:
    """(verdict, reason) from the validation loss per head size (one value per seed): head size 64 must be the
    best or tie with it within the mean seed-to-seed std (within 2 std: partly)."""
    import statistics

    if 64 not in val_loss or len(val_loss) < 2:
        return "not measured", "head size 64 and at least one other size are needed"
    means = {h: statistics.fmean(v) for h, v in val_loss.items()}
    best = min(means, key=means.get)
    pooled = statistics.fmean([statistics.stdev(v) if len(v) > 1 else 0.0 for v in val_loss.values()]) or 1e-3
    gap = means[64] - means[best]
    if gap <= pooled:
        return "holds", f"head size 64 is within one std ({pooled:.4f}) of the best (head size {best})"
    if gap <= 2 * pooled:
        return "partly holds", f"head size 64 trails the best (head size {best}) by {gap:.4f}, within 2 std"
    return "does not hold", f"head size 64 trails the best (head size {best}) by {gap:.4f}, beyond 2 std"

def run(ctx: ExperimentContext) -> Result:
    from llmkit.lab.common import char_corpus, tiny_pretrain

    text_file, tok_dir = char_corpus(ctx.out_dir.parent / "_shared" / "char", 100_000 if ctx.quick else None)
    steps = 10 if ctx.quick else 400
    head_dims = [32, 64] if ctx.quick else HEAD_DIMS
    work = ctx.out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    prepared = work / "prepared"  # tokenized once, shared by every run
    loss: dict[int, list[float]] = {h: [] for h in head_dims}
    tps: dict[int, list[float]] = {h: [] for h in head_dims}
    for seed in ctx.seeds:
        for h in head_dims:
            s = tiny_pretrain(work / f"hd{h}_s{seed}", text_file, tok_dir, seed, steps, model__d_model=D_MODEL,
                              model__n_head=D_MODEL // h, model__n_layer=2, model__block_size=64,
                              train__batch_size=8, train__eval_batches=20, data__prepared=prepared)
            loss[h].append(float(s["val_loss"]))
            tps[h].append(float(s["tokens_per_s"] or 0.0))
    ms = [Measurement(f"val loss, head size {h} ({D_MODEL // h} heads)", loss[h], "nats/char",
                      "best at 64" if h == 64 else None) for h in head_dims]
    ms += [Measurement(f"training tokens/s, head size {h}", tps[h], "tok/s") for h in head_dims]
    means = {h: statistics.fmean(v) for h, v in loss.items()}
    best = min(means, key=means.get)
    pooled = statistics.fmean([statistics.stdev(v) if len(v) > 1 else 0.0 for v in loss.values()]) or 1e-3
    gap = means.get(64, float("inf")) - means[best]
    decided, _ = verdict(loss)
    plots = [bars(ctx.out_dir, "val_loss_by_head_size", [f"{h} ({D_MODEL // h}h)" for h in head_dims],
                  [loss[h] for h in head_dims], "validation loss (nats/char)",
                  f"d_model {D_MODEL}, {steps} steps: head size sweep"),
             bars(ctx.out_dir, "tokens_per_s_by_head_size", [f"{h} ({D_MODEL // h}h)" for h in head_dims],
                  [tps[h] for h in head_dims], "training tokens/s", "Throughput by head size (CPU)")]
    summary = (f"At d_model {D_MODEL} the lowest validation loss came from head size {best} ({means[best]:.3f}); "
               + (f"head size 64 ({means[64]:.3f}) is {gap:.3f} behind, against a seed-to-seed std of {pooled:.3f}, "
                  f"so d/64 {'ties with the best' if gap <= pooled else 'is close but not tied' if gap <= 2 * pooled else 'loses'}; "
                  if 64 in means else "head size 64 was not in this run; ")
               + "throughput " + ", ".join(f"{h}: {statistics.fmean(tps[h]):.0f}" for h in head_dims) + " tok/s.")
    setup = (f"llmkit pretrain, char-level tinyshakespeare (90/10 split), Decoder d_model {D_MODEL}, 2 layers, block 64, "
             f"learned positions, gelu, no dropout, batch 8, {steps} steps, lr 2e-3 cosine to 2e-4, head sizes {head_dims}; "
             f"val loss over 20 random batches at the end; tokens/s as pretrain reports it (noisy when other processes "
             f"share the cores); seeds {list(ctx.seeds)}.")
    return Result(ms, decided, summary, setup, plots)


CLAIM = Claim(
    id="heads", section="§1.2",
    guide_zh="注意力头数按隐藏层维度/64计算(如768维对应12个头)",
    guide_en="Set the number of attention heads to hidden size / 64 (e.g. 768 -> 12 heads).",
    claimed="head size 64 (heads = d/64)", run=run, minutes=2.0)
