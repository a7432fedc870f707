"""A run's first turn starts here: checkout -> sandbox (a warm one from the pool when it fits)
-> the agent, healthy -> a session. A follow-up turn reattaches instead, from what the first one
persisted (the bindings: sandbox id, the agent's address and its secret sealed at rest, session
id), also after a restart.

Git and agent setup live here, not in the sandbox backends: a backend only knows how to run
commands, upload files and expose a port. The agent is reached only through the harness
contract (``agent/base.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from dataclasses import dataclass

from critique_local.agent.base import WORKSPACE, Agent
from critique_local.clock import ms_between, now_iso
from critique_local.envs.builder import Environments
from critique_local.errors import AgentError, ErrorCode, RunFailure, SandboxError
from critique_local.repos import checkout
from critique_local.runs import envstart
from critique_local.runs.mcp_servers import relay_servers
from critique_local.runs.network import network_policy, proxy_env
from critique_local.runs.pool import WarmPool, launch_config
from critique_local.runs.timeline import Timeline
from critique_local.sandboxes.base import Sandbox, SandboxSpec
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store import secrets as secrets_store
from critique_local.store.runs import RunRow
from critique_local.tokens import SANDBOX_TOKEN_PREFIX, new_token, token_hash

ATTACH_HEALTH_TIMEOUT_S = 30.0


@dataclass
class Job:
    """One scheduler job's state, filled in as provisioning goes: what it took is known here,
    so teardown needs no database read."""

    run: RunRow
    sandbox: Sandbox | None = None
    sandbox_id: str | None = None  # set as soon as a sandbox is the run's (before ``sandbox`` is)
    agent: Agent | None = None


class Provisioner:
    def __init__(self, services: Services, environments: Environments, pool: WarmPool | None = None) -> None:
        self.s = services
        self.pool = pool
        self.envs = environments

    async def provision(self, job: Job) -> None:
        """Checkout, then a sandbox with the checkout uploaded and the agent healthy, then a
        session; fills ``job`` (its run with the bindings written). Raises ``RunError``."""
        run, settings = job.run, self.s.settings
        timeline, after_post_ms = Timeline(), ms_between(run.created_at, now_iso())
        t0 = time.monotonic()
        prepared = await checkout.prepare(settings.git, self.s.hosts.resolve(run.repository_full_name),
                                          run.base_ref, settings.server.data_dir, self.s.mirrors)
        t_checkout = time.monotonic()
        timeline.mark("checkout")
        mode = network_policy(settings, run.spec.network)[0]
        try:
            start = await envstart.origin(self.s, self.envs, self.pool, run, prepared, mode)
            warm, env = start.warm, start.env
            t_env = time.monotonic()
            timeline.mark("origin")
            token = warm.token if warm else new_token(SANDBOX_TOKEN_PREFIX)
            password = warm.password if warm else secrets.token_urlsafe(24)
            self.s.redactor.add(token, run.id)
            claimed: dict[str, str | None] = {
                "base_commit": prepared.base_commit, "base_ref": prepared.base_ref,
                "base_branch": prepared.base_branch, "sandbox_token_hash": token_hash(token),
                "sandbox_token": self.s.box.seal(token, f"{run.id}:token")}
            started = now_iso()
            if warm is not None:  # a taken warm sandbox is the run's (for teardown and the sweep) from here on
                job.sandbox_id = warm.sandbox.id
                claimed.update(sandbox_id=warm.sandbox.id, sandbox_started_at=started)
            await store.update_run(self.s.db, run.id, **claimed)
            if warm is not None:
                sandbox = warm.sandbox
            else:
                sandbox = await self.s.backend.create(SandboxSpec(run.id, run.user_id, network_mode=mode,
                                                                  environment=start.environment))
                job.sandbox_id, started = sandbox.id, now_iso()
                await store.update_run(self.s.db, run.id, sandbox_id=sandbox.id, sandbox_started_at=started)
            job.sandbox = sandbox
            t_sandbox = time.monotonic()
            timeline.mark("sandbox")
            preloaded = warm is not None and warm.checkout_key is not None and warm.checkout_key == prepared.key
            if not preloaded:
                await sandbox.upload_tar(WORKSPACE, prepared.tar_path)
            t_upload = time.monotonic()
            timeline.mark("upload")
        finally:
            await asyncio.shield(checkout.discard(prepared))
        run = dataclasses.replace(run, base_commit=prepared.base_commit, base_ref=prepared.base_ref,
                                  base_branch=prepared.base_branch, sandbox_id=sandbox.id, sandbox_started_at=started)
        await envstart.start_script(self.s, self.envs, start, run, sandbox, self.network_env(run, token))
        await self.s.hub.builder(run.id, {
            "type": "sandbox.ready", "warm": warm is not None, "preloaded": preloaded,
            "checkoutMs": round((t_checkout - t0) * 1000), "sandboxMs": round((t_sandbox - t_env) * 1000),
            "uploadMs": round((t_upload - t_sandbox) * 1000),
            **({**start.event(), "environmentMs": round((t_env - t_checkout) * 1000)} if env else {})})
        timeline.mark("sandbox.ready")
        harness = self.s.harness
        title = run.spec.title or f"critique-local {run.id}"
        if warm is not None:
            job.agent = await harness.attach(sandbox, password)
            # the sandbox's new name is for operators only: given while the session opens
            _, session_id = await asyncio.gather(self.s.backend.adopt(sandbox.id, run.id),
                                                 job.agent.open_session(title))
        else:
            config = launch_config(self.s, token, password, run.model_id, self.network_env(run, token),
                                   relay_servers(self.s.gateway_url, run.spec))
            job.agent = await harness.launch(sandbox, config, settings.sandbox.agent_ready_timeout_s)
            session_id = await job.agent.open_session(title)
        timeline.mark("session")
        ready, sealed = now_iso(), self.s.box.seal(password, run.id)
        await store.update_run(self.s.db, run.id, agent_session_id=session_id, agent_ready_at=ready,
                               agent_url=job.agent.address, agent_secret=sealed)
        await self.s.hub.builder(run.id, {"type": "agent.ready", "sessionId": session_id,
                                          "sinceCreatedMs": ms_between(run.created_at, ready)})
        job.run = dataclasses.replace(run, agent_session_id=session_id, agent_ready_at=ready,
                                      agent_url=job.agent.address, agent_secret=sealed)
        timeline.mark("agent.ready")
        timeline.log(f"run {run.id} start, {after_post_ms} ms after its POST,")

    def network_env(self, run: RunRow, token: str) -> dict[str, str]:
        if network_policy(self.s.settings, run.spec.network)[0] != "restricted" or not self.s.proxy_address:
            return {}
        return proxy_env(self.s.proxy_address, token, self.s.proxy_address.rpartition(":")[0])

    async def command_env(self, run: RunRow) -> dict[str, str]:
        """Environment of validation commands: the repository's secrets, and the egress proxy
        settings of a restricted run."""
        env = await secrets_store.env_for(self.s.db, self.s.box, run.repository_full_name)
        for value in env.values():
            self.s.redactor.add(value, run.id)
        sealed = await store.sandbox_token(self.s.db, run.id)
        if sealed:
            env.update(self.network_env(run, self.s.box.open(sealed, f"{run.id}:token")))
        return env

    async def remember_secrets(self, run: RunRow) -> None:
        """Secrets of this run that output must never show: its BYOK key and repository secrets."""
        sealed = await store.byok_key(self.s.db, run.id)
        if sealed:
            self.s.redactor.add(self.s.box.open(sealed, run.id), run.id)
        for value in (await secrets_store.env_for(self.s.db, self.s.box, run.repository_full_name)).values():
            self.s.redactor.add(value, run.id)
        token = await store.sandbox_token(self.s.db, run.id)
        if token:
            self.s.redactor.add(self.s.box.open(token, f"{run.id}:token"), run.id)

    async def attach(self, run: RunRow) -> tuple[Sandbox, Agent] | None:
        """The live sandbox and a healthy agent of an idle run, or None when either is gone."""
        if not (run.sandbox_id and run.agent_url and run.agent_secret):
            return None
        try:
            sandbox = await self.s.backend.connect(run.sandbox_id)
        except SandboxError:
            return None
        if sandbox is None:
            return None
        agent = await self.s.harness.attach(sandbox, self.s.box.open(run.agent_secret, run.id))
        try:
            # generous: on a loaded machine a live agent can be slow to answer, and declaring a
            # warm session lost throws its state away (the next message would chain)
            await agent.wait_healthy(ATTACH_HEALTH_TIMEOUT_S)
        except AgentError:
            await agent.close()
            return None
        return sandbox, agent

    async def reattach(self, job: Job) -> None:
        attached = await self.attach(job.run)
        if attached is None:
            raise RunFailure(ErrorCode.SANDBOX_GONE, "the run's sandbox or its agent is no longer available")
        job.sandbox, job.agent = attached
        job.sandbox_id = job.sandbox.id
