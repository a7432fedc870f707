"""Upgrades from every earlier schema version: a database at version k is made by migrations
1..k themselves, filled with a row in every table, then opened by the current code. Also:
forward-only (a newer database is refused untouched) and ``critique-local migrate --check``."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from critique_local.ops.migrate import describe
from critique_local.store import runs as runs_store
from critique_local.store.db import Database
from critique_local.store.migrations import MIGRATIONS, SchemaTooNew

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = {("runs", "status"): "completed", ("runs", "phase"): "finished", ("runs", "request"): "{}",
             ("runs", "changed_paths"): "[]", ("events", "data"): "{}", ("api_keys", "scopes"): "[]"}


def value(table: str, column: str) -> str:
    return f"v-{table}-{column}"


def build(path: Path, version: int) -> dict[str, int]:
    """A database at schema ``version`` with one row in every table; returns rows per table."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for number, script in enumerate(MIGRATIONS[:version], start=1):
            conn.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
        for table in tables:  # creation order: parents first
            refs = {r[3]: (r[2], r[4]) for r in conn.execute(f"PRAGMA foreign_key_list({table})")}
            names, values = [], []
            columns = conn.execute(f"PRAGMA table_info({table})").fetchall()
            rowid_key = [c[1] for c in columns if c[5]] if sum(1 for c in columns if c[5]) == 1 else []
            for _, col, kind, notnull, default, pk in columns:
                if (col in rowid_key and kind == "INTEGER") or not (notnull or pk) or default is not None:
                    continue  # rowid keys, nullable and defaulted columns stay as SQLite makes them
                names.append(col)
                if (table, col) in OVERRIDES:
                    values.append(OVERRIDES[(table, col)])
                elif col in refs:
                    values.append(value(*refs[col]))
                else:
                    values.append({"INTEGER": 1, "REAL": 1.5}.get(kind, value(table, col)))
            conn.execute(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", values)
        return {t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in tables}
    finally:
        conn.close()


@pytest.mark.parametrize("version", range(1, len(MIGRATIONS) + 1))
async def test_upgrade_from_every_schema_version_keeps_every_row(tmp_path: Path, version: int) -> None:
    path = tmp_path / "critique.db"
    before = build(path, version)
    db = await Database.open(path)
    try:
        run = await runs_store.get_run(db, value("runs", "id"))
        assert run is not None and run.repository_full_name == value("repositories", "full_name")
        assert run.status.value == "completed" and run.changed_paths == []
    finally:
        await db.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        for table, rows in before.items():
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == rows, table
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "audit_log" in tables  # the newest migration ran
    finally:
        conn.close()


async def test_a_database_from_a_newer_release_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "critique.db"
    build(path, len(MIGRATIONS))
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    before = list(conn.iterdump())
    conn.close()
    with pytest.raises(SchemaTooNew, match="downgrades are not supported"):
        await Database.open(path)
    conn = sqlite3.connect(path)
    try:
        assert list(conn.iterdump()) == before
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1
    finally:
        conn.close()


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "CRITIQUE_LOCAL_SERVER_DATA_DIR": str(data_dir), "HOME": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "critique_local", *args], cwd=data_dir, env=env,
                          capture_output=True, text=True)


def test_migrate_check_says_what_would_run_then_migrate_applies_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    build(data / "critique.db", 3)
    check = _cli(data, "migrate", "--check")
    assert check.returncode == 1, check.stderr
    assert f"schema 3, this release {len(MIGRATIONS)}" in check.stdout
    listed = [line.split(":")[0].strip() for line in check.stdout.splitlines()[1:]]
    assert listed == [str(n) for n in range(4, len(MIGRATIONS) + 1)]
    assert "CREATE TABLE audit_log" in check.stdout and "ALTER TABLE runs ADD COLUMN sandbox_token" in check.stdout
    conn = sqlite3.connect(data / "critique.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3  # --check changes nothing
    conn.close()
    applied = _cli(data, "migrate")
    assert applied.returncode == 0 and f"migrated to schema {len(MIGRATIONS)}" in applied.stdout
    again = _cli(data, "migrate", "--check")
    assert again.returncode == 0 and "up to date" in again.stdout


def test_migrate_check_describes_every_statement_of_every_migration() -> None:
    for number, script in enumerate(MIGRATIONS, start=1):
        statements = [s for s in script.split(";") if s.strip()]
        assert len(describe(script)) == len(statements), f"migration {number}: migrate --check would leave some out"
