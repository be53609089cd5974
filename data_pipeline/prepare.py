"""Raw sources → tokenizer + train/validation shards, cached by content.

The cache directory is keyed by the corpus fingerprint and the tokenizer
settings, so a second run with the same inputs reuses the tokenizer and the
shards, and a changed input builds a new set beside the old one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipeline.corpus import CorpusError, fingerprint, iter_documents
from data_pipeline.indexed import token_dtype, write_shard
from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from pretrain.config import DataConfig

MANIFEST = "manifest.json"


@dataclass
class PreparedData:
    directory: Path
    tokenizer: Tokenizer
    train_prefix: Path
    valid_prefix: Path
    manifest: dict


def cache_directory(cfg: DataConfig) -> Path:
    corpus = fingerprint(cfg.sources, cfg.max_corpus_bytes)
    settings = json.dumps(
        [asdict(cfg.tokenizer), cfg.valid_fraction, cfg.seed], sort_keys=True
    ).encode()
    return Path(cfg.cache_dir) / f"{corpus}-{hashlib.sha256(settings).hexdigest()[:8]}"


def prepare_data(cfg: DataConfig, log=print) -> PreparedData:
    directory = cache_directory(cfg)  # fails on a missing source before anything is written
    manifest_path = directory / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        tokenizer = Tokenizer(manifest["tokenizer"])
        if tokenizer.hash != manifest["tokenizer_hash"]:
            raise CorpusError(
                f"{manifest['tokenizer']}: tokenizer hash {tokenizer.hash[:12]} differs from "
                f"{manifest_path}'s {manifest['tokenizer_hash'][:12]}"
            )
        log(f"data: reusing {directory} ({manifest['train_tokens']:,} train tokens)")
        return PreparedData(directory, tokenizer, directory / "train", directory / "valid", manifest)

    documents = list(iter_documents(cfg.sources, cfg.max_corpus_bytes))
    if len(documents) < 2:
        raise CorpusError(
            f"data.sources={cfg.sources}: {len(documents)} non-empty documents; expected at least 2 "
            "(one for training, one for validation)"
        )
    if cfg.tokenizer.model:
        tokenizer = Tokenizer(cfg.tokenizer.model)
    else:
        log(f"data: training a {cfg.tokenizer.vocab_size}-piece {cfg.tokenizer.model_type} tokenizer")
        tokenizer = train_tokenizer(
            documents,
            directory / "tokenizer.model",
            vocab_size=cfg.tokenizer.vocab_size,
            model_type=cfg.tokenizer.model_type,
            sample_bytes=cfg.tokenizer.sample_bytes,
        )

    # Held-out documents are chosen by a seeded draw, so validation text is
    # never seen in training, whatever the order of the sources.
    rng = np.random.default_rng(cfg.seed)
    num_valid = min(len(documents) - 1, max(1, round(cfg.valid_fraction * len(documents))))
    is_valid = np.zeros(len(documents), dtype=bool)
    is_valid[rng.choice(len(documents), num_valid, replace=False)] = True

    log(f"data: tokenizing {len(documents)} documents")
    token_lists = tokenizer.encode([d.text for d in documents])
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    arrays = [np.array(ids + [eos], dtype=dtype) for ids in token_lists]
    train_tokens = write_shard(directory / "train", (a for a, v in zip(arrays, is_valid) if not v), dtype)
    valid_tokens = write_shard(directory / "valid", (a for a, v in zip(arrays, is_valid) if v), dtype)

    manifest = {
        "sources": cfg.sources,
        "documents": len(documents),
        "valid_documents": int(num_valid),
        "train_tokens": train_tokens,
        "valid_tokens": valid_tokens,
        "dtype": np.dtype(dtype).name,
        "tokenizer": str(tokenizer.path),
        "tokenizer_hash": tokenizer.hash,
        "vocab_size": tokenizer.vocab_size,
    }
    tmp = manifest_path.with_name(f".{MANIFEST}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)
    log(f"data: wrote {train_tokens:,} train and {valid_tokens:,} validation tokens to {directory}")
    return PreparedData(directory, tokenizer, directory / "train", directory / "valid", manifest)
