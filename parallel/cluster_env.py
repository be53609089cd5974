"""Where this process sits in a job: rank, local rank, world size and rendezvous address.

Every launcher describes the job in its own variables: torchrun and the
deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT,
`srun` sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and `mpirun` (OpenMPI)
sets OMPI_COMM_WORLD_*. `detect()` reads whichever are present and refuses,
in one line, a process whose sources disagree, before any rank blocks waiting
for peers that will never come.

Every rank runs it, beside the process groups (`parallel.groups`); the launch
commands use it to read a job's variables too. Kept free of torch imports:
`pretrain` calls it before the heavy imports.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from common.errors import UserError

DEFAULT_PORT = 29500


class ClusterEnvError(UserError, RuntimeError):
    """The launcher variables of this process are missing or contradict each other."""


@dataclass(frozen=True)
class ClusterEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int | None  # None: a world of one picks a free port itself
    source: str  # "single", "torchrun" (also the deepspeed launcher and pretrain-launch), "slurm", "openmpi"

    @property
    def launched(self) -> bool:
        return self.source != "single"

    def as_environ(self) -> dict[str, str]:
        values = {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank),
                  "WORLD_SIZE": str(self.world_size), "MASTER_ADDR": self.master_addr}
        if self.master_port is not None:
            values["MASTER_PORT"] = str(self.master_port)
        return values


def _int(env: Mapping[str, str], key: str) -> int | None:
    if key not in env:
        return None
    try:
        return int(env[key])
    except ValueError:
        raise ClusterEnvError(f"{key}={env[key]!r}: expected an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as `gpu[003-005,010],cpu1` (here: gpu003)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ClusterEnvError(f"SLURM_JOB_NODELIST={nodelist!r}: expected a Slurm node list")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_port(job_id: int | None) -> int:
    """A port that differs between jobs sharing a node, and is the same on every node of a job."""
    return DEFAULT_PORT if job_id is None else 20000 + job_id % 20000


def _check(rank: int, world_size: int, local_rank: int, source: str) -> None:
    if world_size < 1:
        raise ClusterEnvError(f"{source}: world size {world_size}: expected >= 1")
    if not 0 <= rank < world_size:
        raise ClusterEnvError(f"{source}: rank {rank}: expected 0 <= rank < world size {world_size}")
    if not 0 <= local_rank <= rank:
        raise ClusterEnvError(f"{source}: local rank {local_rank}: expected 0 <= local rank <= rank {rank}")


def _agree(launcher: dict[str, int | None], other: dict[str, int | None], what: str) -> None:
    """When another source describes the same world (same size), its rank must be the same."""
    size_key, rank_key, local_key = other  # keys in (size, rank, local rank) order
    if other[size_key] is None or other[size_key] != launcher["WORLD_SIZE"]:
        return  # e.g. one Slurm task per node running torchrun: a different, coarser world
    for ours, theirs in (("RANK", rank_key), ("LOCAL_RANK", local_key)):
        if other[theirs] is not None and launcher[ours] is not None and other[theirs] != launcher[ours]:
            raise ClusterEnvError(
                f"{ours}={launcher[ours]} but {theirs}={other[theirs]} with "
                f"WORLD_SIZE={size_key}={launcher['WORLD_SIZE']}: the launcher and {what} "
                "disagree on this process's place in the job"
            )


def detect(env: Mapping[str, str] | None = None) -> ClusterEnv:
    env = os.environ if env is None else env
    launcher = {k: _int(env, k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    slurm = {k: _int(env, k) for k in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")}
    mpi = {k: _int(env, k) for k in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                                     "OMPI_COMM_WORLD_LOCAL_RANK")}
    port = _int(env, "MASTER_PORT")

    if launcher["RANK"] is not None or launcher["WORLD_SIZE"] is not None:
        if launcher["RANK"] is None or launcher["WORLD_SIZE"] is None:
            present, missing = ("RANK", "WORLD_SIZE") if launcher["RANK"] is not None else ("WORLD_SIZE", "RANK")
            raise ClusterEnvError(f"{present}={env[present]} is set but {missing} is not: "
                                  "expected both from the launcher")
        rank, world = launcher["RANK"], launcher["WORLD_SIZE"]
        local = launcher["LOCAL_RANK"] if launcher["LOCAL_RANK"] is not None else rank
        _check(rank, world, local, "RANK/WORLD_SIZE")
        # torchrun numbers its workers itself (in rendezvous order), so under
        # torchrun another source's rank is that of the agent, not of this worker.
        if "TORCHELASTIC_RUN_ID" not in env:
            if "SLURM_STEP_ID" in env or "SLURM_STEPID" in env:
                _agree(launcher, slurm, "Slurm")
            _agree(launcher, mpi, "OpenMPI")
        if world > 1 and ("MASTER_ADDR" not in env or port is None):
            raise ClusterEnvError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set: "
                                  "expected the rendezvous address from the launcher")
        return ClusterEnv(rank, local, world, env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")

    # `srun python -m pretrain.main`: one Slurm task per rank. The batch script
    # itself also carries SLURM_PROCID/SLURM_NTASKS, but only tasks of a step
    # have a step id; a plain `pretrain` in the batch script is a world of one.
    if slurm["SLURM_PROCID"] is not None and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        rank, world = slurm["SLURM_PROCID"], slurm["SLURM_NTASKS"] or 1
        local = slurm["SLURM_LOCALID"] if slurm["SLURM_LOCALID"] is not None else 0
        _check(rank, world, local, "SLURM_PROCID/SLURM_NTASKS")
        if world == 1:
            return ClusterEnv(0, 0, 1, "127.0.0.1", port, "single")
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env:
            addr = first_slurm_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        else:
            raise ClusterEnvError("SLURM_NTASKS>1 but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
        return ClusterEnv(rank, local, world, addr, port or slurm_port(_int(env, "SLURM_JOB_ID")), "slurm")

    if mpi["OMPI_COMM_WORLD_RANK"] is not None:
        rank, world = mpi["OMPI_COMM_WORLD_RANK"], mpi["OMPI_COMM_WORLD_SIZE"] or 1
        local = mpi["OMPI_COMM_WORLD_LOCAL_RANK"] if mpi["OMPI_COMM_WORLD_LOCAL_RANK"] is not None else 0
        _check(rank, world, local, "OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE")
        if world == 1:
            return ClusterEnv(0, 0, 1, "127.0.0.1", port, "single")
        if "MASTER_ADDR" not in env:
            raise ClusterEnvError(f"OMPI_COMM_WORLD_SIZE={world} but MASTER_ADDR is not set: "
                                  "pass -x MASTER_ADDR=<first host> -x MASTER_PORT=<port> to mpirun")
        return ClusterEnv(rank, local, world, env["MASTER_ADDR"], port or DEFAULT_PORT, "openmpi")

    return ClusterEnv(0, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")
