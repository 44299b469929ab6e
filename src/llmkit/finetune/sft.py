"""Supervised fine-tuning of a pretrained decoder: full, LoRA or prefix tuning, on instructions (guide §3).

    base model dir -> method (full: every weight trains; lora: low-rank adapters on chosen projections;
    prefix: learned per-layer key/value prefixes) -> instruction data in the chat template, loss on the
    responses only, pretraining windows mixed in (guide §3.3: 10-20% against catastrophic forgetting)
    -> AdamW + warmup/cosine (adapter parameters at lr_ratio x lr, guide §3.2: 5-10x)
    -> loop { step, log, eval (held-out loss, exact match / ROUGE-L of greedy answers, samples at
    temperature 0.7, top-p 0.9), checkpoint } -> final/ (full: a model dir; lora / prefix: an adapter dir
    in PEFT's layout) + results.json

Resume is exact for all three methods: a checkpoint holds the trainable weights, optimizer, scheduler,
RNG and the data iterator's position, so a resumed run's losses equal an uninterrupted run's.
SIGTERM / Ctrl-C write a checkpoint at the current step and end the run cleanly (exit 0).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from llmkit.config import flatten, save_config, to_dict
from llmkit.data.tokenized import file_sha256
from llmkit.finetune.sft_data import InstructDataConfig
from llmkit.models.lora import LoRAConfig
from llmkit.models.prefix import PrefixConfig
from llmkit.track import TrackConfig, Tracker
from llmkit.train.checkpoint import load_latest_checkpoint, save_checkpoint
from llmkit.train.preemption import StopSignal
from llmkit.train.schedule import warmup_cosine
from llmkit.train.trainer import resolve_precision, rng_state, set_rng_state, truncate_metrics

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


@dataclass
class SFTTrainConfig:
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 300
    lr: float = 3e-5
    """Learning rate of the base weights (full fine-tuning); adapters train at lr x lr_ratio."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 20
    decay_steps: int | None = None
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_interval: int = 100
    log_interval: int = 10
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    seed: int = 1337
    progress: bool = True

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval",
                     "checkpoint_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"lr / min_lr_ratio: need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, "
                             f"{self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps / grad_clip: must be >= 0")


@dataclass
class SFTEvalConfig:
    answers: int = 20
    """Held-out single-turn prompts answered greedily for exact match and ROUGE-L (0 disables)."""
    samples: int = 3
    """Held-out prompts answered by sampling (logged as text, the guide's defaults below)."""
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    loss_batches: int | None = None
    """Held-out batches for the eval loss; None = all held-out examples."""
    baseline: bool = False
    """Also answer the same held-out prompts with the base model before training (results.json "baseline",
    kept in baseline.json across a resume): the before / after comparison."""


@dataclass
class SFTConfig:
    task: Literal["sft"] = "sft"
    out_dir: str = "runs/sft"
    base_model: str = ""
    """A pretrained llmkit model directory: a decoder (GPT / Llama style) or an encoder-decoder (T5 style)."""
    method: Literal["full", "lora", "prefix"] = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    data: InstructDataConfig = field(default_factory=InstructDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    eval: SFTEvalConfig = field(default_factory=SFTEvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def validate(self) -> None:
        if not self.base_model:
            raise ValueError("base_model: required (a pretrained llmkit model directory)")


# -- model ------------------------------------------------------------------------------------------
def prepare_model(cfg: SFTConfig, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter],
                                                                  list[torch.nn.Parameter]]:
    """The base model with the method applied: (model, base params that train, adapter params that train)."""
    from llmkit.models.io import load_model

    model = load_model(cfg.base_model)
    if model.config.FAMILY not in ("decoder", "encdec"):
        raise ValueError(f"base_model: {cfg.base_model} is a {model.config.FAMILY} model; instruction tuning "
                         "needs a decoder or an encoder-decoder (fine-tune encoders with `task: classify`)")
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model.to(device), [p for p in model.parameters()], []
    if cfg.method == "lora":
        from llmkit.models.lora import apply_lora, lora_parameters

        tokenizer = None
        if cfg.lora.trainable_tokens:
            from llmkit.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(cfg.base_model)
        apply_lora(model, cfg.lora, tokenizer)
        adapters = lora_parameters(model)
    else:
        from llmkit.models.prefix import apply_prefix, prefix_parameters

        apply_prefix(model, cfg.prefix)
        adapters = prefix_parameters(model)
    return model.to(device), [], adapters


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def make_sft_optimizer(base: list, adapters: list, cfg: SFTTrainConfig, lr_ratio: float) -> torch.optim.AdamW:
    """AdamW: base weights at lr (decay on matrices only), adapter weights at lr * lr_ratio."""
    groups = []
    for params, scale in ((base, 1.0), (adapters, lr_ratio)):
        if params:
            groups.append({"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay,
                           "lr": cfg.lr * scale, "lr_scale": scale})
            groups.append({"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0,
                           "lr": cfg.lr * scale, "lr_scale": scale})
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def seq2seq_batch(x: torch.Tensor, y: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """A decoder-layout batch (x, y: (B, T), y = next tokens or -100) as encoder-decoder inputs.

    An instruction row becomes source = the tokens up to the start of its last trained run (the prompt,
    ending with the assistant marker; earlier turns included) and target = that run (the answer and its
    end-of-turn token). A pretraining row (trained everywhere) becomes a prefix-LM pair: its first half is
    the source, the continuation the target (Raffel et al. 2020, §3.3's prefix LM objective).
    Returns input_ids / attention_mask (B, S) and labels (B, L) padded with pad_id / 0 / -100.
    """
    sources, targets = [], []
    T = x.shape[1]
    for xr, yr in zip(x.tolist(), y.tolist()):
        trained = [i for i, t in enumerate(yr) if t != -100]
        if not trained:
            continue
        if len(trained) == T:  # a pretraining window
            h = T // 2
            sources.append(xr[:h])
            targets.append(yr[h - 1:])
            continue
        end = trained[-1]
        start = end
        while start - 1 >= 0 and yr[start - 1] != -100:
            start -= 1
        sources.append(xr[:start + 1])
        targets.append(yr[start:end + 1])
    S, L = max(map(len, sources)), max(map(len, targets))
    input_ids = torch.full((len(sources), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sources), S), dtype=torch.long)
    labels = torch.full((len(sources), L), -100, dtype=torch.long)
    for r, (src, tgt) in enumerate(zip(sources, targets)):
        input_ids[r, :len(src)] = torch.tensor(src)
        mask[r, :len(src)] = 1
        labels[r, :len(tgt)] = torch.tensor(tgt)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def model_batch(model, x: torch.Tensor, y: torch.Tensor, pad_id: int, device: torch.device) -> dict:
    """Keyword arguments of the model's forward for a (x, y) batch, on `device`."""
    if model.config.FAMILY == "encdec":
        return {k: v.to(device) for k, v in seq2seq_batch(x, y, pad_id).items()}
    return {"idx": x.to(device), "targets": y.to(device)}


# -- evaluation -------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model, batches: list, device: torch.device, autocast, pad_id: int = 0) -> float:
    """Mean loss over the response tokens of the held-out batches (token-weighted)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        batch = model_batch(model, x, y, pad_id, device)
        target = batch.pop("labels" if "labels" in batch else "targets")
        with autocast():
            logits, _ = model(**batch, labels=target) if "input_ids" in batch else model(**batch)
        n = int((target != -100).sum())
        if n:
            total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(),
                                                       ignore_index=-100, reduction="sum").item()
            count += n
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def answer(model, tokenizer, template, messages: list[dict], max_new_tokens: int, temperature: float,
           top_p: float | None, seed: int | None = None) -> str:
    """The model's reply to `messages` (rendered with the chat template, generation prompt appended)."""
    from llmkit.chat import encode_chat
    from llmkit.infer.generate import SamplingParams, stream_tokens

    was_training = model.training
    model.eval()
    # encode_chat, not encode(render_chat(...)): it refuses role-token text typed inside a message
    ids, _ = encode_chat(tokenizer, messages, template, add_generation_prompt=True)
    stop = set(template.stop_token_ids(tokenizer))
    new = []
    if model.config.FAMILY == "encdec":
        device = next(model.parameters()).device
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                             eos_id=template.stop_token_ids(tokenizer)[0], temperature=temperature, top_p=top_p, seed=seed)
        tokens = out[0].tolist()
    else:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=seed, stop_at_eos=False)
        tokens = stream_tokens(model, ids, params, vocab_limit=len(tokenizer))  # never a padded embedding row
    for t in tokens:
        if t in stop:
            break
        new.append(t)
    model.train(was_training)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def generation_eval(model, tokenizer, template, eval_convs: list, cfg: SFTEvalConfig) -> dict:
    """Exact match and ROUGE-L of greedy answers to held-out single-turn prompts, and sampled answers."""
    from llmkit.finetune.answer_metrics import exact_match, rouge_l

    single = [c for c in eval_convs if len(c) >= 2 and c[-1]["role"] == "assistant"]
    scored = []
    for conv in single[:cfg.answers]:
        pred = answer(model, tokenizer, template, conv[:-1], cfg.max_new_tokens, 0.0, None)
        ref = conv[-1]["content"]
        scored.append({"prompt": conv[-2]["content"], "reference": ref, "answer": pred,
                       "exact_match": exact_match(pred, ref), "rouge_l": rouge_l(pred, ref)})
    samples = []
    for i, conv in enumerate(single[:cfg.samples]):
        samples.append({"prompt": conv[-2]["content"],
                        "answer": answer(model, tokenizer, template, conv[:-1], cfg.max_new_tokens,
                                         cfg.temperature, cfg.top_p, seed=i)})
    n = max(1, len(scored))
    return {"exact_match": sum(s["exact_match"] for s in scored) / n,
            "rouge_l": sum(s["rouge_l"] for s in scored) / n, "answers": scored, "samples": samples}


# -- the recipe -------------------------------------------------------------------------------------
def finetune_sft(cfg: SFTConfig, resume: bool = False) -> dict:
    """Fine-tune `cfg.base_model` on instructions with `cfg.method`; returns a summary dict.

    Writes `<out_dir>/final` (a model dir for full, an adapter dir for lora/prefix), metrics.jsonl,
    results.json (eval figures, answers and samples) and checkpoints; tracked in MLflow. `base_model` may be
    a registry URI (models:/NAME@ALIAS, runs:/...): it is resolved to its directory first.
    """
    from llmkit.registry import resolve_model

    cfg.base_model = str(resolve_model(cfg.base_model))
    tracker = Tracker(cfg.track, cfg.out_dir)
    with tracker:
        return _finetune(cfg, resume, tracker)


def baseline_eval(model, tokenizer, template, eval_convs: list, cfg: SFTEvalConfig, out: Path, step: int
                  ) -> dict | None:
    """`generation_eval` of the untrained model (a fresh LoRA adds zero; a prefix is detached meanwhile),
    written to out/baseline.json once and read back on resume; None when disabled or resumed without one."""
    path = out / "baseline.json"
    if not cfg.baseline:
        return None
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    if step > 0:
        return None
    prefix = getattr(model, "prefix", None)
    if prefix is not None:
        model.prefix = None
    try:
        result = generation_eval(model, tokenizer, template, eval_convs, cfg)
    finally:
        if prefix is not None:
            model.prefix = prefix
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return result


def return_freed_tensors_to_the_os(threshold: int = 1 << 20) -> bool:
    """On glibc (Linux), allocate every block of >= `threshold` bytes with its own mmap, so a freed activation
    goes back to the OS instead of staying in a fragmented heap (M_MMAP_THRESHOLD, fixed). CPU training
    allocates and frees activations of a different size every step (rows as wide as the batch's longest
    example); with glibc's default sliding threshold they pile up in the heap and the process grows step after
    step (LoRA on a 0.5B model: 8.2 GB peak and rising after 3 steps; 6 layers of it: 2.44 -> 2.04 GB peak,
    1.9 -> 1.2 GB between steps). Returns whether it was applied."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _finetune(cfg: SFTConfig, resume: bool, tracker: Tracker) -> dict:
    from llmkit.chat import load_chat_template
    from llmkit.finetune.sft_batches import MixedBatches, eval_batches, open_pretrain_tokens
    from llmkit.finetune.sft_data import build_sft_data
    from llmkit.tokenizer import Tokenizer

    t_cfg = cfg.train
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    if not resume and ckpt_root.is_dir() and any(ckpt_root.iterdir()):
        raise FileExistsError(f"{ckpt_root} already holds checkpoints: pass --resume to continue that run, "
                              "or set out_dir to a new directory")
    device = _device(t_cfg.device)
    if device.type == "cpu":
        return_freed_tensors_to_the_os()
    torch.manual_seed(t_cfg.seed)
    tokenizer = Tokenizer.load(cfg.base_model)
    template = load_chat_template(cfg.base_model)
    model, base_params, adapter_params = prepare_model(cfg, device)
    block = model.config.block_size
    data = build_sft_data(cfg.data, tokenizer, template, block)
    # rows as wide as the longest example needs (inputs are ids[:-1]), not the model's context: an imported
    # model's 8k-128k block would make every row that wide, nearly all of it padding
    width = min(block, max(1, max(len(e.ids) for e in [*data.train, *data.eval]) - 1))
    pretrain_tokens = open_pretrain_tokens(cfg.data, tokenizer) if cfg.data.mix_pretrain > 0 else None
    batches = MixedBatches(data, pretrain_tokens, t_cfg.batch_size, width, cfg.data.mix_pretrain, cfg.data.seed)
    held_out = eval_batches(data, t_cfg.batch_size, width)
    if cfg.eval.loss_batches is not None:
        held_out = held_out[:cfg.eval.loss_batches]
    lr_ratio = {"full": 1.0, "lora": cfg.lora.lr_ratio, "prefix": cfg.prefix.lr_ratio}[cfg.method]
    optimizer = make_sft_optimizer(base_params, adapter_params, t_cfg, lr_ratio)
    decay = t_cfg.decay_steps or t_cfg.max_steps
    min_lr = t_cfg.lr * t_cfg.min_lr_ratio
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, t_cfg.lr, min_lr, t_cfg.warmup_steps, decay) / t_cfg.lr)

    step, run_id = 0, None
    checkpoint = load_latest_checkpoint(ckpt_root, map_location="cpu") if resume else None
    if checkpoint is not None:
        missing = set(trainable_state(model)) - set(checkpoint.model)
        if missing:
            raise ValueError(f"{checkpoint.path} does not hold the trainable weights {sorted(missing)[:3]}...: "
                             "was it written with another method?")
        model.load_state_dict(checkpoint.model, strict=False)
        optimizer.load_state_dict(checkpoint.optimizer["optimizer"])
        scheduler.load_state_dict(checkpoint.optimizer["scheduler"])
        set_rng_state(checkpoint.rng["torch"], device)
        batches.load_state_dict(checkpoint.rng["batches"])
        step, run_id = checkpoint.step, checkpoint.state.get("tracking_run_id")
        log.info("resumed from %s at step %d", checkpoint.path, step)
    del checkpoint

    dtype = resolve_precision(t_cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    save_config(cfg, out / "config.yaml")
    run_id = tracker.start(run_id)
    tracker.log_params({**flatten(to_dict(cfg)), "n_params": n_total, "n_trainable": n_trainable,
                        "trainable_share": n_trainable / n_total})
    base_sha256 = file_sha256(Path(cfg.base_model) / "model.safetensors")
    tracker.set_tags({"llmkit.parent_model": str(Path(cfg.base_model).resolve()),
                      "llmkit.parent_model_sha256": base_sha256})
    tracker.log_dataset("base-model", base_sha256, str(Path(cfg.base_model).resolve()),
                        context="base_model")
    tracker.log_dataset("instructions", data.digest, ",".join(cfg.data.paths), context="training",
                        profile={"train": len(data.train), "eval": len(data.eval)})
    if pretrain_tokens is not None:
        tracker.log_dataset("pretrain-mix", pretrain_tokens.sha256, str(cfg.data.pretrain), context="mixing")
    tracker.log_artifact(out / "config.yaml")
    log.info("%s: %d of %d parameters train (%.3f%%); %d train / %d held-out examples, %.0f%% pretraining rows",
             cfg.method, n_trainable, n_total, 100 * n_trainable / n_total, len(data.train), len(data.eval),
             100 * cfg.data.mix_pretrain)

    baseline = baseline_eval(model, tokenizer, template, data.eval_conversations, cfg.eval, out, step)
    if baseline is not None:
        tracker.log_metrics({"baseline_exact_match": baseline["exact_match"],
                             "baseline_rouge_l": baseline["rouge_l"]}, 0)

    def write_checkpoint() -> None:
        save_checkpoint(ckpt_root, step, trainable_state(model),
                        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                        {"torch": rng_state(device), "batches": batches.state_dict()},
                        {"tracking_run_id": run_id, "method": cfg.method}, keep=t_cfg.keep_checkpoints)

    metrics_path = out / "metrics.jsonl"
    truncate_metrics(metrics_path, step)
    history: list[dict] = []

    def record(row: dict) -> None:
        history.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    progress = None
    if t_cfg.progress:
        from tqdm import tqdm
        progress = tqdm(total=t_cfg.max_steps, initial=step, desc=f"finetune ({cfg.method})", unit="step")

    trainable = [p for p in model.parameters() if p.requires_grad]
    # decoders compute the training loss in chunks without keeping the logits (a 152k vocabulary's fp32
    # logits, log-softmax and gradient would be the largest tensors of a LoRA step)
    loss_only = {"return_logits": False} if model.config.FAMILY == "decoder" else {}
    model.train()
    stopped = False
    last_eval: dict = {}
    window_time, window_steps = 0.0, 0
    with StopSignal() as stop:
        while step < t_cfg.max_steps:
            t0 = time.perf_counter()
            for _ in range(t_cfg.grad_accum):
                x, y = batches.next()
                with autocast():
                    _, loss = model(**model_batch(model, x, y, tokenizer.pad_id, device), **loss_only)
                scaler.scale(loss / t_cfg.grad_accum).backward()
            if t_cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, t_cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            window_time += time.perf_counter() - t0
            window_steps += 1
            if step % t_cfg.log_interval == 0 or step == t_cfg.max_steps:
                row = {"step": step, "loss": loss.item(), "lr": lr, "step_time_s": window_time / window_steps}
                record(row)
                tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step)
                if progress is not None:
                    progress.set_postfix(loss=f"{row['loss']:.4f}")
                window_time, window_steps = 0.0, 0
            if step % t_cfg.eval_interval == 0 or step == t_cfg.max_steps:
                last_eval = {"eval_loss": heldout_loss(model, held_out, device, autocast, tokenizer.pad_id)}
                last_eval["eval_ppl"] = math.exp(min(last_eval["eval_loss"], 50.0))
                record({"step": step, **last_eval})
                tracker.log_metrics(last_eval, step)
                log.info("step %d: eval_loss %.4f", step, last_eval["eval_loss"])
            if progress is not None:
                progress.update(1)
            if step % t_cfg.checkpoint_interval == 0 or step == t_cfg.max_steps or stop.received is not None:
                write_checkpoint()
            if stop.received is not None:
                stopped = True
                log.warning("stop signal received: checkpoint written at step %d; rerun with --resume", step)
                break
    if progress is not None:
        progress.close()

    final_dir = out / "final"
    results: dict = {}
    if not stopped:
        if not last_eval:
            last_eval = {"eval_loss": heldout_loss(model, held_out, device, autocast, tokenizer.pad_id)}
        gen = generation_eval(model, tokenizer, template, data.eval_conversations, cfg.eval)
        results = {"method": cfg.method, "step": step, "n_params": n_total, "n_trainable": n_trainable,
                   "trainable_share": n_trainable / n_total, **last_eval,
                   "exact_match": gen["exact_match"], "rouge_l": gen["rouge_l"],
                   "answers": gen["answers"], "samples": gen["samples"]}
        if baseline is not None:
            results["baseline"] = baseline
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        tracker.log_metrics({"exact_match": gen["exact_match"], "rouge_l": gen["rouge_l"]}, step)
        tracker.log_artifact(out / RESULTS_FILE)
        save_finetuned(model, cfg, tokenizer, template, final_dir)
        tracker.log_artifact(final_dir, "adapter" if cfg.method != "full" else "model")
    tracker.end("KILLED" if stopped else "FINISHED")
    return {"step": step, "stopped_by_signal": stopped, "method": cfg.method, "batch_width": width,
            "n_trainable": n_trainable,
            "trainable_share": n_trainable / n_total, "eval_loss": last_eval.get("eval_loss"),
            "exact_match": results.get("exact_match"), "rouge_l": results.get("rouge_l"),
            "final": str(final_dir) if not stopped else None, "tracking_run_id": run_id, "history": history}


def save_finetuned(model, cfg: SFTConfig, tokenizer, template, final_dir: Path) -> Path:
    """full: a model dir; lora / prefix: an adapter dir (PEFT layout) - each with tokenizer and template."""
    from llmkit.chat import save_chat_template
    from llmkit.models.adapters import save_adapter
    from llmkit.models.io import load_generation_config, save_model

    if final_dir.exists():
        shutil.rmtree(final_dir)
    gen = load_generation_config(cfg.base_model) or {"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.9}
    if cfg.method == "full":
        save_model(model, final_dir, tokenizer, generation_config=gen)
    else:
        save_adapter(model, final_dir, str(Path(cfg.base_model).resolve()))
        tokenizer.save(final_dir)
    save_chat_template(final_dir, template)
    return final_dir
