"""`pretrain-launch` on one machine: the local launcher, torchrun and the deepspeed launcher
with two CPU processes give the one-process loss curve; a multirun trains one run per point."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY, run_pretrain

COMMON = (*TINY, "trainer.train_steps=6", "trainer.eval_interval=0")
LAUNCH = os.path.join(os.path.dirname(sys.executable), "pretrain-launch")


pytestmark = pytest.mark.slow  # `pretrain` and `pretrain-launch` processes


def step_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def launch(*args, cwd):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return subprocess.run([LAUNCH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


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


def test_local_launcher_tensor_parallel(workdir, single_losses):
    # `${now:...}` down to microseconds: ranks that resolved it themselves would disagree.
    result = launch("launcher=local", "launcher.nproc_per_node=2", *COMMON,
                    f"data.cache_dir={workdir / 'cache'}", "parallel.tensor=2",
                    f"trainer.run_dir={workdir}/local/" + "${now:%H%M%S%f}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (workdir / "local").iterdir()  # one run directory for the job
    assert f"run directory {run_dir}" in result.stdout
    assert_same_curve(step_losses(run_dir), single_losses)
    assert (run_dir / "checkpoints" / "step_0000006" / "mp_rank_01_model_states.pt").is_file()
    # Output streamed with rank prefixes; only rank 0 reports.
    lines = result.stdout.splitlines()
    assert sum("── summary" in line for line in lines) == 1
    assert any(line.startswith("[rank 0] ── summary") for line in lines)
    assert any(line.startswith("[rank 1] ") for line in result.stdout.splitlines() + result.stderr.splitlines())
    # The config once, by rank 0, with the resolved run directory; one log per rank.
    assert f"run_dir: {run_dir}" in (run_dir / "config.yaml").read_text()
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert logs == ["rank0.log", "rank1.log"]
    assert "── summary" in (run_dir / "logs" / "rank0.log").read_text()
    assert "── summary" not in (run_dir / "logs" / "rank1.log").read_text()


def test_torchrun_tensor_parallel(workdir, single_losses):
    run_dir = workdir / "torchrun_tp2"
    result = launch("launcher=torchrun", "launcher.nproc_per_node=2", *COMMON,
                    f"data.cache_dir={workdir / 'cache'}", "parallel.tensor=2",
                    f"trainer.run_dir={run_dir}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.distributed.run --nnodes=1 --nproc_per_node=2 --max_restarts=0 --standalone" in result.stdout
    assert result.stdout.count("── summary") == 1  # only rank 0 reports
    assert_same_curve(step_losses(run_dir), single_losses)
    assert (run_dir / "checkpoints" / "step_0000006" / "mp_rank_01_model_states.pt").is_file()
    assert (run_dir / "logs" / "rank1.log").is_file()


def test_deepspeed_launcher_data_parallel(workdir, single_losses):
    run_dir = workdir / "deepspeed_dp2"
    # A hostfile makes the deepspeed launcher reach every host over ssh, even localhost;
    # without one it starts the processes here (hostfile rendering: tests/test_launch.py).
    result = launch("launcher=deepspeed", "launcher.nproc_per_node=2", *COMMON, f"data.cache_dir={workdir / 'cache'}", "trainer.micro_batch_size=4",
                    "parallel.zero_stage=1", f"trainer.run_dir={run_dir}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_curve(step_losses(run_dir), single_losses)
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank0.log", "rank1.log"]


def test_multirun_trains_one_run_per_point(workdir):
    base = workdir / "sweep"
    result = launch("-m", "optim.lr=1e-3,3e-3", *TINY, "trainer.train_steps=2", "trainer.eval_interval=0",
                    f"data.cache_dir={workdir / 'cache'}", f"trainer.run_dir={base}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in base.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0_optim.lr=0.001", "1_optim.lr=0.003"]
    for run, lr in zip(runs, (1e-3, 3e-3)):
        assert f"lr: {lr}" in (run / "config.yaml").read_text()
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
