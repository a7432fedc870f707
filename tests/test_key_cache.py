"""Per-request shortcuts of the public API: verified API keys are remembered for a second (a new
key works at once, a revoked one stops once its entry is older than the TTL), and a run's view
is reused only while the database has not changed."""

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


def test_a_cached_run_view_is_reused_only_while_nothing_changed() -> None:
    from critique_local.api.viewcache import ViewCache

    now = [50.0]
    cache = ViewCache(max_age_s=2.0, clock=lambda: now[0])
    key = ("run_1", False, False)
    cache.put(key, "u1", 7, b"{}")
    assert cache.get(key, "u1", 7) == b"{}"
    assert cache.get(key, "u1", 8) is None  # the database changed since
    assert cache.get(key, "u2", 7) is None  # another user's key never sees it
    assert cache.get(("run_1", True, False), "u1", 7) is None  # ?patch=1 is another answer
    now[0] += 2.0
    assert cache.get(key, "u1", 7) is None  # older than max_age_s
    cache.put(key, "u1", 7, b"{}", valid_for_s=0.5)  # sessionActive turns false in 0.5 s
    now[0] += 0.6
    assert cache.get(key, "u1", 7) is None
