"""Meta-learned LoRA initialisation: first-order MAML and Reptile over many small instruction tasks.

Standard LoRA starts every new task from the same point: A Kaiming-uniform, B = 0, i.e. the base model
itself. Meta-learning instead *learns* that starting point phi = (A, B of every adapted module) from a family
of tasks, so that a few gradient steps on a new task's handful of examples (its *support* set) already give
a low loss on that task's unseen examples (its *query* set).

MAML (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
arXiv:1703.03400) states the goal directly. For a task T with support loss L_s and query loss L_q, adapt by
k steps of SGD at the inner rate alpha,

    phi_T = U_k(phi) = phi - alpha grad L_s(phi) - ...   (k times)

and minimise the post-adaptation query loss over tasks: min_phi E_T L_q(U_k(phi)). Its exact gradient runs
through the inner steps (Hessian-vector products). **First-order MAML** (FO-MAML, same paper, §5.2) drops
those second-order terms and uses the query gradient *at the adapted point* as the meta-gradient:

    g_T = grad L_q(phi_T),        phi <- phi - beta * mean_T g_T           (beta: the outer rate)

**Reptile** (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999)
needs no support/query split at all: run the k inner steps on the task and move the initialisation toward
the adapted weights,

    phi <- phi + epsilon * mean_T (phi_T - phi)                               (epsilon: the meta step size)

With k = 1, phi_T - phi = -alpha grad L_s(phi): Reptile is then SGD on the expected task loss (joint
training), which is why k > 1 matters. Nichol et al. show by a Taylor expansion that for k >= 2 both
first-order methods contain a term that maximises the inner product of gradients of different mini-batches
of the same task, i.e. they favour points from which one step generalises within a task. Here Reptile's
inner steps use the support batch; its query batch is only measured (the `query_loss` metric).

What is learned here is only the LoRA factors (A and B of the adapted projections, and trainable token rows
if configured); the base model stays frozen, as in LoRA. The inner loop is plain SGD at `inner_lr` on the full
support batch (as in the MAML and Reptile papers' few-shot experiments); the outer update is the rule above
at `outer_lr`, linearly annealed to 0 over the run when `anneal` is set (Nichol et al.'s schedule). The result
is an ordinary PEFT adapter directory (`out_dir/final`), so `llmkit finetune ... lora.init_from=out_dir`
starts a standard LoRA fine-tune from it.

Tasks (`MetaTasksConfig`) come from instruction files (alpaca / sharegpt): every conversation is sorted into
a task `<language>/<category>` (language: zh when at least 30% of the user turn's letters are CJK, else en;
category from the instruction's leading verb, `CATEGORY_WORDS`: write, explain, list, rewrite, analyze,
other), or with `group_by: file` into one task per file. Tasks named in `heldout` are for evaluation only:
none of their conversations (nor an exact duplicate of one) is used in meta-training. Records that are not
usable conversations, that the chat template refuses, or that keep no response token within `max_len` are
counted and listed in the summary (`malformed`), not silently dropped; tasks with fewer than `min_examples`
conversations are listed in `too_small` and left out.

Evaluation (`adapt_and_score`): each held-out task has a fixed support set (`support_size` conversations) and a
fixed query set (up to `eval_query_size` others); from an initialisation, k SGD steps at `inner_lr` on the
support set, then the query loss (response tokens, token-weighted). At step 0 the initialisation is the
standard fresh LoRA (B = 0), so `metrics.jsonl`'s first eval row is the zero-init baseline.

Resume: a checkpoint (`llmkit.train.checkpoint`, atomic and checksummed) every `checkpoint_interval`
meta-iterations and at the end holds phi and the task sampler's RNG state; `resume=True` continues from the
newest valid one with the same result as an uninterrupted run. SIGTERM / Ctrl-C write a checkpoint at the
current iteration and return (`stopped_by_signal`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from llmkit.chat import ChatFormatError, encode_chats, load_chat_template, save_chat_template
from llmkit.config import save_config
from llmkit.finetune.instruction_formats import read_instruction_file
from llmkit.models.adapters import save_adapter
from llmkit.models.io import load_model
from llmkit.models.lora import LoRAConfig, apply_lora, lora_parameters
from llmkit.tokenizer import Tokenizer
from llmkit.train.checkpoint import load_latest_checkpoint, save_checkpoint
from llmkit.train.loop import truncate_metrics
from llmkit.train.preemption import StopSignal

log = logging.getLogger(__name__)

__all__ = ["CATEGORY_WORDS", "adaptation_verdict", "MetaLoRAConfig", "MetaTask", "MetaTasksConfig", "MetaTrainConfig", "adapt_and_score",
           "build_tasks", "category_of", "language_of", "meta_step", "meta_train_lora"]

# Leading-verb categories of an instruction. English: the first word of the instruction found in a list;
# Chinese: the earliest keyword in the instruction (the longer one at a tie).
CATEGORY_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "write": (("generate", "create", "write", "compose", "design", "construct", "brainstorm", "come", "make",
               "imagine", "develop", "invent", "draft", "produce", "build", "formulate", "devise", "craft"),
              ("生成", "创建", "创造", "创作", "写", "设计", "构建", "编写", "想出", "撰写", "组成", "造句", "编一", "建立", "制作", "讲一个", "输出")),
    "explain": (("describe", "explain", "what", "how", "why", "who", "when", "where", "discuss", "tell", "define",
                 "outline", "is", "are", "does", "do", "can"),
                ("解释", "描述", "什么", "如何", "为什么", "怎么", "介绍", "讨论", "说明", "定义", "为何", "研究", "多少", "告诉")),
    "list": (("list", "name", "give", "provide", "suggest", "identify", "find", "recommend", "choose", "select",
              "pick", "state", "enumerate", "output", "offer", "propose"),
             ("列出", "说出", "提供", "给出", "建议", "找出", "找到", "识别", "推荐", "举出", "命名", "选择", "列举")),
    "rewrite": (("rewrite", "edit", "summarize", "summarise", "change", "convert", "rearrange", "translate",
                 "paraphrase", "correct", "transform", "shorten", "replace", "reword", "reformat", "remove", "add",
                 "insert", "combine", "complete", "fix", "simplify", "expand", "delete", "reorder", "restate"),
                ("改写", "重写", "编辑", "总结", "翻译", "转换", "修改", "改成", "缩短", "删除", "替换", "重新排列",
                 "纠正", "概括", "改为", "补充", "扩展", "简化", "重新", "添加", "去掉", "删掉", "加入",
                 "拼接")),
    "analyze": (("classify", "categorize", "categorise", "determine", "compare", "analyze", "analyse", "calculate",
                 "evaluate", "assess", "decide", "predict", "compute", "solve", "sort", "rank", "detect",
                 "estimate", "check", "judge", "contrast", "verify", "differentiate", "distinguish"),
                ("分类", "判断", "确定", "比较", "分析", "计算", "评估", "预测", "排序", "归类", "求解", "检查",
                 "区分", "判定", "评价", "排列", "哪个", "评分")),
}
_WORD = re.compile(r"[A-Za-z]+")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LETTER = re.compile(r"[A-Za-z\u3400-\u9fff\uf900-\ufaff]")


def language_of(text: str) -> str:
    """"zh" when at least 30% of the letters of `text` are CJK ideographs, else "en"."""
    letters = len(_LETTER.findall(text))
    return "zh" if letters and len(_CJK.findall(text)) / letters >= 0.3 else "en"


def category_of(instruction: str) -> str:
    """The `CATEGORY_WORDS` category of an instruction (its leading verb), "other" when none matches."""
    if language_of(instruction) == "zh":
        best: tuple[int, int, str] | None = None
        for cat, (_, words) in CATEGORY_WORDS.items():
            for w in words:
                i = instruction.find(w)
                if i >= 0 and (best is None or (i, -len(w)) < (best[0], best[1])):
                    best = (i, -len(w), cat)
        return best[2] if best is not None else "other"
    lookup = {w: cat for cat, (words, _) in CATEGORY_WORDS.items() for w in words}
    for w in _WORD.findall(instruction.lower())[:12]:
        if w in lookup:
            return lookup[w]
    return "other"


# -- config -----------------------------------------------------------------------------------------


@dataclass
class MetaTasksConfig:
    """The task family (the ``tasks:`` section)."""

    paths: list[str] = field(default_factory=list)
    """Instruction files (alpaca / sharegpt, .json / .jsonl)."""
    format: Literal["auto", "alpaca", "sharegpt"] = "auto"
    group_by: Literal["category", "file"] = "category"
    """category: one task per `<language>/<category>` of the first user turn (`category_of`); file: one task per
    file, named by its file stem."""
    heldout: list[str] = field(default_factory=list)
    """Task names kept out of meta-training and used to evaluate adaptation (e.g. [en/rewrite, zh/analyze])."""
    min_examples: int = 24
    """Tasks with fewer usable conversations are left out (listed in the summary's `too_small`)."""
    max_len: int = 256
    """Tokens per conversation at most (longer ones are cut at the right and counted)."""

    def validate(self) -> None:
        if not self.paths:
            raise ValueError("paths: at least one instruction file is required")
        if not self.heldout:
            raise ValueError("heldout: name at least one task to evaluate adaptation on (e.g. [en/rewrite])")
        if self.min_examples < 2:
            raise ValueError(f"min_examples: must be >= 2, got {self.min_examples}")
        if self.max_len < 8:
            raise ValueError(f"max_len: must be >= 8, got {self.max_len}")


@dataclass
class MetaTrainConfig:
    """The meta-training loop (the ``train:`` section)."""

    algorithm: Literal["reptile", "fo-maml"] = "reptile"
    meta_iters: int = 200
    """Outer (meta) iterations."""
    tasks_per_batch: int = 4
    """Tasks sampled (without replacement) per meta-iteration; their updates are averaged."""
    inner_steps: int = 5
    """k: SGD steps on a task's support batch per adaptation (meta-training and evaluation alike)."""
    inner_lr: float = 0.05
    """alpha: the inner SGD learning rate."""
    outer_lr: float = 0.5
    """Reptile: the meta step size epsilon (phi += epsilon * mean(phi_T - phi), 1.0 moves all the way);
    fo-maml: the outer SGD rate beta (phi -= beta * mean query gradient)."""
    anneal: bool = True
    """Anneal outer_lr linearly to 0 over meta_iters (Nichol et al. 2018)."""
    inner_grad_clip: float = 0.0
    """Clip each inner gradient to this global norm; 0 disables."""
    support_size: int = 8
    """Conversations in a task's support batch (the k-shot set the inner loop trains on)."""
    query_size: int = 8
    """Conversations in a task's query batch during meta-training (FO-MAML's meta-gradient)."""
    eval_query_size: int = 32
    """Query conversations per held-out task at evaluation (fixed, disjoint from its support set)."""
    eval_k: list[int] = field(default_factory=lambda: [0, 1, 5, 10])
    """Adaptation steps at which held-out query loss is measured."""
    eval_interval: int = 50
    log_interval: int = 10
    checkpoint_interval: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    """Seeds the fresh LoRA (A's init) and the task / example sampling."""
    device: str = "cpu"

    def validate(self) -> None:
        for name in ("meta_iters", "tasks_per_batch", "inner_steps", "support_size", "query_size",
                     "eval_query_size", "eval_interval", "log_interval", "checkpoint_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("inner_lr", "outer_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.inner_grad_clip < 0:
            raise ValueError(f"inner_grad_clip: must be >= 0, got {self.inner_grad_clip}")
        if not self.eval_k or min(self.eval_k) < 0:
            raise ValueError(f"eval_k: non-negative step counts required, got {self.eval_k}")


@dataclass
class MetaLoRAConfig:
    out_dir: str = "runs/meta_lora"
    base_model: str = ""
    """A pretrained llmkit decoder directory (weights, config, tokenizer)."""
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=8, alpha=16, dropout=0.0))
    tasks: MetaTasksConfig = field(default_factory=MetaTasksConfig)
    train: MetaTrainConfig = field(default_factory=MetaTrainConfig)

    def validate(self) -> None:
        if not self.base_model:
            raise ValueError("base_model: required (a pretrained llmkit decoder directory)")
        if self.lora.init_from:
            raise ValueError("lora.init_from: meta-training starts from a fresh LoRA")
        if self.lora.trainable_tokens:
            raise ValueError("lora.trainable_tokens: not supported by meta-training (A and B only)")


# -- tasks ------------------------------------------------------------------------------------------


@dataclass
class MetaTask:
    name: str
    examples: list[tuple[np.ndarray, np.ndarray]]
    """(token ids, loss mask) per conversation, in a fixed seeded order."""


@dataclass
class TaskSet:
    train: list[MetaTask]
    heldout: list[MetaTask]
    malformed: list[dict]
    truncated: int
    too_long: list[str]
    duplicates: int
    too_small: dict[str, int]
    digest: str

    def summary(self) -> dict:
        return {"train_tasks": {t.name: len(t.examples) for t in self.train},
                "heldout_tasks": {t.name: len(t.examples) for t in self.heldout},
                "malformed": len(self.malformed), "malformed_examples": self.malformed[:20],
                "truncated": self.truncated, "too_long": len(self.too_long), "duplicates": self.duplicates, "too_small": self.too_small}


def build_tasks(cfg: MetaTasksConfig, tokenizer, template, seed: int = 0) -> TaskSet:
    """Read, deduplicate, group, tokenize and order the conversations of `cfg.paths` into tasks (see the
    module docstring). ValueError when a held-out task does not exist or no meta-training task is left."""
    cfg.validate()
    convs, locs, names, malformed = [], [], [], []
    for path in cfg.paths:
        c, lc, bad, _, _ = read_instruction_file(path, cfg.format)
        malformed += bad
        for conv, loc in zip(c, lc):
            user = next(m["content"] for m in conv if m["role"] == "user")
            names.append(Path(path).stem if cfg.group_by == "file" else f"{language_of(user)}/{category_of(user)}")
            convs.append(conv)
            locs.append(loc)
    # exact duplicates: kept once, in the held-out task when one copy is there (never in meta-training too)
    first: dict[str, int] = {}
    heldout = set(cfg.heldout)
    for i, conv in enumerate(convs):
        key = json.dumps(conv, ensure_ascii=False, sort_keys=True)
        j = first.get(key)
        if j is None or (names[i] in heldout and names[j] not in heldout):
            first[key] = i
    keep = sorted(first.values())
    duplicates = len(convs) - len(keep)
    encoded = encode_chats(tokenizer, [convs[i] for i in keep], template)
    by_task: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    truncated, too_long = 0, []
    for i, enc in zip(keep, encoded):
        if isinstance(enc, ChatFormatError):
            malformed.append({"where": locs[i], "reason": str(enc)})
            continue
        ids, mask = enc
        if len(ids) > cfg.max_len:
            ids, mask = ids[:cfg.max_len], mask[:cfg.max_len]
            truncated += 1
        if not mask[1:].any():  # the prompt alone fills max_len
            too_long.append(locs[i])
            continue
        key = json.dumps(convs[i], ensure_ascii=False, sort_keys=True)
        by_task.setdefault(names[i], []).append((key, ids, mask))
    unknown = sorted(heldout - set(by_task))
    if unknown:
        raise ValueError(f"tasks.heldout: {unknown} are not tasks of these files; tasks: {sorted(by_task)}")
    tasks, too_small = {}, {}
    digest = hashlib.sha256()
    for name in sorted(by_task):
        rows = by_task[name]
        if len(rows) < cfg.min_examples:
            too_small[name] = len(rows)
            continue
        # a fixed order that depends on the conversation and the seed, not on file order
        rows.sort(key=lambda r: hashlib.sha256(f"{seed}\0{r[0]}".encode()).digest())
        tasks[name] = MetaTask(name, [(ids.astype(np.int64), mask.astype(bool)) for _, ids, mask in rows])
        digest.update(name.encode())
        for _, ids, mask in rows:
            digest.update(ids.astype(np.int64).tobytes())
            digest.update(mask.astype(np.uint8).tobytes())
    small_heldout = sorted(heldout & set(too_small))
    if small_heldout:
        raise ValueError(f"tasks.heldout: {small_heldout} have fewer than tasks.min_examples "
                         f"({cfg.min_examples}) conversations: {({n: too_small[n] for n in small_heldout})}")
    train = [t for n, t in tasks.items() if n not in heldout]
    if not train:
        raise ValueError(f"no meta-training task left: all of {sorted(tasks)} are held out or too small")
    return TaskSet(train, [tasks[n] for n in cfg.heldout], malformed, truncated, too_long, duplicates, too_small,
                   digest.hexdigest())


def make_batch(examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 (B, T): x = ids[:-1] padded, y = next tokens where the loss mask is set, else -100."""
    width = max(len(ids) for ids, _ in examples) - 1
    x = np.full((len(examples), width), pad_id, dtype=np.int64)
    y = np.full((len(examples), width), -100, dtype=np.int64)
    for r, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(mask[1:], ids[1:], -100)
    return torch.from_numpy(x), torch.from_numpy(y)


# -- the algorithms ---------------------------------------------------------------------------------


def _loss(model, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> torch.Tensor:
    x, y = batch
    return model(x.to(device), y.to(device))[1]


def get_values(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def set_values(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def inner_adapt(model, params: list[torch.nn.Parameter], batch, steps: int, lr: float, device: torch.device,
                grad_clip: float = 0.0) -> list[float]:
    """`steps` plain SGD steps on one batch, in place on `params` (the others frozen); returns the loss before
    each step."""
    losses = []
    for _ in range(steps):
        loss = _loss(model, batch, device)
        grads = torch.autograd.grad(loss, params)
        if grad_clip > 0:
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
            scale = min(1.0, grad_clip / (float(norm) + 1e-12))
            grads = [g * scale for g in grads]
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        losses.append(float(loss.detach()))
    return losses


def meta_step(model, params: list[torch.nn.Parameter], phi: list[torch.Tensor],
              tasks: list[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]],
              algorithm: str, inner_steps: int, inner_lr: float, outer_lr: float, device: torch.device,
              grad_clip: float = 0.0) -> tuple[list[torch.Tensor], dict[str, float]]:
    """One outer update from `phi` over `tasks` [(support batch, query batch)]; returns (new phi, figures).

    reptile: phi + outer_lr * mean_T (U_k(phi) - phi); fo-maml: phi - outer_lr * mean_T grad L_q(U_k(phi)),
    U_k = `inner_steps` SGD steps at `inner_lr` on the support batch. `params` hold the new phi afterwards."""
    update = [torch.zeros_like(v) for v in phi]
    pre, post = [], []
    for support, query in tasks:
        set_values(params, phi)
        pre.append(inner_adapt(model, params, support, inner_steps, inner_lr, device, grad_clip)[0])
        if algorithm == "reptile":
            with torch.no_grad():
                post.append(float(_loss(model, query, device)))
                for u, p, v in zip(update, params, phi):
                    u.add_(p.detach() - v)
        elif algorithm == "fo-maml":
            loss = _loss(model, query, device)
            post.append(float(loss.detach()))
            for u, g in zip(update, torch.autograd.grad(loss, params)):
                u.sub_(g)
        else:
            raise ValueError(f"algorithm: {algorithm!r} is not reptile or fo-maml")
    n = len(tasks)
    new = [v + (outer_lr / n) * u for v, u in zip(phi, update)]
    set_values(params, new)
    return new, {"support_loss": float(np.mean(pre)), "query_loss": float(np.mean(post))}


@torch.no_grad()
def _query_loss(model, batch, device: torch.device) -> tuple[float, int]:
    x, y = batch
    logits = model(x.to(device))[0]
    target = y.to(device)
    total = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100,
                                              reduction="sum")
    return float(total), int((target != -100).sum())


def eval_split(task: MetaTask, support_size: int, query_size: int) -> tuple[list, list]:
    """A held-out task's fixed support set (its first `support_size` examples in the task's seeded order) and
    query set (the next `query_size`)."""
    if len(task.examples) < support_size + 1:
        raise ValueError(f"task {task.name}: {len(task.examples)} examples, need support_size {support_size} + 1")
    return task.examples[:support_size], task.examples[support_size:support_size + query_size]


def adapt_and_score(model, params: list[torch.nn.Parameter], init: list[torch.Tensor], tasks: list[MetaTask],
                    ks: list[int], inner_lr: float, support_size: int, query_size: int, pad_id: int,
                    device: torch.device, grad_clip: float = 0.0, query_batch: int = 16) -> dict[str, dict[int, float]]:
    """{task: {k: query loss after k SGD steps at inner_lr on its support set, from `init`}}; `params` are left
    at `init`. The query loss is token-weighted over the response tokens of the task's query set."""
    was_training = model.training
    out: dict[str, dict[int, float]] = {}
    for task in tasks:
        support, query = eval_split(task, support_size, query_size)
        s_batch = make_batch(support, pad_id)
        q_batches = [make_batch(query[i:i + query_batch], pad_id) for i in range(0, len(query), query_batch)]
        set_values(params, init)
        scores, done = {}, 0
        for k in sorted(set(ks)):
            model.train(was_training)
            inner_adapt(model, params, s_batch, k - done, inner_lr, device, grad_clip)
            done = k
            model.eval()
            total = count = 0
            for qb in q_batches:
                t, c = _query_loss(model, qb, device)
                total, count = total + t, count + c
            scores[k] = total / max(1, count)
        out[task.name] = scores
    set_values(params, init)
    model.train(was_training)
    return out


def mean_over_tasks(scores: dict[str, dict[int, float]]) -> dict[int, float]:
    ks = sorted(next(iter(scores.values())))
    return {k: float(np.mean([s[k] for s in scores.values()])) for k in ks}


# -- the recipe -------------------------------------------------------------------------------------


def prepare(cfg: MetaLoRAConfig) -> tuple:
    """(model with a fresh LoRA seeded by train.seed, its LoRA parameters, tokenizer, template, tasks, device)."""
    cfg.validate()
    cfg.tasks.validate()
    cfg.train.validate()
    device = torch.device(cfg.train.device)
    tokenizer = Tokenizer.load(cfg.base_model)
    template = load_chat_template(cfg.base_model)
    model = load_model(cfg.base_model)
    if model.config.FAMILY != "decoder":
        raise ValueError(f"base_model: {cfg.base_model} is a {model.config.FAMILY} model; meta-LoRA needs a decoder")
    torch.manual_seed(cfg.train.seed)
    apply_lora(model, cfg.lora)
    model.to(device)
    max_len = min(cfg.tasks.max_len, model.config.block_size + 1)
    tasks = build_tasks(dataclasses.replace(cfg.tasks, max_len=max_len), tokenizer, template, cfg.train.seed)
    return model, lora_parameters(model), tokenizer, template, tasks, device


def _sample(rng: np.random.Generator, tasks: list[MetaTask], t_cfg: MetaTrainConfig, pad_id: int) -> list:
    chosen = rng.choice(len(tasks), size=min(t_cfg.tasks_per_batch, len(tasks)), replace=False)
    out = []
    for ti in chosen:
        ex = tasks[int(ti)].examples
        n_s = min(t_cfg.support_size, len(ex) - 1)
        n_q = min(t_cfg.query_size, len(ex) - n_s)
        idx = rng.choice(len(ex), size=n_s + n_q, replace=False)
        out.append((make_batch([ex[i] for i in idx[:n_s]], pad_id), make_batch([ex[i] for i in idx[n_s:]], pad_id)))
    return out


def outer_lr_at(t_cfg: MetaTrainConfig, it: int) -> float:
    """The outer rate of meta-iteration `it` (0-based): linearly annealed to 0 with `anneal`."""
    return t_cfg.outer_lr * (1.0 - it / t_cfg.meta_iters) if t_cfg.anneal else t_cfg.outer_lr


def _names(model, params: list[torch.nn.Parameter]) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def meta_train_lora(cfg: MetaLoRAConfig, resume: bool = False) -> dict:
    """Meta-train a LoRA initialisation (`cfg.train.algorithm`: reptile or fo-maml) over the tasks of
    `cfg.tasks`; returns a summary dict.

    Writes `<out_dir>/final` (a PEFT adapter dir with tokenizer and chat template: `lora.init_from` takes it),
    `metrics.jsonl` (a row per `log_interval` iterations and the held-out evaluation per `eval_interval`),
    `results.json` (held-out query loss after k steps from the zero-init LoRA and from the meta-learned one,
    the task list and the malformed-record account), `config.yaml` and `checkpoints/step-N/`. `resume=True`
    continues from the newest valid checkpoint; without it, existing checkpoints are refused.
    """
    t_cfg = cfg.train
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    if not resume and ckpt_root.is_dir() and any(ckpt_root.iterdir()):
        raise FileExistsError(f"{ckpt_root} already holds checkpoints: pass --resume to continue that run, "
                              "or set out_dir to a new directory")
    model, params, tokenizer, template, tasks, device = prepare(cfg)
    names = _names(model, params)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    facts = {"algorithm": t_cfg.algorithm, "tasks_digest": tasks.digest, "params": names,
             "shapes": [list(p.shape) for p in params], "base_model": str(Path(cfg.base_model).resolve())}
    pad = tokenizer.pad_id
    eval_args = dict(ks=t_cfg.eval_k, inner_lr=t_cfg.inner_lr, support_size=t_cfg.support_size,
                     query_size=t_cfg.eval_query_size, pad_id=pad, device=device, grad_clip=t_cfg.inner_grad_clip)
    rng = np.random.default_rng(t_cfg.seed)
    phi = get_values(params)
    step, baseline = 0, None
    checkpoint = load_latest_checkpoint(ckpt_root) if resume else None
    if checkpoint is not None:
        saved = checkpoint.state["facts"]
        for key, value in facts.items():
            if saved.get(key) != value:
                raise ValueError(f"{checkpoint.path}: written for another run ({key} differs); "
                                 "set out_dir to a new directory")
        phi = [checkpoint.model[n].to(device) for n in names]
        set_values(params, phi)
        rng.bit_generator.state = checkpoint.state["rng"]
        step, baseline = checkpoint.step, {n: {int(k): v for k, v in s.items()}
                                           for n, s in checkpoint.state["baseline"].items()}
        log.info("resumed at meta-iteration %d from %s", step, checkpoint.path)
    elif resume:
        log.info("no checkpoint in %s: starting from iteration 0", ckpt_root)
    metrics_path = out / "metrics.jsonl"
    if step:
        truncate_metrics(metrics_path, step)
        torch.set_rng_state(checkpoint.rng["torch"])
    else:
        metrics_path.unlink(missing_ok=True)
    summary_tasks = tasks.summary()
    log.info("meta-LoRA (%s): %d meta-training tasks %s, held out %s; %d malformed records, %d truncated",
             t_cfg.algorithm, len(tasks.train), summary_tasks["train_tasks"], summary_tasks["heldout_tasks"],
             len(tasks.malformed), tasks.truncated)
    if baseline is None:  # the standard fresh LoRA (B = 0) adapted k steps: the zero-init baseline
        baseline = adapt_and_score(model, params, phi, tasks.heldout, **eval_args)
        _write_row(metrics_path, {"step": 0, **{f"heldout_loss_k{k}": v
                                                for k, v in mean_over_tasks(baseline).items()}})

    def save(at: int) -> None:
        save_checkpoint(ckpt_root, at, dict(zip(names, phi)), {}, {"torch": torch.get_rng_state()},
                        {"facts": facts, "rng": rng.bit_generator.state,
                         "baseline": {n: {str(k): v for k, v in s.items()} for n, s in baseline.items()}},
                        keep=t_cfg.keep_checkpoints)

    stopped = False
    window: list[dict] = []
    t0 = time.perf_counter()
    model.train()
    with StopSignal() as stop:
        while step < t_cfg.meta_iters:
            batch = _sample(rng, tasks.train, t_cfg, pad)
            lr = outer_lr_at(t_cfg, step)
            phi, figures = meta_step(model, params, phi, batch, t_cfg.algorithm, t_cfg.inner_steps, t_cfg.inner_lr,
                                     lr, device, t_cfg.inner_grad_clip)
            step += 1
            window.append(figures)
            if not all(math.isfinite(v) for v in figures.values()):
                raise FloatingPointError(f"meta-iteration {step}: non-finite loss {figures}; lower inner_lr / outer_lr")
            row: dict = {}
            if step % t_cfg.log_interval == 0 or step == t_cfg.meta_iters:
                query = float(np.mean([w["query_loss"] for w in window]))
                # "loss": the meta-objective, the query loss after adaptation (the log rows' usual key)
                row |= {"loss": query, "support_loss": float(np.mean([w["support_loss"] for w in window])),
                        "query_loss": query, "outer_lr": lr,
                        "seconds": round(time.perf_counter() - t0, 3)}
                window = []
            if step % t_cfg.eval_interval == 0 or step == t_cfg.meta_iters:
                scores = adapt_and_score(model, params, phi, tasks.heldout, **eval_args)
                row |= {f"heldout_loss_k{k}": v for k, v in mean_over_tasks(scores).items()}
                model.train()
            if row:
                _write_row(metrics_path, {"step": step, **row})
            if step % t_cfg.checkpoint_interval == 0 or step == t_cfg.meta_iters:
                save(step)
            if stop.received is not None and step < t_cfg.meta_iters:
                save(step)
                stopped = True
                log.warning("signal %d: checkpoint written at meta-iteration %d; --resume continues", stop.received,
                            step)
                break

    result: dict = {"step": step, "stopped_by_signal": stopped, "algorithm": t_cfg.algorithm,
                    "n_trainable": sum(p.numel() for p in params), **summary_tasks}
    if stopped:
        return result | {"final": None}
    final = adapt_and_score(model, params, phi, tasks.heldout, **eval_args)
    final_dir = out / "final"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    set_values(params, phi)
    save_adapter(model, final_dir, str(Path(cfg.base_model).resolve()))
    tokenizer.save(final_dir)
    save_chat_template(final_dir, template)
    result |= {"heldout_zero_init": baseline, "heldout_meta_init": final,
               "heldout_mean_zero_init": mean_over_tasks(baseline), "heldout_mean_meta_init": mean_over_tasks(final),
               "final": str(final_dir)}
    (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def _write_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def adaptation_verdict(meta: list[float], zero: list[float], margin: float = 0.02) -> tuple[str, str]:
    """(verdict, reason) from held-out query losses after k adaptation steps, one pair per seed (same seed at the
    same index): `meta` from the meta-learned initialisation, `zero` from the baseline it is judged against (the
    standard zero-init LoRA; or another initialisation, e.g. joint multi-task training).

    "meta-init better": zero - meta > `margin` (nats) on the mean and on a strict majority of seeds;
    "meta-init worse": meta - zero > `margin` on the mean and on a strict majority of seeds;
    "no clear difference" otherwise; "not measured" with fewer than 3 seeds or unpaired lists."""
    if len(meta) != len(zero) or len(meta) < 3:
        return "not measured", f"{len(meta)} meta / {len(zero)} zero-init values: 3 or more paired seeds needed"
    gains = [z - m for m, z in zip(meta, zero)]
    mean = float(np.mean(gains))
    better = sum(g > margin for g in gains)
    worse = sum(g < -margin for g in gains)
    n = len(gains)
    text = (f"baseline minus meta-init loss {mean:+.4f} nats on the mean; > {margin} on {better}/{n} seeds, "
            f"< -{margin} on {worse}/{n}")
    if mean > margin and better * 2 > n:
        return "meta-init better", text
    if mean < -margin and worse * 2 > n:
        return "meta-init worse", text
    return "no clear difference", text
