"""SQLite survives SIGKILL in the middle of heavy writes: the database passes an integrity
check and every write that was acknowledged (committed) is there."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kill_after_acks", [60, 400, 1500])
def test_kill_during_heavy_writes_loses_no_acknowledged_write(tmp_path: Path, kill_after_acks: int) -> None:
    """Killed once it has acknowledged ``kill_after_acks`` writes (a count, not a time: the
    moment is arbitrary but the test does not depend on the machine's speed)."""
    db = tmp_path / "critique.db"
    proc = subprocess.Popen([sys.executable, "-m", "tests.durability_writer", str(db)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    lines = []
    while len(lines) < kill_after_acks:
        line = proc.stdout.readline()
        assert line, "the writer stopped on its own"
        lines.append(line)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    acked: dict[str, int] = {}
    for line in [*lines, *out.splitlines()]:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "ack":
            acked[parts[1]] = max(acked.get(parts[1], 0), int(parts[2]))
    assert sum(acked.values()) >= kill_after_acks
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for run_id, last in acked.items():
            seqs = [r[0] for r in conn.execute("SELECT seq FROM events WHERE run_id = ? ORDER BY seq", (run_id,))]
            assert seqs[: last] == list(range(1, last + 1)), run_id  # no gap, nothing acknowledged missing
            summary = conn.execute("SELECT summary FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
            assert summary is not None and int(summary.split()[1]) >= last
    finally:
        conn.close()
