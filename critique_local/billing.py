"""Credits, plans and metering.

Every model call through the gateway is recorded in ``model_calls`` with the provider's reported
usage (or an estimate, flagged, when none is reported) and, unless the run pays its own provider
(BYOK), debited from the user's balance in ``credit_ledger``. A balance is the sum of the ledger.
The SQL is in :mod:`critique_local.store.ledger`; this module adds the operator's policy.
"""

from __future__ import annotations

from critique_local.config import BillingSettings
from critique_local.store import ledger
from critique_local.store.db import Database
from critique_local.store.ledger import Usage, balance, record_call, usage, usage_by_turn

__all__ = ["Usage", "balance", "grant", "plan_of", "record_call", "total", "usage", "usage_by_turn"]


async def grant(db: Database, user_id: str, amount: float, reason: str = "grant") -> float:
    """Add ``amount`` credits (negative: take some away); returns the new balance."""
    await ledger.add(db, user_id, amount, reason)
    return await balance(db, user_id)


async def plan_of(db: Database, settings: BillingSettings, user_id: str) -> str:
    """The user's plan, else ``billing.default_plan``."""
    return await ledger.plan(db, user_id) or settings.default_plan


def total(parts: dict[int, Usage]) -> Usage:
    values = list(parts.values())
    return Usage(sum(u.input_tokens for u in values), sum(u.output_tokens for u in values),
                 sum(u.credits for u in values), sum(u.model_calls for u in values))
