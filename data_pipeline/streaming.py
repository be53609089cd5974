"""Streaming mode: train straight from raw inputs, cleaned, tokenized and packed on the fly.

The inputs (the same kinds, in the same order, with the same cleaning as
preprocessing) are read as one *pass*: a sequence of records numbered
0, 1, 2, ... . The training stream is cut into N = data-parallel size ×
max(1, loader workers) *streams*; stream s owns the records whose number is
s modulo N, so ranks and worker processes never share a document and
together see every one. Each stream cleans its records, drops held-out and
duplicate documents, appends EOS to each, and packs the tokens into samples
of seq_len + 1 (consecutive samples share one token, so every token is a
target once, as in the indexed mode). When the pass ends, the stream starts
the next one.

A stream's whole state is its `Position` (pass, next record, and where that
record lies, so that a resumed stream skips finished inputs unread), the
tokens read but not yet emitted, and the hashes of the documents it kept in
this pass; `stream_loader.StreamingLoader` carries these states across
checkpoints.

Validation holds out a fixed set of documents chosen by content hash (a
`valid_fraction` of hash space), so the split does not depend on how the
stream is cut; the evaluation batches are packed from the first held-out
documents of the pass.

Deduplication in this mode is exact within a stream (one pass); a duplicate
that falls to another stream is kept. Globally exact deduplication is what
preprocessing (`pretrain-data preprocess`) gives.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from data_pipeline.cleaning import CleaningConfig, DataError, Report, clean_records, content_hash, nbytes
from data_pipeline.dataset import EodOptions, collate
from data_pipeline.sources import Input, read_records, resolve_inputs


@dataclass(frozen=True)
class StreamSpec:
    """Everything a stream worker needs; pickled into each worker process."""

    inputs: tuple[Input, ...]
    tokenizer_model: bytes  # the SentencePiece model proto
    seq_len: int
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    valid_fraction: float = 0.0
    max_bytes: int | None = None  # a pass ends after this many raw bytes
    eod: EodOptions = EodOptions()
    workers: int = 0  # loader worker processes per rank; 0: in the training process

    @property
    def names(self) -> list[str]:
        return [x.name for x in self.inputs]

    def describe(self) -> str:
        return ", ".join(self.names[:3]) + (f" (+{len(self.inputs) - 3} more)" if len(self.inputs) > 3 else "")


@dataclass(frozen=True)
class Position:
    """Where a stream is in the pass: the next record to look at."""

    epoch: int = 0  # passes completed
    record: int = 0  # number of the next record within the pass
    input: int = 0  # the input that holds it
    in_input: int = 0  # its number within that input
    nbytes: int = 0  # raw bytes of the pass before it (for the byte budget)

    @property
    def key(self) -> tuple[int, int]:
        return (self.epoch, self.record)


def is_held_out(digest: bytes, fraction: float) -> bool:
    """A document is held out for validation when its hash falls in the first `fraction` of hash space."""
    return int.from_bytes(digest[:8], "little") < fraction * 2.0 ** 64


def consumed(frontier: dict | None, epoch: int, record: int) -> bool:
    """Whether an earlier layout of streams (saved before a resize) already took this record."""
    while frontier is not None:
        positions = frontier["positions"]
        if tuple(positions[record % frontier["num_streams"]]) > (epoch, record):
            return True
        frontier = frontier["inner"]
    return False


def records_from(spec: StreamSpec, start: Position) -> Iterator[tuple[Position, object]]:
    """Records of one pass from `start`, each with its own position; earlier inputs are not opened."""
    record, nbytes = start.record, start.nbytes
    for i in range(start.input, len(spec.inputs)):
        skip = start.in_input if i == start.input else 0
        for j, item in enumerate(read_records(i, spec.inputs[i], spec.cleaning.text_field, streaming=True)):
            if j < skip:
                continue
            if spec.max_bytes is not None and nbytes >= spec.max_bytes:
                return
            yield Position(start.epoch, record, i, j, nbytes), item
            record += 1
            nbytes += len(item.payload)


def after(position: Position, payload_bytes: int) -> Position:
    return replace(position, record=position.record + 1, in_input=position.in_input + 1,
                   nbytes=position.nbytes + payload_bytes)


def stream_documents(
    spec: StreamSpec, stream: int, num_streams: int, start: Position, seen: set[bytes],
    report: Report, frontier: dict | None = None, split: str = "train",
) -> Iterator[tuple[Position, str, bytes]]:
    """Documents of one stream to the end of the pass: (position after it, text, content hash).

    `seen` (hashes kept so far in this pass) is updated: a document whose hash
    is in it is a duplicate and dropped. `split="valid"` yields the held-out
    documents instead of the training ones.
    """
    dedup = spec.cleaning.dedup
    for position, item in records_from(spec, start):
        if position.record % num_streams != stream or consumed(frontier, position.epoch, position.record):
            continue
        for text in clean_records([(item.mode, item.payload)], spec.cleaning, spec.names,
                                  [item.input_index], report):
            digest = content_hash(text)
            stage = report.stages["dedup"]
            if is_held_out(digest, spec.valid_fraction) != (split == "valid"):
                continue  # the other split's document: neither counted nor remembered here
            size = nbytes(text)
            stage.enter(size)
            if dedup:
                if digest in seen:
                    continue
                seen.add(digest)
            stage.leave(size)
            yield after(position, len(item.payload)), text, digest


class Packer:
    """Documents' tokens, each document ending in EOS, cut into samples of seq_len + 1 tokens;
    consecutive samples share one token (the last of one is the first of the next)."""

    def __init__(self, sp, seq_len: int, tokens: Iterable[int] = ()):
        self.sp, self.eos = sp, sp.eos_id()
        self.seq_len, self.width = seq_len, seq_len + 1
        self.buffer = list(tokens)
        self.head = 0  # buffer[head:] is unsent; a long document is not shifted down sample by sample

    def add(self, text: str) -> int:
        """Encodes a document and appends its ids and EOS; returns how many tokens that is."""
        ids = self.sp.encode(text)
        ids.append(self.eos)
        self.buffer.extend(ids)
        return len(ids)

    def take(self) -> list[int] | None:
        """The next sample, or None when the tokens left are too few for one (add a document)."""
        if len(self.buffer) - self.head < self.width:
            del self.buffer[:self.head]
            self.head = 0
            return None
        sample = self.buffer[self.head:self.head + self.width]
        self.head += self.seq_len  # the last token is the next sample's first input
        return sample

    @property
    def pending(self) -> list[int]:
        """Tokens read but not yet sent: a stream state's `buffer`."""
        return self.buffer[self.head:]


def fresh_state() -> dict:
    """A stream at the start of the first pass. Plain Python values, so checkpoints pickle them."""
    return {**asdict(Position()), "buffer": [], "shared": False, "samples": 0, "seen": b"",
            "report": Report().to_dict()}


def position_of(state: dict) -> Position:
    return Position(*(state[k] for k in ("epoch", "record", "input", "in_input", "nbytes")))


def stream_batches(
    spec: StreamSpec, stream: int, num_streams: int, state: dict, frontier: dict | None,
    micro_batch_size: int,
) -> Iterator[tuple[np.ndarray, dict]]:
    """Endless micro-batches [micro_batch_size, seq_len + 1] of one stream, each with the
    stream's state after it (its `seen` holding only the hashes added since the last batch,
    `reset_seen` set when a new pass began)."""
    import sentencepiece as spm

    packer = Packer(spm.SentencePieceProcessor(model_proto=spec.tokenizer_model), spec.seq_len, state["buffer"])
    position = position_of(state)
    shared, samples = state["shared"], state["samples"]
    seen = {state["seen"][k:k + 16] for k in range(0, len(state["seen"]), 16)}
    report = Report.from_dict(state["report"])
    new_seen: list[bytes] = []
    reset_seen = False
    documents = stream_documents(spec, stream, num_streams, position, seen, report, frontier)
    whole_pass, pass_tokens = position.record == 0, 0  # whether this generator saw the pass from its start
    while True:
        block = []
        while len(block) < micro_batch_size:
            sample = packer.take()
            if sample is not None:
                block.append(sample)
                shared = True
                samples += 1
                continue
            document = next(documents, None)
            if document is None:  # end of the pass: start the next one
                if whole_pass and pass_tokens == 0:
                    raise DataError(
                        f"{spec.describe()}: stream {stream} of {num_streams} has no training documents; "
                        "expected more documents than data-parallel ranks x loader workers")
                position, reset_seen = Position(position.epoch + 1), True
                whole_pass, pass_tokens = True, 0
                seen.clear()
                new_seen.clear()
                documents = stream_documents(spec, stream, num_streams, position, seen, report, frontier)
                continue
            position, text, digest = document
            pass_tokens += packer.add(text)
            if spec.cleaning.dedup:
                new_seen.append(digest)
        delta = {**asdict(position), "buffer": packer.pending, "shared": shared, "samples": samples,
                 "seen": b"".join(new_seen), "reset_seen": reset_seen, "report": report.to_dict()}
        new_seen, reset_seen = [], False
        yield np.asarray(block, dtype=np.int64), delta


class HeldOutSamples:
    """The validation samples of a stream: held-out documents packed in pass order.

    Read lazily, as far as the evaluation batches need, and indexed like a
    dataset (wrapping when the held-out set is shorter than asked for).
    """

    def __init__(self, spec: StreamSpec):
        import sentencepiece as spm

        self.spec = spec
        self.eod = spec.eod
        self._packer = Packer(spm.SentencePieceProcessor(model_proto=spec.tokenizer_model), spec.seq_len)
        self._documents = stream_documents(spec, 0, 1, Position(), set(), Report(), split="valid")
        self._samples: list[np.ndarray] = []
        self._done = False

    def __getitem__(self, index: int) -> np.ndarray:
        width = self.spec.seq_len + 1
        while len(self._samples) <= index and not self._done:
            sample = self._packer.take()
            if sample is not None:
                self._samples.append(np.asarray(sample, dtype=np.int64))
                continue
            document = next(self._documents, None)
            if document is None:
                self._done = True
                break
            self._packer.add(document[1])
        if not self._samples:
            raise DataError(f"{self.spec.describe()}: too few held-out documents for one validation sample "
                            f"of {width} tokens; expected a larger data.valid_fraction or more data")
        return self._samples[index % len(self._samples)] if self._done else self._samples[index]

    def collate(self, samples: list[np.ndarray]):
        return collate(samples, self.eod)


def stream_spec(data_cfg, tokenizer, workers: int | None = None) -> StreamSpec:
    """The stream of a `DataConfig` (`data.sources`, cleaning, budget) read with `tokenizer`."""
    from data_pipeline.prepare import cleaning_config

    d = data_cfg
    return StreamSpec(
        inputs=tuple(resolve_inputs(list(d.sources))), tokenizer_model=tokenizer.model_bytes,
        seq_len=d.seq_len, cleaning=cleaning_config(d), valid_fraction=d.valid_fraction,
        max_bytes=d.max_corpus_bytes,
        eod=EodOptions(tokenizer.eos_id, d.eod_mask_loss, d.reset_position_ids, d.reset_attention_mask),
        workers=d.streaming_workers if workers is None else workers,
    )


def streaming_tokenizer(data_cfg, log=print):
    """`data.tokenizer.model`, or one trained on a sample of the stream and cached by its settings."""
    from data_pipeline.corpus import fingerprint
    from data_pipeline.prepare import cleaning_config, first_missing, train_sample_tokenizer
    from data_pipeline.tokenizer import Tokenizer

    d, t = data_cfg, data_cfg.tokenizer
    if t.model:
        return Tokenizer(t.model)
    settings = json.dumps([asdict(t), asdict(cleaning_config(d))], sort_keys=True).encode()
    directory = Path(d.cache_dir) / (f"{fingerprint(d.sources, d.max_corpus_bytes)}-stream-"
                                     f"{hashlib.sha256(settings).hexdigest()[:8]}")
    path = directory / "tokenizer.model"
    if path.is_file():
        return Tokenizer(path)
    created = first_missing(directory)  # data.cache_dir too, when this makes it
    try:
        return train_sample_tokenizer(d, path, log, log_suffix=" on a sample of the stream")
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def streaming_data(data_cfg, log=print):
    """(train stream spec, held-out validation samples, tokenizer) of a streaming `DataConfig`."""
    tokenizer = streaming_tokenizer(data_cfg, log)
    spec = stream_spec(data_cfg, tokenizer)
    log(f"data: streaming {spec.describe()} on {max(1, spec.workers)} loader stream(s) per rank")
    return spec, HeldOutSamples(spec), tokenizer

