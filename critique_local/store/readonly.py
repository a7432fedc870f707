"""Read-only, synchronous reads of a database file for the operator's commands (``doctor``,
``sandbox gc``): they may run beside a live server, so they never migrate nor write it."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)


def schema_and_newest_run(path: Path) -> tuple[int, str | None]:
    """(schema version, ``created_at`` of the newest run or None). Raises sqlite3.Error."""
    conn = _read_only(path)
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        newest = conn.execute("SELECT MAX(created_at) FROM runs").fetchone()[0] if version else None
    finally:
        conn.close()
    return version, newest


def run_sandboxes(path: Path) -> list[tuple[str, str, str | None]]:
    """(run id, status, sandbox id) of every run. Raises sqlite3.Error."""
    conn = _read_only(path)
    try:
        return [(str(r[0]), str(r[1]), r[2]) for r in conn.execute("SELECT id, status, sandbox_id FROM runs")]
    finally:
        conn.close()
