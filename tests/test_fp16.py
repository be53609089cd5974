"""fp16 mixed precision with dynamic loss scaling, through the real DeepSpeed engine on CPU (gloo).

What is lifted, and why that is sound. DeepSpeed's CPU accelerator answers
`is_fp16_supported()` with `torch.ops.mkldnn._is_mkldnn_fp16_supported()`,
which is true only on CPUs with AVX512-FP16 or AMX: it says whether oneDNN has
fast half-precision kernels, not whether fp16 computes correctly. torch runs
fp16 matmuls on any CPU (more slowly). With the flag false, DeepSpeed's engine
refuses fp16 (`_do_sanity_check` in deepspeed/runtime/engine.py), and so does
`parallel.engine.check_precision_supported`, for users; the accelerator's
`supported_dtypes()`, which lists the gradient dtypes DeepSpeed buckets for
its all-reduces, is derived from the same flag. `lift_fp16_capability` makes
the CPU accelerator object report fp16 support, inside the spawned test
processes only (the pytest process keeps the refusal that
tests/test_memory.py checks). Everything else is DeepSpeed's own code on real
fp16 tensors: its ZeRO fp16 optimizer and pipeline engine, its dynamic loss
scaler, overflow detection and skipping, gradient clipping and checkpoints.

fp16 runs only under ZeRO stage >= 1: DeepSpeed's engine multiplies the loss by
the loss scale in backward for its ZeRO optimizers only, while its ZeRO-0 fp16
optimizers still divide the gradients by the scale, so updates shrink by it and
clipping never acts; the product refuses that combination with one line.
"""

import dataclasses
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from parity import STEPS, layout_config, train_layouts, trainer_for

SINGLE = {"fp32": {}, "fp16": {"zero": 1, "precision": "fp16"},
          "fp16_zero2": {"zero": 2, "precision": "fp16"}, "fp16_zero3": {"zero": 3, "precision": "fp16"}}
TWO_RANKS = {"tp2": {"tensor": 2, "zero": 1}, "pp2": {"pipeline": 2, "zero": 1}, "dp2_zero1": {"zero": 1},
             "dp2_zero2": {"zero": 2}}
TWO_RANKS = {name: {**layout, "precision": "fp16"} for name, layout in TWO_RANKS.items()}

# A first loss scale of 2**32 overflows fp16 gradients for about ten steps; each
# overflow halves it (hysteresis 1); after 4 clean steps it doubles again.
OVERFLOW = {"fp16_initial_scale_power": 32, "fp16_hysteresis": 1, "fp16_loss_scale_window": 4}
OVERFLOW_STEPS = 24
# The checkpoint is written while the scale is still falling (hysteresis spent, scale
# halved twice): a loader that lost the scaler state would start again at 2**24.
RESUME = {"fp16_initial_scale_power": 24, "fp16_hysteresis": 2, "fp16_loss_scale_window": 3}
RESUME_STEPS, SAVE_AT = 14, 3

# fp16 keeps a 10-bit mantissa (relative rounding 2**-11): a layout that splits a sum
# differently (over tensor shards, ranks, micro-batches or ZeRO partitions) rounds it
# differently, and updates amplify that. As for bf16 in test_parallel_parity.py, a layout
# may differ from the one-process fp16 run by three times the distance fp16 itself has
# from fp32 at that step, and never less than 2**-10 (two fp16 roundings of the loss).
FP16_MIN_RTOL = 2.0**-10


def lift_fp16_capability() -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    assert accelerator.device_name() == "cpu"
    accelerator.is_fp16_supported = lambda: True  # this object only; supported_dtypes() follows
    assert torch.float16 in accelerator.supported_dtypes()


def fp16_trainer(run_dir: Path, layout: dict, scaling: dict, **trainer_keys):
    cfg = layout_config(run_dir, precision="fp16", **layout)
    cfg.parallel = dataclasses.replace(cfg.parallel, **scaling)  # validated again
    for key, value in {"eval_interval": 0, **trainer_keys}.items():
        setattr(cfg.trainer, key, value)
    return trainer_for(cfg)


class StepRecord:
    """Per step: the logged metrics, whether any of this rank's weights changed, and the
    sum of squares of the gradients DeepSpeed handed to the torch optimizer on this rank."""

    def __init__(self, trainer):
        self.steps, self.squares = [], 0.0
        self.before = self.weights(trainer)
        inner = trainer.engine.deepspeed.optimizer.optimizer  # torch's AdamW inside DeepSpeed's ZeRO optimizer
        step = inner.step

        def observed_step(*args, **kwargs):  # called once per parameter group
            self.squares += sum(float(p.grad.double().square().sum()) for group in inner.param_groups
                                for p in group["params"] if p.grad is not None)
            return step(*args, **kwargs)

        inner.step = observed_step

    @staticmethod
    def weights(trainer):
        return [p.detach().clone() for p in trainer.engine.module.parameters()]

    def on_train_start(self, trainer): ...

    def on_step_end(self, trainer, metrics):
        after = self.weights(trainer)
        changed = any(not torch.equal(a, b) for a, b in zip(self.before, after, strict=True))
        self.steps.append({**{k: metrics.get(k) for k in ("loss", "grad_norm", "loss_scale", "skipped_steps")},
                           "weights_changed": changed, "update_grad_squares": self.squares})
        self.before, self.squares = after, 0.0

    def on_train_end(self, trainer): ...


def train(trainer, steps: int) -> StepRecord:
    record = StepRecord(trainer)
    trainer.callbacks.insert(0, record)
    trainer.cfg.trainer.train_steps = steps
    trainer.fit()
    return record


def overflow_run(run_dir: Path, layout: dict) -> dict:
    trainer = fp16_trainer(run_dir, layout, OVERFLOW)
    start = trainer.evaluate()
    record = train(trainer, OVERFLOW_STEPS)
    return {"steps": record.steps, "valid_start": start, "valid_end": trainer.evaluate(),
            "clip": trainer.cfg.optim.grad_clip, "run_dir": str(run_dir)}


def resume_run(root: Path, layout: dict) -> dict:
    """RESUME_STEPS straight, and SAVE_AT steps + checkpoint + a fresh engine loaded from it."""
    from pretrain.checkpoint import files as checkpoint

    straight = fp16_trainer(root / "straight", layout, RESUME)
    straight_steps = train(straight, RESUME_STEPS).steps
    train(fp16_trainer(root / "resumed", layout, RESUME), SAVE_AT)  # saves at its last step
    resumed = fp16_trainer(root / "resumed", layout, RESUME)
    fresh_scale = resumed.engine.deepspeed.optimizer.loss_scale
    resumed.load_checkpoint(checkpoint.latest_checkpoint(root / "resumed"))
    restored_scale = resumed.engine.deepspeed.optimizer.loss_scale
    resumed_steps = train(resumed, RESUME_STEPS).steps
    same_weights = all(torch.equal(a, b) for a, b in zip(StepRecord.weights(straight),
                                                         StepRecord.weights(resumed), strict=True))
    return {"straight": straight_steps, "resumed": resumed_steps, "fresh_scale": fresh_scale,
            "restored_scale": restored_scale, "same_weights": same_weights}


def one_process(root: str) -> dict:
    lift_fp16_capability()
    root = Path(root)
    return {"parity": train_layouts(str(root / "parity"), SINGLE),
            "overflow": overflow_run(root / "overflow", {"zero": 1}),
            "resume": resume_run(root / "resume", {"zero": 1})}


def two_processes(root: str) -> dict:
    lift_fp16_capability()
    root = Path(root)
    return {"parity": train_layouts(str(root / "parity"), TWO_RANKS),
            "overflow": overflow_run(root / "overflow", {"pipeline": 2, "zero": 1}),
            "resume": resume_run(root / "resume", {"pipeline": 2, "zero": 1})}


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> dict[str, list[dict]]:
    """Each rank's results of the one- and the two-process group, run side by side: the
    one-process group alone would leave a second core idle."""
    with ThreadPoolExecutor(1) as pool:
        two = pool.submit(run_distributed, two_processes, 2, str(tmp_path_factory.mktemp("two")))
        single = run_distributed(one_process, 1, str(tmp_path_factory.mktemp("single")))
        return {"single": single, "two": two.result()}


@pytest.fixture(scope="module")
def single(groups) -> dict:
    return groups["single"][0]


def scales(steps: list[dict]) -> list[float]:
    return [s["loss_scale"] for s in steps]


def fp16_tolerances(parity) -> list[float]:
    fp32, fp16 = parity["fp32"]["losses"], parity["fp16"]["losses"]
    return [max(FP16_MIN_RTOL, 3 * abs(h - f) / abs(f)) for f, h in zip(fp32, fp16, strict=True)]


@pytest.mark.slow  # the one- and two-process groups of the `groups` fixture
def test_fp16_stays_close_to_fp32_and_learns(single):
    parity = single["parity"]
    print("one-process fp32:", parity["fp32"]["losses"])
    print("one-process fp16:", parity["fp16"]["losses"])
    print("fp16 layout tolerances:", fp16_tolerances(parity))
    assert all(t < 1e-2 for t in fp16_tolerances(parity))  # fp16 itself stays within 0.33% of fp32
    losses = parity["fp16"]["losses"]
    assert len(losses) == STEPS and max(losses) - min(losses) > 0.05  # the updates move the loss


@pytest.mark.parametrize("world,layout", [("single", "fp16_zero2"), ("single", "fp16_zero3")]
                         + [("two", name) for name in TWO_RANKS])
@pytest.mark.slow  # the one- and two-process groups of the `groups` fixture
def test_layout_matches_the_one_process_fp16_run(groups, single, world, layout):
    reference, rtols = single["parity"]["fp16"]["losses"], fp16_tolerances(single["parity"])
    for rank_result in groups[world]:
        result = rank_result["parity"][layout]
        for step, (a, e, rtol) in enumerate(zip(result["losses"], reference, rtols, strict=True), start=1):
            assert abs(a - e) <= rtol * abs(e), f"step {step}: {a} vs {e} (rtol {rtol:.2e})"
        # A fresh engine loaded from the layout's checkpoint takes the same next step.
        assert result["step"] == STEPS
        assert result["resumed"] == pytest.approx(result["continued"], rel=1e-6)


@pytest.mark.parametrize("world", ["single", "two"])
@pytest.mark.slow  # the one- and two-process groups of the `groups` fixture
def test_overflowing_steps_are_skipped_and_the_scale_halves(groups, world):
    runs = [r["overflow"] for r in groups[world]]
    # Pipeline stages hold disjoint parameters: the update's norm adds over them.
    update_norms = [math.sqrt(sum(squares)) for squares in
                    zip(*([s["update_grad_squares"] for s in run["steps"]] for run in runs))]
    print("loss scale per step:", scales(runs[0]["steps"]))
    print("validation loss before and after:", runs[0]["valid_start"], runs[0]["valid_end"])
    for run in runs:
        steps, scale, skipped = run["steps"], 2.0**OVERFLOW["fp16_initial_scale_power"], 0
        clean_in_a_row = 0
        for n, (step, update_norm) in enumerate(zip(steps, update_norms, strict=True), start=1):
            overflow = not math.isfinite(step["grad_norm"])
            skipped += overflow
            assert step["skipped_steps"] == skipped, f"step {n}"
            # A skipped step changes no weight; every other step does.
            assert step["weights_changed"] == (not overflow), f"step {n}"
            clean_in_a_row = 0 if overflow else clean_in_a_row + 1
            # DeepSpeed doubles the scale after `window` clean steps that follow a clean one.
            grows = clean_in_a_row > 1 and (clean_in_a_row - 1) % OVERFLOW["fp16_loss_scale_window"] == 0
            scale = scale / 2 if overflow else scale * 2 if grows else scale
            assert step["loss_scale"] == scale, f"step {n}"
            # The optimizer got the gradients unscaled, and clipped to optim.grad_clip. Not
            # checked on a step that doubles the scale: DeepSpeed's ZeRO optimizer updates the
            # scale before it unscales that step's gradients, so an unclipped gradient reaches
            # the optimizer halved (a clipped one is still exact).
            if not overflow and not grows:
                expected = min(step["grad_norm"], run["clip"])
                assert update_norm == pytest.approx(expected, rel=1e-3), f"step {n}"
        assert all(not math.isfinite(s["grad_norm"]) for s in steps[:10])  # 2**32 down to 2**22
        assert any(s["grad_norm"] > run["clip"] for s in steps if math.isfinite(s["grad_norm"]))
        clean = len(steps) - skipped  # then it trains, at a scale where fp16 gradients fit
        assert clean > 8, f"{clean} of {len(steps)} steps updated; the scale fell to {min(scales(steps))}"
        assert run["valid_end"] < run["valid_start"] - 0.2, (run["valid_start"], run["valid_end"])
    if world == "two":  # both pipeline stages skip the same steps and keep the same scale
        first, second = ([(s["loss_scale"], s["skipped_steps"]) for s in run["steps"]] for run in runs)
        assert first == second


@pytest.mark.parametrize("world", ["single", "two"])
@pytest.mark.slow  # the one- and two-process groups of the `groups` fixture
def test_checkpoint_restores_the_loss_scaler(groups, world):
    runs = [r["resume"] for r in groups[world]]
    for run in runs:
        straight, resumed = run["straight"], run["resumed"]
        saved_scale = straight[SAVE_AT - 1]["loss_scale"]
        assert run["fresh_scale"] == 2.0**RESUME["fp16_initial_scale_power"] != saved_scale
        assert run["restored_scale"] == saved_scale
        assert straight[SAVE_AT - 1]["skipped_steps"] == SAVE_AT  # saved in the middle of the overflows
        assert len({s["loss_scale"] for s in straight[SAVE_AT:]}) > 2  # and the scale moves on after it
        for key in ("loss", "loss_scale", "skipped_steps", "grad_norm"):
            assert [s[key] for s in resumed] == [s[key] for s in straight[SAVE_AT:]], key
        assert run["same_weights"]


@pytest.mark.slow  # the one- and two-process groups of the `groups` fixture
def test_metrics_file_logs_the_loss_scale_and_skips(single):
    run = single["overflow"]
    records = [json.loads(line) for line in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["loss_scale"], r["skipped_steps"]) for r in records if "loss" in r]
    assert logged == [(s["loss_scale"], s["skipped_steps"]) for s in run["steps"]]


def test_fp16_without_zero_is_a_one_line_error():
    from parallel.engine import check_precision_supported
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError) as err:  # checked before the hardware check could pass it on a GPU
        check_precision_supported("fp16", torch.device("cuda"), zero_stage=0)
    assert str(err.value) == ("parallel.precision=fp16 with parallel.zero_stage=0: expected parallel.zero_stage "
                              ">= 1 (DeepSpeed applies the fp16 loss scale in backward only under ZeRO)")
    check_precision_supported("fp16", torch.device("cuda"), zero_stage=1)
    check_precision_supported("bf16", torch.device("cpu"), zero_stage=0)
