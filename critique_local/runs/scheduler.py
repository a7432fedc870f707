"""The in-process scheduler: a FIFO of run ids and at most ``max_concurrent_runs`` executing.

The queue itself is the ``runs`` table (status ``queued``): on start, queued runs are
resubmitted in creation order, runs that were executing when the server died are failed with
``server_restarted``, and containers of ours that belong to no live run are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from critique_local.clock import now_iso
from critique_local.runs.executor import Executor
from critique_local.runs.states import Phase, RunStatus
from critique_local.services import Services
from critique_local.store import runs as store

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, services: Services) -> None:
        self.s = services
        self._executor = Executor(services)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []

    def submit(self, run_id: str) -> None:
        self._queue.put_nowait(run_id)

    async def start(self) -> None:
        """Start executing. Call :meth:`recover` first, before the API accepts requests."""
        self._workers = [
            asyncio.create_task(self._work(), name=f"run-worker-{i}")
            for i in range(self.s.settings.scheduler.max_concurrent_runs)
        ]

    async def stop(self, timeout_s: float = 5.0) -> None:
        for task in self._workers:
            task.cancel()
        if self._workers:
            await asyncio.wait(self._workers, timeout=timeout_s)
        self._workers = []

    async def _work(self) -> None:
        while True:
            run_id = await self._queue.get()
            try:
                await self._executor.execute(run_id)
            except Exception:
                log.exception("executor failed for run %s", run_id)
            finally:
                self._queue.task_done()

    async def recover(self) -> None:
        db = self.s.db
        queued = await store.runs_with_status(db, RunStatus.QUEUED)
        keep = {r.id for r in queued}
        # sandboxes first, so that a terminal status always means the sandbox is gone
        for info in await self.s.backend.list_ours():
            if info.run_id not in keep:
                log.info("removing sandbox %s of run %s left from before the restart", info.id[:12], info.run_id)
                with contextlib.suppress(Exception):
                    await self.s.backend.destroy(info.id)
        for run in await store.runs_with_status(db, RunStatus.RUNNING, RunStatus.IDLE):
            failed = await store.transition(
                db, run.id, RunStatus.FAILED, Phase.FAILED, error_code="server_restarted",
                error_message="the server restarted while this run was active", finished_at=now_iso(),
                sandbox_token_hash=None,
            )
            await store.update_turn(db, run.id, max(run.turn_count, 1), status="failed", finished_at=now_iso())
            await self.s.hub.status(failed)
        for run in queued:
            self.submit(run.id)
