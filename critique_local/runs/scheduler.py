"""The in-process scheduler: a FIFO of jobs (first turns and follow-up turns), at most
``max_concurrent_runs`` executing and at most ``max_concurrent_runs_per_user`` per user, a reaper
for expired warm sessions, and cancellation by run id.

The queue itself is durable in the ``runs`` table: on start, queued runs are resubmitted in
creation order, idle runs whose sandbox and agent still answer are kept (reattached), runs
that were executing are failed with ``server_restarted``, and containers of ours that belong to
neither are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from datetime import timedelta

from critique_local.clock import iso, now, now_iso, parse_iso
from critique_local.errors import ErrorCode
from critique_local.ops import logs
from critique_local.repos import workrepo
from critique_local.runs.executor import Executor
from critique_local.runs.queue import RunQueue
from critique_local.runs.states import TERMINAL, Phase, RunStatus, SessionEnd
from critique_local.sandboxes.base import SandboxError, SandboxInfo, run_of_sandbox
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store import sessions as sessions_store
from critique_local.store.runs import RunRow

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, services: Services, executor: Executor) -> None:
        self.s = services
        self.executor = executor
        self._queue = RunQueue(services.settings.scheduler.max_concurrent_runs_per_user)
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[str, asyncio.Task[None]] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._idle_limits = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def lock(self, run_id: str) -> AsyncIterator[None]:
        """Serialises state changes of one run (message, endSession, cancel, expiry); what is
        logged meanwhile carries the run's id (the reaper's lines about a run too)."""
        async with self._locks[run_id]:
            with logs.run_context(run_id):
                yield

    def _submit(self, run_id: str, user_id: str) -> None:
        self._queue.put(run_id, user_id)

    async def enqueue(self, run: RunRow) -> None:
        """A run that has a queued turn now (created, chained, forked, or a follow-up admitted,
        ``run`` as stored after that change): clients hear its status, then it waits for a
        worker. The one way a job reaches the queue besides restart recovery."""
        await self.s.hub.status(run)
        self._submit(run.id, run.user_id)

    async def start(self) -> None:
        """Start executing. Call :meth:`recover` first, before the API accepts requests."""
        self._workers = [asyncio.create_task(self._work(), name=f"run-worker-{i}")
                         for i in range(self.s.settings.scheduler.max_concurrent_runs)]

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel the workers and every executing job, waiting at most ``timeout_s`` seconds."""
        tasks = [*self._workers, *self._running.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        self._workers = []

    async def drain(self, timeout_s: float) -> int:
        """Start no more turns (queued ones stay queued for the next start) and wait up to
        ``timeout_s`` seconds for the turns executing now; returns how many still execute."""
        self._queue.close()
        running = [t for t in self._running.values() if not t.done()]
        if running and timeout_s > 0:
            log.info("draining: waiting up to %.0f s for %d running turn(s)", timeout_s, len(running))
            await asyncio.wait(running, timeout=timeout_s)
        return sum(not t.done() for t in self._running.values())

    async def _work(self) -> None:
        while True:
            run_id, user_id = await self._queue.get()
            logs.for_run(run_id)  # the run's task inherits it: its log lines carry run_id
            task = asyncio.create_task(self.executor.execute(run_id), name=f"run-{run_id}")
            self._running[run_id] = task
            try:
                await asyncio.wait({task})
                if not task.cancelled() and task.exception() is not None:
                    log.error("executor failed for run %s", run_id, exc_info=task.exception())
                try:
                    await self.limit_idle_sessions()  # the run may have just gone idle
                except Exception:
                    log.exception("idle session limits failed")
            finally:
                if self._running.get(run_id) is task:  # a follow-up turn may already be running
                    del self._running[run_id]
                self._queue.done(user_id)

    async def interrupt(self, run_id: str, timeout_s: float = 4.0) -> None:
        """Stop whatever executes for ``run_id`` (the executor removes the sandbox) and wait."""
        self._queue.discard(run_id)
        task = self._running.get(run_id)
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=timeout_s)

    # ---- expiry -------------------------------------------------------------------------------

    async def reap_forever(self) -> None:
        """Every ``sandbox.reap_interval_s``: end expired and surplus idle sessions; every
        ``sandbox.sweep_interval_s``: reclaim the host and sweep sandboxes. Runs until cancelled."""
        swept = time.monotonic()
        while True:
            await asyncio.sleep(self.s.settings.sandbox.reap_interval_s)
            try:
                await self.reap()
            except Exception:
                log.exception("session reaper failed")
            if time.monotonic() - swept < self.s.settings.sandbox.sweep_interval_s:
                continue
            swept = time.monotonic()
            await self._reclaim_host()
            try:
                await self.prune_states()
                await self.sweep()
            except SandboxError as exc:  # e.g. the container engine is restarting: next round
                log.warning("sandbox sweep: %s", exc)
            except Exception:
                log.exception("sandbox sweep failed")

    async def limit_idle_sessions(self) -> None:
        """End the least recently used idle sessions beyond ``scheduler.max_idle_sessions_per_user``
        (per user) and ``scheduler.max_idle_sessions`` (in all): their sandboxes go, the runs
        complete with session end reason ``idle_limit``, and a later message chains."""
        async with self._idle_limits:
            cfg = self.s.settings.scheduler
            idle = await store.idle_sessions(self.s.db)
            per_user = Counter(user for _, user in idle)
            over_total = len(idle) - cfg.max_idle_sessions
            victims: dict[str, str] = {}
            for run_id, user in idle:  # least recently used first
                if per_user[user] > cfg.max_idle_sessions_per_user:
                    per_user[user] -= 1
                    over_total -= 1
                    victims[run_id] = (f"its user has more than scheduler.max_idle_sessions_per_user = "
                                       f"{cfg.max_idle_sessions_per_user} idle sessions")
            for run_id, _ in idle:
                if over_total <= 0:
                    break
                if run_id not in victims:
                    over_total -= 1
                    victims[run_id] = (f"this server has more than scheduler.max_idle_sessions = "
                                       f"{cfg.max_idle_sessions} idle sessions")
            for run_id, why in victims.items():
                async with self.lock(run_id):
                    run = await store.get_run(self.s.db, run_id)
                    if run is None or run.status is not RunStatus.IDLE:
                        continue
                    log.info("ending the idle session of run %s: %s", run_id, why)
                    await self.s.hub.builder(run_id, {
                        "type": "session.ended", "reason": SessionEnd.IDLE_LIMIT.value,
                        "message": f"the least recently used idle session was ended because {why}; "
                                   "a new message starts a chained run"})
                    await self.executor.close_session(run, RunStatus.COMPLETED, Phase.FINISHED, SessionEnd.IDLE_LIMIT)

    async def reap(self) -> None:
        await self.limit_idle_sessions()  # also after a restart or a configuration change
        await self.pause_idle_sessions()
        for run_id in await store.expired_idle_runs(self.s.db, now_iso()):
            async with self.lock(run_id):
                run = await store.get_run(self.s.db, run_id)
                if run is not None and run.status is RunStatus.IDLE and (run.session_expires_at or "") <= now_iso():
                    log.info("session of run %s expired", run_id)
                    # a run whose turn lost its session keeps saying so
                    reason = SessionEnd.SANDBOX_LOST if run.session_end_reason == SessionEnd.SANDBOX_LOST \
                        else SessionEnd.EXPIRED
                    await self.executor.close_session(run, RunStatus.COMPLETED, Phase.FINISHED, reason)

    async def pause_idle_sessions(self) -> None:
        """Pause idle sessions unused for ``sandbox.pause_after_s`` (``Executor.pause``)."""
        after = self.s.settings.sandbox.pause_after_s
        if not after:
            return
        for run_id in await sessions_store.pausable(self.s.db, iso(now() - timedelta(seconds=after))):
            async with self.lock(run_id):
                run = await store.get_run(self.s.db, run_id)
                if run is not None and run.status is RunStatus.IDLE and not run.paused_at:
                    log.info("pausing the idle session of run %s", run_id)
                    await self.executor.pause(run)

    async def prune_states(self) -> None:
        """Durable turn state of ended sessions goes ``sandbox.state_keep_s`` after its last turn
        (with the run's repository); a message to such a run then chains."""
        states = self.executor.states
        for run_id in await states.older_than(self.s.settings.sandbox.state_keep_s):
            async with self.lock(run_id):
                run = await store.get_run(self.s.db, run_id)
                if run is None or run.status in TERMINAL:
                    await states.discard(run_id)
                    await self.executor.run_repo(run_id).discard()

    async def sweep(self) -> None:
        """Remove sandboxes that nothing can use any more: those of ended runs and those an idle
        run no longer holds (their removal failed, e.g. while the container engine was
        restarting), stopped ones of idle runs, whose session then ends as ``sandbox_lost`` (a
        message restores or chains, as after a restart), and stopped ones no run holds. Running
        sandboxes no run holds are the pool's (or being handed to a run) and stay."""
        for info in await self.s.backend.list_ours():
            run = await self._owner(info)
            if run is None:
                if not info.running:  # a pooled sandbox that stopped (a waiting one is running)
                    log.info("removing stopped sandbox %s", info.id[:12])
                    with contextlib.suppress(SandboxError):
                        await self.s.backend.destroy(info.id)
                    if self.executor.pool is not None:
                        self.executor.pool.discard(info.id)
                continue
            if run.status in TERMINAL:
                with logs.run_context(run.id):
                    log.info("removing sandbox %s of ended run %s", info.id[:12], run.id)
                with contextlib.suppress(SandboxError):
                    await self.s.backend.destroy(info.id)
            elif run.status is RunStatus.IDLE and run.sandbox_id != info.id:
                # the sandbox of a turn that lost its session, whose removal failed (an idle run
                # gets a new sandbox only once it runs again)
                async with self.lock(run.id):
                    current = await store.get_run(self.s.db, run.id)
                    if current is not None and current.status is RunStatus.IDLE and current.sandbox_id != info.id:
                        log.info("removing sandbox %s that idle run %s no longer holds", info.id[:12], run.id)
                        with contextlib.suppress(SandboxError):
                            await self.s.backend.destroy(info.id)
            elif run.status is RunStatus.IDLE and not info.running and not run.paused_at:
                async with self.lock(run.id):
                    current = await store.get_run(self.s.db, run.id)
                    if current is not None and current.status is RunStatus.IDLE and current.sandbox_id == info.id:
                        log.info("sandbox of idle run %s stopped; its session ends", run.id)
                        await self.executor.close_session(current, RunStatus.COMPLETED, Phase.FINISHED,
                                                          SessionEnd.SANDBOX_LOST)

    async def _owner(self, info: SandboxInfo) -> RunRow | None:
        """The run a sandbox belongs to (``run_of_sandbox``: our store's binding first, so a
        pooled sandbox a run took is that run's although its labels still name the pool; then
        its labels, then its name)."""
        bound = await store.run_of_sandbox(self.s.db, info.id)
        owner = run_of_sandbox(info.id, info.run_id, {info.id: bound.id} if bound else {}, info.name)
        if bound is not None or owner is None:
            return bound
        return await store.get_run(self.s.db, owner)

    async def _reclaim_host(self) -> None:
        """What stopped servers left on this host (their firewall rules, orphaned sandboxes)."""
        try:
            await self.s.backend.reclaim_host()
        except Exception:
            log.exception("reclaiming what stopped servers left on the host failed")

    # ---- restart ------------------------------------------------------------------------------

    async def recover(self) -> None:
        db = self.s.db
        await self._reclaim_host()
        queued = await store.runs_with_status(db, RunStatus.QUEUED)
        keep: set[str] = set()  # sandbox ids of idle runs that are still usable
        lost: list[store.RunRow] = []
        for run in await store.runs_with_status(db, RunStatus.IDLE):
            # paused, or a turn lost its sandbox: a message resumes (or restores) it, as before the restart
            if run.paused_at or not run.sandbox_id:
                if run.sandbox_id:
                    keep.add(run.sandbox_id)
                continue
            attached = await self.executor.attach(run)
            if attached is None:
                lost.append(run)
            else:
                keep.add(attached[0].id)
                await attached[1].close()
                if run.session_expires_at:  # reconnecting may have reset a remote sandbox's lifetime
                    left = (parse_iso(run.session_expires_at) - now()).total_seconds()
                    with contextlib.suppress(SandboxError):
                        await self.s.backend.extend(attached[0].id, max(60.0, left + 60))
        # sandboxes first, so that a terminal status always means the sandbox is gone (pooled
        # sandboxes from before the restart go too: their secrets lived in memory)
        for info in await self.s.backend.list_ours():
            if info.id not in keep:
                owner = await self._owner(info)
                log.info("removing sandbox %s (%s) left from before the restart", info.id[:12],
                         f"of run {owner.id}" if owner else "pooled")
                with contextlib.suppress(Exception):
                    await self.s.backend.destroy(info.id)
        for run in lost:
            await self.executor.close_session(run, RunStatus.COMPLETED, Phase.FINISHED, SessionEnd.SANDBOX_LOST)
        for run in await store.runs_with_status(db, RunStatus.RUNNING):
            await self.executor.fail(run.id, ErrorCode.SERVER_RESTARTED, "the server restarted while this run was active")
        # the server's repositories of runs that ended while it was down (or crashed) go too
        alive = await store.runs_with_status(db, RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.IDLE)
        restorable = await sessions_store.restorable_ended(db) & await self.executor.states.kept()
        await workrepo.prune(self.s.settings.server.data_dir / "runs", {r.id for r in alive} | restorable)
        for run in queued:
            self._submit(run.id, run.user_id)
