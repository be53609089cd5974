"""Bytes of activations a rank keeps for backward, and the working memory at the peak of a step.

Counted tensor by tensor from what autograd saves in this model's layers
(pretrain/model/llama.py on megatron-core), for `T` = micro-batch x sequence
tokens of one micro-batch on this rank (under context parallelism its slice,
1/cp of each sequence), `w` bytes per element of the training dtype, `t` the
tensor-parallel size, and `n` = `t` under sequence parallelism, else 1:

| saved for backward, per transformer layer  | elements                  | divided by |
|--------------------------------------------|---------------------------|------------|
| two norms: input (the residual) and output | 2 x 2 T h  (see NORM)     | n          |
| fused q/k/v projection output              | T (h + 2 kv)              | t          |
| rotated queries and keys                   | T (h + kv)                | t          |
| attention output (flash/fused: + its log-sum-exp, fp32) | T h          | t          |
| SwiGLU: fc1 output, silu, gate, product    | 5 T f                     | t          |

`kv` = query groups x head size. The gate is counted once more than the
textbook 4 T f: megatron-core's `glu` adds `glu_linear_offset` (0.0) to it,
a new tensor that the product saves. On CPU, torch's `rms_norm` is a
composite of element-wise ops and saves fp32 intermediates: measured, a norm
keeps 12 bytes per element in fp32 (input, x * rstd, output) and 10 in bf16
(input, its fp32 copy, fp32 x * rstd); CUDA's fused kernel keeps the input
and the output only.

Around the layers: the final norm and the loss. One CPU process computes the
loss in chunks (`parallel.output_loss`) and keeps fp32 gradients of the
hidden states and of the output weight instead of logits; every other path
keeps the fp32 softmax of the logit shard, T x vocabulary / t. Attention cut
at documents (`data.reset_attention_mask`, pretrain.model.document_attention)
gathers each document's queries, keys and values into padded batches and
keeps them and the padded outputs for backward: 1.5 x T (2h + 2kv) / t more
per layer (padding to a power of two costs 1 to 2x, 1.5x on average).

Context parallelism (`parallel.context` = cp > 1, Ulysses: parallel/context.py)
changes only what attention keeps. The local attention saves the exchanged
queries, keys and values ([s, b, heads / (t cp), d]: as many bytes as T
tokens of all the rank's heads) and its output; the output exchanged back is
a new tensor, the projection's input. The projection's q/k/v output and the
rotated queries and keys go into the exchange and are not kept. Key-value
groups fewer than cp per tensor rank are repeated up to cp before the
exchange, so keys and values are `kv'` = max(groups, t cp) x head size wide:

| saved for backward, per layer, cp > 1       | elements                  | divided by |
|---------------------------------------------|---------------------------|------------|
| exchanged q, k, v                           | T (h + 2 kv')             | t          |
| attention output, and it exchanged back     | 2 T h (+ log-sum-exp)     | t          |

Selective recomputation checkpoints the local attention inside the exchange:
it keeps the exchanged q, k, v and the output exchanged back.

Recomputation: `full` keeps each layer's input only, and recomputes one layer
at a time in backward; `selective` recomputes the core attention (it saves its
inputs, which the projection shares, instead of the probabilities).

Under 1F1B a pipeline stage `k` of `p` holds min(p - k, m) micro-batches in
flight (m per step); without a pipeline one micro-batch at a time.

The working memory at the peak, on top of what is saved: the gradients being
formed for one layer (about T f w / t, measured as the largest), one
recomputed layer under `full`, and DeepSpeed's gradient reduction bucket under
ZeRO-1/2 (`reduce_bucket_size` elements of the gradient dtype, allocated for
the backward pass whatever the model's size; under a pipeline the engine reduces
after the backward pass into a second one, both alive then). Under ZeRO-3,
the weights of the layer being computed, gathered whole (DeepSpeed also keeps
parameters under `stage3_param_persistence_threshold`, 1e5 elements, whole on
every rank: for a tiny model that is all of them, which this does not count).
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.config import ParallelConfig
from parallel.memory_plan import DTYPE_BYTES, REDUCE_BUCKET_SIZE
from pretrain.model.config import ModelConfig
from pretrain.planning.parameters import layer_params


@dataclass(frozen=True)
class ActivationShape:
    """What the activations depend on besides the model and the layout."""

    seq_len: int
    micro_batch: int
    micro_batches: int  # per optimizer step, per data-parallel rank
    padded_vocab: int
    device: str = "cuda"  # "cpu" or "cuda": the kernels that run, which save different things
    documents: bool = False  # attention cut at document starts (data.reset_attention_mask)
    context: int = 1  # ranks that split each sequence (parallel.context)

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one rank: its slice of every sequence."""
        return self.seq_len * self.micro_batch // self.context


def norm_bytes(device: str, precision: str) -> int:
    """Bytes per element one RMSNorm keeps, its input (the residual stream) included."""
    w = DTYPE_BYTES[precision]
    if device == "cpu":
        return 12 if precision == "fp32" else 10  # composite rms_norm (module docstring)
    return 2 * w


@dataclass
class StageActivations:
    """One pipeline stage's (or one process's) activation bytes."""

    per_layer: int  # saved by one transformer layer, one micro-batch
    layers: int
    ends: int  # embedding side, final norm and loss, stage boundary buffers: one micro-batch
    in_flight: int  # micro-batches held at once
    working: int  # transient at the peak: gradients being formed, a recomputed layer, ZeRO's bucket
    # allocated after the backward pass, while the gradients are reduced: the pipeline engine's
    # second ZeRO bucket (the activations are gone by then)
    reduction: int = 0

    @property
    def saved(self) -> int:
        return self.in_flight * (self.per_layer * self.layers + self.ends)

    @property
    def total(self) -> int:
        return self.saved + self.working


def exchanged_kv(m: ModelConfig, p: ParallelConfig) -> int:
    """Width of the keys (or values) that go through the context-parallel exchange, over all
    tensor ranks: the groups, repeated up to cp on each tensor rank where it has fewer."""
    return max(m.query_groups, p.tensor * p.context) * m.head_dim


def attention_bytes(m: ModelConfig, p: ParallelConfig, shape: ActivationShape, recompute: str) -> int:
    """What a layer's attention keeps for backward (module docstring), recomputation not full."""
    w, t, tokens = DTYPE_BYTES[p.precision], p.tensor, shape.tokens
    h = m.hidden_size
    heads = m.num_attention_heads // t
    if p.context > 1:
        kv = exchanged_kv(m, p)
        # The exchanged q, k, v and the output exchanged back (the projection's input).
        attention = tokens * ((h + 2 * kv) + h) * w // t
        if recompute == "selective":
            return attention
        attention += tokens * h * w // t  # the local attention's own output
    else:
        kv = m.query_groups * m.head_dim
        attention = tokens * ((h + 2 * kv) + (h + kv) + h) * w // t
        if recompute == "selective":
            return attention
    attention += tokens * heads * 4  # the fused kernel's fp32 log-sum-exp
    if shape.documents:  # the padded per-document copies (module docstring)
        attention += 3 * tokens * (2 * h + 2 * kv) * w // (2 * t)
    return attention


def layer_bytes(m: ModelConfig, p: ParallelConfig, shape: ActivationShape, recompute: str) -> int:
    """What one transformer layer keeps for backward for one micro-batch."""
    w, t = DTYPE_BYTES[p.precision], p.tensor
    n = t if p.sequence_parallel else 1
    tokens = shape.tokens
    h, f = m.hidden_size, m.ffn_hidden_size
    if recompute == "full":
        return tokens * h * w // n  # the layer's input
    norms = 2 * norm_bytes(shape.device, p.precision) * tokens * h // n
    mlp = 5 * tokens * f * w // t
    return norms + attention_bytes(m, p, shape, recompute) + mlp


def ends_bytes(m: ModelConfig, p: ParallelConfig, shape: ActivationShape, first: bool, last: bool,
               chunked_loss: bool) -> int:
    """The embedding side, the final norm and loss, and the stage's boundary buffers, per micro-batch."""
    w, t = DTYPE_BYTES[p.precision], p.tensor
    n = t if p.sequence_parallel else 1
    tokens = shape.tokens
    h = m.hidden_size
    total = tokens * 8 * 2  # token ids and labels (int64)
    if not last:
        total += tokens * h * w // n  # the output sent on, kept by the pipeline engine for backward
    if last:
        norm = norm_bytes(shape.device, p.precision) * tokens * h // n
        if chunked_loss:  # the final norm's output is not kept; fp32 gradients are
            total += norm - tokens * h * w // n + tokens * h * 4 + shape.padded_vocab // t * h * 4
        else:
            total += norm + tokens * shape.padded_vocab // t * 4  # the fp32 softmax
    return total


def stage_activations(m: ModelConfig, p: ParallelConfig, shape: ActivationShape, stage: int,
                      layers: int) -> StageActivations:
    """Activation bytes of pipeline stage `stage` holding `layers` transformer layers."""
    w, t = DTYPE_BYTES[p.precision], p.tensor
    tokens = shape.tokens
    recompute = p.activation_checkpointing
    first, last = stage == 0, stage == p.pipeline - 1
    chunked = shape.device == "cpu" and p.pipeline == 1  # see parallel.output_loss.chunk_tokens
    in_flight = min(p.pipeline - stage, shape.micro_batches) if p.pipeline > 1 else 1
    working = tokens * m.ffn_hidden_size * w // t
    if recompute == "full" and layers:
        full = layer_bytes(m, p, shape, "none")
        working += full - layer_bytes(m, p, shape, "full")
    if p.zero_stage in (1, 2):
        working += REDUCE_BUCKET_SIZE * w
    if p.zero_stage == 3:  # the weights gathered for the layer being computed
        working += w * (max(layer_params(m, t, i) for i in range(m.num_layers)) if layers else 0)
    reduction = REDUCE_BUCKET_SIZE * w * 2 if p.zero_stage in (1, 2) and p.pipeline > 1 else 0
    return StageActivations(per_layer=layer_bytes(m, p, shape, recompute), layers=layers,
                            ends=ends_bytes(m, p, shape, first, last, chunked), in_flight=in_flight,
                            working=working, reduction=reduction)
