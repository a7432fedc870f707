"""The warm pool: sandboxes started ahead of demand, with the agent already healthy.

``pool.size`` sandboxes wait with an empty workspace (more, up to ``pool.max_size``, while
recent demand asks for more); a run takes one and only has to upload its checkout and open a
session. Before a sandbox is offered, its agent does its one-time first-turn work (a throwaway
turn in a session of its own, deleted: :meth:`Agent.warm_up`), so the run's first model call
follows its POST closely. ``pool.repositories`` keeps sandboxes that already hold a
repository's default branch (from the mirror cache): a run on that exact commit uploads
nothing, so its start does not grow with the repository's size.

Pooled sandboxes serve runs on ``models.default`` with network mode ``none`` (the agent's
configuration and environment are fixed when it starts); other runs start cold. Their
gateway token opens nothing until a run claims the sandbox and the token is bound to it. The
pool lives in memory: on shutdown its sandboxes are removed, and after a crash the startup
reconciliation removes them (no run references them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass

from critique_local.agent.base import LaunchConfig, McpServer
from critique_local.envs.builder import Environments, run_start
from critique_local.errors import RunFailure
from critique_local.repos import checkout
from critique_local.sandboxes.base import POOL_PREFIX, Sandbox, SandboxError, SandboxSpec
from critique_local.services import Services
from critique_local.store import environments as env_store
from critique_local.tokens import SANDBOX_TOKEN_PREFIX, new_token

log = logging.getLogger(__name__)
WORKSPACE = "/workspace"
REFILL_CHECK_S = 30.0
KEEP_ALIVE_S = 900.0


def wanted_empty(size: int, max_size: int, demand: int) -> int:
    """Empty-workspace sandboxes to keep: ``size``, grown to the ``demand`` (runs that asked for
    one within the demand window) but never above ``max_size`` (0 or <= size: fixed)."""
    return size if max_size <= size else min(max_size, max(size, demand))


@dataclass(frozen=True)
class WarmSandbox:
    sandbox: Sandbox
    token: str
    password: str
    checkout_key: str | None  # the packed checkout already in /workspace (None: empty)
    env_key: str | None = None  # the kept environment it started from (pool.environments)


def launch_config(services: Services, token: str, secret: str, model_id: str,
                  env: dict[str, str] | None = None, mcp_servers: tuple[McpServer, ...] = ()) -> LaunchConfig:
    """How the agent of a sandbox starts: the gateway with the sandbox's ``token``, ``model_id``
    with its catalog limits, the agent's ``secret``, extra ``env`` and the run's MCP servers."""
    model = services.catalog.get(model_id)
    return LaunchConfig(gateway_url=services.gateway_url, gateway_token=token, model_id=model_id,
                        context_tokens=model.context_tokens if model else 128_000,
                        output_tokens=model.output_tokens if model else 8192, secret=secret, env=env or {},
                        mcp_servers=mcp_servers)


class WarmPool:
    def __init__(self, services: Services, environments: Environments) -> None:
        self.s = services
        self.environments = environments  # pool.environments: sandboxes of kept environments
        self.settings = services.settings.pool
        self._ready: list[WarmSandbox] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._repo_keys: dict[str, str] = {}  # repository -> checkout key of its default branch now
        self._asked: deque[float] = deque(maxlen=64)  # monotonic times runs asked for an empty one
        self.clock = time.monotonic

    @property
    def enabled(self) -> bool:
        return (self.settings.size > 0 or self.settings.max_size > 0 or bool(self.settings.repositories)
                or bool(self.settings.environments))

    def demand(self) -> int:
        """Runs that asked for an empty-workspace sandbox within ``pool.demand_window_s``."""
        since = self.clock() - self.settings.demand_window_s
        return sum(1 for t in self._asked if t >= since)

    @property
    def target(self) -> int:
        """How many empty-workspace sandboxes the pool keeps now."""
        return wanted_empty(self.settings.size, self.settings.max_size, self.demand())

    def eligible(self, model_id: str, network_mode: str) -> bool:
        return self.enabled and model_id == self.s.settings.models.default and network_mode == "none"

    async def take(self, checkout_key: str | None, env_key: str | None = None) -> WarmSandbox | None:
        """A ready sandbox: one already holding ``checkout_key`` if any, else an empty one; of
        the environment ``env_key`` (None: of none). One that stopped while waiting (engine
        restart, removed from outside) is dropped."""
        if env_key is None:
            self._asked.append(self.clock())
            self._wake.set()  # the demand grew: the pool may want more (a miss takes nothing)
        while True:
            ready = [w for w in self._ready if w.env_key == env_key]
            chosen = next((w for w in ready if checkout_key and w.checkout_key == checkout_key), None)
            # one of an environment only on its exact commit (another's tracked files would stay)
            chosen = chosen or next((w for w in ready if w.checkout_key is None and not env_key), None)
            if chosen is None:
                return None
            self._ready.remove(chosen)
            self._wake.set()
            if await self.s.backend.alive(chosen.sandbox.id):
                return chosen
            log.warning("warm pool: sandbox %s stopped while waiting; dropped", chosen.sandbox.id[:12])
            with contextlib.suppress(SandboxError):
                await self.s.backend.destroy(chosen.sandbox.id)

    def wake(self) -> None:
        """Look at what to fill now (e.g. a new environment was kept)."""
        self._wake.set()

    def discard(self, sandbox_id: str) -> None:
        """Forget a waiting sandbox that was removed (the sweep found it stopped); refill."""
        self._ready = [w for w in self._ready if w.sandbox.id != sandbox_id]
        self._wake.set()

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    async def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._keep_filled(), name="warm-pool")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        ready, self._ready = self._ready, []
        for warm in ready:
            with contextlib.suppress(SandboxError):
                await self.s.backend.destroy(warm.sandbox.id)

    async def _keep_filled(self) -> None:
        while True:
            try:
                await self._fill_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("warm pool refill failed; retrying")
                await asyncio.sleep(5)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), REFILL_CHECK_S)

    async def _fill_once(self) -> None:
        """Keep waiting sandboxes alive (remote ones have a lifetime), then top the pool up,
        ``pool.refill_parallel`` sandboxes at a time; empty ones above :attr:`target` go."""
        for warm in list(self._ready):
            try:
                if not await self.s.backend.alive(warm.sandbox.id):
                    raise SandboxError("stopped while waiting")
                await self.s.backend.extend(warm.sandbox.id, KEEP_ALIVE_S)
            except SandboxError:
                self._ready.remove(warm)
                with contextlib.suppress(SandboxError):
                    await self.s.backend.destroy(warm.sandbox.id)
        for full_name, wanted in self.settings.repositories.items():
            prepared = await self._default_checkout(full_name)
            if prepared is None:
                continue
            stale = [w for w in self._ready if w.checkout_key and w.checkout_key.startswith(f"{full_name}\0")
                     and w.checkout_key != prepared.key]
            for warm in stale:
                self._ready.remove(warm)
                with contextlib.suppress(SandboxError):
                    await self.s.backend.destroy(warm.sandbox.id)
            while sum(1 for w in self._ready if w.checkout_key == prepared.key) < wanted:
                self._ready.append(await self._create(prepared))
        empty = [w for w in self._ready if w.checkout_key is None and w.env_key is None]
        for warm in empty[self.target:]:  # demand fell: the oldest stay
            self._ready.remove(warm)
            with contextlib.suppress(SandboxError):
                await self.s.backend.destroy(warm.sandbox.id)
        await self._add_empty(self.target - len(empty))
        for full_name, wanted in self.settings.environments.items():
            await self._fill_environment(full_name, wanted)

    async def _add_empty(self, count: int) -> None:
        """Start ``count`` empty-workspace sandboxes, ``pool.refill_parallel`` at a time; each is
        offered as soon as it is ready. Raises the first failure once all are done."""
        if count <= 0:
            return
        limit = asyncio.Semaphore(self.settings.refill_parallel)

        async def one() -> None:
            async with limit:
                self._ready.append(await self._create(None))

        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _fill_environment(self, full_name: str, wanted: int) -> None:
        """Sandboxes of the kept environment of ``full_name``'s default branch (none while no
        run has built it), holding that branch; those of an older key go."""
        prepared = await self._default_checkout(full_name)
        if prepared is None:
            return
        try:
            env_plan = await self.environments.plan_for(full_name, prepared)
            row = await env_store.get(self.s.db, env_plan.key) if env_plan and env_plan.setup else None
            for warm in [w for w in self._ready if w.env_key and w.checkout_key and
                         w.checkout_key.startswith(f"{full_name}\0") and (row is None or w.env_key != row.key)]:
                self._ready.remove(warm)
                with contextlib.suppress(SandboxError):
                    await self.s.backend.destroy(warm.sandbox.id)
            while row is not None and not row.stale and sum(1 for w in self._ready if w.env_key == row.key) < wanted:
                self._ready.append(await self._create(prepared, row.ref, row.key, keep_checkout=True,
                                                      start=env_plan.start if env_plan else None))
        finally:
            await checkout.discard(prepared)

    async def _default_checkout(self, full_name: str) -> checkout.Checkout | None:
        try:
            return await checkout.prepare(self.s.settings.git, self.s.hosts.resolve(full_name), None,
                                          self.s.settings.server.data_dir, self.s.mirrors)
        except RunFailure as exc:
            log.warning("warm pool: cannot prepare %s: %s", full_name, exc.message)
            return None

    async def _create(self, prepared: checkout.Checkout | None, environment: str | None = None,
                      env_key: str | None = None, keep_checkout: bool = False, start: str | None = None) -> WarmSandbox:
        token, password = new_token(SANDBOX_TOKEN_PREFIX), secrets.token_urlsafe(24)
        sandbox = await self.s.backend.create(SandboxSpec(f"{POOL_PREFIX}{secrets.token_hex(6)}", "", network_mode="none",
                                                          environment=environment))
        try:
            if prepared is not None:
                await sandbox.upload_tar(WORKSPACE, prepared.tar_path)
            if start is not None:  # .critique/start.sh of the environment, as at any sandbox start
                await run_start(self.s, sandbox, start)
            config = launch_config(self.s, token, password, self.s.settings.models.default)
            agent = await self.s.harness.launch(sandbox, config, self.s.settings.sandbox.agent_ready_timeout_s)
            try:
                await agent.warm_up(self.s.settings.models.default, self.s.settings.sandbox.agent_ready_timeout_s,
                                    in_workspace=prepared is not None)
            finally:
                await agent.close()
        except BaseException:
            with contextlib.suppress(SandboxError):
                await asyncio.shield(self.s.backend.destroy(sandbox.id))
            raise
        finally:
            if prepared is not None and not keep_checkout:
                await checkout.discard(prepared)
        return WarmSandbox(sandbox, token, password, prepared.key if prepared else None, env_key)
