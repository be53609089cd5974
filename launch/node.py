"""The srun task of a Slurm job on each node: torchrun with a c10d rendezvous.

`python -m launch.node [--rdzv-port=P] TORCHRUN_ARGS...` adds what only the
node itself knows: the job's first node (from SLURM_JOB_NODELIST) as the
rendezvous endpoint, whether this node hosts the store (SLURM_NODEID 0; not
left to torchrun's hostname guess), the node count, and the job id as the
rendezvous id. It then becomes torchrun (exec).

SIGUSR1 is set to be ignored first: the batch script forwards it to every
process of the job step, and torchrun would die of it. Ignoring is inherited
by the training processes until the trainer installs its own handler, so a
signal that arrives during start-up is dropped rather than fatal.
"""

from __future__ import annotations

import os
import signal
import sys

from launch.commands import TORCHRUN_ENV
from parallel.cluster_env import first_slurm_host, slurm_port


def torchrun_argv(argv: list[str], env: dict[str, str]) -> list[str]:
    port = None
    rest = []
    for arg in argv:
        if arg.startswith("--rdzv-port="):
            port = int(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    job_id = env.get("SLURM_JOB_ID")
    head = first_slurm_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
    port = port or slurm_port(int(job_id) if job_id else None)
    is_host = int(env.get("SLURM_NODEID", "0") == "0")
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={env.get('SLURM_JOB_NUM_NODES') or env.get('SLURM_NNODES', '1')}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={head}:{port}",
            f"--rdzv_id=slurm-{job_id or 'job'}", f"--rdzv_conf=is_host={is_host}", *rest]


def main() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.environ.update(TORCHRUN_ENV)
    argv = torchrun_argv(sys.argv[1:], dict(os.environ))
    print("pretrain-launch: node", os.environ.get("SLURM_NODEID", "?"), ":", " ".join(argv), flush=True)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
