"""`pretrain` under torchrun: two CPU processes (TP=2) give the one-process loss curve."""

import json
import os
import subprocess
import sys

from conftest import TINY, run_pretrain


def step_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_torchrun_tensor_parallel_matches_one_process(tmp_path):
    common = (*TINY, f"data.cache_dir={tmp_path / 'cache'}", "trainer.train_steps=6",
              "trainer.eval_interval=0")
    single = run_pretrain(*common, f"trainer.run_dir={tmp_path / 'single'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pretrain.main", *common, "parallel.tensor=2", f"trainer.run_dir={tmp_path / 'tp2'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("── summary") == 1  # only rank 0 reports

    expected, actual = step_losses(tmp_path / "single"), step_losses(tmp_path / "tp2")
    assert len(actual) == len(expected) == 6
    for a, e in zip(actual, expected):
        assert abs(a - e) <= 1e-5 * abs(e), (actual, expected)
    assert (tmp_path / "tp2" / "checkpoints" / "step_0000006" / "mp_rank_01_model_states.pt").is_file()
