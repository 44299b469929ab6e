"""What a recipe calls for `train.parallel`: the model laid out on the mesh, and the hooks the loop needs.

    ParallelTraining(model, cfg.train.parallel, info)
        .model        what evaluation calls like the model: model(idx, targets) -> (logits | None, loss)
        .params       one module with this process's parameters under their unpipelined names (optimizer)
        .data_rank / .data_world   whose batches this process draws
        .job_hooks()  the loop's Job fields: distributed checkpoints, the layout, a pipeline's forward/backward
        .full_state() the whole model's weights in the Decoder's layout, on global rank 0 (final save)

The layout itself is `llmkit.train.mesh` (data x tensor parallel) and `llmkit.train.pipeline` (stages).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from llmkit.runtime import DistInfo
from llmkit.train import mesh as mesh_parallel
from llmkit.train.pipeline import PipelineRunner


class ParallelTraining:
    def __init__(self, model: nn.Module, cfg: mesh_parallel.ParallelConfig, info: DistInfo,
                 compute_dtype: torch.dtype = torch.float32):
        """Lay `model` (a Decoder, same initial weights on every rank, loaded weights already in it) out on
        the mesh of `cfg` for this world. The model is changed in place; build the optimizer over `params`
        afterwards. `compute_dtype` (the training precision): a 16-bit one becomes FSDP's mixed-precision
        policy, weights all-gathered and computed in it (half the bytes of fp32), gradients reduced in fp32,
        the sharded master weights and AdamW state kept in fp32."""
        param_dtype = compute_dtype if compute_dtype != torch.float32 else None
        self.layout = mesh_parallel.make_layout(cfg, info)
        self.config = self.layout.config
        self.pipeline: PipelineRunner | None = None
        if self.config.pp > 1:
            self.pipeline = PipelineRunner(model, self.layout, param_dtype)
            self.model, self.params = self.pipeline, self.pipeline.parts
        else:
            self.model = self.params = mesh_parallel.parallelize(model, self.layout, param_dtype)
        self.data_rank, self.data_world = self.layout.data_rank, self.layout.data_world

    def job_hooks(self, optimizer: torch.optim.Optimizer) -> dict:
        names = {}
        if self.pipeline is not None and self.pipeline.tied and self.pipeline.is_last and not self.pipeline.is_first:
            names = {"lm_head.weight": "tok_emb.weight"}  # the last stage's copy of the one tied matrix
        hooks = dict(save_shards=lambda path: mesh_parallel.save_sharded_state(self.params, optimizer, path, names),
                     load_shards=lambda path: mesh_parallel.load_sharded_state(self.params, optimizer, path, names),
                     layout=self.config.as_dict())
        if self.pipeline is not None:
            hooks.update(forward_backward=self.pipeline.train_step, grad_norm_across=self.pipeline.group,
                         sync_grads=self.pipeline.sync_tied_grads, grad_norm_params=self.pipeline.norm_params())
        return hooks

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The unsharded weights in the Decoder's layout on global rank 0 (None elsewhere). Collective."""
        state = mesh_parallel.full_state(self.params, every_rank=self.pipeline is not None)
        if self.pipeline is None:
            return state if not dist.is_initialized() or dist.get_rank() == 0 else None
        group = self.pipeline.group  # each stage's weights, gathered onto the first stage of the group
        parts = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
        dist.gather_object(state, parts, group_dst=0, group=group)
        if dist.get_rank() != 0:
            return None
        return {k: v for part in parts for k, v in part.items()}
