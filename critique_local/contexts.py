"""The application's cleanup contexts: one per long-lived resource, in start order (aiohttp runs
them backwards on shutdown). ``app.create_app`` lists them; each opens its resource, stores it
under a typed key (``appkeys``) and closes it again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from aiohttp import web

from critique_local.api.middleware import KeyCache, authenticated, error_middleware
from critique_local.api.ratelimit import RateLimiter
from critique_local.api.registry import Route
from critique_local.api.routes import SANDBOX_ROUTES
from critique_local.api.viewcache import VIEW_CACHE, ViewCache
from critique_local.appkeys import (
    CLAIM,
    CONTROL,
    DB,
    EGRESS,
    ENVIRONMENTS,
    GATEWAY_PORT,
    GATEWAY_RUNNER,
    GUARD,
    LIMITER,
    POOL,
    PUBLIC_URL,
    READINESS,
    SANDBOX_BUDGET,
    SCHEDULER,
    SERVED_ROUTES,
    SERVICES,
    SETTINGS,
    UPSTREAM,
    WEBHOOKS,
)
from critique_local.config import Settings
from critique_local.crypto import SecretBox
from critique_local.egress import EgressProxy
from critique_local.envs.builder import Environments
from critique_local.gateway.catalog import Catalog
from critique_local.gateway.upstream import Upstream
from critique_local.listeners import ConnectionGuard, GuardedSite
from critique_local.ops import auditing
from critique_local.ops import web as ops
from critique_local.ops.metrics import Metrics
from critique_local.ops.readiness import Readiness
from critique_local.redact import RedactingFilter, Redactor
from critique_local.repos.hosts import Hosts
from critique_local.repos.mirrors import Mirrors
from critique_local.runs.control import RunControl
from critique_local.runs.egress import egress_event, egress_policy
from critique_local.runs.events import EventHub
from critique_local.runs.executor import Executor
from critique_local.runs.pool import WarmPool
from critique_local.runs.scheduler import Scheduler
from critique_local.sandboxes.factory import make_backend
from critique_local.services import Services
from critique_local.store.db import Database
from critique_local.webhooks import Webhooks

log = logging.getLogger("critique_local")


def listener_app(settings: Settings, routes: tuple[Route, ...], limiter: RateLimiter,
                  guard: ConnectionGuard) -> web.Application:
    app = web.Application(middlewares=[guard.middleware, ops.request_context, error_middleware],
                          client_max_size=settings.limits.max_body_bytes)
    app[SETTINGS] = settings
    app[SERVED_ROUTES] = routes
    app[LIMITER] = limiter
    app[GUARD] = guard
    keys = KeyCache()  # one per listener: a poll costs no key lookup (revocation: within 1 s)
    app[VIEW_CACHE] = ViewCache()  # a poll of an unchanged run costs no database read
    for route in routes:
        handler = authenticated(route, DB, limiter, keys)
        app.router.add_route(route.method, route.path, handler)
        if route.method == "GET" and not route.sse:  # HEAD: the same answer without its body (RFC 9110)
            app.router.add_route("HEAD", route.path, handler)
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
    metrics = Metrics()
    webhooks = Webhooks(db, box, settings.webhooks, on_attempt=metrics.webhook_attempt)
    hub = EventHub(db, redactor, on_status_change=webhooks.enqueue,
                   observers=(metrics.observe, auditing.observer(db)))
    s = Services(settings=settings, db=db, hub=hub, backend=make_backend(settings, app[CLAIM]),
                 catalog=Catalog.from_settings(settings), instance_id=app[CLAIM].instance_id, box=box,
                 hosts=Hosts(settings, redactor), redactor=redactor, metrics=metrics,
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
    app[READINESS] = Readiness(s)
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
    gateway = listener_app(settings, SANDBOX_ROUTES, RateLimiter(limits.requests_per_minute, limits.burst), guard)
    gateway[SERVICES], gateway[DB], gateway[UPSTREAM] = app[SERVICES], app[DB], app[UPSTREAM]
    gateway.on_response_prepare.append(_one_call_per_connection)
    runner = runner_for(gateway, settings)
    await runner.setup()
    try:
        port = await _bind_gateway(runner, host, settings, guard)
        s.gateway_url = f"http://{host}:{port}/api/v1"
        app[GATEWAY_PORT] = port
        app[GATEWAY_RUNNER] = runner
        yield
    finally:
        await runner.cleanup()


async def egress_proxy(app: web.Application) -> AsyncIterator[None]:
    """The egress proxy on the sandbox-facing address; then the host firewall opens exactly the
    gateway's and the proxy's ports to sandboxes."""
    s, settings = app[SERVICES], app[SETTINGS]
    host = s.backend.gateway_bind_host()
    proxy = EgressProxy(egress_policy(s, app[ENVIRONMENTS].egress_tokens), egress_event(s),
                        settings.network.private_cidrs, app[SANDBOX_BUDGET],
                        settings.limits.request_head_timeout_s)
    app[EGRESS] = proxy
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
    redactor.add(settings.gitlab.token)
    return redactor, RedactingFilter(redactor)
