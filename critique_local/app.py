"""Building and serving the application.

Two listeners share one set of services: the public API (``server.host:port``) and a
sandbox-facing listener that serves only the model gateway, bound to the address sandboxes
can route to (the internal Docker network's gateway). Sandboxes therefore cannot reach the
Coding Agent API, and clients outside never need to reach the sandbox network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from critique_local.api import meta, runs
from critique_local.api.middleware import authenticated, error_middleware
from critique_local.api.ratelimit import RateLimiter
from critique_local.api.registry import Route
from critique_local.appkeys import CONTROL, DB, SCHEDULER, SERVICES, UPSTREAM, WEBHOOKS
from critique_local.config import Settings
from critique_local.crypto import SecretBox
from critique_local.egress import DecisionHook, EgressProxy, Policy, PolicyLookup
from critique_local.gateway import routes as gateway
from critique_local.gateway.catalog import Catalog
from critique_local.gateway.upstream import Upstream
from critique_local.redact import RedactingFilter, Redactor
from critique_local.repos.hosts import Hosts
from critique_local.repos.mirrors import Mirrors
from critique_local.runs.control import RunControl
from critique_local.runs.events import EventHub
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
    """A stable id for this data dir; labels our sandboxes so two servers never touch each other's."""
    path = settings.server.data_dir / "instance_id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(8))
    return path.read_text().strip()


def _application(services: Services, scheduler: Scheduler, upstream: Upstream, webhooks: Webhooks,
                 routes: list[Route], limiter: RateLimiter | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=services.settings.limits.max_body_bytes)
    app[SERVICES] = services
    app[DB] = services.db
    app[SCHEDULER] = scheduler
    app[CONTROL] = RunControl(scheduler)
    app[UPSTREAM] = upstream
    app[WEBHOOKS] = webhooks
    for route in routes:
        app.router.add_route(route.method, route.path, authenticated(route, DB, limiter))
    return app


def public_app(services: Services, scheduler: Scheduler, upstream: Upstream, webhooks: Webhooks) -> web.Application:
    limits = services.settings.limits
    return _application(services, scheduler, upstream, webhooks, [*runs.ROUTES, *meta.ROUTES, *gateway.ROUTES],
                        RateLimiter(limits.requests_per_minute, limits.burst))


def sandbox_app(services: Services, scheduler: Scheduler, upstream: Upstream, webhooks: Webhooks) -> web.Application:
    return _application(services, scheduler, upstream, webhooks, list(gateway.ROUTES))


def _bound_port(runner: web.AppRunner) -> int:
    if not runner.addresses:
        raise RuntimeError("listener has no socket")
    return int(runner.addresses[0][1])


async def _bind_gateway(runner: web.AppRunner, host: str, settings: Settings) -> int:
    """Bind the sandbox-facing listener. Warm sandboxes keep the gateway URL they were started
    with, so with ``gateway_port = 0`` the port picked first is remembered in the data dir and
    reused after a restart."""
    port = settings.docker.gateway_port
    remembered = settings.server.data_dir / "gateway_port"
    if port == 0 and remembered.exists():
        try:
            await web.TCPSite(runner, host, int(remembered.read_text())).start()
            return _bound_port(runner)
        except (OSError, ValueError):
            log.warning("remembered gateway port is taken; warm sessions from before will chain")
    await web.TCPSite(runner, host, port).start()
    bound = _bound_port(runner)
    if port == 0:
        remembered.write_text(str(bound))
    return bound


def known_secrets(settings: Settings) -> Redactor:
    """A redactor that knows every secret in the configuration, and redacts log lines too."""
    redactor = Redactor()
    for provider in settings.providers.values():
        redactor.add(provider.api_key)
    redactor.add(settings.github.token)
    redactor.add(settings.gitea.token)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter(redactor))
    return redactor


def egress_policy(services: Services) -> PolicyLookup:
    """The egress proxy's view of a run: only a running turn of a restricted run gets out."""

    async def lookup(token: str) -> Policy | None:
        run = await runs_store.run_for_sandbox_token(services.db, token_hash(token))
        if run is None or run.status is not RunStatus.RUNNING:
            return None
        mode, allowlist = network_policy(services.settings, run.request)
        return Policy(run.id, tuple(allowlist)) if mode == "restricted" else None

    return lookup


def egress_event(services: Services) -> DecisionHook:
    async def record(run_id: str, event: dict[str, object]) -> None:
        await services.hub.builder(run_id, event)

    return record


async def serve(settings: Settings, on_ready: Callable[[Services], None] | None = None) -> None:
    # Blocking calls (the Docker SDK, git, files) run in threads; asyncio's default pool has
    # cores + 4 of them, too few for many concurrent runs each waiting on the engine.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=BLOCKING_THREADS,
                                                                        thread_name_prefix="blocking"))
    log.info("paths: %s", settings.paths_summary())
    settings.server.data_dir.mkdir(parents=True, exist_ok=True)
    db = await Database.open(settings.db_path)
    backend = make_backend(settings, instance_id(settings))
    redactor = known_secrets(settings)
    services = Services(settings=settings, db=db, hub=EventHub(db, redactor), backend=backend,
                        catalog=Catalog.from_settings(settings), instance_id=instance_id(settings),
                        box=SecretBox.from_data_dir(settings.server.data_dir), hosts=Hosts(settings, redactor),
                        redactor=redactor, mirrors=Mirrors(settings.server.data_dir / "mirrors", settings.git))
    proxy = EgressProxy(egress_policy(services), egress_event(services), settings.network.private_cidrs)
    upstream = Upstream()
    webhooks = Webhooks(db, services.box, settings.webhooks)
    services.hub.on_status_change = webhooks.enqueue
    scheduler = Scheduler(services)
    pool = WarmPool(services)
    scheduler.executor.pool = pool
    services.warm_count = lambda: pool.ready_count
    runners: list[web.AppRunner] = []
    delivery: asyncio.Task[None] | None = None
    try:
        await backend.start()
        gateway_host = backend.gateway_bind_host()
        if gateway_host is None:  # remote sandboxes reach the public listener at a configured URL
            services.gateway_url = settings.e2b.gateway_url.rstrip("/")
        else:
            runner = web.AppRunner(sandbox_app(services, scheduler, upstream, webhooks), access_log=None)
            await runner.setup()
            runners.append(runner)
            port = await _bind_gateway(runner, gateway_host, settings)
            services.gateway_url = f"http://{gateway_host}:{port}/api/v1"
            proxy_port = await proxy.start(gateway_host, settings.network.proxy_port)
            services.proxy_address = f"{gateway_host}:{proxy_port}"
            await backend.restrict_host([port, proxy_port])
        await scheduler.recover()
        runner = web.AppRunner(public_app(services, scheduler, upstream, webhooks), access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, settings.server.host, settings.server.port).start()
        services.public_url = settings.public_base_url(_bound_port(runner))
        await scheduler.start()
        await pool.start()
        delivery = asyncio.create_task(webhooks.run_forever(), name="webhook-delivery")
        if on_ready:
            on_ready(services)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        if delivery is not None:
            delivery.cancel()
        await scheduler.stop()
        await pool.stop()
        await proxy.stop()
        await webhooks.aclose()
        for runner in reversed(runners):
            await runner.cleanup()
        await upstream.aclose()
        await services.hosts.aclose()
        await backend.close()
        await db.close()
