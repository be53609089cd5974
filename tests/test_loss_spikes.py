"""Loss-spike detection: the robust statistic, its config, and each action in a tiny run.

The end-to-end tests inject a finite spike (PRETRAIN_FAULT=loss_spike=N: step N's loss,
and so its gradients, times ten) into one process on the synthetic data of the parity
tests; the two-rank pipeline test is marked slow.
"""

import json
import math
import random

import pytest
import torch

from checkpointing import make_trainer, train

from pretrain.checkpoint import files as checkpoint
from pretrain.config import Config, ConfigError, SpikeConfig, from_dict
from pretrain.training.spikes import SpikeDetector


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def noisy_curve(steps: int, seed: int = 0) -> list[tuple[float, float]]:
    """(loss, gradient norm) of a plausible run: a decaying loss with noise, a noisy norm."""
    rng = random.Random(seed)
    return [(2.0 + 6.0 * math.exp(-t / 300) + rng.gauss(0, 0.03),
             (0.4 + 0.6 * math.exp(-t / 200)) * math.exp(rng.gauss(0, 0.05))) for t in range(steps)]


def feed(detector: SpikeDetector, values, first_step: int = 1) -> list:
    return [s for s in (detector.check(first_step + i, loss, norm, refused=False)
                        for i, (loss, norm) in enumerate(values)) if s is not None]


# --- the statistic ----------------------------------------------------------------------------

def test_no_false_positive_on_a_noisy_decreasing_curve():
    for seed in range(3):
        detector = SpikeDetector(SpikeConfig())
        assert feed(detector, noisy_curve(3000, seed)) == []
        assert len(detector.windows["loss"]) == len(detector.windows["grad_norm"]) == 128


@pytest.mark.parametrize("metric", ["loss", "grad_norm"])
def test_a_tenfold_spike_is_detected_and_kept_out_of_the_window(metric):
    detector = SpikeDetector(SpikeConfig(action="log"))
    curve = noisy_curve(200)
    assert feed(detector, curve) == []
    before = detector.state_dict()
    loss, norm = curve[-1]
    loss, norm = (loss * 10, norm) if metric == "loss" else (loss, norm * 10)
    spike = detector.check(201, loss, norm, refused=False)
    assert spike is not None and list(spike.zscores) == [metric] and spike.zscores[metric] > 6
    assert spike.action == "log" and spike.window == 128
    record = spike.record()
    assert record["step"] == 201 and record["spike/action"] == "log" and record["spike/metrics"] == metric
    assert record["spike/loss"] == loss and record["spike/grad_norm"] == norm and record["spike/zscore"] > 6
    assert f"spike: {metric} " in spike.describe()
    assert detector.state_dict() == before  # the spike did not enter the window
    assert detector.check(202, *curve[-1], refused=False) is None  # the next normal step is fine
    # A watched signal only: the gradient norm's spike goes unseen when only the loss is watched.
    loss_only = SpikeDetector(SpikeConfig(metrics=["loss"]))
    feed(loss_only, curve)
    assert (loss_only.check(201, loss, norm, refused=False) is None) == (metric == "grad_norm")


def test_no_detection_during_warmup():
    detector = SpikeDetector(SpikeConfig(window=10, warmup=5))
    assert feed(detector, [(3.0, 1.0), (3.1, 1.1), (2.9, 0.9), (3.0, 1.0)]) == []
    assert detector.check(5, 300.0, 100.0, refused=False) is None  # 4 values: still warming up
    assert list(detector.windows["loss"]) == [3.0, 3.1, 2.9, 3.0, 300.0]  # ...so it counts as accepted
    detector.load_state_dict({"loss": [3.0, 3.1, 2.9, 3.0, 3.05], "grad_norm": [1.0, 1.1, 0.9, 1.0, 1.05]})
    assert detector.check(6, 30.0, 1.0, refused=False) is not None  # 5 values: detection is on


def test_only_the_last_window_steps_count():
    detector = SpikeDetector(SpikeConfig(window=5, warmup=5))
    feed(detector, [(100.0 + i, 1.0) for i in range(5)])
    assert detector.check(6, 50.0, 1.0, refused=False) is None  # not a rise
    feed(detector, [(1.0 + 0.01 * i, 1.0) for i in range(5)], first_step=7)
    assert list(detector.windows["loss"]) == pytest.approx([1.0, 1.01, 1.02, 1.03, 1.04])
    assert detector.check(12, 50.0, 1.0, refused=False) is not None  # the old level is forgotten


def test_refused_and_nonfinite_steps_stay_out_of_the_window():
    detector = SpikeDetector(SpikeConfig(window=8, warmup=4))
    feed(detector, [(3.0, 1.0), (3.1, 1.1), (2.9, 0.9), (3.0, 1.0)])
    before = detector.state_dict()
    assert detector.check(5, 3.0, 1.0, refused=True) is None  # e.g. an fp16 overflow
    assert detector.check(6, math.nan, math.nan, refused=True) is None
    assert detector.check(7, math.inf, 1.0, refused=False) is None  # the NaN guard's business
    assert detector.state_dict() == before
    assert detector.check(8, 3.0, math.nan, refused=False) is None  # no norm measured: the loss only
    assert len(detector.windows["loss"]) == 5 and len(detector.windows["grad_norm"]) == 4


def test_a_flat_signal_needs_a_real_rise():
    """With no noise at all the scale is 1% of the median: a wobble is not a spike."""
    detector = SpikeDetector(SpikeConfig(window=8, warmup=4))
    feed(detector, [(2.0, 1.0)] * 8)
    assert detector.check(9, 2.1, 1.05, refused=False) is None
    assert detector.check(10, 2.2, 1.0, refused=False) is not None


def test_skip_refuses_on_the_gradient_norm_only():
    detector = SpikeDetector(SpikeConfig(action="skip", window=8, warmup=4))
    feed(detector, [(3.0, 1.0), (3.1, 1.1), (2.9, 0.9), (3.0, 1.0)])
    assert not detector.refuses(1.05) and not detector.refuses(math.nan) and detector.refuses(10.0)
    assert detector.check(5, 3.0, 10.0, refused=True).action == "skip"
    assert detector.check(6, 30.0, 1.0, refused=False).action == "log"  # a loss spike: the update was applied
    logging = SpikeDetector(SpikeConfig(action="log", window=8, warmup=4))
    feed(logging, [(3.0, 1.0), (3.1, 1.1), (2.9, 0.9), (3.0, 1.0)])
    assert not logging.refuses(10.0)
    off = SpikeDetector(SpikeConfig(action="off", window=8, warmup=4))
    feed(off, [(3.0, 1.0)] * 4)
    assert off.check(5, 300.0, 100.0, refused=False) is None


def test_state_dict_round_trip():
    detector = SpikeDetector(SpikeConfig(window=16, warmup=4))
    feed(detector, noisy_curve(40))
    state = detector.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain lists of floats
    restored = SpikeDetector(SpikeConfig(window=16, warmup=4))
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    probes = [(2.0 + i * 0.5, 0.3 + i * 0.1) for i in range(40)]
    assert ([(s.step, s.zscores) for s in feed(restored, probes)] ==
            [(s.step, s.zscores) for s in feed(detector, probes)])
    smaller = SpikeDetector(SpikeConfig(window=8, warmup=4))  # a changed window keeps the newest
    smaller.load_state_dict(state)
    assert smaller.state_dict() == {k: v[-8:] for k, v in state.items()}
    smaller.load_state_dict(None)  # a checkpoint written without the windows
    assert smaller.state_dict() == {"loss": [], "grad_norm": []}


# --- the config -------------------------------------------------------------------------------

@pytest.mark.parametrize("values,message", [
    ({"action": "abort"}, "trainer.spike.action='abort': expected one of off, log, skip, rollback"),
    ({"window": 2}, "trainer.spike.window=2: expected >= 3"),
    ({"warmup": 200}, "trainer.spike.warmup=200: expected in [3, trainer.spike.window=128]"),
    ({"sigma_factor": 0}, "trainer.spike.sigma_factor=0.0: expected > 0"),
    ({"metrics": ["loss", "lr"]}, "trainer.spike.metrics[1]='lr': expected one of loss, grad_norm"),
    ({"metrics": []}, "trainer.spike.metrics=[]: expected one or both of loss, grad_norm"),
    ({"metrics": ["loss"], "action": "skip"}, "trainer.spike.metrics=['loss'] with trainer.spike.action=skip"),
    ({"windw": 5}, "trainer.spike.windw: unknown key"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Config, {"trainer": {"spike": values}})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_defaults_and_overrides_from_the_config_tree():
    from pretrain.hydra_config import compose_config

    default = compose_config([])
    assert default.trainer.spike == SpikeConfig()  # the YAML and the dataclass agree
    assert default.trainer.spike.action == "log"  # records only: a normal run's numbers are untouched
    cfg = compose_config(["trainer.spike.action=skip", "trainer.spike.window=64", "trainer.spike.warmup=16",
                          "trainer.spike.sigma_factor=8", "trainer.spike.metrics=[grad_norm]"])
    assert cfg.trainer.spike == SpikeConfig(action="skip", metrics=["grad_norm"], window=64, warmup=16,
                                            sigma_factor=8.0)


# --- each action in a tiny run ----------------------------------------------------------------

SPIKE_STEP = 8


def spike_trainer(groups, run_dir, action, **keys):
    """One micro-batch per step (so the whole step's loss is multiplied), detection from step 5."""
    return make_trainer(groups, run_dir, micro_batch_size=8, **keys,
                        spike=SpikeConfig(action=action, window=8, warmup=4))


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def unchanged(before, after) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.fixture
def spike_fault(monkeypatch):
    monkeypatch.setenv("PRETRAIN_FAULT", f"loss_spike={SPIKE_STEP}")


def test_log_records_the_spike_and_keeps_the_update(single_process_groups, tmp_path, spike_fault, capsys):
    trainer = spike_trainer(single_process_groups, tmp_path, "log")
    record = train(trainer, 10)
    assert [m["step"] for m in record.metrics] == list(range(1, 11))
    losses = [m["loss"] for m in record.metrics]
    assert losses[SPIKE_STEP - 1] > 5 * max(losses[SPIKE_STEP - 2], losses[SPIKE_STEP])
    assert not unchanged(record.weights[SPIKE_STEP - 2], record.weights[SPIKE_STEP - 1])  # applied
    assert [m["skipped_steps"] for m in record.metrics] == [0] * 10
    # The applied update may disturb the next step or two, which are then recorded too.
    spikes = [r for r in records(tmp_path) if "spike/action" in r]
    assert spikes[0]["step"] == SPIKE_STEP and all(r["spike/action"] == "log" for r in spikes)
    assert spikes[0]["spike/loss"] == losses[SPIKE_STEP - 1] and spikes[0]["spike/zscore"] > 6
    assert set(spikes[0]["spike/metrics"].split(",")) == {"loss", "grad_norm"}
    assert losses[SPIKE_STEP - 1] not in trainer.spikes.windows["loss"]
    assert f"step {SPIKE_STEP:>6}  spike: loss" in capsys.readouterr().out


def test_skip_leaves_the_weights_as_they_were(single_process_groups, tmp_path, spike_fault):
    trainer = spike_trainer(single_process_groups, tmp_path, "skip")
    record = train(trainer, 10)
    # The spiking step changed no weight; the steps around it trained.
    assert unchanged(record.weights[SPIKE_STEP - 2], record.weights[SPIKE_STEP - 1])
    assert not unchanged(record.weights[SPIKE_STEP - 3], record.weights[SPIKE_STEP - 2])
    assert not unchanged(record.weights[SPIKE_STEP - 1], record.weights[SPIKE_STEP])
    assert [m["skipped_steps"] for m in record.metrics] == [0] * (SPIKE_STEP - 1) + [1] * (11 - SPIKE_STEP)
    assert all(math.isfinite(m["loss"]) and m["loss"] < 10 for m in record.metrics[SPIKE_STEP:])
    spikes = [r for r in records(tmp_path) if "spike/action" in r]
    assert [(r["step"], r["spike/action"]) for r in spikes] == [(SPIKE_STEP, "skip")]
    assert record.metrics[SPIKE_STEP - 1]["loss"] not in trainer.spikes.windows["loss"]


def test_skip_resumes_bit_exactly(single_process_groups, tmp_path, spike_fault):
    """The windows come back with the checkpoint: a resumed run refuses the same step."""
    straight = train(spike_trainer(single_process_groups, tmp_path / "straight", "skip"), 10)
    train(spike_trainer(single_process_groups, tmp_path / "resumed", "skip"), 6)  # saves at the end
    second = spike_trainer(single_process_groups, tmp_path / "resumed", "skip")
    second.load_checkpoint(checkpoint.resolve_resume(str(tmp_path / "resumed"), "auto"))
    assert second.state.step == 6 and len(second.spikes.windows["loss"]) == 6
    resumed = train(second, 10)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in straight.metrics[6:]]
    assert [m["skipped_steps"] for m in resumed.metrics] == [m["skipped_steps"] for m in straight.metrics[6:]]
    assert unchanged(resumed.weights[-1], straight.weights[-1])


def test_rollback_returns_to_the_checkpoint_past_the_data(single_process_groups, tmp_path, spike_fault):
    trainer = spike_trainer(single_process_groups, tmp_path, "rollback", checkpoint_interval=6)
    record = train(trainer, 10)
    # Step 8 spikes: back to step 6, then steps 7-10 on the data after the spike's batch.
    # (The callbacks never see the spiking step, which is undone at once.)
    assert [m["step"] for m in record.metrics] == [1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10]
    assert trainer.state.step == 10 and trainer.checkpointer.rollbacks == {6: 1}
    assert trainer.train_loader.consumed_samples == 12 * 8  # 10 steps kept + 2 undone
    assert record.metrics[7]["loss"] != record.metrics[6]["loss"]  # step 7 again, on other data
    assert all(m["loss"] < 10 for m in record.metrics)
    logged = records(tmp_path)
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6, 7, 8, 7, 8, 9, 10]
    spikes = [r for r in logged if "spike/action" in r]
    assert [(r["step"], r["spike/action"]) for r in spikes] == [(SPIKE_STEP, "rollback")]
    assert {"step": 6, "rollback/to_step": 6} in logged
    assert logged.index(spikes[0]) < logged.index({"step": 6, "rollback/to_step": 6})


def test_rollback_without_a_checkpoint_keeps_training(single_process_groups, tmp_path, spike_fault, capsys):
    trainer = spike_trainer(single_process_groups, tmp_path, "rollback")  # a checkpoint only at the end
    record = train(trainer, 10)
    assert [m["step"] for m in record.metrics] == list(range(1, 11))
    spikes = [r for r in records(tmp_path) if "spike/action" in r]  # its aftershock too, see above
    assert spikes[0]["step"] == SPIKE_STEP and all(r["spike/action"] == "log" for r in spikes)
    assert f"step {SPIKE_STEP:>6}  spike: loss" in (out := capsys.readouterr().out)
    assert "update kept (no checkpoint to roll back to yet)" in out


# --- a pipeline of two stages -----------------------------------------------------------------

def pipeline_skip(root: str) -> list[dict]:
    """Trains pp2 layouts with a spike on the last stage (rank 1), action skip."""
    from pathlib import Path

    from parity import layout_config, trainer_for
    from checkpointing import Record

    results = []
    for name, layout in {"pp2": {}, "pp2_bf16": {"zero": 1, "precision": "bf16"}}.items():
        cfg = layout_config(Path(root) / name, pipeline=2, **layout)
        cfg.trainer.spike = SpikeConfig(action="skip", window=8, warmup=4)
        trainer = trainer_for(cfg)
        record = Record()
        trainer.callbacks.insert(0, record)
        trainer.cfg.trainer.train_steps = 10
        trainer.fit()
        results.append({"skipped": [m["skipped_steps"] for m in record.metrics],
                        "unchanged": unchanged(record.weights[SPIKE_STEP - 2], record.weights[SPIKE_STEP - 1]),
                        "windows": trainer.spikes.state_dict()})
    return results


@pytest.mark.slow
def test_pipeline_stages_refuse_the_same_update(tmp_path, monkeypatch):
    from distributed import run_distributed

    monkeypatch.setenv("PRETRAIN_FAULT", f"loss_spike={SPIKE_STEP}@1")
    first, last = run_distributed(pipeline_skip, 2, str(tmp_path))
    for stage0, stage1 in zip(first, last):
        assert stage0["skipped"] == stage1["skipped"] == [0] * (SPIKE_STEP - 1) + [1] * (11 - SPIKE_STEP)
        assert stage0["unchanged"] and stage1["unchanged"]
        assert stage0["windows"] == stage1["windows"]
