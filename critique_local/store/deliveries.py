"""Webhook deliveries and users' signing secrets: the SQL behind ``webhooks``.

A delivery is a row before anything is sent: ``state`` is ``pending`` (due at
``next_attempt_at``), ``delivered`` or ``failed`` (gave up). Times are ISO-8601 UTC text.
"""

from __future__ import annotations

from dataclasses import dataclass

from critique_local.clock import now_iso
from critique_local.store.db import Database
from critique_local.tokens import new_id


@dataclass(frozen=True)
class DueDelivery:
    """A pending delivery whose time has come, with the user whose secret signs it."""

    id: str
    url: str
    payload: str  # the JSON body, sent as it is
    attempts: int
    created_at: str
    user_id: str


@dataclass(frozen=True)
class DeliveryRow:
    id: str
    url: str
    event_type: str
    state: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: str
    delivered_at: str | None
    next_attempt_at: str
    payload: str


async def sealed_secret(db: Database, user_id: str) -> str | None:
    """The user's sealed signing secret, None when there is none (or no such user)."""
    row = await db.one("SELECT webhook_secret FROM users WHERE id = ?", (user_id,))
    return str(row[0]) if row is not None and row[0] else None


async def set_sealed_secret(db: Database, user_id: str, sealed: str) -> None:
    await db.write("UPDATE users SET webhook_secret = ? WHERE id = ?", (sealed, user_id))


async def user_name(db: Database, user_id: str) -> str | None:
    row = await db.one("SELECT name FROM users WHERE id = ?", (user_id,))
    return str(row[0]) if row is not None else None


async def add(db: Database, run_id: str, urls: list[str], body: str) -> None:
    """One pending delivery of ``body`` per URL, due now, in one transaction."""
    async with db.tx() as conn:
        for url in urls:
            await conn.execute(
                "INSERT INTO webhook_deliveries (id, run_id, url, event_type, payload, state, next_attempt_at, "
                "created_at) VALUES (?, ?, ?, 'run.status', ?, 'pending', ?, ?)",
                (new_id("msg"), run_id, url, body, now_iso(), now_iso()),
            )


async def due(db: Database, now_text: str, limit: int = 50) -> list[DueDelivery]:
    """Pending deliveries due at ``now_text``, oldest first, at most ``limit``."""
    rows = await db.all(
        "SELECT d.id, d.url, d.payload, d.attempts, d.created_at, r.user_id FROM webhook_deliveries d "
        "JOIN runs r ON r.id = d.run_id WHERE d.state = 'pending' AND d.next_attempt_at <= ? "
        "ORDER BY d.created_at LIMIT ?", (now_text, limit))
    return [DueDelivery(str(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), str(r[5])) for r in rows]


async def delivered(db: Database, msg_id: str, attempts: int, status_code: int) -> None:
    await db.write(
        "UPDATE webhook_deliveries SET state = 'delivered', attempts = ?, last_status_code = ?, "
        "last_error = NULL, delivered_at = ? WHERE id = ?", (attempts, status_code, now_iso(), msg_id))


async def attempt_failed(db: Database, msg_id: str, *, gave_up: bool, attempts: int, status_code: int | None,
                         error: str, next_attempt_at: str) -> None:
    await db.write(
        "UPDATE webhook_deliveries SET state = ?, attempts = ?, last_status_code = ?, last_error = ?, "
        "next_attempt_at = ? WHERE id = ?",
        ("failed" if gave_up else "pending", attempts, status_code, error, next_attempt_at, msg_id))


async def of_run(db: Database, run_id: str) -> list[DeliveryRow]:
    """Every delivery of the run, oldest first."""
    rows = await db.all(
        "SELECT id, url, event_type, state, attempts, last_status_code, last_error, created_at, delivered_at, "
        "next_attempt_at, payload FROM webhook_deliveries WHERE run_id = ? ORDER BY created_at, id", (run_id,))
    return [DeliveryRow(*r) for r in rows]
