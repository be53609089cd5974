"""Resuming a checkpoint under another parallel layout continues the same run (CPU, gloo).

Source runs train 5 steps uninterrupted, checkpointing at step 3, under DP=2
(ZeRO-1: the Adam moments are split over the data-parallel ranks), DP=2 bf16
(ZeRO-1), TP=2 and CP=2 (ZeRO-1). Each step-3 checkpoint is then resumed under
other layouts (one process, DP=4, TP=2 -> DP=2 ZeRO-2, CP=2 <-> DP=2), and
steps 4 and 5 must reproduce
the uninterrupted run's losses: within 1e-5 relative in fp32, where only the
order of sums differs, and within 1e-2 in bf16, whose 8-bit mantissa rounds
differently when a sum is split differently (see test_parallel_parity.py).
The loader keeps a global sample count, so step 4 must draw exactly global
samples 24..31 whatever the data-parallel size.
"""

from pathlib import Path

import pytest

from distributed import run_distributed
from parity import VOCAB, LossRecorder, PatternTokens, layout_config

STEPS, SAVED_AT, GLOBAL_BATCH = 5, 3, 8
FP32_RTOL, BF16_RTOL = 1e-5, 1e-2

SOURCES = {
    "dp2_zero1": {"zero": 1},
    "dp2_zero1_bf16": {"zero": 1, "precision": "bf16"},
    "tp2": {"tensor": 2},
    # Context parallelism: DeepSpeed's data-parallel group is the two context ranks, so
    # ZeRO-1 splits the Adam moments over them.
    "cp2_zero1": {"context": 2, "zero": 1},
}


pytestmark = pytest.mark.slow  # every test reads the checkpoints of two- and four-rank groups


class RecordingTokens(PatternTokens):
    """Synthetic samples that remember which global sample indices were drawn."""

    def __init__(self):
        self.drawn = []

    def __getitem__(self, index):
        self.drawn.append(int(index))
        return super().__getitem__(index)


def _trainer(run_dir, layout, train):
    import torch

    from parallel.groups import init_layout_groups
    from data_pipeline.training_data import TrainingData
    from pretrain.training.build import build_trainer

    cfg = layout_config(Path(run_dir), **layout)
    cfg.trainer.train_steps = STEPS
    cfg.trainer.checkpoint_interval = SAVED_AT
    topology = init_layout_groups(cfg.parallel, torch.device("cpu"))
    cfg.validate_world(topology.world_size)
    trainer = build_trainer(cfg, topology, TrainingData(train=train, valid=PatternTokens(), vocab_size=VOCAB))
    recorder = LossRecorder()
    trainer.callbacks.append(recorder)
    return trainer, recorder


def train_sources(root: str, sources: dict) -> dict:
    """Uninterrupted runs (losses of every step); each leaves a checkpoint at SAVED_AT."""
    results = {}
    for name, layout in sources.items():
        trainer, recorder = _trainer(Path(root) / name, layout, PatternTokens())
        trainer.fit()
        results[name] = recorder.losses
    return results


def resume(root: str, plans: dict) -> dict:
    """Resumes source checkpoints under new layouts: {plan: (source, layout)} -> next losses."""
    from pretrain.checkpoint import files as checkpoint

    results = {}
    for plan, (source, layout) in plans.items():
        train = RecordingTokens()
        trainer, recorder = _trainer(Path(root) / "resumed" / plan, layout, train)
        source_dir = Path(root) / source / checkpoint.CHECKPOINTS / checkpoint.tag_for(SAVED_AT)
        trainer.load_checkpoint(source_dir)
        resumed_at = trainer.state.step
        micro_batches = GLOBAL_BATCH // (trainer.cfg.trainer.micro_batch_size * trainer.topology.data)
        trainer.fit()
        first_step = train.drawn[:micro_batches * trainer.cfg.trainer.micro_batch_size]
        results[plan] = {"losses": recorder.losses, "resumed_at": resumed_at, "first_step": first_step,
                         "lr": trainer.engine.lr()}
    return results


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    # The TP=2 checkpoint also resumes as DP=2 with ZeRO-2 in the same two processes.
    runs = run_distributed(_two_rank_group, 2, str(root))
    return root, runs[0]


def _two_rank_group(root: str) -> dict:
    losses = train_sources(root, SOURCES)
    resumed = resume(root, {"tp2_to_dp2_zero2": ("tp2", {"zero": 2}),
                            "cp2_to_dp2": ("cp2_zero1", {"zero": 1}),
                            "dp2_to_cp2": ("dp2_zero1", {"context": 2, "zero": 1})})
    return {"losses": losses, "resumed": resumed}


@pytest.fixture(scope="module")
def one_process(sources, single_process_groups):
    root, _ = sources
    return resume(str(root), {
        "dp2_zero1_to_dp1": ("dp2_zero1", {"zero": 1}),
        "dp2_zero1_to_dp1_zero0": ("dp2_zero1", {}),
        "dp2_zero1_bf16_to_dp1": ("dp2_zero1_bf16", {"zero": 1, "precision": "bf16"}),
        "tp2_to_tp1": ("tp2", {}),
        "cp2_to_cp1": ("cp2_zero1", {"zero": 1}),
    })


@pytest.fixture(scope="module")
def four_ranks(sources):
    root, _ = sources
    plans = {"dp2_zero1_to_dp4": ("dp2_zero1", {"zero": 1}),
             "dp2_zero1_bf16_to_dp4": ("dp2_zero1_bf16", {"zero": 1, "precision": "bf16"})}
    return run_distributed(resume, 4, str(root), plans)


def check(uninterrupted: list[float], resumed: dict, rtol: float) -> None:
    assert resumed["resumed_at"] == SAVED_AT
    expected = uninterrupted[SAVED_AT:]
    assert len(resumed["losses"]) == len(expected) == STEPS - SAVED_AT
    for step, (a, e) in enumerate(zip(resumed["losses"], expected), start=SAVED_AT + 1):
        assert abs(a - e) <= rtol * abs(e), f"step {step}: resumed {a} vs uninterrupted {e} (rtol {rtol})"


def check_samples(per_rank: list[dict], plan: str) -> None:
    """Step 4 draws global samples 24..31 once each, split over the ranks of the new layout."""
    drawn = [i for rank in per_rank for i in rank[plan]["first_step"]]
    assert sorted(drawn) == list(range(SAVED_AT * GLOBAL_BATCH, (SAVED_AT + 1) * GLOBAL_BATCH))


def test_uninterrupted_runs_learn(sources):
    _, runs = sources
    for name, losses in runs["losses"].items():
        assert len(losses) == STEPS and losses[-1] < losses[0] - 0.02, name  # the updates move the loss


@pytest.mark.parametrize("plan,source,rtol", [
    ("dp2_zero1_to_dp1", "dp2_zero1", FP32_RTOL),
    ("dp2_zero1_to_dp1_zero0", "dp2_zero1", FP32_RTOL),
    ("dp2_zero1_bf16_to_dp1", "dp2_zero1_bf16", BF16_RTOL),
    ("tp2_to_tp1", "tp2", FP32_RTOL),
    ("cp2_to_cp1", "cp2_zero1", FP32_RTOL),
])
def test_resume_in_one_process(sources, one_process, plan, source, rtol):
    check(sources[1]["losses"][source], one_process[plan], rtol)
    check_samples([one_process], plan)


@pytest.mark.parametrize("plan,source,rtol", [
    ("dp2_zero1_to_dp4", "dp2_zero1", FP32_RTOL),
    ("dp2_zero1_bf16_to_dp4", "dp2_zero1_bf16", BF16_RTOL),
])
def test_resume_on_four_data_parallel_ranks(sources, four_ranks, plan, source, rtol):
    for rank in four_ranks:
        check(sources[1]["losses"][source], rank[plan], rtol)
    check_samples(four_ranks, plan)


def test_tensor_parallel_checkpoint_resumes_as_zero2(sources):
    _, runs = sources
    check(runs["losses"]["tp2"], runs["resumed"]["tp2_to_dp2_zero2"], FP32_RTOL)


def test_context_parallel_size_changes_on_resume(sources):
    """CP=2 -> DP=2 and DP=2 -> CP=2 on the same two ranks continue the run. Under CP=2 both
    ranks read every sample of the step (each takes its slice), so rank 0 drew them all."""
    _, runs = sources
    check(runs["losses"]["cp2_zero1"], runs["resumed"]["cp2_to_dp2"], FP32_RTOL)
    check(runs["losses"]["dp2_zero1"], runs["resumed"]["dp2_to_cp2"], FP32_RTOL)
    check_samples([runs["resumed"]], "dp2_to_cp2")
    # The same global batch split by sequence or by sample is the same step.
    assert runs["losses"]["cp2_zero1"] == pytest.approx(runs["losses"]["dp2_zero1"], rel=FP32_RTOL)


def test_moments_matter(sources, single_process_groups, tmp_path):
    """Weights alone are not a resume: with fresh Adam moments step 4 differs."""
    import torch

    from pretrain.checkpoint import files as checkpoint, reshard

    root, runs = sources
    source = Path(root) / "dp2_zero1" / checkpoint.CHECKPOINTS / checkpoint.tag_for(SAVED_AT)
    state = reshard.read_training_state(source, num_layers=4)
    assert state.step == SAVED_AT
    assert all(torch.count_nonzero(m) > 0 for m in state.moments["exp_avg_sq"].values())
    trainer, recorder = _trainer(tmp_path / "fresh_moments", {"zero": 1}, PatternTokens())
    trainer.load_checkpoint(source)
    for key in reshard.MOMENTS:
        for m in state.moments[key].values():
            m.zero_()
    from parallel.engine_state import canonical_parameters, write_state

    write_state(trainer.engine.deepspeed, canonical_parameters(trainer.engine.module, 4), state.weights.__getitem__,
                lambda name, key: state.moments[key][name], 0, 0, 1)
    trainer.fit()
    # Step 4's loss comes before its update; step 5's shows the update's moments.
    assert recorder.losses[0] == pytest.approx(runs["losses"]["dp2_zero1"][SAVED_AT], rel=FP32_RTOL)
    assert abs(recorder.losses[1] - runs["losses"]["dp2_zero1"][SAVED_AT + 1]) > 1e-4


def test_unsupported_source_is_one_line(sources, single_process_groups, tmp_path):
    import shutil

    from pretrain.checkpoint import files as checkpoint, reshard

    root, _ = sources
    source = Path(root) / "dp2_zero1" / checkpoint.CHECKPOINTS / checkpoint.tag_for(SAVED_AT)
    broken = tmp_path / "step_0000003"
    shutil.copytree(source, broken)
    next(broken.glob("zero_pp_rank_1_*optim_states.pt")).unlink()
    with pytest.raises(Exception) as err:
        reshard.read_training_state(broken, num_layers=4)
    message = str(err.value)
    assert "\n" not in message and "data-parallel rank 1" in message and str(broken) in message
