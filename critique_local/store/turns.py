"""A run's turns: all turn SQL lives here (re-exported by :mod:`critique_local.store.runs`).

:class:`TurnRow` for the executor and the control plane; ``turns_of`` rows (dicts shaped as the
API's ``turns[]``) for responses. Times are ISO-8601 UTC text (``clock.iso``).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from critique_local.store.db import Database, Read


def turns_read(run_id: str) -> Read[list[dict[str, Any]]]:
    return Read("SELECT idx, status, summary, diff_stats, started_at, finished_at, validation, publish_outcome, "
                "first_model_call_at, error_code, error_message, prompt FROM turns WHERE run_id = ? ORDER BY idx",
                (run_id,), _turns)


async def turns_of(db: Database, run_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = (await db.read(turns_read(run_id)))[0]
    return found


def _turns(rows: list[sqlite3.Row]) -> list[dict[str, Any]]:
    return [
        {"index": r[0], "status": r[1], "summary": r[2], "diffStats": json.loads(r[3]) if r[3] else None,
         "startedAt": r[4], "finishedAt": r[5], "validation": json.loads(r[6]) if r[6] else None,
         "publish": json.loads(r[7]) if r[7] else None, "firstModelCallAt": r[8], "prompt": r[11],
         "error": {"code": r[9], "message": r[10] or ""} if r[9] else None}
        for r in rows
    ]


async def mark_first_model_call(db: Database, run_id: str, idx: int, at: str) -> None:
    """Record ``at`` (ISO time) as turn ``idx``'s first model call, unless one is recorded."""
    await db.write("UPDATE turns SET first_model_call_at = ? WHERE run_id = ? AND idx = ? "
                   "AND first_model_call_at IS NULL", (at, run_id, idx))


async def update_turn(db: Database, run_id: str, idx: int, **fields: Any) -> None:
    sets = ", ".join(f"{k} = ?" for k in fields)
    await db.write(f"UPDATE turns SET {sets} WHERE run_id = ? AND idx = ?", (*fields.values(), run_id, idx))


@dataclass(frozen=True)
class TurnRow:
    """One turn as the executor and the control plane need it: its 1-based ``index``, the
    ``prompt`` as sent, its ``status`` (queued, running, completed, failed, cancelled), the
    agent's ``summary`` and ``tree`` (the git tree id of the workspace after the turn), both None
    until the turn completed."""

    index: int
    prompt: str
    status: str
    summary: str | None
    tree: str | None


async def turns(db: Database, run_id: str) -> list[TurnRow]:
    """The run's turns, oldest first (empty for an unknown run)."""
    rows = await db.all("SELECT idx, prompt, status, summary, tree FROM turns WHERE run_id = ? ORDER BY idx", (run_id,))
    return [TurnRow(int(r[0]), str(r[1]), str(r[2]), r[3], r[4]) for r in rows]


async def turn(db: Database, run_id: str, idx: int) -> TurnRow | None:
    """Turn ``idx`` (1-based) of the run, or None."""
    r = await db.one("SELECT idx, prompt, status, summary, tree FROM turns WHERE run_id = ? AND idx = ?", (run_id, idx))
    return TurnRow(int(r[0]), str(r[1]), str(r[2]), r[3], r[4]) if r else None


async def queued_turn(db: Database, run_id: str) -> TurnRow | None:
    """The run's oldest turn still ``queued`` (the one a scheduler job carries), or None."""
    r = await db.one("SELECT idx, prompt, status, summary, tree FROM turns WHERE run_id = ? AND status = 'queued' "
                     "ORDER BY idx LIMIT 1", (run_id,))
    return TurnRow(int(r[0]), str(r[1]), str(r[2]), r[3], r[4]) if r else None


async def turn_publish(db: Database, run_id: str, idx: int) -> dict[str, Any]:
    """The publish settings of one turn ({"mode": "none"} when it does not publish)."""
    row = await db.one("SELECT publish FROM turns WHERE run_id = ? AND idx = ?", (run_id, idx))
    return json.loads(row[0]) if row and row[0] else {"mode": "none"}
