"""The one atomic writer: every file or folder llmrec writes appears whole or not at all."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

# Longest file name (bytes) on the file systems llmrec writes to (ext4, xfs, tmpfs, overlay).
NAME_MAX = 255
# Hex digits of the hash that keeps shortened names distinct.
DIGEST_CHARS = 16
AT_FDCWD, RENAME_EXCHANGE = -100, 2


def bounded_name(name: str, limit: int = NAME_MAX) -> str:
    """`name` when it fits in `limit` bytes; else its start, a hash of the whole name and
    its extension, cut to fit. Two different long names stay different (the hash), and
    the same name always gives the same result, so a rerun finds what it wrote."""
    if len(name.encode()) <= limit:
        return name
    head, dot, tail = name.rpartition(".")
    extension = f".{tail}" if dot and head and len(tail.encode()) <= DIGEST_CHARS else ""
    stem = name[: len(name) - len(extension)]
    digest = hashlib.sha256(name.encode()).hexdigest()[:DIGEST_CHARS]
    room = limit - len(extension.encode()) - len(digest) - 1
    start = stem.encode()[:room].decode(errors="ignore")
    return f"{start}-{digest}{extension}"


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    kernel, libc or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temp)` for a hidden temp sibling of `path` (a file, or a folder `write`
    creates), flush it to disk, then rename it over `path`. A reader never sees a partial
    file, and a crash leaves the old version in place. An existing folder at `path` is
    swapped with the new one in one step (so no moment exists without either) and removed
    after; where the system cannot swap, it is moved aside first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(bounded_name(f".{path.name}.{os.getpid()}.tmp"))
    aside = path.with_name(bounded_name(f".{path.name}.{os.getpid()}.old"))
    try:
        write(temp)
        for written in [temp, *(temp.rglob("*") if temp.is_dir() else [])]:
            _fsync(written)
        if temp.is_dir() and path.is_dir():
            if not _exchange(temp, path):
                os.replace(path, aside)
                os.replace(temp, path)
        else:
            os.replace(temp, path)
        _fsync(path.parent)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
    return path
