"""The one atomic writer: every file or folder llmrec writes appears whole or not at all."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temp)` for a hidden temp sibling of `path` (a file, or a folder `write`
    creates), flush it to disk, then rename it over `path`. A reader never sees a partial
    file, and a crash leaves the old version in place. An existing folder at `path` is moved
    aside and removed only after the new one is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    aside = path.with_name(f".{path.name}.{os.getpid()}.old")
    try:
        write(temp)
        for written in [temp, *(temp.rglob("*") if temp.is_dir() else [])]:
            _fsync(written)
        if temp.is_dir() and path.is_dir():
            os.replace(path, aside)
        os.replace(temp, path)
        _fsync(path.parent)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
    return path
