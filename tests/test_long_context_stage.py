"""The long-context stage (`configs/experiment/long_context.yaml`) continues a run.

A first stage trains 4 steps in one process at 64 tokens per sequence; the
stage then resumes its run directory under torchrun on two ranks at 256 tokens
(4x), with Llama-3.1 RoPE scaling and each sequence split over the two ranks
(CP=2). The step count, the tokens counted, the learning-rate schedule and the
data position in tokens continue; the stage's sequence length, RoPE settings
and layout are the ones its checkpoint records.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, child_env

FIRST = (*TINY, "trainer.train_steps=4", "trainer.log_interval=1", "trainer.eval_interval=0",
         "optim.schedule=linear", "optim.warmup_steps=0", "optim.min_lr=0")
# The stage's own sizes, scaled to the tiny first stage (64 -> 256 tokens): the
# experiment's keys that TINY would otherwise override come after it.
STAGE = (*FIRST, "+experiment=long_context", "data.seq_len=256", "model.max_seq_len=256",
         "model.rope_scaling.original_max_position_embeddings=64", "trainer.micro_batch_size=2",
         "trainer.global_batch_size=2", "trainer.train_steps=6")


def test_stage_config_composes_to_a_valid_long_context_run():
    from pretrain.hydra_config import compose_config

    cfg = compose_config(["+experiment=long_context"])
    assert (cfg.data.seq_len, cfg.model.max_seq_len, cfg.parallel.context) == (1024, 1024, 2)
    assert cfg.model.rope_scaling.type == "llama3"
    assert cfg.model.rope_scaling.factor * cfg.model.rope_scaling.original_max_position_embeddings == 1024
    default = compose_config([])
    # The same tokens per optimizer step as the stage before it.
    assert cfg.trainer.global_batch_size * cfg.data.seq_len == default.trainer.global_batch_size * default.data.seq_len
    assert cfg.validate_world(2) == 1


def run(workdir: Path, ranks: int, overrides: tuple[str, ...]) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "pretrain.main"] if ranks == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                 "-m", "pretrain.main"])
    result = subprocess.run(
        [*launcher, *overrides, f"data.cache_dir={workdir / 'cache'}", f"trainer.run_dir={workdir / 'run'}"],
        cwd=workdir, env=child_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def client_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


@pytest.mark.slow  # a `pretrain` process, then a torchrun pair
def test_long_context_stage_continues_the_run(tmp_path, tiny_data_cache):
    (tmp_path / "cache").symlink_to(tiny_data_cache)
    run(tmp_path, 1, FIRST)
    stage = run(tmp_path, 2, STAGE)
    assert "resumed from" in stage.stdout and "at step 4" in stage.stdout

    checkpoints = tmp_path / "run" / "checkpoints"
    first, last = client_state(checkpoints / "step_0000004"), client_state(checkpoints / "step_0000006")
    assert first["loader"] == {"consumed_samples": 32, "seq_len": 64}
    # 32 samples of 64 tokens are 8 of 256: the stage went on from there, 2 per step.
    assert last["loader"] == {"consumed_samples": 8 + 2 * 2, "seq_len": 256}
    assert last["trainer"]["consumed_tokens"] == 4 * 8 * 64 + 2 * 2 * 256
    saved = last["config"]
    assert saved["parallel"]["context"] == 2 and saved["data"]["seq_len"] == 256
    assert saved["model"]["rope_scaling"]["type"] == "llama3"

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    # A step logs the learning rate its successor will use: the first stage's linear decay
    # over 4 steps, then, from the same step on, the stage's over 6.
    lr = first["config"]["optim"]["lr"]
    assert steps[1]["lr"] == pytest.approx(lr * (1 - 1 / 4), rel=1e-6)
    for step in (5, 6):
        assert steps[step]["lr"] == pytest.approx(lr * (1 - step / 6), rel=1e-6)
        assert torch.isfinite(torch.tensor(steps[step]["loss"]))
