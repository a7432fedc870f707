"""A FIFO of run ids that never hands out more than ``per_user`` active jobs for one user."""

from __future__ import annotations

import asyncio
from collections import Counter


class RunQueue:
    def __init__(self, per_user: int) -> None:
        self._per_user = per_user
        self._items: list[tuple[str, str]] = []
        self._active: Counter[str] = Counter()
        self._changed = asyncio.Event()
        self._closed = False

    def put(self, run_id: str, user_id: str) -> None:
        if self._closed or any(r == run_id for r, _ in self._items):
            return
        self._items.append((run_id, user_id))
        self._changed.set()

    def discard(self, run_id: str) -> None:
        self._items = [(r, u) for r, u in self._items if r != run_id]

    async def get(self) -> tuple[str, str]:
        """The oldest job whose user is under the limit (waits until there is one)."""
        while True:
            for i, (run_id, user_id) in enumerate([] if self._closed else self._items):
                if self._active[user_id] < self._per_user:
                    del self._items[i]
                    self._active[user_id] += 1
                    return run_id, user_id
            self._changed.clear()
            await self._changed.wait()

    def close(self) -> None:
        """Hand out no more jobs (draining): the runs stay queued in the database, and the next
        start resubmits them."""
        self._closed = True
        self._items.clear()

    def done(self, user_id: str) -> None:
        self._active[user_id] -= 1
        self._changed.set()

    def __len__(self) -> int:
        return len(self._items)
