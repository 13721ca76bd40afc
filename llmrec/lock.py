"""One nightly run (or rollback) per LLMREC_HOME at a time: two runs on the same state would
both ingest the same files and race on the champion alias. The lock is an flock, so it is
released when the holding process dies, however it dies."""

from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager

from llmrec.config import Home
from llmrec.errors import LlmrecError

# How often a waiting run tries the lock again.
POLL_SECONDS = 0.2
# Homes whose lock this process holds: the CLI takes it before starting the flow (so a held
# lock is a one-line error, not a failed flow run) and the flow takes it again; a second
# flock on a new descriptor would block on the first.
_held: set[str] = set()


@contextmanager
def exclusive(home: Home, wait: float = 0.0):
    """Hold the home's lock for the block; wait up to `wait` seconds for it, then raise
    LlmrecError naming the lock file. Re-entered in the same process, it holds already."""
    home.ensure()
    path = home.root / ".nightly.lock"
    if str(path) in _held:
        yield
        return
    with open(path, "w") as handle:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as error:
                if time.monotonic() >= deadline:
                    waited = f" after waiting {wait:g} s" if wait else ""
                    raise LlmrecError(
                        f"another nightly run or rollback is using home={str(home.root)!r} (lock {path}){waited}; "
                        "wait for it to finish, or pass --wait SECONDS"
                    ) from error
                time.sleep(POLL_SECONDS)
        _held.add(str(path))
        try:
            yield
        finally:
            _held.discard(str(path))
            fcntl.flock(handle, fcntl.LOCK_UN)
