"""Run a function on N CPU processes joined by gloo, as torchrun would start them."""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from common.net import free_port


def _worker(fn, rank: int, world_size: int, port: int, queue, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)  # N processes share this machine's cores
    try:
        queue.put((rank, "ok", fn(*args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        from parallel.groups import destroy_process_groups

        destroy_process_groups()


def run_distributed(fn, world_size: int, *args, timeout: float = 900) -> list:
    """Returns each rank's return value, in rank order; raises with a rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, args))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    for _ in range(world_size):
        rank, status, value = queue.get(timeout=timeout)
        if status == "error":
            errors.append(f"rank {rank}:\n{value}")
            break
        results[rank] = value
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
