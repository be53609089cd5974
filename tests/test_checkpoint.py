"""Checkpoint contents, atomic commits, retention, RNG states, bf16 resume and the NaN guard,
in one process on the synthetic data of the parity tests."""

import json
import math
import random

import numpy as np
import pytest
import torch

from checkpointing import make_trainer, train
from parity import layout_config

from pretrain.checkpoint import files as checkpoint
from pretrain.checkpoint.rng_state import capture_rng_state


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_contents_commit_partials_and_retention(single_process_groups, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / checkpoint.WANDB_ID_FILE).write_text("abcd1234")
    trainer = make_trainer(single_process_groups, run_dir, checkpoint_interval=1,
                           keep_last_checkpoints=2, keep_every_steps=3)
    train(trainer, 6)

    # The newest two, plus every third step for good.
    assert [s for s, _ in checkpoint.complete_checkpoints(run_dir)] == [3, 5, 6]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000006"
    latest = checkpoint.latest_checkpoint(run_dir)
    manifest = checkpoint.read_manifest(latest)
    assert manifest["step"] == 6 and manifest["world_size"] == 1
    assert manifest["model"]["hidden_size"] == 64
    assert set(manifest["files"]) == {"mp_rank_00_model_states.pt", "rng_state_rank00000.pt", "wandb_run_id"}
    assert (latest / "wandb_run_id").read_text() == "abcd1234"
    client = torch.load(latest / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["wandb_run_id"] == "abcd1234" and client["trainer"]["step"] == 6
    assert not list((run_dir / "checkpoints").glob("*.partial"))

    # Saves that died half way: ignored by resume, removed by the next good save.
    root = run_dir / "checkpoints"
    (root / "step_0000007.partial").mkdir()
    (root / "step_0000008").mkdir()
    (root / "step_0000008" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    (root / "latest").write_text("step_0000008")  # even a pointer to it is not trusted
    assert checkpoint.latest_checkpoint(run_dir) == latest
    assert checkpoint.resolve_resume(str(run_dir), "auto") == latest
    with pytest.raises(checkpoint.RunDirError, match="no COMPLETE manifest"):
        checkpoint.resolve_resume(str(run_dir), str(root / "step_0000008"))
    with pytest.raises(checkpoint.RunDirError, match="already holds checkpoint step_0000006"):
        checkpoint.resolve_resume(str(run_dir), "never")
    train(trainer, 7)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000003", "step_0000006",
                                                      "step_0000007"]

    # A checkpoint of a step that already has one replaces it whole.
    before = (root / "step_0000007" / checkpoint.COMPLETE).read_text()
    trainer.save_checkpoint()
    assert (root / "step_0000007" / checkpoint.COMPLETE).read_text() != before
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000003", "step_0000006",
                                                      "step_0000007"]

    # Bad input: each is one line naming the checkpoint and what is wrong.
    model_file = root / "step_0000007" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(checkpoint.RunDirError, match=r"mp_rank_00_model_states.pt: 1000 bytes, the checkpoint "
                                                     r"manifest says \d+ \(corrupt or truncated\)"):
        checkpoint.resolve_resume(str(run_dir), "auto")
    cfg = layout_config(run_dir)
    cfg.model.hidden_size = 128
    with pytest.raises(checkpoint.RunDirError, match="written for model.hidden_size=64, but the config has "
                                                     "model.hidden_size=128"):
        checkpoint.resolve_resume(str(run_dir), str(root / "step_0000006"), cfg.model)


def test_rng_states_of_the_rank_come_back(single_process_groups, tmp_path):
    from megatron.core.tensor_parallel import random as megatron_random

    trainer = make_trainer(single_process_groups, tmp_path)
    train(trainer, 2)  # saves at the end
    saved = capture_rng_state()  # saving draws nothing
    random.random(), np.random.rand(), torch.rand(3)  # the streams move on
    with megatron_random.get_cuda_rng_tracker().fork():
        torch.rand(3)

    restored = make_trainer(single_process_groups, tmp_path)  # re-seeds everything
    restored.load_checkpoint(checkpoint.latest_checkpoint(tmp_path))
    now = capture_rng_state()
    assert now["python"] == saved["python"]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(now["numpy"], saved["numpy"]))
    assert torch.equal(now["torch"], saved["torch"])
    assert now["model_parallel"].keys() == saved["model_parallel"].keys()
    assert all(torch.equal(now["model_parallel"][k], saved["model_parallel"][k]) for k in saved["model_parallel"])


@pytest.mark.parametrize("precision,background", [("bf16", False), ("fp32", False), ("fp32", True)],
                         ids=["bf16", "fp32", "fp32_async"])
def test_resume_is_bit_exact(single_process_groups, tmp_path, precision, background):
    straight = train(make_trainer(single_process_groups, tmp_path / "straight", precision=precision), 6)
    first = make_trainer(single_process_groups, tmp_path / "resumed", precision=precision, checkpoint_interval=3,
                         async_checkpoint=background)
    train(first, 5)  # steps 4 and 5 are lost with the process
    assert first.checkpointer.pending is None and not list((tmp_path / "resumed" / "checkpoints").glob("*.partial"))
    (tmp_path / "resumed" / "checkpoints" / "step_0000005" / checkpoint.COMPLETE).unlink()  # never finished
    second = make_trainer(single_process_groups, tmp_path / "resumed", precision=precision)
    second.load_checkpoint(checkpoint.resolve_resume(str(tmp_path / "resumed"), "auto"))
    assert second.state.step == 3
    resumed = train(second, 6)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in straight.metrics[3:]]
    assert all(torch.equal(a, b) for a, b in zip(resumed.weights[-1], straight.weights[-1], strict=True))


def test_guard_skips_nonfinite_steps(single_process_groups, tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_FAULT", "nan_loss=3")
    clean = train(make_trainer(single_process_groups, tmp_path / "clean"), 2)
    record = train(make_trainer(single_process_groups, tmp_path / "guarded"), 5)
    losses = [m["loss"] for m in record.metrics]
    assert [m["loss"] for m in clean.metrics] == losses[:2]
    assert math.isnan(losses[2]) and all(math.isfinite(x) for x in losses[3:])
    assert [m["skipped_steps"] for m in record.metrics] == [0, 0, 1, 1, 1]
    # The skipped step changed no weight, and its gradients did not leak into the next one.
    assert all(torch.equal(a, b) for a, b in zip(record.weights[1], record.weights[2]))
    assert all(torch.isfinite(w).all() for w in record.weights[-1])


def test_guard_rolls_back_past_the_bad_data_or_aborts(single_process_groups, tmp_path, monkeypatch):
    from pretrain.training.guard import TrainingDiverged

    monkeypatch.setenv("PRETRAIN_FAULT", "nan_loss=5,6")
    trainer = make_trainer(single_process_groups, tmp_path / "rollback", checkpoint_interval=4, max_bad_steps=1)
    record = train(trainer, 7)
    # Steps 5 and 6 are bad: back to step 4, then steps 5-7 on the data after the bad window.
    # (The callbacks never see step 6, which is undone at once.)
    assert [m["step"] for m in record.metrics] == [1, 2, 3, 4, 5, 5, 6, 7]
    assert trainer.state.step == 7 and trainer.checkpointer.rollbacks == {4: 1}
    assert trainer.train_loader.consumed_samples == 9 * 8  # 7 steps kept + 2 undone, 8 samples each
    metrics = [json.loads(line) for line in (tmp_path / "rollback" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6, 5, 6, 7]
    assert [math.isfinite(r["loss"]) for r in steps] == [True] * 4 + [False] * 2 + [True] * 3
    assert {"step": 4, "rollback/to_step": 4} in metrics

    monkeypatch.setenv("PRETRAIN_FAULT", "nan_loss=2,3")
    trainer = make_trainer(single_process_groups, tmp_path / "abort", max_bad_steps=1, on_bad_steps="abort")
    with pytest.raises(TrainingDiverged, match=r"step 3: 2 steps in a row with a non-finite loss or gradient "
                                               r"norm \(trainer.max_bad_steps=1\); aborting"):
        train(trainer, 5)
