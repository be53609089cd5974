"""Tensor, pipeline and data parallelism give the single-process loss curve (CPU, gloo)."""

import pytest

pytestmark = pytest.mark.skip(reason="layouts being brought to parity")

from distributed import run_distributed
from parity import STEPS, train_layouts

# fp32 reorders sums across ranks only: 1e-5 relative covers it. bf16 rounds
# every matmul to 8 bits of mantissa, and a different split of a sum rounds
# differently; over a few steps losses drift apart by well under 1%.
FP32_RTOL = 1e-5
BF16_RTOL = 1e-2

TWO_RANKS = {
    "tp2": {"tensor": 2},
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


@pytest.fixture(scope="module")
def reference(single_process_groups, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return train_layouts(str(root), {"fp32": {}, "bf16": {"precision": "bf16"}})


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    return run_distributed(train_layouts, 2, str(root), TWO_RANKS)


def assert_close(actual, expected, rtol):
    for step, (a, e) in enumerate(zip(actual, expected, strict=True), start=1):
        assert abs(a - e) <= rtol * abs(e), f"step {step}: {a} vs {e} (rtol {rtol})"


def test_reference_updates_move_the_loss(reference):
    # Parity is only meaningful if the updates change what the model computes.
    losses = reference["fp32"]["losses"]
    assert len(losses) == STEPS and max(losses) - min(losses) > 0.05


@pytest.mark.parametrize("layout", TWO_RANKS)
def test_two_rank_layout_matches_single_process(reference, two_ranks, layout):
    precision = TWO_RANKS[layout].get("precision", "fp32")
    expected = reference[precision]
    rtol = FP32_RTOL if precision == "fp32" else BF16_RTOL
    for rank_result in two_ranks:
        result = rank_result[layout]
        assert_close(result["losses"], expected["losses"], rtol)
        # A fresh engine loaded from the checkpoint takes the same next step.
        assert result["step"] == STEPS
        assert result["resumed"] == pytest.approx(result["continued"], rel=1e-6)


FOUR_RANKS = {
    "tp2_dp2": {"tensor": 2, "zero": 1},
    "tp2_pp2": {"tensor": 2, "pipeline": 2},
    "pp2_dp2": {"pipeline": 2, "zero": 1},
    "tp2_dp2_bf16": {"tensor": 2, "zero": 1, "precision": "bf16"},
    "tp2_pp2_bf16": {"tensor": 2, "pipeline": 2, "zero": 1, "precision": "bf16"},
    "pp2_dp2_bf16": {"pipeline": 2, "zero": 1, "precision": "bf16"},
}


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    return run_distributed(train_layouts, 4, str(root), FOUR_RANKS)


@pytest.mark.parametrize("layout", FOUR_RANKS)
def test_four_rank_layout_matches_single_process(reference, four_ranks, layout):
    precision = FOUR_RANKS[layout].get("precision", "fp32")
    expected = reference[precision]
    rtol = FP32_RTOL if precision == "fp32" else BF16_RTOL
    for rank_result in four_ranks:
        result = rank_result[layout]
        assert_close(result["losses"], expected["losses"], rtol)
        assert result["step"] == STEPS
        assert result["resumed"] == pytest.approx(result["continued"], rel=1e-6)
