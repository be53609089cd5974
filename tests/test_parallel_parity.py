"""Tensor, pipeline and data parallelism give the single-process loss curve (CPU, gloo)."""

import pytest
import torch

from distributed import run_distributed
from parity import STEPS, train_layouts

# fp32 reorders sums across ranks only: 1e-5 relative covers it. bf16 keeps 8
# bits of mantissa, so a different split of a sum (over tensor shards, ranks or
# micro-batches, or ZeRO's bf16 gradient buffers) rounds differently, and the
# differences grow with every update. We allow a layout three times the
# distance that single-process bf16 itself has from fp32 at that step, and never
# less than 1%: the layout's error is then of the size of bf16's own.
FP32_RTOL = 1e-5
BF16_MIN_RTOL = 1e-2


def bf16_tolerances(reference) -> list[float]:
    fp32, bf16 = reference["fp32"]["losses"], reference["bf16"]["losses"]
    return [max(BF16_MIN_RTOL, 3 * abs(b - f) / abs(f)) for f, b in zip(fp32, bf16)]

TWO_RANKS = {
    "tp2": {"tensor": 2},
    # Sequence parallelism runs on CPU through parallel/sequence.py.
    "tp2_sp": {"tensor": 2, "sequence_parallel": True},
    # Activation checkpointing inside pipeline stages, and ZeRO-Offload with DeepSpeed's CPU Adam.
    "pp2_full_checkpointing": {"pipeline": 2, "checkpointing": "full"},
    "dp2_zero1_offload": {"zero": 1, "offload": True},
    "pp2": {"pipeline": 2},
    "dp2_zero0": {"zero": 0},
    "dp2_zero1": {"zero": 1},
    "dp2_zero2": {"zero": 2},
    "dp2_zero3": {"zero": 3},
    "tp2_bf16": {"tensor": 2, "precision": "bf16"},
    "pp2_bf16": {"pipeline": 2, "zero": 1, "precision": "bf16"},
    "dp2_zero1_bf16": {"zero": 1, "precision": "bf16"},
    "dp2_zero3_bf16": {"zero": 3, "precision": "bf16"},
}

# Tied input/output embeddings across the first and last pipeline stage, against the
# one-process tied model (trained by `tied_reference`).
TIED_TWO_RANKS = {"pp2_tied": {"pipeline": 2, "tie": True}}
# The end-of-document options (loss mask, position ids and attention cut at each EOD)
# through the pipeline, against the one-process run with them (`eod_reference`).
EOD_TWO_RANKS = {"pp2_eod": {"pipeline": 2, "eod": True}}
TIED_FOUR_RANKS = {"tp2_pp2_tied": {"tensor": 2, "pipeline": 2, "tie": True}}
# Context parallelism: each sequence split over two ranks (parallel/context.py), alone, with
# the end-of-document options, and composed with TP (two query groups shared by the two
# context ranks of a tensor rank), DP/ZeRO and a pipeline.
CONTEXT_TWO_RANKS = {"cp2": {"context": 2}, "cp2_eod": {"context": 2, "eod": True}}
# Mixture-of-experts layers (pretrain/model/moe.py) under each two-rank layout, against the
# one-process MoE model (`moe_reference`); under TP megatron-core's MoE takes sequence slices.
MOE = {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 64, "shared_expert_ffn_hidden_size": 32,
       "first_dense_layers": 1, "router_z_loss_coeff": 1e-3}
# With parallel.expert=2 each rank holds two of the four experts (parallel/expert.py).
MOE_TWO_RANKS = {
    "moe_dp2_zero1": {"zero": 1, "moe": MOE},
    "moe_pp2": {"pipeline": 2, "moe": MOE},
    "moe_tp2_sp": {"tensor": 2, "sequence_parallel": True, "moe": MOE},
    "moe_pp2_bf16": {"pipeline": 2, "zero": 1, "precision": "bf16", "moe": MOE},
    "moe_ep2": {"expert": 2, "zero": 1, "moe": MOE},
    "moe_ep2_zero2": {"expert": 2, "zero": 2, "moe": MOE},
    "moe_ep2_bf16": {"expert": 2, "zero": 1, "precision": "bf16", "moe": MOE},
}
MOE_FOUR_RANKS = {
    "moe_ep2_dp2": {"expert": 2, "zero": 1, "moe": MOE},
    "moe_ep2_tp2_sp": {"expert": 2, "tensor": 2, "sequence_parallel": True, "zero": 1, "moe": MOE},
    "moe_ep2_pp2": {"expert": 2, "pipeline": 2, "zero": 1, "moe": MOE},
}
CONTEXT_FOUR_RANKS = {
    "cp2_tp2": {"context": 2, "tensor": 2},
    "cp2_dp2_zero1": {"context": 2, "zero": 1},
    "cp2_pp2_eod": {"context": 2, "pipeline": 2, "eod": True},
}

ROOTS = {}
LAYOUTS = {**TWO_RANKS, **TIED_TWO_RANKS, **EOD_TWO_RANKS, **TIED_FOUR_RANKS,
           **CONTEXT_TWO_RANKS, **CONTEXT_FOUR_RANKS, **MOE_TWO_RANKS, **MOE_FOUR_RANKS}  # FOUR_RANKS joins below


@pytest.fixture(scope="module")
def reference(single_process_groups, tmp_path_factory):
    ROOTS["single"] = root = tmp_path_factory.mktemp("single")
    return train_layouts(str(root), SINGLE)


# Besides the fp32 and bf16 references: activation checkpointing must not change
# the losses at all, and ZeRO-1 in one process feeds the memory checks.
SINGLE = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "full_checkpointing": {"checkpointing": "full"},
    "zero1_selective_checkpointing": {"zero": 1, "checkpointing": "selective"},
    "zero1_bf16": {"zero": 1, "precision": "bf16"},
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    ROOTS["two"] = root = tmp_path_factory.mktemp("two")
    return run_distributed(train_layouts, 2, str(root),
                           {**TWO_RANKS, **TIED_TWO_RANKS, **EOD_TWO_RANKS, **CONTEXT_TWO_RANKS, **MOE_TWO_RANKS})


def assert_close(actual, expected, rtols):
    for step, (a, e, rtol) in enumerate(zip(actual, expected, rtols, strict=True), start=1):
        assert abs(a - e) <= rtol * abs(e), f"step {step}: {a} vs {e} (rtol {rtol:.2e})"


def check_layout(reference, results, layout, settings):
    precision = settings.get("precision", "fp32")
    rtols = [FP32_RTOL] * STEPS if precision == "fp32" else bf16_tolerances(reference)
    for rank_result in results:
        result = rank_result[layout]
        assert_close(result["losses"], reference[precision]["losses"], rtols)
        # A fresh engine loaded from the checkpoint takes the same next step.
        assert result["step"] == STEPS
        assert result["resumed"] == pytest.approx(result["continued"], rel=1e-6)


def test_bf16_tolerance_is_stated(reference):
    print("single-process fp32:", reference["fp32"]["losses"])
    print("single-process bf16:", reference["bf16"]["losses"])
    print("bf16 layout tolerances:", bf16_tolerances(reference))
    assert all(t < 0.05 for t in bf16_tolerances(reference))  # bf16 itself stays close to fp32


def test_reference_updates_move_the_loss(reference):
    # Parity is only meaningful if the updates change what the model computes.
    losses = reference["fp32"]["losses"]
    assert len(losses) == STEPS and max(losses) - min(losses) > 0.05


@pytest.mark.parametrize("layout", TWO_RANKS)
@pytest.mark.slow  # the two-rank group (`two_ranks`)
def test_two_rank_layout_matches_single_process(reference, two_ranks, layout):
    check_layout(reference, two_ranks, layout, TWO_RANKS[layout])


FOUR_RANKS = {
    "tp2_dp2": {"tensor": 2, "zero": 1},
    "tp2_pp2": {"tensor": 2, "pipeline": 2},
    "tp2_pp2_sp": {"tensor": 2, "pipeline": 2, "sequence_parallel": True},
    "pp2_dp2": {"pipeline": 2, "zero": 1},
    "tp2_dp2_bf16": {"tensor": 2, "zero": 1, "precision": "bf16"},
    "tp2_pp2_bf16": {"tensor": 2, "pipeline": 2, "zero": 1, "precision": "bf16"},
    "pp2_dp2_bf16": {"pipeline": 2, "zero": 1, "precision": "bf16"},
}
LAYOUTS.update(FOUR_RANKS)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    ROOTS["four"] = root = tmp_path_factory.mktemp("four")
    return run_distributed(train_layouts, 4, str(root),
                           {**FOUR_RANKS, **TIED_FOUR_RANKS, **CONTEXT_FOUR_RANKS, **MOE_FOUR_RANKS})


@pytest.mark.parametrize("layout", FOUR_RANKS)
@pytest.mark.slow  # the four-rank group (`four_ranks`)
def test_four_rank_layout_matches_single_process(reference, four_ranks, layout):
    check_layout(reference, four_ranks, layout, FOUR_RANKS[layout])


def consolidated_loss(run_dir) -> float:
    """Loss on fixed batches of the checkpoint's weights, gathered into one process."""
    from data_pipeline.dataset import fixed_batches
    from parity import PatternTokens
    from pretrain.checkpoint.consolidate import load_checkpoint
    from pretrain.model.llama import LlamaModel, transformer_config

    checkpoint = load_checkpoint(run_dir)
    model = LlamaModel(checkpoint.model, transformer_config(checkpoint.model),
                       checkpoint.model.padded_vocab_size(256))
    model.load_state_dict(checkpoint.state_dict)
    with torch.no_grad():
        batches = fixed_batches(PatternTokens(), 8, 2)
        return sum(model(b["tokens"], b["labels"]).mean().item() for b in batches) / len(batches)


@pytest.mark.parametrize("world,layout", [("two", "tp2"), ("two", "pp2"), ("two", "dp2_zero3"),
                                          ("four", "tp2_pp2")])
@pytest.mark.slow  # the two- and four-rank groups (`two_ranks`, `four_ranks`)
def test_checkpoints_of_every_layout_consolidate_to_the_same_model(reference, two_ranks, four_ranks,
                                                                    world, layout):
    # Adam amplifies rounding-level gradient differences in near-zero moments,
    # so individual weights may differ after a few steps while the function
    # they compute does not: compare what the gathered model computes.
    expected = consolidated_loss(ROOTS["single"] / "fp32")
    assert consolidated_loss(ROOTS[world] / layout) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("layout", [name for name in SINGLE if name not in ("fp32", "bf16")])
def test_single_process_variants_match_the_reference(reference, layout):
    check_layout(reference, [reference], layout, SINGLE[layout])


CHECKPOINTED = [("single", "full_checkpointing", 4), ("single", "zero1_selective_checkpointing", 4),
                ("two", "pp2_full_checkpointing", 2)]


@pytest.mark.parametrize("world,layout,per_rank", CHECKPOINTED)
@pytest.mark.slow  # the two-rank group (`two_ranks`)
def test_activation_checkpointing_wraps_every_layer(reference, two_ranks, world, layout, per_rank):
    # The losses above equal the reference's; this checks the recomputation was really on
    # (4 layers in one process, 2 per pipeline stage).
    results = {"single": [reference], "two": two_ranks}[world]
    assert [r[layout]["checkpointed"] for r in results] == [per_rank] * len(results)
    assert reference["fp32"]["checkpointed"] == 0


# Predicted bytes per rank (parallel/memory_plan.py) against what the engine allocated
# (parallel/memory.py): the total and every category within 5% of the rank's total, and
# parameters and optimizer states, which DeepSpeed allocates exactly, within 5% each.
MEMORY_RTOL = 0.05


def check_memory(result):
    measured, predicted = result["memory"], result["predicted"]
    total = sum(measured.values())
    assert abs(sum(predicted.values()) - total) <= MEMORY_RTOL * total, (measured, predicted)
    for key in measured:
        assert abs(predicted[key] - measured[key]) <= MEMORY_RTOL * total, (key, measured, predicted)
    for key in ("parameters", "optimizer", "offloaded"):
        assert abs(predicted[key] - measured[key]) <= MEMORY_RTOL * measured[key], (key, measured, predicted)


@pytest.mark.parametrize("world,layout", [("single", name) for name in SINGLE]
                         + [("two", name) for name in TWO_RANKS] + [("four", name) for name in FOUR_RANKS])
@pytest.mark.slow  # the two- and four-rank groups (`two_ranks`, `four_ranks`)
def test_memory_plan_predicts_what_each_rank_allocates(reference, two_ranks, four_ranks, world, layout):
    results = {"single": [reference], "two": two_ranks, "four": four_ranks}[world]
    for rank_result in results:
        check_memory(rank_result[layout])
    if layout == "dp2_zero1_offload":  # the optimizer states moved to host memory
        assert all(r[layout]["memory"]["optimizer"] == 0 < r[layout]["memory"]["offloaded"] for r in results)


# The predicted peak of a step (pretrain/planning/peak.py: states plus activations) against
# a tensor-lifetime trace of the second step on each rank (parallel.memory.PeakTrace).
# ZeRO-1/2 allocate DeepSpeed's reduction bucket (2 GB here) for the backward pass: the
# rest of the peak is compared on its own too. The model here is tiny: weights and
# activations are of a size; test_memory.py checks shapes where activations dominate.
PEAK_RTOL = 0.10
PIPELINE_PEAK_RTOL = 0.15
PIPELINE_REDUCE_RTOL = 0.30


@pytest.mark.parametrize("world,layout", [("two", name) for name in {**TWO_RANKS, **CONTEXT_TWO_RANKS}]
                         + [("four", name) for name in {**FOUR_RANKS, **CONTEXT_FOUR_RANKS}])
@pytest.mark.slow  # the two- and four-rank groups (`two_ranks`, `four_ranks`)
def test_planner_predicts_each_ranks_peak(two_ranks, four_ranks, world, layout):
    from parallel.memory_plan import DTYPE_BYTES, REDUCE_BUCKET_SIZE
    from parity import layout_config

    cfg = layout_config(ROOTS[world], **LAYOUTS[layout])
    p = cfg.parallel
    buckets = (2 if p.pipeline > 1 else 1) * REDUCE_BUCKET_SIZE * DTYPE_BYTES[p.precision] \
        if p.zero_stage in (1, 2) else 0  # the pipeline engine reduces into a second one
    for result in {"two": two_ranks, "four": four_ranks}[world]:
        peak = result[layout]["peak"]
        measured, predicted = peak["measured"], peak["predicted"]
        # The last pipeline stage's extra while the engine reduces (below) reaches 10% of this tiny
        # model's whole peak on some runs (TP2 x PP2: -9.2% to -10.2%).
        total_rtol = PIPELINE_PEAK_RTOL if p.pipeline > 1 else PEAK_RTOL
        assert abs(predicted - measured) <= total_rtol * measured, (measured, predicted)
        if buckets:
            assert measured > buckets
            # Under a pipeline the last stage holds 0.1-0.4 MB more while the engine reduces,
            # varying from run to run (10-24% of the tiny model's rest): not modelled.
            rtol = PIPELINE_REDUCE_RTOL if p.pipeline > 1 else PEAK_RTOL
            assert abs(predicted - measured) <= rtol * (measured - buckets), (measured, predicted)


# --- tied embeddings under pipeline parallelism ------------------------------------------------

TIED_LAYOUTS = [("two", name) for name in TIED_TWO_RANKS] + [("four", name) for name in TIED_FOUR_RANKS]


@pytest.fixture(scope="module")
def tied_reference(single_process_groups, tmp_path_factory):
    ROOTS["single_tied"] = root = tmp_path_factory.mktemp("single_tied")
    return train_layouts(str(root), {"tied": {"tie": True}})["tied"]


def tied_results(two_ranks, four_ranks, world, layout) -> list[dict]:
    return [r[layout] for r in {"two": two_ranks, "four": four_ranks}[world]]


@pytest.mark.parametrize("world,layout", TIED_LAYOUTS)
@pytest.mark.slow  # the two- and four-rank groups (`two_ranks`, `four_ranks`)
def test_tied_pipeline_layout_matches_the_single_process_tied_model(tied_reference, two_ranks, four_ranks,
                                                                    world, layout):
    for result in tied_results(two_ranks, four_ranks, world, layout):
        assert_close(result["losses"], tied_reference["losses"], [FP32_RTOL] * STEPS)
        # A fresh engine loaded from the checkpoint takes the same next step.
        assert result["step"] == STEPS
        assert result["resumed"] == pytest.approx(result["continued"], rel=1e-6)
        check_memory(result)


def test_tying_changes_the_model(reference, tied_reference):
    # Otherwise the tied parity above would not tell the two layouts apart.
    assert abs(tied_reference["losses"][-1] - reference["fp32"]["losses"][-1]) > 1e-3


@pytest.mark.parametrize("world,layout", TIED_LAYOUTS)
@pytest.mark.slow  # the two- and four-rank groups (`two_ranks`, `four_ranks`)
def test_tied_embedding_is_the_same_on_first_and_last_stage(two_ranks, four_ranks, world, layout):
    import numpy as np

    results = tied_results(two_ranks, four_ranks, world, layout)
    stages = {pp for pp, _ in (r["coords"] for r in results)}
    assert stages == {0, 1}
    for key in ("tied_weight", "restored_tied_weight"):  # after training, and after loading
        first = {r["coords"][1]: r[key] for r in results if r["coords"][0] == 0}
        for result in results:
            pp, tp = result["coords"]
            assert result[key] is not None
            assert np.array_equal(result[key], first[tp]), (key, pp, tp)


@pytest.mark.parametrize("world,layout", TIED_LAYOUTS)
@pytest.mark.slow  # the two- and four-rank groups (`two_ranks`, `four_ranks`)
def test_tied_pipeline_checkpoint_consolidates_to_the_single_process_model(tied_reference, two_ranks,
                                                                          four_ranks, world, layout):
    from pretrain.checkpoint.consolidate import load_checkpoint

    names = set(load_checkpoint(ROOTS[world] / layout).state_dict)
    assert "embedding.weight" in names and "output_layer.weight" not in names
    assert names == set(load_checkpoint(ROOTS["single_tied"] / "tied").state_dict)
    expected = consolidated_loss(ROOTS["single_tied"] / "tied")
    assert consolidated_loss(ROOTS[world] / layout) == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow  # the two-rank group (`two_ranks`)
def test_tied_pipeline_checkpoint_resumes_in_one_process(tied_reference, two_ranks, tmp_path):
    # Resharded from PP=2 to one process: the next step equals the one the PP=2 run took.
    from parity import resumed_step
    from pretrain.checkpoint import files as checkpoint

    source = ROOTS["two"] / "pp2_tied"
    loss = resumed_step(str(tmp_path / "resumed"), str(checkpoint.latest_checkpoint(str(source))), tie=True)
    for result in tied_results(two_ranks, None, "two", "pp2_tied"):
        assert loss == pytest.approx(result["continued"], rel=FP32_RTOL)


@pytest.fixture(scope="module")
def eod_reference(single_process_groups, tmp_path_factory):
    return train_layouts(str(tmp_path_factory.mktemp("single_eod")), {"eod": {"eod": True}})["eod"]


@pytest.mark.parametrize("layout", EOD_TWO_RANKS)
@pytest.mark.slow  # the two-rank group (`two_ranks`)
def test_pipeline_with_end_of_document_options_matches_single_process(eod_reference, two_ranks, layout):
    # Had a stage dropped the position ids or the attention mask, or the loss its mask, the
    # losses would part from the one-process run's, which applies all three.
    for result in (r[layout] for r in two_ranks):
        assert_close(result["losses"], eod_reference["losses"], [FP32_RTOL] * STEPS)
        assert result["step"] == STEPS
        assert result["resumed"] == pytest.approx(result["continued"], rel=1e-6)


def context_results(two_ranks, four_ranks, layout) -> list[dict]:
    return [r[layout] for r in (two_ranks if layout in CONTEXT_TWO_RANKS else four_ranks)]


@pytest.mark.parametrize("layout", {**CONTEXT_TWO_RANKS, **CONTEXT_FOUR_RANKS})
@pytest.mark.slow  # the two- and four-rank groups (`two_ranks`, `four_ranks`)
def test_context_parallel_layout_matches_single_process(reference, eod_reference, two_ranks, four_ranks, layout):
    """Each rank trains on its slice of every sequence; the losses are the one-process run's
    (with the end-of-document options: its run with them), and a fresh engine loaded from
    the checkpoint takes the same next step bit for bit."""
    settings = {**CONTEXT_TWO_RANKS, **CONTEXT_FOUR_RANKS}[layout]
    expected = eod_reference if settings.get("eod") else reference["fp32"]
    for result in context_results(two_ranks, four_ranks, layout):
        assert_close(result["losses"], expected["losses"], [FP32_RTOL] * STEPS)
        assert result["step"] == STEPS
        assert result["resumed"] == result["continued"]


@pytest.fixture(scope="module")
def moe_reference(single_process_groups, tmp_path_factory):
    ROOTS["single_moe"] = root = tmp_path_factory.mktemp("single_moe")
    return train_layouts(str(root), {"fp32": {"moe": MOE}, "bf16": {"moe": MOE, "precision": "bf16"}})


MOE_LAYOUTS = [("two", name) for name in MOE_TWO_RANKS] + [("four", name) for name in MOE_FOUR_RANKS]


@pytest.mark.parametrize("world,layout", MOE_LAYOUTS)
@pytest.mark.slow  # the two- and four-rank groups (`two_ranks`, `four_ranks`)
def test_moe_layout_matches_single_process(moe_reference, reference, two_ranks, four_ranks, world, layout):
    """fp32 within 1e-5 of the one-process MoE run; bf16 within the bound `bf16_tolerances`
    states (three times one-process bf16's own distance from fp32, at least 1%)."""
    assert moe_reference["fp32"]["losses"] != reference["fp32"]["losses"]  # the experts are in it
    precision = LAYOUTS[layout].get("precision", "fp32")
    rtols = [FP32_RTOL] * STEPS if precision == "fp32" else bf16_tolerances(moe_reference)
    for result in (r[layout] for r in {"two": two_ranks, "four": four_ranks}[world]):
        assert_close(result["losses"], moe_reference[precision]["losses"], rtols)
        assert result["step"] == STEPS
        assert result["resumed"] == result["continued"]


# Adam turns rounding-level differences in near-zero moments into differences of up to
# about 2e-4 in single weights after five steps (TP2); an expert in the wrong place, or
# not trained, differs by the size of the weights themselves (init std 0.02).
EXPERT_ATOL = 1e-3


@pytest.mark.parametrize("world,layout", [(w, n) for w, n in MOE_LAYOUTS if "expert" in LAYOUTS[n]
                                          and LAYOUTS[n].get("precision", "fp32") == "fp32"])
@pytest.mark.slow  # the two- and four-rank groups (`two_ranks`, `four_ranks`)
def test_expert_parallel_checkpoints_gather_the_one_process_experts(moe_reference, two_ranks, four_ranks,
                                                                    world, layout):
    """Every expert, gathered from each expert-parallel rank's checkpoint file (and tensor
    shards), is the one-process run's expert after training."""
    from pretrain.checkpoint.consolidate import load_checkpoint

    expected = load_checkpoint(ROOTS["single_moe"] / "fp32").state_dict
    gathered = load_checkpoint(ROOTS[world] / layout).state_dict
    experts = sorted(n for n in expected if ".local_experts." in n and n.endswith("weight"))
    assert len(experts) == 3 * 2 * MOE["num_experts"]  # three MoE layers, fc1 and fc2 of each expert
    assert set(gathered) == set(expected)
    for name in experts:
        torch.testing.assert_close(gathered[name], expected[name], atol=EXPERT_ATOL, rtol=0, msg=name)
