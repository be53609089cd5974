"""Slurm: render the sbatch script of a run, check it against the cluster, submit it.

The job runs one srun task per node; each task is `python -m launch.node`,
which starts torchrun with a c10d rendezvous on the job's first node (see
launch/node.py). Preemption and time limits follow one path:

1. `--signal=B:USR1@<launcher.signal_seconds>` makes Slurm send USR1 to the
   batch script alone, before the time limit (or an operator sends it with
   `scancel --batch --signal=USR1 <job>`).
2. The script's trap forwards it with `scancel --signal=USR1 <job>`, which
   reaches every process of the job's steps on every node. torchrun and the
   per-rank log copiers ignore it; the training processes checkpoint at their
   next step and go on.
3. The trap waits (at most `launcher.save_wait_seconds`) until
   `checkpoints/latest` names a new checkpoint, then runs
   `scontrol requeue <job>`: Slurm stops the job and queues it again, and the
   rerun of the same script resumes from that checkpoint (trainer.resume=auto).

A requeue from outside (`scontrol requeue`, a node failure with --requeue)
reruns the script the same way, from the newest periodic checkpoint. Every
value that could differ between runs (the run directory, times) is resolved
when the script is rendered, so each rerun trains the same run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launch.commands import TRAIN_MODULE
from launch.config import SlurmLauncher
from common.typed_config import ConfigError

SCRIPT_NAME = "job.sbatch"


def output_path(cfg: SlurmLauncher, run_dir: Path) -> Path:
    return Path(cfg.output) if cfg.output else run_dir / "logs" / "slurm-%j.out"


def directives(cfg: SlurmLauncher, run_dir: Path) -> list[str]:
    lines = [f"--job-name={cfg.job_name}", f"--nodes={cfg.nodes}", "--ntasks-per-node=1"]
    if cfg.gpus_per_node:
        lines.append(f"--gpus-per-node={cfg.gpus_per_node}")
    if cfg.cpus_per_node:
        lines.append(f"--cpus-per-task={cfg.cpus_per_node}")  # one task per node
    for key in ("mem", "partition", "account", "qos", "time"):
        if getattr(cfg, key) is not None:
            lines.append(f"--{key}={getattr(cfg, key)}")
    lines += [f"--output={output_path(cfg, run_dir)}", "--open-mode=append"]  # reruns append
    lines.append("--requeue" if cfg.requeue else "--no-requeue")
    if cfg.signal_seconds:
        lines.append(f"--signal=B:USR1@{cfg.signal_seconds}")
    return lines + list(cfg.directives)


def node_command(cfg: SlurmLauncher, overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "launch.node"]
    if cfg.rdzv_port is not None:
        command.append(f"--rdzv-port={cfg.rdzv_port}")
    return [*command, f"--nproc_per_node={cfg.procs_per_node}", f"--max_restarts={cfg.max_restarts}",
            "-m", TRAIN_MODULE, *overrides]


def render_sbatch(cfg: SlurmLauncher, overrides: list[str], run_dir: Path, workdir: Path) -> str:
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if cfg.cpus_per_node:
        srun.append(f"--cpus-per-task={cfg.cpus_per_node}")  # srun does not inherit it from sbatch
    setup = "\n".join(cfg.setup) if cfg.setup else "# (none: launcher.setup)"
    return f"""#!/bin/bash
# Rendered by pretrain-launch (launcher=slurm); submit with `sbatch {SCRIPT_NAME}`.
{chr(10).join('#SBATCH ' + line for line in directives(cfg, run_dir))}

# Environment set-up.
{setup}

cd {shlex.quote(str(workdir))}
export PYTHONUNBUFFERED=1
RUN_DIR={shlex.quote(str(run_dir))}
SAVE_WAIT_SECONDS={cfg.save_wait_seconds}
REQUEUE={int(cfg.requeue)}
echo "pretrain-launch: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST"

# USR1 (from --signal before the time limit, or `scancel --batch --signal=USR1`):
# forward it to the training processes, which checkpoint at their next step;
# once the checkpoint is written, requeue this job to resume from it.
latest_checkpoint() {{ cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || true; }}
on_usr1() {{
  local before waited
  before=$(latest_checkpoint)
  echo "pretrain-launch: USR1: asking the training processes for a checkpoint"
  scancel --signal=USR1 "$SLURM_JOB_ID"
  for ((waited = 0; waited < SAVE_WAIT_SECONDS; waited++)); do
    [ "$(latest_checkpoint)" != "$before" ] && break
    kill -0 "$TRAIN_PID" 2>/dev/null || return 0
    sleep 1
  done
  if [ "$REQUEUE" = 1 ]; then
    echo "pretrain-launch: checkpoint '$(latest_checkpoint)'; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
}}
trap on_usr1 USR1

# One task per node: torchrun with a c10d rendezvous on the first node.
{shlex.join(srun)} \\
  {shlex.join(node_command(cfg, overrides))} &
TRAIN_PID=$!
# `wait` returns early when a trapped signal arrives; wait again until srun has ended.
while :; do
  wait "$TRAIN_PID"
  status=$?
  kill -0 "$TRAIN_PID" 2>/dev/null || break
done
exit "$status"
"""


def check_partition(cfg: SlurmLauncher) -> None:
    """A partition the cluster does not have fails here, not after waiting in the queue."""
    if cfg.partition is None or shutil.which("sinfo") is None:
        return
    result = subprocess.run(["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        return  # no controller to ask; sbatch will report it
    partitions = sorted(set(result.stdout.split()))
    if cfg.partition not in partitions:
        raise ConfigError(f"launcher.partition={cfg.partition}: no such Slurm partition; "
                          f"sinfo lists {', '.join(partitions) or 'none'}")


def write_script(text: str, run_dir: Path) -> Path:
    path = run_dir / SCRIPT_NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.chmod(0o755)
    os.replace(temporary, path)
    return path


def submit_slurm(cfg: SlurmLauncher, overrides: list[str], run_dir: Path) -> int:
    sbatch = shutil.which(cfg.sbatch)
    if sbatch is None and not cfg.dry_run:
        raise ConfigError(f"launcher.sbatch={cfg.sbatch}: not installed (no such command on PATH); "
                          "install Slurm's client commands, or pass --dry-run to only write the script")
    from pretrain.checkpoint.run_lock import RunDirLock

    RunDirLock(run_dir).check_free()  # a live job's script and logs are left as they are
    script = write_script(render_sbatch(cfg, overrides, run_dir, Path.cwd()), run_dir)
    log = output_path(cfg, run_dir)
    if "%" not in str(log.parent):
        log.parent.mkdir(parents=True, exist_ok=True)  # Slurm does not create it
    if cfg.dry_run:
        print(f"wrote {script} (not submitted: --dry-run)", flush=True)
        return 0
    result = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise ConfigError(f"sbatch {script}: {reason}")
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted Slurm job {job_id}: script {script}, log {str(log).replace('%j', job_id)}",
          flush=True)
    return 0
