"""Raw records from the inputs users bring, read as cheaply as possible.

An input spec is one of:
  - a file, directory or glob of `.txt` (one document per file), `.jsonl`/`.json`
    (one document per line, plain, `.gz` or `.zst`) or `.parquet` files;
  - a directory written by `datasets.Dataset.save_to_disk`;
  - `builder:NAME:FILES`, a `datasets` builder over local files
    (e.g. `builder:json:/data/*.jsonl.gz`, `builder:text:/data/*.txt`);
  - `hub:NAME[:SPLIT]`, a Hub dataset, streamed (needs a network);
  - `stdlib`, the Python standard library's sources and documentation.

Readers here do no decoding or parsing of text records: they hand raw bytes
(or strings, where the container already holds strings) to the worker
processes, so that the reading process stays cheap and every core encodes.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data_pipeline.corpus import STDLIB, CorpusError, _stdlib_files, expand_path

# How a worker turns a record payload into text.
RAW_TEXT, JSON_LINE, STRING = "raw", "json", "str"
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".py", ".rst")
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class Input:
    name: str  # what error messages call it
    kind: str  # txt | jsonl | parquet | disk | builder | hub | stdlib
    size: int  # bytes on disk (an estimate for streamed inputs), for balancing work


@dataclass
class Record:
    input_index: int
    mode: str  # RAW_TEXT | JSON_LINE | STRING
    payload: bytes | str
    position: float  # fraction of the input read once this record is read, in [0, 1]


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    for compression in (".gz", ".zst"):
        if name.endswith(compression):
            name = name[: -len(compression)]
    if name.endswith(_JSON_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(_TEXT_SUFFIXES):
        return "txt"
    return None


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def resolve_inputs(specs: list[str]) -> list[Input]:
    """Expands specs into inputs in a fixed order; a spec that matches nothing is an error."""
    inputs: list[Input] = []
    for spec in specs:
        if spec == STDLIB:
            inputs.append(Input(STDLIB, "stdlib", sum(p.stat().st_size for p in _stdlib_files())))
            continue
        if spec.startswith(("builder:", "hub:")):
            kind = spec.split(":", 1)[0]
            if kind == "builder":
                parts = spec.split(":", 2)
                if len(parts) != 3 or not glob.glob(os.path.expanduser(parts[2]), recursive=True):
                    raise CorpusError(f"{spec}: expected builder:NAME:FILES with FILES matching local files")
                size = sum(os.path.getsize(p) for p in glob.glob(os.path.expanduser(parts[2]), recursive=True))
            else:
                size = 1 << 30
            inputs.append(Input(spec, kind, size))
            continue
        path = Path(spec).expanduser()
        if _is_saved_dataset(path):
            inputs.append(Input(str(path), "disk", _dir_size(path)))
            continue
        candidates = expand_path(spec, keep=lambda p: p.is_file() or _is_saved_dataset(p))
        found = []
        for p in candidates:
            if _is_saved_dataset(p):
                found.append(Input(str(p), "disk", _dir_size(p)))
            elif (kind := _file_kind(p)) is not None or path.is_file():
                found.append(Input(str(p), kind or "txt", p.stat().st_size))
        if not found:
            raise CorpusError(f"{spec}: no .txt, .jsonl(.gz/.zst) or .parquet files")
        inputs.extend(found)
    return inputs


def _open_binary(path: str, buffering: int = -1) -> tuple[io.BufferedIOBase, io.BufferedIOBase]:
    """The decompressed stream and the raw file under it (whose tell() gives progress).

    `buffering` applies to an uncompressed file only: a compressed one's tell()
    depends on how far the decompressor has read ahead, so its buffers stay as they are.
    """
    compressed = path.endswith((".gz", ".zst"))
    raw = open(path, "rb", buffering=-1 if compressed else buffering)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), raw
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(raw)), raw
    return raw, raw


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame. A file cut short, or bytes that
    are no zstd frame, raise EOFError: zstandard's `stream_reader` ends quietly at a frame cut
    short, which would drop the rest of the input without a word."""

    def __init__(self, raw: io.BufferedIOBase):
        import zstandard

        self._raw, self._error = raw, zstandard.ZstdError
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._frame = None  # the decompressor of the frame being read
        self._pending = memoryview(b"")  # decompressed, not yet read (a view: slicing copies nothing)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            data = self._raw.read(1 << 16)
            if not data:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("compressed file ended before the end of its last zstd frame")
                return 0
            self._pending = memoryview(self._decompress(data))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None or self._frame.eof:
                self._frame = self._new_frame()
            try:
                out.append(self._frame.decompress(data))
            except self._error as err:
                raise EOFError(f"not a zstd stream ({err})") from None
            data = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)


def _read_jsonl(index: int, item: Input) -> Iterator[Record]:
    size = max(item.size, 1)
    # A plain file's tell() counts what was handed out, not what was read ahead, so a larger
    # buffer changes no position: it saves re-joining long lines from 8 KiB reads.
    stream, raw = _open_binary(item.name, buffering=1 << 20)
    with raw:
        try:
            for line in stream:
                if not line.isspace():  # a line from iteration is never empty
                    yield Record(index, JSON_LINE, line, min(1.0, raw.tell() / size))
        except (OSError, EOFError) as err:  # a corrupt or truncated archive
            raise CorpusError(f"{item.name}: cannot decompress ({err})") from None


def _read_txt(index: int, item: Input) -> Iterator[Record]:
    stream, raw = _open_binary(item.name)
    with raw:
        try:
            data = stream.read()
        except (OSError, EOFError) as err:
            raise CorpusError(f"{item.name}: cannot decompress ({err})") from None
    yield Record(index, RAW_TEXT, data, 1.0)


def _read_parquet(index: int, item: Input, field: str, batch_rows: int = 2048) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(item.name)
    except Exception as err:
        raise CorpusError(f"{item.name}: not a readable parquet file ({err})") from None
    if field not in reader.schema_arrow.names:
        raise CorpusError(f"{item.name}: no column {field!r} (has {reader.schema_arrow.names})")
    total = max(reader.metadata.num_rows, 1)
    done = 0
    for batch in reader.iter_batches(batch_size=batch_rows, columns=[field]):
        for value in batch.column(0).to_pylist():
            done += 1
            if value is not None:
                yield Record(index, STRING if isinstance(value, str) else RAW_TEXT, value, done / total)


def _read_dataset(index: int, item: Input, field: str, streaming: bool = False) -> Iterator[Record]:
    import datasets

    datasets.disable_progress_bars()
    if item.kind == "disk":
        loaded = datasets.load_from_disk(item.name)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
    elif item.kind == "builder":
        # Streamed when training reads it directly: records come straight from
        # the files, with no Arrow cache built first.
        _, name, files = item.name.split(":", 2)
        loaded = datasets.load_dataset(name, data_files=sorted(glob.glob(os.path.expanduser(files), recursive=True)),
                                       split="train", streaming=streaming)
    else:  # hub: streamed, so nothing is downloaded beyond what is read
        name, _, split = item.name[len("hub:"):].partition(":")
        loaded = datasets.load_dataset(name, split=split or "train", streaming=True)
    names = loaded.column_names
    if names is not None and field not in names:
        raise CorpusError(f"{item.name}: no column {field!r} (has {names})")
    total = len(loaded) if hasattr(loaded, "__len__") else 0
    for done, row in enumerate(loaded.select_columns([field]).iter(batch_size=1024) if total else loaded):
        if not total and field not in row:  # an iterable learns its columns from its rows
            raise CorpusError(f"{item.name}: no column {field!r} (has {list(row)})")
        values = row[field] if total else [row[field]]
        for value in values:
            if value is not None:
                position = min(1.0, (done + 1) * 1024 / total) if total else 0.0
                yield Record(index, STRING, value, position)


def _read_stdlib(index: int) -> Iterator[Record]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Record(index, STRING, topics[name], 0.0)
    files = _stdlib_files()
    for i, path in enumerate(files):
        yield Record(index, RAW_TEXT, path.read_bytes(), (i + 1) / len(files))


def read_records(index: int, item: Input, field: str = "text", streaming: bool = False) -> Iterator[Record]:
    """Records of one input, in a fixed order; `streaming` reads `builder:` inputs as an iterable."""
    if item.kind == "jsonl":
        return _read_jsonl(index, item)
    if item.kind == "txt":
        return _read_txt(index, item)
    if item.kind == "parquet":
        return _read_parquet(index, item, field)
    if item.kind == "stdlib":
        return _read_stdlib(index)
    return _read_dataset(index, item, field, streaming)


def payload_text(mode: str, payload: bytes | str, field: str) -> str:
    """Decodes one record; raises UnicodeDecodeError or ValueError on a bad one."""
    if mode == STRING:
        return payload  # type: ignore[return-value]
    if mode == RAW_TEXT:
        return payload.decode("utf-8")  # type: ignore[union-attr]
    value = json.loads(payload)
    text = value.get(field) if isinstance(value, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"no string field {field!r}")
    return text


def node_share(inputs: list[Input], node_rank: int, num_nodes: int) -> list[int]:
    """Indices of the inputs node `node_rank` of `num_nodes` processes: balanced by size, fixed."""
    loads = [0] * num_nodes
    owner = []
    for item in inputs:  # in order, so every node computes the same assignment
        k = min(range(num_nodes), key=lambda j: (loads[j], j))
        loads[k] += max(item.size, 1)
        owner.append(k)
    return [i for i, k in enumerate(owner) if k == node_rank]
