"""kill -9 of real `pretrain` runs in bf16 and over two ranks (TP, DP): resumed runs are bit-identical.

Each case trains N steps straight, then the same N steps as a chain of runs on
another directory, killed (-9) and resumed to the end. In one process the chain
is killed twice: after a random step, then in the middle of the save of a
random later checkpoint step. Under torchrun (a pair costs about 20 s to start
on two cores) one kill of one rank drawn at random, after a step or in the
middle of a save as the layout says. Every loss and gradient norm the chain logged, redone
steps included, and every tensor of every file of the final checkpoint (model
states of each tensor-parallel rank, optimizer states, RNG states) equal the
straight run's bit for bit.

The kill steps come from `random.Random` seeded per test session; the seed is
printed and named in every assertion message. PRETRAIN_RESUME_SEED=<seed>
replays a failed draw.

Coverage of {fp32, bf16} x {one process, TP=2, DP=2 with ZeRO-1} by real kills:

    one process fp32   tests/test_resume.py (with SIGTERM and SIGUSR1 in the chain)
    one process bf16   here, two kills
    TP=2 fp32, bf16    here, torchrun, one kill each
    DP=2 fp32, bf16    here, torchrun, one kill each
    CP=2 fp32          here, torchrun, one kill
    MoE fp32           here, one process, one kill (expert biases included)

So the kills go through each of DeepSpeed's optimizer paths: plain fp32 (one
process, TP=2), its bf16 optimizer (one process, TP=2) and ZeRO-1 in fp32 and
bf16 (DP=2).
"""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, child_env, complete_steps

STEPS = 8
INTERVAL = 2  # small, so every resume starts from an earlier checkpoint and redoes steps
COMMON = (*TINY, "trainer.eval_interval=0", "trainer.log_interval=1", f"trainer.checkpoint_interval={INTERVAL}",
          f"trainer.train_steps={STEPS}", "trainer.compile=none")

SEED = int(os.environ.get("PRETRAIN_RESUME_SEED", random.SystemRandom().randrange(2**32)))

# name: (ranks, kills, overrides). Each two-rank layout and each precision under torchrun
# sees both kinds of kill.
LAYOUTS = {
    "single_bf16": (1, ("after_step", "in_save"), ("parallel.precision=bf16",)),
    "tp2_fp32": (2, ("after_step",), ("parallel.tensor=2",)),
    "tp2_bf16": (2, ("in_save",), ("parallel.tensor=2", "parallel.precision=bf16")),
    "dp2_zero1_fp32": (2, ("in_save",), ("parallel.zero_stage=1", "trainer.micro_batch_size=4")),
    "dp2_zero1_bf16": (2, ("after_step",),
                       ("parallel.zero_stage=1", "trainer.micro_batch_size=4", "parallel.precision=bf16")),
    # Context parallelism: both ranks read the same samples and train on halves of them.
    "cp2_fp32": (2, ("after_step",), ("parallel.context=2",)),
    # Mixture of experts with DeepSeek-V3's expert bias, whose state is a buffer, not a weight.
    "moe_single": (1, ("after_step",), ("model.moe.num_experts=4", "model.moe.expert_ffn_hidden_size=32",
                                        "model.moe.score_function=sigmoid", "model.moe.expert_bias=true")),
}


pytestmark = pytest.mark.slow  # `pretrain` and torchrun processes, killed


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_data_cache) -> Path:
    print(f"kill steps drawn with PRETRAIN_RESUME_SEED={SEED}")
    path = tmp_path_factory.mktemp("resume_layouts")
    (path / "cache").symlink_to(tiny_data_cache)  # data prepared once for the session
    return path


def pretrain(workdir: Path, ranks: int, run: str, overrides: tuple[str, ...], fault: str = ""):
    """One `pretrain` process, or a torchrun job of `ranks` processes, on run directory `run`."""
    env = {k: v for k, v in child_env({"OMP_NUM_THREADS": "1"}).items() if k != "PRETRAIN_FAULT"}
    if fault:
        env["PRETRAIN_FAULT"] = fault
    launcher = ([sys.executable, "-m", "pretrain.main"] if ranks == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                 "-m", "pretrain.main"])
    return subprocess.run(
        [*launcher, *COMMON, *overrides, f"data.cache_dir={workdir / 'cache'}", f"trainer.run_dir={workdir / run}"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def draw_kills(name: str, ranks: int, kills: tuple[str, ...]) -> tuple[int | None, int | None, str]:
    """(kill_after_step, kill_in_save, "@rank" or ""), None where that kill is not made.

    The kill after a step lands on any step from the first checkpoint to the
    one before last; the kill in a save on a checkpoint step after the newest
    one the first kill (if any) left behind. Under torchrun the rank is drawn too.
    """
    rng = random.Random(f"{SEED}/{name}")
    after_step = rng.randrange(INTERVAL, STEPS) if "after_step" in kills else None
    newest = (after_step or 0) // INTERVAL * INTERVAL
    in_save = rng.choice(range(newest + INTERVAL, STEPS + 1, INTERVAL)) if "in_save" in kills else None
    return after_step, in_save, f"@{rng.randrange(ranks)}" if ranks > 1 else ""


def tensors(value, prefix: str = ""):
    """Every tensor inside a loaded checkpoint file, by its path of keys."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensors(item, f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from tensors(item, f"{prefix}/{i}")


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(path.glob("*.pt")):
        loaded = torch.load(file, map_location="cpu", weights_only=False)
        found.update({f"{file.name}{key}": t for key, t in tensors(loaded)})
    return found


def differing(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    assert actual.keys() == expected.keys(), sorted(actual.keys() ^ expected.keys())
    return [k for k in expected if actual[k].dtype != expected[k].dtype or not torch.equal(actual[k], expected[k])]


def losses(run_dir: Path) -> list[tuple[int, tuple[float, float]]]:
    """(step, (loss, gradient norm)) of every step a run directory's runs logged."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], (r["loss"], r["grad_norm"])) for r in records if "loss" in r]


@pytest.mark.parametrize("name", LAYOUTS)
def test_killed_runs_resume_bit_exactly(workdir, name):
    ranks, kills, overrides = LAYOUTS[name]
    after_step, in_save, at_rank = draw_kills(name, ranks, kills)
    draw = (f"{name}: kill_after_step={after_step}, kill_in_save={in_save}, rank {at_rank or '-'} "
            f"(PRETRAIN_RESUME_SEED={SEED})")
    print(draw)
    run_dir, straight_dir = workdir / name, workdir / f"{name}_straight"

    def assert_killed(result):
        if ranks == 1:
            assert result.returncode == -signal.SIGKILL, (draw, result.stderr[-3000:])
        else:  # torchrun names the worker that got the signal; the other one lost its peer
            assert result.returncode == 1 and "Signal 9 (SIGKILL)" in result.stderr, (draw, result.stderr[-3000:])

    straight = pretrain(workdir, ranks, straight_dir.name, overrides)
    assert straight.returncode == 0, (draw, straight.stderr[-3000:])
    expected = dict(losses(straight_dir))
    assert sorted(expected) == list(range(1, STEPS + 1)), draw

    redone, resumed_at = 0, 0
    if after_step is not None:
        killed = pretrain(workdir, ranks, name, overrides, f"kill_after_step={after_step}{at_rank}")
        assert_killed(killed)
        assert losses(run_dir)[-1][0] == after_step, draw
        resumed_at = after_step // INTERVAL * INTERVAL
        assert complete_steps(run_dir) == list(range(INTERVAL, resumed_at + 1, INTERVAL)), draw
        redone += after_step - resumed_at  # the steps after the checkpoint it resumes from

    partial = None
    if in_save is not None:
        # Killed between writing step `in_save` and committing it: that save never counts.
        killed = pretrain(workdir, ranks, name, overrides, f"kill_in_save={in_save}{at_rank}")
        assert_killed(killed)
        assert losses(run_dir)[-1][0] == in_save, draw
        if resumed_at:
            assert f"at step {resumed_at}" in killed.stdout, (draw, killed.stdout[-3000:])
        partial = run_dir / "checkpoints" / f"step_{in_save:07d}.partial"
        assert partial.is_dir() and not (partial / "COMPLETE").exists(), draw
        assert complete_steps(run_dir) == list(range(INTERVAL, in_save, INTERVAL)), draw
        resumed_at = in_save - INTERVAL
        redone += INTERVAL  # the steps of the checkpoint whose save was killed

    finished = pretrain(workdir, ranks, name, overrides)
    assert finished.returncode == 0, (draw, finished.stderr[-3000:])
    if resumed_at:
        assert f"at step {resumed_at}" in finished.stdout, (draw, finished.stdout[-3000:])
    assert partial is None or not partial.exists(), draw

    chain = losses(run_dir)
    assert sorted({step for step, _ in chain}) == list(range(1, STEPS + 1)), (draw, chain)
    assert len(chain) == STEPS + redone, (draw, chain)
    assert [(s, logged) for s, logged in chain if logged != expected[s]] == [], (draw, chain, expected)
    final = f"checkpoints/step_{STEPS:07d}"
    actual_files = sorted(p.name for p in (run_dir / final).iterdir())
    assert actual_files == sorted(p.name for p in (straight_dir / final).iterdir()), draw
    assert differing(checkpoint_tensors(run_dir / final), checkpoint_tensors(straight_dir / final)) == [], draw
