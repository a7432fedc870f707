"""Users and API keys."""

from __future__ import annotations

import json
from dataclasses import dataclass

from critique_local.clock import now_iso
from critique_local.store.db import Database
from critique_local.tokens import API_KEY_PREFIX, new_id, new_token, token_hash

ALL_SCOPES = ("read:builder", "write:builder", "inference")
DEFAULT_SCOPES = ALL_SCOPES


@dataclass(frozen=True)
class KeyRecord:
    id: str
    user_id: str
    user_name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: str
    revoked_at: str | None


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user (through a ``crt_`` key) with its scopes."""

    user_id: str
    user_name: str
    scopes: frozenset[str]
    key_id: str = ""


async def ensure_user(db: Database, name: str, initial_credits: float = 0.0) -> str:
    """The user's id; a new user starts with ``initial_credits`` (billing.initial_credits)."""
    async with db.tx() as conn:
        cur = await conn.execute("SELECT id FROM users WHERE name = ?", (name,))
        row = await cur.fetchone()
        if row:
            return str(row[0])
        user_id = new_id("usr")
        await conn.execute("INSERT INTO users (id, name, created_at) VALUES (?, ?, ?)", (user_id, name, now_iso()))
        if initial_credits:
            await conn.execute(
                "INSERT INTO credit_ledger (user_id, amount, reason, created_at) VALUES (?, ?, 'initial', ?)",
                (user_id, initial_credits, now_iso()))
        return user_id


async def create_key(db: Database, user_name: str, scopes: tuple[str, ...],
                     initial_credits: float = 0.0) -> tuple[str, KeyRecord]:
    """Returns the plain key (shown once) and its record."""
    unknown = set(scopes) - set(ALL_SCOPES)
    if unknown:
        raise ValueError(f"unknown scope(s): {', '.join(sorted(unknown))}")
    user_id = await ensure_user(db, user_name, initial_credits)
    plain = new_token(API_KEY_PREFIX)
    record = KeyRecord(new_id("key"), user_id, user_name, plain[:10], tuple(scopes), now_iso(), None)
    await db.write(
        "INSERT INTO api_keys (id, user_id, prefix, key_hash, scopes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (record.id, user_id, record.prefix, token_hash(plain), json.dumps(list(scopes)), record.created_at),
    )
    return plain, record


async def list_keys(db: Database, user_name: str | None = None) -> list[KeyRecord]:
    sql = (
        "SELECT k.id, k.user_id, u.name, k.prefix, k.scopes, k.created_at, k.revoked_at "
        "FROM api_keys k JOIN users u ON u.id = k.user_id"
    )
    params: tuple[str, ...] = ()
    if user_name:
        sql += " WHERE u.name = ?"
        params = (user_name,)
    rows = await db.all(sql + " ORDER BY k.created_at", params)
    return [KeyRecord(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), r[5], r[6]) for r in rows]


async def revoke_key(db: Database, key_id: str) -> bool:
    changed = await db.write(
        "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now_iso(), key_id)
    )
    return changed > 0


async def principal_for_key(db: Database, plain: str) -> Principal | None:
    row = await db.one(
        "SELECT k.user_id, u.name, k.scopes, k.id FROM api_keys k JOIN users u ON u.id = k.user_id "
        "WHERE k.key_hash = ? AND k.revoked_at IS NULL",
        (token_hash(plain),),
    )
    if row is None:
        return None
    return Principal(row[0], row[1], frozenset(json.loads(row[2])), str(row[3]))
