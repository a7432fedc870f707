"""Verified API keys are remembered for a second, so polling costs no key lookup; a new key
works at once, and a revoked one stops working once its entry is older than the TTL."""

from __future__ import annotations

from pathlib import Path

from critique_local.api.middleware import KeyCache
from critique_local.store.db import Database
from critique_local.store.keys import DEFAULT_SCOPES, create_key, revoke_key


async def test_revoked_keys_stop_within_the_ttl_and_new_keys_work_at_once(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "db.sqlite")
    try:
        now = [100.0]
        cache = KeyCache(ttl_s=1.0, clock=lambda: now[0])
        assert await cache.principal(db, "crt_unknown") is None
        plain, record = await create_key(db, "ada", DEFAULT_SCOPES)
        first = await cache.principal(db, plain)  # an unknown answer was not kept
        assert first is not None and first.key_id == record.id
        await revoke_key(db, record.id)
        now[0] += 0.5
        assert await cache.principal(db, plain) == first  # within the TTL
        now[0] += 0.6
        assert await cache.principal(db, plain) is None  # looked up again: revoked
        assert await KeyCache(ttl_s=0).principal(db, plain) is None
    finally:
        await db.close()
