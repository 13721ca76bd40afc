"""One nightly run per LLMREC_HOME at a time: two runs on the same state would both ingest
the same files and race on the champion alias. The lock is an flock, so it is released
when the holding process dies, however it dies."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager

from llmrec.config import Home
from llmrec.errors import LlmrecError


@contextmanager
def exclusive(home: Home):
    home.ensure()
    path = home.root / ".nightly.lock"
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise LlmrecError(
                f"another nightly run is using home={str(home.root)!r} (lock {path}); wait for it to finish"
            ) from error
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
