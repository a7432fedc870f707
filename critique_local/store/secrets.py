"""Per-repository environment secrets, set by the operator (``critique-local secrets set``) and
given to that repository's validation commands. Values are sealed with the server's key, bound
to ``owner/name:NAME``, and never returned by the API."""

from __future__ import annotations

from critique_local.clock import now_iso
from critique_local.crypto import SecretBox
from critique_local.store.db import Database


def _aad(full_name: str, name: str) -> str:
    return f"repo-secret:{full_name}:{name}"


async def put(db: Database, box: SecretBox, full_name: str, name: str, value: str) -> None:
    await db.write(
        "INSERT INTO repo_secrets (full_name, name, value, created_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(full_name, name) DO UPDATE SET value = excluded.value, created_at = excluded.created_at",
        (full_name, name, box.seal(value, _aad(full_name, name)), now_iso()),
    )


async def delete(db: Database, full_name: str, name: str) -> bool:
    return await db.write("DELETE FROM repo_secrets WHERE full_name = ? AND name = ?", (full_name, name)) > 0


async def names(db: Database) -> list[tuple[str, str, str]]:
    rows = await db.all("SELECT full_name, name, created_at FROM repo_secrets ORDER BY full_name, name")
    return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]


async def env_for(db: Database, box: SecretBox, full_name: str) -> dict[str, str]:
    rows = await db.all("SELECT name, value FROM repo_secrets WHERE full_name = ?", (full_name,))
    return {str(r[0]): box.open(str(r[1]), _aad(full_name, str(r[0]))) for r in rows}
