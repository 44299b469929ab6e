"""Which parallel layout fits: a per-rank memory model for training a decoder, and a planner over layouts.

`plan_layouts(config, gpus, gpu_mem_bytes, ...)` enumerates every `(dp, fsdp, tp, pp)` with
`dp * fsdp * tp * pp == gpus` that the model allows, predicts each one's peak memory per rank, marks it as
fitting or not, and ranks the fitting ones (`rank_key`). `rank_memory(config, layout, ...)` is the model
for one layout. Everything is in bytes; every number comes from the configuration (the parameter shapes of
the model built on PyTorch's `meta` device, via `llmkit.models.info.parameter_shapes`) and the formulas
below. `benchmarks/plan_memory.py` checks them against real training runs (docs/distributed.md, "Planning a
layout").

The layout (the meaning of the `parallel:` section of a training config):

* dp: replicas of the model state; gradients are all-reduced (DDP, or HSDP's replicate dimension).
* fsdp: sharding degree (FSDP2 / ZeRO-3): weights, gradients and AdamW state split fsdp ways along dim 0
  of every tensor (rank 0 holds `ceil(rows / fsdp)` rows, the largest shard); a block's weights are
  all-gathered for its forward and backward, its gradients reduce-scattered.
* tp: tensor parallel (Megatron): q/k/v, gate and up split by output rows (heads, hidden units), proj and
  down by input columns; token embedding and LM head split by vocabulary rows (`ceil(vocab / tp)`), learned
  position embeddings by positions (as `llmkit.train.mesh` does); norms, router, q/k norms and row-parallel
  biases replicated. Needs tp | n_head, tp |
  n_kv_head and tp | d_ff (and the experts' d_ff).
* pp: pipeline stages; layers split contiguously, the first `n_layer % pp` stages one layer more. The
  first stage holds the embeddings, the last the final norm and the LM head. With tied embeddings the last
  stage holds its own copy of the tied matrix (`llmkit.train.pipeline`, as Megatron does), which
  `rank_memory` counts.

Model state per rank, for `N` = the rank's parameter elements (its stage, tp-split, then fsdp-sharded):

    weights    = 4 N   fp32 parameters
    gradients  = 4 N   fp32 (FSDP keeps the reduce-scattered shard)
    optimizer  = 8 N + 4 P   AdamW exp_avg and exp_avg_sq, fp32, and a 0-dim fp32 `step` per tensor
                             (P: the rank's parameter tensors)

Mixed precision (bf16 / fp16), the assumption: **the fp32 parameters are the master weights**, with no
separate master copy, 4 + 4 + 8 = 16 B per parameter (ZeRO's 2 + 2 + 4 + 4 + 4 for 16-bit weights and
gradients plus fp32 master, m and v, also 16). That is how llmkit trains: without FSDP, `torch.autocast`
over fp32 parameters (llmkit's loop); under FSDP (`llmkit.train.mesh`), FSDP2's MixedPrecisionPolicy keeps
the sharded parameters fp32 and all-gathers 16-bit copies. The 16-bit working weights come on top:

    compute_weights = 2 * (matrices of the stage, tp-split, unsharded)    without FSDP: autocast's casts,
                                                                          kept for backward; with activation
                                                                          checkpointing one block's (and the
                                                                          head's)
    (under FSDP the working weights are its all-gathered 16-bit blocks, counted under communication)

Activations per micro-batch, per layer, for T = micro_batch * seq_len tokens, d = d_model,
hq = n_head * head_dim, hkv = n_kv_head * head_dim, f = d_ff, a = n_head, e = 2 (mixed) or 4 (fp32) bytes:
what autograd saves for backward, counted tensor by tensor on llmkit's `Block` with fused SDPA (no T x T
score matrix, only its log-sum-exp), per token:

    per norm           LayerNorm: 4 d + 8             its input in fp32 (the residual stream is fp32 under
                                                     autocast over fp32 weights; with 16-bit weights CUDA's
                                                     autocast runs layer_norm in fp32, while the CPU's keeps
                                                     16 bits, 2 d + 4), mean and rstd
                       RMSNorm: 4 d + 4 + 4 d         the fp32 input, rstd, x * rstd  (16-bit weights:
                                                     4 d + 4 + 2 d, x.float(), rstd, its 16-bit copy)
    norm outputs       2 e d                         the inputs of q/k/v and of the MLP (3 e d for a gated MLP
                                                     under autocast: the norm output is cast separately for
                                                     gate and for up)
    attention          e hq + 4 a                    SDPA's output and log-sum-exp
                     + 2 e hq                        with RoPE (or q/k norms): the rotated q and the
                                                     contiguous copy of the output that proj reads
                     + 2 e hq                        GQA (n_kv_head < n_head): k and v repeated to n_head
                       | e hkv                       else, with RoPE: the rotated k
                     + e (hq + 2 hkv)                the q/k/v projection, unless GQA with RoPE (SDPA then
                                                     keeps no view of it)
                     + q/k norms, when qk_norm: (4 + e) (hq + hkv) + 4 (a + kv_heads) (+ (4 + e) (hq + hkv)
                       more in 16-bit: the fp32 and 16-bit copies the norm makes)  [estimate, not measured]
    MLP                2 e f (gelu, relu: activation input, down's input) | 4 e f (gated: gate, up,
                       activation output, product)
    MoE MLP            instead: e E + 4 E (router logits and fp32 probabilities) + k (e d + 4 e f_e + e d)
                       per routed copy (k = top_k) + 4 e f_s for shared experts  [estimate, not measured]
    dropout > 0        + 2 d bytes (the residual dropouts' masks)
    RoPE in 16-bit     + 4 e seq_len rope_dim / 2 per layer and micro-batch (cos and sin cast for q and k)

Tensor parallelism, as `llmkit.train.mesh` does it (DTensor, sequence parallel between sub-layers): the
attention and MLP terms are divided by tp, the norm terms too (sequence parallelism, Korthikanti et al.
2022 §4.2; `sequence_parallel=False`: not), but the norm outputs are not: each projection saves its
all-gathered, whole-sequence input. The head's output is all-gathered too, so the loss works on all V
logits (`vocab_parallel_loss=True`: V / tp, Megatron's vocabulary-parallel cross-entropy).

The last stage adds the final norm, the head's input (`e d`) and the loss: `4 V` per token for the fp32
log-probabilities (cross-entropy's log-softmax output), 8 for the int64 targets (and a 4-byte total weight),
and, at the loss's backward, two more fp32 vocabulary-sized tensors (their gradient and the logits'),
`logits_peak = 8 T V`. The first stage adds 8 bytes per token (the int64 ids) and, once per micro-batch,
the int64 positions (learned positions, `8 seq_len`) or views of the fp32 cos and sin tables (RoPE in fp32,
`4 seq_len rope_dim`).

With activation checkpointing (every block recomputed in backward) a layer keeps only its input (`4 d`, or
`2 d` with 16-bit weights; divided by tp under sequence parallelism), and one layer's full activations
exist during its recompute.

Pipeline: under 1F1B stage i holds the activations of min(pp - i, microbatches) micro-batches (GPipe: all
`microbatches`); without pipelining one micro-batch is in flight (gradient accumulation is sequential).

Communication buffers, where material (B: the largest block's elements, R: the stage's embeddings, final
norm and head, both tp-split and unsharded):

* dp x fsdp > 1 (FSDP2 over the data-parallel ranks, as `llmkit.train.mesh` shards, dp > 1 being HSDP):
  the all-gathered blocks (current and prefetched next) and the root in the all-gather dtype w (2 bytes
  under mixed precision, else 4), plus one block's unsharded fp32 gradients for the reduce-scatter:
  `w (2 B + R) + 4 B`.
* `ddp=True` and dp > 1 with fsdp 1 (torch DDP, `train.strategy: ddp`): gradient buckets as large as the
  gradients, `4 N` (DDP's default `gradient_as_bucket_view=False`).
* tp > 1 and pp > 1: one micro-batch's boundary activation and its gradient, `2 e T d` each.
* pp > 1: `torch.distributed.pipelining` keeps each micro-batch's stage output until the step ends (it
  merges them): `microbatches e T d`, on the last stage `microbatches e T V` (the logits).

Not modelled: the CUDA context and allocator fragmentation (`usable_fraction` leaves room for them), the
transient gradients of activations during backward (a few `T d` at a time), optimizer step temporaries
(`foreach` AdamW: about one parameter-sized fp32 buffer per group chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmkit.models.info import GIB, parameter_shapes

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("1f1b", "gpipe")


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    fsdp: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.fsdp * self.tp * self.pp

    def as_dict(self) -> dict[str, int]:
        return {"dp": self.dp, "fsdp": self.fsdp, "tp": self.tp, "pp": self.pp}


# -- parameters: which stage holds a tensor, how tensor parallelism splits it ------------------------------
def _tp_dim(name: str, ndim: int) -> int | None:
    """The dimension tensor parallelism splits `name` along, or None (replicated)."""
    parts = name.split(".")
    leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    if parts[0] in ("tok_emb", "lm_head"):
        return 0  # vocabulary-parallel
    if parts[0] == "pos_emb":
        return 0  # position rows split like the sequence (llmkit.train.mesh, sequence parallel)
    if "mlp" in parts and leaf in ("gate", "up") and ndim == 3:
        return 1  # MoE experts (E, ff, d)
    if "mlp" in parts and leaf == "down" and ndim == 3:
        return 2  # (E, d, ff)
    if parent in ("qkv", "q", "k", "v", "up", "gate") and leaf in ("weight", "bias"):
        return 0  # column-parallel: output rows (heads, hidden units), biases with them
    if parent in ("proj", "down") and leaf == "weight":
        return 1  # row-parallel: input columns; the bias is added after the all-reduce, replicated
    return None


def _is_matrix(name: str, ndim: int) -> bool:
    """Used by a matmul, so autocast makes a 16-bit copy of it (norm weights and embeddings are not)."""
    parts = name.split(".")
    return parts[0] not in ("tok_emb", "pos_emb") and not any("norm" in p for p in parts) and (
        ndim >= 2 or parts[-2] in ("qkv", "q", "k", "v", "proj", "up", "gate", "down"))


def _stage_sizes(n_layer: int, pp: int) -> list[int]:
    base, extra = divmod(n_layer, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def _local_numel(shape: tuple[int, ...], tp_dim: int | None, tp: int, fsdp: int) -> tuple[int, int]:
    """(elements after the tp split, elements of the largest fsdp shard of that): FSDP2 shards dim 0,
    rank 0 holding ceil(rows / fsdp) rows."""
    shape = list(shape) or [1]
    if tp_dim is not None and tp > 1:
        shape[tp_dim] = math.ceil(shape[tp_dim] / tp)
    unsharded = math.prod(shape)
    rows = math.ceil(shape[0] / fsdp)
    return unsharded, rows * math.prod(shape[1:])


def stage_parameters(config, layout: Layout, shapes: dict[str, tuple[int, ...]] | None = None) -> list[dict]:
    """Per pipeline stage: parameter elements held by one rank of that stage.

    Keys: `layers` (block indices), `tensors` (parameter tensors), `params` (after tp and fsdp: N in the
    formulas), `params_unsharded`
    (after tp only), `matrices_unsharded` (tp-split elements autocast copies), `largest_block_unsharded`,
    `largest_block_matrices`, `block_matrices_unsharded`, `root_unsharded` (the stage's embeddings / final norm / head, tp-split).
    """
    sizes = _stage_sizes(config.n_layer, layout.pp)
    starts = [sum(sizes[:i]) for i in range(layout.pp)]
    stage_of_layer = {layer: s for s in range(layout.pp) for layer in range(starts[s], starts[s] + sizes[s])}
    stages = [{"stage": s, "layers": list(range(starts[s], starts[s] + sizes[s])), "params": 0,
               "params_unsharded": 0, "matrices_unsharded": 0, "root_unsharded": 0, "tensors": 0, "blocks": {}}
              for s in range(layout.pp)]
    shapes = shapes if shapes is not None else parameter_shapes(config)
    entries = list(shapes.items())
    if getattr(config, "tie_embeddings", False) and "lm_head.weight" not in shapes:
        # one tensor in a single stage; with pp > 1 the last stage keeps its own copy for the head
        entries.append(("lm_head.weight", shapes["tok_emb.weight"]))
    for name, shape in entries:
        parts = name.split(".")
        if parts[0] == "blocks":
            stage = stage_of_layer[int(parts[1])]
        elif parts[0] in ("norm_f", "lm_head"):
            stage = layout.pp - 1
        else:
            stage = 0
        if name == "lm_head.weight" and name not in shapes and layout.pp == 1:
            unsharded, local = 0, 0  # tied: the embedding tensor is the head
            used_as_matrix = _local_numel(shape, 0, layout.tp, layout.fsdp)[0]
        else:
            unsharded, local = _local_numel(shape, _tp_dim(name, len(shape)), layout.tp, layout.fsdp)
            used_as_matrix = unsharded if (_is_matrix(name, len(shape)) or name == "lm_head.weight") else 0
        st = stages[stage]
        st["tensors"] += 1 if (local or unsharded) else 0
        st["params"] += local
        st["params_unsharded"] += unsharded
        st["matrices_unsharded"] += used_as_matrix
        if parts[0] == "blocks":
            blk = st["blocks"].setdefault(int(parts[1]), [0, 0])
            blk[0] += unsharded
            blk[1] += used_as_matrix
        else:
            st["root_unsharded"] += unsharded
    for st in stages:
        blocks = st.pop("blocks")
        st["largest_block_unsharded"] = max((b[0] for b in blocks.values()), default=0)
        st["largest_block_matrices"] = max((b[1] for b in blocks.values()), default=0)
        st["block_matrices_unsharded"] = sum(b[1] for b in blocks.values())
    return stages


# -- activations ---------------------------------------------------------------------------------------
def _norm_bytes(config, params_16bit: bool) -> int:
    """Bytes per token a norm saves, its output excluded (module docstring)."""
    d = config.d_model
    if config.norm != "rmsnorm":
        return 4 * d + 8  # its input in fp32 (the fp32 residual, or autocast's fp32 cast of a 16-bit one), mean, rstd
    if params_16bit:
        return 4 * d + 4 + 2 * d  # x.float(), rstd, and the 16-bit normalised x the weight multiplies
    return 4 * d + 4 + 4 * d  # the fp32 residual, rstd, and the normalised x the weight multiplies


def layer_activation_bytes(config, tokens: int, act_bytes: int, tp: int = 1, sequence_parallel: bool = True,
                           params_16bit: bool = False, seq_len: int | None = None) -> dict[str, int]:
    """Bytes one layer saves for backward for `tokens` tokens (formulas in the module docstring).

    params_16bit: the weights themselves are 16-bit (FSDP2's MixedPrecisionPolicy), so the residual stream is
    16-bit and autocast casts nothing; False: autocast over fp32 weights (or fp32 training).

    Returns {"sequence": norm terms (divided by tp under sequence parallelism), "gathered": the inputs of the
    q/k/v and MLP projections (the whole sequence on every tp rank: DTensor saves the all-gathered input),
    "split": attention and MLP terms (divided by tp), "total"}."""
    c, e = config, act_bytes
    d, a, hd, kv = c.d_model, c.n_head, c.head_dim, c.kv_heads
    hq, hkv = a * hd, kv * hd
    norms = 2 * _norm_bytes(c, params_16bit)
    gathered = 2 * e * d
    if c.post_norms:
        norms += 2 * _norm_bytes(c, params_16bit)
    if c.dropout > 0:
        norms += 2 * d  # bool masks of the two residual dropouts
    q_new = c.positions == "rope" or c.qk_norm  # q is a new tensor, not a view of the projection
    gqa = kv != a
    attn = e * hq + 4 * a  # SDPA's output and log-sum-exp
    if q_new:
        attn += 2 * e * hq  # the rotated q, and the contiguous copy of the output that proj reads
    if gqa:
        attn += 2 * e * hq  # k and v repeated to n_head heads for SDPA
    elif c.positions == "rope":
        attn += e * hkv  # the rotated k
    if not (gqa and q_new):
        attn += e * (hq + 2 * hkv)  # SDPA keeps a view of the projection (v, or q and k too), so all of it
    if c.qk_norm:
        attn += (4 + e) * (hq + hkv) + 4 * (a + kv) + ((4 + e) * (hq + hkv) if e != 4 else 0)
    if c.moe is None:
        gated = c.activation in ("swiglu", "geglu", "geglu_tanh")
        mlp = (4 if gated else 2) * e * c.d_ff
        if gated and e != 4 and not params_16bit:
            gathered += e * d  # autocast casts the fp32 norm output once for gate and once for up
    else:
        m = c.moe
        f_e = m.expert_d_ff or c.d_ff
        mlp = e * m.experts + 4 * m.experts + m.top_k * (2 * e * d + 4 * e * f_e)
        if m.shared_experts:
            mlp += 4 * e * (m.shared_d_ff or m.shared_experts * f_e)
    sequence = math.ceil(tokens * norms / (tp if sequence_parallel else 1))
    split = math.ceil(tokens * (attn + mlp) / tp)
    if c.positions == "rope" and e != 4 and seq_len:
        split += 4 * seq_len * (c.rope_dim // 2) * e  # cos and sin cast to 16 bits, for q and for k
    gathered *= tokens
    return {"sequence": sequence, "gathered": gathered, "split": split, "total": sequence + gathered + split}


def head_activation_bytes(config, tokens: int, act_bytes: int, tp: int = 1, sequence_parallel: bool = True,
                          params_16bit: bool = False, vocab_parallel_loss: bool = False) -> dict[str, int]:
    """The last stage's extra saved activations (final norm, head input, fp32 log-probabilities, int64
    targets) and the transient peak of the loss's backward (`logits_peak`: two more fp32 vocab-sized tensors).
    Under tp the logits are all-gathered (`llmkit.train.mesh`: the head's output is replicated) unless
    `vocab_parallel_loss` (Megatron's vocabulary-parallel cross-entropy: V / tp per rank)."""
    c = config
    vocab = math.ceil(c.vocab_size / tp) if vocab_parallel_loss else c.vocab_size
    norm = math.ceil(tokens * _norm_bytes(c, params_16bit) / (tp if sequence_parallel else 1))
    saved = norm + tokens * act_bytes * c.d_model + tokens * (4 * vocab + 8) + 4
    return {"saved": saved, "logits_peak": 2 * tokens * 4 * vocab}


# -- one layout ----------------------------------------------------------------------------------------
def rank_memory(config, layout: Layout, seq_len: int | None = None, micro_batch: int = 1,
                precision: str = "bf16", activation_checkpointing: bool = False, microbatches: int | None = None,
                schedule: str = "1f1b", sequence_parallel: bool = True, ddp: bool = False,
                vocab_parallel_loss: bool = False, shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Predicted peak memory of one rank (the worst pipeline stage) for `layout`, in bytes.

    Data parallelism (dp x fsdp > 1) is FSDP2 over a (dp, fsdp) mesh, as `llmkit.train.mesh` does it, with
    16-bit all-gathers under mixed precision; `ddp=True` models torch DDP instead for dp > 1, fsdp 1
    (`train.strategy: ddp`: gradient buckets, autocast's weight copies). `vocab_parallel_loss`: the loss
    works on V / tp logits per rank (Megatron) instead of all-gathered ones. `shapes`:
    `parameter_shapes(config)`, when the caller has it already.

    Returns {"stage": the stage with the highest peak, "layers": its layer count, "in_flight": micro-batches
    whose activations it holds, "memory_bytes": {weights, gradients, optimizer, compute_weights,
    activations, logits_peak, communication, model_state, total}, "stages": the same for every stage}.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if config.vocab_size is None:
        raise ValueError("model.vocab_size is needed to size the embeddings (set it, or give a tokenizer)")
    seq_len = seq_len or config.block_size
    mixed = precision != "fp32"
    e = 2 if mixed else 4
    tokens = micro_batch * seq_len
    m = microbatches or layout.pp
    tp, sp = layout.tp, sequence_parallel and layout.tp > 1
    uses_fsdp = layout.dp * layout.fsdp > 1 and not (ddp and layout.fsdp == 1)
    params_16bit = mixed and uses_fsdp  # FSDP2's MixedPrecisionPolicy: the weights are 16-bit
    per_layer = layer_activation_bytes(config, tokens, e, tp, sp, params_16bit, seq_len)["total"]
    residual = 2 if params_16bit else 4  # bytes of the residual stream
    ckpt_layer = math.ceil(tokens * residual * config.d_model / (tp if sp else 1))  # a block's input
    head = head_activation_bytes(config, tokens, e, tp, sp, params_16bit, vocab_parallel_loss)
    results = []
    for st in stage_parameters(config, layout, shapes):
        n, layers, last = st["params"], len(st["layers"]), st["stage"] == layout.pp - 1
        in_flight = 1 if layout.pp == 1 else (m if schedule == "gpipe" else min(layout.pp - st["stage"], m))
        if activation_checkpointing:
            acts = in_flight * layers * ckpt_layer + (per_layer if layers else 0)
        else:
            acts = in_flight * layers * per_layer
        if st["stage"] == 0:
            acts += in_flight * tokens * 8  # int64 token ids
            if config.positions == "learned":
                acts += 8 * seq_len  # the int64 positions the position embedding looks up
            elif not mixed:
                acts += 2 * 4 * seq_len * (config.rope_dim // 2)  # one view of the fp32 cos and sin tables
        if last:
            acts += (1 if schedule == "1f1b" else in_flight) * head["saved"]
        mem = {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n + 4 * st["tensors"], "compute_weights": 0}
        if mixed and not uses_fsdp:
            if activation_checkpointing:  # one block's casts at a time, and the head's (cast at the loss)
                mem["compute_weights"] = 2 * (st["largest_block_matrices"] + st["matrices_unsharded"]
                                              - st["block_matrices_unsharded"])
            else:
                mem["compute_weights"] = 2 * st["matrices_unsharded"]
        mem["activations"] = acts
        mem["logits_peak"] = head["logits_peak"] if last else 0
        comm = 0
        if uses_fsdp:
            w = 2 if mixed else 4
            comm += w * (2 * st["largest_block_unsharded"] + st["root_unsharded"]) + 4 * st["largest_block_unsharded"]
        elif layout.dp > 1:
            comm += 4 * n  # DDP gradient buckets
        boundary = e * tokens * config.d_model
        if layout.tp > 1:
            comm += 2 * boundary
        if layout.pp > 1:
            comm += 2 * boundary
            # torch.distributed.pipelining keeps every micro-batch's stage output until the step ends (to merge
            # them): the hidden states, or on the last stage the logits
            comm += m * tokens * e * ((config.vocab_size if not vocab_parallel_loss else math.ceil(
                config.vocab_size / tp)) if last else math.ceil(config.d_model / (tp if sp else 1)))
        mem["communication"] = comm
        mem["model_state"] = mem["weights"] + mem["gradients"] + mem["optimizer"]
        mem["total"] = mem["model_state"] + sum(mem[k] for k in ("compute_weights", "activations", "logits_peak",
                                                                 "communication"))
        results.append({"stage": st["stage"], "layers": layers, "in_flight": in_flight, "memory_bytes": mem})
    worst = max(results, key=lambda r: r["memory_bytes"]["total"])
    return {**worst, "stages": results}


# -- communication per step (informative) ----------------------------------------------------------------
def step_communication_bytes(config, layout: Layout, stage_params: dict, tokens: int, act_bytes: int,
                             accumulation: int) -> int:
    """Bytes one rank sends per optimizer step with ring collectives ((g-1)/g of the buffer per all-gather
    or reduce-scatter, twice that per all-reduce): dp all-reduce of the (fsdp-sharded) fp32 gradients once a
    step; fsdp two all-gathers (forward, backward) of the weights and one reduce-scatter of the gradients per
    micro-batch; tp four all-reduce-sized collectives of T x d activations per layer per micro-batch; pp the
    boundary activation and its gradient per micro-batch."""
    dp, fsdp, tp, pp = layout.dp, layout.fsdp, layout.tp, layout.pp
    w = act_bytes
    total = 0.0
    if dp > 1:
        total += 2 * (dp - 1) / dp * 4 * stage_params["params"]
    if fsdp > 1:
        total += accumulation * (fsdp - 1) / fsdp * stage_params["params_unsharded"] * (2 * w + 4)
    if tp > 1:
        total += accumulation * len(stage_params["layers"]) * 4 * 2 * (tp - 1) / tp * tokens * config.d_model * w
    if pp > 1:
        total += accumulation * 2 * tokens * config.d_model * w
    return int(total)


# -- all layouts -----------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problem(config, layout: Layout) -> str | None:
    """Why `layout` cannot be used for `config`, or None."""
    c, tp = config, layout.tp
    if c.n_head % tp:
        return f"tp={tp} does not divide n_head={c.n_head}"
    if c.kv_heads % tp:
        return f"tp={tp} does not divide n_kv_head={c.kv_heads}"
    if c.d_ff % tp:
        return f"tp={tp} does not divide d_ff={c.d_ff}"
    if c.moe is not None and (c.moe.expert_d_ff or c.d_ff) % tp:
        return f"tp={tp} does not divide the experts' d_ff={c.moe.expert_d_ff or c.d_ff}"
    if layout.pp > c.n_layer:
        return f"pp={layout.pp} is more stages than n_layer={c.n_layer}"
    return None


def rank_key(plan: dict, gpus_per_node: int = 8) -> tuple:
    """Order of the fitting layouts, best first: less communication on the critical path first.

    1. tp within a node (tp <= gpus_per_node): tensor parallelism all-reduces activations in every layer,
       which only NVLink-class bandwidth affords.
    2. fewest pipeline stages: each stage adds a bubble of (pp - 1) / (microbatches + pp - 1) of the step.
    3. smallest tp: its collectives sit on the critical path of every layer, while FSDP's overlap with
       compute.
    4. smallest fsdp, i.e. most plain replicas: DDP moves 2x the gradients per step, FSDP 3x (two
       all-gathers and a reduce-scatter), so shard only as far as memory requires.
    5. lowest peak memory.
    """
    return (plan["tp"] > gpus_per_node, plan["pp"], plan["tp"], plan["fsdp"], plan["memory_bytes"]["total"])


def plan_layouts(config, gpus: int, gpu_mem_bytes: int, seq_len: int | None = None, micro_batch: int = 1,
                 precision: str = "bf16", activation_checkpointing: bool = False, microbatches: int | None = None,
                 schedule: str = "1f1b", sequence_parallel: bool = True, gpus_per_node: int = 8,
                 usable_fraction: float = 0.9, ddp: bool = False, vocab_parallel_loss: bool = False) -> dict:
    """Every usable (dp, fsdp, tp, pp) for `gpus` GPUs of `gpu_mem_bytes` each, with its predicted peak.

    A layout fits when its peak (the worst stage's `rank_memory` total) is at most
    `usable_fraction * gpu_mem_bytes` (the rest is for the CUDA context, the allocator's fragmentation and
    what the model leaves out). Fitting layouts come first, ordered by `rank_key` and numbered from 1;
    the others follow by peak. `microbatches` (per step under pp; default pp) also sets how many
    micro-batches a step accumulates for the communication estimate.

    Returns plain data: {"gpus", "gpu_mem_bytes", "usable_bytes", "seq_len", "micro_batch", "precision",
    "activation_checkpointing", "parameters", "layouts": [{dp, fsdp, tp, pp, rank, fits, peak_stage,
    layers_per_stage, in_flight, memory_bytes, memory_gib, communication_bytes_per_step, bubble, why}],
    "excluded": [{dp, fsdp, tp, pp, why}], "fitting", "advice"}.
    """
    if gpus < 1:
        raise ValueError(f"gpus: must be >= 1, got {gpus}")
    if gpu_mem_bytes <= 0:
        raise ValueError(f"gpu memory: must be > 0 bytes, got {gpu_mem_bytes}")
    if micro_batch < 1:
        raise ValueError(f"micro_batch: must be >= 1, got {micro_batch}")
    if microbatches is not None and microbatches < 1:
        raise ValueError(f"microbatches: must be >= 1, got {microbatches}")
    if config.FAMILY != "decoder":
        raise ValueError(f"the planner models decoders (model.family decoder), not {config.FAMILY}")
    config.validate()
    seq_len = seq_len or config.block_size
    usable = int(gpu_mem_bytes * usable_fraction)
    e = 2 if precision != "fp32" else 4
    layouts, excluded = [], []
    shapes = parameter_shapes(config)
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            for fsdp in _divisors(gpus // tp // pp):
                lay = Layout(gpus // tp // pp // fsdp, fsdp, tp, pp)
                problem = layout_problem(config, lay)
                if problem:
                    excluded.append({**lay.as_dict(), "why": problem})
                    continue
                mem = rank_memory(config, lay, seq_len, micro_batch, precision, activation_checkpointing,
                                  microbatches, schedule, sequence_parallel, ddp, vocab_parallel_loss, shapes)
                m = microbatches or lay.pp
                stage = stage_parameters(config, lay, shapes)[mem["stage"]]
                total = mem["memory_bytes"]["total"]
                fits = total <= usable
                layouts.append({
                    **lay.as_dict(), "rank": None, "fits": fits, "peak_stage": mem["stage"],
                    "layers_per_stage": _stage_sizes(config.n_layer, lay.pp), "in_flight": mem["in_flight"],
                    "memory_bytes": mem["memory_bytes"],
                    "memory_gib": {k: round(v / GIB, 3) for k, v in mem["memory_bytes"].items()},
                    "communication_bytes_per_step": step_communication_bytes(
                        config, lay, stage, micro_batch * seq_len, e, m if lay.pp > 1 else 1),
                    "bubble": round((lay.pp - 1) / (m + lay.pp - 1), 4),
                    "why": None if fits else _why(mem["memory_bytes"], usable),
                })
    fitting = sorted((p for p in layouts if p["fits"]), key=lambda p: rank_key(p, gpus_per_node))
    for i, p in enumerate(fitting, 1):
        p["rank"] = i
    rest = sorted((p for p in layouts if not p["fits"]), key=lambda p: p["memory_bytes"]["total"])
    params = sum(math.prod(s) for s in shapes.values())
    plan = {"gpus": gpus, "gpu_mem_bytes": gpu_mem_bytes, "usable_bytes": usable, "seq_len": seq_len,
            "micro_batch": micro_batch, "precision": precision, "activation_checkpointing": activation_checkpointing,
            "schedule": schedule, "microbatches": microbatches, "sequence_parallel": sequence_parallel,
            "parameters": params, "layouts": fitting + rest, "excluded": excluded, "fitting": len(fitting)}
    plan["advice"] = _advice(plan, rest)
    return plan


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.2f} MiB"


def _why(mem: dict, usable: int) -> str:
    parts = ", ".join(f"{k} {_size(mem[k])}" for k in ("model_state", "compute_weights", "activations",
                                                       "logits_peak", "communication") if mem[k])
    return f"peak {_size(mem['total'])} > {_size(usable)} usable ({parts})"


def _advice(plan: dict, rest: list[dict]) -> str:
    if plan["fitting"]:
        best = plan["layouts"][0]
        return (f"best: dp={best['dp']} fsdp={best['fsdp']} tp={best['tp']} pp={best['pp']}, peak "
                f"{_size(best['memory_bytes']['total'])} of {_size(plan['usable_bytes'])} usable")
    if not rest:
        return "no layout is possible: " + "; ".join(sorted({x["why"] for x in plan["excluded"]}))
    low = rest[0]
    mem = low["memory_bytes"]
    hints = []
    if mem["activations"] + mem["logits_peak"] > 0.2 * mem["total"]:
        if not plan["activation_checkpointing"]:
            hints.append("--activation-checkpointing")
        hints.append("a smaller --micro-batch or --seq-len" if plan["micro_batch"] > 1 else "a smaller --seq-len")
    hints.append("more GPUs or GPUs with more memory")
    return (f"no layout fits on {plan['gpus']} GPU(s): the smallest peak is dp={low['dp']} fsdp={low['fsdp']} "
            f"tp={low['tp']} pp={low['pp']}, {low['why']}; try {', or '.join(hints)}")


def _count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)


def format_plan(plan: dict, limit: int = 20) -> str:
    """A human-readable table of `plan_layouts`'s result: per-rank memory of each layout (GiB, or MiB for a
    small model), fitting layouts first in rank order."""
    layouts = plan["layouts"][:limit]
    largest = max((p["memory_bytes"]["total"] for p in layouts), default=0)
    unit, div = ("GiB", GIB) if largest >= GIB else ("MiB", 2**20)
    head = (f"{_count(plan['parameters'])} parameters on {plan['gpus']} GPU(s) of "
            f"{plan['gpu_mem_bytes'] / GIB:.1f} GiB ({plan['usable_bytes'] / GIB:.1f} usable); seq_len "
            f"{plan['seq_len']}, micro-batch {plan['micro_batch']}, {plan['precision']}"
            + (", activation checkpointing" if plan["activation_checkpointing"] else "")
            + f"; per rank, {unit}:")
    keys = ("model_state", "compute_weights", "activations", "logits_peak", "communication", "total")
    cols = ("state", "16-bit w", "activ.", "logits", "comm", "peak")
    rows = [f"{'rank':>4} {'dp':>4} {'fsdp':>4} {'tp':>3} {'pp':>3} " + " ".join(f"{c:>9}" for c in cols) + "  fits"]
    for p in layouts:
        m = p["memory_bytes"]
        rows.append(f"{p['rank'] or '-':>4} {p['dp']:>4} {p['fsdp']:>4} {p['tp']:>3} {p['pp']:>3} "
                    + " ".join(f"{m[k] / div:>9.2f}" for k in keys) + f"  {'yes' if p['fits'] else 'no'}")
    more = len(plan["layouts"]) - limit
    tail = [f"... {more} more (--json lists all)"] if more > 0 else []
    if plan["excluded"]:
        tail.append(f"{len(plan['excluded'])} layout(s) excluded: "
                    + "; ".join(sorted({x['why'] for x in plan['excluded']})))
    return "\n".join([head, *rows, *tail, plan["advice"]])


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9 bytes, '80GiB' -> 80 * 2**30, '141G' -> 141e9, '1.5TB'; a unit is required (K, M, G, T
    decimal, Ki, Mi, Gi, Ti binary, each with or without a trailing B; case-insensitive)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", str(text), re.IGNORECASE)
    if not m or not m.group(2):
        raise ValueError(f"gpu memory {text!r}: expected a size with a unit, e.g. 80GB, 80GiB, 141G")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"gpu memory {text!r}: must be more than 0")
    return int(value)
