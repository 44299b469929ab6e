"""§2.2: FP32 -> INT8 weights shrink the model by 75% and decode 2-3x faster (calibrate the ranges).

With llmkit's own quantizer (`llmkit.infer.quantize.quantize_model`, `QuantConfig`):
* size, of the whole model: the bytes of the weights file (`model.safetensors` written by `save_model` /
  `save_quantized`) and the bytes of every tensor a forward pass reads (parameters and buffers, embeddings
  and the fp32 output head included) before and after; Linear weight bytes alone are reported as context
  (int8 + scales vs fp32 is -75% by definition);
* speed: batch-1 greedy decoding with the `Engine` (`llmkit.infer.bench.bench_generate`) of a random-init
  GPT-2-style decoder (d 512, 6 layers, biases, gelu_tanh; vocab 8192 so the fp32 tied head — not
  quantized — does not dominate; GPT-2 small's d 768 x 12 layers does not fit the time budget on 2 cores), fp32 vs each INT8 mode, on this CPU;
* calibration: a char-level decoder trained for a few hundred steps on tinyshakespeare, perplexity on the
  held-out last 10% of the text for fp32, dynamic, weight-only and static activation scales — calibrated on
  real text windows (minmax / percentile / histogram observers) vs an uncalibrated static baseline: the
  default (min/max) observers run on one batch of random token ids instead of calibration data.
Seeds change the random model and prompts (speed) and the calibration / evaluation windows (quality).
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import torch

from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result
from llmkit.lab.plots import bars

SPEED_CONFIG = dict(vocab_size=8192, block_size=256, n_layer=6, d_model=512, n_head=8, activation="gelu_tanh",
                    bias=True)
SIZE_CLAIM = 75.0
SIZE_TOLERANCE = 3.0  # points around -75% that count as the guide's figure
SPEED_RANGE = (2.0, 3.0)
CALIBRATION_MARGIN = 0.5  # perplexity-change points the uncalibrated baseline must lose beyond calibrated + noise


def verdict(file_saved_pct: list[float], best_speedup: list[float], calibrated_ppl_pct: list[float],
            uncalibrated_ppl_pct: list[float]) -> tuple[str, str]:
    """(verdict, reason) from the whole-model weights-file saving (%), the best INT8 decode speedup (x), and the
    perplexity change (%) of the best calibrated and of the uncalibrated static INT8, one value per seed each."""
    import statistics as st

    if not file_saved_pct or not best_speedup or not calibrated_ppl_pct or not uncalibrated_ppl_pct:
        return "not measured", "a measurement is missing"
    size = st.fmean(file_saved_pct)
    size_ok = abs(size - SIZE_CLAIM) <= SIZE_TOLERANCE
    speed = st.fmean(best_speedup)
    speed_ok = speed >= SPEED_RANGE[0]
    cal, uncal = st.fmean(calibrated_ppl_pct), st.fmean(uncalibrated_ppl_pct)
    noise = max(st.stdev(calibrated_ppl_pct) if len(calibrated_ppl_pct) > 1 else 0.0,
                st.stdev(uncalibrated_ppl_pct) if len(uncalibrated_ppl_pct) > 1 else 0.0)
    calib_ok = uncal > cal + CALIBRATION_MARGIN + noise
    reason = (f"whole model {size:.1f}% smaller ({'matches' if size_ok else 'not'} -75%), best decode speedup "
              f"{speed:.2f}x ({'reaches' if speed_ok else 'below'} 2x), uncalibrated static INT8 {uncal:+.2f}% "
              f"perplexity vs {cal:+.2f}% calibrated ({'calibration matters' if calib_ok else 'no clear difference'})")
    parts = [size_ok, speed_ok, calib_ok]
    if all(parts):
        return "holds", reason
    if not any(parts):
        return "does not hold", reason
    return "partly holds", reason


def forward_read_bytes(model) -> int:
    """Bytes of every distinct tensor storage (parameters and buffers) the model's forward pass reads."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def weights_file_bytes(model, out_dir) -> int:
    """Size of the model's serialized weights file (model.safetensors) as llmkit writes it."""
    import shutil

    from llmkit.infer.quantize import Int8Linear, save_quantized
    from llmkit.models.io import save_model

    shutil.rmtree(out_dir, ignore_errors=True)
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        save_quantized(model, out_dir)
    else:
        save_model(model, out_dir)
    size = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))
    shutil.rmtree(out_dir, ignore_errors=True)
    return size


def _variants():
    from llmkit.infer.quantize import QuantConfig

    return {"dynamic": QuantConfig(mode="dynamic"), "weight_only": QuantConfig(mode="weight_only"),
            "static": QuantConfig(mode="static", observer="histogram")}


def _engine(model, prompt_len: int, new: int, seed: int):
    from llmkit.infer.bench import random_prompts
    from llmkit.infer.engine import Engine, RequestParams

    engine = Engine(model, max_batch=1, max_len=prompt_len + new, prefix_cache_tokens=0)
    engine.generate(random_prompts(1, 8, model.config.vocab_size, seed + 99),
                    RequestParams(max_new_tokens=4, temperature=0, stop_at_eos=False))  # warm-up
    return engine


def _decode_seconds(engine, prompt_len: int, new: int, seed: int) -> float:
    """Seconds of batch-1 decoding after the first token, through the Engine."""
    from llmkit.infer.bench import _engine_run, random_prompts
    from llmkit.infer.engine import RequestParams

    greedy = RequestParams(max_new_tokens=new, temperature=0, stop_at_eos=False)
    prompts = random_prompts(1, prompt_len, engine.model.config.vocab_size, seed)
    return _engine_run(engine, prompts, greedy)[2]


def speedups(models: dict, prompt_len: int, new: int, seed: int, reps: int) -> dict[str, float]:
    """Per variant, the median over `reps` rounds of fp32 decode time / its decode time, each round timing
    fp32 and every variant back to back (so load from other processes hits both sides alike)."""
    import statistics

    engines = {k: _engine(m, prompt_len, new, seed) for k, m in models.items()}
    ratios: dict[str, list[float]] = {k: [] for k in models if k != "fp32"}
    for r in range(reps):
        t = {k: _decode_seconds(e, prompt_len, new, seed + r) for k, e in engines.items()}
        for k in ratios:
            ratios[k].append(t["fp32"] / t[k])
    return {k: statistics.median(v) for k, v in ratios.items()}


@torch.no_grad()
def _loss(model, windows: list[torch.Tensor]) -> float:
    total = 0.0
    for w in windows:
        _, loss = model(w[:, :-1], w[:, 1:])
        total += float(loss)
    return total / len(windows)


def _windows(ids: list[int], block: int, n: int, rng: random.Random) -> list[torch.Tensor]:
    starts = [rng.randrange(0, len(ids) - block - 1) for _ in range(n)]
    return [torch.tensor(ids[s:s + block + 1])[None] for s in starts]


def run(ctx: ExperimentContext) -> Result:
    from llmkit.infer.quantize import QuantConfig, linear_weight_bytes, quantize_model
    from llmkit.lab.common import char_corpus, tiny_pretrain
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    prompt_len, new = (16, 8) if ctx.quick else (32, 32)
    cfg = dict(SPEED_CONFIG, n_layer=2, d_model=128, n_head=2) if ctx.quick else SPEED_CONFIG
    size_saved, speed = [], {k: [] for k in _variants()}
    file_saved, read_saved = [], []
    for seed in ctx.seeds:
        torch.manual_seed(seed)
        fp32 = Decoder(DecoderConfig(**cfg)).eval()
        before = linear_weight_bytes(fp32)["total"]
        models = {"fp32": fp32}
        for name, qc in _variants().items():
            calib = [torch.randint(0, cfg["vocab_size"], (1, 32))] if qc.mode == "static" else None
            models[name] = quantize_model(copy.deepcopy(fp32), qc, calib)
        size_saved.append(100.0 * (1 - linear_weight_bytes(models["dynamic"])["total"] / before))
        size_dir = ctx.out_dir / "work" / "size"
        file_saved.append(100.0 * (1 - weights_file_bytes(models["dynamic"], size_dir / "int8")
                                   / weights_file_bytes(fp32, size_dir / "fp32")))
        read_saved.append(100.0 * (1 - forward_read_bytes(models["dynamic"]) / forward_read_bytes(fp32)))
        for name, ratio in speedups(models, prompt_len, new, seed, 2 if ctx.quick else 3).items():
            speed[name].append(ratio)

    # quality: a small trained char model
    text_file, tok_dir = char_corpus(ctx.out_dir.parent / "_shared" / "char", 100_000 if ctx.quick else None)
    steps = 30 if ctx.quick else 250
    model_dir = ctx.out_dir / "work" / f"char_model_{steps}"
    if not (model_dir / "final" / "config.json").is_file():
        import shutil

        shutil.rmtree(model_dir, ignore_errors=True)
        tiny_pretrain(model_dir, text_file, tok_dir, 0, steps, model__d_model=128, model__n_head=2,
                      model__n_layer=2, model__block_size=64, train__batch_size=16)
    trained = load_model(model_dir / "final").eval()
    tok = Tokenizer.load(tok_dir)
    ids = tok.encode(text_file.read_text(encoding="utf-8"))
    cut = int(0.9 * len(ids))
    train_ids, val_ids = ids[:cut], ids[cut:]
    block = trained.config.block_size - 1
    quality = {"dynamic": QuantConfig(mode="dynamic"), "weight_only": QuantConfig(mode="weight_only"),
               "static minmax (calibrated)": QuantConfig(mode="static", observer="minmax"),
               "static percentile (calibrated)": QuantConfig(mode="static", observer="percentile"),
               "static histogram (calibrated)": QuantConfig(mode="static", observer="histogram"),
               "static minmax (uncalibrated: one random batch)": QuantConfig(mode="static", observer="minmax")}
    ppl_delta: dict[str, list[float]] = {k: [] for k in quality}
    n_eval, n_cal = (4, 2) if ctx.quick else (24, 16)
    for seed in ctx.seeds:
        rng = random.Random(seed)
        val = _windows(val_ids, block, n_eval, rng)
        calib_real = [w[:, :-1] for w in _windows(train_ids, block, n_cal, rng)]
        g = torch.Generator().manual_seed(seed)
        calib_random = [torch.randint(0, tok.vocab_size, (1, block), generator=g)]  # one batch, no real text
        base = math.exp(_loss(trained, val))
        for name, qc in quality.items():
            calib = None if qc.mode != "static" else (calib_random if "random" in name else calib_real)
            q = quantize_model(copy.deepcopy(trained), qc, calib)
            ppl_delta[name].append(100.0 * (math.exp(_loss(q, val)) / base - 1.0))

    ms = [Measurement("whole model: weights file bytes saved (model.safetensors)", file_saved, "%", "-75%"),
          Measurement("whole model: bytes a forward pass reads, saved", read_saved, "%", "-75%"),
          Measurement("context: Linear weight bytes saved (int8 + scales; -75% by definition)", size_saved, "%")]
    ms += [Measurement(f"batch-1 decode speedup, {k}", v, "x", "2-3x") for k, v in speed.items()]
    ms += [Measurement(f"perplexity change, {k}", v, "%", "needs calibration" if "static" in k else None)
           for k, v in ppl_delta.items()]
    size_ok = abs(ms[0].mean - SIZE_CLAIM) <= SIZE_TOLERANCE
    speed_ms = ms[3:6]
    best = max(speed_ms, key=lambda m: m.mean)
    speed_ok = best.mean >= SPEED_RANGE[0]
    best_cal = min((k for k in ppl_delta if "(calibrated)" in k), key=lambda k: statistics_mean(ppl_delta[k]))
    uncal_key = next(k for k in ppl_delta if "uncalibrated" in k)
    calibrated, uncal = statistics_mean(ppl_delta[best_cal]), statistics_mean(ppl_delta[uncal_key])
    decided, reason = verdict(file_saved, best.values, ppl_delta[best_cal], ppl_delta[uncal_key])
    plots = [bars(ctx.out_dir, "decode_speedup", list(speed), list(speed.values()), "decode tok/s vs fp32 (x)",
                  f"INT8 batch-1 decode speedup on CPU (d {cfg['d_model']}, {cfg['n_layer']} layers)",
                  reference=SPEED_RANGE, ref_label="guide: 2-3x"),
             bars(ctx.out_dir, "perplexity_change", [k.replace(" (", "\n(") for k in ppl_delta],
                  list(ppl_delta.values()), "perplexity change vs fp32 (%)", "INT8 perplexity change vs fp32 (trained char model)")]
    summary = (f"INT8 (dynamic) shrinks the whole weights file by {ms[0].mean:.1f}% and the bytes a forward reads by "
               f"{ms[1].mean:.1f}% (the fp32 embeddings / output head stay; Linear weights alone: {ms[2].mean:.1f}%; "
               f"guide -75%: {'yes' if size_ok else 'no'}); batch-1 "
               f"decoding on this CPU runs {', '.join(f'{k} {v.mean:.2f}x' for k, v in zip(speed, speed_ms))} of fp32 speed "
               f"(guide 2-3x: {'reached' if speed_ok else 'not reached'}); static activation scales calibrated on real "
               f"text change perplexity by {calibrated:+.2f}% at best ({best_cal}) vs {uncal:+.2f}% with the default "
               f"observers on one random batch. Verdict: {reason}.")
    setup = (f"Size: the speed model's model.safetensors (save_model vs save_quantized, dynamic) and its distinct "
             f"parameter/buffer storages. Speed: random-init Decoder {cfg}, Engine greedy decoding at batch 1, median over 3 rounds of back-to-back fp32/INT8 timings, {prompt_len}-token prompt, {new} new "
             f"tokens, {torch.get_num_threads()} CPU threads, fp32 vs INT8 (dynamic / weight-only / static) on the same "
             f"weights. Quality: char-level decoder (d 128, 2 layers, block 64) trained {steps} steps on tinyshakespeare, "
             f"perplexity on {n_eval} random windows of the last 10% of the text, static scales from {n_cal} windows of "
             f"the first 90% (uncalibrated: minmax observers on one batch of random token ids). 'holds' needs all of: "
             f"whole-file saving within ±{SIZE_TOLERANCE:g} of 75%, a mode >= 2x, uncalibrated worse than calibrated by "
             f"> {CALIBRATION_MARGIN:g} points + seed std. Seeds {list(ctx.seeds)}.")
    return Result(ms, decided, summary, setup, plots)


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


CLAIM = Claim(
    id="int8", section="§2.2",
    guide_zh="量化压缩:将FP32权重转为INT8,模型体积减少75%,推理速度提升2-3倍(需校准量化范围)",
    guide_en="Quantization: FP32 weights to INT8 shrink the model by 75% and speed inference up 2-3x "
             "(the quantization ranges need calibration).",
    claimed="-75% size, 2-3x faster, calibrate", run=run, minutes=1.5)
