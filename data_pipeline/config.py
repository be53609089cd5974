"""The data section of the config (`data.*`): sources, tokenizer, cleaning, packing, blending."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.typed_config import require


@dataclass
class TokenizerConfig:
    model: str | None = None  # path to an existing SentencePiece model; None trains one
    vocab_size: int = 4096
    model_type: Literal["bpe", "unigram", "char"] = "bpe"
    sample_bytes: int = 4_000_000  # how much of the corpus the tokenizer is trained on
    byte_fallback: bool | None = None  # None: on for bpe and unigram, off for char
    user_defined_symbols: list[str] = field(default_factory=list)  # pieces never split

    def __post_init__(self) -> None:
        require(self.vocab_size >= 64, f"data.tokenizer.vocab_size={self.vocab_size}: expected >= 64")


@dataclass
class BlendSource:
    path: str  # a directory written by `pretrain-data preprocess`
    weight: float = 1.0


@dataclass
class DataConfig:
    # "stdlib" builds a corpus from the Python standard library's sources and
    # documentation; otherwise a list of files, directories or globs (.txt,
    # .jsonl[.gz|.zst], .parquet), saved `datasets` directories,
    # `builder:NAME:FILES` or `hub:NAME[:SPLIT]`.
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    max_corpus_bytes: int = 12_000_000
    cache_dir: str = ".cache/data"
    seq_len: int = 256
    valid_fraction: float = 0.02
    seed: int = 1234
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Cleaning, applied while preprocessing `sources`.
    text_field: str = "text"
    normalize: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = "NFC"
    strip_control: bool = True
    min_chars: int = 1
    max_chars: int = 0  # 0: no limit
    dedup: bool = True
    on_bad_record: Literal["skip", "error"] = "skip"
    num_shards: int = 1
    workers: int = 0  # preprocessing processes; 0: one per core
    # Train on preprocessed corpora instead of `sources`, mixed by weight.
    blend: list[BlendSource] = field(default_factory=list)
    # Megatron's end-of-document options.
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    # Train straight from `sources`, cleaned, tokenized and packed on the fly
    # (no preprocessing pass), in this many loader processes per rank (0: in
    # the training process).
    streaming: bool = False
    streaming_workers: int = 2

    def __post_init__(self) -> None:
        require(len(self.sources) > 0, "data.sources: expected at least one path or 'stdlib'")
        require(self.streaming_workers >= 0,
                f"data.streaming_workers={self.streaming_workers}: expected >= 0")
        require(not (self.streaming and self.blend),
                "data.streaming=true with data.blend: expected one of them (a blend mixes preprocessed corpora)")
        require(self.seq_len > 0, f"data.seq_len={self.seq_len}: expected > 0")
        require(0 < self.valid_fraction < 1,
                f"data.valid_fraction={self.valid_fraction}: expected between 0 and 1")
        require(self.num_shards >= 1, f"data.num_shards={self.num_shards}: expected >= 1")
        require(self.min_chars >= 0 and self.max_chars >= 0,
                "data.min_chars, data.max_chars: expected >= 0")
        for i, entry in enumerate(self.blend):
            require(entry.weight >= 0, f"data.blend[{i}].weight={entry.weight}: expected >= 0")
        require(not self.blend or sum(e.weight for e in self.blend) > 0,
                "data.blend: expected a positive total weight")
