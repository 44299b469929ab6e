"""Tensor- and pipeline-parallel inference (llmkit.infer.parallel) on 2 CPU processes over gloo.

One spawn of 2 processes (module fixture) runs every case and saves what each rank saw; the tests compare
it with single-process `stream_tokens` and a single-process forward pass on the same weights.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from llmkit.infer.generate import SamplingParams, stream_tokens
from llmkit.infer.parallel import parallel_generate, shard_decoder_tp, split_decoder_pp
from llmkit.models.decoder import Decoder, DecoderConfig

WORLD = 2
TIMEOUT = 120  # seconds for the 2 processes; they take a few
PROMPT = [3, 17, 5, 42, 8, 8, 21, 60, 1]
STYLES = ("gpt2", "llama", "gemma2", "qwen3")
MODES = ("tp", "pp")
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, top_p=None)
SEEDED = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.95, seed=1234)


def tiny(style: str) -> Decoder:
    """Same weights in every process: fixed seed, and weights large enough that logits are not near-ties."""
    if style == "gpt2":  # learned positions, LayerNorm with biases, tanh GELU, tied embeddings
        c = DecoderConfig(vocab_size=64, block_size=32, n_layer=2, d_model=32, n_head=4,
                          activation="gelu_tanh", bias=True)
    elif style == "llama":  # RoPE, RMSNorm, SwiGLU, GQA 4 query / 2 kv heads, untied head, 3 layers (uneven split)
        c = DecoderConfig(vocab_size=64, block_size=32, n_layer=3, d_model=32, n_head=4, n_kv_head=2,
                          activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=False)
    elif style == "gemma2":  # GeGLU, scaled embeddings, (1+w) norms, post-norms, soft-caps, local/global layers
        c = DecoderConfig(vocab_size=64, block_size=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=16,
                          activation="geglu_tanh", norm="rmsnorm", positions="rope", scale_embeddings=True,
                          norm_unit_offset=True, post_norms=True, attn_scale=0.25, attn_softcap=5.0,
                          final_softcap=3.0, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    else:  # qwen3: q/k RMSNorm, explicit head_dim, q/k/v biases, every layer sliding (window 8 < 25 tokens)
        c = DecoderConfig(vocab_size=64, block_size=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=12,
                          activation="swiglu", norm="rmsnorm", positions="rope", qk_norm=True, qkv_bias=True,
                          sliding_window=8)
    torch.manual_seed(0)
    model = Decoder(c)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    from llmkit.runtime import setup, teardown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    info = setup("cpu")
    results, times = {}, {}
    idx = torch.tensor([PROMPT])
    for style in STYLES:
        model = tiny(style)
        for mode in MODES:
            t0 = time.perf_counter()
            greedy = parallel_generate(model, PROMPT, GREEDY, mode=mode)
            times[(style, mode)] = time.perf_counter() - t0
            seeded = parallel_generate(model, PROMPT, SEEDED, mode=mode)
            stage = shard_decoder_tp(model, rank, WORLD) if mode == "tp" else split_decoder_pp(model, rank, WORLD)
            with torch.no_grad():
                logits = stage(idx)  # one full forward, no cache
            results[(style, mode)] = {"greedy": greedy, "seeded": seeded,
                                      "logits": None if logits is None else logits.clone()}
    torch.save({"results": results, "times": times}, os.path.join(out_dir, f"rank{rank}.pt"))
    teardown(info)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("parallel-infer")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    if hung:
        pytest.fail(f"parallel inference workers did not finish in {TIMEOUT} s")
    codes = [p.exitcode for p in procs]
    if any(codes):
        pytest.fail(f"parallel inference workers exited with {codes} (their stderr is above)")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("style", STYLES)
def test_tokens_match_single_process(ranks, style, mode):
    model = tiny(style)
    for params, key in ((GREEDY, "greedy"), (SEEDED, "seeded")):
        want = list(stream_tokens(model, PROMPT, params))
        assert len(want) == params.max_new_tokens
        for r, got in enumerate(ranks):
            assert got["results"][(style, mode)][key] == want, f"rank {r} {key}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("style", STYLES)
def test_logits_match_single_process(ranks, style, mode):
    with torch.no_grad():
        want = tiny(style)(torch.tensor([PROMPT]))[0]
    holders = range(WORLD) if mode == "tp" else [WORLD - 1]  # tp: every rank; pp: the last stage
    for r in holders:
        got = ranks[r]["results"][(style, mode)]["logits"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if mode == "pp":
        assert all(ranks[r]["results"][(style, mode)]["logits"] is None for r in range(WORLD - 1))


def test_refuses_indivisible_heads():
    c = DecoderConfig(vocab_size=16, block_size=8, n_layer=1, d_model=24, n_head=3)
    with pytest.raises(ValueError, match="n_head=3"):
        shard_decoder_tp(Decoder(c), 0, 2)
    c = DecoderConfig(vocab_size=16, block_size=8, n_layer=1, d_model=32, n_head=4, n_kv_head=1)
    with pytest.raises(ValueError, match="n_kv_head=1"):
        shard_decoder_tp(Decoder(c), 0, 2)
    with pytest.raises(ValueError, match="stages"):
        split_decoder_pp(Decoder(c), 0, 2)


def test_pp_split_is_contiguous():
    model = tiny("llama")
    stages = [split_decoder_pp(model, r, 2) for r in range(2)]
    assert [s.layer_range for s in stages] == [(0, 1), (1, 3)]
    assert stages[0].embed is not None and stages[0].head is None
    assert stages[1].embed is None and stages[1].head is not None


def test_pp_refuses_sequence_length_dependent_rope():
    c = DecoderConfig(vocab_size=16, block_size=32, n_layer=2, d_model=16, n_head=2, positions="rope",
                      norm="rmsnorm", rope_scaling={"rope_type": "dynamic", "factor": 2.0,
                                                    "original_max_position_embeddings": 16})
    with pytest.raises(ValueError, match="pipeline parallel does not support rope_scaling 'dynamic'"):
        split_decoder_pp(Decoder(c), 0, 2)


def test_cli_generate_parallel_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m llmkit generate --parallel tp|pp` prints what one process prints."""
    import subprocess
    import sys

    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import save_model
    from llmkit.tokenizer import train_char

    tok = train_char(["the quick brown fox jumps over the lazy dog"])
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, d_model=32, n_head=4,
                                  n_kv_head=2, positions="rope", norm="rmsnorm", activation="swiglu"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    save_model(model, tmp_path / "m", tok)
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "the ", "--max-new-tokens", "12",
            "--temperature", "0"]
    single = subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    for mode in ("tp", "pp"):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                              "2", "-m", "llmkit", *args, "--parallel", mode], capture_output=True, text=True,
                             timeout=180)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout == single.stdout, (mode, run.stdout, single.stdout)
