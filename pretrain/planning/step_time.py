"""Step time of a layout on a cluster, from first principles plus a few measured constants.

For one optimizer step of `m` micro-batches per data-parallel rank, on the
slowest pipeline stage (`T` tokens per micro-batch on a rank: under context
parallelism its slice, b s / cp; `t` tensor, `p` pipeline, `cp` context, `d`
data-parallel ranks, `w` bytes per element):

- **Compute.** Each layer's matrix products, 2 T x (its weights) / t FLOPs
  forward and twice that backward, plus causal attention, 2 b s^2 h / t
  forward (fused kernels skip the masked half; attention cut at documents
  does less, which is not counted; under context parallelism each rank
  attends over the whole sequence for 1/cp of the heads: / cp), run at
  `matmul_efficiency` and
  `attention_efficiency` x the device's peak. Element-wise work is
  bound by memory: each byte a layer keeps for backward is written, read and
  its gradient written, 3 x (activation bytes) / `memory_bandwidth`. The
  output layer adds 6 T h V / t. Recomputation adds a forward (`full`) or the
  attention's forward (`selective`), with the forward's communication.
- **Tensor (and sequence) parallelism.** Per layer and micro-batch, two ring
  all-reduces of T h w bytes forward and two backward (sequence parallelism:
  the same volume as all-gathers and reduce-scatters, plus the backward's
  re-gather of the inputs), each 2 (t - 1)/t x bytes / bandwidth + 2 (t - 1)
  x latency, on NVLink when the group fits in a node. The stack does not
  overlap them with compute.
- **Context parallelism** (Ulysses, parallel/context.py). Per layer and
  micro-batch, four all-to-alls forward (queries, keys, values over the
  context group, the output back) and their four gradients backward. Each
  rank keeps 1/cp of each tensor and sends the rest: (cp - 1)/cp x bytes /
  bandwidth + latency, for T h w / t bytes (queries, output) and T kv' w / t
  (keys, values; kv' repeats the key-value groups up to cp per tensor rank
  where fewer). On NVLink when t x cp ranks fit in a node, and not
  overlapped with compute. Full recomputation repeats the forward's four;
  selective recomputes the attention inside the exchange, without them.
- **Pipeline.** 1F1B takes (m + p - 1) slots of the slowest stage's forward
  and backward: the p - 1 extra are the bubble (the bubble is over v under
  an interleaved schedule of v chunks per rank). Every slot also sends the
  stage's output forward and its gradient back (blocking in DeepSpeed's
  engine), T h w / t bytes each (each tensor rank sends its share).
- **Data parallelism.** Gradients are averaged, and ZeRO's states
  partitioned, over data x context ranks (d cp: each context-parallel rank
  holds all the weights). ZeRO-0/1 reduce gradients once per step: a ring
  all-reduce of the stage's parameters in the gradient dtype (ZeRO-1 as a
  reduce-scatter and an all-gather of the updated weights: the same volume).
  DeepSpeed's ZeRO-2 reduce-scatters the gradients of every micro-batch, and
  ZeRO-3 also gathers the weights for each micro-batch's forward and backward.
  It runs after the backward pass (DeepSpeed's default `overlap_comm` is off
  for ZeRO-0/1/2) except under ZeRO-3, whose prefetching hides it behind
  the compute.
  Stacks that overlap it (Megatron-LM's `--overlap-grad-reduce`, FSDP) hide it
  behind the last micro-batch's backward pass (`Stack`).
- **Optimizer.** Adam reads and writes about 28 + 2w bytes per parameter it
  updates (fp32 weights, moments and gradient, and the bit16 copy): memory-bound.
  Offloaded to the host, it also moves 6w bytes per parameter over the host link
  (modelled as the inter-node link) and runs at the host's rate (see HOST_ADAM).
- **Host overhead.** `overhead.per_layer` per layer and micro-batch (kernel
  launches the device does not hide: zero on GPUs at these sizes, most of a
  small model's step on a CPU), and `overhead.per_step`.

When a node runs more ranks than it has devices (several processes sharing
the cores of one CPU), compute and host time stretch by ranks / devices.
MFU counts the model's FLOPs (pretrain.model.flops: 6 N + 12 L h s per
token, recomputation excluded) against the device's peak; it and tokens/s
are per step of the whole global batch, whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from parallel.memory_plan import DTYPE_BYTES
from pretrain.config import Config
from pretrain.planning.activations import ActivationShape, exchanged_kv, layer_bytes
from pretrain.planning.cluster import ClusterConfig, Link
from pretrain.planning.parameters import layout_data_parallel, stage_layers, stage_params
from pretrain.planning.peak import activation_shape
from pretrain.model.flops import flops_per_token

# ZeRO-Offload's CPU Adam: parameters updated per second on a node's host cores.
HOST_ADAM = 2e9


@dataclass
class StepTime:
    """Seconds of one optimizer step, by where they go (they add up to `total`)."""

    compute: float  # forward and backward of every micro-batch on the slowest stage, bubble excluded
    recompute: float  # the part of the step spent recomputing activations
    tensor_comm: float
    context_comm: float  # the context-parallel all-to-alls of attention
    pipeline_bubble: float
    pipeline_comm: float
    data_comm: float  # the part not overlapped with the backward pass
    optimizer: float
    overhead: float

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def parts(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class TimePlan:
    step: StepTime
    tokens_per_step: int
    world_size: int
    model_flops_per_token: float
    peak_flops: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step.total

    @property
    def mfu(self) -> float:
        return self.model_flops_per_token * self.tokens_per_second / (self.world_size * self.peak_flops)

    def seconds_per_tokens(self, tokens: float) -> float:
        return tokens / self.tokens_per_second


def ring_all_reduce(nbytes: float, ranks: int, link: Link) -> float:
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / link.bandwidth + 2 * (ranks - 1) * link.latency


def ring_gather(nbytes: float, ranks: int, link: Link) -> float:
    """An all-gather or a reduce-scatter of a tensor of `nbytes` in all."""
    if ranks == 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / link.bandwidth + (ranks - 1) * link.latency


def all_to_all(nbytes: float, ranks: int, link: Link) -> float:
    """An all-to-all of a tensor of `nbytes` per rank: each rank keeps 1/ranks of it and sends
    the rest, to every other rank at once (one latency)."""
    if ranks == 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / link.bandwidth + link.latency


@dataclass
class _Micro:
    """One micro-batch through one layer on one rank, in seconds."""

    forward: float
    backward: float
    recompute: float
    tensor_comm: float
    context_comm: float


def _context_exchange(cfg: Config, shape: ActivationShape, cluster: ClusterConfig) -> float:
    """The four all-to-alls of one layer's forward (the backward's four move as much)."""
    m, p = cfg.model, cfg.parallel
    if p.context == 1:
        return 0.0
    w, t = DTYPE_BYTES[p.precision], p.tensor
    width = shape.tokens * w / t  # bytes per channel of a tensor rank's slice
    link = cluster.link(p.context, t)  # the context group: cp ranks, t apart in rank order
    queries = all_to_all(width * m.hidden_size, p.context, link)
    keys = all_to_all(width * exchanged_kv(m, p), p.context, link)
    return 2 * queries + 2 * keys  # queries and the output back; keys and values


def _layer(cfg: Config, shape: ActivationShape, cluster: ClusterConfig, stretch: float) -> _Micro:
    m, p = cfg.model, cfg.parallel
    t, w = p.tensor, DTYPE_BYTES[p.precision]
    tokens = shape.tokens
    h, f, kv = m.hidden_size, m.ffn_hidden_size, m.query_groups * m.head_dim
    rate = cluster.peak(p.precision) * cluster.matmul_efficiency / stretch
    matmul = 2 * tokens * (h * (h + 2 * kv) + h * h + 3 * h * f) / t
    # Causal: half the score matrix. Cut at documents, less (sum of their squares); without
    # their lengths, the whole sequence's causal half stands as the bound. Under context
    # parallelism a rank attends over the whole sequence for 1/cp of the heads.
    attention = 4 * shape.micro_batch * shape.seq_len ** 2 * h / (t * p.context) * 0.5
    elementwise = 3 * layer_bytes(m, p, shape, "none") / (cluster.memory_bandwidth / stretch)
    attention_rate = rate / cluster.matmul_efficiency * cluster.attention_efficiency
    forward = matmul / rate + attention / attention_rate + elementwise / 3
    backward = 2 * (matmul / rate + attention / attention_rate) + 2 * elementwise / 3
    link = cluster.link(t, 1)
    activation = tokens * h * w
    if p.sequence_parallel:
        forward_comm = 4 * ring_gather(activation, t, link)
        backward_comm = 6 * ring_gather(activation, t, link)
    else:
        forward_comm = 2 * ring_all_reduce(activation, t, link)
        backward_comm = forward_comm
    exchange = _context_exchange(cfg, shape, cluster)
    recompute = 0.0
    if p.activation_checkpointing == "full":
        recompute = forward + forward_comm + exchange
    elif p.activation_checkpointing == "selective":  # the attention inside the exchange
        recompute = attention / attention_rate
    return _Micro(forward, backward, recompute, forward_comm + backward_comm, 2 * exchange)


@dataclass(frozen=True)
class Stack:
    """What the training stack overlaps and interleaves. The defaults are this project's
    (megatron-core layers in a DeepSpeed engine); other stacks, such as the published
    Megatron-LM runs `bench/plan_published.py` checks against, differ."""

    overlap_tensor_comm: bool = False  # tensor-parallel collectives hidden behind the layer's GEMMs
    overlap_grad_reduce: bool | None = None  # gradient reduction during the last backward; None: ZeRO-3 only
    virtual_stages: int = 1  # interleaved 1F1B: chunks of layers per pipeline rank


def plan_time(cfg: Config, cluster: ClusterConfig, world_size: int, vocab_size: int | None = None,
              ranks_per_node: int | None = None, stack: Stack = Stack()) -> TimePlan:
    """The predicted step time of `cfg`'s layout on `world_size` ranks of `cluster`.

    `stack.virtual_stages` > 1 models Megatron-LM's interleaved 1F1B: the bubble
    shrinks by that factor and the sends grow by it. Overlapped communication
    costs only what the compute it hides behind does not cover.
    """
    m, p = cfg.model, cfg.parallel
    t, pp, cp, w = p.tensor, p.pipeline, p.context, DTYPE_BYTES[p.precision]
    d = layout_data_parallel(cfg, world_size)  # replicas that read different samples
    vocab = vocab_size or m.vocab_size or cfg.data.tokenizer.vocab_size
    padded = m.padded_vocab_size(vocab, t)
    shape = activation_shape(cfg, d, padded, cluster.device)
    micro_batches = shape.micro_batches
    tokens = shape.tokens
    ranks_per_node = ranks_per_node or min(world_size, cluster.devices_per_node)
    stretch = max(1.0, ranks_per_node / cluster.devices_per_node)
    rate = cluster.peak(p.precision) * cluster.matmul_efficiency / stretch

    layer = _layer(cfg, shape, cluster, stretch)
    layers = stage_layers(cfg, padded)
    head = 6 * tokens * m.hidden_size * padded / t / rate
    embedding_comm = ring_all_reduce(tokens * m.hidden_size * w, t, cluster.link(t, 1))
    per_layer_host = cluster.overhead.per_layer * stretch

    def stage_seconds(stage: int) -> tuple[float, float, float, float, float]:
        """(compute, recompute, tensor comm, context comm, host overhead) of one micro-batch
        through the stage."""
        n = layers[stage]
        compute = n * (layer.forward + layer.backward) + (head if stage == pp - 1 else 0.0)
        comm = n * layer.tensor_comm + (embedding_comm if stage == 0 else 0.0)
        return compute, n * layer.recompute, comm, n * layer.context_comm, n * per_layer_host

    per_stage = [stage_seconds(s) for s in range(pp)]
    if stack.overlap_tensor_comm:
        per_stage = [(c, r, max(0.0, comm - c), x, h) for c, r, comm, x, h in per_stage]
    slowest = max(range(pp), key=lambda s: sum(per_stage[s]))
    compute, recompute, tensor_comm, context_comm, host = per_stage[slowest]
    bubble = (pp - 1) * (compute + recompute + tensor_comm + context_comm + host) / stack.virtual_stages

    # Each tensor rank sends its share of the stage's output, gathered again on arrival.
    boundary = tokens * m.hidden_size * w
    p2p_link = cluster.link(pp, t * cp * d)  # pipeline ranks are the farthest apart in rank order
    p2p = boundary / t / p2p_link.bandwidth + p2p_link.latency + ring_gather(boundary, t, cluster.link(t, 1))
    pipeline_comm = (micro_batches * stack.virtual_stages + pp - 1) * 2 * p2p if pp > 1 else 0.0

    params = max(stage_params(cfg, padded))
    replicas = d * cp  # gradients averaged and ZeRO states partitioned over data x context
    dp_link = cluster.link(replicas, t)
    gradient_bytes = params * w
    if p.zero_stage <= 1:  # one all-reduce (ZeRO-1: reduce-scatter, then all-gather the weights)
        data_comm = ring_all_reduce(gradient_bytes, replicas, dp_link)
    elif p.zero_stage == 2:  # gradients reduce-scattered every micro-batch, weights gathered once
        data_comm = (micro_batches + 1) * ring_gather(gradient_bytes, replicas, dp_link)
    else:  # weights gathered for each forward and backward, gradients reduce-scattered, every micro-batch
        data_comm = 3 * micro_batches * ring_gather(gradient_bytes, replicas, dp_link)
    overlap = stack.overlap_grad_reduce if stack.overlap_grad_reduce is not None else p.zero_stage == 3
    if overlap:  # ZeRO-3 prefetches behind all the compute; others hide behind the last backward
        hidden = micro_batches * compute if p.zero_stage == 3 else layers[slowest] * layer.backward
        data_comm = max(0.0, data_comm - hidden)

    updated = params if p.zero_stage == 0 else -(-params // replicas)
    if p.offload_optimizer:
        optimizer = updated * 6 * w / cluster.inter_node.bandwidth + updated / HOST_ADAM
    else:
        optimizer = updated * (28 + 2 * w) / (cluster.memory_bandwidth / stretch)

    step = StepTime(
        compute=micro_batches * compute,
        recompute=micro_batches * recompute,
        tensor_comm=micro_batches * tensor_comm,
        context_comm=micro_batches * context_comm,
        pipeline_bubble=bubble,
        pipeline_comm=pipeline_comm,
        data_comm=data_comm,
        optimizer=optimizer,
        overhead=micro_batches * host + cluster.overhead.per_step * stretch,
    )
    return TimePlan(step=step, tokens_per_step=cfg.trainer.global_batch_size * cfg.data.seq_len,
                    world_size=world_size, model_flops_per_token=flops_per_token(m, cfg.data.seq_len, padded),
                    peak_flops=cluster.peak(p.precision))
