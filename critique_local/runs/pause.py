"""Pausing idle sessions (``sandbox.pause_after_s``) and resuming them at the next message.

Two ways, by what the backend can do:

- **In place** (E2B): the backend pauses the whole sandbox, memory and processes kept at no
  cost, and resumes it when the next message connects to it; the agent answers as before.
- **The agent stopped** (Docker: ``docker pause`` keeps the memory, and a checkpoint needs CRIU):
  the agent's processes end (``Harness.stop``) and the sandbox stays, with all of its files (the
  workspace with its untracked and ignored files, the home with the agent's own storage of its
  sessions, ``/tmp``) and the processes the agent did not start (``.critique/start.sh``
  services). The memory the agent held is freed. The next message relaunches the agent in the
  same sandbox on the same session (``Harness.launch``: no checkout, no transcript import, no
  setup), then the turn runs.

A paused run keeps ``sandbox_id`` and has ``paused_at``; ``agent_url`` is NULL while its agent is
stopped. When the sandbox is gone, or the agent cannot be relaunched or lost the session, the
caller restores the session from its durable state (``runs/restore.py``). A sandbox that cannot
be kept (it stopped) is removed at pause when that state exists.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from critique_local.clock import now_iso
from critique_local.errors import AgentError, SandboxError
from critique_local.runs.mcp_servers import relay_servers
from critique_local.runs.pool import launch_config
from critique_local.runs.provision import Job, Provisioner
from critique_local.sandboxes.base import Sandbox
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store.runs import RunRow

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 30.0


def ms(start: float, end: float) -> int:
    return round((end - start) * 1000)


class Pauser:
    """Pauses and resumes the sessions of idle runs (see the module docstring). ``restorable``
    tells whether a run's session could be rebuilt from its durable state."""

    def __init__(self, services: Services, provisioner: Provisioner,
                 restorable: Callable[[str], Awaitable[bool]]) -> None:
        self.s = services
        self.provisioner = provisioner
        self.restorable = restorable

    async def pause(self, run: RunRow) -> RunRow:
        """Pause an idle run's session (a ``session.paused`` event says how); the run unchanged
        when it has no sandbox, is paused already, or its sandbox stopped and no state was kept.
        Raises SandboxError when the backend's own pause fails."""
        if not run.sandbox_id or run.paused_at:
            return run
        t0 = time.monotonic()
        if await self.s.backend.pause(run.sandbox_id):
            await store.update_run(self.s.db, run.id, paused_at=now_iso())
            await self.s.hub.builder(run.id, {"type": "session.paused", "inPlace": True, "agentStopped": False})
            return await self._reload(run.id)
        try:
            sandbox = await self.s.backend.connect(run.sandbox_id)
        except SandboxError as exc:  # the engine does not answer: the next round tries again
            log.warning("run %s: not paused now: %s", run.id, exc)
            return run
        event: dict[str, object]
        if sandbox is not None:
            # recorded first: from here the next message relaunches the agent, also when the
            # server dies while it stops (a relaunch next to a survivor finds that one answering)
            await store.update_run(self.s.db, run.id, paused_at=now_iso(), agent_url=None)
            try:
                await self.s.harness.stop(sandbox, STOP_TIMEOUT_S)
            except SandboxError as exc:
                log.warning("run %s: stopping its agent for a pause failed (%s); its memory is not all freed",
                            run.id, exc)
            event = {"inPlace": True, "agentStopped": True, "stopMs": ms(t0, time.monotonic())}
        elif await self.restorable(run.id):
            await self._destroy(run.sandbox_id)
            await store.update_run(self.s.db, run.id, paused_at=now_iso(), sandbox_id=None)
            event = {"inPlace": False, "agentStopped": False}  # nothing kept: the next message restores
        else:
            return run
        await self.s.hub.builder(run.id, {"type": "session.paused", **event})
        return await self._reload(run.id)

    async def _reload(self, run_id: str) -> RunRow:
        run = await store.get_run(self.s.db, run_id)
        assert run is not None
        return run

    async def resume(self, job: Job) -> bool:
        """The paused session of ``job.run`` (holding its sandbox) back: fills ``job`` and clears
        ``paused_at``, with a ``session.resumed`` event. False when the sandbox is gone or the
        agent cannot be had back (the caller then restores)."""
        if job.run.agent_url is None:
            return await self._relaunch(job)
        return await self._resume_in_place(job)

    async def _resume_in_place(self, job: Job) -> bool:
        run = job.run
        assert run.sandbox_id is not None
        t0 = time.monotonic()
        try:
            sandbox = await self.s.backend.resume(run.sandbox_id)
        except SandboxError:
            sandbox = None
        if sandbox is None:
            return False
        attached = await self.provisioner.attach(dataclasses.replace(run, paused_at=None))
        if attached is None:
            return False
        job.sandbox, job.agent = attached
        job.sandbox_id = sandbox.id
        await store.update_run(self.s.db, run.id, paused_at=None)
        job.run = dataclasses.replace(run, paused_at=None)
        await self.s.hub.builder(run.id, {"type": "session.resumed", "relaunched": False,
                                          "totalMs": ms(t0, time.monotonic())})
        return True

    async def _relaunch(self, job: Job) -> bool:
        """The agent started again in the kept sandbox, with the configuration a new one of the
        run gets (the run's gateway token, secret, network and MCP servers), on its session."""
        run, s = job.run, self.s
        assert run.sandbox_id is not None
        t0 = time.monotonic()
        sandbox = await self._sandbox(run.sandbox_id)
        sealed = await store.sandbox_token(s.db, run.id)
        if sandbox is None or not sealed or not run.agent_secret or not run.agent_session_id:
            return False
        token, password = s.box.open(sealed, f"{run.id}:token"), s.box.open(run.agent_secret, run.id)
        config = launch_config(s, token, password, run.model_id, self.provisioner.network_env(run, token),
                               relay_servers(s.gateway_url, run.spec))
        try:
            agent = await s.harness.launch(sandbox, config, s.settings.sandbox.agent_ready_timeout_s)
        except (AgentError, SandboxError) as exc:
            log.warning("run %s: the agent could not be started again in its paused sandbox (%s); restoring",
                        run.id, exc)
            return False
        t_agent = time.monotonic()
        try:
            found = await agent.has_session(run.agent_session_id)
        except AgentError:
            found = False
        if not found:
            log.warning("run %s: the relaunched agent does not have session %s; restoring", run.id,
                        run.agent_session_id)
            await agent.close()
            return False
        job.sandbox, job.agent, job.sandbox_id = sandbox, agent, sandbox.id
        await store.update_run(s.db, run.id, paused_at=None, agent_url=agent.address)
        job.run = dataclasses.replace(run, paused_at=None, agent_url=agent.address)
        t_end = time.monotonic()
        await s.hub.builder(run.id, {"type": "session.resumed", "relaunched": True, "agentMs": ms(t0, t_agent),
                                     "sessionMs": ms(t_agent, t_end), "totalMs": ms(t0, t_end)})
        return True

    async def _sandbox(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox, running; None when it is gone or stopped (or the engine cannot tell)."""
        try:
            return await self.s.backend.connect(sandbox_id)
        except SandboxError:
            return None

    async def _destroy(self, sandbox_id: str) -> None:
        try:
            await self.s.backend.destroy(sandbox_id)
        except SandboxError:
            pass  # the sweep removes what is left
