"""§5: dynamic routing (mixture of experts): at equal active parameters and equal training tokens, a mixture-of-
experts decoder reaches a lower held-out loss than a dense one, and its load-balancing loss keeps the experts
evenly loaded.

The guide names dynamic-routing architectures ("动态路由架构") as a lightweight-inference trend without a
figure; the claim measured here is the usual one for them, in numbers that can fail. Three contestants, each
trained by `llmkit.train.pretrain` (through `llmkit.lab.common.tiny_pretrain`) on character-level
tinyshakespeare (90/10 split), 4 layers of d_model 128, SwiGLU, RMSNorm, RoPE, `STEPS` steps of 16 x 64
characters, lr 2e-3; at a seed every contestant sees the same batches in the same order:

* dense: one SwiGLU MLP of d_ff `D_FF` (256) per layer;
* MoE: `EXPERTS` (8) SwiGLU experts of d_ff D_FF / TOP_K (128), top-`TOP_K` (2) routing, so each token computes
  D_FF hidden units like the dense model (active parameters equal up to the router's d_model x experts per
  layer), load-balancing loss 0.01 and router z-loss 0.001 (`MoEConfig`'s defaults);
* MoE without router losses (both coefficients 0): what the balancing loss buys.

Per contestant and seed: held-out loss (the same `EVAL_BATCHES` fixed validation batches for everyone), and
for the MoE models the experts' load on those batches (coefficient of variation of their shares, mean over
layers: 0 is perfectly even) and the router's entropy (nats; ln 8 = 2.08 is uniform); per contestant the
parameters (total and active per token, `Decoder.num_active_params`) and training tokens/s.

Verdict (`verdict`, fixed before the run), two halves:
* quality: the MoE's mean held-out loss is below the dense model's by more than `MARGIN` nats, and by more than
  `MARGIN` on a strict majority of the seeds (paired by seed: same data order);
* balance: the MoE's mean load CV is at most `MAX_LOAD_CV`, and below the no-router-losses MoE's on the mean
  and on a strict majority of the seeds.
"holds" if both halves hold, "partly holds" if one does, "does not hold" if neither; "not measured" when a
contestant is missing or the active parameters differ by more than `MAX_ACTIVE_GAP`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result
from llmkit.lab.plots import bars

MARGIN = 0.01  # nats: "lower" means lower by more than this (~0.5% of a ~1.9-nat char loss; seed std ~0.01)
MAX_LOAD_CV = 0.3  # "evenly loaded": coefficient of variation of the experts' load shares at most this
MAX_ACTIVE_GAP = 0.02  # active parameters of MoE and dense within 2% of each other, or the comparison is off
D_FF, EXPERTS, TOP_K = 256, 8, 2
STEPS, EVAL_BATCHES = 600, 32
QUICK_STEPS, QUICK_EVAL_BATCHES, QUICK_CHARS = 20, 4, 100_000

BASE = {"model__n_layer": 4, "model__d_model": 128, "model__n_head": 4, "model__activation": "swiglu",
        "model__norm": "rmsnorm", "model__positions": "rope", "model__block_size": 64, "train__lr": 2e-3,
        "train__min_lr": 2e-4, "train__batch_size": 16}
CONTESTANTS = {
    "dense": {"model__d_ff": D_FF},
    "moe": {"model__d_ff": D_FF // TOP_K, "model__moe": f"{{experts: {EXPERTS}, top_k: {TOP_K}}}"},
    "moe_free": {"model__d_ff": D_FF // TOP_K, "model__moe": f"{{experts: {EXPERTS}, top_k: {TOP_K}, "
                                                            "router_aux_loss: 0, router_z_loss: 0}"},
}
LABELS = {"dense": f"dense, d_ff {D_FF}",
          "moe": f"MoE {EXPERTS} x {D_FF // TOP_K}, top-{TOP_K}",
          "moe_free": f"MoE {EXPERTS} x {D_FF // TOP_K}, top-{TOP_K}, no router losses"}

METHOD = (f"llmkit pretrain on character-level tinyshakespeare (90/10 split), decoder 4 layers x d_model 128, "
          f"4 heads, SwiGLU, RMSNorm, RoPE, block 64, batch 16, lr 2e-3 cosine to 2e-4, {STEPS} steps, the same "
          f"data order for every contestant at a seed. Contestants: dense d_ff {D_FF}; MoE {EXPERTS} experts of "
          f"d_ff {D_FF // TOP_K}, top-{TOP_K} (the dense model's active MLP width), load-balancing loss 0.01 and "
          f"z-loss 0.001; the same MoE without router losses. Held-out loss over {EVAL_BATCHES} fixed validation "
          f"batches (the same for all); expert load CV (std / mean of the experts' shares, mean over layers) and "
          f"router entropy on those batches; parameters total and active per token; training tokens/s. 'holds': "
          f"MoE's mean held-out loss below dense's by more than {MARGIN} nats, and by more than {MARGIN} on a "
          f"strict majority of seeds, and MoE's load CV <= {MAX_LOAD_CV} and below the no-router-losses MoE's on "
          f"the mean and on a majority of seeds; 'partly holds': one of the two; 'does not hold': neither.")


def _majority(flags: list[bool]) -> bool:
    return sum(flags) * 2 > len(flags)


def verdict(dense: list[float], moe: list[float], moe_cv: list[float], free_cv: list[float],
            active_ratio: float = 1.0) -> tuple[str, str]:
    """(verdict, reason) from per-seed held-out losses (nats) of the dense and MoE decoders, the per-seed expert
    load CV of the MoE with router losses and of the MoE without them (same seed at the same index), and the
    MoE / dense active-parameter ratio (see the module docstring for the criterion)."""
    n = min(len(dense), len(moe), len(moe_cv), len(free_cv))
    if n == 0:
        return "not measured", "a contestant was not measured"
    if abs(active_ratio - 1.0) > MAX_ACTIVE_GAP:
        return "not measured", (f"MoE / dense active parameters {active_ratio:.3f}: not equal within "
                                f"{100 * MAX_ACTIVE_GAP:.0f}%, so the comparison is not the claim's")
    dense, moe, moe_cv, free_cv = dense[:n], moe[:n], moe_cv[:n], free_cv[:n]
    gaps = [d - m for d, m in zip(dense, moe)]
    gap = statistics.fmean(gaps)
    wins = sum(g > MARGIN for g in gaps)
    lower = gap > MARGIN and _majority([g > MARGIN for g in gaps])
    cv, free = statistics.fmean(moe_cv), statistics.fmean(free_cv)
    cv_wins = sum(c < f for c, f in zip(moe_cv, free_cv))
    balanced = cv <= MAX_LOAD_CV and cv < free and _majority([c < f for c, f in zip(moe_cv, free_cv)])
    reason = (f"held-out loss dense {statistics.fmean(dense):.3f}, MoE {statistics.fmean(moe):.3f} "
              f"(MoE lower by {gap:+.4f} nats, by more than {MARGIN} on {wins}/{n} seeds); expert load CV "
              f"{cv:.3f} with router losses vs {free:.3f} without (lower on {cv_wins}/{n} seeds, bound "
              f"{MAX_LOAD_CV})")
    if lower and balanced:
        return "holds", reason
    if lower:
        return "partly holds", reason + ": MoE is better, but its experts are not kept evenly loaded by the loss"
    if balanced:
        return "partly holds", reason + (f": the balancing loss keeps the load even, but MoE is not lower than "
                                         f"dense by more than {MARGIN} nats on the mean and most seeds")
    return "does not hold", reason + ": neither lower loss nor balance by the router losses"


def _router(summary: dict) -> dict:
    """The last evaluation's router statistics (moe_load_cv, moe_router_entropy) of a pretrain summary."""
    for row in reversed(summary.get("history") or []):
        if "moe_load_cv" in row:
            return row
    return {}


def run(ctx: ExperimentContext) -> Result:
    from llmkit.lab.common import char_corpus, tiny_pretrain
    from llmkit.models.io import load_model

    text_file, tok_dir = char_corpus(ctx.out_dir.parent / "_shared" / "char", QUICK_CHARS if ctx.quick else None)
    steps, eval_batches = (QUICK_STEPS, QUICK_EVAL_BATCHES) if ctx.quick else (STEPS, EVAL_BATCHES)
    work = ctx.out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)  # pretrain refuses to start over an earlier run's checkpoints
    prepared = work / "prepared"  # tokenized once, shared by every run
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    loss: dict[str, list[float]] = {k: [] for k in CONTESTANTS}
    tps: dict[str, list[float]] = {k: [] for k in CONTESTANTS}
    load_cv: dict[str, list[float]] = {"moe": [], "moe_free": []}
    entropy: dict[str, list[float]] = {"moe": [], "moe_free": []}
    params: dict[str, tuple[int, int]] = {}
    for seed in ctx.seeds:
        for name, extra in CONTESTANTS.items():
            s = tiny_pretrain(work / f"{name}-s{seed}", text_file, tok_dir, seed, steps,
                              **{**BASE, **extra, "train__eval_batches": eval_batches, "data__prepared": prepared})
            loss[name].append(float(s["val_loss"]))
            tps[name].append(float(s["tokens_per_s"] or 0.0))
            if name in load_cv:
                stats = _router(s)
                load_cv[name].append(float(stats.get("moe_load_cv", float("nan"))))
                entropy[name].append(float(stats.get("moe_router_entropy", float("nan"))))
            if name not in params:
                model = load_model(Path(s["final_model"]))
                params[name] = (sum(p.numel() for p in model.parameters()), model.num_active_params())
                del model
    train_s = time.perf_counter() - t0
    load_after = os.getloadavg()
    active_ratio = params["moe"][1] / params["dense"][1]
    decided, reason = verdict(loss["dense"], loss["moe"], load_cv["moe"], load_cv["moe_free"], active_ratio)

    gaps = [d - m for d, m in zip(loss["dense"], loss["moe"])]
    ms = [Measurement(f"held-out loss, {LABELS[k]}", loss[k], "nats/char",
                      "below dense at equal active params" if k == "moe" else None) for k in CONTESTANTS]
    free_gaps = [d - m for d, m in zip(loss["dense"], loss["moe_free"])]
    ms += [Measurement("held-out loss gain, dense - MoE (paired by seed)", gaps, "nats/char", f"> {MARGIN}"),
           Measurement("held-out loss gain, dense - MoE without router losses", free_gaps, "nats/char")]
    ms += [Measurement(f"expert load CV, {LABELS[k]}", load_cv[k], "",
                       f"<= {MAX_LOAD_CV} (evenly loaded)" if k == "moe" else None) for k in load_cv]
    ms += [Measurement(f"router entropy, {LABELS[k]}", entropy[k], "nats") for k in entropy]
    ms += [Measurement(f"training tokens/s, {LABELS[k]}", tps[k], "tok/s") for k in CONTESTANTS]
    ms += [Measurement("MoE / dense active parameters per token", [active_ratio], "x", "1 (equal)"),
           Measurement("MoE / dense total parameters", [params["moe"][0] / params["dense"][0]], "x")]
    quick = " (quick run, not evidence)" if ctx.quick else ""
    plots = [bars(ctx.out_dir, "loss_gain", [LABELS["moe"], LABELS["moe_free"]], [gaps, free_gaps],
                  "dense - MoE held-out loss (nats/char)", f"MoE's gain over dense, {steps} steps{quick}",
                  reference=MARGIN, ref_label=f"margin {MARGIN}"),
             bars(ctx.out_dir, "load_cv", [LABELS[k] for k in load_cv], [load_cv[k] for k in load_cv],
                  "expert load CV (0 = even)", f"Expert load with and without router losses{quick}",
                  reference=MAX_LOAD_CV, ref_label=f"bound {MAX_LOAD_CV}")]

    rows = ["| contestant | params (active per token) | held-out loss (per seed) | expert load CV | router entropy "
            "(nats) | training tok/s |", "|---|---|---|---|---|---|"]
    for k in CONTESTANTS:
        total, active = params[k]
        per_seed = " / ".join(f"{v:.3f}" for v in loss[k])
        cv = f"{statistics.fmean(load_cv[k]):.3f}" if k in load_cv else ""
        ent = f"{statistics.fmean(entropy[k]):.2f}" if k in entropy else ""
        rows.append(f"| {LABELS[k]} | {total / 1e6:.2f} M ({active / 1e6:.2f} M) | "
                    f"{statistics.fmean(loss[k]):.3f} ({per_seed}) | {cv} | {ent} | {statistics.fmean(tps[k]):,.0f} |")
    details = ("Means over seeds (per-seed held-out losses in brackets, in seed order); load CV and entropy on the "
               "held-out batches of the final evaluation.\n\n" + "\n".join(rows))
    m = {k: statistics.fmean(v) for k, v in loss.items()}
    summary = (f"At {active_ratio:.3f}x the dense model's active parameters ({params['moe'][0] / params['dense'][0]:.1f}x "
               f"its total) and the same {steps} x {BASE['train__batch_size'] * BASE['model__block_size']} training characters, the {EXPERTS}-expert top-{TOP_K} MoE "
               f"reaches a held-out loss of {m['moe']:.3f} against dense {m['dense']:.3f} nats/char (without router "
               f"losses {m['moe_free']:.3f}); its expert load CV is {statistics.fmean(load_cv['moe']):.3f} with the "
               f"router losses and {statistics.fmean(load_cv['moe_free']):.3f} without; it trains at "
               f"{statistics.fmean(tps['moe']) / statistics.fmean(tps['dense']):.2f}x the dense tokens/s. "
               f"Verdict: {reason}.")
    if ctx.quick:
        summary = "Quick run (not evidence). " + summary
    setup = (METHOD.replace(f"{STEPS} steps", f"{steps} steps").replace(f"over {EVAL_BATCHES} fixed",
                                                                        f"over {eval_batches} fixed")
             + (f" Quick run: the first {QUICK_CHARS} characters only." if ctx.quick else "")
             + f" Training took {train_s:.0f} s on {torch.get_num_threads()} thread(s). Load average "
               f"(1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after. Seeds {list(ctx.seeds)}.")
    return Result(ms, decided, summary, setup, plots, details=details)


CLAIM = Claim(
    id="moe", section="§5",
    guide_zh="轻量化推理:模型蒸馏、动态路由架构",
    guide_en="Lightweight inference: model distillation and dynamic-routing architectures (here: at equal active "
             "parameters and equal training tokens, a mixture-of-experts decoder reaches a lower held-out loss "
             "than a dense one, and its load-balancing loss keeps the experts evenly loaded).",
    claimed="MoE loss < dense at equal active params; experts evenly loaded", run=run, minutes=8.0)
