"""The database handle: open, migrate, read, and write inside one serialised transaction."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from critique_local.store.migrations import MIGRATIONS

Row = sqlite3.Row


class Database:
    """One aiosqlite connection. Reads run freely; writes go through :meth:`tx`, one at a time,
    so a multi-statement change is atomic and concurrent requests cannot interleave inside it."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Database:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=10000")
        db = cls(conn)
        await db._migrate()
        return db

    async def close(self) -> None:
        await self._conn.close()

    async def _migrate(self) -> None:
        async with self._write_lock:
            row = await (await self._conn.execute("PRAGMA user_version")).fetchone()
            version = int(row[0]) if row else 0
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                await self._conn.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={number}; COMMIT;")

    # Reads are one hop to the connection's thread each (execute + fetch + close together):
    # a status poll makes several, and the hops, not SQLite, are what they cost.
    async def one(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        """The first row of a query that selects at most one (by key, or ``LIMIT 1``)."""
        rows = list(await self._conn.execute_fetchall(sql, tuple(params)))
        return rows[0] if rows else None

    async def all(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        return list(await self._conn.execute_fetchall(sql, tuple(params)))

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
