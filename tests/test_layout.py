import copy

import torch

from llmkit.infer.engine import Engine, RequestParams
from llmkit.infer.layout import column_major_linears, row_major
from llmkit.models.decoder import Decoder, DecoderConfig
from llmkit.models.io import load_model, save_model


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


def test_engine_relays_weights_on_cpu_by_default_and_not_when_told():
    params = RequestParams(max_new_tokens=10, temperature=0, stop_at_eos=False)
    prompt = list(range(1, 15))
    plain = tiny()
    kept = Engine(plain, max_batch=2, column_major=False)
    assert plain.lm_head.weight.is_contiguous()
    want = kept.generate([prompt], params)[0]
    relaid = tiny()
    eng = Engine(relaid, max_batch=2)
    assert relaid.lm_head.weight.stride() == (1, 61)
    assert eng.generate([prompt], params)[0] == want
