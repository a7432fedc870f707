"""The application: :func:`create_app` builds it, :func:`serve` runs it.

Two listeners share one set of services: the public API (``server.host:port``, the application
:func:`create_app` returns) and a sandbox-facing listener that serves only the model gateway,
bound to the address sandboxes can route to (the internal Docker network's gateway). Sandboxes
therefore cannot reach the Coding Agent API, and clients outside never need to reach the
sandbox network.

Every long-lived resource is opened and closed by one cleanup context (aiohttp's
``cleanup_ctx``, in ``contexts.py``), in this order; shutdown runs them backwards:

    database          the SQLite file (migrated on open)
    services          the objects routes and runs share, built with their dependencies
                      (nothing started): event hub -> webhooks, warm pool <- environments,
                      executor <- environments + warm pool, scheduler <- executor,
                      run control <- scheduler
    mcp sessions      the MCP endpoint's session manager (``api/mcp.py``)
    sandbox backend   its networks / templates (the Docker engine is first touched here)
    gateway listener  the sandbox-facing application, on its own runner
    egress proxy      for restricted runs and environment setups; then the host firewall admits
                      exactly these two ports
    warm pool         sandboxes started ahead of demand
    scheduler         recovery after a restart, then the workers that execute runs
    reaper            expiry of idle sessions and the sandbox sweep
    webhook delivery  signed run.status deliveries with retries
    metrics listener  ``/metrics`` on a port of its own (``metrics.enabled``; ops/web.py)

Stopping (:func:`serve`, on SIGINT/SIGTERM) first drains the scheduler while the API still
answers (ops/shutdown.py), then shuts the application down.

``create_app(settings, claim, execute_runs=False)`` leaves out the five contexts that execute
runs (backend through reaper): the API then accepts, lists, cancels and streams runs, which
stay queued, and never touches the sandbox backend (the fast in-process tests use this).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from critique_local import logfilter
from critique_local.api.mcp import lifespan as mcp_sessions
from critique_local.api.ratelimit import RateLimiter
from critique_local.api.routes import PUBLIC_ROUTES
from critique_local.appkeys import CLAIM, GUARD, PUBLIC_URL, SANDBOX_BUDGET, SCHEDULER, SERVICES, STOPPING
from critique_local.config import Settings
from critique_local.contexts import (
    database,
    egress_proxy,
    gateway_listener,
    listener_app,
    reaper,
    runner_for,
    sandbox_backend,
    scheduler,
    services,
    warm_pool,
    webhook_delivery,
)
from critique_local.datalock import LOCK_NAME, DataDirLock
from critique_local.hoststate import HostState, InstanceClaim, InstanceInUse, default_root
from critique_local.listeners import ConnectionBudget, ConnectionGuard, GuardedSite, fit_to_open_files, prebind
from critique_local.ops import shutdown
from critique_local.ops import web as ops
from critique_local.services import Services

__all__ = ["claim_instance", "create_app", "instance_id", "runner_for", "serve"]

log = logging.getLogger("critique_local")
BLOCKING_THREADS = 64


def instance_id(settings: Settings) -> str:
    """A stable id for this data dir (16 hex digits); labels our sandboxes and names our firewall
    chain so two servers never touch each other's. Created atomically: two servers starting on a
    new data dir at once get the same id (and then only one of them can claim it)."""
    path = settings.server.data_dir / "instance_id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".instance_id.{os.getpid()}")
        draft.write_text(secrets.token_hex(8))
        with contextlib.suppress(FileExistsError):
            os.link(draft, path)
        draft.unlink()
    return path.read_text().strip()


def claim_instance(settings: Settings, wait_s: float = 10) -> InstanceClaim:
    """Hold this data dir's instance id on this host, and the data dir's own lock (datalock.py),
    for the life of the process (blocking, at most ``wait_s`` seconds). Raises InstanceInUse
    when another running server (or a restore, or a gc) holds either: a server started with
    another ``server.host_state_dir`` is refused by the data dir's lock."""
    host = HostState(default_root(settings.server.host_state_dir))
    claim = host.claim(instance_id(settings), settings.server.data_dir, wait_s=wait_s)
    lock = DataDirLock.take(settings.server.data_dir, wait_s)
    if lock is None:
        claim.release()
        raise InstanceInUse(claim.instance_id, {"data_dir": str(settings.server.data_dir),
                                                "note": f"another process holds {settings.server.data_dir / LOCK_NAME}"})
    claim.also_release(lock.release)
    return claim


def create_app(settings: Settings, claim: InstanceClaim, *, execute_runs: bool = True) -> web.Application:
    """The public listener's application: the Coding Agent API, meta routes and the gateway,
    every authenticated route under the per-key rate limit, with one cleanup context per
    resource (see the module docstring). Nothing is opened until the application starts.
    ``app[PUBLIC_URL]`` defaults to ``server.public_url`` or ``server.host:port``; set it
    before starting when the port is picked at bind time."""
    limits = settings.limits
    public_cap, sandbox_cap = fit_to_open_files(limits.public_connections, limits.sandbox_connections)
    app = listener_app(settings, PUBLIC_ROUTES, RateLimiter(limits.requests_per_minute, limits.burst),
                        ConnectionGuard(ConnectionBudget("public API", public_cap), limits.request_head_timeout_s))
    app[CLAIM] = claim
    app[PUBLIC_URL] = settings.public_base_url()
    app[SANDBOX_BUDGET] = ConnectionBudget("sandbox-facing", sandbox_cap, limits.connections_per_sandbox)
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(_close_streams)
    app.cleanup_ctx.extend([database, services, mcp_sessions])
    if execute_runs:
        app.cleanup_ctx.extend([sandbox_backend, gateway_listener, egress_proxy, warm_pool, scheduler, reaper])
    app.cleanup_ctx.extend([webhook_delivery, ops.metrics_listener])
    return app


async def _close_streams(app: web.Application) -> None:
    """Shutting down: open event streams end now (clients resume with Last-Event-ID), rather
    than holding the shutdown until aiohttp's handler deadline."""
    app[STOPPING].set()


# ---- serving ---------------------------------------------------------------------------------

async def serve(settings: Settings, on_ready: Callable[[Services], None] | None = None) -> None:
    """Claim this data dir's instance, run :func:`create_app` until SIGINT/SIGTERM, release.
    Raises InstanceInUse (another server holds the data dir), OSError (the port is taken) and
    whatever a resource raises while starting (e.g. SandboxError: no Docker engine)."""
    # Blocking calls (the Docker SDK, git, files) run in threads; asyncio's default pool has
    # cores + 4 of them, too few for many concurrent runs each waiting on the engine.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=BLOCKING_THREADS,
                                                                        thread_name_prefix="blocking"))
    log.info("paths: %s", settings.paths_summary())
    settings.server.data_dir.mkdir(parents=True, exist_ok=True)
    logfilter.install()  # before redaction, so repeats are recognised by their message template
    claim = await asyncio.to_thread(claim_instance, settings)  # before anything touches the data dir
    log.info("instance %s (claimed in %s)", claim.instance_id, claim.host.root)
    try:
        app = create_app(settings, claim)
        runner = runner_for(app, settings)
        # bound (not yet accepting) first, so runs know the public URL from the start
        bound = await prebind(runner, settings.server.host, settings.server.port, app[GUARD])
        app[PUBLIC_URL] = settings.public_base_url(int(bound.sockets[0].getsockname()[1]))
        try:
            await runner.setup()
            await GuardedSite(runner, settings.server.host, settings.server.port, app[GUARD], bound=bound).start()
            if on_ready:
                on_ready(app[SERVICES])
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            log.info("shutting down")
            await shutdown.drain(app[SCHEDULER])  # the API answers while running turns finish (ops/shutdown.py)
        finally:
            await runner.cleanup()
            bound.close()  # a no-op once the site stopped it; closes it when start-up failed
    finally:
        claim.release()
