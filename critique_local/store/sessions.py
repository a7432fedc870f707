"""SQL of sessions that survive (``runs/durable.py``, ``runs/restore.py``): a turn's saved agent
state, reopening an ended session on the same run id, forks, and pausing idle sessions."""

from __future__ import annotations

import json
from typing import Any

from critique_local.clock import now_iso
from critique_local.runs.states import CHAINABLE, Phase, RunStatus
from critique_local.store.db import Database
from critique_local.store.runs import NewRun, RunRow, _day_ago


async def set_turn_messages(db: Database, run_id: str, idx: int, messages: int | None) -> None:
    """How many agent messages turn ``idx`` ended with (None: its state was not kept)."""
    await db.write("UPDATE turns SET agent_messages = ? WHERE run_id = ? AND idx = ?", (messages, run_id, idx))


async def restore_point(db: Database, run_id: str, up_to: int | None = None) -> tuple[int, str, int] | None:
    """(turn, tree, agent messages) of the latest turn (at most ``up_to``) whose tree and agent
    state were kept, or None."""
    sql = ("SELECT idx, tree, agent_messages FROM turns WHERE run_id = ? AND tree IS NOT NULL "
           "AND agent_messages IS NOT NULL")
    params: list[Any] = [run_id]
    if up_to is not None:
        sql += " AND idx <= ?"
        params.append(up_to)
    row = await db.one(sql + " ORDER BY idx DESC LIMIT 1", params)
    return (int(row[0]), str(row[1]), int(row[2])) if row else None


async def reopen(db: Database, run_id: str, prompt: str, publish: dict[str, Any]) -> int | None:
    """A completed run whose session ended in a way a message may continue (``CHAINABLE``) and
    that was not chained: RUNNING again with a new queued turn, atomically; None otherwise."""
    reasons = [r.value for r in CHAINABLE]
    async with db.tx() as conn:
        cur = await conn.execute("SELECT status, turn_count, session_end_reason, chained_to_run_id FROM runs "
                                 "WHERE id = ?", (run_id,))
        row = await cur.fetchone()
        if row is None or row[0] != RunStatus.COMPLETED.value or row[2] not in reasons or row[3]:
            return None
        idx = int(row[1]) + 1
        await conn.execute("INSERT INTO turns (run_id, idx, prompt, status, publish) VALUES (?, ?, ?, 'queued', ?)",
                           (run_id, idx, prompt, json.dumps(publish)))
        await conn.execute(
            "UPDATE runs SET status = ?, phase = ?, turn_count = ?, finished_at = NULL, session_end_reason = NULL, "
            "sandbox_id = NULL, paused_at = NULL, updated_at = ? WHERE id = ?",
            (RunStatus.RUNNING.value, Phase.PROVISIONING.value, idx, now_iso(), run_id))
    return idx


async def create_fork(db: Database, new: NewRun, source: RunRow, turn: int, prompt: str | None,
                      idempotency: tuple[str, str] | None) -> tuple[str, bool, str | None]:
    """Insert ``new`` as a fork of ``source`` at ``turn``: queued, the same base commit, turns
    1..``turn`` copied (their summaries, stats and trees), and turn ``turn``+1 queued with
    ``prompt`` when there is one. Returns (run id, created, body hash of the first request when
    an idempotency key was replayed)."""
    now = now_iso()
    async with db.tx() as conn:
        if idempotency is not None:
            cur = await conn.execute("SELECT run_id, body_hash FROM idempotency_keys WHERE user_id = ? AND key = ? "
                                     "AND created_at > ?", (new.user_id, idempotency[0], _day_ago()))
            existing = await cur.fetchone()
            if existing is not None:
                return str(existing[0]), False, str(existing[1])
            await conn.execute("DELETE FROM idempotency_keys WHERE user_id = ? AND key = ?",
                               (new.user_id, idempotency[0]))
        count = turn + (1 if prompt is not None else 0)
        await conn.execute(
            "INSERT INTO runs (id, user_id, repository_id, status, phase, request, model_id, task_kind, intent, "
            "base_ref, base_commit, base_branch, turn_count, forked_from_run_id, forked_from_turn, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (new.id, new.user_id, new.repository_id, RunStatus.QUEUED.value, Phase.QUEUED.value,
             json.dumps(new.spec.to_stored()), new.model_id, new.task_kind, new.intent, source.base_ref,
             source.base_commit, source.base_branch, count, source.id, turn, now, now))
        await conn.execute(
            "INSERT INTO turns (run_id, idx, prompt, status, summary, diff_stats, started_at, finished_at, tree, "
            "publish, validation, agent_messages) SELECT ?, idx, prompt, status, summary, diff_stats, started_at, "
            "finished_at, tree, '{\"mode\": \"none\"}', validation, agent_messages FROM turns "
            "WHERE run_id = ? AND idx <= ?", (new.id, source.id, turn))
        if prompt is not None:
            await conn.execute("INSERT INTO turns (run_id, idx, prompt, status, publish) VALUES (?, ?, ?, 'queued', ?)",
                               (new.id, count, prompt, '{"mode": "none"}'))
        if idempotency is not None:
            await conn.execute(
                "INSERT INTO idempotency_keys (user_id, key, body_hash, run_id, created_at) VALUES (?, ?, ?, ?, ?)",
                (new.user_id, idempotency[0], idempotency[1], new.id, now))
    return new.id, True, None


async def pausable(db: Database, idle_before: str) -> list[str]:
    """Idle runs holding a sandbox, not paused, idle since before ``idle_before`` (ISO time)."""
    rows = await db.all("SELECT id FROM runs WHERE status = 'idle' AND paused_at IS NULL AND sandbox_id IS NOT NULL "
                        "AND updated_at <= ? ORDER BY updated_at", (idle_before,))
    return [str(r[0]) for r in rows]


async def restorable_ended(db: Database) -> set[str]:
    """Runs whose session ended in a way a message may continue on the same run id."""
    marks = ",".join("?" for _ in CHAINABLE)
    rows = await db.all(f"SELECT id FROM runs WHERE status = 'completed' AND session_end_reason IN ({marks}) "
                        "AND chained_to_run_id IS NULL", [r.value for r in CHAINABLE])
    return {str(r[0]) for r in rows}
