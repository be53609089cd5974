"""A set of shards read as one sequence of documents, checked against its manifests."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import first_line
from data_pipeline.cleaning import DataError
from data_pipeline.indexed import ShardError, open_shard


@dataclass
class ShardCorpus:
    prefixes: list[str]
    shards: list  # megatron-core IndexedDataset per prefix
    lengths: np.ndarray  # tokens per document, all shards in order
    shard_of: np.ndarray  # which shard holds each document
    index_in_shard: np.ndarray
    tokenizer_hash: str | None = None

    @property
    def num_documents(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def path_prefix(self) -> str:
        return self.prefixes[0] if len(self.prefixes) == 1 else os.path.dirname(self.prefixes[0])

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        return self.shards[self.shard_of[doc]].get(int(self.index_in_shard[doc]), offset=offset, length=length)

    @classmethod
    def from_shards(cls, prefixes: list[str], shards: list, tokenizer_hash: str | None = None) -> "ShardCorpus":
        lengths = [np.asarray(s.sequence_lengths, dtype=np.int64) for s in shards]
        shard_of = np.concatenate([np.full(len(x), k, dtype=np.int32) for k, x in enumerate(lengths)])
        index = np.concatenate([np.arange(len(x), dtype=np.int64) for x in lengths])
        return cls(prefixes, shards, np.concatenate(lengths), shard_of, index, tokenizer_hash)


def read_manifest(path: Path) -> dict:
    """A preprocessed directory's manifest; ShardError naming it when it is unreadable."""
    try:
        manifest = json.loads(path.read_bytes())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        missing = [key for key in ("tokenizer", "tokenizer_hash", "shards") if key not in manifest]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        if not all(isinstance(e, dict) and "prefix" in e and "documents" in e for e in manifest["shards"]):
            raise ValueError("expected 'shards' to list objects with a 'prefix' and 'documents'")
    except (ValueError, TypeError) as err:  # a JSON or UTF-8 error is a ValueError
        raise ShardError(f"{path}: unreadable manifest ({first_line(err)})") from None
    return manifest


def open_corpus(path: str | os.PathLike, tokenizer=None) -> ShardCorpus:
    """A preprocessed directory (every `manifest*.json` in it) or a single shard prefix.

    The tokenizer, if given, must be the one the manifest names by hash, and
    every shard must have the documents the manifest says it has.
    """
    path = Path(path)
    if not path.is_dir():
        return ShardCorpus.from_shards([str(path)], [open_shard(path)])
    manifests = sorted(path.glob("manifest*.json"))
    if not manifests:
        raise ShardError(f"{path}/manifest.json: not found; run `pretrain-data preprocess` first")
    prefixes, shards, hashes = [], [], set()
    for manifest_path in manifests:
        manifest = read_manifest(manifest_path)
        hashes.add(manifest["tokenizer_hash"])
        if tokenizer is not None and manifest["tokenizer_hash"] != tokenizer.hash:
            raise DataError(f"{manifest_path}: written with tokenizer {manifest['tokenizer_hash'][:12]}, "
                            f"but {tokenizer.path} is {tokenizer.hash[:12]}")
        for entry in manifest["shards"]:
            prefix = path / entry["prefix"]
            if not entry["documents"]:
                continue  # an empty shard (an empty .bin cannot be mapped)
            shard = open_shard(prefix)
            if len(shard.sequence_lengths) != entry["documents"]:
                raise ShardError(f"{prefix}.idx: {len(shard.sequence_lengths)} documents, but "
                                 f"{manifest_path} says {entry['documents']}")
            prefixes.append(str(prefix))
            shards.append(shard)
    if len(hashes) > 1:
        raise DataError(f"{path}: manifests name {len(hashes)} different tokenizers")
    if not shards:
        raise DataError(f"{path}: no documents in any shard")
    return ShardCorpus.from_shards(prefixes, shards, hashes.pop())


def manifest_tokenizer(path: str | os.PathLike) -> str:
    """The tokenizer path a preprocessed directory's (first) manifest names."""
    manifests = sorted(Path(path).glob("manifest*.json"))
    if not manifests:
        raise ShardError(f"{path}/manifest.json: not found; run `pretrain-data preprocess` first")
    return read_manifest(manifests[0])["tokenizer"]


def split_documents(num_documents: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation document ids: a seeded draw, so no validation text is trained on."""
    if num_documents < 2:
        raise DataError(f"{num_documents} documents: expected at least 2 (one for training, one for validation)")
    num_valid = min(num_documents - 1, max(1, round(valid_fraction * num_documents)))
    is_valid = np.zeros(num_documents, dtype=bool)
    is_valid[np.random.default_rng(seed).choice(num_documents, num_valid, replace=False)] = True
    return np.flatnonzero(~is_valid), np.flatnonzero(is_valid)
