"""Two nodes on this machine: Linux network namespaces joined by a veth pair, each with
its own address, run `pretrain-launch launcher=torchrun` and meet through a c10d
rendezvous. Killing one node's worker makes torchrun restart the workers of both
nodes, and training resumes from the last checkpoint to the same final step."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, assert_resumed_run_matches, missing_prerequisite

LAUNCH = os.path.join(os.path.dirname(sys.executable), "pretrain-launch")
STEPS, INTERVAL = 40, 10

pytestmark = [pytest.mark.slow, pytest.mark.needs_root("network namespaces")]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_nodes():
    """Namespaces A (10.213.0.1) and B (10.213.0.2); yields [(namespace, address, interface)]."""
    if shutil.which("ip") is None:
        missing_prerequisite("the `ip` command (iproute2) is not installed")
    tag = str(os.getpid() % 100000)
    nodes = [(f"ptl-a{tag}", "10.213.0.1", f"vpa{tag}"), (f"ptl-b{tag}", "10.213.0.2", f"vpb{tag}")]
    created = []
    try:
        for namespace, _, _ in nodes:
            ip("netns", "add", namespace)
            created.append(namespace)
        ip("link", "add", nodes[0][2], "type", "veth", "peer", "name", nodes[1][2])
        for namespace, address, interface in nodes:
            ip("link", "set", interface, "netns", namespace)
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            ip("-n", namespace, "link", "set", interface, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as err:
        for namespace in created:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        missing_prerequisite(f"cannot create network namespaces here: {err.stderr.strip()}")
    yield nodes
    for namespace in created:  # deleting a namespace deletes its end of the veth pair
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def training_worker(launcher_pid: int) -> int | None:
    """The `pretrain.main` process torchrun started under this node's launcher."""
    for pid in descendants(launcher_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pretrain.main" in argv and b"torch.distributed.run" not in argv:
            return pid
    return None


def wait_for(condition, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            assert proc.poll() is None, f"a node exited with {proc.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def test_two_nodes_rendezvous_restart_and_resume(two_nodes, tmp_path):
    run_dir = tmp_path / "run"
    endpoint = f"{two_nodes[0][1]}:29431"
    overrides = [*TINY, f"data.cache_dir={tmp_path / 'cache'}", f"trainer.run_dir={run_dir}",
                 f"trainer.train_steps={STEPS}", f"trainer.checkpoint_interval={INTERVAL}",
                 "trainer.eval_interval=0", "trainer.micro_batch_size=4"]
    procs, outputs = [], []
    try:
        for namespace, address, interface in two_nodes:
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
            # The hostname resolves to an address outside the namespace; gloo must use the veth.
            env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", GLOO_SOCKET_IFNAME=interface)
            output = open(tmp_path / f"{namespace}.out", "w")
            outputs.append(output)
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", namespace, LAUNCH, "launcher=torchrun", "launcher.nnodes=2",
                 "launcher.nproc_per_node=1", f"launcher.rdzv_endpoint={endpoint}",
                 "launcher.max_restarts=2", "launcher.probe_seconds=120", *overrides],
                cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT))

        latest = run_dir / "checkpoints" / "latest"
        wait_for(latest.exists, 600, "the first checkpoint", procs)
        worker = training_worker(procs[1].pid)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        for proc in procs:
            proc.wait(timeout=600)
    finally:  # torchrun starts its workers in their own sessions: stop the whole tree by pid
        for proc in procs:
            if proc.poll() is None:
                for pid in [*descendants(proc.pid), proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait(timeout=30)
        for output in outputs:
            output.close()
    logs = [(tmp_path / f"{ns}.out").read_text() for ns, _, _ in two_nodes]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    # Node A hosts the store and both meet there; the workers ran twice.
    assert "--rdzv_conf=is_host=1" in logs[0] and "--rdzv_conf=is_host=0" in logs[1]
    assert "--local_addr=10.213.0.2" in logs[1]
    rank_logs = "".join((run_dir / "logs" / f"rank{r}.log").read_text() for r in (0, 1))
    resumed = [line for line in rank_logs.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1, rank_logs[-3000:]
    resume_step = int(resumed[0].rsplit(" ", 1)[1])
    assert resume_step % INTERVAL == 0 and 0 < resume_step < STEPS

    # The run ends at the same step, and the steps trained twice gave the same loss.
    assert_resumed_run_matches(run_dir, STEPS)
