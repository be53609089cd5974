"""The model as DeepSpeed pipeline stages: embedding, transformer layers, head.

Pipeline parallelism runs through DeepSpeed's `PipelineModule` and its 1F1B
engine (`parallel.pipeline`). Each stage is
built from the same megatron-core pieces as `pretrain.model.llama.LlamaModel`, and
initialised under the single-process parameter names, so any partition
starts from the same weights.

With tied embeddings the embedding stage is a DeepSpeed `TiedLayerSpec`
used twice: as the embedding on the first stage and, through
`tied_output_logits`, as the output projection on the last. Each of the two
stages holds a copy of the weight; DeepSpeed broadcasts it from the first
stage at start-up and after loading, and all-reduces its gradient between
the two before every update, so the copies stay equal.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from parallel.pipeline import pipeline_module
from parallel.sequence import sequence_parallel_linear
from pretrain.model.config import ModelConfig
from pretrain.model.init import initialize_local
from pretrain.model.layers import ColumnParallelLinear, RMSNorm
from pretrain.model.rotary import RotaryTables
from pretrain.model.llama import embed_tokens, masked_mean, model_layer_spec, per_token_loss


class EmbeddingStage(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, config: TransformerConfig, padded_vocab: int, seed: int):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            padded_vocab, cfg.hidden_size, init_method=config.init_method, config=config
        )
        initialize_local([("embedding.weight", self.embedding.weight)], cfg, seed)

    def forward(self, inputs):
        """Token ids [b, s], or (token ids, position ids, document starts) with the
        end-of-document options, whose two extras are passed on to the layers."""
        tokens, *extras = inputs if isinstance(inputs, tuple) else (inputs,)
        hidden = embed_tokens(self.embedding, tokens, self.sequence_parallel)
        return (hidden, *extras) if extras else hidden


class TransformerLayerStage(torch.nn.Module):
    """One megatron-core `TransformerLayer` taking and returning the hidden states."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, index: int, seed: int):
        super().__init__()
        self.layer = build_module(model_layer_spec(cfg, index), config=config, layer_number=index + 1)
        # megatron-core adds its own pipeline offset to the number; DeepSpeed cut the stages,
        # so the model's index is the number (MoE routers file their losses under it).
        self.layer.layer_number = index + 1
        if hasattr(self.layer.mlp, "set_layer_number"):
            self.layer.mlp.set_layer_number(index + 1)
        named = [(f"decoder.layers.{index}.{n}", p) for n, p in self.layer.named_parameters()]
        initialize_local(named, cfg, seed)
        self.rotary = RotaryTables(cfg.head_dim, cfg.rotary_base, cfg.rope_scaling, cfg.max_seq_len)

    def forward(self, inputs):
        """Hidden states [s, b, h], or (hidden states, position ids [b, s], document starts
        [b, s]) as `LlamaModel` takes them; returns the same form."""
        hidden, *extras = inputs if isinstance(inputs, tuple) else (inputs,)
        seq = hidden.shape[0] * (parallel_state.get_tensor_model_parallel_world_size()
                                 if self.layer.config.sequence_parallel else 1)
        position_ids, document_starts = extras if extras else (None, None)
        rotary = self.rotary(seq, hidden.device, position_ids)
        output, _ = self.layer(hidden, attention_mask=document_starts, rotary_pos_emb=rotary)
        return (output, *extras) if extras else output


class HeadStage(torch.nn.Module):
    """Final norm and the vocabulary-parallel output layer; returns logit shards [s, b, v/tp].

    With tied embeddings it holds the final norm only and returns the normed
    hidden states: the projection follows as the tied embedding's head use.
    """

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, padded_vocab: int, seed: int):
        super().__init__()
        self.final_layernorm = RMSNorm(config, cfg.hidden_size, eps=cfg.norm_eps)
        self.tied = cfg.tie_embeddings
        # Tied, the output layer holds no weight, as in the one-process model, and
        # is kept so that checkpoints carry the same entries (its extra state).
        self.output_layer = ColumnParallelLinear(
            cfg.hidden_size, padded_vocab, config=config, init_method=config.init_method,
            bias=False, gather_output=False, skip_weight_param_allocation=self.tied,
        )
        named = [("decoder.final_layernorm.weight", self.final_layernorm.weight)]
        if not self.tied:
            named.append(("output_layer.weight", self.output_layer.weight))
        initialize_local(named, cfg, seed)

    def forward(self, inputs) -> torch.Tensor:
        hidden = inputs[0] if isinstance(inputs, tuple) else inputs  # the extras end here
        hidden = self.final_layernorm(hidden)
        if self.tied:
            return hidden
        logits, _ = self.output_layer(hidden)
        return logits


def tied_output_logits(stage: EmbeddingStage, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer's computation with the embedding's vocabulary shard as its weight.

    As in the untied column-parallel head, the input enters the tensor-parallel
    region (copied, or gathered from sequence slices) and each rank multiplies
    by its own vocabulary rows, giving logit shards [s, b, v/tp].
    """
    group = parallel_state.get_tensor_model_parallel_group()
    weight = stage.embedding.weight
    if stage.sequence_parallel:
        return sequence_parallel_linear(hidden, weight, None, group)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group)
    return torch.matmul(hidden, weight.t())


class VocabParallelLoss(torch.nn.Module):
    """Mean loss over the tokens, plus z-loss (`model.z_loss_multiplier`) while training;
    `labels` is ids [b, s] or (ids, loss mask [b, s][, weight]).

    A module rather than a function: DeepSpeed's `PipelineModule` keeps its loss
    function as an attribute, which makes this a child of the pipeline, so the
    engine's train() and eval() reach it. Evaluation then reports the cross
    entropy alone, as `LlamaModel` does. It holds no parameters.
    """

    def __init__(self, z_loss: float = 0.0):
        super().__init__()
        self.z_loss = z_loss

    def forward(self, logits: torch.Tensor, labels) -> torch.Tensor:
        """`labels` may carry a third entry, a weight for the mean (a context-parallel slice's
        share of its sequence's loss: `parallel.context`)."""
        labels, loss_mask, *weight = labels if isinstance(labels, tuple) else (labels, None)
        loss = masked_mean(per_token_loss(logits, labels, self.z_loss if self.training else 0.0), loss_mask)
        return loss * weight[0] if weight else loss


def build_pipeline(
    cfg: ModelConfig, config: TransformerConfig, padded_vocab: int, seed: int,
    stages: int, tensor: int, data: int, partition: str = "uniform",
) -> PipelineModule:
    specs = [embedding_spec(cfg, config, padded_vocab, seed)]
    specs += [LayerSpec(TransformerLayerStage, cfg, config, i, seed) for i in range(cfg.num_layers)]
    specs.append(LayerSpec(HeadStage, cfg, config, padded_vocab, seed))
    if cfg.tie_embeddings:
        specs.append(embedding_spec(cfg, config, padded_vocab, seed, forward_fn=tied_output_logits))
    # "uniform" balances transformer layers; "parameters" balances parameter counts.
    method = "type:TransformerLayerStage" if partition == "uniform" else "parameters"
    return pipeline_module(specs, VocabParallelLoss(cfg.z_loss_multiplier), stages, tensor, data, method)


# The key of the tied embedding: its parameters are named `tied_modules.embedding.embedding.*`.
TIED_EMBEDDING = "embedding"


def embedding_spec(cfg: ModelConfig, config: TransformerConfig, padded_vocab: int, seed: int,
                   forward_fn=None) -> LayerSpec:
    """The embedding stage; tied, one module serves both ends (`forward_fn` gives the head use).

    The first stage's tied module is still pipeline layer 0 in checkpoints,
    saved as `layer_00-*` with the untied names; the head use has no state of
    its own and is not saved (DeepSpeed fills it from layer 0 on loading).
    """
    if not cfg.tie_embeddings:
        return LayerSpec(EmbeddingStage, cfg, config, padded_vocab, seed)
    return TiedLayerSpec(TIED_EMBEDDING, EmbeddingStage, cfg, config, padded_vocab, seed,
                         forward_fn=forward_fn, tied_weight_attr=["embedding.weight"])
