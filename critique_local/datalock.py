"""The data dir's own lock: an exclusive ``flock`` on ``<data_dir>/server.lock``, held by the
process serving the data dir for as long as it runs, and by ``critique-local restore`` and
``critique-local sandbox gc`` while they act on a stopped server.

The host-wide instance claims (``hoststate``) live in ``server.host_state_dir``. A command run
with another ``host_state_dir`` than the server's (another configuration file, a missing
environment variable, or a user that cannot write ``/run`` and falls back to a temp dir) does
not see the server's claim there and would take a running server for a stopped one. This lock
lives in the data dir itself, so whoever opens the data dir sees that it is served. The kernel
releases it when the process ends, however it ends. Blocking (file locks): call from a thread.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = "server.lock"
POLL_S = 0.05


class DataDirLock:
    """A held lock on one data dir; :meth:`release` (or process exit) gives it up."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def take(cls, data_dir: Path, wait_s: float = 0.0) -> DataDirLock | None:
        """The lock, within ``wait_s`` seconds; None when another process (or another open of
        the file in this one) holds it. Creates the data dir when missing."""
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return cls(fd)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(POLL_S)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def served(data_dir: Path) -> bool:
    """Whether a process holds ``data_dir``'s lock now (a server runs on it). Never creates
    anything: a data dir without the lock file is not served."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
