"""Credits, plans and metering.

Every model call through the gateway is recorded in ``model_calls`` with the provider's reported
usage (or an estimate, flagged, when none is reported) and, unless the run pays its own provider
(BYOK), debited from the user's balance in ``credit_ledger``. A balance is the sum of the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from critique_local.clock import now_iso
from critique_local.config import BillingSettings
from critique_local.store.db import Database


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    credits: float = 0.0
    model_calls: int = 0

    def view(self) -> dict[str, Any]:
        return {"inputTokens": self.input_tokens, "outputTokens": self.output_tokens,
                "credits": round(self.credits, 6), "modelCalls": self.model_calls}


async def balance(db: Database, user_id: str) -> float:
    row = await db.one("SELECT COALESCE(SUM(amount), 0) FROM credit_ledger WHERE user_id = ?", (user_id,))
    return float(row[0]) if row else 0.0


async def grant(db: Database, user_id: str, amount: float, reason: str = "grant") -> float:
    await db.write("INSERT INTO credit_ledger (user_id, amount, reason, created_at) VALUES (?, ?, ?, ?)",
                   (user_id, amount, reason, now_iso()))
    return await balance(db, user_id)


async def plan_of(db: Database, settings: BillingSettings, user_id: str) -> str:
    row = await db.one("SELECT plan FROM users WHERE id = ?", (user_id,))
    return str(row[0]) if row and row[0] else settings.default_plan


async def record_call(db: Database, *, user_id: str, run_id: str | None, turn_idx: int | None, model_id: str,
                      input_tokens: int, output_tokens: int, credits: float, estimated: bool, billed: bool) -> None:
    """One metered model call; debits the user unless the run pays its provider itself."""
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
    sql = ("SELECT COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), COALESCE(SUM(credits), 0), "
           "COUNT(*) FROM model_calls WHERE run_id = ?")
    params: list[Any] = [run_id]
    if turn_idx is not None:
        sql += " AND turn_idx = ?"
        params.append(turn_idx)
    row = await db.one(sql, params)
    assert row is not None
    return Usage(int(row[0]), int(row[1]), float(row[2]), int(row[3]))


async def usage_by_turn(db: Database, run_id: str) -> dict[int, Usage]:
    """Usage of every turn of a run in one query (the run's total is their sum)."""
    rows = await db.all(
        "SELECT turn_idx, SUM(input_tokens), SUM(output_tokens), SUM(credits), COUNT(*) FROM model_calls "
        "WHERE run_id = ? GROUP BY turn_idx", (run_id,))
    return {int(r[0] or 0): Usage(int(r[1]), int(r[2]), float(r[3]), int(r[4])) for r in rows}


def total(parts: dict[int, Usage]) -> Usage:
    values = list(parts.values())
    return Usage(sum(u.input_tokens for u in values), sum(u.output_tokens for u in values),
                 sum(u.credits for u in values), sum(u.model_calls for u in values))


async def charge_orchestration(db: Database, user_id: str, run_id: str, amount: float) -> None:
    if amount:
        await db.write("INSERT INTO credit_ledger (user_id, amount, reason, run_id, created_at) VALUES (?, ?, ?, ?, ?)",
                       (user_id, -amount, "orchestration", run_id, now_iso()))
