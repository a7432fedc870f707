"""Run events: persist first, then wake whoever follows the run (SSE streams)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any

from critique_local.bounds import clip_json, json_size
from critique_local.redact import Redactor
from critique_local.runs.states import lifecycle_of
from critique_local.store import events as store
from critique_local.store.db import Database
from critique_local.store.runs import RunRow

log = logging.getLogger(__name__)
BUILDER_EVENT = "builder.event"
MAX_EVENT_BYTES = 32_768  # one stored event, as JSON
RUN_STATUS = "run.status"
RECENT_EVENTS = 256  # per run, kept in memory for stream readers
RECENT_RUNS = 512  # runs whose recent events are kept (least recently active dropped first)


def bounded(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` if its JSON is at most :data:`MAX_EVENT_BYTES`, else a clipped copy marked
    ``"clipped": true`` (strings, lists and nesting cut; at worst only its type is kept)."""
    size = json_size(data)
    if size <= MAX_EVENT_BYTES:
        return data
    clipped = clip_json(data, max_chars=1000, max_items=20, max_depth=4)
    clipped["clipped"] = True
    if json_size(clipped) <= MAX_EVENT_BYTES:
        return dict(clipped)
    return {"type": clip_json(data.get("type"), max_chars=100), "clipped": True, "bytes": size}


def status_payload(run: RunRow) -> dict[str, Any]:
    lc = lifecycle_of(run.status, run.phase, run.has_patch, run.session_end_reason, run.chained_to_run_id)
    payload: dict[str, Any] = {
        "runId": run.id, "status": run.status.value, "lifecycle": lc.lifecycle, "terminal": lc.terminal,
        "awaitingFollowUp": lc.awaiting_follow_up, "canFollowUp": lc.can_follow_up,
        "nextActions": list(lc.next_actions), "sessionActive": lc.session_active,
        "sessionExpiresAt": run.session_expires_at if lc.session_active else None, "turnCount": run.turn_count,
    }
    if run.chained_to_run_id:
        payload["chainedToRunId"] = run.chained_to_run_id
    if run.error_code:
        payload["error"] = {"code": run.error_code, "message": run.error_message}
    return payload


StatusListener = Callable[[RunRow, dict[str, Any]], Awaitable[None]]
EventObserver = Callable[[store.EventRow], Awaitable[None]]


class EventHub:
    def __init__(self, db: Database, redactor: Redactor | None = None,
                 on_status_change: StatusListener | None = None, observers: tuple[EventObserver, ...] = ()) -> None:
        """``on_status_change`` (the webhooks) hears every change of a run's status;
        ``observers`` (metrics, audit) see every stored event and must not raise."""
        self._db = db
        self.redactor = redactor or Redactor()
        self._signals: dict[str, asyncio.Event] = {}
        self.on_status_change = on_status_change
        self.observers = observers
        # the newest events of recently active runs: woken stream readers (hundreds may follow one
        # run) take new events from here instead of each reading the database
        self._recent: OrderedDict[str, deque[store.EventRow]] = OrderedDict()

    def recent(self, run_id: str, after_seq: int) -> list[store.EventRow] | None:
        """The run's events after ``after_seq`` from memory, oldest first; None when memory
        cannot tell (the run is not among the recent ones, or events after ``after_seq`` are
        older than what is kept): then read the database."""
        tail = self._recent.get(run_id)
        if not tail or tail[0].seq > after_seq + 1:
            return None
        found = sorted((e for e in tail if e.seq > after_seq), key=lambda e: e.seq)
        if any(e.seq != after_seq + 1 + i for i, e in enumerate(found)):  # appended out of order: not yet all here
            return None
        return found

    def _remember(self, row: store.EventRow) -> None:
        tail = self._recent.get(row.run_id)
        if tail is None:
            tail = self._recent[row.run_id] = deque(maxlen=RECENT_EVENTS)
            while len(self._recent) > RECENT_RUNS:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(row.run_id)
        tail.append(row)

    def signal(self, run_id: str) -> asyncio.Event:
        """The event set on the next append for ``run_id``. Take it *before* reading, so an
        append between the read and the wait is never missed."""
        return self._signals.setdefault(run_id, asyncio.Event())

    async def emit(self, run_id: str, kind: str, data: dict[str, Any]) -> store.EventRow:
        """Persist (secrets redacted, at most :data:`MAX_EVENT_BYTES`) and wake the run's stream
        readers."""
        row = await store.append(self._db, run_id, kind, bounded(self.redactor.data(data, run_id)))
        self._remember(row)
        old = self._signals.pop(run_id, None)
        if old is not None:
            old.set()
        for observe in self.observers:
            await observe(row)
        return row

    async def builder(self, run_id: str, data: dict[str, Any]) -> store.EventRow:
        return await self.emit(run_id, BUILDER_EVENT, data)

    async def status(self, run: RunRow) -> store.EventRow:
        """A run.status event (every status or lifecycle change); listeners hear status changes."""
        previous = await store.last_of_kind(self._db, run.id, RUN_STATUS)
        payload = status_payload(run)
        row = await self.emit(run.id, RUN_STATUS, payload)
        if self.on_status_change is not None and (previous is None or previous.get("status") != run.status.value):
            try:
                await self.on_status_change(run, payload)
            except Exception:
                log.exception("status listener failed for run %s", run.id)
        return row
