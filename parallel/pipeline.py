"""The model as a DeepSpeed pipeline: embedding, transformer layers, head.

megatron-core's own pipeline schedules assume CUDA, so pipeline parallelism
runs through DeepSpeed's `PipelineModule` and its 1F1B engine. Each stage is
built from the same megatron-core pieces as `pretrain.model.LlamaModel`, and
initialised under the single-process parameter names, so any partition
starts from the same weights.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from pretrain.config import ModelConfig
from pretrain.init import initialize_local
from parallel.sequence import scatter_to_sequence_parallel_region
from pretrain.layers import ColumnParallelLinear, RMSNorm, rotary_frequencies
from pretrain.model import layer_spec


class EmbeddingStage(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, config: TransformerConfig, padded_vocab: int, seed: int):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            padded_vocab, cfg.hidden_size, init_method=config.init_method, config=config
        )
        initialize_local([("embedding.weight", self.embedding.weight)], cfg, seed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(tokens).transpose(0, 1).contiguous()  # [s, b, h]
        if self.sequence_parallel:
            hidden = scatter_to_sequence_parallel_region(
                hidden, parallel_state.get_tensor_model_parallel_group())
        return hidden


class TransformerLayerStage(torch.nn.Module):
    """One megatron-core `TransformerLayer` taking and returning the hidden states."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, index: int, seed: int):
        super().__init__()
        self.cfg = cfg
        self.layer = build_module(layer_spec(), config=config, layer_number=index + 1)
        named = [(f"decoder.layers.{index}.{n}", p) for n, p in self.layer.named_parameters()]
        initialize_local(named, cfg, seed)
        self._rotary: dict[tuple, torch.Tensor] = {}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        seq = hidden.shape[0] * (parallel_state.get_tensor_model_parallel_world_size()
                                 if self.layer.config.sequence_parallel else 1)
        key = (seq, hidden.device)
        if key not in self._rotary:
            self._rotary[key] = rotary_frequencies(seq, self.cfg.head_dim, self.cfg.rotary_base, hidden.device)
        output, _ = self.layer(hidden, attention_mask=None, rotary_pos_emb=self._rotary[key])
        return output


class HeadStage(torch.nn.Module):
    """Final norm and the vocabulary-parallel output layer; returns logit shards [s, b, v/tp]."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, padded_vocab: int, seed: int):
        super().__init__()
        self.final_layernorm = RMSNorm(config, cfg.hidden_size, eps=cfg.norm_eps)
        self.output_layer = ColumnParallelLinear(
            cfg.hidden_size, padded_vocab, config=config, init_method=config.init_method,
            bias=False, gather_output=False,
        )
        initialize_local([("decoder.final_layernorm.weight", self.final_layernorm.weight),
                          ("output_layer.weight", self.output_layer.weight)], cfg, seed)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(self.final_layernorm(hidden))
        return logits


def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    per_token = tensor_parallel.vocab_parallel_cross_entropy(
        logits.float(), labels.transpose(0, 1).contiguous()
    )
    return per_token.mean()


def build_pipeline(
    cfg: ModelConfig, config: TransformerConfig, padded_vocab: int, seed: int,
    stages: int, tensor: int, data: int, partition: str = "uniform",
) -> PipelineModule:
    if cfg.tie_embeddings:
        raise NotImplementedError(
            "model.tie_embeddings=true with parallel.pipeline > 1 is not supported yet"
        )
    specs = [LayerSpec(EmbeddingStage, cfg, config, padded_vocab, seed)]
    specs += [LayerSpec(TransformerLayerStage, cfg, config, i, seed) for i in range(cfg.num_layers)]
    specs.append(LayerSpec(HeadStage, cfg, config, padded_vocab, seed))
    module = PipelineModule(
        layers=specs,
        topology=PipeModelDataParallelTopology(num_pp=stages, num_mp=tensor, num_dp=data),
        loss_fn=vocab_parallel_loss,
        # "uniform" balances transformer layers; "parameters" balances parameter counts.
        partition_method="type:TransformerLayerStage" if partition == "uniform" else "parameters",
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
    """
    if parallel_state.get_pipeline_model_parallel_rank() == 0:
        return
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return
    for param in module.parameters():
        if not getattr(param, "tensor_model_parallel", False):
            param.model_parallel = True
