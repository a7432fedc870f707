"""The end of a turn as far as sessions that survive are concerned (``runs/durable.py``).

- :func:`save_state`: the agent's transcript is exported and kept, under the run's lock and
  *before* the run goes idle, so that once a client sees ``idle`` the turn can be restored even
  if the sandbox disappears the next moment.
- :func:`fail_turn`: a follow-up turn that failed for a reason of its own (:data:`TURN_FAILURES`:
  the model refused the call, the patch grew over ``limits.max_patch_bytes``) does not throw the
  session away: the workspace goes back to the last good turn's tree, the turn is ``failed``
  with its ``error``, and the run is ``idle`` again with the earlier turns' patch intact. The
  kept transcript stays the last good turn's, so a restore (its sandbox lost, expired, or paused
  without it) forgets the failed turn like the workspace did; the live agent, while its session
  lasts (also when a Docker pause kept its sandbox and ``runs/pause.py`` relaunches it on the
  same session), still has the failed turn in its conversation (and sees the files as they are now).
- :func:`lose_session`: a follow-up turn whose sandbox or agent process failed
  (:data:`SESSION_LOSSES`: the sandbox stopped, the agent died or broke) ends the session but not
  the run, when its durable state was kept: the turn is ``failed`` with its ``error``, the run
  ``idle`` with the error, no sandbox (``sessionActive`` false, ``sessionEndReason``
  ``sandbox_lost``) and the earlier turns' patch; the next message restores the session from the
  last kept turn (``runs/restore.py``). Without kept state the run fails as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

from critique_local.agent.base import Agent
from critique_local.clock import iso, now, now_iso, parse_iso
from critique_local.errors import AgentError, ErrorCode, RunFailure, SandboxError
from critique_local.repos.workrepo import RunRepo
from critique_local.runs import durable
from critique_local.runs.restore import put_tree
from critique_local.runs.states import Phase, RunStatus, SessionEnd
from critique_local.runs.timeline import Timeline
from critique_local.sandboxes.base import Sandbox
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store import sessions as sessions_store
from critique_local.store.runs import RunRow

log = logging.getLogger(__name__)

TURN_FAILURES = frozenset({ErrorCode.MODEL_ERROR, ErrorCode.PATCH_TOO_LARGE})
# the sandbox or the agent process failed (stopped, removed, killed by its limits, unreachable, or
# broken): the sandbox cannot be trusted any more, a restore from the last kept turn can
SESSION_LOSSES = frozenset({ErrorCode.SANDBOX_GONE, ErrorCode.SANDBOX_ERROR, ErrorCode.AGENT_UNREACHABLE,
                            ErrorCode.AGENT_ERROR, ErrorCode.OUT_OF_MEMORY, ErrorCode.PROCESS_LIMIT})


def turn_failure(exc: RunFailure, idx: int) -> bool:
    """Whether ``exc`` ends only turn ``idx`` (a follow-up: a first turn has nothing to keep)."""
    return idx > 1 and exc.code in TURN_FAILURES


def session_lost(code: ErrorCode, idx: int) -> bool:
    """Whether a failure with ``code`` of turn ``idx`` ends only the session (a follow-up whose
    sandbox or agent failed); the caller also checks that the run's state was kept."""
    return idx > 1 and code in SESSION_LOSSES


def start_export(agent: Agent, session_id: str, timeline: Timeline | None = None) -> asyncio.Task[bytes]:
    """Start reading the agent's transcript (its turn has ended) while the turn's other results
    are collected; :func:`save_state` keeps it."""
    async def export() -> bytes:
        with timeline.step("state.export") if timeline is not None else contextlib.nullcontext():
            return await agent.export_session(session_id)
    return asyncio.create_task(export())


async def save_state(s: Services, run: RunRow, agent: Agent, idx: int,
                     export: asyncio.Task[bytes] | None = None) -> None:
    """Export the agent's session (or take ``export``, read since the turn ended:
    :func:`start_export`) and keep it as the run's state after turn ``idx``; a state that
    cannot be kept is a ``warning`` event (the session then cannot be restored)."""
    assert run.agent_session_id is not None
    why = ""
    try:
        if export is not None:
            await asyncio.wait({export})
        if export is not None and not export.cancelled():
            state = export.result()
        else:
            state = await agent.export_session(run.agent_session_id)
        count: int | None = s.harness.message_count(state)
        if not await durable.SessionStates(s).save(run.id, state):
            count, why = None, f"the agent's session is larger than sandbox.max_state_bytes ({len(state)} bytes)"
    except (AgentError, SandboxError) as exc:
        count, why = None, f"the agent's session could not be exported: {exc}"
    await sessions_store.set_turn_messages(s.db, run.id, idx, count)
    if count is None:
        log.warning("run %s turn %d: %s", run.id, idx, why)
        await s.hub.builder(run.id, {"type": "warning", "code": "session_state_not_saved",
                                     "message": f"{why}; if the sandbox goes, a message starts a chained run"})


def expiry(s: Services, run: RunRow) -> str:
    """When an idle session of ``run`` ends: ``sandbox.idle_timeout_s`` from now, never beyond
    the sandbox's ``max_lifetime_s``."""
    sb = s.settings.sandbox
    idle_until = now() + timedelta(seconds=sb.idle_timeout_s)
    if run.sandbox_started_at:
        idle_until = min(idle_until, parse_iso(run.sandbox_started_at) + timedelta(seconds=sb.max_lifetime_s))
    return iso(idle_until)


async def fail_turn(s: Services, run: RunRow, sandbox: Sandbox, idx: int, exc: RunFailure,
                    transition: Any) -> None:
    """Turn ``idx`` failed with ``exc`` (see :func:`turn_failure`): put the workspace back, record
    the turn as failed (the restore point stays the last good turn), and the run goes idle with
    the error."""
    assert run.base_commit is not None
    repo = RunRepo(s.settings.server.data_dir / "runs", run.id)
    previous = await store.turn(s.db, run.id, idx - 1)
    tree = previous.tree if previous is not None and previous.tree else await repo.tree_of(run.base_commit)
    await put_tree(sandbox, repo, tree)
    message = s.redactor.clean(exc.message, run.id)
    await s.hub.builder(run.id, {"type": "error", "code": exc.code, "message": message, "turn": idx})
    # no agent state is recorded for this turn: the restore point stays the last good turn (its
    # tree and its transcript, kept when it ended), so a restore forgets the failed turn as the
    # workspace did
    await store.update_turn(s.db, run.id, idx, status="failed", error_code=exc.code.value, error_message=message,
                            tree=tree, finished_at=now_iso())
    expires = expiry(s, run)
    await s.backend.extend(sandbox.id, max(60.0, (parse_iso(expires) - now()).total_seconds() + 60))
    current = await store.get_run(s.db, run.id)
    assert current is not None
    await transition(s, current, RunStatus.IDLE, Phase.AWAITING_FOLLOW_UP, error_code=exc.code.value,
                     error_message=message, session_expires_at=expires)


async def lose_session(s: Services, run_id: str, idx: int, code: ErrorCode, message: str,
                       transition: Any) -> None:
    """Turn ``idx`` failed with ``code`` (see :func:`session_lost`) and its sandbox is already
    removed: the turn is ``failed`` with its error, the session ends (``sandbox_lost``) and the
    run is ``idle`` with the error and the earlier turns' results, until the next message
    restores it or ``sandbox.idle_timeout_s`` completes it. Needs a restore point
    (``Restorer.restorable``)."""
    point = await sessions_store.restore_point(s.db, run_id)
    run = await store.get_run(s.db, run_id)
    assert point is not None and run is not None
    if run.status is not RunStatus.RUNNING:  # cancelled (or ended) in the meantime
        return
    message = s.redactor.clean(message, run_id)
    log.info("run %s turn %d lost its session: %s: %s", run_id, idx, code, message)
    await s.hub.builder(run_id, {"type": "error", "code": code, "message": message, "turn": idx})
    # the turn's tree is the one a restore puts back: the next turn's changes are counted from it
    await store.update_turn(s.db, run_id, idx, status="failed", error_code=code.value, error_message=message,
                            tree=point[1], finished_at=now_iso())
    await s.hub.builder(run_id, {
        "type": "session.ended", "reason": SessionEnd.SANDBOX_LOST.value,
        "message": f"the turn's sandbox or agent failed; the next message restores the session from turn {point[0]}"})
    expires = iso(now() + timedelta(seconds=s.settings.sandbox.idle_timeout_s))
    await transition(s, run, RunStatus.IDLE, Phase.AWAITING_FOLLOW_UP, error_code=code.value, error_message=message,
                     sandbox_id=None, paused_at=None, session_end_reason=SessionEnd.SANDBOX_LOST.value,
                     session_expires_at=expires)
