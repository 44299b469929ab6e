import json

import pytest
import torch

from llmkit.cli import main
from llmkit.infer.bench import bench_generate, weight_bytes
from llmkit.infer.quantize import QuantConfig, quantize_model
from llmkit.models.decoder import Decoder, DecoderConfig
from llmkit.models.io import save_model
from llmkit.tokenizer import train_char


def tiny(block=64) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=40, block_size=block, n_layer=2, d_model=32, n_head=2)).eval()


def test_cli_bench_generate_beside_hf_reports_every_batch_and_identical_greedy_text(tmp_path, capsys):
    pytest.importorskip("transformers")
    tok = train_char(["the quick brown fox jumps over a lazy dog"])
    torch.manual_seed(0)
    save_model(Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, d_model=32, n_head=2)),
               tmp_path / "m", tokenizer=tok)
    assert main(["bench", "generate", "--model", str(tmp_path / "m"), "--batch", "1,3", "--prompt-len", "12",
                 "--new-tokens", "6", "--reference", "hf"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["batches"]) == {"1", "3"}
    for b, row in out["batches"].items():
        assert row["tok_s"] > 0 and row["ttft_ms"] > 0 and row["hf_tok_s"] > 0
        assert row["identical_sequences"] == f"{b}/{b}"  # the same weights decode the same greedy tokens
    mem, b1 = out["batch1_memory"], out["batches"]["1"]
    assert mem["measured_read_GB_s"] > 0
    # one decode step reads every weight once
    assert mem["weight_read_GB_s"] == pytest.approx(b1["decode_tok_s"] * out["weight_MB"] / 1e3, rel=0.01)
    assert b1["compute_ceiling_fp32_tok_s"] > 0


def test_bench_rejects_a_run_longer_than_the_context():
    with pytest.raises(ValueError, match="block_size 64"):
        bench_generate(tiny(), [1], prompt_len=60, new_tokens=10)


def test_int8_model_skips_the_hf_reference_with_the_reason_and_counts_int8_bytes():
    model = tiny()
    fp32_bytes = weight_bytes(model)
    int8 = quantize_model(model, QuantConfig(mode="dynamic"))
    assert weight_bytes(int8) < 0.6 * fp32_bytes  # Linear weights went from 4 bytes to 1
    out = bench_generate(int8, [2], prompt_len=8, new_tokens=4, reference="hf")
    assert "reference_skipped" in out and "hf_tok_s" not in out["batches"]["2"]
