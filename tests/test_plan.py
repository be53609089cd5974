"""The layout planner: cluster descriptions, activation bytes, the step-time model, the search,
and `pretrain-plan`'s fit check and layout search, run in this process.

Its memory predictions are checked against measurements in test_memory.py (one process,
several shapes) and test_parallel_parity.py (every multi-rank layout); its step times
against measured CPU layouts in bench/plan_cpu.py and published runs in
bench/plan_published.py.
"""

import dataclasses

import pytest

from common.typed_config import ConfigError
from conftest import REPO
from pretrain.config import Config, from_dict
from pretrain.planning.activations import ActivationShape, layer_bytes
from pretrain.planning.cluster import CLUSTER_DIR, load_cluster, parse_size
from pretrain.planning.parameters import layout_data_parallel, predict_rank
from pretrain.planning.peak import plan_ranks
from pretrain.planning.search import changes_that_fit, context_sizes, evaluate, layouts, search, why_slower
from pretrain.planning.step_time import Stack, all_to_all, plan_time
from pretrain.tools.plan import cli

GIB = 2**30
LLAMA_70B = {"name": "llama_70b", "num_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
             "num_query_groups": 8, "ffn_hidden_size": 28672, "max_seq_len": 8192, "vocab_size": 128256}
# Llama 3 8B's shape, allowed sequences up to 1M tokens.
LLAMA_8B = {"name": "llama_8b", "num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
            "num_query_groups": 8, "ffn_hidden_size": 14336, "max_seq_len": 2**20, "vocab_size": 128256}


def config(model=None, seq_len=4096, micro_batch=1, global_batch=1024, **parallel) -> Config:
    return from_dict(Config, {"model": model or LLAMA_70B, "data": {"seq_len": seq_len},
                              "parallel": {"precision": "bf16", **parallel},
                              "trainer": {"micro_batch_size": micro_batch, "global_batch_size": global_batch}})


def test_every_cluster_file_loads_and_sizes_parse():
    names = sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))
    assert {"h100_80g", "a100_80g", "a100_40g", "cpu_2core"} <= set(names)
    for name in names:
        cluster = load_cluster(name)
        assert cluster.name == name and cluster.peak("bf16") > 0
    assert load_cluster("h100_80g").memory_bytes == 80 * GIB
    assert (parse_size("80GiB", "k"), parse_size("40 GB", "k"), parse_size("512mib", "k")) == (80 * GIB, 40e9, 2**29)


def test_activation_bytes_follow_the_saved_tensors_of_a_layer():
    m = config().model
    shape = ActivationShape(seq_len=4096, micro_batch=1, micro_batches=8, padded_vocab=128256)
    p = config(tensor=8, sequence_parallel=True).parallel
    t, h, f, kv, tokens = 8, 8192, 28672, 1024, 4096
    # GPU bf16: two norms keep input and output (2 x 2 x 2 bytes), sharded by sequence parallelism;
    # q/k/v, rotated q and k, attention output and SwiGLU's five tensors are sharded by tensor.
    lse = tokens * 64 // t * 4  # the fused attention's fp32 log-sum-exp per head
    expected = tokens * (2 * 2 * 2 * h // t + 2 * (3 * h + 3 * kv) // t + 2 * 5 * f // t) + lse
    assert layer_bytes(m, p, shape, "none") == expected
    assert layer_bytes(m, p, shape, "full") == tokens * h * 2 // t  # the layer's input only
    without_sp = dataclasses.replace(p, sequence_parallel=False)
    assert layer_bytes(m, without_sp, shape, "none") - expected == tokens * 2 * 2 * 2 * h * (t - 1) // t
    documents = dataclasses.replace(shape, documents=True)
    # Attention cut at documents: padded copies of q, k, v and the output, 1.5x on average.
    assert layer_bytes(m, p, documents, "none") == expected + 3 * tokens * (2 * h + 2 * kv) * 2 // (2 * t)


def test_step_time_adds_up_and_its_parts_respond_to_the_layout():
    h100 = load_cluster("h100_80g")
    one_node = plan_time(config(tensor=8, zero_stage=1, global_batch=8), h100, 8)
    step = one_node.step
    assert step.total == pytest.approx(sum(step.parts().values()))
    assert step.pipeline_bubble == step.pipeline_comm == 0 and step.tensor_comm > 0
    # The tensor group fits in the node: NVLink. Spread over nodes it would take the network.
    assert h100.link(8, 1) is h100.intra_node and h100.link(16, 1) is h100.inter_node
    # A pipeline of 4 stages with 8 micro-batches: the bubble is 3 of the 8 + 3 slots.
    piped = plan_time(config(tensor=8, pipeline=4, zero_stage=1, global_batch=8), h100, 32).step
    slot = (piped.compute + piped.recompute + piped.tensor_comm) / 8
    assert piped.pipeline_bubble == pytest.approx(3 * slot + 3 * (piped.overhead - h100.overhead.per_step) / 8)
    # Interleaving (a published stack's) divides the bubble.
    interleaved = plan_time(config(tensor=8, pipeline=4, zero_stage=1, global_batch=8), h100, 32,
                            stack=Stack(virtual_stages=2)).step
    assert interleaved.pipeline_bubble == pytest.approx(piped.pipeline_bubble / 2)
    # Full recomputation costs about one more forward: a third of forward and backward.
    full = plan_time(config(tensor=8, zero_stage=1, global_batch=8, activation_checkpointing="full"), h100, 8).step
    assert full.recompute == pytest.approx((step.compute - 6 * 4096 * 8192 * 128256 / 8 / (9.89e14 * 0.58)) / 3
                                           + step.tensor_comm / 2, rel=0.02)
    # ZeRO-3 moves 1.5x ZeRO-1's bytes per micro-batch, but hides them behind the compute;
    # with 8 micro-batches per step it moves 12x, more than the compute hides.
    zero1 = plan_time(config(tensor=8, zero_stage=1, global_batch=8), h100, 64).step
    zero3 = plan_time(config(tensor=8, zero_stage=3, global_batch=8), h100, 64).step
    assert zero3.data_comm == pytest.approx(1.5 * zero1.data_comm - zero3.compute, rel=1e-3)
    assert zero3.data_comm < zero1.data_comm
    zero3_accumulating = plan_time(config(tensor=8, zero_stage=3, global_batch=64), h100, 64).step
    assert zero3_accumulating.data_comm == pytest.approx(12 * zero1.data_comm - zero3_accumulating.compute, rel=1e-3)


def test_mfu_and_tokens_per_second_follow_from_the_step():
    plan = plan_time(config(tensor=8, pipeline=4, zero_stage=1), load_cluster("h100_80g"), 512)
    assert plan.tokens_per_second == pytest.approx(1024 * 4096 / plan.step.total)
    assert 0.2 < plan.mfu < 0.7
    assert plan.seconds_per_tokens(1e12) == pytest.approx(1e12 / plan.tokens_per_second)


def test_search_ranks_fitting_layouts_and_says_why_each_loses():
    h100 = load_cluster("h100_80g")
    fitting, smallest = search(config(global_batch=512), h100, 512, 80 * GIB)
    assert smallest is None and len(fitting) > 5
    times = [plan.time.step.total for plan in fitting]
    assert times == sorted(times) and all(plan.peak <= 80 * GIB for plan in fitting)
    assert why_slower(fitting[0].time.step, fitting[0].time.step) == "within 1% of the fastest"
    assert "%" in why_slower(fitting[0].time.step, fitting[-1].time.step)
    # Tensor parallelism stays inside a node, ZeRO-2/3 never go with a pipeline.
    assert all(p.cfg.parallel.tensor <= 8 for p in fitting)
    assert not any(p.cfg.parallel.pipeline > 1 and p.cfg.parallel.zero_stage > 1 for p in fitting)


def test_a_layout_that_does_not_fit_gets_the_change_that_makes_it_fit():
    h100 = load_cluster("h100_80g")
    plan = evaluate(config(tensor=8, pipeline=4, zero_stage=1, micro_batch=8), h100, 512)
    assert plan.peak > 80 * GIB
    changes = changes_that_fit(plan, h100, 512, 80 * GIB)
    assert changes and all(changed.peak <= 80 * GIB for _, changed in changes)
    times = [changed.time.step.total for _, changed in changes]
    assert times == sorted(times)
    assert {change.split("=")[0] for change, _ in changes} <= {
        "parallel.activation_checkpointing", "trainer.micro_batch_size", "parallel.zero_stage",
        "parallel.tensor", "parallel.pipeline", "parallel.context", "parallel.sequence_parallel"}


# --- context parallelism (parallel.context): each sequence split over cp ranks ------------------

def test_context_parallelism_splits_each_ranks_activations():
    long = {"seq_len": 32768, "global_batch": 8}
    whole = plan_ranks(config(LLAMA_8B, tensor=8, **long), 8)[0].activations
    halves = plan_ranks(config(LLAMA_8B, tensor=8, context=2, **long), 16)[0].activations
    # Every per-token tensor holds half the tokens; attention keeps the exchanged tensors
    # instead of the projection's, a little more here (keys and values repeated up to cp).
    assert halves.total / whole.total == pytest.approx(0.5, abs=0.01)
    assert halves.per_layer / whole.per_layer == pytest.approx(0.5, abs=0.01)
    # Tensor by tensor, for the slice of T = 32768 / 2 tokens: the norms and SwiGLU as without
    # context parallelism; attention keeps the exchanged q, k, v (the one group per tensor rank
    # repeated to cp = 2), its output and the output exchanged back, and the log-sum-exp.
    m, p = config(LLAMA_8B).model, config(LLAMA_8B, tensor=8, context=2, sequence_parallel=True).parallel
    shape = ActivationShape(seq_len=32768, micro_batch=1, micro_batches=8, padded_vocab=128256, context=2)
    t, h, f, tokens = 8, 4096, 14336, 16384
    kv = 2 * 8 * 128
    lse = tokens * 32 // t * 4
    expected = tokens * (2 * 2 * 2 * h // t + 2 * (h + 2 * kv + 2 * h) // t + 2 * 5 * f // t) + lse
    assert layer_bytes(m, p, shape, "none") == expected
    # Selective recomputation checkpoints the attention inside the exchange: its output and
    # log-sum-exp are not kept.
    assert layer_bytes(m, p, shape, "selective") == expected - lse - tokens * h * 2 // t


def test_context_parallel_ranks_share_zero_partitions_but_not_samples():
    cfg = config(LLAMA_8B, seq_len=32768, global_batch=8, tensor=8, context=2, zero_stage=1)
    assert layout_data_parallel(cfg, 32) == 2  # different samples: 32 / (8 x 2)
    # ZeRO partitions over data x context = 4, as data parallelism alone over 4 would.
    four = plan_ranks(config(LLAMA_8B, seq_len=32768, global_batch=8, tensor=8, zero_stage=1), 32)[0]
    (split,) = plan_ranks(cfg, 32)
    assert split.count == 32 and split.states == four.states
    assert predict_rank(cfg, 32, 0, 128256) == four.states
    with pytest.raises(ConfigError, match="world size 24: expected a multiple of parallel.tensor x "
                                          "parallel.pipeline x parallel.context = 16"):
        layout_data_parallel(cfg, 24)


def test_context_parallel_step_splits_the_work_and_adds_the_all_to_alls():
    h100 = load_cluster("h100_80g")

    def plan(seq_len, context, tensor=4, **parallel):
        cfg = config(LLAMA_8B, seq_len=seq_len, global_batch=8, tensor=tensor, context=context, **parallel)
        return plan_time(cfg, h100, tensor * context)  # one data-parallel replica: 8 micro-batches

    whole, halves = plan(32768, 1), plan(32768, 2)
    assert whole.step.context_comm == 0 < halves.step.context_comm
    # Half the tokens per rank, and attention over the whole sequence for half the heads.
    assert halves.step.compute / whole.step.compute == pytest.approx(0.5, abs=0.01)
    # Per layer and micro-batch, 4 all-to-alls forward and 4 backward, over NVLink (4 x 2 ranks
    # fit in a node): queries and output of T h w / t bytes, keys and values of T kv w / t.
    tokens, w, t = 16384, 2, 4
    exchange = 2 * all_to_all(tokens * 4096 * w / t, 2, h100.intra_node) \
        + 2 * all_to_all(tokens * 8 * 128 * w / t, 2, h100.intra_node)
    assert halves.step.context_comm == pytest.approx(8 * 32 * 2 * exchange)
    # Gradients are averaged over data x context: two ranks here, none without context parallelism.
    assert whole.step.data_comm == 0 < halves.step.data_comm
    # The exchange grows with the sequence (less than twice: the latencies stay); spread over
    # two nodes it takes the network.
    assert 1.5 * halves.step.context_comm < plan(65536, 2).step.context_comm < 2 * halves.step.context_comm
    across = plan(32768, 2, tensor=8)
    assert h100.link(2, 8) is h100.inter_node
    assert across.step.context_comm > 2 * halves.step.context_comm
    # Selective recomputation redoes the attention inside the exchange, not the exchange.
    selective = plan(32768, 2, activation_checkpointing="selective").step
    assert selective.context_comm == halves.step.context_comm
    assert selective.recompute < halves.step.compute / 2
    # Tokens per second and MFU count the whole global batch.
    assert halves.tokens_per_second == pytest.approx(8 * 32768 / halves.step.total)


def test_search_splits_a_sequence_that_does_not_fit_unsplit():
    h100 = load_cluster("h100_80g")
    cfg = config(LLAMA_8B, seq_len=2**20, global_batch=32)  # 1M tokens on 4 nodes
    unsplit = [evaluate(c, h100, 32) for c in layouts(cfg, h100, 32) if c.parallel.context == 1]
    assert unsplit and min(plan.peak for plan in unsplit) > 80 * GIB
    fitting, smallest = search(cfg, h100, 32, 80 * GIB)
    assert fitting and smallest is None and all(plan.cfg.parallel.context > 1 for plan in fitting)
    assert fitting[0].time.step.context_comm > 0
    # A layout one split short of fitting: the change is to split further.
    plan = evaluate(config(LLAMA_8B, seq_len=2**20, global_batch=32, tensor=8, zero_stage=1,
                           activation_checkpointing="full", sequence_parallel=True), h100, 32)
    assert not plan.fits(80 * GIB)
    assert [change for change, _ in changes_that_fit(plan, h100, 32, 80 * GIB)] == ["parallel.context=2"]


def test_search_offers_only_context_sizes_that_split_the_sequence_and_heads():
    h100 = load_cluster("h100_80g")
    # 64 heads and 8 groups: on 8 tensor ranks 8 heads and one group each (repeated up to cp).
    assert context_sizes(config(), 8, 64) == [1, 2, 4, 8]
    assert context_sizes(config(), 1, 64) == [1, 2, 4, 8, 16, 32, 64]
    odd = config(seq_len=4100)  # 4 x 1025
    assert context_sizes(odd, 8, 64) == [1, 2, 4]
    assert {c.parallel.context for c in layouts(odd, h100, 512)} == {1, 2, 4}
    with pytest.raises(ConfigError, match="data.seq_len=4100: expected a multiple of parallel.context=8"):
        config(seq_len=4100, tensor=8, context=8)
    # 3 groups per tensor rank neither divide nor are divided by 2.
    grouped = config({**LLAMA_70B, "hidden_size": 6144, "num_attention_heads": 48, "num_query_groups": 12})
    assert context_sizes(grouped, 4, 64) == [1]


SEVENTY_B = ["model=llama_70b", "model.vocab_size=128256", "parallel.precision=bf16", "data.seq_len=4096",
             "trainer.global_batch_size=1024"]


def test_pretrain_plan_checks_the_fit_and_predicts_the_step_on_a_cluster(capsys):
    cli(["--cluster", "h100_80g", "--nodes", "64", *SEVENTY_B, "parallel.tensor=8", "parallel.pipeline=4",
         "parallel.zero_stage=1", "trainer.micro_batch_size=8"])
    out = capsys.readouterr().out
    print(out)
    assert "llama_70b: 512 ranks = tensor 8 x pipeline 4 x data 16, ZeRO-1, bf16" in out
    assert "does not fit: peak" in out and "smallest change that fits: " in out
    step = next(line for line in out.splitlines() if line.startswith("step "))
    assert "tokens/s" in step and "MFU" in step and "1T tokens in" in step
    cli(["--cluster", "h100_80g", "--nodes", "64", "--device-memory", "80GiB", *SEVENTY_B, "parallel.tensor=8",
         "parallel.pipeline=4", "parallel.zero_stage=1", "trainer.micro_batch_size=1"])
    out = capsys.readouterr().out
    assert "fits: peak" in out and "activations" in out


def test_pretrain_plan_search_prints_the_five_fastest_with_their_memory(capsys):
    cli(["--cluster", "h100_80g", "--nodes", "64", "--search", *SEVENTY_B])
    out = capsys.readouterr().out
    print(out)
    ranked = [line for line in out.splitlines() if line[:2] in ("1.", "2.", "3.", "4.", "5.")]
    assert len(ranked) == 5 and all("parallel.tensor=" in line and "parallel.context=" in line for line in ranked)
    verdicts = [line.rsplit("[", 1)[1] for line in out.splitlines() if line.startswith("   step ")]
    assert verdicts[0] == "fastest]" and all("%" in v or "within 1%" in v for v in verdicts[1:])
    assert out.count("peak ") == 5


def test_pretrain_plan_prints_the_context_split_and_its_all_to_all(capsys):
    cli(["--cluster", "h100_80g", "--nodes", "4", "model=llama_8b", "model.vocab_size=128256",
         "model.max_seq_len=131072", "data.seq_len=131072", "parallel.tensor=8", "parallel.context=4",
         "parallel.precision=bf16", "trainer.micro_batch_size=1", "trainer.global_batch_size=8"])
    out = capsys.readouterr().out
    print(out)
    assert "llama_8b: 32 ranks = tensor 8 x pipeline 1 x context 4 x data 1, ZeRO-0, bf16" in out
    assert "context-parallel all-to-all" in out.splitlines()[-1]


def test_readme_plans_a_70b_run_on_64_nodes():
    readme = (REPO / "README.md").read_text()
    assert "## Plan a run" in readme
    assert "pretrain-plan --cluster h100_80g --nodes 64" in readme and "--search" in readme
