"""Kills, signals and resumes of real `pretrain` runs: resumed runs are bit-identical to straight ones.

One process: a straight run of N steps, and a chain of runs on another
directory: killed (-9) after a step, killed (-9) in the middle of a save,
stopped by SIGTERM, then finished with a SIGUSR1 on the way. Every loss the
chain logged, redone steps included, and the final weights equal the straight
run's bit for bit. Two ranks (in-process, DP=2 with ZeRO-1): a SIGUSR1 to one
rank makes every rank save, and a resume after a save that never completed is
exact. Real kills in bf16 and of one torchrun worker, TP=2 and DP=2:
tests/test_resume_layouts.py.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, child_env, complete_steps, run_pretrain
from distributed import run_distributed

STEPS = 12
# No torch.compile: it would add its compile time to each of the many short runs.
COMMON = (*TINY, "trainer.eval_interval=0", "trainer.log_interval=1", "trainer.checkpoint_interval=4",
          f"trainer.train_steps={STEPS}", "trainer.compile=none")
ENV = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.slow  # `pretrain` processes, killed and signalled, and a two-rank group


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_data_cache) -> Path:
    path = tmp_path_factory.mktemp("resume")
    (path / "cache").symlink_to(tiny_data_cache)  # data prepared once for the session
    return path


def args(workdir: Path, run: str, *extra: str) -> tuple[str, ...]:
    return (*COMMON, f"data.cache_dir={workdir / 'cache'}", f"trainer.run_dir={workdir / run}", *extra)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v for k, v in states["module"].items() if isinstance(v, torch.Tensor)}


def signal_after(line_start: str, signum: int, argv: tuple[str, ...], cwd: Path) -> tuple[int, str]:
    """Runs `pretrain`, sends `signum` once it prints a line starting with `line_start`;
    returns the exit status and the output."""
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.main", *argv], cwd=cwd, env=child_env(ENV), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = []
    for line in proc.stdout:  # blocks until the run prints: no timing involved
        output.append(line)
        if line.startswith(line_start):
            proc.send_signal(signum)
            break
    output.extend(proc.stdout)
    return proc.wait(timeout=600), "".join(output)


@pytest.fixture(scope="module")
def straight(workdir):
    result = run_pretrain(*args(workdir, "straight"), cwd=workdir, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = {r["step"]: r["loss"] for r in records(workdir / "straight") if "loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def test_killed_and_signalled_runs_resume_bit_exactly(workdir, straight):
    run_dir = workdir / "chain"

    killed = run_pretrain(*args(workdir, "chain"), cwd=workdir, env={**ENV, "PRETRAIN_FAULT": "kill_after_step=6"})
    assert killed.returncode == -signal.SIGKILL
    assert complete_steps(run_dir) == [4]

    # Killed while writing step 8: the partial checkpoint is never taken for a complete one.
    killed = run_pretrain(*args(workdir, "chain"), cwd=workdir, env={**ENV, "PRETRAIN_FAULT": "kill_in_save=8"})
    assert killed.returncode == -signal.SIGKILL
    assert "resumed from" in killed.stdout and "at step 4" in killed.stdout
    partial = run_dir / "checkpoints" / "step_0000008.partial"
    assert (partial / "mp_rank_00_model_states.pt").is_file() and not (partial / "COMPLETE").exists()
    assert complete_steps(run_dir) == [4]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000004"

    # SIGTERM: a checkpoint at the next step boundary, then the requeue exit status.
    status, output = signal_after("step      5/12", signal.SIGTERM, args(workdir, "chain"), workdir)
    assert status == 75, output[-3000:]
    assert "at step 4" in output and "(SIGTERM)" in output and "stopped by SIGTERM" in output
    stopped_at = max(complete_steps(run_dir))
    assert 5 <= stopped_at < STEPS
    assert [r["step"] for r in records(run_dir) if "loss" in r][-1] == stopped_at  # no step after the save
    assert not partial.exists()  # removed by the next good save

    # SIGUSR1: a checkpoint at the next step boundary, and the run goes on to the end.
    status, output = signal_after(f"step {stopped_at + 1:>6}/12", signal.SIGUSR1, args(workdir, "chain"), workdir)
    assert status == 0, output[-3000:]
    assert f"at step {stopped_at}" in output and "── summary" in output
    (signalled,) = [int(line.split()[1]) for line in output.splitlines() if line.endswith("(SIGUSR1)")]
    assert stopped_at < signalled <= STEPS

    # Every step the chain logged, redone ones included, is the straight run's step.
    chain = [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]
    assert sorted({s for s, _ in chain}) == list(range(1, STEPS + 1))
    assert len(chain) > STEPS  # steps lost to the kills were redone
    assert all(loss == straight[step] for step, loss in chain), [(s, l, straight[s]) for s, l in chain]
    final, expected = model_weights(run_dir / "checkpoints" / "step_0000012"), \
        model_weights(workdir / "straight" / "checkpoints" / "step_0000012")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def copy_checkpoint(workdir: Path, name: str) -> Path:
    """A run directory holding a copy of the straight run's last checkpoint."""
    import shutil

    run_dir = workdir / name
    shutil.copytree(workdir / "straight" / "checkpoints" / "step_0000012",
                    run_dir / "checkpoints" / "step_0000012")
    return run_dir / "checkpoints" / "step_0000012"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name,damage,override,expected", [
    ("truncated", lambda c: truncate(c / "mp_rank_00_model_states.pt"), "",
     "mp_rank_00_model_states.pt: {size} bytes, the checkpoint manifest says"),
    ("no_tokenizer", lambda c: (c / "tokenizer.model").unlink(), "", "tokenizer.model: missing from checkpoint step_0000012"),
    ("incomplete", lambda c: (c / "COMPLETE").unlink(), "trainer.resume={checkpoint}", "incomplete checkpoint (no COMPLETE"),
    ("model_shape", lambda c: None, "model.hidden_size=128",
     "written for model.hidden_size=64, but the config has model.hidden_size=128"),
])
def test_bad_checkpoints_fail_in_one_line_and_stay(workdir, straight, name, damage, override, expected):
    checkpoint = copy_checkpoint(workdir, f"bad_{name}")
    damage(checkpoint)
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    extra = (override.format(checkpoint=checkpoint),) if override else ()
    result = run_pretrain(*args(workdir, checkpoint.parent.parent.name, *extra), cwd=workdir, env=ENV)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("pretrain: error:")]
    size = (checkpoint / "mp_rank_00_model_states.pt").stat().st_size
    assert len(lines) == 1 and expected.format(size=size) in lines[0], result.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before  # nothing written or removed
    assert sorted(p.name for p in checkpoint.parent.parent.iterdir()) == ["checkpoints"]


# --- two ranks ------------------------------------------------------------------------------

class SignalOnce:
    """Sends this process `signum` after `step`, on one rank only."""

    def __init__(self, step: int, rank: int, signum: int):
        self.step, self.rank, self.signum = step, rank, signum

    def on_train_start(self, trainer): ...

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == self.step and trainer.topology.rank == self.rank:
            os.kill(os.getpid(), self.signum)

    def on_train_end(self, trainer): ...


def two_rank_resumes(root: str) -> dict:
    """A straight run, a run whose last save never completed, and its resume (where
    rank 1 alone gets a SIGUSR1). DP=2 with ZeRO-1, the layout whose ranks each hold
    a different part of the optimizer state."""
    import torch.distributed as dist

    from checkpointing import make_trainer, train, weights
    from parallel.groups import init_process_groups
    from pretrain.checkpoint import files as checkpoint
    from pretrain.training.preemption import SaveTriggers

    topology = init_process_groups(1, 1, torch.device("cpu"))
    straight = train(make_trainer(topology, Path(root) / "straight", zero=1), 6)
    run_dir = Path(root) / "resumed"
    train(make_trainer(topology, run_dir, checkpoint_interval=3, zero=1), 5)
    if topology.rank == 0:  # the save of step 5 never finished
        (run_dir / "checkpoints" / "step_0000005" / checkpoint.COMPLETE).unlink()
    dist.barrier()
    triggers = SaveTriggers(0, 0, topology.device)  # the signal handlers of the resumed run
    resumed = make_trainer(topology, run_dir, triggers, zero=1)
    triggers.install()
    resumed.callbacks.insert(0, SignalOnce(step=4, rank=1, signum=signal.SIGUSR1))
    resumed.load_checkpoint(checkpoint.resolve_resume(str(run_dir), "auto"))
    start = resumed.state.step
    record = train(resumed, 6)
    triggers.uninstall()
    return {
        "start": start,
        "straight": [m["loss"] for m in straight.metrics],
        "resumed": [m["loss"] for m in record.metrics],
        "same_weights": all(torch.equal(a, b) for a, b in zip(weights(resumed), straight.weights[-1], strict=True)),
        "complete": [s for s, _ in checkpoint.complete_checkpoints(run_dir)],
    }


def test_a_signal_to_one_rank_saves_on_all_and_resume_is_exact(tmp_path):
    for rank, result in enumerate(run_distributed(two_rank_resumes, 2, str(tmp_path))):
        assert result["start"] == 3, rank
        assert result["resumed"] == result["straight"][3:], (rank, result)
        assert result["same_weights"], rank
        # Rank 1's SIGUSR1 made both ranks save at step 4, which removed the unfinished 5.
        assert result["complete"] == [3, 4, 6], (rank, result["complete"])
