"""Raw sources → tokenizer + cleaned, deduplicated shards, cached by content.

The cache directory is keyed by the corpus fingerprint and the tokenizer and
cleaning settings, so a second run with the same inputs reuses the tokenizer
and the shards, and a changed input builds a new set beside the old one. The
train/validation split is made by document when the shards are read
(`shards.split_documents`), so one set of shards serves both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from data_pipeline.cleaning import CleaningConfig, Report, clean_records
from data_pipeline.corpus import CorpusError, Document, fingerprint
from data_pipeline.preprocess import MANIFEST, PreprocessJob, check_tokenizer, preprocess
from data_pipeline.shards import read_manifest
from data_pipeline.sources import read_records, resolve_inputs
from data_pipeline.tokenizer import Tokenizer, TokenizerError, TrainingFailed, train_tokenizer
from data_pipeline.config import DataConfig


@dataclass
class PreparedData:
    directory: Path
    tokenizer: Tokenizer
    corpus: Path  # the preprocessed shard directory (manifest.json + shard-NNNNN.bin/.idx)
    manifest: dict


def cleaning_config(cfg: DataConfig) -> CleaningConfig:
    return CleaningConfig(text_field=cfg.text_field, normalize=cfg.normalize,
                          strip_control=cfg.strip_control, min_chars=cfg.min_chars,
                          max_chars=cfg.max_chars, dedup=cfg.dedup, on_bad_record=cfg.on_bad_record)


def sample_documents(specs: list[str], cleaning: CleaningConfig, sample_bytes: int) -> Iterator[Document]:
    """About `sample_bytes` of cleaned text, taken from every input in proportion to its size."""
    inputs = resolve_inputs(specs)
    total = sum(max(x.size, 1) for x in inputs)
    names = [x.name for x in inputs]
    for i, item in enumerate(inputs):
        budget = sample_bytes * max(item.size, 1) / total
        for record in read_records(i, item, cleaning.text_field):
            if budget <= 0:
                break
            for text in clean_records([(record.mode, record.payload)], cleaning, names, [i], Report()):
                budget -= len(text)
                yield Document(item.name, text)


def train_sample_tokenizer(cfg: DataConfig, path: Path, log=print, log_suffix: str = "") -> Tokenizer:
    """A tokenizer as `cfg.tokenizer` describes, trained on a cleaned sample of `cfg.sources`, written to `path`."""
    t = cfg.tokenizer
    sample = list(sample_documents(list(cfg.sources), cleaning_config(cfg), t.sample_bytes))
    if len(sample) < 2:
        raise CorpusError(f"data.sources={cfg.sources}: {len(sample)} non-empty documents; expected at least 2 "
                          "(one for training, one for validation)")
    log(f"data: training a {t.vocab_size}-piece {t.model_type} tokenizer{log_suffix}")
    try:
        return train_tokenizer(sample, path, vocab_size=t.vocab_size, model_type=t.model_type,
                               sample_bytes=t.sample_bytes, byte_fallback=t.byte_fallback,
                               user_defined_symbols=t.user_defined_symbols)
    except TrainingFailed as err:  # e.g. more pieces than the sample can fill: name the config key
        key = (f"data.tokenizer.vocab_size={t.vocab_size}" if "ocabulary size" in err.reason
               else f"data.tokenizer (a {t.vocab_size}-piece {t.model_type} tokenizer)")
        raise TokenizerError(f"{key}: SentencePiece training on {sum(len(d.text) for d in sample):,} "
                             f"characters sampled from data.sources={list(cfg.sources)} failed: "
                             f"{err.reason}") from None


def cache_directory(cfg: DataConfig) -> Path:
    corpus = fingerprint(cfg.sources, cfg.max_corpus_bytes)
    settings = json.dumps(
        [asdict(cfg.tokenizer), cfg.valid_fraction, cfg.seed, asdict(cleaning_config(cfg)), cfg.num_shards],
        sort_keys=True,
    ).encode()
    return Path(cfg.cache_dir) / f"{corpus}-{hashlib.sha256(settings).hexdigest()[:8]}"


def first_missing(path: Path) -> Path | None:
    """The outermost directory on the way to `path` that does not exist yet."""
    missing = None
    for parent in [path, *path.parents]:
        if parent.exists():
            break
        missing = parent
    return missing


def prepare_data(cfg: DataConfig, log=print) -> PreparedData:
    directory = cache_directory(cfg)  # fails on a missing source before anything is written
    corpus = directory / "shards"
    manifest_path = corpus / MANIFEST
    if manifest_path.is_file():
        manifest = read_manifest(manifest_path)
        tokenizer = Tokenizer(manifest["tokenizer"])
        check_tokenizer(manifest, manifest_path, tokenizer)
        log(f"data: reusing {directory} ({manifest['tokens']:,} tokens)")
        return PreparedData(directory, tokenizer, corpus, manifest)

    cleaning = cleaning_config(cfg)
    created = first_missing(directory)
    try:
        if cfg.tokenizer.model:
            tokenizer = Tokenizer(cfg.tokenizer.model)
        else:
            tokenizer = train_sample_tokenizer(cfg, directory / "tokenizer.model", log)
        log(f"data: cleaning and tokenizing {cfg.sources} on {cfg.workers or os.cpu_count()} processes")
        manifest = preprocess(PreprocessJob(
            list(cfg.sources), str(tokenizer.path), str(corpus), cfg.num_shards,
            cfg.workers or os.cpu_count() or 1, cleaning=cleaning, max_bytes=cfg.max_corpus_bytes,
        ), log=log)
        if manifest["documents"] < 2:
            raise CorpusError(f"data.sources={cfg.sources}: {manifest['documents']} non-empty documents; "
                              "expected at least 2 (one for training, one for validation)")
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    log(f"data: wrote {manifest['tokens']:,} tokens to {corpus}")
    return PreparedData(directory, tokenizer, corpus, manifest)
