"""`pretrain` under torchrun and the deepspeed launcher: two CPU processes give the one-process loss curve."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY, run_pretrain
from parallel.groups import free_port

COMMON = (*TINY, "trainer.train_steps=6", "trainer.eval_interval=0")


def step_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def launch(command, cwd):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def single_losses(workdir):
    result = run_pretrain(*COMMON, f"data.cache_dir={workdir / 'cache'}",
                          f"trainer.run_dir={workdir / 'single'}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return step_losses(workdir / "single")


def assert_same_curve(actual, expected):
    assert len(actual) == len(expected) == 6
    for a, e in zip(actual, expected):
        assert abs(a - e) <= 1e-5 * abs(e), (actual, expected)


def test_torchrun_tensor_parallel(workdir, single_losses):
    run_dir = workdir / "torchrun_tp2"
    result = launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pretrain.main", *COMMON, f"data.cache_dir={workdir / 'cache'}",
         "parallel.tensor=2", f"trainer.run_dir={run_dir}"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("── summary") == 1  # only rank 0 reports
    assert_same_curve(step_losses(run_dir), single_losses)
    assert (run_dir / "checkpoints" / "step_0000006" / "mp_rank_01_model_states.pt").is_file()


def test_deepspeed_launcher_data_parallel(workdir, single_losses):
    run_dir = workdir / "deepspeed_dp2"
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    result = launch(
        [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
         "--module", "pretrain.main", *COMMON, f"data.cache_dir={workdir / 'cache'}",
         "trainer.micro_batch_size=4", "parallel.zero_stage=1", f"trainer.run_dir={run_dir}"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_curve(step_losses(run_dir), single_losses)
