"""Processes on this machine: the `local` launcher, and the parent of torchrun/deepspeed.

`local` starts one `pretrain` process per rank with the variables torchrun
would set, streams each one's output line by line with a `[rank r]` prefix,
and stops the others when one fails, so a crashed rank does not leave its
peers waiting in a collective. Signals sent to the launcher (Ctrl-C, SIGTERM
from a scheduler, SIGUSR1 asking for a checkpoint) are passed on to every
process it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO

from launch.commands import TRAIN_MODULE
from common.net import free_port
from launch.config import LocalLauncher

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
GRACE_SECONDS = 30  # how long survivors of a failed rank get to exit before they are killed


def _pump(stream: IO[str], out: IO[str], prefix: str, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line)
            out.flush()
    stream.close()


def supervise(procs: list[subprocess.Popen], prefixes: list[str]) -> int:
    """Streams the processes' output, forwards signals, and returns the job's exit status:
    0 when all succeed, else the first failure's status (128+signal for a killed one)."""
    lock = threading.Lock()
    pumps = []
    for proc, prefix in zip(procs, prefixes):
        for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            if stream is not None:
                pump = threading.Thread(target=_pump, args=(stream, out, prefix, lock), daemon=True)
                pump.start()
                pumps.append(pump)

    def forward(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    status, failed_at = 0, None
    try:
        while any(proc.poll() is None for proc in procs):
            if status == 0:
                status = next((_status(p.returncode) for p in procs if p.returncode not in (None, 0)), 0)
                if status:
                    failed_at = time.monotonic()
                    for proc in procs:
                        if proc.poll() is None:
                            proc.terminate()
            elif time.monotonic() - failed_at > GRACE_SECONDS:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
            time.sleep(0.1)
        status = status or next((_status(p.returncode) for p in procs if p.returncode), 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for pump in pumps:
            pump.join(timeout=5)
    return status


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def rank_environ(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}


def run_local(cfg: LocalLauncher, overrides: list[str]) -> int:
    command = [sys.executable, "-m", TRAIN_MODULE, *overrides]
    n = cfg.nproc_per_node
    if cfg.dry_run:
        print(f"RANK=0..{n - 1} WORLD_SIZE={n} " + subprocess.list2cmdline(command))
        return 0
    port = free_port()
    procs = [subprocess.Popen(command, env=rank_environ(rank, n, port), text=True, bufsize=1,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in range(n)]
    return supervise(procs, [f"[rank {rank}] " if n > 1 else "" for rank in range(n)])


def run_command(command: list[str], dry_run: bool, env: dict[str, str] | None = None) -> int:
    """torchrun or the deepspeed launcher as one child; its output passes through untouched."""
    print(subprocess.list2cmdline(command), flush=True)
    if dry_run:
        return 0
    proc = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return supervise([proc], [""])
