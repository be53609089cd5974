"""Where a path cannot be created."""

from __future__ import annotations

import os
from pathlib import Path


def file_above(path: str | os.PathLike) -> Path | None:
    """The nearest parent of `path` that exists but is no directory (a file, or a broken
    symbolic link), below which nothing can be created; None when there is none."""
    for place in Path(path).parents:
        if place.is_dir():
            return None
        if place.exists() or place.is_symlink():
            return place
    return None
