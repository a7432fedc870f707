"""Serialised answers of ``GET /runs/{id}``, reused while nothing in the database changed.

A client polling a run asks again and again for bytes that only change when the run does. Every
change the server makes goes through its one database connection, whose change counter
(``Database.changes``) then moves: an answer is reused only while the counter is where it was
when the answer was read, for at most ``max_age_s`` (other processes, e.g. the CLI, write
nothing a run view shows; the bound covers what they might), and not past the moment its
``sessionActive`` would turn false by the clock alone.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True)
class _Entry:
    user_id: str
    changes: int
    body: bytes
    expires: float  # monotonic


class ViewCache:
    def __init__(self, max_entries: int = 2048, max_age_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries, self.max_age_s, self.clock = max_entries, max_age_s, clock
        self._entries: OrderedDict[tuple[str, bool, bool], _Entry] = OrderedDict()

    def get(self, key: tuple[str, bool, bool], user_id: str, changes: int) -> bytes | None:
        """The answer for ``key`` (run id, patch, events) read at database state ``changes``
        for ``user_id``, if still valid; else None."""
        entry = self._entries.get(key)
        if entry is None or entry.changes != changes or entry.user_id != user_id or entry.expires <= self.clock():
            return None
        return entry.body

    def put(self, key: tuple[str, bool, bool], user_id: str, changes: int, body: bytes,
            valid_for_s: float | None = None) -> None:
        """Keep ``body``, read at database state ``changes``; ``valid_for_s`` bounds it further
        (seconds until something in it changes by the clock alone)."""
        age = self.max_age_s if valid_for_s is None else max(0.0, min(self.max_age_s, valid_for_s))
        self._entries[key] = _Entry(user_id, changes, body, self.clock() + age)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


VIEW_CACHE = web.AppKey("view_cache", ViewCache)
