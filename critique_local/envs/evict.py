"""Which kept environments go: a pure rule over their rows, so it is tested without a backend."""

from __future__ import annotations

from collections.abc import Collection

from critique_local.clock import now, parse_iso
from critique_local.store.environments import EnvironmentRow


def choose(rows: list[EnvironmentRow], max_unused_s: float, max_total_bytes: int, superseded: bool,
           keep: Collection[str] = ()) -> list[EnvironmentRow]:
    """The environments to remove, in order: unused for more than ``max_unused_s``; with
    ``superseded``, those last used before a newer environment of the same repository was
    created (nobody has needed them since); then the least recently used until the rest fit in
    ``max_total_bytes`` (sizes a backend does not report count as 0). Keys in ``keep`` stay."""
    at = now()
    ordered = sorted(rows, key=lambda r: r.last_used_at, reverse=True)  # most recently used first
    out: list[EnvironmentRow] = []
    for row in ordered:
        if row.key in keep:
            continue
        unused_s = (at - parse_iso(row.last_used_at)).total_seconds()
        replaced = superseded and any(o.repository == row.repository and o.key != row.key
                                      and o.created_at > row.last_used_at for o in rows)
        if unused_s > max_unused_s or replaced:
            out.append(row)
    total = 0
    for row in ordered:
        if row in out:
            continue
        total += row.size_bytes or 0
        if total > max_total_bytes and row.key not in keep:
            out.append(row)
            total -= row.size_bytes or 0
    return out
