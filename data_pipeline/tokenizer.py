"""SentencePiece tokenizer: training on a corpus sample, loading, and its content hash."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from common.errors import UserError, first_line
from common.paths import file_above
from data_pipeline.corpus import Document

# Ids of the special pieces, fixed so that every tokenizer we train agrees.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class TokenizerError(UserError, ValueError):
    """A tokenizer cannot be trained or loaded; the message names the file or the setting."""


class TrainingFailed(TokenizerError):
    """SentencePiece refused to train a model (e.g. more pieces than the sample can fill)."""

    def __init__(self, output: Path, reason: str):
        super().__init__(f"{output}: SentencePiece training failed: {reason}")
        self.reason = reason


def sentencepiece_reason(err: BaseException) -> str:
    """SentencePiece's reason for a failure, without its source location and log level.

    It reports problems as one RuntimeError such as `INTERNAL: src/x.cc(109) [check] reason`
    (or several lines of them); the reason is what follows the last `] ` of the first line.
    """
    return first_line(err).split("] ")[-1].removeprefix("INTERNAL: ").strip()


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: SentencePiece model not found")
        self.model_bytes = self.path.read_bytes()
        self.sp = load_model(self.path, self.model_bytes)
        self.hash = hashlib.sha256(self.model_bytes).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_model(path: Path, model_bytes: bytes) -> spm.SentencePieceProcessor:
    """The SentencePiece processor of a model file's bytes; refuses a file that holds no model."""
    if not model_bytes:  # SentencePiece accepts an empty proto as a model of no pieces
        raise TokenizerError(f"{path}: not a SentencePiece model (an empty file)")
    try:
        return spm.SentencePieceProcessor(model_proto=model_bytes)
    except RuntimeError as err:
        reason = sentencepiece_reason(err)
        if "ParseFromArray" in first_line(err) or not reason:
            reason = "it does not parse as a SentencePiece model proto"
        raise TokenizerError(f"{path}: not a SentencePiece model ({reason})") from None


def _training_lines(documents: Iterable[Document], sample_bytes: int) -> Iterable[str]:
    budget = sample_bytes
    for document in documents:
        for line in document.text.splitlines():
            if budget <= 0:
                return
            if line.strip():
                budget -= len(line)
                yield line


class _Lines:
    """The training lines, keeping what the documents raised: SentencePiece turns an exception
    from its sentence iterator into a RuntimeError of its own that names only its type."""

    def __init__(self, documents: Iterable[Document], sample_bytes: int):
        self._lines = iter(_training_lines(documents, sample_bytes))
        self.count = 0
        self.error: BaseException | None = None

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        try:
            line = next(self._lines)
        except StopIteration:
            raise
        except Exception as err:
            self.error = err
            raise
        self.count += 1
        return line


def check_output(output: Path) -> None:
    """Refuses a model path that is a directory, or lies below a file, before any training."""
    if output.is_dir():
        raise TokenizerError(f"{output}: a directory, expected the path of a model file")
    blocking = file_above(output)
    if blocking is not None:
        raise TokenizerError(f"{output}: lies below the file {blocking}; expected a directory there")


def _train(prefix: Path, lines: _Lines, vocab_size: int, model_type: str,
           byte_fallback: bool | None, user_defined_symbols: list[str] | None) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=(model_type != "char") if byte_fallback is None else byte_fallback,
        user_defined_symbols=list(user_defined_symbols or []),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )


def train_tokenizer(
    documents: Iterable[Document],
    output: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    sample_bytes: int = 4_000_000,
    byte_fallback: bool | None = None,
    user_defined_symbols: list[str] | None = None,
) -> Tokenizer:
    """Trains a byte-fallback SentencePiece model and writes `output` atomically.

    Whitespace is kept exactly (identity normalisation, no collapsing of
    spaces, whitespace-only pieces allowed) so that code and prose round-trip;
    newlines are encoded through byte fallback, as in Llama's tokenizer.
    `byte_fallback` defaults to on for BPE and unigram; user-defined symbols
    are always kept whole. A `<output>.json` beside the model records its hash.
    """
    output = Path(output)
    check_output(output)
    created = [p for p in (output.parent, *output.parent.parents) if not p.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    prefix = output.with_name(f".{output.stem}.tmp{os.getpid()}")
    lines = _Lines(documents, sample_bytes)
    try:
        _train(prefix, lines, vocab_size, model_type, byte_fallback, user_defined_symbols)
    except RuntimeError as err:  # SentencePiece reports bad settings as one long RuntimeError
        for directory in created:  # a failed training leaves no directory behind
            with contextlib.suppress(OSError):
                directory.rmdir()
        if lines.error is not None:  # a document that could not be read: its own error
            raise lines.error
        if lines.count == 0:
            raise TrainingFailed(output, "no non-empty line of text to train on") from None
        raise TrainingFailed(output, sentencepiece_reason(err)) from None
    os.replace(f"{prefix}.model", output)
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    tokenizer = Tokenizer(output)
    sidecar = {"sha256": tokenizer.hash, "vocab_size": tokenizer.vocab_size, "model_type": model_type,
               "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID,
               "user_defined_symbols": list(user_defined_symbols or [])}
    tmp = output.with_name(f".{output.name}.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(sidecar, indent=1))
    os.replace(tmp, f"{output}.json")
    return tokenizer


def check_fits(tokenizer_vocab: int, model_vocab: int | None, multiple: int = 128,
               tensor_parallel: int = 1) -> int:
    """The embedding rows for this tokenizer: its vocabulary padded to multiple × TP.

    A model with a fixed vocabulary smaller than the tokenizer's is refused.
    """
    step = multiple * tensor_parallel
    padded = -(-(model_vocab or tokenizer_vocab) // step) * step
    if tokenizer_vocab > padded:
        raise ValueError(f"model.vocab_size={model_vocab}: the tokenizer has {tokenizer_vocab} pieces")
    return padded
