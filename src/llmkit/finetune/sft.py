"""Supervised fine-tuning of a pretrained decoder: full, LoRA or prefix tuning, on instructions (guide §3).

    base model dir -> method (full: every weight trains; lora: low-rank adapters on chosen projections;
    prefix: learned per-layer key/value prefixes) -> instruction data in the chat template, loss on the
    responses only, pretraining windows mixed in (guide §3.3: 10-20% against catastrophic forgetting)
    -> AdamW (adapter parameters at lr_ratio x lr, guide §3.2: 5-10x) -> `train_loop` (held-out loss at each
    eval) -> exact match / ROUGE-L of greedy answers, samples at temperature 0.7, top-p 0.9
    -> final/ (full: a model dir; lora / prefix: an adapter dir in PEFT's layout) + results.json

The loop (`llmkit.train.loop`) owns resume, precision, accumulation, clipping, the LR schedule, the cadence
and preemption. Resume is exact for all three methods: a checkpoint holds the trainable weights, optimizer,
scheduler, RNG and the data iterator's position, so a resumed run's losses equal an uninterrupted run's.
SIGTERM / Ctrl-C write a checkpoint at the current step and end the run cleanly (exit 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from llmkit import runtime
from llmkit.chat import load_chat_template, save_chat_template
from llmkit.data.tokenized import file_sha256
from llmkit.finetune.answer_metrics import exact_match, rouge_l
from llmkit.finetune.sft_batches import MixedBatches, eval_batches, open_pretrain_tokens
from llmkit.finetune.sft_data import InstructDataConfig, build_sft_data
from llmkit.infer.generate import SamplingParams
from llmkit.infer.reply import chat_reply
from llmkit.models.adapters import save_adapter
from llmkit.models.io import load_generation_config, load_model, save_model
from llmkit.models.lora import (
    ADAPTER_CONFIG,
    LoRAConfig,
    apply_lora,
    lora_expert_modules,
    lora_modules,
    lora_parameters,
    merge_lora,
)
from llmkit.models.prefix import PrefixConfig, apply_prefix, prefix_parameters
from llmkit.models.trainable_tokens import trainable_tokens
from llmkit.registry import resolve_model
from llmkit.tokenizer import Tokenizer
from llmkit.track import TrackConfig, Tracker
from llmkit.train import loop

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


@dataclass
class SFTTrainConfig(loop.LoopConfig):
    """Instruction tuning's `train:` section: the shared loop settings (`LoopConfig`) with SFT defaults."""

    max_steps: int = 300
    lr: float = 3e-5
    """Learning rate of the base weights (full fine-tuning); adapters train at lr x lr_ratio."""
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta2: float = 0.999
    eval_interval: int = 100
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2


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
        if self.lora.init_from and self.method != "lora":
            raise ValueError(f"lora.init_from: a LoRA initialisation needs method: lora, not {self.method}")


# -- model ------------------------------------------------------------------------------------------
def prepare_model(cfg: SFTConfig, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter],
                                                                  list[torch.nn.Parameter]]:
    """The base model with the method applied: (model, base params that train, adapter params that train)."""
    model = load_model(cfg.base_model)
    if model.config.FAMILY not in ("decoder", "encdec"):
        raise ValueError(f"base_model: {cfg.base_model} is a {model.config.FAMILY} model; instruction tuning "
                         "needs a decoder or an encoder-decoder (fine-tune encoders with `task: classify`)")
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model.to(device), [p for p in model.parameters()], []
    if cfg.method == "lora":
        tokenizer = None
        if cfg.lora.trainable_tokens:
            tokenizer = Tokenizer.load(cfg.base_model)
        if cfg.lora.init_from:
            init_lora_from(model, cfg.lora, tokenizer)
        else:
            apply_lora(model, cfg.lora, tokenizer)
        adapters = lora_parameters(model)
    else:
        apply_prefix(model, cfg.prefix)
        adapters = prefix_parameters(model)
    return model.to(device), [], adapters


def lora_init_dir(path: str | Path) -> Path:
    """The adapter directory `lora.init_from` names: the directory itself, or its `final/` (a run directory of
    `llmkit meta-lora` / `llmkit finetune`); FileNotFoundError when neither holds an adapter_config.json."""
    for d in (Path(path), Path(path) / "final"):
        if (d / ADAPTER_CONFIG).is_file():
            return d
    raise FileNotFoundError(f"lora.init_from: {path} holds no LoRA adapter ({ADAPTER_CONFIG} in it or in its final/)")


def _lora_layout(model) -> dict[str, tuple[int, float]]:
    """{adapter path (module.slice, or the experts' weight): (rank, scaling)} of a model carrying LoRA."""
    out = {f"{path}.{n}": (m.lora_A[n].shape[0], m.scaling[n]) for path, m in lora_modules(model) for n in m.ranges}
    out |= {f"{path}.experts.{n}": (m.lora_A[n].shape[1], m.scaling[n])
            for path, m in lora_expert_modules(model) for n in m.scaling}
    return out


def init_lora_from(model, cfg: LoRAConfig, tokenizer=None) -> list[torch.nn.Parameter]:
    """Attach the saved adapter `cfg.init_from` to the base `model` as the starting point of LoRA training.

    The adapter must be the one `apply_lora(model, cfg)` would make, with other values: the same adapted
    modules and slices (cfg.targets), rank (cfg.r), scale (alpha, rslora) and trainable tokens; a ValueError
    names the first mismatch. Its A and B are loaded exactly; dropout and lr_ratio come from `cfg`.
    Returns the LoRA parameters (as `lora_parameters`)."""
    from llmkit.models.lora_peft import load_lora

    adapter_dir = lora_init_dir(cfg.init_from)
    fresh = dataclasses.replace(cfg, init_from=None)
    apply_lora(model, fresh, tokenizer)  # the layout this config asks for (and its validation)
    want, want_tokens = _lora_layout(model), trainable_tokens(model)
    want_ids = want_tokens.ids.tolist() if want_tokens is not None else []
    merge_lora(model)  # a fresh adapter adds exactly zero (B = 0, token rows = their own values): the base again
    try:
        load_lora(model, adapter_dir)
    except ValueError as e:
        raise ValueError(f"lora.init_from: {e}") from None
    got, got_tokens = _lora_layout(model), trainable_tokens(model)
    got_ids = got_tokens.ids.tolist() if got_tokens is not None else []
    where = f"lora.init_from: {adapter_dir}"
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        raise ValueError(f"{where} adapts other modules than lora.targets {cfg.targets} select: "
                         + "; ".join(s for s in (f"only in the adapter: {extra[:4]}" if extra else "",
                                                 f"missing from it: {missing[:4]}" if missing else "") if s))
    for key, (rank, scale) in want.items():
        g_rank, g_scale = got[key]
        if g_rank != rank:
            raise ValueError(f"{where} has rank {g_rank} on {key}; lora.r is {rank}")
        if not math.isclose(g_scale, scale, rel_tol=1e-6):
            raise ValueError(f"{where} scales {key} by {g_scale:g}; lora.alpha {cfg.alpha:g} "
                             f"(rslora {cfg.rslora}) with r {cfg.r} gives {scale:g}")
    if sorted(got_ids) != sorted(want_ids):
        raise ValueError(f"{where} trains token rows {sorted(got_ids)}; lora.trainable_tokens give {sorted(want_ids)}")
    for _, m in [*lora_modules(model), *lora_expert_modules(model)]:
        m.lora_dropout = torch.nn.Dropout(cfg.dropout) if cfg.dropout > 0 else torch.nn.Identity()
        m.lora_dropout.train(m.training)
    model.lora_config = dataclasses.replace(fresh, modules_to_save=model.lora_config.modules_to_save)
    return lora_parameters(model)


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


def generation_eval(model, tokenizer, template, eval_convs: list, cfg: SFTEvalConfig) -> dict:
    """Exact match and ROUGE-L of greedy answers to held-out single-turn prompts, and sampled answers."""
    single = [c for c in eval_convs if len(c) >= 2 and c[-1]["role"] == "assistant"]
    scored = []
    for conv in single[:cfg.answers]:
        pred = chat_reply(model, tokenizer, template, conv[:-1],
                          SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0))
        ref = conv[-1]["content"]
        scored.append({"prompt": conv[-2]["content"], "reference": ref, "answer": pred,
                       "exact_match": exact_match(pred, ref), "rouge_l": rouge_l(pred, ref)})
    samples = []
    for i, conv in enumerate(single[:cfg.samples]):
        samples.append({"prompt": conv[-2]["content"],
                        "answer": chat_reply(model, tokenizer, template, conv[:-1],
                                             SamplingParams(max_new_tokens=cfg.max_new_tokens,
                                                            temperature=cfg.temperature, top_p=cfg.top_p, seed=i))})
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


def _finetune(cfg: SFTConfig, resume: bool, tracker: Tracker) -> dict:
    t_cfg = cfg.train
    out = Path(cfg.out_dir)
    checkpoint = loop.open_run(out, resume)
    device = runtime.resolve_device(t_cfg.device)

    # -- model, template and data
    torch.manual_seed(t_cfg.seed)
    tokenizer = Tokenizer.load(cfg.base_model)
    template = load_chat_template(cfg.base_model)
    model, base_params, adapter_params = prepare_model(cfg, device)
    loop.restore_weights(model, checkpoint)
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
    optimizer = loop.make_optimizer(t_cfg, [(base_params, 1.0), (adapter_params, lr_ratio)])
    autocast = loop.forward_context(device, runtime.resolve_dtype(t_cfg.precision, device))

    # -- tracking
    n_total, n_trainable = loop.start_tracking(tracker, cfg, out, checkpoint, model)
    tracker.log_params({"trainable_share": n_trainable / n_total})
    base_sha256 = file_sha256(Path(cfg.base_model) / "model.safetensors")
    tracker.set_tags({"llmkit.parent_model": str(Path(cfg.base_model).resolve()),
                      "llmkit.parent_model_sha256": base_sha256})
    tracker.log_dataset("base-model", base_sha256, str(Path(cfg.base_model).resolve()),
                        context="base_model")
    tracker.log_dataset("instructions", data.digest, ",".join(cfg.data.paths), context="training",
                        profile={"train": len(data.train), "eval": len(data.eval)})
    if pretrain_tokens is not None:
        tracker.log_dataset("pretrain-mix", pretrain_tokens.sha256, str(cfg.data.pretrain), context="mixing")
    log.info("%s: %d of %d parameters train (%.3f%%); %d train / %d held-out examples, %.0f%% pretraining rows",
             cfg.method, n_trainable, n_total, 100 * n_trainable / n_total, len(data.train), len(data.eval),
             100 * cfg.data.mix_pretrain)

    baseline = baseline_eval(model, tokenizer, template, data.eval_conversations, cfg.eval, out,
                             checkpoint.step if checkpoint is not None else 0)
    if baseline is not None:
        tracker.log_metrics({"baseline_exact_match": baseline["exact_match"],
                             "baseline_rouge_l": baseline["rouge_l"]}, 0)

    # -- what the loop runs
    # decoders compute the training loss in chunks without keeping the logits (a 152k vocabulary's fp32
    # logits, log-softmax and gradient would be the largest tensors of a LoRA step)
    loss_only = {"return_logits": False} if model.config.FAMILY == "decoder" else {}

    def evaluate() -> dict[str, float]:
        loss = heldout_loss(model, held_out, device, autocast, tokenizer.pad_id)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def next_batch() -> tuple[dict, int]:
        x, y = batches.next()
        return model_batch(model, x, y, tokenizer.pad_id, device), int((y != -100).sum())

    job = loop.Job(model=model, optimizer=optimizer, next_batch=next_batch,
                   loss=lambda batch: model(**batch[0], **loss_only)[1], evaluate=evaluate, data=batches,
                   autocast=autocast, tokens=lambda batch: batch[1],  # the tokens the loss is on
                   facts={"method": cfg.method}, name=f"finetune ({cfg.method})")
    result = loop.train_loop(t_cfg, job, out, tracker, checkpoint)

    # -- answers and the final adapter / model
    final_dir = out / "final"
    results: dict = {}
    if not result.stopped:
        gen = generation_eval(model, tokenizer, template, data.eval_conversations, cfg.eval)
        results = {"method": cfg.method, "step": result.step, "n_params": n_total, "n_trainable": n_trainable,
                   "trainable_share": n_trainable / n_total, **result.last_eval,
                   "exact_match": gen["exact_match"], "rouge_l": gen["rouge_l"],
                   "answers": gen["answers"], "samples": gen["samples"]}
        if baseline is not None:
            results["baseline"] = baseline
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        tracker.log_metrics({"exact_match": gen["exact_match"], "rouge_l": gen["rouge_l"]}, result.step)
        tracker.log_artifact(out / RESULTS_FILE)
        save_finetuned(model, cfg, tokenizer, template, final_dir)
        tracker.log_artifact(final_dir, "adapter" if cfg.method != "full" else "model")
    tracker.end("KILLED" if result.stopped else "FINISHED")
    return {"step": result.step, "stopped_by_signal": result.stopped, "method": cfg.method, "batch_width": width,
            "n_trainable": n_trainable, "trainable_share": n_trainable / n_total,
            "eval_loss": result.last_eval.get("eval_loss"), "exact_match": results.get("exact_match"),
            "rouge_l": results.get("rouge_l"), "final": str(final_dir) if not result.stopped else None,
            "tracking_run_id": tracker.run_id, "history": result.history}


def save_finetuned(model, cfg: SFTConfig, tokenizer, template, final_dir: Path) -> Path:
    """full: a model dir; lora / prefix: an adapter dir (PEFT layout) - each with tokenizer and template."""
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
