import copy

import pytest
import torch

from llmkit.infer.engine import Engine, RequestParams
from llmkit.models.decoder import Decoder, DecoderConfig
from llmkit.models.io import load_model, save_model
from llmkit.models.layout import column_major_linears, row_major


def tiny(**kw) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=61, block_size=48, n_layer=2, d_model=32, n_head=2, **kw)).eval()


def test_column_major_keeps_values_shapes_and_ties():
    model = tiny()
    ref = copy.deepcopy(model)
    x = torch.randint(0, 61, (3, 20))
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert column_major_linears(model) == n_linear  # the tied head counts once: it is one Linear
    w = model.lm_head.weight
    assert w.shape == (61, 32) and w.stride() == (1, 61)
    assert model.lm_head.weight is model.tok_emb.weight  # the tie survives
    assert torch.allclose(model(x)[0], ref(x)[0], atol=1e-5)
    assert column_major_linears(model) == 0  # idempotent


def test_column_major_model_saves_row_major_and_reloads_equal(tmp_path):
    model = tiny(positions="rope", norm="rmsnorm", activation="swiglu", n_kv_head=1, tie_embeddings=False)
    x = torch.randint(0, 61, (2, 11))
    want = model(x)[0]
    column_major_linears(model)
    save_model(model, tmp_path / "m")
    assert model.lm_head.weight.stride() == (1, 61)  # saving did not change the live model
    again = load_model(tmp_path / "m")
    assert all(p.is_contiguous() for p in again.parameters())
    assert torch.allclose(again(x)[0], want, atol=1e-5)
    row_major(model)
    assert all(p.is_contiguous() for p in model.parameters())


def test_engine_relays_weights_on_cpu_without_the_kernels_and_not_when_told():
    """Without the decode kernels (kernels=False) the CPU engine re-stores Linear weights column-major; with
    them (the default where they build) weights stay row-major, the layout the kernels stream."""
    params = RequestParams(max_new_tokens=10, temperature=0, stop_at_eos=False)
    prompt = list(range(1, 15))
    plain = tiny()
    kept = Engine(plain, max_batch=2, column_major=False, kernels=False)
    assert plain.lm_head.weight.is_contiguous()
    want = kept.generate([prompt], params)[0]
    relaid = tiny()
    eng = Engine(relaid, max_batch=2, kernels=False)
    assert relaid.lm_head.weight.stride() == (1, 61)
    assert eng.generate([prompt], params)[0] == want


def test_inference_device_and_dtype_are_decided_in_one_place(tmp_path):
    from llmkit.infer.load import load_for_inference
    from llmkit.runtime import resolve_device, resolve_dtype
    from llmkit.tokenizer import train_char

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="expected one of auto, fp32, bf16, fp16"):
        resolve_dtype("int4")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    tok = train_char(["abc def"])
    torch.manual_seed(0)
    save_model(Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, d_model=32, n_head=2)),
               tmp_path / "m", tokenizer=tok)
    model, _, _ = load_for_inference(tmp_path / "m", device="cpu", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = Engine(model, tok, max_batch=1).generate([tok.encode("abc")], RequestParams(max_new_tokens=4,
                                                                                        temperature=0))
    assert len(out[0]) <= 4
