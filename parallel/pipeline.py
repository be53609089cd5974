"""Pipeline parallelism through DeepSpeed's `PipelineModule` and its 1F1B engine.

megatron-core's own pipeline schedules assume CUDA, so a model that wants to
be cut into stages hands its pieces here as DeepSpeed `LayerSpec`s (the
Llama model's are in `pretrain.model.pipeline_stages`). The topology uses
megatron-core's rank order (tensor fastest, then data, then pipeline).
"""

from __future__ import annotations

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state


def pipeline_module(specs: list, loss_fn, stages: int, tensor: int, data: int,
                    partition_method: str) -> PipelineModule:
    """This rank's stage of the pipeline of `specs`, cut by DeepSpeed's `partition_method`."""
    module = PipelineModule(
        layers=specs,
        topology=PipeModelDataParallelTopology(num_pp=stages, num_mp=tensor, num_dp=data),
        loss_fn=loss_fn,
        partition_method=partition_method,
    )
    count_replicated_weights_once(module)
    return module


def count_replicated_weights_once(module: torch.nn.Module) -> None:
    """Makes DeepSpeed's gradient norm count every stage's replicated weights.

    DeepSpeed sums squared gradient norms over the pipeline x tensor group and
    counts a weight that is not tensor-sharded only on that group's rank 0,
    so norm weights on later stages would be left out of the norm (and of
    clipping). Marking them `model_parallel` on each stage's first tensor rank
    counts each exactly once.

    The last stage's copy of a tied embedding (`ds_pipe_replicated`) is the
    opposite case: its gradient, all-reduced with the first stage's, is
    already counted there. DeepSpeed's ZeRO and bf16 norms skip such copies,
    but the plain fp32 clipping (`clip_grad_norm_`) counts every model-parallel
    weight, so the copy is unmarked: never on a stage's rank 0, it is then
    left out of the norm and still clipped.
    """
    if parallel_state.get_pipeline_model_parallel_rank() == 0:
        return
    for param in module.parameters():
        if getattr(param, "ds_pipe_replicated", False):
            param.tensor_model_parallel = False
            param.model_parallel = False
        elif parallel_state.get_tensor_model_parallel_rank() == 0 \
                and not getattr(param, "tensor_model_parallel", False):
            param.model_parallel = True
