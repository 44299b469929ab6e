"""The student of a distillation run: a pruned copy of the teacher, a smaller config, or a model dir.

Layer dropping (Sanh et al. 2019, DistilBERT: "initialize the student from the teacher by taking one layer
out of two"; Sreenivas et al. 2024, Minitron, for decoders): the student keeps K of the teacher's L layers,
evenly spaced with the first and the last kept, and every other weight (embeddings, final norm, head) as it
is. It starts close to the teacher, so distillation has less to recover than from random weights.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmkit.models.decoder import Decoder


@dataclass
class StudentConfig:
    """The ``student:`` section: exactly one of keep_layers, config and model."""

    keep_layers: int | list[int] | None = None
    """A copy of the teacher with these layers: a count K (evenly spaced, first and last kept) or the indices."""
    config: dict[str, Any] = field(default_factory=dict)
    """Decoder config fields that differ from the teacher's (e.g. n_layer, d_model, n_head, d_ff): a student
    with the teacher's vocabulary, positions and norms, randomly initialised."""
    model: str | None = None
    """An llmkit model dir (e.g. a smaller pretrained model); its tokenizer must be the teacher's."""

    def validate(self) -> None:
        given = [name for name, v in (("keep_layers", self.keep_layers), ("config", self.config),
                                      ("model", self.model)) if v]
        if len(given) != 1:
            raise ValueError("student: give exactly one of keep_layers, config and model"
                             + (f" (got {', '.join(given)})" if given else ""))


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
