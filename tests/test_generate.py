import subprocess
import sys

import pytest
import torch

from llmkit.infer.generate import SamplingParams, generate, stream_tokens
from llmkit.models import Decoder, DecoderConfig, save_model
from llmkit.sampling import filter_logits, sample_next
from llmkit.tokenizer import train_char


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = train_char(["hello world, ROMEO: and JULIET\n"])
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, d_model=32, n_head=2)).eval()
    path = tmp_path_factory.mktemp("m") / "model"
    save_model(model, path, tok)
    return path, model, tok


def greedy_without_cache(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


def test_greedy_generation_with_cache_equals_full_recompute(model_dir):
    _, model, tok = model_dir
    ids = tok.encode("ROMEO:")
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_at_eos=False)
    assert list(stream_tokens(model, ids, params)) == greedy_without_cache(model, ids, 20)


def test_generation_stops_at_context_length(model_dir):
    _, model, tok = model_dir
    ids = tok.encode("hello world")
    out = list(stream_tokens(model, ids, SamplingParams(max_new_tokens=500, temperature=1.0, seed=0, stop_at_eos=False)))
    assert len(ids) + len(out) == model.config.block_size


def test_stops_at_eos():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=10, block_size=32, n_layer=1, d_model=16, n_head=2)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[7] = 1.0  # every position prefers token 7 by far
        model.norm_f.weight.fill_(50.0)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    assert list(stream_tokens(model, [1, 2], params, eos_id=7)) == []
    assert len(list(stream_tokens(model, [1, 2], params, eos_id=3))) == 10


def test_seed_makes_sampling_reproducible(model_dir):
    _, model, tok = model_dir
    p = SamplingParams(max_new_tokens=15, temperature=1.0, top_p=0.95, seed=123)
    assert generate(model, tok, "hello", p) == generate(model, tok, "hello", p)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    kept = torch.isfinite(filter_logits(logits, top_p=0.81))[0].tolist()
    assert kept == [True, True, True, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.1))[0].tolist() == [True, False, False, False]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, temperature=1.0, generator=g), minlength=3) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)
    low_t = torch.bincount(sample_next(logits, temperature=0.3, generator=g), minlength=3) / 20000
    assert low_t[0] > 0.9


def test_cli_generate(model_dir):
    path, _, _ = model_dir
    r = subprocess.run([sys.executable, "-m", "llmkit", "generate", "--model", str(path), "--prompt", "ROMEO:",
                        "--max-new-tokens", "12", "--temperature", "0.7", "--top-p", "0.9", "--seed", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout.rstrip("\n")) > len("ROMEO:")
