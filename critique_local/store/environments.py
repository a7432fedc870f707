"""Environments (``envs/``): one row per kept environment (its key, where the backend holds it,
size, build time, when created and last used), and one row per run saying which environment it
started from and how (built, joined another run's build, or reused)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from critique_local.clock import now_iso
from critique_local.store.db import Database, Read, Row

_COLUMNS = "key, repository, backend, ref, size_bytes, build_ms, created_at, last_used_at, stale"


@dataclass(frozen=True)
class EnvironmentRow:
    key: str
    repository: str
    backend: str
    ref: str  # Docker: image id; E2B: snapshot id
    size_bytes: int | None
    build_ms: int
    created_at: str
    last_used_at: str
    stale: bool  # marked for rebuild: the next run needing it builds a new one

    def view(self) -> dict[str, Any]:
        return {"key": self.key, "repository": self.repository, "backend": self.backend, "ref": self.ref,
                "sizeBytes": self.size_bytes, "buildMs": self.build_ms, "createdAt": self.created_at,
                "lastUsedAt": self.last_used_at, "stale": self.stale}


def _row(r: Any) -> EnvironmentRow:
    return EnvironmentRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]), None if r[4] is None else int(r[4]),
                          int(r[5]), str(r[6]), str(r[7]), bool(r[8]))


async def get(db: Database, key: str) -> EnvironmentRow | None:
    r = await db.one(f"SELECT {_COLUMNS} FROM environments WHERE key = ?", (key,))
    return _row(r) if r else None


async def find(db: Database, prefix: str) -> list[EnvironmentRow]:
    """Environments whose key starts with ``prefix`` (a key's first characters name it)."""
    rows = await db.all(f"SELECT {_COLUMNS} FROM environments WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))
    return [_row(r) for r in rows]


async def all_of(db: Database, backend: str | None = None) -> list[EnvironmentRow]:
    """Every environment (of ``backend``), most recently used first."""
    where, params = ("WHERE backend = ?", (backend,)) if backend else ("", ())
    rows = await db.all(f"SELECT {_COLUMNS} FROM environments {where} ORDER BY last_used_at DESC", params)
    return [_row(r) for r in rows]


async def put(db: Database, key: str, repository: str, backend: str, ref: str, size_bytes: int | None,
              build_ms: int) -> None:
    at = now_iso()
    await db.write(
        f"INSERT INTO environments ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT(key) DO UPDATE SET "
        "ref = excluded.ref, size_bytes = excluded.size_bytes, build_ms = excluded.build_ms, "
        "created_at = excluded.created_at, last_used_at = excluded.last_used_at, stale = 0",
        (key, repository, backend, ref, size_bytes, build_ms, at, at))


async def touch(db: Database, key: str) -> None:
    await db.write("UPDATE environments SET last_used_at = ? WHERE key = ?", (now_iso(), key))


async def mark_stale(db: Database, key: str) -> bool:
    return await db.write("UPDATE environments SET stale = 1 WHERE key = ?", (key,)) > 0


async def delete(db: Database, key: str) -> None:
    await db.write("DELETE FROM environments WHERE key = ?", (key,))


async def record_run(db: Database, run_id: str, key: str, status: str, build_ms: int | None) -> None:
    """``status``: built | joined | reused. The first one of a run stays (a restore of its session
    does not change what the run started from)."""
    await db.write("INSERT OR IGNORE INTO run_environments (run_id, env_key, status, build_ms) VALUES (?, ?, ?, ?)",
                   (run_id, key, status, build_ms))


def of_run_read(run_id: str) -> Read[dict[str, Any] | None]:
    """A run's ``environment`` field: ``{key, reused, buildMs}`` (buildMs: the build it waited
    for, None when it reused one), or None when it started without an environment."""
    return Read("SELECT env_key, status, build_ms FROM run_environments WHERE run_id = ?", (run_id,),
                lambda rows: _of_run(rows[0]) if rows else None)


async def of_run(db: Database, run_id: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = (await db.read(of_run_read(run_id)))[0]
    return found


def _of_run(r: Row) -> dict[str, Any]:
    return {"key": str(r[0]), "reused": str(r[1]) == "reused", "buildMs": None if r[2] is None else int(r[2])}
