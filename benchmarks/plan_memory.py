"""Predicted vs measured per-rank training memory: `llmkit.train.plan` against real CPU training under torchrun.

Each case launches `torchrun --standalone --nproc_per_node N` (gloo, CPU) on this file's worker, which builds
a small decoder, lays it out as the case says (one process; `train.strategy` ddp or fsdp through
`llmkit.train.distributed.wrap_model`; and, where `llmkit.train.mesh` exists, `parallel:` layouts through
`mesh.parallelize`), trains two steps of AdamW (llmkit's `make_optimizer`, under llmkit's autocast context)
on random tokens, and measures during the second step, on every rank:

* model state, exactly: bytes of the local parameter shards (`DTensor.to_local()`), of their gradients after
  backward, and of every tensor in the optimizer state after the step;
* saved for backward: bytes of the distinct storages autograd saves in the forward pass
  (`torch.autograd.graph.saved_tensors_hooks`), parameters excluded, sized when the forward has returned
  (FSDP has then freed the gathered weights it saved): activations plus the 16-bit weight
  copies autocast makes (predicted: activations + compute_weights);
* step peak: the most bytes live at once during forward, backward and the optimizer step, counting every
  storage an operator allocates in the step (a `TorchDispatchMode` that adds each new output storage and
  subtracts it when it is freed: CPU tensors have no `torch.cuda.max_memory_allocated`). Predicted: the
  gradients, compute weights, activations, logits peak and FSDP buffers of `rank_memory` (DDP's buckets
  exist before the step; they are measured separately, as the bytes `DDP(...)` leaves allocated).

    python benchmarks/plan_memory.py                 # every case, JSON on stdout and in
                                                     # benchmarks/results/plan_memory.json
    python benchmarks/plan_memory.py --quick         # the llama-style model only
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "plan_memory.json"

MODELS = {
    "gpt": dict(vocab_size=512, block_size=128, n_layer=4, d_model=128, n_head=4),
    "llama": dict(vocab_size=512, block_size=128, n_layer=4, d_model=128, n_head=4, n_kv_head=2, activation="swiglu",
                  norm="rmsnorm", positions="rope"),
}
MICRO_BATCH, SEQ_LEN = 4, 128

# (name, processes, how: single | ddp | fsdp | mesh | pipeline, layout dp/fsdp/tp/pp, precision, activation
# checkpointing). Pipeline cases run MICROBATCHES micro-batches of MICRO_BATCH sequences per step.
CASES = [
    ("1 process", 1, "single", (1, 1, 1, 1), "fp32", False),
    ("1 process", 1, "single", (1, 1, 1, 1), "bf16", False),
    ("strategy ddp", 2, "ddp", (2, 1, 1, 1), "fp32", False),
    ("strategy ddp", 2, "ddp", (2, 1, 1, 1), "bf16", False),
    ("strategy fsdp", 2, "fsdp", (1, 2, 1, 1), "fp32", False),
    ("parallel fsdp=2", 2, "mesh", (1, 2, 1, 1), "fp32", False),
    ("parallel fsdp=2", 2, "mesh", (1, 2, 1, 1), "bf16", False),
    ("parallel fsdp=2, activation checkpointing", 2, "mesh", (1, 2, 1, 1), "fp32", True),
    ("parallel dp=2", 2, "mesh", (2, 1, 1, 1), "fp32", False),
    ("parallel tp=2", 2, "mesh", (1, 1, 2, 1), "fp32", False),
    ("parallel pp=2 (1f1b, 4 micro-batches; untied)", 2, "pipeline", (1, 1, 1, 2), "fp32", False),
]
MICROBATCHES = 4


# -- the worker (one per rank, under torchrun) ---------------------------------------------------------
def _local_bytes(t) -> int:
    if t is None:
        return 0
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def worker(args) -> None:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from llmkit import runtime
    from llmkit.models.decoder import DecoderConfig
    from llmkit.models.io import build_model
    from llmkit.train import distributed as D
    from llmkit.train import loop
    from llmkit.train.pretrain import TrainConfig

    class LiveBytes(TorchDispatchMode):
        """Bytes of the storages operators allocate while active, live now and at most (`peak`)."""

        def __init__(self, known: set[int]):
            super().__init__()
            self.known, self.live, self.now, self.peak = known, {}, 0, 0

        def _free(self, key: int) -> None:
            self.now -= self.live.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not hasattr(t, "to_local"):
                    try:
                        st = t.untyped_storage()
                        key = st.data_ptr()
                    except (RuntimeError, NotImplementedError):  # a wrapper without storage (async collective)
                        continue
                    if key and key not in self.live and key not in self.known:
                        self.live[key] = st.nbytes()
                        self.now += st.nbytes()
                        self.peak = max(self.peak, self.now)
                        weakref.finalize(st, self._free, key)
            return out

    def storages(tensors) -> set[int]:
        out = set()
        for t in tensors:
            if isinstance(t, torch.Tensor):
                t = t.to_local() if hasattr(t, "to_local") else t
                out.add(t.untyped_storage().data_ptr())
        return out

    info = runtime.setup("cpu")
    cfg = DecoderConfig(**json.loads(args.model))
    dp, fsdp, tp, pp = args.layout
    dtype = runtime.resolve_dtype(args.precision, info.device)
    torch.manual_seed(0)
    model = build_model(cfg)
    buckets = 0
    data_rank, stage = info.rank, 0
    runner = None
    param_dtype = dtype if dtype != torch.float32 else None
    if args.how in ("ddp", "fsdp"):
        known = storages(list(model.parameters()) + list(model.buffers()))
        with LiveBytes(known) as track:
            wrapped = D.wrap_model(model, info, args.how)
        buckets = track.now if args.how == "ddp" else 0
    elif args.how in ("mesh", "pipeline"):
        from llmkit.train import mesh as M

        layout = M.make_layout(M.ParallelConfig(dp=dp, fsdp=fsdp, tp=tp, pp=pp, microbatches=MICROBATCHES if pp > 1
                                                else None, activation_checkpointing=args.ckpt), info)
        data_rank, stage = layout.data_rank, layout.pp_rank
        if args.how == "pipeline":
            from llmkit.train.pipeline import PipelineRunner

            runner = PipelineRunner(model, layout, param_dtype)
            model = runner.parts
        else:
            wrapped = M.parallelize(model, layout, param_dtype=param_dtype)
    else:
        wrapped = model
    optimizer = loop.make_optimizer(TrainConfig(), [(list(model.parameters()), 1.0)],
                                    fused=not (info.enabled and args.how != "ddp"))
    autocast = loop.forward_context(info.device, dtype)
    gen = torch.Generator().manual_seed(1000 + data_rank)
    rows = MICRO_BATCH * (MICROBATCHES if runner is not None else 1)
    hooks = runner is None and not args.ckpt  # saved tensors: one forward, then backward

    def batch():
        x = torch.randint(0, cfg.vocab_size, (rows, SEQ_LEN + 1), generator=gen)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step(measure: bool) -> dict:
        x, y = batch()
        out = {}
        saved: dict[int, object] = {}
        params = storages(model.parameters())

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                local = t.to_local() if hasattr(t, "to_local") else t
                try:
                    st = local.untyped_storage()
                    ptr = st.data_ptr()
                except (RuntimeError, NotImplementedError):
                    return t
                # keyed by the storage itself: a storage FSDP has freed may have its address reused
                if ptr not in params and st._cdata not in saved:
                    saved[st._cdata] = st
            return t

        known = storages([*model.parameters(), *model.buffers(),
                          *(v for s in optimizer.state.values() for v in s.values())])
        track = LiveBytes(known) if measure else None
        if track is not None:
            track.__enter__()
        try:
            if runner is not None:  # the schedule runs forward and backward of every micro-batch
                with autocast():
                    runner.train_step({"idx": x, "targets": y}, 1.0)
            elif measure and hooks:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
                    loss = wrapped(x, y)[1]
                # sized after the forward: FSDP frees the gathered weights autograd saved (resize to 0)
                out["saved_for_backward"] = sum(st.nbytes() for st in saved.values())
                saved.clear()
            else:
                with autocast():
                    loss = wrapped(x, y)[1]
            if runner is None:
                loss.backward()
            out["gradients"] = sum(_local_bytes(p.grad) for p in model.parameters())
            D.clip_grad_norm([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            if track is not None:
                track.__exit__(None, None, None)
        if measure:
            out["step_peak"] = track.peak
        return out

    step(measure=False)  # the optimizer state exists from the first step on
    measured = step(measure=True)
    measured["weights"] = sum(_local_bytes(p) for p in model.parameters())
    measured["optimizer"] = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()
                                if isinstance(v, torch.Tensor))
    measured["ddp_buckets"] = buckets
    measured["rank"], measured["stage"] = info.rank, stage
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(measured))
    runtime.teardown(info)


# -- the driver ----------------------------------------------------------------------------------------
def model_config(model: str, how: str) -> dict:
    """The model's DecoderConfig keys; pipelined untied (llmkit's stages cannot share a tied embedding)."""
    return {**MODELS[model], "tie_embeddings": False} if how == "pipeline" else MODELS[model]


def run_case(model: str, nproc: int, how: str, layout: tuple, precision: str, ckpt: bool = False,
             timeout: int = 300) -> list[dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(HERE), "--worker", "--model", json.dumps(model_config(model, how)), "--how", how,
               "--layout", *map(str, layout), "--precision", precision, "--out", out] + (["--ckpt"] if ckpt else [])
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) as p:
            try:
                stdout, stderr = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                raise RuntimeError(f"{how} {layout}: no result in {timeout} s") from None
        if p.returncode:
            raise RuntimeError(f"{how} {layout} {precision}: exit {p.returncode}\n{stderr[-3000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(nproc)]


def predict(model: str, how: str, layout: tuple, precision: str, ckpt: bool = False, stage: int = 0) -> dict:
    """`rank_memory`'s figures for what `worker` measures on a rank of pipeline stage `stage`."""
    from llmkit.models.decoder import DecoderConfig
    from llmkit.train.plan import Layout, rank_memory

    dp, fsdp, tp, pp = layout
    cfg = DecoderConfig(**model_config(model, how))
    mem = rank_memory(cfg, Layout(dp, fsdp, tp, pp), SEQ_LEN, MICRO_BATCH, precision, activation_checkpointing=ckpt,
                      microbatches=MICROBATCHES if pp > 1 else None, ddp=how == "ddp")["stages"][stage]["memory_bytes"]
    out = {
        "weights": mem["weights"], "gradients": mem["gradients"], "optimizer": mem["optimizer"],
        "step_peak": mem["gradients"] + mem["compute_weights"] + mem["activations"] + mem["logits_peak"]
        + (mem["communication"] if how != "ddp" else 0),
        "ddp_buckets": mem["communication"] if how == "ddp" else 0,
    }
    if how != "pipeline" and not ckpt:
        out["saved_for_backward"] = mem["activations"] + mem["compute_weights"]
    return out


COMPONENTS = ("weights", "gradients", "optimizer", "saved_for_backward", "step_peak", "ddp_buckets")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None)
    ap.add_argument("--how", default="single")
    ap.add_argument("--layout", type=int, nargs=4, default=(1, 1, 1, 1))
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="the llama-style model only")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    try:
        import llmkit.train.mesh  # noqa: F401
        import llmkit.train.pipeline  # noqa: F401
        have_mesh = True
    except ImportError:
        have_mesh = False
    rows = []
    for model in (["llama"] if args.quick else list(MODELS)):
        for name, nproc, how, layout, precision, ckpt in CASES:
            if how in ("mesh", "pipeline") and not have_mesh:
                continue
            case = {"model": model, "case": name, "processes": nproc, "precision": precision,
                    "layout": dict(zip(("dp", "fsdp", "tp", "pp"), layout)), "activation_checkpointing": ckpt}
            try:
                ranks = run_case(model, nproc, how, layout, precision, ckpt)
            except RuntimeError as e:
                rows.append({**case, "error": str(e)[-1500:]})
                print(json.dumps(rows[-1]), file=sys.stderr)
                continue
            per_rank = []
            for m in ranks:
                pred = predict(model, how, layout, precision, ckpt, m["stage"])
                per_rank.append({"rank": m["rank"], "stage": m["stage"], **{
                    k: {"predicted": pred[k], "measured": m[k],
                        "ratio": round(pred[k] / m[k], 4) if m[k] else None}
                    for k in COMPONENTS if k in pred and k in m and (pred[k] or m[k])}})
            rows.append({**case, "ranks": per_rank})
            print(json.dumps(rows[-1]), file=sys.stderr)
    import torch

    result = {"command": "python benchmarks/plan_memory.py" + (" --quick" if args.quick else ""),
              "torch": torch.__version__, "micro_batch": MICRO_BATCH, "seq_len": SEQ_LEN,
              "pipeline_microbatches": MICROBATCHES, "models": MODELS, "cases": rows}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
