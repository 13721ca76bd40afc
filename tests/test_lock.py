"""The home's lock: one night or rollback at a time, across processes; waiting for it;
re-entrant inside the process that holds it."""

import subprocess
import sys
import time

import pytest

from llmrec.config import Home
from llmrec.errors import LlmrecError
from llmrec.lock import exclusive

HOLD = """
import fcntl, sys, time
handle = open(sys.argv[1], "w")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_lock(home: Home, seconds: float) -> subprocess.Popen:
    home.ensure()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(home.root / ".nightly.lock"), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_lock_held_by_another_process_is_a_user_error(tmp_path):
    home = Home(tmp_path / "home")
    holder = hold_lock(home, 30)
    try:
        with pytest.raises(LlmrecError, match=r"another nightly run or rollback.*--wait"):
            with exclusive(home):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(home):  # freed when the holder dies, however it dies
        pass


def test_wait_gets_the_lock_once_it_is_released(tmp_path):
    home = Home(tmp_path / "home")
    holder = hold_lock(home, 1.0)
    started = time.monotonic()
    with exclusive(home, wait=20):
        assert time.monotonic() - started > 0.5
    holder.wait()
    holder = hold_lock(home, 30)
    try:
        with pytest.raises(LlmrecError, match="after waiting 0.5 s"):
            with exclusive(home, wait=0.5):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_the_holding_process_may_take_it_again(tmp_path):
    home = Home(tmp_path / "home")
    with exclusive(home):
        with exclusive(home):
            pass
        holder = subprocess.run([sys.executable, "-c", "import fcntl,sys; h=open(sys.argv[1],'w');"
                                 "fcntl.flock(h, fcntl.LOCK_EX|fcntl.LOCK_NB)", str(home.root / ".nightly.lock")],
                                capture_output=True)
        assert holder.returncode != 0  # still held after the inner block ended
