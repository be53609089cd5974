"""Cross-node deduplication: each node's document hashes on disk, and the ones to drop.

Node k of K writes `dedup-k-of-K.npz`: the hash of every document in its
share of the inputs and the first input holding it, tagged with a key of the
job (inputs, node count, cleaning). Once every node's file exists, a node
drops each document that another node has in an earlier input (see
`preprocess`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from data_pipeline.cleaning import DataError


def node_hashes_path(output: Path, node_rank: int, num_nodes: int) -> Path:
    return output / f"dedup-{node_rank:03d}-of-{num_nodes:03d}.npz"


def save_node_hashes(path: Path, first: dict[bytes, int], key: str) -> None:
    """Writes {16-byte hash: first input} atomically, tagged with the job's `key`."""
    hashes = np.frombuffer(b"".join(first), dtype=np.uint8).reshape(-1, 16)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, hashes=hashes, inputs=np.fromiter(first.values(), dtype=np.int64, count=len(first)),
                 key=np.array(key))
    os.replace(tmp, path)


def load_node_hashes(path: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(hashes as 16-byte keys, first inputs), or None when the file belongs to another job."""
    with np.load(path) as data:
        if str(data["key"]) != key:
            return None
        hashes = np.ascontiguousarray(data["hashes"]).view("V16").ravel()
        return hashes, data["inputs"]


def other_nodes_first(output: Path, key: str, node_rank: int, num_nodes: int, wait_s: float,
                      log: Callable[[str], None]) -> set[bytes]:
    """Hashes of node `node_rank`'s documents that another node has in an earlier input, once
    every node's hashes file is in `output` (waiting up to `wait_s` seconds for them)."""
    paths = [node_hashes_path(output, k, num_nodes) for k in range(num_nodes)]
    deadline = time.monotonic() + wait_s
    missing = [p for p in paths if not p.is_file()]
    if missing:
        log(f"preprocess: waiting for the document hashes of {len(missing)} other node(s) ({missing[0].name}, ...)")
    while missing:  # the other nodes write theirs before they encode anything
        if time.monotonic() > deadline:
            raise DataError(f"{missing[0]}: not written by its node within {wait_s:g} s; start every "
                            f"node of the job (or run `--phase hashes` for each first)")
        time.sleep(min(1.0, wait_s))
        missing = [p for p in paths if not p.is_file()]
    loaded = []
    for path in paths:
        found = load_node_hashes(path, key)
        if found is None:
            raise DataError(f"{path}: written for another job (other inputs, cleaning or node count); "
                            "delete it and rerun that node")
        loaded.append(found)
    own_hashes, own_inputs = loaded[node_rank]
    others = [x for k, x in enumerate(loaded) if k != node_rank]
    other_hashes = np.concatenate([h for h, _ in others])
    if not len(other_hashes) or not len(own_hashes):
        return set()
    other_inputs = np.concatenate([i for _, i in others])
    order = np.argsort(other_hashes, kind="stable")
    unique, starts = np.unique(other_hashes[order], return_index=True)
    earliest = np.minimum.reduceat(other_inputs[order], starts)  # a hash's first input over the other nodes
    where = np.searchsorted(unique, own_hashes).clip(max=len(unique) - 1)
    drop = (unique[where] == own_hashes) & (earliest[where] < own_inputs)
    return {h.tobytes() for h in own_hashes[drop]}
