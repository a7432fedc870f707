"""Stopping gracefully (SIGTERM, SIGINT): drain, then optionally end idle sessions.

1. No new turn starts: queued runs and follow-ups accepted from now on stay ``queued`` in the
   database and start after the next start.
2. Running turns get ``server.drain_timeout_s`` seconds to finish; the API keeps answering
   (status, events, patches) meanwhile. Turns still running then are cancelled, and the next
   start fails them with ``server_restarted``.
3. Idle (warm) sessions keep their sandboxes for the next start to reattach, unless
   ``server.end_idle_sessions_on_stop``: then they end with session end reason
   ``server_stopped`` (their runs complete; a message restores the session on the same run id,
   as after an expiry).
"""

from __future__ import annotations

import logging

from critique_local.runs.scheduler import Scheduler
from critique_local.runs.states import Phase, RunStatus, SessionEnd
from critique_local.store import runs as store

log = logging.getLogger(__name__)


async def drain(scheduler: Scheduler) -> None:
    """Never raises: stopping goes on whatever happens here."""
    try:
        await _drain(scheduler)
    except Exception:
        log.exception("draining failed")


async def _drain(scheduler: Scheduler) -> None:
    s = scheduler.s
    left = await scheduler.drain(s.settings.server.drain_timeout_s)
    if left:
        log.warning("draining: %d turn(s) still running after server.drain_timeout_s = %.0f s; cancelling them",
                    left, s.settings.server.drain_timeout_s)
    if not s.settings.server.end_idle_sessions_on_stop:
        return
    for run in await store.runs_with_status(s.db, RunStatus.IDLE):
        async with scheduler.lock(run.id):
            current = await store.get_run(s.db, run.id)
            if current is None or current.status is not RunStatus.IDLE:
                continue
            log.info("ending the idle session of run %s (server.end_idle_sessions_on_stop)", run.id)
            try:
                await scheduler.executor.close_session(current, RunStatus.COMPLETED, Phase.FINISHED,
                                                       SessionEnd.SERVER_STOPPED)
            except Exception:
                log.exception("could not end the idle session of run %s", run.id)
