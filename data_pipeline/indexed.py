"""Token shards in megatron-core's indexed format (`.bin` tokens + `.idx` index).

Written through megatron-core's own `IndexedDatasetBuilder` so that Megatron-LM
reads our shards and we read theirs. A shard appears under its final name only
once complete: both files are written under temporary names, then renamed.
"""

from __future__ import annotations

import os
import struct
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
    # Checked before megatron-core opens them: an IndexedDataset that fails half-built also
    # prints a traceback from its __del__ when it is collected.
    expected = _token_bytes(prefix + ".idx")
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise ShardError(
            f"{prefix}.bin: {actual} bytes, but its index describes {expected}; truncated or mismatched"
        )
    if expected == 0:
        raise ShardError(f"{prefix}.bin: no tokens")
    try:
        return IndexedDataset(prefix, mmap=True)
    except Exception as err:  # megatron-core raises assertions and struct errors alike
        raise ShardError(f"{prefix}.idx: unreadable index ({err or type(err).__name__})") from None


# megatron-core's index: header, version (<Q), dtype code (<B), sequence and document counts
# (<Q each), then int32 sequence lengths, int64 sequence pointers and int64 document indices.
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEAD = struct.Struct("<9sQBQQ")
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core's DType codes


def _token_bytes(idx: str) -> int:
    """The size of the token file an index describes; ShardError for a file that is no index."""
    with open(idx, "rb") as f:
        head = f.read(_HEAD.size)
    if not head or head[:len(_INDEX_HEADER)] != _INDEX_HEADER[:len(head)]:
        raise ShardError(f"{idx}: unreadable index (no megatron-core index header)")
    if len(head) < _HEAD.size:
        raise ShardError(f"{idx}: {len(head)} bytes, shorter than an index header; truncated")
    _, version, code, sequences, documents = _HEAD.unpack(head)
    if version != 1 or code not in _DTYPE_SIZES:
        raise ShardError(f"{idx}: unreadable index (version {version}, dtype code {code}; expected 1 and "
                         f"one of {sorted(_DTYPE_SIZES)})")
    size, needed = os.path.getsize(idx), _HEAD.size + 12 * sequences + 8 * documents
    if size < needed:
        raise ShardError(f"{idx}: {size} bytes, but its header describes {needed}; truncated")
    if sequences == 0:
        return 0
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=_HEAD.size, shape=(sequences,))
    return int(lengths.sum(dtype=np.int64)) * _DTYPE_SIZES[code]
