"""A real one-node Slurm cluster on localhost: `pretrain-launch launcher=slurm` submits the
rendered sbatch script, the job trains and checkpoints; USR1 (as before a time limit)
makes the job checkpoint and requeue itself, `scontrol requeue` from outside does the
same, and each rerun resumes to the same final step.

Installs Debian's slurm-wlm and munge with apt where they are missing; skips without
root, apt or the packages, except under CI (CI=true), where that is a failure (see
conftest.missing_prerequisite). The daemons it starts are stopped by their pids."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.net import free_port
from conftest import TINY, assert_resumed_run_matches, missing_prerequisite

LAUNCH = os.path.join(os.path.dirname(sys.executable), "pretrain-launch")
STEPS, INTERVAL = 200, 10
DAEMONS = ("slurmctld", "slurmd", "sbatch", "munged")

pytestmark = [pytest.mark.slow, pytest.mark.needs_root("installing and running Slurm's daemons")]


def install_slurm() -> None:
    if all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS):
        return
    if shutil.which("apt-get") is None:
        missing_prerequisite("Slurm is not installed and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        missing_prerequisite(f"apt-get could not install slurm-wlm and munge: {result.stderr.strip()[-300:]}")


def munge_works() -> bool:
    if shutil.which("munge") is None:
        return False
    encoded = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    return encoded.returncode == 0 and subprocess.run(
        ["unmunge"], input=encoded.stdout, capture_output=True, timeout=10).returncode == 0


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster; yields the environment that points clients at it."""
    install_slurm()
    root = tmp_path_factory.mktemp("slurm")
    started: list[subprocess.Popen] = []
    try:
        if not munge_works():
            key = Path("/etc/munge/munge.key")
            if not key.exists():
                subprocess.run(["mungekey", "--create"], check=True, timeout=30)
                shutil.chown(key, "munge", "munge")
            Path("/run/munge").mkdir(exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            started.append(subprocess.Popen(["/usr/sbin/munged", "--foreground"], user="munge",
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_until(munge_works, 30, "munged")
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (root / sub).mkdir()
        conf = root / "slurm.conf"
        conf.write_text(f"""ClusterName=pretraintest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=30
MinJobAge=600
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        env = {**os.environ, "SLURM_CONF": str(conf)}
        for daemon in ("slurmctld", "slurmd"):
            started.append(subprocess.Popen([f"/usr/sbin/{daemon}", "-D", "-f", str(conf)], env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def node_idle():
            for proc in started:
                assert proc.poll() is None, f"{proc.args[0]} exited: {(root / 'slurmctld.log').read_text()[-2000:]}"
            state = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=env, capture_output=True,
                                   text=True, timeout=30).stdout.strip()
            return state == "idle"

        wait_until(node_idle, 90, "the Slurm node to become idle")
        yield env
    finally:
        for proc in reversed(started):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def scontrol(env, *args) -> str:
    result = subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def job_field(env, job: str, field: str) -> str:
    match = re.search(rf"\b{field}=(\S+)", scontrol(env, "show", "job", job))
    return match.group(1) if match else ""


def latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("_")[-1]) if pointer.exists() else 0


def resumed_steps(run_dir: Path) -> list[int]:
    log = run_dir / "logs" / "rank0.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [int(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("resumed from")]


def test_job_trains_requeues_and_resumes(slurm, tmp_path):
    env = {**slurm, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run_dir = tmp_path / "run"
    # A partition the cluster lacks is refused by asking sinfo, before anything queues.
    refused = subprocess.run([LAUNCH, "launcher=slurm", "launcher.partition=nosuch", *TINY,
                              f"trainer.run_dir={tmp_path / 'refused'}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr
    assert "launcher.partition=nosuch: no such Slurm partition; sinfo lists debug" in errors[0]
    assert not (tmp_path / "refused").exists()

    submitted = subprocess.run(
        [LAUNCH, "launcher=slurm", "launcher.partition=debug", "launcher.time=00:30:00",
         "launcher.signal_seconds=60", "launcher.save_wait_seconds=30", "launcher.job_name=pretrain-test",
         *TINY, f"data.cache_dir={tmp_path / 'cache'}", f"trainer.run_dir={run_dir}",
         f"trainer.train_steps={STEPS}", f"trainer.checkpoint_interval={INTERVAL}",
         "trainer.eval_interval=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"submitted Slurm job (\d+)", submitted.stdout).group(1)
    log = run_dir / "logs" / f"slurm-{job}.out"
    try:
        def release_if_held():
            # A requeued job waits for a begin time; let it start now.
            if job_field(env, job, "JobState") == "PENDING":
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env,
                               capture_output=True, timeout=60)

        # 1. The job trains and checkpoints. USR1 to the batch script, as Slurm sends it
        #    before the time limit: the trap forwards it and requeues after a checkpoint.
        wait_until(lambda: latest_step(run_dir) >= INTERVAL, 240, "the first checkpoint")
        first = latest_step(run_dir)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=60)
        wait_until(lambda: "requeueing job" in log.read_text(), 120, "the job to requeue itself")

        # 2. The rerun resumes and checkpoints; `scontrol requeue` from outside interrupts it.
        def rerun_checkpointed():
            release_if_held()
            steps = resumed_steps(run_dir)
            return len(steps) == 1 and latest_step(run_dir) > steps[0]

        wait_until(rerun_checkpointed, 240, "the requeued job to resume and checkpoint")
        assert latest_step(run_dir) < STEPS, "the run finished before it could be requeued"
        scontrol(env, "requeue", job)

        # 3. The last rerun finishes the run.
        wait_until(lambda: (release_if_held() or True) and job_field(env, job, "JobState") == "COMPLETED",
                   300, "the job to complete")
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True, timeout=60)
    text = log.read_text()
    assert "restart 2" in text, text[-3000:]
    assert "torch.distributed.run --nnodes=1 --rdzv_backend=c10d" in text
    resumed = resumed_steps(run_dir)
    assert len(resumed) == 2 and resumed[0] >= first and resumed[1] > resumed[0], resumed

    assert_resumed_run_matches(run_dir, STEPS)
