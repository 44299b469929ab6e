"""Knowledge distillation of an instruction-tuned decoder into a smaller one (guide §5, "模型蒸馏").

    teacher model dir -> student (a copy of the teacher pruned in depth and / or width, a smaller config, or
    a model dir with the same tokenizer) -> instruction data in the teacher's chat template -> the teacher's
    top-k logits at every response position, cached by content (`teacher_cache`) -> `train_loop` on
    alpha x KD divergence (forward KL / reverse KL / JSD at temperature T) + (1 - alpha) x cross-entropy
    (sequence_level: the teacher's own greedy answers replace the references first, `sequence_level`;
    on_policy: a share of the batches are the student's own sampled replies, scored by the teacher live,
    on the divergence alone, `on_policy`)
    -> held-out loss, KL to the teacher and top-1 agreement; exact match / ROUGE-L of greedy answers
    -> final/ (full: a model dir; lora: an adapter dir over out/student_init) + results.json

The loop (`llmkit.train.loop`) owns resume, precision, accumulation, clipping, the schedule and preemption,
as for every recipe; the teacher runs once per example and content, never per step (but for on-policy
batches, whose sequences are new). Pretraining rows mixed in (data.mix_pretrain) have no teacher outputs and
train on their hard labels only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from llmkit import runtime
from llmkit.chat import load_chat_template, save_chat_template
from llmkit.data.tokenized import file_sha256
from llmkit.distill.losses import Divergence, kd_divergence
from llmkit.distill.on_policy import (
    OnPolicyBatches,
    OnPolicyConfig,
    is_on_policy,
    on_policy_batch,
    reply_prompts,
    stop_ids,
)
from llmkit.distill.sequence_level import teacher_answers, with_teacher_answers
from llmkit.distill.student import (
    StudentConfig,
    drop_layers,
    example_batches,
    kept_layers,
    prune_width,
    smaller_config,
    width_importance,
)
from llmkit.distill.teacher_cache import TeacherOutputs, teacher_outputs
from llmkit.finetune.sft import SFTEvalConfig, SFTTrainConfig, generation_eval
from llmkit.finetune.sft_batches import MixedBatches, eval_batches, open_pretrain_tokens
from llmkit.finetune.sft_data import InstructDataConfig, build_sft_data
from llmkit.models.adapters import save_adapter
from llmkit.models.io import load_generation_config, load_model, save_model
from llmkit.models.lora import LoRAConfig, apply_lora, lora_parameters
from llmkit.registry import resolve_model
from llmkit.tokenizer import Tokenizer
from llmkit.track import TrackConfig, Tracker
from llmkit.train import loop

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


@dataclass
class KDLossConfig:
    """The ``loss:`` section."""

    kind: Divergence = "forward_kl"
    """forward_kl (Hinton et al.), reverse_kl (MiniLLM) or jsd (GKD's generalised JSD with `beta`)."""
    temperature: float = 2.0
    """Softens both distributions; the divergence is multiplied by T^2."""
    alpha: float = 0.5
    """Weight of the divergence; 1 - alpha weighs the cross-entropy on the hard labels. 0: no distillation
    (the same student trained on the labels alone, the baseline of a comparison)."""
    beta: float = 0.5
    """JSD's mixture weight, in (0, 1)."""
    top_k: int = 64
    """Teacher logits kept per position (the cache's size grows with it)."""

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha: must be in [0, 1], got {self.alpha}")
        if self.kind == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta: must be in (0, 1) for jsd, got {self.beta}")
        if self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {self.top_k}")


@dataclass
class DistillDataConfig(InstructDataConfig):
    """The ``data:`` section: instruction data as for SFT, without pretraining rows unless asked for (they
    have no teacher outputs and train on their labels only)."""

    mix_pretrain: float = 0.0


@dataclass
class DistillConfig:
    task: Literal["distill"] = "distill"
    out_dir: str = "runs/distill"
    teacher: str = ""
    """The teacher: an llmkit decoder model dir (e.g. an imported SmolLM2-135M-Instruct) or a registry URI."""
    student: StudentConfig = field(default_factory=StudentConfig)
    method: Literal["full", "lora"] = "full"
    """How the student trains: every weight, or LoRA adapters on it."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    loss: KDLossConfig = field(default_factory=KDLossConfig)
    teacher_cache: str = "~/.cache/llmkit/teacher"
    """Where the teacher's outputs are kept, by content: shared by runs and students."""
    sequence_level: bool = False
    """Train on the teacher's greedy answers instead of the reference answers (Kim & Rush 2016;
    `sequence_level.py`); held-out examples keep their references."""
    answer_max_new_tokens: int = 256
    """Longest teacher answer generated for sequence-level distillation."""
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """On-policy distillation (GKD): a share of the batches are the student's own sampled replies, scored by
    the teacher live (`on_policy.py`); fraction 0 (the default) is off."""
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    """The shared loop settings with instruction tuning's defaults (lr 3e-5: raise it for a pruned student)."""
    eval: SFTEvalConfig = field(default_factory=SFTEvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def validate(self) -> None:
        if not self.teacher:
            raise ValueError("teacher: required (an llmkit decoder model directory)")
        if self.on_policy.fraction > 0:
            if self.loss.alpha == 0:
                raise ValueError("on_policy.fraction: on-policy batches train on the divergence alone, and "
                                 "loss.alpha 0 is the hard-label baseline without one: set on_policy.fraction 0 "
                                 "or loss.alpha > 0")
            if self.data.mix_pretrain > 0:
                raise ValueError("on_policy.fraction: not with data.mix_pretrain > 0 (a pretraining row has no "
                                 "prompt for the student to answer)")


# -- teacher and student ------------------------------------------------------------------------------
def build_student(cfg: DistillConfig, teacher, tokenizer: Tokenizer, calibration=None,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                  ) -> torch.nn.Module:
    """The student before training (see `StudentConfig`); refuses a student whose tokenizer differs.

    calibration: with student.prune_width, the batches ((x, valid) pairs, e.g. `calibration_batches`) the
    teacher's activations are measured on (`width_importance`, under `autocast`), or a callable returning them."""
    s = cfg.student
    if s.prune_width is not None:  # measured on the whole teacher, then the kept layers (or all) are sliced
        if calibration is None:
            raise ValueError("student.prune_width: calibration batches are needed to rank the neurons and heads")
        importance = width_importance(teacher, calibration() if callable(calibration) else calibration, autocast)
        base = teacher
        if s.keep_layers:
            layers = kept_layers(teacher.config.n_layer, s.keep_layers)
            base, importance = drop_layers(teacher, layers), [importance[i] for i in layers]
        return prune_width(base, importance, s.prune_width.mlp_hidden, s.prune_width.heads)
    if s.keep_layers:
        return drop_layers(teacher, s.keep_layers)
    if s.config:
        return smaller_config(teacher, s.config)
    student_dir = resolve_model(s.model)
    theirs = Tokenizer.load(student_dir)
    if theirs.digest() != tokenizer.digest():
        raise ValueError(f"student.model: {student_dir} has another tokenizer than the teacher ({theirs.vocab_size} "
                         f"vs {tokenizer.vocab_size} tokens, digest {theirs.digest()[:12]} vs "
                         f"{tokenizer.digest()[:12]}): distillation compares the two models' distributions token "
                         "by token, so both must use the same vocabulary")
    return load_model(student_dir)


def _check_vocab(model, tokenizer: Tokenizer, who: str) -> None:
    if model.config.FAMILY != "decoder":
        raise ValueError(f"{who}: a {model.config.FAMILY} model; distillation here takes decoders")
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"{who}: {model.config.vocab_size} output rows, fewer than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens")


def model_size(model) -> dict[str, int]:
    """Parameters and bytes of every tensor of the model's state (embeddings and buffers included; a tied
    weight once, as its file holds it)."""
    params = sum(p.numel() for p in model.parameters())
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return {"params": params, "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


# -- the loss and the held-out figures -----------------------------------------------------------------
def gather_teacher(cache: TeacherOutputs, examples: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached teacher outputs of these examples' loss positions, concatenated in row order: (N, k) x 2."""
    parts = [cache.example(i) for i in examples]
    if not parts:
        k = cache.top_k
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def kd_batch_loss(logits: torch.Tensor, y: torch.Tensor, kd_rows: int, teacher_ids: torch.Tensor,
                  teacher_values: torch.Tensor, loss: KDLossConfig) -> torch.Tensor:
    """alpha x divergence + (1 - alpha) x cross-entropy of a batch: logits (B, T, V), y (B, T) with -100 off the
    loss; the first `kd_rows` rows are SFT examples whose loss positions (row-major order) match teacher_ids /
    teacher_values (N, k). alpha 0 (the hard-label baseline) skips the divergence."""
    trained = y != -100
    ce = F.cross_entropy(logits[trained].float(), y[trained]) if trained.any() else logits.sum() * 0.0
    kd_logits = logits[:kd_rows][trained[:kd_rows]]
    if kd_logits.size(0) != teacher_ids.size(0):
        raise RuntimeError(f"{kd_logits.size(0)} loss positions in the batch, {teacher_ids.size(0)} cached teacher "
                           "positions: the teacher cache does not match the data")
    if loss.alpha == 0.0:
        return ce
    kd = kd_divergence(kd_logits, teacher_ids, teacher_values, loss.kind, loss.temperature, loss.beta)
    return loss.alpha * kd + (1.0 - loss.alpha) * ce


def on_policy_loss(logits: torch.Tensor, y: torch.Tensor, teacher_ids: torch.Tensor, teacher_values: torch.Tensor,
                   loss: KDLossConfig) -> torch.Tensor:
    """The loss of an on-policy batch (`on_policy.on_policy_batch`): the divergence alone (no cross-entropy: a
    sampled reply is no label) at the positions predicting the replies' tokens (y != -100, row-major), whose
    live teacher top-k logits are teacher_ids / teacher_values (N, k)."""
    sel = logits[y != -100]
    if sel.size(0) != teacher_ids.size(0):
        raise RuntimeError(f"{sel.size(0)} reply positions in the batch, {teacher_ids.size(0)} teacher positions")
    return kd_divergence(sel, teacher_ids, teacher_values, loss.kind, loss.temperature, loss.beta)


@torch.no_grad()
def heldout_figures(model, batches: list, cache: TeacherOutputs, device, autocast) -> dict[str, float]:
    """Held-out cross-entropy on the responses, forward KL to the teacher at T = 1 over its top-k, and top-1
    agreement (the student's argmax is the teacher's), token-weighted over the eval examples."""
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = agree = n = 0.0
    row = 0
    for x, y in batches:
        with autocast():
            logits, _ = model(x.to(device))
        y = y.to(device)
        ids, values = gather_teacher(cache, list(range(row, row + x.size(0))))
        row += x.size(0)
        trained = y != -100
        sel = logits[trained].float()
        if sel.size(0) == 0:
            continue
        ids, values = ids.to(device), values.to(device)
        ce_sum += F.cross_entropy(sel, y[trained], reduction="sum").item()
        kl_sum += kd_divergence(sel, ids, values, "forward_kl", 1.0).item() * sel.size(0)
        agree += (sel.argmax(-1) == ids[:, 0]).sum().item()
        n += sel.size(0)
    model.train(was_training)
    n = max(1.0, n)
    return {"eval_loss": ce_sum / n, "eval_ppl": math.exp(min(ce_sum / n, 50.0)), "eval_kl_to_teacher": kl_sum / n,
            "eval_top1_agreement": agree / n}


def calibration_batches(cfg: DistillConfig, data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Width pruning's calibration batches (`example_batches`): student.prune_width.calibration_batches batches
    of train.batch_size training examples, drawn without replacement by a permutation seeded with data.seed."""
    n = cfg.student.prune_width.calibration_batches * cfg.train.batch_size
    order = np.random.Generator(np.random.PCG64([cfg.data.seed, 0xCA1])).permutation(len(data.train))[:n]
    return example_batches([data.train[int(i)] for i in order], cfg.train.batch_size, data.pad_id)


def _student_init(cfg: DistillConfig, student) -> dict:
    """How the student started, for results.json: its source and, for a pruned copy, what it kept."""
    s = cfg.student
    if s.keep_layers or s.prune_width is not None:
        c = student.config
        out: dict = {"from": "teacher", "n_layer": c.n_layer, "d_ff": c.d_ff, "n_head": c.n_head,
                     "n_kv_head": c.kv_heads}
        if s.prune_width is not None:
            out["prune_width"] = vars(s.prune_width)
        return out
    return {"from": "config" if s.config else "model"}


def _on_policy_results(on: OnPolicyConfig, state: OnPolicyBatches, data, tokenizer) -> dict:
    """results.json's `on_policy`: the settings, the tallies and the latest batch's first replies (decoded)."""
    samples = [{"batch": smp["batch"], "prompt": data.train[smp["example"]].messages[-2]["content"],
                "reply": tokenizer.decode(smp["reply_ids"], skip_special_tokens=True).strip(),
                "reference": data.train[smp["example"]].messages[-1]["content"], "reply_ids": smp["reply_ids"]}
               for smp in state.samples]
    return {**vars(on), **state.figures(), "batches": state.on_batches, "sampled_rows": state.sampled_rows,
            "reference_rows": state.reference_rows, "samples": samples}


# -- the recipe ---------------------------------------------------------------------------------------
def distill(cfg: DistillConfig, resume: bool = False) -> dict:
    """Distil `cfg.teacher` into the configured student; returns a summary dict.

    Writes `<out_dir>/final`, metrics.jsonl, results.json (student and teacher figures and sizes, answers)
    and checkpoints; tracked in MLflow with the teacher as the parent model.
    """
    cfg.teacher = str(resolve_model(cfg.teacher))
    tracker = Tracker(cfg.track, cfg.out_dir)
    with tracker:
        return _distill(cfg, resume, tracker)


def _distill(cfg: DistillConfig, resume: bool, tracker: Tracker) -> dict:
    t_cfg = cfg.train
    out = Path(cfg.out_dir)
    checkpoint = loop.open_run(out, resume)
    device = runtime.resolve_device(t_cfg.device)
    autocast = loop.forward_context(device, runtime.resolve_dtype(t_cfg.precision, device))

    # -- teacher, student, data
    torch.manual_seed(t_cfg.seed)
    tokenizer = Tokenizer.load(cfg.teacher)
    template = load_chat_template(cfg.teacher)
    teacher = load_model(cfg.teacher).to(device).eval()
    _check_vocab(teacher, tokenizer, "teacher")
    teacher_sha256 = file_sha256(Path(cfg.teacher) / "model.safetensors")
    data = None
    calibration = None
    if cfg.student.prune_width is not None:  # a copy of the teacher: the same block size
        data = build_sft_data(cfg.data, tokenizer, template, teacher.config.block_size)
        calibration = calibration_batches(cfg, data)
    student = build_student(cfg, teacher, tokenizer, calibration, autocast)
    _check_vocab(student, tokenizer, "student")
    student_init = None
    if cfg.method == "lora":  # the adapter needs its base on disk
        student_init = out / "student_init"
        if not student_init.is_dir():
            save_model(student, student_init, tokenizer, generation_config=load_generation_config(cfg.teacher))
            save_chat_template(student_init, template)
        apply_lora(student, cfg.lora)
        for p in student.parameters():
            p.requires_grad_(False)
        trainable = lora_parameters(student)
        for p in trainable:
            p.requires_grad_(True)
    else:
        trainable = list(student.parameters())
    student = student.to(device)
    loop.restore_weights(student, checkpoint)
    block = min(teacher.config.block_size, student.config.block_size)
    if data is None or block != teacher.config.block_size:
        data = build_sft_data(cfg.data, tokenizer, template, block)
    answers_computed, answers_dropped = None, 0
    if cfg.sequence_level:
        answers, answers_computed = teacher_answers(teacher, teacher_sha256, data, tokenizer,
                                                    cfg.answer_max_new_tokens, cfg.teacher_cache)
        data, answers_dropped = with_teacher_answers(data, answers, tokenizer)
    width = min(block, max(1, max(len(e.ids) for e in [*data.train, *data.eval]) - 1))
    pretrain_tokens = open_pretrain_tokens(cfg.data, tokenizer) if cfg.data.mix_pretrain > 0 else None
    batches = MixedBatches(data, pretrain_tokens, t_cfg.batch_size, width, cfg.data.mix_pretrain, cfg.data.seed)
    held_out = eval_batches(data, t_cfg.batch_size, width)
    if cfg.eval.loss_batches is not None:
        held_out = held_out[:cfg.eval.loss_batches]
    n_eval = sum(x.size(0) for x, _ in held_out)
    k = min(cfg.loss.top_k, tokenizer.vocab_size)
    train_cache = teacher_outputs(teacher, teacher_sha256, data.train, data.digest + ":train", data.pad_id, k,
                                  tokenizer.vocab_size, cfg.teacher_cache, t_cfg.batch_size, device)
    eval_cache = teacher_outputs(teacher, teacher_sha256, data.eval[:n_eval], data.digest + f":eval{n_eval}",
                                 data.pad_id, k, tokenizer.vocab_size, cfg.teacher_cache, t_cfg.batch_size, device)
    teacher_eval = heldout_figures(teacher, held_out, eval_cache, device, autocast)
    teacher_size, student_size = model_size(teacher), model_size(student)
    on = cfg.on_policy
    live_teacher = teacher if on.fraction > 0 else None  # on-policy batches are scored live
    del teacher  # otherwise the cache holds all the training needs of it
    prompts = reply_prompts(data.train, tokenizer, template) if live_teacher is not None else []
    stops = stop_ids(tokenizer, template)
    state = OnPolicyBatches(batches) if live_teacher is not None else None

    # -- tracking: the teacher is the parent model
    n_total, n_trainable = loop.start_tracking(tracker, cfg, out, checkpoint, student)
    tracker.set_tags({"llmkit.parent_model": cfg.teacher, "llmkit.parent_model_sha256": teacher_sha256,
                      "llmkit.teacher_model": cfg.teacher})
    tracker.log_dataset("teacher-model", teacher_sha256, cfg.teacher, context="teacher")
    tracker.log_dataset("instructions", data.digest, ",".join(cfg.data.paths), context="training",
                        profile={"train": len(data.train), "eval": len(data.eval)})
    tracker.log_params({"teacher_params": teacher_size["params"], "student_params": student_size["params"],
                        "teacher_outputs": str(train_cache.path), "teacher_outputs_computed": train_cache.computed})
    log.info("student %d parameters (teacher %d), %d train; teacher outputs %s (%s)", student_size["params"],
             teacher_size["params"], n_trainable, train_cache.path, "computed" if train_cache.computed else "cached")

    # -- what the loop runs
    def next_batch() -> dict:
        index = batches.batches  # this batch's: it decides (with the seed) whether and how the student samples
        x, y = batches.next()
        if live_teacher is not None and is_on_policy(index, on.fraction):
            examples = batches.last_examples
            b = on_policy_batch(student, live_teacher, [data.train[i] for i in examples], [prompts[i] for i in examples],
                                on, tokenizer=tokenizer, stops=stops, max_len=data.max_len, pad_id=data.pad_id,
                                vocab=tokenizer.vocab_size, top_k=k, seed=t_cfg.seed, batch_index=index,
                                device=device, autocast=autocast)
            state.add(index, examples, b)
            return b
        ids, values = gather_teacher(train_cache, batches.last_examples)
        return {"x": x.to(device), "y": y.to(device), "kd_rows": len(batches.last_examples),
                "ids": ids.to(device), "values": values.to(device), "tokens": int((y != -100).sum())}

    def batch_loss(b: dict) -> torch.Tensor:
        logits, _ = student(b["x"])
        if b.get("on_policy"):
            return on_policy_loss(logits, b["y"], b["ids"], b["values"], cfg.loss)
        return kd_batch_loss(logits, b["y"], b["kd_rows"], b["ids"], b["values"], cfg.loss)

    def evaluate() -> dict[str, float]:
        figures = heldout_figures(student, held_out, eval_cache, device, autocast)
        return {**figures, **state.figures()} if state is not None else figures

    job = loop.Job(model=student, optimizer=loop.make_optimizer(t_cfg, [(trainable, 1.0)]), next_batch=next_batch,
                   loss=batch_loss, evaluate=evaluate, data=state if state is not None else batches,
                   autocast=autocast, tokens=lambda b: b["tokens"],
                   facts={"method": cfg.method, "loss": cfg.loss.kind, "teacher_sha256": teacher_sha256,
                          "sequence_level": cfg.sequence_level, "on_policy": on.fraction},
                   name=f"distill ({cfg.loss.kind}, {cfg.method}{', on-policy' if on.fraction > 0 else ''})")
    result = loop.train_loop(t_cfg, job, out, tracker, checkpoint)

    # -- answers, sizes and the student
    final_dir = out / "final"
    results: dict = {}
    if not result.stopped:
        gen = generation_eval(student, tokenizer, template, data.eval_conversations, cfg.eval)
        results = {"method": cfg.method, "loss": vars(cfg.loss), "step": result.step,
                   "train_examples": len(data.train), "eval_examples": n_eval, **result.last_eval,
                   "exact_match": gen["exact_match"], "rouge_l": gen["rouge_l"],
                   "student": student_size, "teacher": {**teacher_size, **teacher_eval},
                   "size_ratio": student_size["bytes"] / teacher_size["bytes"],
                   "teacher_outputs": {"path": str(train_cache.path), "computed": train_cache.computed,
                                       "top_k": k},
                   "sequence_level": {"answers_computed": answers_computed, "dropped": answers_dropped}
                   if cfg.sequence_level else None,
                   "on_policy": _on_policy_results(cfg.on_policy, state, data, tokenizer) if state is not None
                   else None,
                   "student_init": _student_init(cfg, student),
                   "answers": gen["answers"], "samples": gen["samples"]}
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        tracker.log_metrics({"exact_match": gen["exact_match"], "rouge_l": gen["rouge_l"],
                             **{f"teacher_{k_}": v for k_, v in teacher_eval.items()}}, result.step)
        tracker.log_artifact(out / RESULTS_FILE)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        if cfg.method == "full":
            save_model(student, final_dir, tokenizer, generation_config=load_generation_config(cfg.teacher))
        else:
            save_adapter(student, final_dir, str(student_init.resolve()))
            tokenizer.save(final_dir)
        save_chat_template(final_dir, template)
        tracker.log_artifact(final_dir, "model" if cfg.method == "full" else "adapter")
    tracker.end("KILLED" if result.stopped else "FINISHED")
    return {"step": result.step, "stopped_by_signal": result.stopped, "method": cfg.method, "loss": cfg.loss.kind,
            "student_params": student_size["params"], "teacher_params": teacher_size["params"],
            "eval_loss": result.last_eval.get("eval_loss"),
            "eval_kl_to_teacher": result.last_eval.get("eval_kl_to_teacher"),
            "eval_top1_agreement": result.last_eval.get("eval_top1_agreement"),
            "teacher_eval_loss": teacher_eval["eval_loss"], "exact_match": results.get("exact_match"),
            "rouge_l": results.get("rouge_l"), "teacher_outputs_computed": train_cache.computed,
            "teacher_answers_computed": answers_computed,
            "on_policy_share": state.figures()["on_policy_share"] if state is not None else None,
            "on_policy_new_tokens": state.figures()["on_policy_new_tokens"] if state is not None else None,
            "final": str(final_dir) if not result.stopped else None, "tracking_run_id": tracker.run_id,
            "history": result.history}
