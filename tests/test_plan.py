"""The layout planner (`llmkit.train.plan`, `llmkit model info --plan`): its memory formulas against the bytes
a real model holds, sharding arithmetic, layout enumeration, and the CLI.

The measured side counts tensors exactly: parameter, gradient and AdamW-state bytes after a real step, and the
storages autograd saves in the forward pass (`saved_tensors_hooks`). benchmarks/plan_memory.py does the same
under torchrun for every strategy and records the step peak too (docs/distributed.md, "Planning a layout").
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from llmkit.models import Decoder, DecoderConfig
from llmkit.models.info import parameter_shapes
from llmkit.train import loop
from llmkit.train.plan import (
    Layout,
    layer_activation_bytes,
    parse_bytes,
    plan_layouts,
    rank_memory,
    stage_parameters,
)
from llmkit.train.pretrain import TrainConfig

GPT = dict(vocab_size=96, block_size=64, n_layer=2, d_model=64, n_head=4)
LLAMA = dict(vocab_size=96, block_size=64, n_layer=2, d_model=64, n_head=4, n_kv_head=2, activation="swiglu",
             norm="rmsnorm", positions="rope", tie_embeddings=False)
LLAMA_7B = dict(vocab_size=32000, block_size=4096, n_layer=32, d_model=4096, n_head=32, d_ff=11008,
                positions="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False)
B, T = 2, 64


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _train_step(cfg: DecoderConfig, precision: str) -> dict[str, int]:
    """One real AdamW step (llmkit's optimizer and autocast context) on one process: the bytes it holds."""
    torch.manual_seed(0)
    model = Decoder(cfg)
    model.train()
    optimizer = loop.make_optimizer(TrainConfig(), [(list(model.parameters()), 1.0)])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    autocast = loop.forward_context(torch.device("cpu"), dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # separate tensors, as the samplers give them
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = model(x, y)[1]
    loss.backward()
    grads = sum(_nbytes(p.grad) for p in model.parameters())
    optimizer.step()
    return {"weights": sum(_nbytes(p) for p in model.parameters()), "gradients": grads,
            "optimizer": sum(_nbytes(v) for s in optimizer.state.values() for v in s.values()),
            "saved": sum(saved.values())}


@pytest.mark.parametrize("kw", [GPT, LLAMA], ids=["gpt", "llama"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_formulas_match_the_bytes_of_a_real_step(kw, precision):
    cfg = DecoderConfig(**kw)
    measured = _train_step(cfg, precision)
    mem = rank_memory(cfg, Layout(), seq_len=T, micro_batch=B, precision=precision)["memory_bytes"]
    n = sum(p.numel() for p in Decoder(cfg).parameters())
    tensors = len(list(Decoder(cfg).parameters()))
    # model state: exact (fp32 parameters are the master weights; AdamW: m, v and a 0-dim step per tensor)
    assert mem["weights"] == measured["weights"] == 4 * n
    assert mem["gradients"] == measured["gradients"] == 4 * n
    assert mem["optimizer"] == measured["optimizer"] == 8 * n + 4 * tensors
    # what autograd saves: activations, plus autocast's 16-bit weight copies in bf16
    if precision == "fp32":
        assert mem["compute_weights"] == 0
    assert mem["activations"] + mem["compute_weights"] == measured["saved"]


def test_activation_checkpointing_and_sequence_parallel_shrink_activations():
    cfg = DecoderConfig(**LLAMA_7B)
    full = rank_memory(cfg, Layout(), micro_batch=1)["memory_bytes"]["activations"]
    ckpt = rank_memory(cfg, Layout(), micro_batch=1, activation_checkpointing=True)["memory_bytes"]["activations"]
    per_layer = layer_activation_bytes(cfg, 4096, 2, seq_len=4096)["total"]
    assert ckpt < full / 5
    assert ckpt >= 32 * 4096 * 4 * 4096 + per_layer  # every block's fp32 input, plus one layer recomputed
    # tp 8 with sequence parallelism: everything split but the projections' all-gathered inputs
    tp = rank_memory(cfg, Layout(tp=8), micro_batch=1)["memory_bytes"]["activations"]
    parts = layer_activation_bytes(cfg, 4096, 2, tp=8, seq_len=4096)
    assert parts["gathered"] == layer_activation_bytes(cfg, 4096, 2, seq_len=4096)["gathered"]
    assert full / 8 < tp < full / 2
    no_sp = rank_memory(cfg, Layout(tp=8), micro_batch=1, sequence_parallel=False)["memory_bytes"]["activations"]
    assert no_sp > 1.5 * tp
    # the loss on all-gathered logits (llmkit's mesh) or on V / tp of them (vocabulary-parallel)
    gathered = rank_memory(cfg, Layout(tp=8), micro_batch=1)["memory_bytes"]["logits_peak"]
    split = rank_memory(cfg, Layout(tp=8), micro_batch=1, vocab_parallel_loss=True)["memory_bytes"]["logits_peak"]
    assert gathered == 8 * split == 2 * 4096 * 4 * 32000


def test_sharding_divides_model_state():
    cfg = DecoderConfig(**LLAMA_7B)  # every dim 0 divisible by 8: exact division
    one = rank_memory(cfg, Layout())["memory_bytes"]
    n = sum(math.prod(s) for s in parameter_shapes(cfg).values())
    assert one["weights"] == 4 * n and one["optimizer"] == 8 * n + 4 * len(parameter_shapes(cfg))
    for fsdp in (2, 4, 8):
        m = rank_memory(cfg, Layout(fsdp=fsdp))["memory_bytes"]
        assert m["weights"] * fsdp == one["weights"] and m["gradients"] * fsdp == one["gradients"]
    assert rank_memory(cfg, Layout(dp=8))["memory_bytes"]["weights"] == one["weights"]  # replicas: no saving
    # tp splits the matrices and embeddings, not the norms
    norms = sum(math.prod(s) for name, s in parameter_shapes(cfg).items() if "norm" in name)
    for tp in (2, 8):
        assert rank_memory(cfg, Layout(tp=tp))["memory_bytes"]["weights"] == 4 * ((n - norms) // tp + norms)
    # pp: the stages together hold the model once (untied); the worst stage at least 1/pp of it
    stages = stage_parameters(cfg, Layout(pp=4))
    assert sum(s["params"] for s in stages) == n and [len(s["layers"]) for s in stages] == [8] * 4
    assert rank_memory(cfg, Layout(pp=4))["memory_bytes"]["weights"] >= 4 * n / 4
    # fsdp x tp x pp together: within the replicated norms and the embeddings' stage imbalance of n / 64
    m = rank_memory(cfg, Layout(fsdp=2, tp=8, pp=4))["memory_bytes"]["weights"]
    assert 4 * n / 64 <= m < 4 * n / 64 * 1.3
    # tied embeddings under pp: the last stage keeps its own copy of the matrix for the head
    tied = DecoderConfig(**{**LLAMA_7B, "tie_embeddings": True})
    n_tied = sum(math.prod(s) for s in parameter_shapes(tied).values())
    assert sum(s["params"] for s in stage_parameters(tied, Layout(pp=2))) == n_tied + 32000 * 4096
    assert sum(s["params"] for s in stage_parameters(tied, Layout())) == n_tied


def test_uneven_fsdp_shards_take_the_largest():
    cfg = DecoderConfig(vocab_size=97, block_size=16, n_layer=1, d_model=8, n_head=2)  # 97 rows over 2 ranks
    rows = {name: s for name, s in parameter_shapes(cfg).items()}
    expected = sum(math.ceil(s[0] / 2) * math.prod(s[1:]) for s in rows.values())
    assert rank_memory(cfg, Layout(fsdp=2), precision="fp32")["memory_bytes"]["weights"] == 4 * expected


def test_enumeration_respects_divisibility():
    cfg = DecoderConfig(vocab_size=1000, block_size=128, n_layer=2, d_model=256, n_head=4, n_kv_head=2, d_ff=1536,
                        tie_embeddings=False)
    plan = plan_layouts(cfg, 8, parse_bytes("80GB"))
    seen = {(p["dp"], p["fsdp"], p["tp"], p["pp"]) for p in plan["layouts"]}
    assert all(dp * fsdp * tp * pp == 8 for dp, fsdp, tp, pp in seen)
    assert {tp for _, _, tp, _ in seen} == {1, 2} and {pp for *_, pp in seen} == {1, 2}
    expected = {(8 // (f * t * p), f, t, p) for t in (1, 2) for p in (1, 2) for f in (1, 2, 4, 8) if 8 % (f * t * p) == 0}
    assert seen == expected
    why = {(x["tp"], x["pp"]): x["why"] for x in plan["excluded"]}
    assert "n_kv_head=2" in why[(4, 1)] and "n_head=4" in why[(8, 1)] and "n_layer=2" in why[(1, 4)]
    tied = plan_layouts(DecoderConfig(**{**cfg.__dict__, "tie_embeddings": True}), 8, parse_bytes("80GB"))
    assert {p["pp"] for p in tied["layouts"]} == {1, 2}  # the last stage keeps its own copy of the tied matrix
    odd_ff = DecoderConfig(vocab_size=1000, block_size=128, n_layer=2, d_model=256, n_head=4, d_ff=1002)
    assert {x["tp"] for x in plan_layouts(odd_ff, 8, parse_bytes("80GB"))["layouts"]} == {1, 2}
    assert plan["fitting"] == len(seen)
    # ranked: fewest stages, then smallest tp, then fewest shards; best first
    ranked = [(p["pp"], p["tp"], p["fsdp"]) for p in plan["layouts"]]
    assert ranked == sorted(ranked) and plan["layouts"][0]["rank"] == 1
    assert plan["layouts"][0]["dp"] == 8  # it fits unsharded: plain data parallelism


def test_a_7b_model_on_8_gpus_needs_sharding_and_a_small_gpu_fits_nothing():
    cfg = DecoderConfig(**LLAMA_7B)
    plan = plan_layouts(cfg, 8, parse_bytes("80GB"), micro_batch=1)
    by = {(p["dp"], p["fsdp"], p["tp"], p["pp"]): p for p in plan["layouts"]}
    assert not by[(8, 1, 1, 1)]["fits"]  # 16+ bytes x 6.7B parameters per replica
    assert "GiB usable" in by[(8, 1, 1, 1)]["why"]
    best = plan["layouts"][0]
    assert best["fits"] and best["pp"] == 1 and best["tp"] == 1 and best["fsdp"] > 1

    small = plan_layouts(cfg, 8, parse_bytes("8GiB"), micro_batch=1)
    assert small["fitting"] == 0 and all(not p["fits"] and p["rank"] is None for p in small["layouts"])
    assert small["advice"].startswith("no layout fits on 8 GPU(s)")
    lowest = min(p["memory_bytes"]["total"] for p in small["layouts"])
    assert small["layouts"][0]["memory_bytes"]["total"] == lowest  # the closest miss is named first
    with pytest.raises(ValueError, match="gpus"):
        plan_layouts(cfg, 0, parse_bytes("80GB"))


@pytest.mark.parametrize("text", ["80XB", "80", "", "GB", "-1GB", "0GB"])
def test_bad_gpu_memory_is_refused(text):
    with pytest.raises(ValueError, match="gpu memory"):
        parse_bytes(text)


def test_gpu_memory_units():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("141 g") == 141 * 10**9 and parse_bytes("1.5TB") == 1.5e12


def _cli(capsys, *args) -> tuple[int, str, str]:
    from llmkit.cli import main

    code = main(["model", "info", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_plan(tmp_path, capsys):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  n_layer: 4\n  d_model: 256\n  n_head: 4\n  vocab_size: 1000\n  block_size: 512\n"
                   "data:\n  tokenizer: none\n")
    code, out, err = _cli(capsys, "--plan", "--gpus", "4", "--gpu-mem", "80GB", "--model", str(cfg), "--seq-len",
                          "256", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["gpus"] == 4 and plan["seq_len"] == 256 and plan["precision"] == "bf16"
    assert plan["layouts"][0]["rank"] == 1 and (plan["layouts"][0]["dp"], plan["layouts"][0]["fsdp"]) == (4, 1)

    code, out, err = _cli(capsys, "--plan", "--gpus", "4", "--gpu-mem", "80GB", "--model", str(cfg),
                          "--micro-batch", "2", "--precision", "fp32", "model.n_layer=2")
    assert code == 0, err
    lines = out.splitlines()
    assert "4 GPU(s)" in lines[0] and "micro-batch 2, fp32" in lines[0]
    assert lines[1].split()[:5] == ["rank", "dp", "fsdp", "tp", "pp"] and lines[-1].startswith("best: dp=4")

    code, _, err = _cli(capsys, "--plan", "--gpus", "2", "--gpu-mem", "80XB", "--model", str(cfg))
    assert code == 2 and "gpu memory '80XB'" in err
    code, _, err = _cli(capsys, "--plan", "--gpus", "0", "--gpu-mem", "80GB", "--model", str(cfg))
    assert code == 2 and "gpus: must be >= 1" in err
    code, _, err = _cli(capsys, "--plan", "--gpu-mem", "80GB", "--model", str(cfg))
    assert code == 2 and "--gpus" in err


def test_cli_plan_from_a_model_directory(tmp_path, capsys):
    from llmkit.models import save_model

    save_model(Decoder(DecoderConfig(**LLAMA)), tmp_path / "model")
    code, out, err = _cli(capsys, "--plan", "--gpus", "2", "--gpu-mem", "1MiB", "--model", str(tmp_path / "model"))
    assert code == 0, err
    assert "no layout fits on 2 GPU(s)" in out.splitlines()[-1]


WORKER = textwrap.dedent("""
    import json, sys, torch
    from llmkit import runtime
    from llmkit.models import Decoder, DecoderConfig
    from llmkit.train import distributed as D, loop
    from llmkit.train.pretrain import TrainConfig

    info = runtime.setup("cpu")
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**json.loads(sys.argv[1])))
    D.wrap_model(model, info, "fsdp")
    opt = loop.make_optimizer(TrainConfig(), [(list(model.parameters()), 1.0)], fused=False)
    x = torch.randint(0, model.config.vocab_size, (2, 17))
    model(x[:, :-1], x[:, 1:])[1].backward()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    nbytes = lambda t: local(t).numel() * local(t).element_size()
    out = {"weights": sum(nbytes(p) for p in model.parameters()),
           "gradients": sum(nbytes(p.grad) for p in model.parameters())}
    opt.step()
    out["optimizer"] = sum(nbytes(v) for s in opt.state.values() for v in s.values())
    print("RESULT", info.rank, json.dumps(out), flush=True)
    runtime.teardown(info)
""")


def test_two_process_fsdp_model_state_matches_the_prediction(tmp_path):
    """2 gloo processes, FSDP2: each rank's parameter, gradient and AdamW bytes equal the prediction."""
    kw = dict(GPT, vocab_size=97)  # 97 rows: rank 0 holds 49, rank 1 48
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           json.dumps(kw)]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("torchrun did not finish in 120 s")
    assert p.returncode == 0, f"{stdout[-2000:]}\n{stderr[-4000:]}"
    ranks = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT"):
            _, rank, payload = line.split(" ", 2)
            ranks[int(rank)] = json.loads(payload)
    assert set(ranks) == {0, 1}
    cfg = DecoderConfig(**kw)
    predicted = rank_memory(cfg, Layout(fsdp=2), precision="fp32")["memory_bytes"]
    for k in ("weights", "gradients", "optimizer"):
        assert ranks[0][k] == predicted[k], k  # rank 0 holds the larger half of every uneven tensor
    n = sum(p.numel() for p in Decoder(cfg).parameters())
    assert ranks[0]["weights"] + ranks[1]["weights"] == 4 * n  # the shards add up to the model
