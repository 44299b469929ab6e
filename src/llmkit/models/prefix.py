"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

The base model stays frozen. Each attention layer gets P = `num_virtual_tokens` learned key and value
vectors that every query also attends to, as if P extra tokens preceded the input in every layer. Only
these P x layers x 2 x kv_dim numbers (about 0.1-0.5% of the model) are trained and saved.

Parameterisation. Li & Liang found that optimising the prefix table directly is unstable and
reparameterise it through an MLP: P_theta = MLP(P'_theta), with a small table P' (P x kv_dim) -> Linear
(kv_dim -> `projection_dim`) -> tanh -> Linear (-> sites x 2 x kv_dim), as PEFT's `PrefixEncoder` with
`prefix_projection=True` does. After training only the MLP's output table is needed; `save_prefix` writes
that table (as PEFT does) and `load_prefix` attaches it as a plain table (`projection=False`).

Where the prefix goes (the model's `prefix` attribute, read by its forward):

- `Decoder`: every layer's self-attention (causal: every token sees the whole prefix);
- `EncoderDecoder`: decoder self-attention, decoder cross-attention and encoder self-attention, as Li &
  Liang prefix BART's encoder and decoder (sites ordered: decoder self, cross, encoder);
- `Encoder` / `EncoderClassifier`: every layer's self-attention (the classifier's freshly initialised
  `classifier` layer stays trainable, as PEFT's `modules_to_save` does for sequence classification).

The prefix takes no positions: token t keeps position t (learned embeddings and rope tables are indexed
as without the prefix), T5's relative bias is 0 towards prefix keys, and padding masks never hide them.
In KV-cached generation the prefix fills the first P cache slots once.

PEFT layout. `save_prefix` writes `adapter_config.json` (peft_type PREFIX_TUNING, PEFT's field names) and
`adapter_model.safetensors` holding `prompt_embeddings`: (P, sites * 2 * kv_dim), viewed as
(P, sites * 2, H_kv, head_dim) with site l's key at row 2l and value at 2l + 1 - PEFT's `get_prompt`
layout. For a decoder exported with `export_hf`, `peft.PeftModel.from_pretrained` loads it. HF + PEFT
differ in one respect: they put the real tokens at positions P..P+T-1 (after the virtual tokens). With
rotary positions that shift only rotates the queries by P relative to the un-rotated prefix keys, so the
stored keys are kept in PEFT's frame and rotated by -P when used (`PrefixEncoder.forward`): the logits then
equal HF + PEFT's exactly (tests/test_prefix.py). With learned positions (GPT-2) the shift changes the
token embeddings themselves, so PEFT's logits differ from ours although the file loads. PEFT gives an
encoder-decoder no encoder or cross-attention prefix, so encoder-decoder adapters have a wider table that
PEFT refuses to load (shape check) rather than misreading it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from llmkit.models.decoder import Decoder
from llmkit.models.encdec import EncoderDecoder
from llmkit.models.encoder import Encoder, EncoderClassifier
from llmkit.models.layers import apply_rope

__all__ = ["PrefixConfig", "PrefixEncoder", "apply_prefix", "load_prefix", "prefix_parameters", "remove_prefix",
           "save_prefix", "trainable_share"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHTS_KEY = "prompt_embeddings"  # PEFT's key for every prompt-learning method


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 20
    """P: learned key/value vectors per attention layer (Li & Liang: 10 for table-to-text, 200 for summaries)."""
    projection: bool = True
    """Li & Liang's MLP reparameterisation (more stable training); False trains the table directly."""
    projection_dim: int = 512
    """Hidden width of the reparameterisation MLP (PEFT's `encoder_hidden_size`)."""
    dropout: float = 0.0
    """Dropout on the prefix keys/values while training (0 = none)."""
    lr_ratio: float = 10.0
    """The prefix trains at lr_ratio x train.lr: a small, freshly initialised parameter set that starts far
    from its optimum takes larger steps than the pretrained weights of full fine-tuning would."""

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens: must be >= 1, got {self.num_virtual_tokens}")
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim: must be >= 1, got {self.projection_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.lr_ratio <= 0:
            raise ValueError(f"lr_ratio: must be > 0, got {self.lr_ratio}")


class PrefixEncoder(nn.Module):
    """The learned prefix of `n_sites` attention layers, each with n_kv_head heads of head_dim.

    Parameters (PEFT's `PrefixEncoder` names): `embedding.weight` (P, kv_dim) and `transform.{0,2}` with
    projection, else `embedding.weight` (P, n_sites * 2 * kv_dim) - the table itself.
    `rope_base`: the model uses rotary positions; keys are stored in HF + PEFT's frame (module docstring)
    and rotated by -P on use.

    `table()` -> (P, n_sites * 2 * kv_dim), the layout PEFT saves; `forward()` -> (n_sites, 2, n_kv_head,
    P, head_dim): [site, 0] the keys and [site, 1] the values of one attention layer.
    """

    def __init__(self, num_virtual_tokens: int, n_sites: int, n_kv_head: int, head_dim: int,
                 projection: bool = True, projection_dim: int = 512, dropout: float = 0.0,
                 rope_base: float | None = None):
        super().__init__()
        self.num_virtual_tokens, self.n_sites = num_virtual_tokens, n_sites
        self.n_kv_head, self.head_dim = n_kv_head, head_dim
        kv_dim = n_kv_head * head_dim
        width = n_sites * 2 * kv_dim
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, projection_dim), nn.Tanh(),
                                           nn.Linear(projection_dim, width))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)
            self.transform = None
        self.drop = nn.Dropout(dropout)
        self.rope_base = rope_base
        if rope_base is not None:
            # rotation by the angle of position -P: cos(-a) = cos(a), sin(-a) = -sin(a)
            inv_freq = 1.0 / (rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            angle = num_virtual_tokens * inv_freq
            self.register_buffer("rot_cos", angle.cos()[None], persistent=False)
            self.register_buffer("rot_sin", -angle.sin()[None], persistent=False)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's / PEFT's default initialisation: N(0, 1) table, Kaiming-uniform linears (a = sqrt 5)
        with U(+-1/sqrt(fan_in)) biases; from `generator` when given (the global RNG stays untouched)."""
        nn.init.normal_(self.embedding.weight, generator=generator)
        if self.transform is not None:
            for lin in (self.transform[0], self.transform[2]):
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(lin.in_features)
                nn.init.uniform_(lin.bias, -bound, bound, generator=generator)

    def table(self) -> torch.Tensor:
        """(P, n_sites * 2 * kv_dim): the prefix keys/values, through the MLP when projecting."""
        if self.transform is None:
            return self.embedding.weight
        return self.transform(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        P = self.num_virtual_tokens
        kv = self.drop(self.table())
        # PEFT's get_prompt: view (P, sites * 2, H, hd), permute to (sites * 2, H, P, hd)
        kv = kv.view(P, self.n_sites, 2, self.n_kv_head, self.head_dim).permute(1, 2, 3, 0, 4)
        if self.rope_base is not None:
            k = apply_rope(kv[:, 0], self.rot_cos, self.rot_sin)
            kv = torch.stack((k, kv[:, 1]), dim=1)
        return kv

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, n_sites={self.n_sites}, "
                f"n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, rope={self.rope_base is not None}")


# -- models ---------------------------------------------------------------------------------------------

def _host(model: nn.Module) -> nn.Module:
    """The module whose forward reads `.prefix`: the model itself, or an EncoderClassifier's encoder."""
    return model.encoder if isinstance(model, EncoderClassifier) else model


def _layout(model: nn.Module) -> dict:
    """Prefix geometry of a model: sites, kv heads, head size, rope, and the PEFT config fields."""
    c = model.config
    if isinstance(model, Decoder):
        return dict(n_sites=c.n_layer, n_kv_head=c.kv_heads, head_dim=c.head_dim,
                    rope_base=c.rope_base if c.positions == "rope" else None, task_type="CAUSAL_LM",
                    num_layers=c.n_layer, submodules=1, sites=f"self_attn x {c.n_layer}")
    if isinstance(model, EncoderDecoder):
        return dict(n_sites=2 * c.n_decoder_layer + c.n_layer, n_kv_head=c.n_head, head_dim=c.d_kv, rope_base=None,
                    task_type="SEQ_2_SEQ_LM", num_layers=c.n_decoder_layer, submodules=2,
                    sites=f"decoder.self_attn x {c.n_decoder_layer}, decoder.cross_attn x {c.n_decoder_layer}, "
                          f"encoder.attn x {c.n_layer}")
    if isinstance(model, (Encoder, EncoderClassifier)):
        return dict(n_sites=c.n_layer, n_kv_head=c.n_head, head_dim=c.head_dim, rope_base=None,
                    task_type="SEQ_CLS" if isinstance(model, EncoderClassifier) else "FEATURE_EXTRACTION",
                    num_layers=c.n_layer, submodules=1, sites=f"attn x {c.n_layer}")
    raise TypeError(f"prefix tuning: unsupported model class {type(model).__name__}")


def _head_modules(model: nn.Module) -> list[str]:
    """Task heads that train with the prefix (PEFT's modules_to_save): a classifier's fresh `classifier`."""
    return ["classifier"] if isinstance(model, EncoderClassifier) else []


def apply_prefix(model: nn.Module, cfg: PrefixConfig, seed: int | None = None) -> nn.Module:
    """Freeze `model` and attach a fresh prefix (trainable) that its forward then uses; returns `model`.

    `seed` initialises the prefix from its own generator (else from the global RNG). The prefix is put on
    the model's device and dtype. An `EncoderClassifier`'s `classifier` layer stays trainable.
    """
    cfg.validate()
    host = _host(model)
    if getattr(host, "prefix", None) is not None:
        raise ValueError("model already has a prefix attached (remove_prefix first)")
    lay = _layout(model)
    ref = next(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for name in _head_modules(model):
        for p in getattr(model, name).parameters():
            p.requires_grad_(True)
    # with a seed, the layers' default init (overwritten below) must not advance the global RNG either
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        enc = PrefixEncoder(cfg.num_virtual_tokens, lay["n_sites"], lay["n_kv_head"], lay["head_dim"],
                            projection=cfg.projection, projection_dim=cfg.projection_dim, dropout=cfg.dropout,
                            rope_base=lay["rope_base"])
    enc.reset_parameters(None if seed is None else torch.Generator().manual_seed(seed))
    host.prefix = enc.to(device=ref.device, dtype=ref.dtype)
    host.prefix.train(model.training)
    return model


def remove_prefix(model: nn.Module) -> nn.Module | None:
    """Detach and return the prefix (None if there was none); the model runs as before apply_prefix.
    Parameters frozen by apply_prefix stay frozen."""
    host = _host(model)
    enc = getattr(host, "prefix", None)
    host.prefix = None
    return enc


def prefix_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The prefix's parameters (the ones to train at lr_ratio x lr); [] without a prefix. Task heads kept
    trainable by apply_prefix (EncoderClassifier.classifier) are not included."""
    enc = getattr(_host(model), "prefix", None)
    return [] if enc is None else list(enc.parameters())


def trainable_share(model: nn.Module) -> tuple[int, int, float]:
    """(trainable parameters, all parameters, trainable / all): PEFT's `print_trainable_parameters`
    figures (shared tensors counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total, trainable / total


# -- PEFT layout ----------------------------------------------------------------------------------------

def save_prefix(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write the attached prefix as a PEFT PREFIX_TUNING adapter: `adapter_config.json` and
    `adapter_model.safetensors` with `prompt_embeddings` (P, sites * 2 * kv_dim), the MLP's output when
    projecting (what PEFT saves; the MLP itself is not kept). `base_model` goes to
    base_model_name_or_path. An EncoderClassifier's classifier is stored beside it as
    `classifier.weight` / `classifier.bias`. Returns the directory."""
    enc = getattr(_host(model), "prefix", None)
    if enc is None:
        raise ValueError("model has no prefix attached (apply_prefix / load_prefix first)")
    lay = _layout(model)
    kv_dim = lay["n_kv_head"] * lay["head_dim"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was_training = enc.training
    enc.eval()
    with torch.no_grad():
        tensors = {WEIGHTS_KEY: enc.table().detach().contiguous().cpu()}
    enc.train(was_training)
    heads = _head_modules(model)
    for name in heads:
        for key, t in getattr(model, name).state_dict().items():
            tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
    # llmkit's own notes ride in the safetensors metadata, which PEFT ignores
    meta = {"format": "pt", "llmkit_model": type(model).__name__, "llmkit_sites": lay["sites"],
            "llmkit_key_frame": "rope-shifted-by-P (HF+PEFT)" if lay["rope_base"] is not None else "plain"}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata=meta)
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "encoder_hidden_size": enc.transform[0].out_features if enc.projection else kv_dim,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": heads or None,
        "num_attention_heads": lay["n_kv_head"],
        "num_layers": lay["num_layers"],
        "num_transformer_submodules": lay["submodules"],
        "num_virtual_tokens": enc.num_virtual_tokens,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": enc.projection,
        "revision": None,
        "task_type": lay["task_type"],
        "token_dim": kv_dim,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: not an adapter directory (no {ADAPTER_CONFIG})")
    return json.loads(path.read_text())


def load_prefix(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Freeze `model` and attach the prefix saved in `adapter_dir` (by `save_prefix` or by PEFT for the
    exported model) as a plain table (`projection=False`, still trainable); returns `model`.

    Raises ValueError when the adapter is not PREFIX_TUNING or its table does not fit the model."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{adapter_dir}: peft_type {cfg.get('peft_type')!r} is not PREFIX_TUNING")
    lay = _layout(model)
    P = int(cfg["num_virtual_tokens"])
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if WEIGHTS_KEY not in tensors:
        raise ValueError(f"{adapter_dir}: {ADAPTER_WEIGHTS} has no {WEIGHTS_KEY!r}")
    table = tensors.pop(WEIGHTS_KEY)
    want = (P, lay["n_sites"] * 2 * lay["n_kv_head"] * lay["head_dim"])
    if tuple(table.shape) != want:
        raise ValueError(f"{adapter_dir}: prompt_embeddings has shape {tuple(table.shape)}, this "
                         f"{type(model).__name__} needs {want} ({P} tokens x [{lay['sites']}] x 2 x "
                         f"{lay['n_kv_head']} heads x {lay['head_dim']})")
    apply_prefix(model, PrefixConfig(num_virtual_tokens=P, projection=False))
    enc = _host(model).prefix
    with torch.no_grad():
        enc.embedding.weight.copy_(table)
        for name in _head_modules(model):
            head = getattr(model, name)
            sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            if sd:
                head.load_state_dict(sd, strict=True)
    return model
