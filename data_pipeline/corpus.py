"""Raw documents from the configured sources.

A document is one unit of text: a file, or a documentation topic. The special
source "stdlib" is the Python standard library's own source files plus its
bundled documentation topics: real text that exists wherever Python does, so
the default run needs no download.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from common.errors import UserError

STDLIB = "stdlib"
# Test suites, vendored trees and the codec tables in `encodings` are skipped:
# they are large, repetitive and not what anyone wants a model to learn first
# (one charmap table in the validation split would dominate its loss).
_STDLIB_SKIP = {"site-packages", "test", "tests", "idlelib", "lib2to3", "encodings", "__pycache__"}


class CorpusError(UserError, ValueError):
    """A source is missing or yields no text; the message names it."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _stdlib_files() -> list[Path]:
    return list(_stdlib_file_tuple())


@functools.lru_cache(maxsize=1)  # a run asks several times (fingerprint, tokenizer, shards)
def _stdlib_file_tuple() -> tuple[Path, ...]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirectories, names in os.walk(root):
        # Skipped trees are never entered: site-packages alone can hold more files than the rest.
        subdirectories[:] = [d for d in subdirectories if d not in _STDLIB_SKIP]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    # Order by a hash of the path, so a byte budget takes a spread of modules
    # rather than the alphabetically first ones.
    return tuple(sorted(files, key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest()))


def expand_path(source: str, keep: Callable[[Path], bool] = Path.is_file, context: str = "") -> list[Path]:
    """The paths one source names (`~` expanded): itself if a file; if a directory, every
    non-hidden file under it (searched recursively, sorted), which may be none; otherwise
    the glob's matches that `keep` accepts (sorted), of which there must be at least one.
    A glob that matches nothing raises CorpusError, its message prefixed with `context`."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
    files = [p for p in files if keep(p)]
    if not files:
        raise CorpusError(f"{context}{source}: no such file, directory or matching glob")
    return files


def resolve_files(source: str) -> list[Path]:
    """Files of one source: a file, a directory (searched recursively) or a glob."""
    files = expand_path(source, context="data.sources: ")
    if not files:  # only a directory can name no file
        raise CorpusError(f"data.sources: {source}: directory holds no files")
    return files


def source_files(sources: list[str]) -> list[Path]:
    """Local files behind the sources (a `builder:NAME:FILES` source's FILES; none for `hub:`)."""
    files: list[Path] = []
    for source in sources:
        if source.startswith("hub:"):
            continue
        if source.startswith("builder:"):
            source = source.split(":", 2)[-1]
        files.extend(_stdlib_files() if source == STDLIB else resolve_files(source))
    return files


def fingerprint(sources: list[str], max_bytes: int) -> str:
    """Identifies the corpus by its files' names, sizes and modification times."""
    digest = hashlib.sha256(str(max_bytes).encode())
    digest.update(repr(list(sources)).encode())
    for path in source_files(sources):
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if STDLIB in sources:
        from pydoc_data import topics

        digest.update(Path(topics.__file__).read_bytes())
    return digest.hexdigest()[:16]


def iter_documents(sources: list[str], max_bytes: int | None = None) -> Iterator[Document]:
    """Yields documents in a fixed order until `max_bytes` of text have been read."""
    budget = max_bytes if max_bytes is not None else float("inf")
    for document in _all_documents(sources):
        if budget <= 0:
            return
        if not document.text.strip():
            continue
        budget -= len(document.text.encode("utf-8"))
        yield document


def _all_documents(sources: list[str]) -> Iterator[Document]:
    for source in sources:
        if source == STDLIB:
            from pydoc_data.topics import topics

            for name in sorted(topics):
                yield Document(f"pydoc:{name}", topics[name])
            for path in _stdlib_files():
                yield Document(str(path), path.read_text(encoding="utf-8", errors="replace"))
        else:
            for path in resolve_files(source):
                try:
                    text = path.read_text(encoding="utf-8")
                except UnicodeDecodeError as err:
                    raise CorpusError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})")
                yield Document(str(path), text)
