"""A writer cancelled at any moment (a client that went away, a run cancelled, a timeout) leaves
the database usable: no transaction is left open on the shared connection."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from critique_local.store.db import Database
from critique_local.store.keys import ensure_user


async def test_a_writer_cancelled_at_any_point_leaves_no_transaction_open(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "critique.db")
    try:
        for steps in range(40):  # cancel after 0, 1, 2, ... loop iterations: before, during, after each statement
            task = asyncio.create_task(ensure_user(db, f"user{steps}"))
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert await ensure_user(db, "after") == await ensure_user(db, "after")  # writes still work
        names = {row[0] for row in await db.all("SELECT name FROM users")}
        assert "after" in names
    finally:
        await db.close()
