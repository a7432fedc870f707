"""Counts read at scrape time for ``/metrics``, and the database's readiness probe."""

from __future__ import annotations

from critique_local.store.db import Database


async def ping(db: Database) -> None:
    """Raises when the database cannot answer a query that reads the file (``SELECT 1`` alone
    would not touch it)."""
    await db.one("SELECT id FROM runs LIMIT 1")


async def runs_by_status_phase(db: Database) -> list[tuple[str, str, int]]:
    """(status, phase, runs) for every pair that has runs."""
    rows = await db.all("SELECT status, phase, COUNT(*) FROM runs GROUP BY status, phase")
    return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]


async def webhook_deliveries_by_state(db: Database) -> list[tuple[str, int]]:
    rows = await db.all("SELECT state, COUNT(*) FROM webhook_deliveries GROUP BY state")
    return [(str(r[0]), int(r[1])) for r in rows]


async def sandboxes_in_use(db: Database) -> tuple[int, int, int]:
    """(sandboxes of running turns, sandboxes of idle warm sessions, paused idle sessions).
    A paused session counts as paused whether the backend keeps its sandbox (paused) or removed
    it until the next message; never as idle."""
    row = await db.one("SELECT SUM(status = 'running' AND sandbox_id IS NOT NULL), "
                       "SUM(status = 'idle' AND paused_at IS NULL AND sandbox_id IS NOT NULL), "
                       "SUM(status = 'idle' AND paused_at IS NOT NULL) FROM runs WHERE status IN ('running', 'idle')")
    return (int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)) if row else (0, 0, 0)
