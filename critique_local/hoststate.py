"""Who runs on this host: instance claims shared by every server on one machine.

Several servers (staging beside production, a test suite beside a dev server) share one host's
iptables, Docker networks and containers. Each server *claims* its instance id by holding an
exclusive ``flock`` on ``<root>/instances/<id>.lock`` for as long as it runs, and publishes a
record of itself next to it (``<id>.json``: pid, data dir, the networks it uses). The kernel
releases the lock when the process ends, however it ends (SIGKILL included), so:

- a second server with an instance id already claimed (the same data dir, or a copy of one) is
  refused at start (:class:`InstanceInUse`);
- an instance is *proven gone* when its lock can be taken (:meth:`HostState.if_gone`), and
  only then may another server remove what it left on the host;
- changes to state several servers share (networks, the shared firewall chain) are made while
  holding ``<root>/host.lock`` (:meth:`HostState.exclusive`), so two servers starting at once
  never interleave them.

Whoever takes a dead instance's lock to clean up may delete its files; a claim therefore checks
after locking that the file it locked is still the one at the path (the usual lock-file dance).
Every method blocks (file locks): call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
INSTANCE_ID = re.compile(r"[0-9a-f]{16}")
POLL_S = 0.05


class InstanceInUse(Exception):
    """Another live server holds this instance id (``record``: what it published, or {})."""

    def __init__(self, instance_id: str, record: dict[str, Any]) -> None:
        self.instance_id = instance_id
        self.record = record
        who = f"pid {record['pid']}, data dir {record.get('data_dir')}" if "pid" in record else \
            str(record.get("note") or "another process")
        super().__init__(
            f"instance {instance_id} is already running on this host ({who}): every server needs a data_dir of "
            "its own (a copied data dir carries the same instance id: delete its instance_id file)")


class HostLockTimeout(Exception):
    """The host-wide lock stayed taken for longer than the timeout (seconds, in the message)."""


@dataclass(frozen=True)
class InstanceRecord:
    """What an instance published about itself; ``data_dir`` and ``networks`` may be empty."""

    instance_id: str
    pid: int | None
    data_dir: str
    networks: tuple[str, ...]

    @classmethod
    def parse(cls, instance_id: str, raw: dict[str, Any]) -> InstanceRecord:
        pid = raw.get("pid")
        nets = raw.get("networks")
        return cls(instance_id, pid if isinstance(pid, int) else None, str(raw.get("data_dir") or ""),
                   tuple(str(n) for n in nets) if isinstance(nets, list) else ())

    def can_return(self) -> bool:
        """Whether a server could still start as this instance: its data dir still holds its
        id. False means whatever it left on the host can never be used again."""
        if not self.data_dir:
            return True  # unknown: assume it may
        try:
            return (Path(self.data_dir) / "instance_id").read_text().strip() == self.instance_id
        except FileNotFoundError:
            return False
        except OSError:
            return True


def default_root(configured: Path) -> Path:
    """``configured`` when it can be created, else a per-user directory under the temp dir (a
    server that is not root cannot write ``/run``; it then only sees servers of its own user)."""
    try:
        configured.mkdir(parents=True, exist_ok=True, mode=0o755)
        probe = configured / "instances"
        probe.mkdir(exist_ok=True, mode=0o755)
        if not os.access(probe, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable", str(probe))
        return configured
    except PermissionError:
        fallback = Path(tempfile.gettempdir()) / f"critique-local-{os.getuid()}"
        log.warning("%s is not writable; instance claims go to %s (servers of other users are not seen)",
                    configured, fallback)
        fallback.mkdir(parents=True, exist_ok=True, mode=0o700)
        return fallback


def _lock(fd: int, timeout_s: float) -> bool:
    """Take an exclusive flock on ``fd`` within ``timeout_s`` (0: one try)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


class InstanceClaim:
    """This server's hold on its instance id; :meth:`release` (or process exit) gives it up."""

    def __init__(self, host: HostState, instance_id: str, fd: int, record: dict[str, Any]) -> None:
        self.host = host
        self.instance_id = instance_id
        self._fd: int | None = fd
        self._record = record
        self._also: list[Callable[[], None]] = []

    def also_release(self, release: Callable[[], None]) -> None:
        """Call ``release`` when this claim is released (a lock held together with it)."""
        self._also.append(release)

    def publish(self, **fields: Any) -> None:
        """Add ``fields`` to the record other servers read (atomically replaced)."""
        self._record.update(fields)
        self.host._write_record(self.instance_id, self._record)

    def release(self) -> None:
        # The record stays: it tells the others where this instance's data dir is, so that
        # what it leaves (idle sandboxes kept for its restart) is removed once it can never
        # come back. The lock file stays too: unlinking it here would race a new claim.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        while self._also:
            self._also.pop()()


class HostState:
    """The host-wide directory ``root`` (``server.host_state_dir``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.instances = root / "instances"
        self.instances.mkdir(parents=True, exist_ok=True)

    def _lock_path(self, instance_id: str) -> Path:
        return self.instances / f"{instance_id}.lock"

    def _record_path(self, instance_id: str) -> Path:
        return self.instances / f"{instance_id}.json"

    def _write_record(self, instance_id: str, record: dict[str, Any]) -> None:
        tmp = self.instances / f".{instance_id}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self._record_path(instance_id))

    def read_record(self, instance_id: str) -> InstanceRecord:
        try:
            raw = json.loads(self._record_path(instance_id).read_text())
        except (OSError, ValueError):
            raw = {}
        return InstanceRecord.parse(instance_id, raw if isinstance(raw, dict) else {})

    def claim(self, instance_id: str, data_dir: Path, wait_s: float = 10.0) -> InstanceClaim:
        """Hold ``instance_id`` for this process. Waits up to ``wait_s`` seconds (another server
        may be cleaning up after this instance's previous life), then raises InstanceInUse."""
        if not INSTANCE_ID.fullmatch(instance_id):
            raise ValueError(f"instance id {instance_id!r} is not 16 hex digits: delete the instance_id file")
        path = self._lock_path(instance_id)
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if not _lock(fd, max(0.0, deadline - time.monotonic())):
                os.close(fd)
                raw = json.loads(self._record_path(instance_id).read_text()) \
                    if self._record_path(instance_id).exists() else {}
                raise InstanceInUse(instance_id, raw if isinstance(raw, dict) else {})
            if _same_file(fd, path):
                break
            os.close(fd)  # a cleaner removed the file we locked: lock the new one
        record = {"instance": instance_id, "pid": os.getpid(), "data_dir": str(data_dir.resolve()),
                  "started_at": time.time(), "networks": []}
        self._write_record(instance_id, record)
        return InstanceClaim(self, instance_id, fd, record)

    @contextlib.contextmanager
    def exclusive(self, timeout_s: float = 120.0) -> Iterator[None]:
        """Hold the host-wide lock for changes to shared state (networks, firewall chain)."""
        fd = os.open(self.root / "host.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if not _lock(fd, timeout_s):
                raise HostLockTimeout(f"{self.root / 'host.lock'} stayed locked for {timeout_s:.0f} s")
            yield
        finally:
            os.close(fd)

    def known(self) -> set[str]:
        """Ids of every instance with files here (running or not)."""
        return {p.name.split(".")[0] for p in self.instances.iterdir()
                if INSTANCE_ID.fullmatch(p.name.split(".")[0]) and p.suffix in (".lock", ".json")}

    def alive(self, instance_id: str) -> bool:
        with self.if_gone(instance_id) as gone:
            return gone is None

    def live_records(self, excluding: str = "") -> list[InstanceRecord]:
        """Records of the instances that run now."""
        return [self.read_record(i) for i in sorted(self.known()) if i != excluding and self.alive(i)]

    @contextlib.contextmanager
    def if_gone(self, instance_id: str, forget: bool = False) -> Iterator[InstanceRecord | None]:
        """Yield the instance's record while holding its lock when it is proven gone (nobody holds
        the lock), else None. With ``forget``, its files are deleted on leaving, still locked."""
        path = self._lock_path(instance_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield self.read_record(instance_id)  # no lock file: no server holds this id
            if forget:
                self._record_path(instance_id).unlink(missing_ok=True)
            return
        try:
            if not _lock(fd, 0) or not _same_file(fd, path):
                yield None
                return
            yield self.read_record(instance_id)
            if forget:
                self._record_path(instance_id).unlink(missing_ok=True)
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)
