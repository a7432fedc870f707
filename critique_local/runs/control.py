"""The run control plane: follow-up messages, endSession, chained fallback, cancel.

Every state change of one run happens under that run's lock, so a message, an endSession, a
cancel and the expiry reaper can never interleave on the same run.
"""

from __future__ import annotations

from typing import Any

from critique_local.clock import now_iso
from critique_local.errors import InvalidRequest, RunTerminal, SessionExpired, TurnInProgress
from critique_local.runs import create as creating
from critique_local.runs.create import check_publish
from critique_local.runs.scheduler import Scheduler
from critique_local.runs.spec import FollowUp
from critique_local.runs.states import CHAINABLE, TERMINAL, Phase, RunStatus, SessionEnd
from critique_local.store import pulls
from critique_local.store import runs as store
from critique_local.store import sessions as sessions_store
from critique_local.store.runs import RunRow


class RunControl:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.s = scheduler.s
        self.executor = scheduler.executor

    async def message(self, run: RunRow, req: FollowUp) -> RunRow:
        """Returns the run that will carry the turn: the same one (warm) or a chained one."""
        check_publish(self.s.settings, req.publish, run.task_kind, run.base_branch or run.base_ref)
        if req.end_session:
            if req.prompt is not None:
                raise InvalidRequest("send either prompt or endSession, not both", field="endSession")
            return await self.end_session(run)
        if req.prompt is None:
            raise InvalidRequest("prompt is required (or endSession: true)", field="prompt")
        async with self.scheduler.lock(run.id):
            run = await self._reload(run.id)
            if run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
                raise TurnInProgress("a turn is in progress on this run; wait until it is idle")
            restore = req.fallback == "restore"
            if run.status is RunStatus.IDLE:
                live = (run.session_expires_at or "") > now_iso()
                # paused: the executor resumes it (or restores it) before the turn
                attached = await self.executor.attach(run) if live and not run.paused_at else None
                if attached is not None:
                    await attached[1].close()
                if (live and run.paused_at) or attached is not None or (
                        restore and await self.executor.restorer.restorable(run.id)):
                    return await self._follow_up(run, req, req.prompt)
                reason = SessionEnd.EXPIRED if not live else SessionEnd.SANDBOX_LOST
                run = await self.executor.close_session(run, RunStatus.COMPLETED, Phase.FINISHED, reason)
            if not (run.status is RunStatus.COMPLETED and run.session_end_reason in CHAINABLE):
                raise RunTerminal(f"run is {run.status.value}; start a new run")
            if run.chained_to_run_id:
                raise RunTerminal(f"this run was already continued as {run.chained_to_run_id}; message that run")
            if req.fallback == "none":
                raise SessionExpired("the session of this run has ended and fallback is none")
            if problem := creating.chain_problem(run):
                raise SessionExpired(problem)
            if restore and await self.executor.restorer.restorable(run.id):
                publish = await self._turn_publish(run, req)
                if await sessions_store.reopen(self.s.db, run.id, req.prompt, publish) is None:
                    raise TurnInProgress("a turn is in progress on this run")
                run = await self._reload(run.id)
                await self.scheduler.enqueue(run)
                return run
            return await self._chain(run, req.prompt)

    async def _follow_up(self, run: RunRow, req: FollowUp, prompt: str) -> RunRow:
        publish = await self._turn_publish(run, req)
        if await store.begin_follow_up(self.s.db, run.id, prompt, publish) is None:
            raise TurnInProgress("a turn is in progress on this run")
        run = await self._reload(run.id)
        await self.scheduler.enqueue(run)
        return run

    async def _turn_publish(self, run: RunRow, req: FollowUp) -> dict[str, Any]:
        """A message's publish settings; without any, the previous turn's (a run that publishes
        keeps its pull request in step with its work). The branch never changes once pushed."""
        previous = await store.turn_publish(self.s.db, run.id, run.turn_count)
        if req.publish is None:
            return previous
        wanted = {k: v for k, v in req.publish.to_stored().items() if v is not None}
        pr = await pulls.of_run(self.s.db, run.id)
        if pr is not None and req.publish.branch not in (None, pr.branch):
            raise InvalidRequest(f"this run already publishes to {pr.branch!r}", field="publish.branch")
        if "branch" not in wanted and previous.get("branch"):
            wanted["branch"] = previous["branch"]
        return wanted

    async def _chain(self, old: RunRow, prompt: str) -> RunRow:
        run = await creating.chain(self.s, old, prompt)
        await self.scheduler.enqueue(run)
        return run

    async def end_session(self, run: RunRow) -> RunRow:
        async with self.scheduler.lock(run.id):
            run = await self._reload(run.id)
            if run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
                raise TurnInProgress("a turn is in progress; cancel it or wait until the run is idle")
            if run.status is not RunStatus.IDLE:
                raise RunTerminal(f"run is {run.status.value}")
            return await self.executor.close_session(run, RunStatus.COMPLETED, Phase.FINISHED, SessionEnd.END_SESSION)

    async def cancel(self, run: RunRow) -> RunRow:
        """Abort the turn, destroy the sandbox, status cancelled. Idempotent."""
        async with self.scheduler.lock(run.id):
            run = await self._reload(run.id)
            if run.status is RunStatus.CANCELLED:
                return run
            if run.status in TERMINAL:
                raise RunTerminal(f"run is already {run.status.value}")
            await self.scheduler.interrupt(run.id)
            run = await self._reload(run.id)
            if run.status in TERMINAL:  # the turn finished on its own in the meantime
                return run
            await store.update_turn(self.s.db, run.id, max(run.turn_count, 1), status="cancelled",
                                    finished_at=now_iso())
            return await self.executor.close_session(run, RunStatus.CANCELLED, Phase.CANCELLED, SessionEnd.FINISHED)

    async def _reload(self, run_id: str) -> RunRow:
        run = await store.get_run(self.s.db, run_id)
        assert run is not None
        return run
