"""Many LoRA adapters served on one base model at once: batched LoRA with adapters paged under a budget.

A LoRA fine-tune changes a model by a low-rank update per adapted matrix, y = W x + s B A x (Hu et al. 2021,
`llmkit.models.lora`). Merging that update into W gives one model per adapter; serving N adapters that way
takes N copies of the base and N separate batches. Instead the base weights are kept once and each adapter's
small factors beside them, and requests of different adapters (and of the plain base) share one batch:

    y_i = W x_i + s_a (x_i A_a^T) B_a^T      for row i of the batch, a = the adapter row i uses (or none)

as in S-LoRA (Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters", MLSys 2024) and
Punica (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving", MLSys 2024): the base GEMM runs once over the
whole batch, the low-rank part per adapter. Punica's SGMV kernel computes it per *segment* of rows sharing an
adapter; its BGMV (and S-LoRA's MBGMV) gathers each row's factors and runs one batched product. Both are
here (`MultiLoRA(mode=...)`): "segment" (the batch's adapter rows sorted by adapter once per forward; per
Linear one gather, two small matmuls per segment, one index_add into the base output) and "bmm" (each row's A
and B gathered from a stack padded to the largest rank, two `torch.bmm`). `benchmarks/multi_lora.py` times both
on the CPU; "segment" is the default: it was faster at 1 and 4 adapters and as fast at 16 (docs/serve.md, "Many
adapters on one base"), as the gather copies rows x in x r_max floats per Linear and step while a segment reads
its adapter's factors in place. (A third form, every present adapter's A concatenated into one GEMM and the
other adapters' columns masked per row, took 17.8 ms against the segments' 13.7 ms for SmolLM2-135M's 60
attention Linears at 16 rows of 16 adapters, one thread: not kept.)

Factors. An adapter directory (PEFT layout: `llmkit.models.lora_peft.save_lora`, or PEFT's own for the
exported HF model) is read by `load_lora` into a *skeleton* of the base (the same module tree built on the
meta device, its Linear weights zero-stride placeholders), so validation, Hugging Face names, GPT-2's fused
c_attn, GQA slice sizes, rsLoRA and alpha/rank patterns are all exactly `load_for_inference`'s, and an adapter
for another base fails the same way (naming the module or the shapes that do not fit). Each adapted Linear
then gets one pair per adapter, whatever slices it adapts (q and v of the fused qkv with their own ranks, or
the whole matrix): A_cat = [A_q; A_v] (r_q + r_v, in) and B_full (out, r_q + r_v), zero outside each slice's
rows and columns, with the slice's scale s folded in. Stored transposed, At (in, r) and Bt (r, out), so the
delta is ``(x @ At) @ Bt``. Ranks and target sets differ freely between adapters; a Linear an adapter does
not adapt simply has no entry for it. The base Linear itself stays whatever it is (nn.Linear row- or
column-major, `KernelLinear`, int8): the wrapper calls it and adds the delta to its output. Factors are fp32
on a half-precision base (as `LoRALinear` keeps them), else in the base's dtype.

Paging. `register(name, path)` validates an adapter and keeps its factors in memory when they fit the budget
without evicting anything; otherwise it stays on disk until a request needs it. `pin` (the engine calls it when
a request joins the running batch) pages it in (from disk if need be), evicting least recently used adapters
that no running request pins, and gives it a slot in the wrappers; `unpin` when the request leaves the batch.
The budget (`budget_bytes`, bytes of resident factors) is never exceeded: the engine admits a request only when `can_pin` says its adapter fits beside the
pinned ones (`Engine.step`), so a request whose adapter has no room waits in the queue until running requests
finish. An adapter larger than the whole budget is refused at registration.

Thread safety: the engine thread pins / unpins / sets rows, and only it changes what the wrappers hold (so a
forward never sees them change); `register` / `unregister` may run on other threads (the server's HTTP
handlers): a lock covers the registry, and the slot of an unregistered adapter is cleared from the wrappers by
the engine thread's next `set_rows`. An adapter with a queued or running request is never unregistered
(`unregister` raises `AdapterInUse`).
"""

from __future__ import annotations

import copy
import itertools
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from llmkit.models.decoder import Decoder
from llmkit.models.lora import (
    LinearStandIn,
    adaptable_sites,
    lora_expert_modules,
    lora_modules,
    replace_module,
)

__all__ = ["AdapterInUse", "AdapterInfo", "MultiLoRA", "MultiLoRALinear", "UnknownAdapter", "read_adapter",
           "ADAPTER_NAME"]

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Valid adapter names: letters, digits, '.', '_', '-' (no ':' or '/': a request names one as base:adapter)."""


class UnknownAdapter(KeyError):
    """No adapter of that name is registered."""

    def __str__(self) -> str:  # KeyError's str() is the repr of its argument
        return str(self.args[0]) if self.args else ""


class AdapterInUse(RuntimeError):
    """The adapter has queued or running requests (unregister refused)."""


@dataclass
class _Batch:
    """Which adapter each batch row uses during one forward, shared by every wrapper of a `MultiLoRA`.

    "segment" mode: `order` (m,) int64, the batch rows that use an adapter sorted by slot (None: every row, one
    adapter), and `segments` [(slot, start, end)]: rows order[start:end] use that slot. Sorting once per forward
    makes each segment a contiguous slice of the gathered rows, as Punica's SGMV wants them: one gather and one
    scatter per Linear, two matmuls per segment.
    "bmm" mode: `row_slots` (rows,) int64 slot per row, -1 = base only."""

    segments: list[tuple[int, int, int]] = field(default_factory=list)
    order: torch.Tensor | None = None
    row_slots: torch.Tensor | None = None


class MultiLoRALinear(LinearStandIn):
    """A base Linear (any module mapping (..., in) -> (..., out)) plus per-adapter low-rank deltas.

    `factors[slot] = (At (in, r), Bt (r, out))`, scale folded into Bt, for every resident adapter that adapts
    this Linear. forward(x: (rows, T, in) or (rows, in)) -> base(x) plus, on the rows the shared `_Batch`
    assigns to an adapter, ``(x_rows @ At) @ Bt``. Rows of the batch are dim 0 (the engine's requests).
    """

    def __init__(self, base: nn.Module, batch: _Batch, mode: str, compute_dtype: torch.dtype):
        super().__init__()
        self.base = base
        self.batch = batch
        self.mode = mode
        self.compute_dtype = compute_dtype
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stack: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # "bmm": built lazily

    def extra_repr(self) -> str:
        return f"adapters={len(self.factors)}, mode={self.mode}"

    def set_factors(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        if pair is None:
            self.factors.pop(slot, None)
        else:
            self.factors[slot] = pair
        self._stack = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        b = self.batch
        if not self.factors or (not b.segments and b.row_slots is None):
            return y
        if self.mode == "bmm" and b.row_slots is not None:
            return self._bmm(x, y, b.row_slots)
        cd = self.compute_dtype
        if b.order is None:  # the whole batch uses one adapter: no gather / scatter
            pair = self.factors.get(b.segments[0][0])
            if pair is not None:
                y += ((x.to(cd) @ pair[0]) @ pair[1]).to(y.dtype)
            return y
        xs = x.index_select(0, b.order).to(cd)  # adapter rows, grouped by adapter
        d = xs.new_zeros(xs.shape[:-1] + (y.shape[-1],))
        hit = False
        for slot, start, end in b.segments:
            pair = self.factors.get(slot)
            if pair is None:  # this adapter leaves this Linear alone: its rows keep zeros
                continue
            torch.matmul(xs[start:end] @ pair[0], pair[1], out=d[start:end])
            hit = True
        if hit:
            # y is the fresh output of base(x) (inference, no autograd): adding into it in place is safe
            y.index_add_(0, b.order, d.to(y.dtype))
        return y

    def _bmm(self, x: torch.Tensor, y: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
        """Punica's BGMV in PyTorch: gather each row's (At, Bt) from a stack padded to the largest rank (slot
        -1 and adapters without this Linear: zeros) and run two batched products."""
        if self._stack is None:
            slots = sorted(self.factors)
            r_max = max(self.factors[s][0].shape[1] for s in slots)
            at0, bt0 = self.factors[slots[0]]
            at_s = at0.new_zeros(len(slots) + 1, at0.shape[0], r_max)  # index 0: the zero adapter
            bt_s = bt0.new_zeros(len(slots) + 1, r_max, bt0.shape[1])
            index = torch.zeros(max(slots) + 2, dtype=torch.int64, device=at0.device)
            for j, s in enumerate(slots, start=1):
                at, bt = self.factors[s]
                at_s[j, :, :at.shape[1]] = at
                bt_s[j, :bt.shape[0]] = bt
                index[s + 1] = j
            self._stack = (at_s, bt_s, index)
        at_s, bt_s, index = self._stack
        idx = index[row_slots.clamp(min=-1, max=index.numel() - 2) + 1]  # unknown slots -> zero adapter
        xs = x.to(self.compute_dtype)
        flat = xs.dim() == 2
        if flat:
            xs = xs[:, None]
        d = torch.bmm(torch.bmm(xs, at_s[idx]), bt_s[idx])
        return y + (d[:, 0] if flat else d).to(y.dtype)


@dataclass
class AdapterInfo:
    """One registered adapter. `bytes`: its resident factors' size; `slot` None while paged out."""

    name: str
    path: Path
    uid: int
    bytes: int
    rank: int
    """Its LoRA rank (the largest of its modules' ranks)."""
    targets: list[str]
    """llmkit module paths it adapts."""
    slot: int | None = None
    """Its index in the wrappers while installed (engine thread), None otherwise."""
    pins: int = 0
    """Running requests using it now (never evicted while > 0)."""
    last_used: float = 0.0
    holders: list = field(default_factory=list)
    """Engine requests (queued or running) naming it; finished ones are pruned."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    """Its factors while resident in memory (counted against the budget), None while paged out."""
    loads: int = 0
    """Times it was read from disk."""

    def in_use(self) -> int:
        self.holders = [r for r in self.holders if not getattr(r, "finished", True)]
        return len(self.holders)


def _skeleton(model: Decoder) -> Decoder:
    """The base's module tree without its weights: built on the meta device, every Linear's weight a
    zero-stride fp32 CPU placeholder (so `LoRALinear` allocates real fp32 factors beside it)."""
    with torch.device("meta"):
        sk = Decoder(copy.deepcopy(model.config))
    for mod in sk.modules():
        if isinstance(mod, nn.Linear):
            mod.weight = nn.Parameter(torch.zeros((), dtype=torch.float32).expand(mod.out_features,
                                                                                   mod.in_features),
                                      requires_grad=False)
    return sk


def read_adapter(model: Decoder, path: str | Path, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`_read_adapter`'s factors alone."""
    return _read_adapter(model, path, device, dtype)[0]


def _read_adapter(model: Decoder, path: str | Path, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """(The factors of the LoRA adapter dir `path` for base `model`: {llmkit Linear path: (At (in, r),
    Bt (r, out))}, scale folded into Bt, on `device` in `dtype`; the adapter's rank (its largest slice's).

    ValueError / FileNotFoundError naming the problem: not an adapter dir, not LoRA (prefix tuning), an
    adapter for another base (a module it names does not exist, or its shapes differ), or pieces that cannot
    be served per request (trainable token rows, modules_to_save, mixture-of-experts expert adapters).
    """
    import json

    from llmkit.models.lora import ADAPTER_CONFIG
    from llmkit.models.lora_peft import load_lora

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not an adapter directory (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON: {e}") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}: only LoRA adapters can share a batch "
                         "(prefix tuning changes the attention keys; serve it alone with --adapter DIR)")
    # these change the embedding / heads themselves, which one batch cannot do per row
    for key in ("modules_to_save", "trainable_token_indices"):
        if cfg.get(key):
            raise ValueError(f"{cfg_file}: {key} is set: an adapter that changes whole modules or token rows "
                             "cannot share the base with others; merge it (llmkit merge) or serve it alone")
    sk = _skeleton(model)
    try:
        load_lora(sk, path)
    except ValueError as e:
        raise ValueError(f"adapter {path} does not fit this base model: {e}") from None
    if lora_expert_modules(sk):
        raise ValueError(f"{path}: adapters on mixture-of-experts experts cannot be batched per request")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for mod_path, m in lora_modules(sk):
        names = list(m.ranges)
        a_cat = torch.cat([m.lora_A[n].detach().float() for n in names])  # (r_tot, in)
        b_full = torch.zeros(m.out_features, a_cat.shape[0])  # (out, r_tot), zero off each slice's block
        col = 0
        for n in names:
            start, end = m.ranges[n]
            r = m.lora_A[n].shape[0]
            b_full[start:end, col:col + r] = m.lora_B[n].detach().float() * m.scaling[n]
            col += r
            rank = max(rank, r)
        out[mod_path] = (a_cat.t().contiguous().to(device=device, dtype=dtype),
                         b_full.t().contiguous().to(device=device, dtype=dtype))
    if not out:
        raise ValueError(f"{path}: the adapter adapts no Linear of this model")
    return out, rank


class MultiLoRA:
    """Serve many LoRA adapters on one `Decoder` at once (see the module docstring).

    model: the base (a plain Decoder; its Linears are wrapped by `attach`, which `Engine` calls after it set up
    its kernels, so the fused C decode path keeps working for batches of base-only rows).
    budget_bytes: most bytes of adapter factors resident on the model's device at once (default 1 GiB).
    mode: "segment" (default: rows grouped per adapter) or "bmm" (per-row gathered factors).
    """

    def __init__(self, model: Decoder, budget_bytes: int = 1 << 30, mode: str = "segment"):
        if mode not in ("segment", "bmm"):
            raise ValueError(f"mode: 'segment' or 'bmm', got {mode!r}")
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes: must be > 0, got {budget_bytes}")
        self.model = model
        self.budget_bytes = int(budget_bytes)
        self.mode = mode
        p = next(model.parameters())
        self.device = p.device
        self.dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
        self.batch = _Batch()
        self.wrappers: dict[str, MultiLoRALinear] = {}
        self.adapters: dict[str, AdapterInfo] = {}
        self._lock = threading.RLock()
        self._uids = itertools.count(1)
        self._retired: list[int] = []  # slots of unregistered adapters, cleared from the wrappers by set_rows
        self.loads = 0
        self.evictions = 0

    # -- set-up -------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Wrap every adaptable Linear of the model's blocks in a `MultiLoRALinear` (idempotent)."""
        if self.wrappers:
            return
        paths = sorted({s.module for s in adaptable_sites(self.model) if s.kind == "linear"})
        for path in paths:
            mod = self.model.get_submodule(path)
            if isinstance(mod, MultiLoRALinear):
                continue
            w = MultiLoRALinear(mod, self.batch, self.mode, self.dtype)
            replace_module(self.model, path, w)
            self.wrappers[path] = w

    # -- registry -----------------------------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> AdapterInfo:
        """Validate and register the adapter dir `path` as `name`; resident at once if it fits the budget
        without evicting another adapter, else paged in when a request needs it. Returns its info.

        ValueError: bad name, name taken, not an adapter for this base (message names the mismatch), or larger
        than the whole budget. FileNotFoundError: no such adapter dir.
        """
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-' "
                             "(starting with a letter or digit)")
        with self._lock:
            if name in self.adapters:
                raise ValueError(f"adapter {name!r} is already loaded (unload it first)")
        factors, rank = _read_adapter(self.model, path, self.device, self.dtype)  # slow part: outside the lock
        size = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in factors.values())
        if size > self.budget_bytes:
            raise ValueError(f"adapter {name!r} takes {size} bytes, more than the adapter memory budget of "
                             f"{self.budget_bytes} bytes")
        missing = sorted(set(factors) - set(self.wrappers)) if self.wrappers else []
        if missing:
            raise ValueError(f"adapter {name!r} adapts {missing[0]}, which is not an adaptable Linear here")
        info = AdapterInfo(name, Path(path), next(self._uids), size, rank, sorted(factors))
        info.loads = 1
        with self._lock:
            if name in self.adapters:
                raise ValueError(f"adapter {name!r} is already loaded (unload it first)")
            self.adapters[name] = info
            if self.resident_bytes() + size <= self.budget_bytes:  # else: read again when a request needs it
                info.factors = factors
                info.last_used = time.monotonic()
            self.loads += 1
        return info

    def unregister(self, name: str) -> None:
        """Remove adapter `name` (its factors freed). UnknownAdapter if none; AdapterInUse while a queued or
        running request uses it (the caller retries after they finish, or refuses)."""
        with self._lock:
            info = self._get(name)
            n = info.in_use()
            if n:
                raise AdapterInUse(f"adapter {name!r} has {n} request(s) queued or running")
            if info.slot is not None:  # the engine thread clears it from the wrappers (set_rows)
                self._retired.append(info.slot)
            info.slot, info.factors = None, None
            del self.adapters[name]

    def names(self) -> list[str]:
        with self._lock:
            return list(self.adapters)

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def _get(self, name: str) -> AdapterInfo:
        info = self.adapters.get(name)
        if info is None:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise UnknownAdapter(f"adapter {name!r} is not loaded (loaded: {known})")
        return info

    def uid(self, name: str) -> int:
        """A number unique to this registration of `name` (a re-registered name gets a new one): the engine
        keys its prefix cache on it, so keys/values computed under one adapter never serve another."""
        with self._lock:
            return self._get(name).uid

    # -- engine side ----------------------------------------------------------------------------------
    def track(self, name: str, request) -> None:
        """Count `request` (an object with a `finished` attribute) as a user of `name` until it finishes."""
        with self._lock:
            info = self._get(name)
            if len(info.holders) >= 64:  # drop finished ones now and then: a busy adapter's list stays short
                info.in_use()
            info.holders.append(request)

    def resident_bytes(self) -> int:
        """Bytes of adapter factors in memory now."""
        return sum(i.bytes for i in self.adapters.values() if i.factors is not None)

    def can_pin(self, names: Sequence[str]) -> bool:
        """Whether every adapter of `names` could be resident at once beside the pinned ones."""
        with self._lock:
            need = {n for n in names if n is not None}
            pinned = sum(i.bytes for i in self.adapters.values() if i.pins > 0 and i.name not in need)
            return pinned + sum(self._get(n).bytes for n in need) <= self.budget_bytes

    def preload(self, name: str) -> None:
        """Read `name` from disk into memory now if it is paged out (evicting least recently used unpinned
        adapters), without pinning it: the engine calls it at admission, so that an adapter dir that became
        unreadable fails that request alone. OSError / ValueError from the read."""
        with self._lock:
            info = self._get(name)
            info.last_used = time.monotonic()
            if info.factors is None:
                self._make_room(info.bytes)
                info.factors = read_adapter(self.model, info.path, self.device, self.dtype)
                info.loads += 1
                self.loads += 1

    def pin(self, name: str) -> int:
        """Make `name` resident (read from disk if paged out, evicting least recently used unpinned adapters)
        and pin it for a running request; returns its slot. RuntimeError if the pinned adapters leave no room
        (the engine checks `can_pin` first)."""
        with self._lock:
            self.preload(name)
            info = self.adapters[name]
            if info.slot is None:
                self._flush()
                self._page_in(info)
            info.pins += 1
            return info.slot

    def unpin(self, name: str) -> None:
        with self._lock:
            info = self.adapters.get(name)
            if info is not None and info.pins > 0:
                info.pins -= 1
                info.last_used = time.monotonic()

    def set_rows(self, names: Sequence[str | None] | None) -> None:
        """Before a forward: row i of the batch uses adapter names[i] (pinned) or the base (None); None
        clears it (every row the base)."""
        b = self.batch
        with self._lock:
            self._flush()
            if not names or all(n is None for n in names):
                b.segments, b.order, b.row_slots = [], None, None
                return
            slots = [-1 if n is None else self.adapters[n].slot for n in names]
        if any(s is None for s in slots):
            bad = next(n for n, s in zip(names, slots) if s is None)
            raise RuntimeError(f"adapter {bad!r} is not resident: pin it before the forward")
        if self.mode == "bmm":
            b.segments, b.order = [], None
            b.row_slots = torch.tensor(slots, dtype=torch.int64, device=self.device)
            return
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(slots):
            if s >= 0:
                groups.setdefault(s, []).append(i)
        b.row_slots = None
        if len(groups) == 1 and len(next(iter(groups.values()))) == len(slots):
            b.segments, b.order = [(next(iter(groups)), 0, len(slots))], None
            return
        order, segments = [], []
        for s, rows in groups.items():
            segments.append((s, len(order), len(order) + len(rows)))
            order += rows
        b.segments = segments
        b.order = torch.tensor(order, dtype=torch.int64, device=self.device)

    # -- paging ---------------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Clear unregistered adapters' slots from the wrappers (engine thread, under the lock)."""
        for slot in self._retired:
            for w in self.wrappers.values():
                w.set_factors(slot, None)
        self._retired.clear()

    def _make_room(self, size: int) -> None:
        while self.resident_bytes() + size > self.budget_bytes:
            victims = [i for i in self.adapters.values() if i.factors is not None and i.pins == 0]
            if not victims:
                raise RuntimeError(f"adapter memory budget of {self.budget_bytes} bytes is held by running "
                                   "requests' adapters")
            victim = min(victims, key=lambda i: i.last_used)
            self._page_out(victim)
            self.evictions += 1

    def _page_in(self, info: AdapterInfo) -> None:
        """Give resident `info` a free slot and put its factors in the wrappers (engine thread)."""
        used = {i.slot for i in self.adapters.values() if i.slot is not None}
        info.slot = next(s for s in itertools.count() if s not in used)
        for path, pair in info.factors.items():
            if path in self.wrappers:
                self.wrappers[path].set_factors(info.slot, pair)

    def _page_out(self, info: AdapterInfo) -> None:
        """Drop `info`'s factors from the wrappers and from memory (read from disk again when needed; engine
        thread)."""
        if info.slot is not None:
            for w in self.wrappers.values():
                w.set_factors(info.slot, None)
        info.slot, info.factors = None, None

    def stats(self) -> dict:
        """Registered / resident adapters, resident bytes, budget, disk loads and evictions so far."""
        with self._lock:
            return {"adapters": len(self.adapters),
                    "resident": sum(i.factors is not None for i in self.adapters.values()),
                    "resident_bytes": self.resident_bytes(), "budget_bytes": self.budget_bytes,
                    "loads": self.loads, "evictions": self.evictions}
