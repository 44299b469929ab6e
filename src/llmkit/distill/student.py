"""The student of a distillation run: a pruned copy of the teacher, a smaller config, or a model dir.

Layer dropping (Sanh et al. 2019, DistilBERT: "initialize the student from the teacher by taking one layer
out of two"; Sreenivas et al. 2024, Minitron, for decoders): the student keeps K of the teacher's L layers,
evenly spaced with the first and the last kept, and every other weight (embeddings, final norm, head) as it
is. It starts close to the teacher, so distillation has less to recover than from random weights.

Width pruning (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation",
Minitron): every layer keeps the most important share of its MLP intermediate neurons and of its attention
heads, ranked by their activations on a few calibration batches of the training data, and the student is the
teacher's weights sliced to those neurons and heads (`width_importance`, `prune_width`):

* an MLP neuron's importance is its mean |activation| over the calibration tokens, the activation being what
  enters the down projection (silu(gate) x up for SwiGLU, gelu(gate) x up for GeGLU, act(up) otherwise); the
  student keeps the top `mlp_hidden` share of d_ff in every layer (its rows of up / gate, columns of down);
* a head's importance is the mean L2 norm of its attention output (before the output projection). Under
  grouped-query attention whole key/value groups go, so every kept query head still reads its own key/value
  head: a group's importance is the sum of its query heads'; plain multi-head attention prunes single heads,
  and a model with one key/value head (MQA) keeps it and prunes query heads. head_dim stays the teacher's
  (the config then names it), so the attention scale and RoPE are unchanged.

Kept neurons and heads stay in the teacher's order, so keeping everything reproduces the teacher exactly.
Width and depth compose: the importance is measured on the whole teacher, then the kept layers are sliced.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmkit.models.decoder import Decoder


@dataclass
class WidthPruneConfig:
    """The ``student.prune_width:`` section: Minitron width pruning of the teacher (see the module docstring)."""

    mlp_hidden: float = 1.0
    """Share of every layer's MLP intermediate neurons kept (d_ff -> round(share x d_ff)), the most active ones."""
    heads: float = 1.0
    """Share of attention heads kept, the most active ones: of the key/value groups under grouped-query
    attention (each with its query heads), of the heads under plain multi-head attention, of the query heads
    when there is one key/value head."""
    calibration_batches: int = 8
    """Batches of train.batch_size training examples the activations are measured on."""

    def validate(self) -> None:
        for name in ("mlp_hidden", "heads"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name}: must be in (0, 1] (the share kept), got {value}")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches: must be >= 1, got {self.calibration_batches}")


@dataclass
class StudentConfig:
    """The ``student:`` section: exactly one of keep_layers, config and model; or prune_width, alone or with
    keep_layers (a copy of the teacher pruned in width, and in depth with keep_layers)."""

    keep_layers: int | list[int] | None = None
    """A copy of the teacher with these layers: a count K (evenly spaced, first and last kept) or the indices."""
    prune_width: WidthPruneConfig | None = None
    """A copy of the teacher with fewer MLP neurons and attention heads per layer, chosen by their activations
    on the training data (Minitron); with keep_layers, of the kept layers."""
    config: dict[str, Any] = field(default_factory=dict)
    """Decoder config fields that differ from the teacher's (e.g. n_layer, d_model, n_head, d_ff): a student
    with the teacher's vocabulary, positions and norms, randomly initialised."""
    model: str | None = None
    """An llmkit model dir (e.g. a smaller pretrained model); its tokenizer must be the teacher's."""

    def validate(self) -> None:
        given = [name for name, v in (("keep_layers", self.keep_layers), ("config", self.config),
                                      ("model", self.model)) if v]
        if self.prune_width is not None and (self.config or self.model):
            raise ValueError("prune_width: prunes a copy of the teacher; it combines with keep_layers, not with "
                             f"{'config' if self.config else 'model'}")
        if len(given) != 1 and not (self.prune_width is not None and not given):
            raise ValueError("student: give exactly one of keep_layers, config and model (prune_width alone or "
                             "with keep_layers)" + (f" (got {', '.join(given)})" if given else ""))


def kept_layers(n_layer: int, keep: int | list[int]) -> list[int]:
    """The teacher layer indices a pruned student keeps, in order."""
    if isinstance(keep, int):
        if not 1 <= keep <= n_layer:
            raise ValueError(f"student.keep_layers: {keep} must be in [1, {n_layer}] (the teacher's layers)")
        if keep == 1:
            return [0]
        return sorted({round(i * (n_layer - 1) / (keep - 1)) for i in range(keep)})
    layers = list(keep)
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad or len(set(layers)) != len(layers) or layers != sorted(layers):
        raise ValueError(f"student.keep_layers: {layers} must be distinct increasing indices in [0, {n_layer})")
    return layers


def drop_layers(teacher: Decoder, keep: int | list[int]) -> Decoder:
    """A new decoder holding a copy of the teacher's layers `keep` (see `kept_layers`) and its other weights."""
    layers = kept_layers(teacher.config.n_layer, keep)
    changes: dict[str, Any] = {"n_layer": len(layers)}
    if teacher.config.layer_types is not None:
        changes["layer_types"] = [teacher.config.layer_types[i] for i in layers]
    student = Decoder(dataclasses.replace(teacher.config, **changes))
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            if int(i) not in layers:
                continue
            key = f"blocks.{layers.index(int(i))}.{rest}"
        state[key] = value.clone()
    student.load_state_dict(state)
    return student


def smaller_config(teacher: Decoder, fields: dict[str, Any]) -> Decoder:
    """A randomly initialised decoder with the teacher's config but `fields` (unknown names refused). Sizes
    derived from d_model / n_head (head_dim, d_ff) are derived again unless given."""
    known = {f.name for f in dataclasses.fields(teacher.config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"student.config: unknown decoder field(s) {unknown}")
    derived: dict[str, Any] = {}
    if {"d_model", "n_head"} & set(fields) and "head_dim" not in fields:
        derived["head_dim"] = None
    if "d_model" in fields and "d_ff" not in fields:
        derived["d_ff"] = None
    if "n_layer" in fields and "layer_types" not in fields:
        derived["layer_types"] = None
    cfg = dataclasses.replace(copy.deepcopy(teacher.config), **derived, **fields)
    cfg.validate()
    return Decoder(cfg)


# -- width pruning (Minitron) ---------------------------------------------------------------------------
def example_batches(examples: list, batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`examples` (SFT examples: ``.ids``) as (x int64 (b, T), valid bool (b, T)) batches of the input ids
    (ids[:-1], right-padded with pad_id; valid marks the real tokens), for `width_importance`."""
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(e.ids) for e in chunk) - 1
        x = torch.full((len(chunk), max(1, width)), pad_id, dtype=torch.long)
        valid = torch.zeros(x.shape, dtype=torch.bool)
        for r, e in enumerate(chunk):
            n = len(e.ids) - 1
            x[r, :n] = torch.from_numpy(np.asarray(e.ids[:-1], dtype=np.int64))
            valid[r, :n] = True
        out.append((x, valid))
    return out


@torch.no_grad()
def width_importance(model: Decoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                     ) -> list[dict[str, torch.Tensor]]:
    """Per layer, the activation importance of its MLP neurons and attention heads over the valid tokens of
    `batches` ((x (B, T), valid (B, T) bool), e.g. `example_batches`): {"mlp": (d_ff,) mean |activation|
    entering the down projection (absent for a mixture-of-experts MLP), "heads": (n_head,) mean L2 norm of
    each head's attention output before the output projection}, fp64 on the CPU. Runs `model` in eval mode
    (restored after) on its own device, its forward passes under `autocast` (e.g. the training precision's)."""
    c = model.config
    device = next(model.parameters()).device
    sums: list[dict[str, torch.Tensor]] = [{} for _ in model.blocks]
    state: dict[str, Any] = {"valid": None, "tokens": 0}

    def accumulate(i: int, name: str, per_token: torch.Tensor) -> None:
        total = per_token[state["valid"]].double().sum(0).cpu()  # (units,)
        sums[i][name] = sums[i][name] + total if name in sums[i] else total

    def mlp_hook(i: int):
        def hook(_module, args):
            accumulate(i, "mlp", args[0].abs())
        return hook

    def heads_hook(i: int):
        def hook(_module, args):
            y = args[0]  # (B, T, n_head * head_dim)
            accumulate(i, "heads", y.view(*y.shape[:-1], c.n_head, c.head_dim).float().norm(dim=-1))
        return hook

    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.attn.proj.register_forward_pre_hook(heads_hook(i)))
        if isinstance(getattr(block.mlp, "down", None), torch.nn.Linear):
            handles.append(block.mlp.down.register_forward_pre_hook(mlp_hook(i)))
    was_training = model.training
    model.eval()
    try:
        for x, valid in batches:
            state["valid"] = valid.to(device)
            state["tokens"] += int(valid.sum())
            with autocast():
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if state["tokens"] == 0:
        raise ValueError("prune_width: the calibration batches hold no token")
    return [{k: v / state["tokens"] for k, v in layer.items()} for layer in sums]


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores, in increasing order (the teacher's order)."""
    return scores.topk(keep).indices.sort().values


def kept_count(n: int, share: float) -> int:
    """round(share x n), at least 1."""
    return max(1, math.floor(share * n + 0.5))


def prune_width(model: Decoder, importance: list[dict[str, torch.Tensor]], mlp_hidden: float = 1.0,
                heads: float = 1.0) -> Decoder:
    """A new decoder with `model`'s weights sliced to the most important `mlp_hidden` share of every layer's
    MLP neurons and `heads` share of its attention heads (key/value groups under GQA; see the module
    docstring); `importance` holds one `width_importance` entry per layer of `model`. Every other weight
    (embeddings, norms, head, biases of the output projections) is copied as it is."""
    c = model.config
    if len(importance) != c.n_layer:
        raise ValueError(f"prune_width: importance for {len(importance)} layers, the model has {c.n_layer}")
    if mlp_hidden < 1.0 and c.moe is not None:
        raise ValueError("prune_width.mlp_hidden: a mixture-of-experts model's MLPs are not pruned here (set it to 1)")
    hd, n_head, n_kv = c.head_dim, c.n_head, c.kv_heads
    group = n_head // n_kv
    d_ff = kept_count(c.d_ff, mlp_hidden) if c.moe is None else c.d_ff
    if n_kv > 1:  # whole key/value groups (single heads without GQA)
        new_kv = kept_count(n_kv, heads)
        new_head = new_kv * group
    else:  # one key/value head (MQA): it stays, query heads go
        new_kv, new_head = 1, kept_count(n_head, heads)
    changes: dict[str, Any] = {"d_ff": d_ff, "n_head": new_head, "head_dim": hd,
                               "n_kv_head": None if c.n_kv_head is None else new_kv}
    student = Decoder(dataclasses.replace(copy.deepcopy(c), **changes))

    slices: list[dict[str, torch.Tensor]] = []
    for layer in importance:
        if n_kv > 1:
            groups = _top(layer["heads"].reshape(n_kv, group).sum(1), new_kv)
            q_heads = (groups[:, None] * group + torch.arange(group)).flatten()
        else:
            groups, q_heads = torch.zeros(1, dtype=torch.long), _top(layer["heads"], new_head)
        dims = torch.arange(hd)
        q_rows = (q_heads[:, None] * hd + dims).flatten()
        kv_rows = (groups[:, None] * hd + dims).flatten()
        sl = {"q": q_rows, "qkv": torch.cat((q_rows, n_head * hd + kv_rows, (n_head + n_kv) * hd + kv_rows))}
        if c.moe is None:
            if "mlp" not in layer:
                raise ValueError("prune_width: no MLP importance for a layer (measure it with width_importance)")
            sl["mlp"] = _top(layer["mlp"], d_ff)
        slices.append(sl)

    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            sl = slices[int(i)]
            if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                value = value[sl["qkv"]]
            elif rest == "attn.proj.weight":
                value = value[:, sl["q"]]
            elif "mlp" in sl and rest in ("mlp.up.weight", "mlp.up.bias", "mlp.gate.weight", "mlp.gate.bias"):
                value = value[sl["mlp"]]
            elif "mlp" in sl and rest == "mlp.down.weight":
                value = value[:, sl["mlp"]]
        state[key] = value.clone()
    student.load_state_dict(state)
    return student
