"""Runs, turns and idempotency keys: all run SQL lives here.

Rows come back typed: :class:`RunRow` (its stored request parsed into a
:class:`~critique_local.runs.spec.RunSpec`) and :class:`TurnRow`. Times are ISO-8601 UTC text
(``clock.iso``). Writes go through :meth:`Database.tx`, one at a time (see "What relies on the
write lock" in that module); a missing run raises ``KeyError`` where noted.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from critique_local.clock import iso, now, now_iso
from critique_local.runs.spec import RunSpec
from critique_local.runs.states import TERMINAL, Phase, RunStatus, check_transition
from critique_local.store.db import Database, Read
from critique_local.store.turns import (  # turns are part of a run's store
    TurnRow as TurnRow,
)
from critique_local.store.turns import (
    mark_first_model_call as mark_first_model_call,
)
from critique_local.store.turns import (
    queued_turn as queued_turn,
)
from critique_local.store.turns import (
    turn as turn,
)
from critique_local.store.turns import (
    turn_publish as turn_publish,
)
from critique_local.store.turns import (
    turns as turns,
)
from critique_local.store.turns import (
    turns_of as turns_of,
)
from critique_local.store.turns import (
    turns_read as turns_read,
)
from critique_local.store.turns import (
    update_turn as update_turn,
)

IDEMPOTENCY_TTL_H = 24


@dataclass(frozen=True)
class RunRow:
    """A run as stored: ``seq`` orders runs (list cursors), ``spec`` is its request parsed once,
    ``changed_paths``/``diff_stats`` are cumulative over its turns (``has_patch`` instead of the
    patch's bytes: ``get_patch``), times are ISO-8601 UTC text. ``agent_secret`` is sealed
    (``crypto.SecretBox``, bound to the run id); ``first_model_call_at`` is the current turn's."""

    seq: int
    id: str
    user_id: str
    repository_id: str
    repository_full_name: str
    status: RunStatus
    phase: Phase
    spec: RunSpec
    model_id: str
    task_kind: str
    intent: str
    base_ref: str | None
    base_commit: str | None
    summary: str | None
    changed_paths: list[str]
    diff_stats: dict[str, int] | None
    has_patch: bool
    error_code: str | None
    error_message: str | None
    turn_count: int
    sandbox_id: str | None
    agent_session_id: str | None
    session_expires_at: str | None
    created_at: str
    updated_at: str
    started_at: str | None
    agent_ready_at: str | None
    finished_at: str | None
    agent_url: str | None
    agent_secret: str | None
    sandbox_started_at: str | None
    session_end_reason: str | None
    chained_from_run_id: str | None
    chained_to_run_id: str | None
    base_branch: str | None
    validation: dict[str, Any] | None
    paused_at: str | None = None
    forked_from_run_id: str | None = None
    forked_from_turn: int | None = None
    first_model_call_at: str | None = None  # the run's first (of its earliest turn that made one)


_COLUMNS = (
    "r.seq, r.id, r.user_id, r.repository_id, p.full_name, r.status, r.phase, r.request, r.model_id, r.task_kind, "
    "r.intent, r.base_ref, r.base_commit, r.summary, r.changed_paths, r.diff_stats, r.patch IS NOT NULL, "
    "r.error_code, r.error_message, r.turn_count, r.sandbox_id, r.agent_session_id, r.session_expires_at, "
    "r.created_at, r.updated_at, r.started_at, r.agent_ready_at, r.finished_at, r.agent_url, r.agent_secret, "
    "r.sandbox_started_at, r.session_end_reason, r.chained_from_run_id, r.chained_to_run_id, r.base_branch, "
    "r.validation, r.paused_at, r.forked_from_run_id, r.forked_from_turn, "
    "(SELECT MIN(t.first_model_call_at) FROM turns t WHERE t.run_id = r.id)"
)
_FROM = "FROM runs r JOIN repositories p ON p.id = r.repository_id"


def _row(r: sqlite3.Row) -> RunRow:
    return RunRow(
        seq=r[0], id=r[1], user_id=r[2], repository_id=r[3], repository_full_name=r[4],
        status=RunStatus(r[5]), phase=Phase(r[6]), spec=RunSpec.from_stored(json.loads(r[7])), model_id=r[8], task_kind=r[9],
        intent=r[10], base_ref=r[11], base_commit=r[12], summary=r[13], changed_paths=json.loads(r[14]),
        diff_stats=json.loads(r[15]) if r[15] else None, has_patch=bool(r[16]), error_code=r[17],
        error_message=r[18], turn_count=r[19], sandbox_id=r[20], agent_session_id=r[21],
        session_expires_at=r[22], created_at=r[23], updated_at=r[24], started_at=r[25],
        agent_ready_at=r[26], finished_at=r[27], agent_url=r[28], agent_secret=r[29], sandbox_started_at=r[30],
        session_end_reason=r[31], chained_from_run_id=r[32], chained_to_run_id=r[33], base_branch=r[34],
        validation=json.loads(r[35]) if r[35] else None, paused_at=r[36], forked_from_run_id=r[37],
        forked_from_turn=r[38],
        first_model_call_at=r[39],
    )


@dataclass(frozen=True)
class NewRun:
    """A run to insert: ``prompt`` becomes its first turn; ``byok_key`` and ``mcp_headers`` are
    already sealed for the run; ``fee`` (credits) is debited from its user as it is created."""

    id: str
    user_id: str
    repository_id: str
    spec: RunSpec
    model_id: str
    task_kind: str
    intent: str
    base_ref: str | None
    prompt: str
    byok_key: str | None = None
    mcp_headers: str | None = None
    fee: float = 0.0


async def ensure_repository(db: Database, repo_id: str, full_name: str, source: str) -> str:
    """The id of repository ``full_name`` (owner/name), inserted as ``repo_id`` when new."""
    async with db.tx() as conn:
        cur = await conn.execute("SELECT id FROM repositories WHERE full_name = ?", (full_name,))
        row = await cur.fetchone()
        if row:
            return str(row[0])
        await conn.execute(
            "INSERT INTO repositories (id, full_name, source, created_at) VALUES (?, ?, ?, ?)",
            (repo_id, full_name, source, now_iso()),
        )
        return repo_id


async def repository_by_id(db: Database, repo_id: str) -> str | None:
    row = await db.one("SELECT full_name FROM repositories WHERE id = ?", (repo_id,))
    return str(row[0]) if row else None


@dataclass(frozen=True)
class Created:
    run_id: str
    created: bool
    body_hash: str | None = None  # of the first request, when an idempotency key was replayed


async def create_run(db: Database, run: NewRun, idempotency: tuple[str, str] | None,
                     chained_from: str | None = None) -> Created:
    """Insert a queued run (and its first turn). With ``idempotency=(key, body_hash)`` the key is
    claimed in the same transaction, so concurrent duplicates create exactly one run; a live key
    (younger than 24 h) returns the run it created instead. ``chained_from``: the id of the run
    this one continues; both are linked (``chained_from_run_id``, ``chained_to_run_id``) in the
    same transaction, like the run's sealed secrets and its fee: a crash leaves all or nothing."""
    now = now_iso()
    async with db.tx() as conn:
        if idempotency is not None:
            cur = await conn.execute(
                "SELECT run_id, body_hash FROM idempotency_keys WHERE user_id = ? AND key = ? AND created_at > ?",
                (run.user_id, idempotency[0], _day_ago()),
            )
            existing = await cur.fetchone()
            if existing is not None:
                return Created(str(existing[0]), False, str(existing[1]))
            await conn.execute("DELETE FROM idempotency_keys WHERE user_id = ? AND key = ?", (run.user_id, idempotency[0]))
        await conn.execute(
            "INSERT INTO runs (id, user_id, repository_id, status, phase, request, model_id, task_kind, intent, "
            "base_ref, chained_from_run_id, byok_key, mcp_headers, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run.id, run.user_id, run.repository_id, RunStatus.QUEUED.value, Phase.QUEUED.value,
             json.dumps(run.spec.to_stored()), run.model_id, run.task_kind, run.intent, run.base_ref, chained_from,
             run.byok_key, run.mcp_headers, now, now),
        )
        if run.fee:
            await conn.execute("INSERT INTO credit_ledger (user_id, amount, reason, run_id, created_at) "
                               "VALUES (?, ?, 'orchestration', ?, ?)", (run.user_id, -run.fee, run.id, now))
        if chained_from is not None:
            await conn.execute("UPDATE runs SET chained_to_run_id = ?, updated_at = ? WHERE id = ?",
                               (run.id, now, chained_from))
        await conn.execute(
            "INSERT INTO turns (run_id, idx, prompt, status, publish) VALUES (?, 1, ?, 'queued', ?)",
            (run.id, run.prompt, json.dumps(run.spec.publish.to_stored() if run.spec.publish else {"mode": "none"})),
        )
        if idempotency is not None:
            await conn.execute(
                "INSERT INTO idempotency_keys (user_id, key, body_hash, run_id, created_at) VALUES (?, ?, ?, ?, ?)",
                (run.user_id, idempotency[0], idempotency[1], run.id, now),
            )
    return Created(run.id, True)


def _day_ago() -> str:
    return iso(now() - timedelta(hours=IDEMPOTENCY_TTL_H))


def run_read(run_id: str, user_id: str | None = None) -> Read[RunRow | None]:
    sql = f"SELECT {_COLUMNS} {_FROM} WHERE r.id = ?"
    params: tuple[Any, ...] = (run_id,)
    if user_id is not None:
        sql += " AND r.user_id = ?"
        params += (user_id,)
    return Read(sql, params, lambda rows: _row(rows[0]) if rows else None)


async def get_run(db: Database, run_id: str, user_id: str | None = None) -> RunRow | None:
    """The run, or None when there is none (or, with ``user_id``, when it is another user's)."""
    found: RunRow | None = (await db.read(run_read(run_id, user_id)))[0]
    return found


async def run_of_sandbox(db: Database, sandbox_id: str) -> RunRow | None:
    """The newest run that holds (or held) sandbox ``sandbox_id``, or None."""
    row = await db.one(f"SELECT {_COLUMNS} {_FROM} WHERE r.sandbox_id = ? ORDER BY r.seq DESC LIMIT 1", (sandbox_id,))
    return _row(row) if row else None


LIST_PATHS = 100
# list rows read at most LIST_PATHS changed paths, so a page never loads every path of every run
_LIST_COLUMNS = _COLUMNS.replace("r.changed_paths", "(SELECT json_group_array(value) FROM (SELECT value FROM "
                                 f"json_each(r.changed_paths) LIMIT {LIST_PATHS}))")


async def list_runs(db: Database, user_id: str, limit: int, before_seq: int | None, *,
                    status: RunStatus | None = None, tag: str | None = None,
                    repository: str | None = None) -> list[RunRow]:
    """The user's runs, newest first, optionally only those with ``status``, ``tag`` (exact,
    as stored: normalized) or ``repository`` (owner/name); ``changed_paths`` holds at most
    :data:`LIST_PATHS` paths."""
    sql = f"SELECT {_LIST_COLUMNS} {_FROM} WHERE r.user_id = ?"
    params: list[Any] = [user_id]
    if before_seq is not None:
        sql += " AND r.seq < ?"
        params.append(before_seq)
    if status is not None:
        sql += " AND r.status = ?"
        params.append(status.value)
    if tag is not None:
        sql += " AND EXISTS (SELECT 1 FROM json_each(r.request, '$.tags') t WHERE t.value = ?)"
        params.append(tag)
    if repository is not None:
        sql += " AND p.full_name = ?"
        params.append(repository)
    rows = await db.all(sql + " ORDER BY r.seq DESC LIMIT ?", [*params, limit])
    return [_row(r) for r in rows]


async def runs_with_status(db: Database, *statuses: RunStatus) -> list[RunRow]:
    """Every run in one of ``statuses``, oldest first."""
    marks = ",".join("?" for _ in statuses)
    rows = await db.all(f"SELECT {_COLUMNS} {_FROM} WHERE r.status IN ({marks}) ORDER BY r.seq", [s.value for s in statuses])
    return [_row(r) for r in rows]


@dataclass(frozen=True)
class StoredPatch:
    """The run's cumulative patch, exactly as stored (bytes), and how many secrets were
    replaced by ``[REDACTED]`` in it (0: it recreates the sandbox's tree exactly)."""

    data: bytes
    redactions: int


def _patch(rows: list[sqlite3.Row]) -> StoredPatch | None:
    if not rows or rows[0][0] is None:
        return None
    row = rows[0]
    data = row[0].encode() if isinstance(row[0], str) else bytes(row[0])  # text: stored before patches were bytes
    return StoredPatch(data, int(row[1] or 0))


def patch_read(run_id: str) -> Read[StoredPatch | None]:
    return Read("SELECT patch, patch_redactions FROM runs WHERE id = ?", (run_id,), _patch)


async def get_patch(db: Database, run_id: str) -> StoredPatch | None:
    found: StoredPatch | None = (await db.read(patch_read(run_id)))[0]
    return found


async def transition(
    db: Database, run_id: str, status: RunStatus, phase: Phase, **fields: Any
) -> RunRow:
    """Move a run to ``status``/``phase`` (checked against the allowed transitions) and set
    other columns in the same transaction; a terminal status also clears ``paused_at``. The run
    as stored afterwards. Raises KeyError for an unknown run, ``runs.states.IllegalTransition``
    for a move the lifecycle does not allow."""
    async with db.tx() as conn:
        cur = await conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,))
        row = await cur.fetchone()
        if row is None:
            raise KeyError(run_id)
        check_transition(RunStatus(row[0]), status)
        cols: dict[str, Any] = {"status": status.value, "phase": phase.value, "updated_at": now_iso(), **fields}
        if status in TERMINAL:
            cols["paused_at"] = None  # an ended run has no session, paused or not
        sets = ", ".join(f"{k} = ?" for k in cols)
        await conn.execute(f"UPDATE runs SET {sets} WHERE id = ?", (*cols.values(), run_id))
    updated = await get_run(db, run_id)
    assert updated is not None
    return updated


async def update_run(db: Database, run_id: str, **fields: Any) -> None:
    """Set columns of the run (no status change: that is :func:`transition`); nothing for an
    unknown run. A blind write: callers hold the run (its job, or ``Scheduler.lock``)."""
    cols = {"updated_at": now_iso(), **fields}
    sets = ", ".join(f"{k} = ?" for k in cols)
    await db.write(f"UPDATE runs SET {sets} WHERE id = ?", (*cols.values(), run_id))


async def run_for_sandbox_token(db: Database, token_hash: str) -> RunRow | None:
    """The run whose sandbox token hashes to ``token_hash`` (``tokens.token_hash``), or None."""
    row = await db.one(f"SELECT {_COLUMNS} {_FROM} WHERE r.sandbox_token_hash = ?", (token_hash,))
    return _row(row) if row else None


async def begin_follow_up(db: Database, run_id: str, prompt: str, publish: dict[str, Any]) -> int | None:
    """IDLE -> RUNNING with a new queued turn, atomically; None when the run was not idle
    (so two concurrent messages cannot both start a turn)."""
    async with db.tx() as conn:
        cur = await conn.execute("SELECT status, turn_count FROM runs WHERE id = ?", (run_id,))
        row = await cur.fetchone()
        if row is None or row[0] != RunStatus.IDLE.value:
            return None
        idx = int(row[1]) + 1
        await conn.execute("INSERT INTO turns (run_id, idx, prompt, status, publish) VALUES (?, ?, ?, 'queued', ?)",
                           (run_id, idx, prompt, json.dumps(publish)))
        await conn.execute(
            "UPDATE runs SET status = ?, phase = ?, turn_count = ?, updated_at = ? WHERE id = ?",
            (RunStatus.RUNNING.value, Phase.AGENT_RUNNING.value, idx, now_iso(), run_id),
        )
    return idx


async def idle_sessions(db: Database) -> list[tuple[str, str]]:
    """(run id, user id) of every idle run holding a sandbox (not paused), least recently used
    (longest idle) first."""
    rows = await db.all("SELECT id, user_id FROM runs WHERE status = 'idle' AND paused_at IS NULL "
                        "AND sandbox_id IS NOT NULL ORDER BY updated_at, seq")
    return [(str(r[0]), str(r[1])) for r in rows]


async def expired_idle_runs(db: Database, now_text: str) -> list[str]:
    rows = await db.all("SELECT id FROM runs WHERE status = 'idle' AND session_expires_at <= ?", (now_text,))
    return [str(r[0]) for r in rows]


async def idempotent_run(db: Database, user_id: str, key: str) -> tuple[str, str] | None:
    """(run id, body hash) of the user's live (younger than 24 h) Idempotency-Key, or None."""
    row = await db.one("SELECT run_id, body_hash FROM idempotency_keys WHERE user_id = ? AND key = ? AND created_at > ?",
                       (user_id, key, _day_ago()))
    return (str(row[0]), str(row[1])) if row else None


async def sandbox_token(db: Database, run_id: str) -> str | None:
    """The run's sealed sandbox token (None: none, or the session ended)."""
    row = await db.one("SELECT sandbox_token FROM runs WHERE id = ?", (run_id,))
    return str(row[0]) if row and row[0] else None


async def byok_key(db: Database, run_id: str) -> str | None:
    """The run's sealed BYOK provider key (None: a managed run, or the session ended)."""
    row = await db.one("SELECT byok_key FROM runs WHERE id = ?", (run_id,))
    return str(row[0]) if row and row[0] else None


async def mcp_headers(db: Database, run_id: str) -> str | None:
    """The run's sealed mcpServers headers (None: none, or the session ended)."""
    row = await db.one("SELECT mcp_headers FROM runs WHERE id = ?", (run_id,))
    return str(row[0]) if row and row[0] else None
