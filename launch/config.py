"""Typed launcher configuration: the `launcher` group of the Hydra tree.

`launcher=local|torchrun|deepspeed|slurm` picks one of these dataclasses by
its `kind`; a key that belongs to another kind is refused by name, and every
check that needs no cluster is made here, in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from common.typed_config import from_dict, require


def _positive(obj, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        require(value is None or value >= 1, f"launcher.{key}={value}: expected >= 1")


def host_port(key: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    require(bool(sep) and bool(host) and port.isdigit() and 0 < int(port) < 65536,
            f"launcher.{key}={value}: expected HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass
class LocalLauncher:
    """N processes on this machine (CPU, or one GPU each), output prefixed by rank."""

    kind: Literal["local"] = "local"
    nproc_per_node: int = 1
    dry_run: bool = False

    def __post_init__(self) -> None:
        _positive(self, "nproc_per_node")

    def world_size(self) -> int:
        return self.nproc_per_node


@dataclass
class TorchrunLauncher:
    """torchrun on this node; several nodes meet through a c10d store (or static ranks)."""

    kind: Literal["torchrun"] = "torchrun"
    nproc_per_node: int = 1
    nnodes: int = 1
    # c10d rendezvous: HOST:PORT of the store, served by the node whose address it is.
    rdzv_endpoint: str | None = None
    rdzv_id: str = "pretrain"
    # This node's address as the other nodes reach it; None: the one that routes to the endpoint.
    local_addr: str | None = None
    # Static rendezvous instead: every node names its index and the first node's address.
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int = 29500
    max_restarts: int = 0
    # How long a node waits for the first node's endpoint to accept TCP before giving up.
    probe_seconds: float = 60.0
    dry_run: bool = False

    def __post_init__(self) -> None:
        _positive(self, "nproc_per_node", "nnodes")
        require(self.max_restarts >= 0, f"launcher.max_restarts={self.max_restarts}: expected >= 0")
        require(self.probe_seconds >= 0, f"launcher.probe_seconds={self.probe_seconds}: expected >= 0")
        if self.rdzv_endpoint is not None:
            host_port("rdzv_endpoint", self.rdzv_endpoint)
            require(self.node_rank is None and self.master_addr is None,
                    "launcher.rdzv_endpoint with launcher.node_rank/master_addr: expected either "
                    "a c10d endpoint or static node ranks, not both")
        elif self.nnodes > 1:
            require(self.master_addr is not None and self.node_rank is not None,
                    f"launcher.nnodes={self.nnodes}: expected launcher.rdzv_endpoint=HOST:PORT "
                    "(c10d) or launcher.master_addr and launcher.node_rank (static)")
        if self.node_rank is not None:
            require(0 <= self.node_rank < self.nnodes,
                    f"launcher.node_rank={self.node_rank}: expected 0 <= node_rank < "
                    f"launcher.nnodes={self.nnodes}")

    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


@dataclass
class DeepSpeedLauncher:
    """The `deepspeed` launcher: this machine, or the hosts of a hostfile (over ssh/pdsh)."""

    kind: Literal["deepspeed"] = "deepspeed"
    nproc_per_node: int = 1  # without a hostfile: processes on this machine
    hostfile: str | None = None  # lines of `HOST slots=N`
    include: str | None = None  # e.g. `node1:0,1@node2`
    exclude: str | None = None
    master_addr: str | None = None
    master_port: int | None = None  # None: a free port
    dry_run: bool = False

    def __post_init__(self) -> None:
        _positive(self, "nproc_per_node")
        require(not (self.include and self.exclude),
                "launcher.include with launcher.exclude: expected at most one of them")


SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_seconds(time: str) -> int | None:
    """Seconds in a Slurm time limit (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`); None: unlimited."""
    if time.lower() in ("unlimited", "infinite"):
        return None
    match = SLURM_TIME.match(time)
    require(match is not None, f"launcher.time={time}: expected [D-]HH:MM:SS, MM or UNLIMITED")
    days, a, b, c = match.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if c is not None:
        return (int(a) * 60 + int(b)) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # MM or MM:SS


@dataclass
class SlurmLauncher:
    """An sbatch job: one srun task per node runs torchrun, meeting on the first node."""

    kind: Literal["slurm"] = "slurm"
    nodes: int = 1
    nproc_per_node: int | None = None  # None: gpus_per_node, or 1 without GPUs
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    mem: str | None = None  # e.g. 0 (all of it) or 200G
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"
    job_name: str = "pretrain"
    output: str | None = None  # None: <run_dir>/logs/slurm-%j.out; stderr goes to the same file
    requeue: bool = True
    # USR1 reaches the training processes this long before the time limit; they
    # checkpoint, then the job requeues itself. 0: no signal.
    signal_seconds: int = 120
    # After USR1, how long to wait for the new checkpoint before requeueing anyway.
    save_wait_seconds: int = 90
    rdzv_port: int | None = None  # None: derived from the job id
    max_restarts: int = 0  # torchrun restarts of a failed node's workers within the job
    setup: list[str] = field(default_factory=list)  # shell lines run before training (module load, ...)
    directives: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. --exclusive
    sbatch: str = "sbatch"
    dry_run: bool = False

    def __post_init__(self) -> None:
        _positive(self, "nodes", "nproc_per_node", "cpus_per_node")
        require(self.gpus_per_node >= 0, f"launcher.gpus_per_node={self.gpus_per_node}: expected >= 0")
        require(self.max_restarts >= 0, f"launcher.max_restarts={self.max_restarts}: expected >= 0")
        require(bool(re.fullmatch(r"[\w.+-]+", self.job_name)),
                f"launcher.job_name={self.job_name}: expected letters, digits and ._+-")
        limit = slurm_seconds(self.time)
        require(0 <= self.signal_seconds <= 65535,
                f"launcher.signal_seconds={self.signal_seconds}: expected 0 to 65535 (Slurm's limit)")
        require(limit is None or self.signal_seconds < limit,
                f"launcher.signal_seconds={self.signal_seconds}: expected less than "
                f"launcher.time={self.time} ({limit} s)")
        require(0 <= self.save_wait_seconds,
                f"launcher.save_wait_seconds={self.save_wait_seconds}: expected >= 0")
        for line in self.directives:
            require(line.startswith("--"), f"launcher.directives: {line!r}: expected an sbatch option (--...)")
        if self.rdzv_port is not None:
            require(0 < self.rdzv_port < 65536, f"launcher.rdzv_port={self.rdzv_port}: expected a TCP port")

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


LAUNCHERS = {cls.__dataclass_fields__["kind"].default: cls
             for cls in (LocalLauncher, TorchrunLauncher, DeepSpeedLauncher, SlurmLauncher)}
Launcher = LocalLauncher | TorchrunLauncher | DeepSpeedLauncher | SlurmLauncher


def launcher_from_dict(values: dict) -> Launcher:
    kind = values.get("kind", "local")
    require(kind in LAUNCHERS, f"launcher.kind={kind}: expected one of {', '.join(LAUNCHERS)}")
    return from_dict(LAUNCHERS[kind], values, "launcher.")
