"""The torchrun and deepspeed-launcher command lines for a launcher config.

Both start `python -m pretrain.main` with the training overrides; this file
only decides the launcher's own flags, and checks what can be checked before
anything is started (hostfile, rendezvous endpoint).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from launch.config import DeepSpeedLauncher, TorchrunLauncher, host_port
from launch.rendezvous import is_local_address, route_address, wait_for_endpoint
from common.typed_config import ConfigError

TRAIN_MODULE = "pretrain.main"

# torchrun's workers otherwise share the rendezvous store across restarts, and a
# restarted rank can read the gloo address a peer published in the previous
# attempt (connection refused). Without sharing, each attempt's rank 0 serves a
# fresh store.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun_command(cfg: TorchrunLauncher, overrides: list[str], probe: bool = True) -> list[str]:
    """`python -m torch.distributed.run ...`; with `probe`, a node that is not the
    rendezvous host first checks that the host answers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={cfg.nnodes}",
           f"--nproc_per_node={cfg.nproc_per_node}", f"--max_restarts={cfg.max_restarts}"]
    if cfg.rdzv_endpoint is not None:
        host, port = host_port("rdzv_endpoint", cfg.rdzv_endpoint)
        key = "launcher.rdzv_endpoint"
        is_host = is_local_address(host, key)
        if probe and not is_host:
            wait_for_endpoint(host, port, cfg.probe_seconds, key)
        # Said explicitly rather than left to torchrun, which compares the
        # endpoint with the hostname's address and so misses hosts whose
        # hostname resolves elsewhere (containers, network namespaces).
        local_addr = cfg.local_addr or (host if is_host else route_address(host, port, key))
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={cfg.rdzv_endpoint}",
                f"--rdzv_id={cfg.rdzv_id}", f"--rdzv_conf=is_host={int(is_host)}",
                f"--local_addr={local_addr}"]
    elif cfg.master_addr is not None:
        key = "launcher.master_addr"
        if probe and cfg.node_rank and not is_local_address(cfg.master_addr, key):
            wait_for_endpoint(cfg.master_addr, cfg.master_port, cfg.probe_seconds, key)
        cmd += [f"--node_rank={cfg.node_rank or 0}", f"--master_addr={cfg.master_addr}",
                f"--master_port={cfg.master_port}"]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", TRAIN_MODULE, *overrides]


# --- deepspeed ------------------------------------------------------------------------------

def read_hostfile(path: str) -> dict[str, int]:
    """`HOST slots=N` lines, as the deepspeed launcher reads them."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"launcher.hostfile={path}: no such file")
    hosts: dict[str, int] = {}
    for number, line in enumerate(file.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not match or int(match.group(2)) < 1:
            raise ConfigError(f"launcher.hostfile={path}:{number}: {line!r}: expected 'HOST slots=N'")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise ConfigError(f"launcher.hostfile={path}: no hosts; expected lines of 'HOST slots=N'")
    return hosts


def _filter(spec: str, key: str, hosts: dict[str, list[int]]) -> dict[str, list[int]]:
    """The hosts and slots that `node1:0,1@node2` names."""
    named: dict[str, list[int] | None] = {}
    for part in spec.split("@"):
        host, _, slots = part.partition(":")
        if host not in hosts:
            raise ConfigError(f"{key}={spec}: host {host!r} is not in the hostfile "
                              f"({', '.join(hosts)})")
        try:
            named[host] = [int(s) for s in slots.split(",")] if slots else None
        except ValueError:
            raise ConfigError(f"{key}={spec}: expected HOST[:SLOT,SLOT...]@...") from None
        for slot in named[host] or []:
            if slot not in hosts[host]:
                raise ConfigError(f"{key}={spec}: {host} has slots 0-{len(hosts[host]) - 1}")
    return named


def deepspeed_ranks(cfg: DeepSpeedLauncher) -> int:
    """How many processes the deepspeed launcher will start for this config."""
    if cfg.hostfile is None:
        if cfg.include or cfg.exclude:
            raise ConfigError("launcher.include/exclude: expected a launcher.hostfile to select from")
        return cfg.nproc_per_node
    hosts = {h: list(range(n)) for h, n in read_hostfile(cfg.hostfile).items()}
    if cfg.include:
        named = _filter(cfg.include, "launcher.include", hosts)
        return sum(len(slots if slots is not None else hosts[h]) for h, slots in named.items())
    if cfg.exclude:
        named = _filter(cfg.exclude, "launcher.exclude", hosts)
        kept = 0
        for host, slots in hosts.items():
            if host not in named:
                kept += len(slots)
            elif named[host] is not None:  # some slots of this host excluded, not all of it
                kept += len(slots) - len(named[host])
        return kept
    return sum(len(slots) for slots in hosts.values())


def deepspeed_command(cfg: DeepSpeedLauncher, overrides: list[str], master_port: int) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    binary = str(launcher) if launcher.is_file() else shutil.which("deepspeed")
    if binary is None:
        raise ConfigError("launcher=deepspeed: the `deepspeed` launcher is not installed "
                          "(pip install deepspeed)")
    cmd = [binary, f"--master_port={master_port}"]
    if cfg.hostfile is not None:
        cmd += [f"--hostfile={os.path.abspath(cfg.hostfile)}"]
        if cfg.include:
            cmd += [f"--include={cfg.include}"]
        if cfg.exclude:
            cmd += [f"--exclude={cfg.exclude}"]
    else:
        cmd += [f"--num_gpus={cfg.nproc_per_node}"]
    if cfg.master_addr:
        cmd += [f"--master_addr={cfg.master_addr}"]
    return [*cmd, "--module", TRAIN_MODULE, *overrides]
