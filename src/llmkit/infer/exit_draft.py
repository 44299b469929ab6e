"""A trained early exit's files, read and written: the adapter block `llmkit distill-exit` trains
(`llmkit.distill.exit_adapter`) and the draft `llmkit.infer.speculative` builds from it
(`--draft-model exit:DIR`).

    DIR/exit_adapter.safetensors   the block's weights, and `draft_vocab` (token ids) when the draft's head
                                   is cut to the most frequent tokens
    DIR/exit_adapter.json          K (the blocks before the adapter), the model's n_layer, the sha256 of the
                                   weights it was trained on, the draft vocabulary's size, held-out figures
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmkit.data.tokenized import file_sha256
from llmkit.models.decoder import Block, Decoder

ADAPTER_FILE = "exit_adapter.safetensors"
META_FILE = "exit_adapter.json"
DRAFT_VOCAB = "draft_vocab"  # the tensor of token ids the draft may propose, in the adapter file


def check_layers(model: Decoder, layers: int) -> None:
    n = model.config.n_layer
    if not 1 <= layers < n:
        raise ValueError(f"layers: an early exit needs 1 <= K < n_layer={n}, got {layers}")


def save_exit_adapter(adapter: Block, out_dir: str | Path, layers: int, n_layer: int, base_model_sha256: str,
                      metrics: dict[str, float] | None = None, draft_vocab: torch.Tensor | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    if draft_vocab is not None:
        tensors[DRAFT_VOCAB] = draft_vocab.to(torch.int64).cpu()
    save_file(tensors, str(out_dir / ADAPTER_FILE))
    meta = {"layers": layers, "n_layer": n_layer, "base_model_sha256": base_model_sha256,
            "draft_vocab": None if draft_vocab is None else int(draft_vocab.numel()), "metrics": metrics or {}}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def load_exit_adapter(model: Decoder, adapter_dir: str | Path, model_dir: str | Path | None = None
                      ) -> tuple[Block, int, torch.Tensor | None]:
    """(adapter block on the model's device and dtype, K, draft vocabulary ids or None) from a dir
    `save_exit_adapter` wrote.

    With `model_dir`, its weights must be the ones the adapter was trained on (their sha256 is checked): an
    adapter of another model would still run, only drafting badly, so a mismatch is refused by name."""
    adapter_dir = Path(adapter_dir)
    meta_path = adapter_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {META_FILE} (write one with `llmkit distill-exit`)")
    meta = json.loads(meta_path.read_text())
    if meta["n_layer"] != model.config.n_layer:
        raise ValueError(f"{adapter_dir}: trained for a model of {meta['n_layer']} layers, this one has "
                         f"{model.config.n_layer}")
    if model_dir is not None:
        weights = Path(model_dir) / "model.safetensors"
        if weights.is_file() and file_sha256(weights) != meta["base_model_sha256"]:
            raise ValueError(f"{adapter_dir} was trained on other weights than {model_dir} "
                             f"(sha256 {meta['base_model_sha256'][:12]} vs {file_sha256(weights)[:12]})")
    check_layers(model, meta["layers"])
    adapter = Block(model.config, layer=model.config.n_layer - 1)
    tensors = load_file(str(adapter_dir / ADAPTER_FILE))
    draft_vocab = tensors.pop(DRAFT_VOCAB, None)
    adapter.load_state_dict(tensors)
    p = next(model.parameters())
    return adapter.to(p.device, model.tok_emb.weight.dtype).eval(), meta["layers"], draft_vocab
