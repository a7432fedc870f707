"""How ``Harness.stop`` finds and ends an agent's processes (``agent/processes.py``), run against
this machine's own ``/proc`` with a mark no other process carries: every marked process and every
descendant of one ends (one that ignores SIGTERM, one started without the mark, one that left its
parent), and nothing else does. The same script inside a real sandbox is covered end to end by
``tests/e2e/test_sessions.py`` (pause)."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

from critique_local.agent.processes import _STOP

MARK = "CRITIQUE_TEST_AGENT_MARK"


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie holds no memory: it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def marked(value: str) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{MARK}={value}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in found if running(pid)]


def stop(value: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", _STOP, "stop-agent", f"{MARK}={value}", "10"], capture_output=True,
                          text=True, timeout=60)


def test_the_marked_processes_and_their_descendants_end_and_nothing_else() -> None:
    value = secrets.token_hex(8)
    env = {**os.environ, MARK: value}
    # the "agent": a child started without the mark, one that ignores SIGTERM, one that leaves
    # its parent (reparented to init, the mark still in its environment)
    script = (f"env -u {MARK} sleep 1000 & (trap '' TERM; exec sleep 1001) & (setsid sleep 1002 &); "
              "wait")
    agent = subprocess.Popen(["bash", "-c", script], env=env)
    bystander = subprocess.Popen(["sleep", "1003"])
    try:
        deadline = time.monotonic() + 10
        while len(children(agent.pid)) < 2 or len(marked(value)) < 3:
            assert time.monotonic() < deadline, "the agent's processes did not start"
            time.sleep(0.05)
        tree = [agent.pid, *children(agent.pid)]
        orphan = [pid for pid in marked(value) if pid not in tree]
        assert orphan, "the process that left its parent is not found"
        result = stop(value)
        assert result.returncode == 0, result.stderr
        assert agent.wait(5) == -9
        assert [pid for pid in [*tree, *orphan] if running(pid)] == []
        assert marked(value) == []
        assert bystander.poll() is None  # not the agent's: left alone
    finally:
        for proc in (agent, bystander):
            proc.kill()
            proc.wait(5)
    assert stop(value).returncode == 0  # nothing left to stop: fine
