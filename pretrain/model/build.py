"""The model for this rank's place in the layout, and what the parallel layer needs to know of it."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from parallel.config import ParallelConfig
from parallel.engine import precision_dtype
from parallel.output_loss import chunk_tokens
from pretrain.model.config import ModelConfig
from pretrain.model.layers import SDPAttention
from pretrain.model.llama import LlamaModel, transformer_config
from pretrain.model.pipeline_stages import TransformerLayerStage, build_pipeline

# What each activation-checkpointing mode recomputes (`parallel.activation_checkpointing`).
RECOMPUTED = {"full": TransformerLayer, "selective": SDPAttention}
# What `trainer.compile=layers` compiles: the pipeline stage of a layer, or the layer itself.
LAYER_TYPES = (TransformerLayerStage, TransformerLayer)


def build_model(cfg: ModelConfig, parallel: ParallelConfig, padded_vocab: int, seed: int, data_parallel: int,
                device: torch.device) -> torch.nn.Module:
    """`LlamaModel` on one pipeline stage, else this rank's DeepSpeed pipeline stage. Weights
    depend on the seed alone, not on the layout (`pretrain.model.init`)."""
    tconfig = transformer_config(
        cfg, params_dtype=precision_dtype(parallel.precision), tensor_parallel=parallel.tensor,
        pipeline_parallel=parallel.pipeline, sequence_parallel=parallel.sequence_parallel,
        expert_parallel=parallel.expert,
    )
    if parallel.pipeline > 1:
        # The pipeline's data axis is every rank that averages gradients: data x context.
        return build_pipeline(cfg, tconfig, padded_vocab, seed, parallel.pipeline, parallel.tensor,
                              data_parallel * parallel.context,
                              parallel.pipeline_partition)
    return LlamaModel(cfg, tconfig, padded_vocab, seed=seed,
                      loss_chunk_tokens=chunk_tokens(device, padded_vocab // parallel.tensor))
