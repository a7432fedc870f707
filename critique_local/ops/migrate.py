"""Schema upgrades as the operator sees them (``critique-local migrate``): which migrations a
database still needs, and applying them. Migrations are forward-only: a database written by a
newer critique-local is refused (SchemaTooNew), never changed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from critique_local.store import readonly
from critique_local.store.migrations import MIGRATIONS, pending

STATEMENT = re.compile(r"^\s*(CREATE (?:UNIQUE )?(?:TABLE|INDEX) \w+|ALTER TABLE \w+ ADD COLUMN \w+|DROP \w+ \w+)",
                       re.M | re.I)


@dataclass(frozen=True)
class Plan:
    current: int  # the database's schema version (0: new database)
    target: int  # this code's
    steps: list[tuple[int, list[str]]]  # (migration number, what it does)


def describe(script: str) -> list[str]:
    """The statements of a migration, shortened to what they create or change."""
    return [" ".join(m.split()) for m in STATEMENT.findall(script)]


def plan(db_path: Path) -> Plan:
    """What opening ``db_path`` would migrate (reads only; a missing database is version 0).
    Raises SchemaTooNew."""
    current = readonly.schema_version(db_path) if db_path.exists() else 0
    return Plan(current, len(MIGRATIONS), [(n, describe(script)) for n, script in pending(current)])
