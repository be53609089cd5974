"""The train and validation datasets of a run, built from its `data` config section."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from data_pipeline.blend import BlendedDataset
from data_pipeline.config import DataConfig
from data_pipeline.dataset import EodOptions, PackedSequenceDataset
from data_pipeline.prepare import PreparedData, prepare_data
from data_pipeline.shards import manifest_tokenizer, open_corpus, split_documents
from data_pipeline.tokenizer import Tokenizer


@dataclass
class TrainingData:
    train: PackedSequenceDataset
    valid: PackedSequenceDataset
    vocab_size: int
    tokenizer: Tokenizer | None = None


def load_training_data(cfg: DataConfig, rank: int, log=print) -> TrainingData:
    """Every rank's datasets. Rank 0 builds the tokenizer and shards first; the other ranks
    then find them cached (all ranks wait at a barrier when a process group is up)."""
    prepared = None
    if not cfg.blend:
        if rank == 0:
            if cfg.streaming:
                from data_pipeline.streaming import streaming_tokenizer

                streaming_tokenizer(cfg, log=log)
            else:
                prepared = prepare_data(cfg, log=log)
        if dist.is_initialized():
            dist.barrier()
    return training_data(cfg, log if rank == 0 else (lambda *_: None), prepared)


def training_data(cfg: DataConfig, log=print, prepared: PreparedData | None = None) -> TrainingData:
    """The train and validation datasets of a data config (needs no process group).

    With `blend`, the preprocessed corpora are mixed by weight instead (each
    split by document into train and validation), all read with the tokenizer
    of the first; otherwise `sources` are prepared (unless `prepared` already
    holds them) and split.
    """
    if cfg.streaming:  # no shards: a stream spec to train on, held-out documents to validate on
        from data_pipeline.streaming import streaming_data

        stream, held_out, tokenizer = streaming_data(cfg, log=log)
        return TrainingData(train=stream, valid=held_out, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer)
    if cfg.blend:
        tokenizer = Tokenizer(cfg.tokenizer.model or manifest_tokenizer(cfg.blend[0].path))
        corpora = [open_corpus(entry.path, tokenizer) for entry in cfg.blend]  # same tokenizer for all
        weights = [entry.weight for entry in cfg.blend]
    else:
        prepared = prepared or prepare_data(cfg, log=log)  # found in the cache on the ranks after the first
        tokenizer = prepared.tokenizer
        corpora, weights = [open_corpus(prepared.corpus, tokenizer)], [1.0]
    eod = EodOptions(tokenizer.eos_id, cfg.eod_mask_loss, cfg.reset_position_ids, cfg.reset_attention_mask)
    train, valid = [], []
    for k, corpus in enumerate(corpora):
        train_docs, valid_docs = split_documents(corpus.num_documents, cfg.valid_fraction, cfg.seed + k)
        train.append(PackedSequenceDataset(corpus, cfg.seq_len, cfg.seed + k, documents=train_docs, eod=eod))
        # Shuffled too (with a fixed seed), so the fixed evaluation batches sample
        # every held-out document rather than the first few.
        valid.append(PackedSequenceDataset(corpus, cfg.seq_len, cfg.seed + k, documents=valid_docs, eod=eod))
    return TrainingData(
        train=train[0] if len(train) == 1 else BlendedDataset(train, weights),
        valid=valid[0] if len(valid) == 1 else BlendedDataset(valid, weights),
        vocab_size=tokenizer.vocab_size,
        tokenizer=tokenizer,
    )
