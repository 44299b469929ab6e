"""Encoder family (BERT): logits parity with `transformers` both ways, padding, bidirectionality, MLM learning."""

import math

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[dev]'); BERT parity tests need it"
)

from conftest import shared_file  # noqa: E402
from llmkit.models.encoder import Encoder, EncoderClassifier, EncoderConfig  # noqa: E402
from llmkit.models.hf_bert import bert_config_from_hf, export_bert, import_bert  # noqa: E402

VOCAB = 101


def bert_config(**kw):
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=64, **kw)


def randomize(model, std=0.15):
    # Default inits (std 0.02, norms at 1/0) keep activations so small that e.g. a swapped norm or a
    # pre-norm block would stay under the tolerance; re-draw every parameter so such mistakes show up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "norm" in name.split(".")[-2]:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model.eval()


def inputs(B=3, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    types = torch.randint(0, 2, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if B >= 3:
        mask[1, -4:] = 0  # the last positions of rows 1 and 2 are padding
        mask[2, -1:] = 0
    return ids, types, mask


def small_encoder(**kw):
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=VOCAB, block_size=64, n_layer=2, d_model=64, n_head=4, d_ff=128, **kw)
    return randomize(Encoder(cfg))


@pytest.fixture(scope="module")
def hf_mlm_dir(tmp_path_factory):
    torch.manual_seed(1)
    hf = randomize(transformers.BertForMaskedLM(bert_config()))
    path = tmp_path_factory.mktemp("bert_mlm")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def hf_cls_dir(tmp_path_factory):
    torch.manual_seed(2)
    hf = randomize(transformers.BertForSequenceClassification(bert_config(num_labels=3)))
    path = tmp_path_factory.mktemp("bert_cls")
    hf.save_pretrained(path)
    return hf, path


def test_import_masked_lm_parity_with_padding(hf_mlm_dir):
    hf, path = hf_mlm_dir
    model = import_bert(path)
    assert isinstance(model, Encoder) and not model.training
    ids, types, mask = inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        ours, _ = model(ids, attention_mask=mask, token_type_ids=types)
        hidden_ref = hf.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        hidden = model.encode(ids, attention_mask=mask, token_type_ids=types)
    keep = mask.bool()
    assert ours.shape == ref.shape == (3, 12, VOCAB)
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4, rtol=0)
    torch.testing.assert_close(hidden[keep], hidden_ref[keep], atol=1e-4, rtol=0)
    assert ref[keep].abs().max() > 1.0  # the randomisation makes mistakes visible


def test_import_bert_model_and_pretraining(tmp_path):
    torch.manual_seed(3)
    base = randomize(transformers.BertModel(bert_config()))
    base.save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match="no MLM head"):
        model = import_bert(tmp_path / "base")
    ids, types, mask = inputs()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        hidden = model.encode(ids, mask, types)
    torch.testing.assert_close(hidden[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)

    pre = randomize(transformers.BertForPreTraining(bert_config()))
    pre.save_pretrained(tmp_path / "pre")
    model = import_bert(tmp_path / "pre")
    with torch.no_grad():
        ref = pre(input_ids=ids, attention_mask=mask, token_type_ids=types).prediction_logits
        ours, _ = model(ids, mask, token_type_ids=types)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)


def test_import_sequence_classification_parity(hf_cls_dir):
    hf, path = hf_cls_dir
    model = import_bert(path)
    assert isinstance(model, EncoderClassifier) and model.config.n_labels == 3
    ids, types, mask = inputs()
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        ours, loss = model(ids, attention_mask=mask, labels=labels, token_type_ids=types)
    assert ours.shape == (3, 3)
    torch.testing.assert_close(ours, out.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=1e-4, rtol=0)


def test_export_masked_lm_roundtrip(tmp_path):
    model = small_encoder(activation="gelu_tanh")
    export_bert(model, tmp_path / "hf")
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    ids, types, mask = inputs(seed=4)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        ours, _ = model(ids, attention_mask=mask, token_type_ids=types)
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4, rtol=0)
    # and back again: import(export(m)) is the same model
    back = import_bert(tmp_path / "hf")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, atol=0, rtol=0)


def test_export_sequence_classification_roundtrip(tmp_path):
    torch.manual_seed(5)
    cfg = EncoderConfig(vocab_size=VOCAB, block_size=64, n_layer=2, d_model=64, n_head=4, d_ff=128, n_labels=4)
    model = randomize(EncoderClassifier(cfg))
    export_bert(model, tmp_path / "hf")
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_labels == 4
    ids, types, mask = inputs(seed=6)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        ours, _ = model(ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_unsupported_configs_are_refused():
    base = bert_config().to_dict()
    for key, value in (("position_embedding_type", "relative_key"), ("is_decoder", True),
                       ("add_cross_attention", True), ("hidden_act", "silu"), ("tie_word_embeddings", False),
                       ("problem_type", "multi_label_classification")):
        with pytest.raises(ValueError, match=f"^{key}"):
            bert_config_from_hf({**base, key: value})
    with pytest.raises(ValueError, match="^architectures"):
        bert_config_from_hf({**base, "architectures": ["BertForQuestionAnswering"]})
    with pytest.raises(ValueError, match="^n_head"):
        EncoderConfig(vocab_size=10, d_model=64, n_head=5).validate()
    with pytest.raises(ValueError, match="^pad_token_id"):
        EncoderConfig(vocab_size=10, pad_token_id=10).validate()


def test_padding_invariance():
    model = small_encoder()
    ids, types, _ = inputs(B=2, T=10, seed=7)
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 5)], dim=1).long()
    ptypes = torch.cat([types, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a, _ = model(ids, token_type_ids=types)
        b, _ = model(padded, attention_mask=mask, token_type_ids=ptypes)
        c, _ = model(padded, token_type_ids=ptypes)  # without the mask the pads are attended to
    torch.testing.assert_close(b[:, :10], a, atol=1e-5, rtol=0)
    assert (c[:, :10] - a).abs().max() > 1e-3
    # a fully padded row stays finite (additive mask, no NaN from softmax over nothing)
    with torch.no_grad():
        d, _ = model(padded, attention_mask=torch.zeros_like(mask))
    assert torch.isfinite(d).all()


def test_bidirectional_attention():
    model = small_encoder()
    ids, _, _ = inputs(B=1, T=12, seed=8)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] % (VOCAB - 1)) + 1
    with torch.no_grad():
        a = model.encode(ids)
        b = model.encode(changed)
    # every earlier position sees the last token (a decoder would leave them unchanged)
    assert ((a[0, :-1] - b[0, :-1]).abs().amax(dim=-1) > 1e-4).all()


def test_mlm_loss_ignores_unlabelled_positions():
    model = small_encoder()
    ids, _, _ = inputs(B=2, T=8, seed=9)
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5] = 7, 11
    logits, loss = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(logits[[0, 1], [2, 5]], torch.tensor([7, 11]))
    torch.testing.assert_close(loss, expected)


def test_num_params_and_flops():
    model = small_encoder()
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - (c.block_size + c.type_vocab_size) * c.d_model
    assert model.flops_per_token(32) == 6 * model.num_params() + 12 * c.n_layer * c.d_model * 32
    # the MLM decoder is the word embedding: no separate matrix
    assert not any("decoder" in n for n, _ in model.named_parameters())


def mask_tokens(ids, mask_id, n_real, gen, prob=0.15):
    """BERT masking: choose `prob` of the positions; of those 80% -> mask, 10% -> a random token id in
    [0, n_real) (the real, non-special tokens), 10% kept.

    Returns (inputs, labels) with labels -100 at the unchosen positions.
    """
    chosen = torch.rand(ids.shape, generator=gen) < prob
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=gen)
    inp = ids.clone()
    inp[chosen & (r < 0.8)] = mask_id
    rand_pos = chosen & (r >= 0.8) & (r < 0.9)
    inp[rand_pos] = torch.randint(0, n_real, ids.shape, generator=gen)[rand_pos]
    return inp, labels


def test_encoder_learns_masked_lm():
    from llmkit.tokenizer import train_char

    text = shared_file("en/tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]
    tok = train_char([text], extra_special_tokens=["<|mask|>"])
    mask_id = tok.token_to_id("<|mask|>")
    assert mask_id is not None
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    V = tok.vocab_size
    n_chars = min(tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, mask_id)  # train_char: chars first, then specials
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=V, block_size=64, n_layer=2, d_model=64, n_head=4, dropout=0.0,
                        pad_token_id=tok.pad_id)
    model = Encoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    B, T = 32, 64
    losses = []
    for _ in range(60):
        starts = torch.randint(0, len(data) - T, (B,), generator=gen)
        ids = torch.stack([data[s:s + T] for s in starts.tolist()])
        inp, labels = mask_tokens(ids, mask_id, n_chars, gen)
        _, loss = model(inp, labels=labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    # starts near ln(V) (uniform guess); 60 steps reach about the unigram entropy (~3.3 nats here)
    assert first > math.log(V) - 0.4, (first, math.log(V))
    assert last < math.log(V) - 0.7, (first, last, math.log(V))


def test_import_hf_dispatches_bert_and_writes_a_model_dir(tmp_path):
    from llmkit.models import load_model
    from llmkit.models.hf import import_hf

    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = import_hf(tmp_path / "hf", tmp_path / "ours")
    assert isinstance(model, Encoder)
    idx = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ours")(idx)[0], hf.eval()(idx).logits, rtol=0, atol=1e-4)


def test_masked_lm_learns_to_read_the_context():
    """Tokens mostly repeat their neighbour: a masked token is predictable only from the context around it.
    The loss must fall far below ln(vocab) (what a model that ignores context can reach), which fails if
    attention, positions or the 80/10/10 masking were broken."""
    from llmkit.train.objectives import mlm

    torch.manual_seed(0)
    V, T = 40, 32
    model = Encoder(EncoderConfig(vocab_size=V, block_size=T, n_layer=2, d_model=64, n_head=4, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(250):
        x = torch.randint(5, V, (32, T))
        for t in range(1, T):
            repeat = torch.rand(32) < 0.9
            x[repeat, t] = x[repeat, t - 1]
        _, loss = model(**mlm(x, None, mask_id=0, special_ids=[0, 1, 2, 3, 4], vocab_size=V))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * math.log(V - 5)
