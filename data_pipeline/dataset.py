"""Document-packed training samples and a data-parallel loader that resumes exactly.

Documents are concatenated (each ends in EOS) in a seeded, shuffled order and
cut into samples of seq_len + 1 tokens, consecutive samples sharing one token
so that every token is a target exactly once, as in Megatron's GPTDataset.

The loader walks one global sample order that does not depend on the
data-parallel size: optimizer step s consumes global samples
[s * global_batch, (s + 1) * global_batch), and rank r of D takes its slice of
each micro-batch. Its whole state is the number of samples consumed, so a
resumed run continues with exactly the samples it would have seen, and a run
resumed with a different data-parallel size (same global batch) neither
repeats nor skips a sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset


class PackedSequenceDataset:
    def __init__(self, shard: IndexedDataset, seq_len: int, seed: int, shuffle: bool = True):
        self.shard = shard
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        lengths = np.asarray(shard.sequence_lengths, dtype=np.int64)
        rng = np.random.default_rng(seed)
        self.doc_order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
        self.doc_ends = np.cumsum(lengths[self.doc_order])
        total = int(self.doc_ends[-1]) if len(lengths) else 0
        self.num_samples = max(0, (total - 1) // seq_len)
        if self.num_samples == 0:
            raise ValueError(
                f"{shard.path_prefix}: {total} tokens, too few for one sample of {seq_len + 1}"
            )
        self._epoch_orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _sample_position(self, index: int) -> int:
        """Maps a global sample index (any epoch) to its position in the token stream."""
        epoch, within = divmod(index, self.num_samples)
        if not self.shuffle:
            return within
        if epoch not in self._epoch_orders:
            rng = np.random.default_rng((self.seed, epoch))
            self._epoch_orders = {epoch: rng.permutation(self.num_samples)}
        return int(self._epoch_orders[epoch][within])

    def __getitem__(self, index: int) -> np.ndarray:
        start = self._sample_position(index) * self.seq_len
        stop = start + self.seq_len + 1
        pieces = []
        doc = int(np.searchsorted(self.doc_ends, start, side="right"))
        while start < stop:
            doc_start = int(self.doc_ends[doc - 1]) if doc > 0 else 0
            take = min(stop, int(self.doc_ends[doc])) - start
            pieces.append(
                self.shard.get(int(self.doc_order[doc]), offset=start - doc_start, length=take)
            )
            start += take
            doc += 1
        return np.concatenate(pieces).astype(np.int64)


def collate(samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
    block = torch.from_numpy(np.stack(samples))
    return {"tokens": block[:, :-1].contiguous(), "labels": block[:, 1:].contiguous()}


class DataParallelLoader:
    """Endless micro-batches for one data-parallel rank; `state_dict` resumes exactly."""

    def __init__(
        self,
        dataset: PackedSequenceDataset,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
    ):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        batch = collate([self.dataset[first + i] for i in range(self.micro_batch_size)])
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def fixed_batches(
    dataset: PackedSequenceDataset, micro_batch_size: int, num_batches: int,
    dp_rank: int = 0, dp_size: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """The same held-out micro-batches at every evaluation (wrapping if the set is small)."""
    loader = DataParallelLoader(dataset, micro_batch_size, dp_rank, dp_size)
    return [next(loader) for _ in range(num_batches)]
