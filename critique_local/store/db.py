"""The database handle: open, migrate, read, and write inside one serialised transaction.

What relies on the write lock
-----------------------------
Every write is ``BEGIN IMMEDIATE`` on one connection behind an ``asyncio.Lock``: SQLite's
database-wide write lock makes each read-then-write below atomic. On Postgres (several server
replicas, READ COMMITTED by default) each needs its own guarantee:

``events.append``         next ``seq`` = MAX(seq)+1 per run. Postgres: ``SELECT ... FROM runs
                          WHERE id = $1 FOR UPDATE`` first (or a per-run counter column bumped
                          with ``UPDATE ... RETURNING``); the (run_id, seq) key then only backs it up.
``runs.begin_follow_up``  admission: status must be ``idle``; the new turn and RUNNING in one go.
``sessions.reopen``       Postgres: ``UPDATE runs SET status='running', turn_count=turn_count+1
                          WHERE id=$1 AND status='idle' RETURNING turn_count`` (reopen: ``status=
                          'completed' AND session_end_reason IN (...) AND chained_to_run_id IS
                          NULL``), then the turn insert, in one transaction (a lost race updates no row).
``runs.transition``       status read, checked against the lifecycle, written. Postgres: ``SELECT
                          status ... FOR UPDATE`` in the transaction (or a compare-and-set
                          ``UPDATE ... WHERE status = $old``).
``runs.create_run``       idempotency: look the key up, else insert run + key. Postgres: ``INSERT
``sessions.create_fork``  INTO idempotency_keys ... ON CONFLICT (user_id, key) DO NOTHING
                          RETURNING``; on no row, read the winner's run (expired keys: delete them
                          in the same statement's CTE, or a sweeper). A chained run's link
                          (``chained_from``): ``UPDATE runs SET chained_to_run_id = $new WHERE id =
                          $old AND chained_to_run_id IS NULL``, rolling back when no row changed.
``keys.ensure_user``      select-then-insert: ``INSERT ... ON CONFLICT (name) DO NOTHING`` then
``runs.ensure_repository`` select (the user's initial credits only when the insert happened).
``pulls.save``            a new local pull request's number = MAX(number)+1 per repository.
                          Postgres: lock the repository's row (``FOR UPDATE``) or a counter row
                          bumped with ``UPDATE ... RETURNING``; UNIQUE(host, repository, number)
                          backs it up.
``deliveries.due``        a delivery is attempted by whoever reads it due. Postgres with several
                          replicas: claim with ``FOR UPDATE SKIP LOCKED`` and a lease column.
``Database.changes``      this connection's write counter: the view cache's "nothing changed"
                          (``api/viewcache.py``). Other replicas' writes do not move it: a version
                          column per run (bumped by every write of the run, its turns and events)
                          or ``LISTEN``/``NOTIFY`` invalidation.
``_migrate``              ``PRAGMA user_version`` under the lock: a schema-version table and
                          ``pg_advisory_lock`` so that replicas starting together migrate once.
Not database statements, but the same kind: ``Scheduler.lock`` (one run's message, cancel, expiry)
and the run queue are in-process; with replicas they become a row lock on the run
(``FOR UPDATE`` / ``pg_advisory_xact_lock``) and a ``SKIP LOCKED`` queue over queued turns;
``EventHub`` wakes only this process's stream readers and keeps recent events in memory
(``LISTEN``/``NOTIFY`` across replicas; its "did the status change" check reads the last
``run.status`` then appends, so it belongs in ``append``'s transaction). ``Scheduler.recover``
fails every ``running`` run as ``server_restarted``: with replicas, only the runs of the replica
that restarted (an owner column with a lease). Credit checks before a call (``balance``/``usage``
then the call) are advisory under either database.

Errors: reads and writes raise ``sqlite3.Error`` (``aiosqlite`` passes them through), e.g.
``IntegrityError`` for a broken constraint; :meth:`Database.open` raises
``store.migrations.SchemaTooNew`` for a database written by a newer release.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiosqlite

from critique_local.store.migrations import pending

Row = sqlite3.Row
T = TypeVar("T")


@dataclass(frozen=True)
class Read(Generic[T]):
    """One query and how its rows become a value: several go to the database in one hop
    (:meth:`Database.read`)."""

    sql: str
    params: tuple[Any, ...]
    parse: Callable[[list[Row]], T]


NOTHING: Read[None] = Read("SELECT 1 WHERE 0", (), lambda rows: None)  # a placeholder among reads


def _fetch(conn: sqlite3.Connection, reads: tuple[Read[Any], ...]) -> list[list[Row]]:
    out = []
    for r in reads:
        cur = conn.execute(r.sql, r.params)
        try:
            out.append(cur.fetchall())
        finally:
            cur.close()
    return out


class Database:
    """One aiosqlite connection. Reads run freely; writes go through :meth:`tx`, one at a time,
    so a multi-statement change is atomic and concurrent requests cannot interleave inside it.
    Rows are ``sqlite3.Row``; the modules of ``store/`` turn them into typed rows."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Open (creating) the database file at ``path`` in WAL mode and migrate it to this
        release's schema. Raises SchemaTooNew, or sqlite3.Error when the file is not a database."""
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=10000")
        db = cls(conn)
        try:
            await db._migrate()
        except BaseException:  # e.g. SchemaTooNew: no connection thread left behind
            await conn.close()
            raise
        return db

    async def close(self) -> None:
        await self._conn.close()

    async def _migrate(self) -> None:
        async with self._write_lock:
            row = await (await self._conn.execute("PRAGMA user_version")).fetchone()
            version = int(row[0]) if row else 0
            for number, script in pending(version):
                await self._conn.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={number}; COMMIT;")

    # Reads are one hop to the connection's thread each (execute + fetch + close together):
    # a status poll makes several, and the hops, not SQLite, are what they cost.
    async def one(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        """The first row of a query that selects at most one (by key, or ``LIMIT 1``)."""
        rows = list(await self._conn.execute_fetchall(sql, tuple(params)))
        return rows[0] if rows else None

    async def all(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        """Every row of a query."""
        return list(await self._conn.execute_fetchall(sql, tuple(params)))

    @property
    def changes(self) -> int:
        """Rows this connection (every write of this server) changed since it opened: when it
        has not moved, nothing the server wrote has changed."""
        return int(self._conn.total_changes)

    async def read(self, *reads: Read[Any]) -> list[Any]:
        """Several reads in one hop to the connection's thread (one snapshot of the database
        is not promised: they are separate statements); each read's parsed value, in order.
        A status poll makes six reads: one hop costs the event loop one wake-up, not six."""
        # aiosqlite runs queued functions on its connection's thread: the same path as
        # execute_fetchall, with all the statements of one view in one function
        rows: list[list[Row]] = await self._conn._execute(_fetch, self._conn._conn, reads)  # type: ignore[no-untyped-call]
        return [r.parse(found) for r, found in zip(reads, rows, strict=True)]

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``); commits on success, rolls back on error
        (also when the caller is cancelled: see :meth:`_settle`)."""
        async with self._write_lock:
            await self._settle("BEGIN IMMEDIATE", undo="ROLLBACK")
            try:
                yield self._conn
            except BaseException:
                await self._settle("ROLLBACK")
                raise
            await self._settle("COMMIT", undo="ROLLBACK")

    async def _settle(self, statement: str, undo: str | None = None) -> None:
        """Run a transaction statement to its end even when the caller is cancelled meanwhile
        (the statement runs in the connection's thread either way): a BEGIN whose caller went
        away would otherwise leave the connection inside a transaction, and every later write
        would fail. On cancellation ``undo`` runs, then CancelledError is raised again."""
        step = asyncio.ensure_future(self._conn.execute(statement))
        try:
            await asyncio.shield(step)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await step
                if undo is not None:
                    await self._conn.execute(undo)
            raise

    async def write(self, sql: str, params: Iterable[Any] = ()) -> int:
        """One statement in its own transaction; returns the number of rows changed."""
        async with self.tx() as conn:
            cur = await conn.execute(sql, tuple(params))
            return cur.rowcount
