import math

import numpy as np
import torch

from llmkit.data.tokenized import TokenSplit
from llmkit.models import Decoder, DecoderConfig
from llmkit.train.heldout_loss import split_loss


def test_split_loss_is_exact_over_every_window():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=11, block_size=8, n_layer=1, d_model=16, n_head=2, tie_embeddings=False))
    tokens = np.random.default_rng(0).integers(0, 11, size=8 * 7 + 1).astype(np.uint16)
    split = TokenSplit(shards=[tokens], tokens=len(tokens), bytes=len(tokens), sha256="")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform prediction: every token costs ln(11)
    assert math.isclose(split_loss(model, split, block_size=8, batch_size=3), math.log(11), rel_tol=1e-6)

    torch.manual_seed(1)
    model = Decoder(DecoderConfig(vocab_size=11, block_size=8, n_layer=1, d_model=16, n_head=2)).eval()
    t = torch.from_numpy(tokens.astype(np.int64))
    manual = []
    for w in range(7):  # 7 non-overlapping windows of 8 targets each
        logits, _ = model(t[w * 8:(w + 1) * 8][None])
        manual.append(torch.nn.functional.cross_entropy(logits[0], t[w * 8 + 1:(w + 1) * 8 + 1], reduction="sum"))
    expected = torch.stack(manual).sum().item() / 56
    assert math.isclose(split_loss(model, split, block_size=8, batch_size=3), expected, rel_tol=1e-5)
