"""Fine-tuning an encoder (BERT-style) with a classification head: `llmkit finetune`.

    labelled snippets (domain task or a .jsonl) -> stratified, balanced train / test split -> tokenizer
    -> EncoderClassifier (from scratch or `init_from` a pretrained encoder) -> AdamW + warmup/cosine
    -> loop { step, log, eval accuracy / loss on test, checkpoint } -> final model dir + labels.json + results.json

The default task is **source (domain) identification**: every source file is cut into snippets of
`data.snippet_chars` characters and each snippet is labelled with the name of the corpus it came from
(Shakespeare -> literature, Wikipedia -> encyclopedia, C4 -> web). A user `.jsonl` with `text` and `label`
fields can be used instead (or in addition). See docs/classify.md.

Resume is exact, as in pretraining: a checkpoint holds model, optimizer, scheduler, the torch RNG (dropout)
and the position in the shuffled epoch, so the losses after `resume=True` are bit-identical to an
uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from llmkit import runtime
from llmkit.finetune.classify_data import (
    ClassifyDataConfig,
    EpochBatches,
    LabelledSplit,
    build_dataset,
    encode_split,
    read_labelled_jsonl,
    snippets,
    split_digest,
)
from llmkit.models.adapters import save_adapter
from llmkit.models.encoder import EncoderClassifier, EncoderConfig
from llmkit.models.io import load_model, save_model
from llmkit.models.lora import LoRAConfig, apply_lora, lora_parameters, merge_lora
from llmkit.models.prefix import PrefixConfig, apply_prefix, prefix_parameters
from llmkit.tokenizer import Tokenizer, train_bpe, train_char
from llmkit.track import TrackConfig, Tracker
from llmkit.train import loop

log = logging.getLogger(__name__)

__all__ = [
    "ClassifyConfig",
    "ClassifyDataConfig",
    "ClassifyTrainConfig",
    "LabelledSplit",
    "build_dataset",
    "encode_split",
    "finetune_classifier",
    "read_labelled_jsonl",
    "snippets",
]

LABELS_FILE = "labels.json"
RESULTS_FILE = "results.json"


# -- config ---------------------------------------------------------------------------------------


@dataclass
class ClassifyTrainConfig(loop.LoopConfig):
    """Classification's `train:` section: the shared loop settings (`LoopConfig`) plus `eval_batch_size`."""

    batch_size: int = 32
    max_steps: int = 500
    lr: float = 5e-4
    min_lr: float | None = 5e-5
    warmup_steps: int = 50
    weight_decay: float = 0.01
    beta2: float = 0.999
    eval_interval: int = 100
    checkpoint_interval: int = 250
    keep_checkpoints: int = 2
    eval_batch_size: int | None = None
    """Batch size for evaluation; None -> 2 * batch_size."""

    def validate(self) -> None:
        super().validate()
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size: must be >= 1, got {self.eval_batch_size}")


@dataclass
class ClassifyConfig:
    task: Literal["classify"] = "classify"
    out_dir: str = "runs/classify"
    method: Literal["full", "lora", "prefix"] = "full"
    """full: every weight trains; lora / prefix: the encoder is frozen and adapters train (at
    lr x lr_ratio) with the pooler and classification head (which are new, so they always train)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    init_from: str | None = None
    """A pretrained encoder model directory (e.g. trained with MLM): its architecture, weights and tokenizer
    are used and `model` is ignored; the classification head is freshly initialised."""
    model: EncoderConfig = field(default_factory=EncoderConfig)
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    train: ClassifyTrainConfig = field(default_factory=ClassifyTrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)




# -- metrics --------------------------------------------------------------------------------------


def classification_report(confusion: list[list[int]], names: list[str]) -> dict:
    """accuracy, macro F1 and per-class precision / recall / F1 / support of a confusion matrix
    (rows = true label, columns = predicted label)."""
    n = len(names)
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(n))
    per_class = {}
    for i, name in enumerate(names):
        tp = confusion[i][i]
        predicted = sum(confusion[r][i] for r in range(n))
        support = sum(confusion[i])
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        per_class[name] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                           "support": support}
    return {"accuracy": correct / total if total else 0.0,
            "macro_f1": sum(c["f1"] for c in per_class.values()) / n if n else 0.0,
            "per_class": per_class, "confusion_matrix": confusion, "labels": names, "n_examples": total}


@torch.no_grad()
def evaluate_classifier(model, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_size: int,
                        device: torch.device, n_labels: int) -> tuple[float, list[list[int]]]:
    """(mean cross-entropy, confusion matrix) of `model` on encoded data; restores train mode after."""
    was_training = model.training
    model.eval()
    ids, mask, labels = data
    loss_sum, confusion = 0.0, torch.zeros((n_labels, n_labels), dtype=torch.long)
    for start in range(0, len(labels), batch_size):
        x, m, y = (t[start:start + batch_size].to(device) for t in (ids, mask, labels))
        logits, _ = model(x, attention_mask=m)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(-1)
        confusion += torch.bincount(y.cpu() * n_labels + pred.cpu(), minlength=n_labels * n_labels
                                    ).view(n_labels, n_labels)
    model.train(was_training)
    return loss_sum / max(1, len(labels)), confusion.tolist()


# -- model ----------------------------------------------------------------------------------------


def _build_model(cfg: ClassifyConfig, n_labels: int, tokenizer) -> EncoderClassifier:
    """A fresh classifier from `cfg.model`, or one whose encoder is loaded from `cfg.init_from`."""
    if cfg.init_from:
        pretrained = load_model(cfg.init_from)
        encoder = getattr(pretrained, "encoder", pretrained)  # an Encoder, or a classifier's encoder
        config = dataclasses.replace(encoder.config, n_labels=n_labels)
        if config.vocab_size is not None and config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"init_from: {cfg.init_from} has vocab_size {config.vocab_size} < the tokenizer's "
                             f"{tokenizer.vocab_size}")
        cfg.model = config
        model = EncoderClassifier(config)
        # a pretrained Encoder carries an MLM head the classifier does not use: load everything else
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("mlm_head.")}
        model.encoder.load_state_dict(state, strict=True)
        return model
    cfg.model.n_labels = n_labels
    cfg.model.pad_token_id = tokenizer.pad_id
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens")
    return EncoderClassifier(cfg.model)


def _resolve_tokenizer(cfg: ClassifyConfig, train: LabelledSplit, out: Path, resume: bool):
    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer)
    if cfg.init_from:
        return Tokenizer.load(cfg.init_from)
    tok_dir = out / "tokenizer"
    if resume and (tok_dir / "tokenizer.json").is_file():
        return Tokenizer.load(tok_dir)
    log.info("training a %s tokenizer on %d training texts", cfg.data.tokenizer_kind, len(train))
    if cfg.data.tokenizer_kind == "char":
        tok = train_char(train.texts)
    else:
        tok = train_bpe(train.texts, vocab_size=cfg.data.tokenizer_vocab_size)
    tok.save(tok_dir)
    return tok


def _apply_method(model: EncoderClassifier, cfg: ClassifyConfig) -> list[torch.nn.Parameter]:
    """Freeze the encoder and attach adapters (lora / prefix); returns the adapter parameters."""
    if cfg.method == "lora":
        apply_lora(model, cfg.lora)
        return lora_parameters(model)
    if cfg.method == "prefix":
        apply_prefix(model, cfg.prefix)
        return prefix_parameters(model)
    return []


def _save_final(model: EncoderClassifier, final_dir: Path, tokenizer, names: list[str],
                cfg: ClassifyConfig) -> None:
    """full and lora: a plain model dir (LoRA merged in), lora also keeps its adapter in final/adapter;
    prefix: an adapter dir (PEFT layout, the head as modules_to_save) over `init_from`."""
    if cfg.method == "prefix":
        save_adapter(model, final_dir, cfg.init_from)
        tokenizer.save(final_dir)
    else:
        if cfg.method == "lora":
            save_adapter(model, final_dir / "adapter", cfg.init_from)
            model = merge_lora(model)
        save_model(model, final_dir, tokenizer)
    _write_labels(final_dir / LABELS_FILE, names)


def _write_labels(path: Path, names: list[str]) -> None:
    path.write_text(json.dumps({"labels": names, "label2id": {n: i for i, n in enumerate(names)},
                                "id2label": {str(i): n for i, n in enumerate(names)}}, indent=2) + "\n")


# -- training -------------------------------------------------------------------------------------


def finetune_classifier(cfg: ClassifyConfig, resume: bool = False) -> dict:
    """Fine-tune an encoder classifier on `cfg.data`; writes `<out_dir>/final` (model dir + labels.json),
    `<out_dir>/results.json` (test accuracy, per-class precision / recall, confusion matrix),
    `<out_dir>/labels.json` and `<out_dir>/metrics.jsonl`.

    Args:
        resume: continue from the newest valid checkpoint in `<out_dir>/checkpoints` (fresh start if none).
    Returns:
        summary dict: step, accuracy, test_loss, train_loss, macro_f1, labels, sizes, paths, history.
    """
    tracker = Tracker(cfg.track, cfg.out_dir)
    with tracker:
        return _finetune(cfg, resume, tracker)


def _finetune(cfg: ClassifyConfig, resume: bool, tracker: Tracker) -> dict:
    t_cfg = cfg.train
    out = Path(cfg.out_dir)
    checkpoint = loop.open_run(out, resume)
    device = runtime.resolve_device(t_cfg.device)

    # -- data, tokenizer, model
    train, test, names = build_dataset(cfg.data)
    n_labels = len(names)
    _write_labels(out / LABELS_FILE, names)
    tokenizer = _resolve_tokenizer(cfg, train, out, resume)
    torch.manual_seed(t_cfg.seed)
    model = _build_model(cfg, n_labels, tokenizer)
    adapters = _apply_method(model, cfg)
    loop.restore_weights(model, checkpoint)
    model.to(device)
    block_size = cfg.model.block_size
    train_data = encode_split(train, tokenizer, block_size, cfg.data.add_cls)
    test_data = encode_split(test, tokenizer, block_size, cfg.data.add_cls)
    log.info("data: %d train / %d test examples, %d classes %s; %d tokens max per example",
             len(train), len(test), n_labels, names, train_data[0].shape[1])
    ratio = {"full": 1.0, "lora": cfg.lora.lr_ratio, "prefix": cfg.prefix.lr_ratio}[cfg.method]
    adapter_ids = {id(p) for p in adapters}
    rest = [p for p in model.parameters() if id(p) not in adapter_ids]  # all (full), else pooler + head
    optimizer = loop.make_optimizer(t_cfg, [(rest, 1.0), (adapters, ratio)])
    autocast = loop.forward_context(device, runtime.resolve_dtype(t_cfg.precision, device))

    # -- tracking
    n_params, n_trainable = loop.start_tracking(tracker, cfg, out, checkpoint, model, n_train=len(train),
                                                n_test=len(test), labels=",".join(names))
    tracker.log_dataset("classify-train", split_digest(train), str(out.resolve()), context="training",
                        profile={"examples": len(train), "per_class": train.counts(n_labels)})
    tracker.log_dataset("classify-test", split_digest(test), str(out.resolve()), context="validation",
                        profile={"examples": len(test), "per_class": test.counts(n_labels)})
    tracker.log_artifact(out / LABELS_FILE)
    log.info("model: %.2fM parameters on %s", n_params / 1e6, device)

    # -- what the loop runs
    eval_bs = t_cfg.eval_batch_size or 2 * t_cfg.batch_size
    batches = EpochBatches(len(train), min(t_cfg.batch_size, len(train)), t_cfg.seed)
    ids, mask, labels = train_data
    confusion: list[list[int]] = []

    def next_batch() -> dict:
        idx = batches.next_indices()
        m = mask[idx]
        width = int(m.sum(1).max())  # trim the batch to its longest sequence
        return {"x": ids[idx, :width].to(device), "attention_mask": m[:, :width].to(device),
                "labels": labels[idx].to(device), "tokens": int(m.sum())}

    def evaluate() -> dict[str, float]:
        with autocast():
            loss, confusion[:] = evaluate_classifier(model, test_data, eval_bs, device, n_labels)
        report = classification_report(confusion, names)
        return {"test_loss": loss, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}

    job = loop.Job(model=model, optimizer=optimizer, next_batch=next_batch,
                   loss=lambda b: model(b["x"], attention_mask=b["attention_mask"], labels=b["labels"])[1],
                   evaluate=evaluate, data=batches, autocast=autocast, tokens=lambda b: b["tokens"],
                   facts={"labels": names, "method": cfg.method}, name="finetune")
    result = loop.train_loop(t_cfg, job, out, tracker, checkpoint)
    if result.stopped:
        tracker.end("KILLED")
        return {"step": result.step, "stopped_by_signal": True, "out_dir": str(out), "final_model": None,
                "tracking_run_id": tracker.run_id, "method": cfg.method, "history": result.history}

    # -- the report and the final model
    with autocast():
        train_loss, _ = evaluate_classifier(model, train_data, eval_bs, device, n_labels)
    report = classification_report(confusion, names)
    results = {"step": result.step, "test_loss": result.last_eval["test_loss"], "train_loss": train_loss, **report,
               "n_train": len(train), "n_test": len(test), "chance_accuracy": max(test.counts(n_labels)) / len(test)}
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    final_dir = out / "final"
    _save_final(model.cpu(), final_dir, tokenizer, names, cfg)
    tracker.log_metrics({"final_accuracy": report["accuracy"], "final_macro_f1": report["macro_f1"]}, result.step)
    tracker.log_artifact(out / RESULTS_FILE)
    tracker.log_artifact(final_dir, "model")
    tracker.end("FINISHED")
    return {**results, "stopped_by_signal": False, "out_dir": str(out), "final_model": str(final_dir),
            "tracking_run_id": tracker.run_id, "n_params": n_params, "n_trainable": n_trainable,
            "method": cfg.method, "history": result.history}
