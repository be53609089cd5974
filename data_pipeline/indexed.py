"""Token shards in megatron-core's indexed format (`.bin` tokens + `.idx` index).

Written through megatron-core's own `IndexedDatasetBuilder` so that Megatron-LM
reads our shards and we read theirs. A shard appears under its final name only
once complete: both files are written under temporary names, then renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.errors import UserError


class ShardError(UserError, ValueError):
    """A shard is missing, truncated or inconsistent; the message names the file."""


def token_dtype(vocab_size: int) -> type[np.number]:
    return np.uint16 if vocab_size < 65500 else np.int32


class ShardWriter:
    """Writes one shard incrementally under temporary names; `commit` renames it into place."""

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.prefix.with_name(f".{self.prefix.name}.tmp{os.getpid()}")
        self.dtype = dtype
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.builder = IndexedDatasetBuilder(f"{self.tmp}.bin", dtype=dtype)
        self.documents = 0
        self.tokens = 0

    def add(self, doc: np.ndarray) -> None:
        self.builder.add_document(doc, [len(doc)])
        self.documents += 1
        self.tokens += len(doc)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends documents laid end to end in `tokens`, `lengths[k]` tokens each.

        The same bytes as `add` once per document, in one write: the builder's
        per-document path copies every document twice before writing it.
        """
        lengths = lengths.tolist()  # Python ints, as `add_document` stores them
        if sum(lengths) != len(tokens):
            raise ValueError(f"{self.prefix}: {len(tokens)} tokens, but the lengths add up to {sum(lengths)}")
        builder = self.builder
        builder.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        first = len(builder.sequence_lengths)
        builder.sequence_lengths.extend(lengths)
        builder.document_indices.extend(range(first + 1, first + len(lengths) + 1))
        self.documents += len(lengths)
        self.tokens += len(tokens)

    def commit(self) -> int:
        self.builder.finalize(f"{self.tmp}.idx")
        # The index goes last: a prefix whose .idx exists is complete.
        os.replace(f"{self.tmp}.bin", f"{self.prefix}.bin")
        os.replace(f"{self.tmp}.idx", f"{self.prefix}.idx")
        return self.tokens

    def abort(self) -> None:
        if not self.builder.data_file.closed:
            self.builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(f"{self.tmp}{suffix}").unlink(missing_ok=True)


def open_shard(prefix: str | os.PathLike):
    """Opens a shard (a megatron-core IndexedDataset), checking that its index and token file agree."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

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
