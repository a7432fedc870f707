"""The application: :func:`create_app` builds it, :func:`serve` runs it.

Two listeners share one set of services: the public API (``server.host:port``, the application
:func:`create_app` returns) and a sandbox-facing listener that serves only the model gateway,
bound to the address sandboxes can route to (the internal Docker network's gateway). Sandboxes
therefore cannot reach the Coding Agent API, and clients outside never need to reach the
sandbox network.

Every long-lived resource is opened and closed by one cleanup context (aiohttp's
``cleanup_ctx``), in this order; shutdown runs them backwards:

    database          the SQLite file (migrated on open)
    services          the objects routes and runs share, built with their dependencies
                      (nothing started): event hub -> webhooks, executor <- warm pool,
                      scheduler <- executor, run control <- scheduler
    sandbox backend   its networks / templates (the Docker engine is first touched here)
    gateway listener  the sandbox-facing application, on its own runner
    egress proxy      for restricted runs; then the host firewall admits exactly these two ports
    warm pool         sandboxes started ahead of demand
    scheduler         recovery after a restart, then the workers that execute runs
    reaper            expiry of idle sessions and the sandbox sweep
    webhook delivery  signed run.status deliveries with retries

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
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from critique_local import logfilter
from critique_local.api.middleware import authenticated, error_middleware
from critique_local.api.ratelimit import RateLimiter
from critique_local.api.registry import Route
from critique_local.api.routes import PUBLIC_ROUTES, SANDBOX_ROUTES
from critique_local.appkeys import (
    CLAIM,
    CONTROL,
    DB,
    ENVIRONMENTS,
    GATEWAY_PORT,
    GUARD,
    LIMITER,
    POOL,
    PUBLIC_URL,
    SANDBOX_BUDGET,
    SCHEDULER,
    SERVED_ROUTES,
    SERVICES,
    SETTINGS,
    STOPPING,
    UPSTREAM,
    WEBHOOKS,
)
from critique_local.config import Settings
from critique_local.crypto import SecretBox
from critique_local.egress import DecisionHook, EgressProxy, Policy, PolicyLookup
from critique_local.envs.builder import Environments
from critique_local.gateway.catalog import Catalog
from critique_local.gateway.upstream import Upstream
from critique_local.hoststate import HostState, InstanceClaim, default_root
from critique_local.listeners import ConnectionBudget, ConnectionGuard, GuardedSite, fit_to_open_files, prebind
from critique_local.redact import RedactingFilter, Redactor
from critique_local.repos.hosts import Hosts
from critique_local.repos.mirrors import Mirrors
from critique_local.runs.control import RunControl
from critique_local.runs.events import EventHub
from critique_local.runs.executor import Executor
from critique_local.runs.network import network_policy
from critique_local.runs.pool import WarmPool
from critique_local.runs.scheduler import Scheduler
from critique_local.runs.states import RunStatus
from critique_local.sandboxes.factory import make_backend
from critique_local.services import Services
from critique_local.store import runs as runs_store
from critique_local.store.db import Database
from critique_local.tokens import token_hash
from critique_local.webhooks import Webhooks

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


def claim_instance(settings: Settings) -> InstanceClaim:
    """Hold this data dir's instance id on this host for the life of the process (blocking).
    Raises InstanceInUse when another running server holds it."""
    host = HostState(default_root(settings.server.host_state_dir))
    return host.claim(instance_id(settings), settings.server.data_dir, wait_s=10)


def _listener_app(settings: Settings, routes: tuple[Route, ...], limiter: RateLimiter,
                  guard: ConnectionGuard) -> web.Application:
    app = web.Application(middlewares=[guard.middleware, error_middleware],
                          client_max_size=settings.limits.max_body_bytes)
    app[SETTINGS] = settings
    app[SERVED_ROUTES] = routes
    app[LIMITER] = limiter
    app[GUARD] = guard
    for route in routes:
        app.router.add_route(route.method, route.path, authenticated(route, DB, limiter))
    return app


def create_app(settings: Settings, claim: InstanceClaim, *, execute_runs: bool = True) -> web.Application:
    """The public listener's application: the Coding Agent API, meta routes and the gateway,
    every authenticated route under the per-key rate limit, with one cleanup context per
    resource (see the module docstring). Nothing is opened until the application starts.
    ``app[PUBLIC_URL]`` defaults to ``server.public_url`` or ``server.host:port``; set it
    before starting when the port is picked at bind time."""
    limits = settings.limits
    public_cap, sandbox_cap = fit_to_open_files(limits.public_connections, limits.sandbox_connections)
    app = _listener_app(settings, PUBLIC_ROUTES, RateLimiter(limits.requests_per_minute, limits.burst),
                        ConnectionGuard(ConnectionBudget("public API", public_cap), limits.request_head_timeout_s))
    app[CLAIM] = claim
    app[PUBLIC_URL] = settings.public_base_url()
    app[SANDBOX_BUDGET] = ConnectionBudget("sandbox-facing", sandbox_cap, limits.connections_per_sandbox)
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(_close_streams)
    app.cleanup_ctx.append(database)
    app.cleanup_ctx.append(services)
    if execute_runs:
        app.cleanup_ctx.extend([sandbox_backend, gateway_listener, egress_proxy, warm_pool, scheduler, reaper])
    app.cleanup_ctx.append(webhook_delivery)
    return app


# ---- cleanup contexts, in start order -------------------------------------------------------

async def database(app: web.Application) -> AsyncIterator[None]:
    db = await Database.open(app[SETTINGS].db_path)
    app[DB] = db
    yield
    await db.close()


async def services(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    db = app[DB]
    redactor, log_filter = known_secrets(settings)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(log_filter)
    box = SecretBox.from_data_dir(settings.server.data_dir)
    webhooks = Webhooks(db, box, settings.webhooks)
    s = Services(settings=settings, db=db, hub=EventHub(db, redactor, on_status_change=webhooks.enqueue),
                 backend=make_backend(settings, app[CLAIM]), catalog=Catalog.from_settings(settings),
                 instance_id=app[CLAIM].instance_id, box=box, hosts=Hosts(settings, redactor), redactor=redactor,
                 mirrors=Mirrors(settings.server.data_dir / "mirrors", settings.git), public_url=app[PUBLIC_URL])
    environments = Environments(s)
    pool = WarmPool(s, environments)
    run_scheduler = Scheduler(s, Executor(s, environments, pool))
    upstream = Upstream()
    app[SERVICES] = s
    app[WEBHOOKS] = webhooks
    app[UPSTREAM] = upstream
    app[POOL] = pool
    app[ENVIRONMENTS] = environments
    app[SCHEDULER] = run_scheduler
    app[CONTROL] = RunControl(run_scheduler)
    try:
        yield
    finally:
        await webhooks.aclose()
        await upstream.aclose()
        await s.hosts.aclose()
        for handler in root.handlers:
            handler.removeFilter(log_filter)


async def sandbox_backend(app: web.Application) -> AsyncIterator[None]:
    backend = app[SERVICES].backend
    try:
        await backend.start()
        yield
    finally:
        await backend.close()


async def gateway_listener(app: web.Application) -> AsyncIterator[None]:
    """The sandbox-facing listener: only the gateway, rate-limited per sandbox address; or, for
    remote sandboxes (no bind address), the configured ``e2b.gateway_url``."""
    s, settings = app[SERVICES], app[SETTINGS]
    host = s.backend.gateway_bind_host()
    if host is None:
        s.gateway_url = settings.e2b.gateway_url.rstrip("/")
        yield
        return
    limits = settings.limits
    guard = ConnectionGuard(app[SANDBOX_BUDGET], limits.request_head_timeout_s,
                            RateLimiter(limits.requests_per_minute, limits.burst))
    gateway = _listener_app(settings, SANDBOX_ROUTES, RateLimiter(limits.requests_per_minute, limits.burst), guard)
    gateway[SERVICES], gateway[DB], gateway[UPSTREAM] = app[SERVICES], app[DB], app[UPSTREAM]
    gateway.on_response_prepare.append(_one_call_per_connection)
    runner = runner_for(gateway, settings)
    await runner.setup()
    try:
        port = await _bind_gateway(runner, host, settings, guard)
        s.gateway_url = f"http://{host}:{port}/api/v1"
        app[GATEWAY_PORT] = port
        yield
    finally:
        await runner.cleanup()


async def egress_proxy(app: web.Application) -> AsyncIterator[None]:
    """The egress proxy on the sandbox-facing address; then the host firewall opens exactly the
    gateway's and the proxy's ports to sandboxes."""
    s, settings = app[SERVICES], app[SETTINGS]
    host = s.backend.gateway_bind_host()
    proxy = EgressProxy(egress_policy(s, app[ENVIRONMENTS].egress_tokens), egress_event(s), settings.network.private_cidrs, app[SANDBOX_BUDGET],
                        settings.limits.request_head_timeout_s)
    try:
        if host is not None:
            proxy_port = await proxy.start(host, settings.network.proxy_port)
            s.proxy_address = f"{host}:{proxy_port}"
            await s.backend.restrict_host([app[GATEWAY_PORT], proxy_port])
        yield
    finally:
        await proxy.stop()


async def warm_pool(app: web.Application) -> AsyncIterator[None]:
    await app[POOL].start()
    try:
        yield
    finally:
        await app[POOL].stop()


async def scheduler(app: web.Application) -> AsyncIterator[None]:
    """Recovery (queued runs resubmitted, idle sessions reattached, interrupted runs failed),
    then the workers."""
    run_scheduler = app[SCHEDULER]
    await run_scheduler.recover()
    await run_scheduler.start()
    try:
        yield
    finally:
        await run_scheduler.stop()


async def reaper(app: web.Application) -> AsyncIterator[None]:
    async with _task(app[SCHEDULER].reap_forever(), "session-reaper"):
        yield


async def webhook_delivery(app: web.Application) -> AsyncIterator[None]:
    async with _task(app[WEBHOOKS].run_forever(), "webhook-delivery"):
        yield


@contextlib.asynccontextmanager
async def _task(work: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Run ``work`` as a task for the life of the block; cancelled at its end."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---- pieces ----------------------------------------------------------------------------------

async def _close_streams(app: web.Application) -> None:
    """Shutting down: open event streams end now (clients resume with Last-Event-ID), rather
    than holding the shutdown until aiohttp's handler deadline."""
    app[STOPPING].set()


async def _one_call_per_connection(request: web.Request, response: web.StreamResponse) -> None:
    """Sandboxes open a new connection for every model call (a local one: it costs well under a
    millisecond). When the path to the gateway breaks mid-turn (a firewall rule gone), OpenCode
    then sees a connection error and retries visibly, instead of waiting minutes for an answer
    on a kept-alive connection whose packets are dropped."""
    response.force_close()


def runner_for(app: web.Application, settings: Settings) -> web.AppRunner:
    # aiohttp's own idle deadline matches ours (it also covers connections that never send)
    return web.AppRunner(app, access_log=None, keepalive_timeout=settings.limits.request_head_timeout_s)


def _bound_port(runner: web.AppRunner) -> int:
    if not runner.addresses:
        raise RuntimeError("listener has no socket")
    return int(runner.addresses[0][1])


async def _bind_gateway(runner: web.AppRunner, host: str, settings: Settings, guard: ConnectionGuard) -> int:
    """Bind the sandbox-facing listener. Warm sandboxes keep the gateway URL they were started
    with, so with ``gateway_port = 0`` the port picked first is remembered in the data dir and
    reused after a restart."""
    port = settings.docker.gateway_port
    remembered = settings.server.data_dir / "gateway_port"
    if port == 0 and remembered.exists():
        try:
            await GuardedSite(runner, host, int(remembered.read_text()), guard).start()
            return _bound_port(runner)
        except (OSError, ValueError):
            log.warning("remembered gateway port is taken; warm sessions from before will chain")
    await GuardedSite(runner, host, port, guard).start()
    bound = _bound_port(runner)
    if port == 0:
        remembered.write_text(str(bound))
    return bound


def known_secrets(settings: Settings) -> tuple[Redactor, RedactingFilter]:
    """A redactor that knows every secret in the configuration, and a log filter using it."""
    redactor = Redactor()
    for provider in settings.providers.values():
        redactor.add(provider.api_key)
    redactor.add(settings.github.token)
    redactor.add(settings.gitea.token)
    return redactor, RedactingFilter(redactor)


def egress_policy(services: Services, setup_tokens: Mapping[str, Policy]) -> PolicyLookup:
    """The egress proxy's view of a run: only a running turn of a restricted run gets out, and
    an environment's running setup (``setup_tokens``: ``Environments.egress_tokens``)."""

    async def lookup(token: str) -> Policy | None:
        if token in setup_tokens:  # an environment's setup (envs/builder.py)
            return setup_tokens[token]
        run = await runs_store.run_for_sandbox_token(services.db, token_hash(token))
        if run is None or run.status is not RunStatus.RUNNING:
            return None
        mode, allowlist = network_policy(services.settings, run.spec.network)
        return Policy(run.id, tuple(allowlist)) if mode == "restricted" else None

    return lookup


def egress_event(services: Services) -> DecisionHook:
    async def record(run_id: str, event: dict[str, object]) -> None:
        await services.hub.builder(run_id, event)

    return record


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
        finally:
            await runner.cleanup()
            bound.close()  # a no-op once the site stopped it; closes it when start-up failed
    finally:
        claim.release()
