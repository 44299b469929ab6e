"""Preference tuning of a decoder (`task: preference`): DPO, cDPO, IPO, ORPO, SimPO, KTO.

    base model dir -> method (full / lora / prefix, `sft.prepare_model`) -> preference pairs (or unpaired KTO
    examples) rendered with the model's chat template, response tokens scored -> reference log-probs of every
    sequence from the frozen base model, computed once and cached on disk by content -> `train_loop` with the
    chosen loss (`preference_losses`) -> held-out reward accuracy at each eval -> final/ (model or adapter dir)

Reference log-probs: a cache file keyed by (sha256 of the base weights, digest of the tokenized data and the
template); a rerun, a resumed run or a sweep over beta / loss reads it (`ReferenceLogps.computed` False). The
reference is the base model as loaded from `base_model` - for LoRA / prefix that is the policy with its adapters
off. ORPO and SimPO use none.

Per log step (metrics.jsonl and the tracker): rewards/chosen, rewards/rejected, rewards/margin,
rewards/accuracy (beta x log-ratio; for KTO rewards of desirable / undesirable examples), logps/chosen,
logps/rejected (the policy's), kl (mean log pi - log pi_ref over the step's sequences). At eval_interval the
same on held-out data with `eval_` names; `eval_reward_accuracy` is the headline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from llmkit import runtime
from llmkit.chat import load_chat_template
from llmkit.data.tokenized import file_sha256
from llmkit.finetune import preference_losses as L
from llmkit.finetune.preference_data import (
    PreferenceData,
    PreferenceDataConfig,
    PreferenceExample,
    build_preference_data,
)
from llmkit.finetune.sft import prepare_model, save_finetuned
from llmkit.models.io import load_model
from llmkit.models.lora import LoRAConfig
from llmkit.models.prefix import PrefixConfig
from llmkit.registry import resolve_model
from llmkit.tokenizer import Tokenizer
from llmkit.track import TrackConfig, Tracker
from llmkit.train import loop

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


@dataclass
class PreferenceTrainConfig(loop.LoopConfig):
    max_steps: int = 200
    lr: float = 5e-6
    """Base-weight rate (full); adapters at lr x lr_ratio."""
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta2: float = 0.999
    batch_size: int = 4
    """Pairs (or unpaired examples) per micro-batch."""
    eval_interval: int = 50
    checkpoint_interval: int = 50
    keep_checkpoints: int = 2


@dataclass
class PreferenceConfig:
    task: Literal["preference"] = "preference"
    out_dir: str = "runs/preference"
    base_model: str = ""
    method: Literal["full", "lora", "prefix"] = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    loss: Literal["dpo", "cdpo", "ipo", "orpo", "simpo", "kto"] = "dpo"
    beta: float = 0.1
    """DPO / cDPO / KTO temperature, IPO's tau, SimPO's reward scale (the paper: 2.0-2.5)."""
    label_smoothing: float = 0.1
    """cDPO's eps (the share of labels assumed flipped)."""
    ipo_per_token: bool = True
    """IPO on log-ratios averaged per response token (TRL's form, which the IPO authors confirmed for their
    results: beta sets a target margin of 1/(2 beta) per token); false = summed over the response."""
    orpo_lambda: float = 0.1
    simpo_gamma: float = 0.5
    kto_lambda_desirable: float = 1.0
    kto_lambda_undesirable: float = 1.0
    reference_cache: str = "~/.cache/llmkit/preference"
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: PreferenceTrainConfig = field(default_factory=PreferenceTrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def validate(self) -> None:
        if not self.base_model:
            raise ValueError("base_model: required (a pretrained llmkit decoder directory)")
        if self.beta <= 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if self.lora.init_from and self.method != "lora":
            raise ValueError(f"lora.init_from: needs method: lora, not {self.method}")


# -- log-probs -------------------------------------------------------------------------------------
def sequence_logps(model, seqs: list[tuple[np.ndarray, np.ndarray]], pad_id: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each sequence's response tokens (N,) fp32, their count (N,)): one padded forward."""
    width = max(len(ids) for ids, _ in seqs) - 1
    x = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    y = torch.zeros((len(seqs), width), dtype=torch.long)
    w = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (ids, m) in enumerate(seqs):
        t = torch.from_numpy(ids)
        x[r, :len(ids) - 1] = t[:-1]
        y[r, :len(ids) - 1] = t[1:]
        w[r, :len(ids) - 1] = torch.from_numpy(m[1:])
    x, y, w = x.to(device), y.to(device), w.to(device)
    logits, _ = model(x)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (logp * w).sum(-1), w.sum(-1).float()


@dataclass
class ReferenceLogps:
    train: np.ndarray
    """(examples, sequences per example) float64."""
    eval: np.ndarray
    path: Path
    computed: bool


def reference_key(model_digest: str, data_digest: str) -> str:
    text = json.dumps({"model": model_digest, "data": data_digest, "version": 1}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@torch.no_grad()
def _compute_reference(model, examples: list[PreferenceExample], pad_id: int, device, batch_size: int) -> np.ndarray:
    k = len(examples[0].seqs) if examples else 2
    out = np.zeros((len(examples), k), dtype=np.float64)
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        logps, _ = sequence_logps(model, [q for e in chunk for q in e.seqs], pad_id, device)
        out[s:s + len(chunk)] = logps.double().cpu().numpy().reshape(len(chunk), k)
    return out


def reference_logps(base_model: str, data: PreferenceData, pad_id: int, cache_dir: str | Path, device,
                    batch_size: int = 8) -> ReferenceLogps:
    """The frozen base model's log-probs of every train / eval sequence, read from the content-keyed cache or
    computed once (then written atomically)."""
    key = reference_key(file_sha256(Path(base_model) / "model.safetensors"), data.digest)
    root = Path(cache_dir).expanduser()
    path = root / f"reference-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            if len(z["train"]) == len(data.train) and len(z["eval"]) == len(data.eval):
                log.info("reference log-probs read from %s", path)
                return ReferenceLogps(z["train"], z["eval"], path, computed=False)
    with torch.random.fork_rng(devices=[]):  # building the model draws init weights: a cache hit or miss must
        model = load_model(base_model).to(device)  # leave the training run's random stream as it is
    model.eval()
    train = _compute_reference(model, data.train, pad_id, device, batch_size)
    eval_ = _compute_reference(model, data.eval, pad_id, device, batch_size)
    del model
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(tmp, train=train, eval=eval_)
    os.replace(tmp, path)
    log.info("reference log-probs of %d + %d examples written to %s", len(train), len(eval_), path)
    return ReferenceLogps(train, eval_, path, computed=True)


# -- batches ---------------------------------------------------------------------------------------
class PreferenceBatches:
    """Indices of training examples, a seeded permutation per epoch; resumable position."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(int(self._perm[self.pos]))
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._perm = self._permutation()


# -- the loss and its statistics -------------------------------------------------------------------
def preference_loss(cfg: PreferenceConfig, logps: torch.Tensor, lens: torch.Tensor, ref: torch.Tensor,
                    labels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss of a batch and its statistics. logps / lens / ref: (B, k) - k = 2: [chosen, rejected] for
    pairs, [completion, mismatched completion] for KTO."""
    b = cfg.beta
    if cfg.loss == "kto":
        z0 = L.kto_reference_point(logps[:, 1], ref[:, 1])
        losses = L.kto_loss(logps[:, 0], ref[:, 0], labels, b, z0, cfg.kto_lambda_desirable,
                            cfg.kto_lambda_undesirable)
        rew = L.implicit_rewards(logps[:, 0], ref[:, 0], b).detach()
        good = labels.bool()
        stats = {"kl": float(z0), "rewards/accuracy": float(((rew > 0) == good).float().mean()),
                 "logps/completion": float(logps[:, 0].detach().mean())}
        if good.any():
            stats["rewards/chosen"] = float(rew[good].mean())
        if (~good).any():
            stats["rewards/rejected"] = float(rew[~good].mean())
        return losses.mean(), stats
    pc, pr, rc, rr = logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1]
    if cfg.loss == "dpo":
        losses = L.dpo_loss(pc, pr, rc, rr, b)
    elif cfg.loss == "cdpo":
        losses = L.dpo_loss(pc, pr, rc, rr, b, cfg.label_smoothing)
    elif cfg.loss == "ipo" and cfg.ipo_per_token:
        lc, lr = lens[:, 0], lens[:, 1]
        losses = L.ipo_loss(pc / lc, pr / lr, rc / lc, rr / lr, b)
    elif cfg.loss == "ipo":
        losses = L.ipo_loss(pc, pr, rc, rr, b)
    elif cfg.loss == "orpo":
        losses = L.orpo_loss(pc, pr, lens[:, 0], lens[:, 1], cfg.orpo_lambda)
    else:
        losses = L.simpo_loss(pc, pr, lens[:, 0], lens[:, 1], b, cfg.simpo_gamma)
    if cfg.loss == "simpo":  # its own reward: beta x mean log-prob
        r_c, r_r = (b * pc / lens[:, 0]).detach(), (b * pr / lens[:, 1]).detach()
    else:
        r_c, r_r = L.implicit_rewards(pc, rc, b).detach(), L.implicit_rewards(pr, rr, b).detach()
    stats = {"rewards/chosen": float(r_c.mean()), "rewards/rejected": float(r_r.mean()),
             "rewards/margin": float((r_c - r_r).mean()), "rewards/accuracy": float((r_c > r_r).float().mean()),
             "logps/chosen": float(pc.detach().mean()), "logps/rejected": float(pr.detach().mean()),
             "logps/accuracy": float((pc > pr).float().mean()),
             "kl": float(((logps - ref).detach()).mean())}
    return losses.mean(), stats


def _mean_stats(rows: list[tuple[dict, int]]) -> dict[str, float]:
    keys = {k for r, _ in rows for k in r}
    out = {}
    for k in sorted(keys):
        got = [(r[k], n) for r, n in rows if k in r]
        out[k] = sum(v * n for v, n in got) / sum(n for _, n in got)
    return out


# -- the recipe ------------------------------------------------------------------------------------
def finetune_preference(cfg: PreferenceConfig, resume: bool = False) -> dict:
    """Preference-tune `cfg.base_model`; returns a summary (see the module docstring for what it writes)."""
    cfg.base_model = str(resolve_model(cfg.base_model))
    cfg.validate()
    cfg.data.validate()
    tracker = Tracker(cfg.track, cfg.out_dir)
    with tracker:
        return _run(cfg, resume, tracker)


def _run(cfg: PreferenceConfig, resume: bool, tracker: Tracker) -> dict:
    t_cfg = cfg.train
    out = Path(cfg.out_dir)
    checkpoint = loop.open_run(out, resume)
    device = runtime.resolve_device(t_cfg.device)

    torch.manual_seed(t_cfg.seed)
    tokenizer = Tokenizer.load(cfg.base_model)
    template = load_chat_template(cfg.base_model)
    model, base_params, adapter_params = prepare_model(cfg, device)
    if model.config.FAMILY != "decoder":
        raise ValueError(f"base_model: preference tuning needs a decoder, {cfg.base_model} is {model.config.FAMILY}")
    loop.restore_weights(model, checkpoint)
    data = build_preference_data(cfg.data, tokenizer, template, model.config.block_size)
    if data.paired == (cfg.loss == "kto"):
        raise ValueError(f"loss {cfg.loss}: needs {'unpaired {prompt, completion, label}' if cfg.loss == 'kto' else 'paired {prompt, chosen, rejected}'} "
                         "data, the data given is the other kind")
    if data.malformed:
        log.warning("%d malformed preference records (first: %s)", len(data.malformed), data.malformed[0])
    if cfg.loss in L.REFERENCE_FREE:
        ref = ReferenceLogps(np.zeros((len(data.train), 2)), np.zeros((len(data.eval), 2)), Path(), False)
    else:
        ref = reference_logps(cfg.base_model, data, tokenizer.pad_id, cfg.reference_cache, device, t_cfg.batch_size)
    batches = PreferenceBatches(len(data.train), t_cfg.batch_size, cfg.data.seed)
    lr_ratio = {"full": 1.0, "lora": cfg.lora.lr_ratio, "prefix": cfg.prefix.lr_ratio}[cfg.method]
    optimizer = loop.make_optimizer(t_cfg, [(base_params, 1.0), (adapter_params, lr_ratio)])
    autocast = loop.forward_context(device, runtime.resolve_dtype(t_cfg.precision, device))

    n_total, n_trainable = loop.start_tracking(tracker, cfg, out, checkpoint, model)
    base_sha256 = file_sha256(Path(cfg.base_model) / "model.safetensors")
    tracker.set_tags({"llmkit.parent_model": str(Path(cfg.base_model).resolve()),
                      "llmkit.parent_model_sha256": base_sha256})
    tracker.log_dataset("preferences", data.digest, ",".join(cfg.data.paths + cfg.data.construct_from),
                        context="training", profile=data.summary() | {"malformed_examples": None})
    log.info("%s / %s: %d train, %d held-out; %d malformed, %d truncated, %d too long; reference %s",
             cfg.method, cfg.loss, len(data.train), len(data.eval), len(data.malformed), data.truncated,
             data.too_long, "read from cache" if not ref.computed else "computed")

    def batch_tensors(examples: list[PreferenceExample], ref_rows: np.ndarray):
        logps, lens = sequence_logps(model, [q for e in examples for q in e.seqs], tokenizer.pad_id, device)
        k = len(examples[0].seqs)
        labels = (torch.tensor([bool(e.label) for e in examples], device=device)
                  if not data.paired else None)
        return (logps.view(len(examples), k), lens.view(len(examples), k),
                torch.from_numpy(ref_rows).to(device=device, dtype=torch.float32), labels)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if not data.eval:
            return {}
        was = model.training
        model.eval()
        rows = []
        for s in range(0, len(data.eval), t_cfg.batch_size):
            chunk = data.eval[s:s + t_cfg.batch_size]
            with autocast():
                logps, lens, r, labels = batch_tensors(chunk, ref.eval[s:s + len(chunk)])
            loss, stats = preference_loss(cfg, logps, lens, r, labels)
            rows.append(({"loss": float(loss), **stats}, len(chunk)))
        model.train(was)
        m = _mean_stats(rows)
        return {"eval_" + k.replace("rewards/", "reward_").replace("logps/", "logps_"): v for k, v in m.items()}

    # per-step training statistics, written as their own metrics rows at the loop's log cadence
    start = checkpoint.step if checkpoint is not None else 0
    window: list[tuple[dict, int]] = []
    calls = [0]
    metrics_path = out / "metrics.jsonl"

    def next_batch():
        idx = batches.next()
        return [data.train[i] for i in idx], ref.train[idx]

    def loss_fn(batch) -> torch.Tensor:
        examples, ref_rows = batch
        logps, lens, r, labels = batch_tensors(examples, ref_rows)
        loss, stats = preference_loss(cfg, logps, lens, r, labels)
        window.append((stats, len(examples)))
        calls[0] += 1
        if calls[0] % t_cfg.grad_accum == 0:
            step = start + calls[0] // t_cfg.grad_accum
            if step % t_cfg.log_interval == 0 or step == t_cfg.max_steps:
                row = {"step": step, **_mean_stats(window)}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                tracker.log_metrics({k.replace("/", "_"): v for k, v in row.items() if k != "step"}, step)
                window.clear()
        return loss

    before = evaluate() if start == 0 else None
    if before:
        (out / "before.json").write_text(json.dumps(before, indent=2) + "\n")
        tracker.log_metrics({"before_" + k: v for k, v in before.items()}, 0)

    job = loop.Job(model=model, optimizer=optimizer, next_batch=next_batch, loss=loss_fn, evaluate=evaluate,
                   data=batches, autocast=autocast,
                   tokens=lambda b: int(sum(int(m[1:].sum()) for e in b[0] for _, m in e.seqs)),
                   facts={"method": cfg.method, "loss": cfg.loss}, name=f"preference ({cfg.loss}, {cfg.method})")
    result = loop.train_loop(t_cfg, job, out, tracker, checkpoint)

    final_dir = out / "final"
    if not result.stopped:
        if (out / "before.json").is_file():
            before = json.loads((out / "before.json").read_text())
        results = {"method": cfg.method, "loss": cfg.loss, "beta": cfg.beta, "step": result.step,
                   "n_trainable": n_trainable, "trainable_share": n_trainable / n_total, "data": data.summary(),
                   "reference_cache": str(ref.path) if cfg.loss not in L.REFERENCE_FREE else None,
                   "before": before, "after": result.last_eval}
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        tracker.log_artifact(out / RESULTS_FILE)
        save_finetuned(model, cfg, tokenizer, template, final_dir)
        tracker.log_artifact(final_dir, "adapter" if cfg.method != "full" else "model")
    tracker.end("KILLED" if result.stopped else "FINISHED")
    return {"step": result.step, "stopped_by_signal": result.stopped, "method": cfg.method, "loss": cfg.loss,
            "reference_computed": ref.computed, "reference_cache": str(ref.path), "data": data.summary(),
            "before": before, "after": result.last_eval, "final": str(final_dir) if not result.stopped else None,
            "tracking_run_id": tracker.run_id, "history": result.history}
