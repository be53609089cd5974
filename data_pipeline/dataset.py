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
repeats nor skips a sample: the order is fixed by the seed alone and the
consumed count is global, so the new ranks split the remaining samples of
the epoch among themselves. (The streaming mode's loader and its guarantees
are in `stream_loader.py`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_pipeline.shards import ShardCorpus


@dataclass(frozen=True)
class EodOptions:
    """Megatron's end-of-document options: `--eod-mask-loss`, `--reset-position-ids`,
    `--reset-attention-mask`. All off means plain packing (the default)."""

    eod_id: int | None = None
    mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    @property
    def active(self) -> bool:
        return self.eod_id is not None and (self.mask_loss or self.reset_position_ids or self.reset_attention_mask)


class PackedSequenceDataset:
    """Samples of seq_len + 1 tokens cut from documents packed in a seeded order.

    `shard` is one megatron-core IndexedDataset or a ShardCorpus over many;
    `documents` (global ids) restricts it to a split.
    """

    def __init__(self, shard, seq_len: int, seed: int, shuffle: bool = True,
                 documents: np.ndarray | None = None, eod: EodOptions = EodOptions()):
        corpus = shard if isinstance(shard, ShardCorpus) else ShardCorpus.from_shards(
            [str(shard.path_prefix)], [shard])
        self.shard = corpus
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.eod = eod
        docs = np.arange(corpus.num_documents) if documents is None else np.asarray(documents, dtype=np.int64)
        rng = np.random.default_rng(seed)
        self.doc_order = docs[rng.permutation(len(docs))] if shuffle else docs
        self.doc_ends = np.cumsum(corpus.lengths[self.doc_order])
        total = int(self.doc_ends[-1]) if len(docs) else 0
        self.num_samples = max(0, (total - 1) // seq_len)
        if self.num_samples == 0:
            raise ValueError(
                f"{corpus.path_prefix}: {total} tokens, too few for one sample of {seq_len + 1}"
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
            pieces.append(self.shard.get(int(self.doc_order[doc]), offset=start - doc_start, length=take))
            start += take
            doc += 1
        return np.concatenate(pieces).astype(np.int64)

    def collate(self, samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return collate(samples, self.eod)


def collate(samples: list[np.ndarray], eod: EodOptions = EodOptions()) -> dict[str, torch.Tensor]:
    block = torch.from_numpy(np.stack(samples))
    batch = {"tokens": block[:, :-1].contiguous(), "labels": block[:, 1:].contiguous()}
    if eod.active:
        batch.update(eod_masks(batch["tokens"], eod))
    return batch


def eod_masks(tokens: torch.Tensor, eod: EodOptions) -> dict[str, torch.Tensor]:
    """loss_mask [b, s] (float), position_ids [b, s], and with `reset_attention_mask`
    document_starts [b, s] (bool: True where a document starts after an EOD).

    As Megatron's get_ltor_masks_and_position_ids: the loss is masked where
    the input is EOD; positions restart and attention is cut after each EOD.
    The attention cut travels as document starts, not as a dense [b, 1, s, s]
    mask: the model's attention takes the documents apart in memory linear in s.
    """
    b, s = tokens.shape
    is_eod = tokens == eod.eod_id
    loss_mask = torch.ones(b, s, dtype=torch.float32)
    if eod.mask_loss:
        loss_mask[is_eod] = 0.0
    position_ids = torch.arange(s).expand(b, s).clone()
    if eod.reset_position_ids:
        positions = torch.arange(s).expand(b, s)
        # Start of the current document = index after the last EOD before it.
        starts = torch.where(is_eod, positions + 1, torch.zeros_like(positions))
        starts = torch.cummax(torch.cat([torch.zeros(b, 1, dtype=torch.long), starts[:, :-1]], 1), 1).values
        position_ids = positions - starts
    masks = {"loss_mask": loss_mask, "position_ids": position_ids}
    if eod.reset_attention_mask:
        document_starts = torch.zeros(b, s, dtype=torch.bool)
        document_starts[:, 1:] = is_eod[:, :-1]
        masks["document_starts"] = document_starts
    return masks


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
        samples = [self.dataset[first + i] for i in range(self.micro_batch_size)]
        batch = self.dataset.collate(samples) if hasattr(self.dataset, "collate") else collate(samples)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    @property
    def seq_len(self) -> int | None:
        return getattr(self.dataset, "seq_len", None)

    def state_dict(self) -> dict[str, Any]:
        """{"consumed_samples": n, "seq_len": s}: global, the same on every rank, whatever
        the data-parallel size."""
        return {"consumed_samples": self.consumed_samples, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues at the saved position. A state saved at another sequence length (a
        long-context stage) continues at the same token position of the epoch: the samples
        taken so far held consumed x saved length tokens, so the new count is that many
        tokens in samples of the new length, rounded up (no token is read twice in order)."""
        if "consumed_samples" not in state:
            from data_pipeline.cleaning import DataError

            raise DataError("loader state in the checkpoint is a streaming one; expected a checkpoint "
                            "written with data.streaming=false")
        consumed, saved_len = int(state["consumed_samples"]), state.get("seq_len")
        if saved_len and self.seq_len and saved_len != self.seq_len:
            consumed = -(-consumed * saved_len // self.seq_len)
        self.consumed_samples = consumed


def fixed_batches(
    dataset: PackedSequenceDataset, micro_batch_size: int, num_batches: int,
    dp_rank: int = 0, dp_size: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """The same held-out micro-batches at every evaluation (wrapping if the set is small)."""
    loader = DataParallelLoader(dataset, micro_batch_size, dp_rank, dp_size)
    return [next(loader) for _ in range(num_batches)]
