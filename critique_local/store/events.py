"""The per-run event log: append with the next per-run sequence number, read after an id."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from critique_local.clock import now_iso
from critique_local.store.db import Database, Read


@dataclass(frozen=True)
class EventRow:
    """One event of a run's log: ``seq`` is its id in the run (1, 2, ... without gaps; the SSE
    ``id``), ``data`` its JSON object, ``created_at`` ISO-8601 UTC text."""

    run_id: str
    seq: int
    kind: str  # "builder.event" | "run.status"
    data: dict[str, Any]
    created_at: str


async def append(db: Database, run_id: str, kind: str, data: dict[str, Any]) -> EventRow:
    """Store ``data`` as the run's next event (``seq`` = the last one's + 1, in the write
    transaction); the stored row. sqlite3.IntegrityError for an unknown run."""
    created = now_iso()
    async with db.tx() as conn:
        cur = await conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE run_id = ?", (run_id,))
        row = await cur.fetchone()
        seq = int(row[0]) if row else 1
        await conn.execute(
            "INSERT INTO events (run_id, seq, kind, data, created_at) VALUES (?, ?, ?, ?, ?)",
            (run_id, seq, kind, json.dumps(data), created),
        )
    return EventRow(run_id, seq, kind, data, created)


def after_read(run_id: str, after_seq: int, limit: int = 500) -> Read[list[EventRow]]:
    return Read("SELECT seq, kind, data, created_at FROM events WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (run_id, after_seq, limit),
                lambda rows: [EventRow(run_id, r[0], r[1], json.loads(r[2]), r[3]) for r in rows])


async def after(db: Database, run_id: str, after_seq: int, limit: int = 500) -> list[EventRow]:
    found: list[EventRow] = (await db.read(after_read(run_id, after_seq, limit)))[0]
    return found


async def last_of_kind(db: Database, run_id: str, kind: str) -> dict[str, Any] | None:
    row = await db.one("SELECT data FROM events WHERE run_id = ? AND kind = ? ORDER BY seq DESC LIMIT 1",
                       (run_id, kind))
    return dict(json.loads(row[0])) if row else None


async def last_seq(db: Database, run_id: str) -> int:
    """The id of the run's newest event (0: none)."""
    row = await db.one("SELECT MAX(seq) FROM events WHERE run_id = ?", (run_id,))
    return int(row[0] or 0) if row is not None else 0
