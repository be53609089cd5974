"""Token shards in megatron-core's indexed format (`.bin` tokens + `.idx` index).

Written through megatron-core's own `IndexedDatasetBuilder` so that Megatron-LM
reads our shards and we read theirs. A shard appears under its final name only
once complete: both files are written under temporary names, then renamed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


class ShardError(ValueError):
    """A shard is missing, truncated or inconsistent; the message names the file."""


def token_dtype(vocab_size: int) -> type[np.number]:
    return np.uint16 if vocab_size < 65500 else np.int32


def write_shard(prefix: str | os.PathLike, documents: Iterable[np.ndarray], dtype) -> int:
    """Writes one shard of documents (1-D token arrays); returns its token count."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    tokens = 0
    for doc in documents:
        builder.add_document(doc, [len(doc)])
        tokens += len(doc)
    builder.finalize(f"{tmp}.idx")
    # The index goes last: a prefix whose .idx exists is complete.
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")
    return tokens


def open_shard(prefix: str | os.PathLike) -> IndexedDataset:
    """Opens a shard, checking that its index and token file agree."""
    prefix = str(prefix)
    for suffix in (".idx", ".bin"):
        if not os.path.isfile(prefix + suffix):
            raise ShardError(f"{prefix}{suffix}: shard file not found")
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except Exception as err:  # megatron-core raises assertions and struct errors alike
        raise ShardError(f"{prefix}.idx: unreadable index ({err or type(err).__name__})") from None
    expected = int(dataset.sequence_lengths.sum()) * dataset.index.dtype_size
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise ShardError(
            f"{prefix}.bin: {actual} bytes, but its index describes {expected}; truncated or mismatched"
        )
    return dataset
