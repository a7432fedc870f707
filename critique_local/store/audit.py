"""The audit trail (``audit_log``): who created, followed up, cancelled, ended and published
which run, when, and with what outcome. Rows are only ever appended."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from critique_local.clock import now_iso
from critique_local.store.db import Database


@dataclass(frozen=True)
class AuditEntry:
    """One audited action. ``user`` is the user's name and ``key_prefix`` the visible start of
    the API key used (both empty for the server's own actions, e.g. publishing at a turn's end);
    ``outcome`` is ``ok`` or an error code; ``http_status`` is None for the server's actions."""

    id: int
    at: str
    user: str
    key_prefix: str
    action: str
    run_id: str | None
    outcome: str
    http_status: int | None
    detail: dict[str, Any]


async def record(db: Database, action: str, *, user_id: str | None, key_id: str | None, run_id: str | None,
                 outcome: str, http_status: int | None = None, detail: dict[str, Any] | None = None) -> None:
    await db.write(
        "INSERT INTO audit_log (at, user_id, key_id, action, run_id, outcome, http_status, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (now_iso(), user_id or None, key_id or None, action, run_id, outcome, http_status, json.dumps(detail or {})))


async def entries(db: Database, *, run_id: str | None = None, user: str | None = None, since: str | None = None,
                  limit: int = 100) -> list[AuditEntry]:
    """Newest first, at most ``limit``; filtered by run, user name and time (ISO 8601, inclusive).
    The server's own actions on a run are attributed to the run's user."""
    where, params = ["1 = 1"], []
    if run_id:
        where.append("a.run_id = ?")
        params.append(run_id)
    if user:
        where.append("u.name = ?")
        params.append(user)
    if since:
        where.append("a.at >= ?")
        params.append(since)
    rows = await db.all(
        "SELECT a.id, a.at, COALESCE(u.name, ''), COALESCE(k.prefix, ''), a.action, a.run_id, a.outcome, "
        "a.http_status, a.detail FROM audit_log a "
        "LEFT JOIN runs r ON r.id = a.run_id "
        "LEFT JOIN users u ON u.id = COALESCE(a.user_id, r.user_id) "
        "LEFT JOIN api_keys k ON k.id = a.key_id "
        f"WHERE {' AND '.join(where)} ORDER BY a.id DESC LIMIT ?", (*params, limit))
    return [AuditEntry(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8])) for r in rows]
