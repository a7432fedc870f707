"""Synchronous reads of a database file for the operator's commands (``doctor``, ``sandbox gc``,
``backup``, ``restore``, ``migrate --check``): they may run beside a live server, so they never
migrate nor write it. Every function raises :data:`DatabaseError` (``sqlite3.Error``) when the
file cannot be read as a database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

DatabaseError = sqlite3.Error


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


def schema_version(path: Path) -> int:
    """The file's schema version (``PRAGMA user_version``: migrations applied; 0 for a new file)."""
    conn = _read_only(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def integrity(path: Path) -> tuple[str, int]:
    """(``PRAGMA integrity_check``'s verdict, ``"ok"`` when sound; the schema version)."""
    conn = _read_only(path)
    try:
        verdict = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        return verdict, int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def copy_to(path: Path, dest: Path) -> None:
    """A consistent copy of the live database ``path`` into the file ``dest`` (SQLite's online
    backup API: all pages in one read transaction, so every write committed up to that moment and
    nothing after, while the server keeps writing), in rollback-journal mode: one
    self-contained file. ``path`` is only read."""
    src = sqlite3.connect(path, timeout=30)  # a read-only open of a WAL database can fail
    dst = sqlite3.connect(dest)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
    finally:
        dst.close()
        src.close()
