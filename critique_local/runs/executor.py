"""Runs, job by job: one scheduler job is a run's first turn (provisioning, ``runs/provision.py``)
or a follow-up turn (reattaching), then the turn itself (``runs/turn.py``). This module owns
the job's lifecycle: what happens when it fails (the run fails with the error's code, after its
sandbox is gone; a follow-up whose sandbox or agent failed only ends its session when the run's
state was kept, ``turnstate.lose_session``), when it is cancelled, and how an idle session ends.

A terminal status always means the sandbox is gone: teardown comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from critique_local.agent.base import Agent
from critique_local.clock import now_iso
from critique_local.envs.builder import Environments
from critique_local.errors import ErrorCode, RunError, SandboxError
from critique_local.repos.workrepo import RunRepo
from critique_local.runs import forks, turnstate
from critique_local.runs.durable import SessionStates
from critique_local.runs.pool import WarmPool
from critique_local.runs.provision import Job, Provisioner
from critique_local.runs.restore import Restorer
from critique_local.runs.states import CHAINABLE, Phase, RunStatus, SessionEnd
from critique_local.runs.turn import Turn, run_repo, transition
from critique_local.runs.watchdog import Watchdog
from critique_local.sandboxes.base import Sandbox
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store.runs import RunRow, TurnRow

log = logging.getLogger(__name__)
ABORT_ON_CANCEL_S = 1.0


def cancel_requested() -> bool:
    """Whether the current task was asked to stop (``Task.cancel``: a cancel or shutdown), as
    opposed to a ``CancelledError`` that escaped from something it awaited."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Executor:
    def __init__(self, services: Services, environments: Environments, pool: WarmPool | None = None) -> None:
        self.s = services
        self.provisioner = Provisioner(services, environments, pool)
        self.turn = Turn(services, self.provisioner, Watchdog(services.backend, services.settings.sandbox))
        self.states = SessionStates(services)
        self.restorer = Restorer(services, self.provisioner, self.states)

    @property
    def pool(self) -> WarmPool | None:
        return self.provisioner.pool

    # ---- entry point (one scheduler job) ------------------------------------------------------

    async def execute(self, run_id: str) -> None:
        run = await store.get_run(self.s.db, run_id)
        if run is None or run.status not in (RunStatus.QUEUED, RunStatus.RUNNING):
            return
        queued = await store.queued_turn(self.s.db, run.id)
        if run.status is RunStatus.QUEUED:
            await self._guarded(Job(run), queued, first=True)
        elif queued is not None:
            await self._guarded(Job(run), queued, first=False)

    async def _guarded(self, job: Job, queued: TurnRow | None, *, first: bool) -> None:
        failure: tuple[ErrorCode, str] | None = None
        try:
            await self.provisioner.remember_secrets(job.run)
            if first and job.run.forked_from_run_id:  # a fork: its state was copied when it was made
                job.run = await transition(self.s, job.run, RunStatus.RUNNING, Phase.PROVISIONING,
                                           started_at=now_iso())
                await self.restorer.reattach(job, reason="fork")
                if queued is None:
                    await forks.settle(self.s, job)
                    return
            elif first:
                job.run = await transition(self.s, job.run, RunStatus.RUNNING, Phase.PROVISIONING,
                                           started_at=now_iso(), turn_count=1)
                await self.provisioner.provision(job)
            else:
                await self.restorer.reattach(job)
            assert queued is not None
            await self.turn.run(job, queued.index, queued.prompt)
            return
        except asyncio.CancelledError:
            if not cancel_requested():
                # not a cancel of this job: a CancelledError that escaped from an operation the
                # turn awaited. Left to propagate it would end the job with the run still
                # `running`, recorded by no one; it fails the run instead.
                log.exception("run %s: an operation was cancelled under the turn", job.run.id)
                failure = (ErrorCode.INTERNAL_ERROR, "an internal operation of the turn was cancelled")
            else:
                # cancel or shutdown: stop the agent, remove the sandbox; the canceller (or the
                # next start's recovery) records the outcome
                await self._abandon(job)
                raise
        except RunError as exc:
            failure = (exc.code, exc.message)
        except Exception as exc:
            log.exception("run %s crashed", job.run.id)
            failure = (ErrorCode.INTERNAL_ERROR, f"{exc.__class__.__name__}: {exc}")
        finally:
            if job.agent is not None:
                await job.agent.close()
        # teardown first, so a terminal status always means the sandbox is gone (and an idle run
        # whose session was lost holds none)
        sandbox_id = job.sandbox_id or job.run.sandbox_id
        if sandbox_id:
            await self.destroy(sandbox_id)
        if (queued is not None and turnstate.session_lost(failure[0], queued.index)
                and await self.restorer.restorable(job.run.id)):
            await turnstate.lose_session(self.s, job.run.id, queued.index, *failure, transition)
            return
        await self.fail(job.run.id, *failure)

    async def _abandon(self, job: Job) -> None:
        """A cancelled job: the agent stopped (briefly tried), the sandbox removed."""
        if job.agent is not None and job.run.agent_session_id:
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wait_for(job.agent.abort(job.run.agent_session_id), ABORT_ON_CANCEL_S))
        sandbox_id = job.sandbox_id or job.run.sandbox_id
        if sandbox_id:
            await asyncio.shield(self.destroy(sandbox_id))

    async def attach(self, run: RunRow) -> tuple[Sandbox, Agent] | None:
        """The live sandbox and a healthy agent of an idle run, or None when either is gone;
        the caller closes the agent's connection."""
        return await self.provisioner.attach(run)

    def run_repo(self, run_id: str) -> RunRepo:
        """The server's own repository of the run (``repos/workrepo.py``)."""
        return run_repo(self.s, run_id)

    # ---- ending -------------------------------------------------------------------------------

    async def destroy(self, sandbox_id: str) -> None:
        try:
            await self.s.backend.destroy(sandbox_id)
        except SandboxError as exc:
            log.warning("could not remove sandbox %s (%s); the orphan sweep will", sandbox_id[:12], exc)
        except Exception:  # a backend bug must not keep the run from its terminal status
            log.exception("could not remove sandbox %s; the orphan sweep will", sandbox_id[:12])

    async def fail(self, run_id: str, code: ErrorCode, message: str) -> None:
        run = await store.get_run(self.s.db, run_id)
        if run is None or run.status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED):
            return
        message = self.s.redactor.clean(message, run_id)
        log.info("run %s failed: %s: %s", run_id, code, message)
        await self.s.hub.builder(run_id, {"type": "error", "code": code, "message": message})
        await store.update_turn(self.s.db, run_id, max(run.turn_count, 1), status="failed", finished_at=now_iso())
        await transition(self.s, run, RunStatus.FAILED, Phase.FAILED, error_code=code, error_message=message,
                         finished_at=now_iso(), sandbox_token_hash=None, sandbox_token=None,
                         agent_secret=None, byok_key=None, mcp_headers=None,
                         session_end_reason=SessionEnd.FINISHED.value)
        self.s.redactor.forget_run(run_id)
        await self.run_repo(run_id).discard()
        await self.states.discard(run_id)

    async def close_session(self, run: RunRow, status: RunStatus, phase: Phase, reason: SessionEnd,
                            **fields: Any) -> RunRow:
        """Destroy an idle run's sandbox, then record the terminal state."""
        if run.sandbox_id:
            await self.destroy(run.sandbox_id)
        closed = await transition(self.s, run, status, phase, finished_at=now_iso(), sandbox_token_hash=None,
                                  sandbox_token=None, agent_secret=None, byok_key=None, mcp_headers=None,
                                  session_end_reason=reason.value, **fields)
        self.s.redactor.forget_run(run.id)
        if reason not in CHAINABLE:  # otherwise kept: a message restores the session (state_keep_s)
            await self.run_repo(run.id).discard()
            await self.states.discard(run.id)
        return closed

    async def pause(self, run: RunRow) -> RunRow:
        """Pause an idle session (``runs/pause.py``): in place where the backend can (E2B), else
        its agent is stopped and the sandbox kept (Docker); unchanged when neither is possible."""
        return await self.restorer.pauser.pause(run)
