"""Credits and metered model calls: the SQL behind ``billing``.

``credit_ledger`` holds signed amounts in credits (a balance is their sum); ``model_calls`` holds
one row per model call through the gateway, with token counts and its cost in credits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from critique_local.clock import now_iso
from critique_local.store.db import Database, Read


@dataclass(frozen=True)
class Usage:
    """Tokens, credits and model calls summed over some model calls."""

    input_tokens: int = 0
    output_tokens: int = 0
    credits: float = 0.0
    model_calls: int = 0

    def view(self) -> dict[str, Any]:
        return {"inputTokens": self.input_tokens, "outputTokens": self.output_tokens,
                "credits": round(self.credits, 6), "modelCalls": self.model_calls}


async def balance(db: Database, user_id: str) -> float:
    """The user's balance in credits (0 for an unknown user)."""
    row = await db.one("SELECT COALESCE(SUM(amount), 0) FROM credit_ledger WHERE user_id = ?", (user_id,))
    return float(row[0]) if row else 0.0


async def add(db: Database, user_id: str, amount: float, reason: str, run_id: str | None = None) -> None:
    """One ledger entry of ``amount`` credits (negative: a debit)."""
    await db.write("INSERT INTO credit_ledger (user_id, amount, reason, run_id, created_at) VALUES (?, ?, ?, ?, ?)",
                   (user_id, amount, reason, run_id, now_iso()))


async def plan(db: Database, user_id: str) -> str | None:
    """The plan set for the user, None when none is (the operator's default applies)."""
    row = await db.one("SELECT plan FROM users WHERE id = ?", (user_id,))
    return str(row[0]) if row and row[0] else None


async def set_plan(db: Database, user_id: str, plan_name: str) -> None:
    await db.write("UPDATE users SET plan = ? WHERE id = ?", (plan_name, user_id))


async def record_call(db: Database, *, user_id: str, run_id: str | None, turn_idx: int | None, model_id: str,
                      input_tokens: int, output_tokens: int, credits: float, estimated: bool, billed: bool) -> None:
    """One metered model call, and its debit when ``billed`` (both in one transaction)."""
    async with db.tx() as conn:
        await conn.execute(
            "INSERT INTO model_calls (user_id, run_id, turn_idx, model_id, input_tokens, output_tokens, credits, "
            "estimated, billed_to, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (user_id, run_id, turn_idx, model_id, input_tokens, output_tokens, credits, int(estimated),
             "credits" if billed else "byok", now_iso()))
        if billed and credits:
            await conn.execute(
                "INSERT INTO credit_ledger (user_id, amount, reason, run_id, created_at) VALUES (?, ?, ?, ?, ?)",
                (user_id, -credits, f"model:{model_id}", run_id, now_iso()))


async def usage(db: Database, run_id: str, turn_idx: int | None = None) -> Usage:
    """Usage of a run (or of its turn ``turn_idx``, 1-based)."""
    sql = ("SELECT COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), COALESCE(SUM(credits), 0), "
           "COUNT(*) FROM model_calls WHERE run_id = ?")
    params: list[Any] = [run_id]
    if turn_idx is not None:
        sql += " AND turn_idx = ?"
        params.append(turn_idx)
    row = await db.one(sql, params)
    assert row is not None
    return Usage(int(row[0]), int(row[1]), float(row[2]), int(row[3]))


def usage_by_turn_read(run_id: str) -> Read[dict[int, Usage]]:
    """Usage of every turn of a run in one query (turn index -> usage; 0: calls outside a turn)."""
    return Read("SELECT turn_idx, SUM(input_tokens), SUM(output_tokens), SUM(credits), COUNT(*) FROM model_calls "
                "WHERE run_id = ? GROUP BY turn_idx", (run_id,),
                lambda rows: {int(r[0] or 0): Usage(int(r[1]), int(r[2]), float(r[3]), int(r[4])) for r in rows})


async def usage_by_turn(db: Database, run_id: str) -> dict[int, Usage]:
    found: dict[int, Usage] = (await db.read(usage_by_turn_read(run_id)))[0]
    return found
