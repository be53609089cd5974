import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parent.parent


# --- prerequisites: a skip on a developer's machine, a failure under CI ----------------------

def under_ci() -> bool:
    """Whether CI runs this session (`CI=true bash .ci/run`; CI=1 counts too)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def missing_prerequisite(reason: str) -> NoReturn:
    """Skips a test this machine cannot run, but fails it under CI: CI runs the suite as
    root on a machine that has what every test needs, where a skip would hide a test
    that then runs nowhere."""
    if under_ci():
        pytest.fail(f"{reason} (CI={os.environ['CI']}: CI runs this suite as root with every "
                    f"prerequisite, so this test must run there, not skip)", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """`@pytest.mark.needs_root("what for")`: checked before any fixture starts a daemon."""
    marker = item.get_closest_marker("needs_root")
    if marker is not None and os.geteuid() != 0:
        what = marker.args[0] if marker.args else item.nodeid
        missing_prerequisite(f"needs root ({what}), and this process runs as uid {os.geteuid()}")


@pytest.fixture
def one_thread():
    """One intra-op thread: a busy 2-core machine runs several test processes at once."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def single_process_groups():
    """megatron-core's parallel_state for a world of one (gloo, CPU), shared by a test session."""
    import torch

    from parallel.groups import destroy_process_groups, init_process_groups

    topology = init_process_groups(1, 1, torch.device("cpu"))
    yield topology
    destroy_process_groups()


@pytest.fixture(scope="session")
def tiny_data_cache(tmp_path_factory) -> Path:
    """A data.cache_dir shared by a test session's TINY runs: the tokenizer and shards are
    prepared once (several seconds) rather than once per test module."""
    return tmp_path_factory.mktemp("tiny_data_cache")


RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env(env: dict | None = None) -> dict:
    """The environment for a `pretrain` (or torchrun) child process: this one's, without the
    rendezvous variables of its own process group if it has one, unbuffered, W&B offline."""
    full_env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    return {**full_env, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}


def run_pretrain(*overrides: str, cwd: Path, timeout: int = 600, env: dict | None = None):
    """Runs the `pretrain` console entry point in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "pretrain.main", *overrides],
        cwd=cwd, env=child_env(env), capture_output=True, text=True, timeout=timeout,
    )


def complete_steps(run_dir: Path) -> list[int]:
    """The steps of a run directory's complete checkpoints, oldest first."""
    from pretrain.checkpoint.files import complete_checkpoints

    return [step for step, _ in complete_checkpoints(run_dir)]


def assert_resumed_run_matches(run_dir: Path, steps: int) -> None:
    """A run that was interrupted and resumed ends at `steps`, and every step it
    trained twice logged the same loss both times (bit-exact resume)."""
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == steps
    losses: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses.setdefault(record["step"], []).append(record["loss"])
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(len(set(values)) == 1 for values in losses.values()), losses


# Small enough that a run takes seconds: a 1 MB slice of the standard library,
# a 512-piece tokenizer, two layers of width 64.
TINY = (
    "data.max_corpus_bytes=1000000",
    "data.tokenizer.vocab_size=512",
    "data.tokenizer.sample_bytes=500000",
    "data.seq_len=64",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=128",
    "trainer.micro_batch_size=8",
    "trainer.global_batch_size=8",
    "trainer.eval_batches=2",
    "trainer.log_interval=5",
    "optim.warmup_steps=5",
    "trainer.compile=none",  # compiling would cost more than these few steps
)
