"""Cleaning stages, each counted: decode → normalise → strip controls → length filter → dedup.

The stages that look at one document at a time run in the worker processes;
deduplication needs every document's hash and runs where the results meet
(see preprocess.py), so it is exact across inputs and workers, and across
the nodes of a multi-node job (each node's hashes are exchanged first).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

from common.errors import first_line
from data_pipeline.corpus import CorpusError
from data_pipeline.sources import RAW_TEXT, payload_text

STAGES = ("decode", "normalize", "control_chars", "min_length", "max_length", "dedup")
# C0 and C1 control characters except tab, newline and carriage return.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# The same characters found in a text's UTF-8 bytes, several times faster than the regex
# above on the text: deleting the C0 controls and DEL is a plain table loop, and the C1
# controls (U+0080-U+009F) are 0xC2 then 0x80-0x9F, a pattern with a literal first byte.
_C0_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_C1_UTF8 = re.compile(b"\xc2[\x80-\x9f]")


class DataError(CorpusError):
    """Bad input data; the message names the file."""


@dataclass(frozen=True)
class CleaningConfig:
    text_field: str = "text"
    normalize: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = "NFC"
    strip_control: bool = True
    min_chars: int = 1  # documents shorter than this (after stripping whitespace) are dropped
    max_chars: int = 0  # 0: no limit
    dedup: bool = True
    on_bad_record: Literal["skip", "error"] = "skip"


@dataclass
class StageCount:
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def enter(self, size: int) -> None:
        """Counts one document of `size` bytes into the stage."""
        self.docs_in += 1
        self.bytes_in += size

    def leave(self, size: int) -> None:
        """Counts one document of `size` bytes out of the stage."""
        self.docs_out += 1
        self.bytes_out += size

    def add(self, other: "StageCount") -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out


@dataclass
class Report:
    stages: dict[str, StageCount] = field(default_factory=lambda: {s: StageCount() for s in STAGES})

    def add(self, other: "Report") -> None:
        for name, count in other.stages.items():
            self.stages[name].add(count)

    def to_dict(self) -> dict:
        return {name: vars(count).copy() for name, count in self.stages.items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Report":
        report = cls()
        for name, count in values.items():
            report.stages[name] = StageCount(**count)
        return report

    def table(self) -> str:
        rows = [f"{'stage':<14}{'docs in':>12}{'docs out':>12}{'bytes in':>16}{'bytes out':>16}"]
        for name, c in self.stages.items():
            rows.append(f"{name:<14}{c.docs_in:>12,}{c.docs_out:>12,}{c.bytes_in:>16,}{c.bytes_out:>16,}")
        return "\n".join(rows)


def content_hash(text: str) -> bytes:
    return bytes_hash(text.encode("utf-8"))


def bytes_hash(data: bytes) -> bytes:
    """`content_hash` of the text whose UTF-8 encoding is `data`."""
    return hashlib.blake2b(data, digest_size=16).digest()


def nbytes(text: str) -> int:
    # Pure-ASCII strings are common and their byte length is their length.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def clean_records(
    records: list[tuple[str, bytes | str]], cfg: CleaningConfig, source_names: list[str],
    sources: list[int], report: Report, kept_sources: list[int] | None = None,
    kept_bytes: list[bytes] | None = None,
) -> list[str]:
    """Decodes and cleans a batch of (mode, payload) records; drops and counts what fails.

    `kept_sources`, if given, receives the source of each text returned, and
    `kept_bytes` its UTF-8 encoding (computed here anyway, so callers that hash
    or encode bytes need not encode again).
    """
    out: list[str] = []
    s = report.stages
    for (mode, payload), source in zip(records, sources):
        s["decode"].enter(len(payload) if isinstance(payload, bytes) else nbytes(payload))
        try:
            text = payload_text(mode, payload, cfg.text_field)
            # A raw payload is the text's UTF-8 already (its decoding just checked that).
            data = payload if mode == RAW_TEXT else text.encode("utf-8")
        except (UnicodeError, ValueError) as err:  # UnicodeEncodeError: a lone surrogate from JSON
            if cfg.on_bad_record == "error":
                raise DataError(f"{source_names[source]}: bad record ({_reason(err)})") from None
            continue
        s["decode"].leave(len(data))

        s["normalize"].enter(len(data))
        # Every normalisation form leaves ASCII text as it is.
        if cfg.normalize != "none" and not text.isascii() and not unicodedata.is_normalized(cfg.normalize, text):
            text = unicodedata.normalize(cfg.normalize, text)
            data = text.encode("utf-8")
        s["normalize"].leave(len(data))

        s["control_chars"].enter(len(data))
        if cfg.strip_control and _has_control(data):
            text = _CONTROL.sub("", text)
            data = text.encode("utf-8")
        s["control_chars"].leave(len(data))

        s["min_length"].enter(len(data))
        if len(text.strip()) < max(cfg.min_chars, 1):
            continue
        s["min_length"].leave(len(data))

        s["max_length"].enter(len(data))
        if cfg.max_chars and len(text) > cfg.max_chars:
            continue
        s["max_length"].leave(len(data))
        out.append(text)
        if kept_sources is not None:
            kept_sources.append(source)
        if kept_bytes is not None:
            kept_bytes.append(data)
    return out


def _has_control(data: bytes) -> bool:
    """Whether the text whose UTF-8 encoding is `data` holds a character that `_CONTROL` matches."""
    return len(data.translate(None, _C0_BYTES)) != len(data) or _C1_UTF8.search(data) is not None


def _reason(err: Exception) -> str:
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8: {err.reason} at byte {err.start}"
    return first_line(err)


class Deduplicator:
    """Exact deduplication by content hash: the first occurrence in input order is kept."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.seen: set[bytes] = set()

    def keep(self, digest: bytes) -> bool:
        if not self.enabled:
            return True
        if digest in self.seen:
            return False
        self.seen.add(digest)
        return True
