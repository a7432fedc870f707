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
import os
import secrets
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from critique_local import logfilter
from critique_local.api import meta, runs
from critique_local.api.middleware import authenticated, error_middleware
from critique_local.api.ratelimit import RateLimiter
from critique_local.api.registry import Route
from critique_local.appkeys import CONTROL, DB, LIMITER, SCHEDULER, SERVICES, UPSTREAM, WEBHOOKS
from critique_local.config import Settings
from critique_local.crypto import SecretBox
from critique_local.egress import DecisionHook, EgressProxy, Policy, PolicyLookup
from critique_local.gateway import routes as gateway
from critique_local.gateway.catalog import Catalog
from critique_local.gateway.upstream import Upstream
from critique_local.hoststate import HostState, InstanceClaim, default_root
from critique_local.listeners import ConnectionBudget, ConnectionGuard, GuardedSite, fit_to_open_files
from critique_local.redact import RedactingFilter, Redactor
from critique_local.repos.hosts import Hosts
from critique_local.repos.mirrors import Mirrors
from critique_local.runs.control import RunControl
from critique_local.runs.events import EventHub
from critique_local.runs.network import network_policy
from critique_local.runs.pool import WarmPool
from critique_local.runs.scheduler import Scheduler
from critique_local.runs.states import RunStatus
from critique_local.sandboxes.base import SandboxBackend
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


def _application(services: Services, scheduler: Scheduler, upstream: Upstream, webhooks: Webhooks,
                 routes: list[Route], limiter: RateLimiter, guard: ConnectionGuard | None) -> web.Application:
    middlewares = [guard.middleware] if guard is not None else []
    app = web.Application(middlewares=[*middlewares, error_middleware],
                          client_max_size=services.settings.limits.max_body_bytes)
    app[SERVICES] = services
    app[DB] = services.db
    app[SCHEDULER] = scheduler
    app[CONTROL] = RunControl(scheduler)
    app[UPSTREAM] = upstream
    app[WEBHOOKS] = webhooks
    app[LIMITER] = limiter
    for route in routes:
        app.router.add_route(route.method, route.path, authenticated(route, DB, limiter))
    return app


def public_app(services: Services, scheduler: Scheduler, upstream: Upstream, webhooks: Webhooks,
               guard: ConnectionGuard | None = None) -> web.Application:
    """The public listener's application: the Coding Agent API, meta routes and the gateway,
    every authenticated route under the per-key rate limit."""
    limits = services.settings.limits
    return _application(services, scheduler, upstream, webhooks, [*runs.ROUTES, *meta.ROUTES, *gateway.ROUTES],
                        RateLimiter(limits.requests_per_minute, limits.burst), guard)


def sandbox_app(services: Services, scheduler: Scheduler, upstream: Upstream, webhooks: Webhooks,
                guard: ConnectionGuard | None = None) -> web.Application:
    """The sandbox-facing listener's application: only the gateway, rate-limited per run."""
    limits = services.settings.limits
    app = _application(services, scheduler, upstream, webhooks, list(gateway.ROUTES),
                       RateLimiter(limits.requests_per_minute, limits.burst), guard)
    app.on_response_prepare.append(_one_call_per_connection)
    return app


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


def make_services(settings: Settings, db: Database, backend: SandboxBackend, redactor: Redactor) -> Services:
    """The services one server owns (nothing is started here)."""
    return Services(settings=settings, db=db, hub=EventHub(db, redactor), backend=backend,
                    catalog=Catalog.from_settings(settings), instance_id=instance_id(settings),
                    box=SecretBox.from_data_dir(settings.server.data_dir), hosts=Hosts(settings, redactor),
                    redactor=redactor, mirrors=Mirrors(settings.server.data_dir / "mirrors", settings.git))


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
        if token in services.egress_tokens:  # an environment's setup (envs/builder.py)
            return services.egress_tokens[token]
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
    logfilter.install()  # before redaction, so repeats are recognised by their message template
    claim = await asyncio.to_thread(claim_instance, settings)  # before anything touches the data dir
    log.info("instance %s (claimed in %s)", claim.instance_id, claim.host.root)
    db = await Database.open(settings.db_path)
    backend = make_backend(settings, claim)
    services = make_services(settings, db, backend, known_secrets(settings))
    limits = settings.limits
    public_cap, sandbox_cap = fit_to_open_files(limits.public_connections, limits.sandbox_connections)
    public_guard = ConnectionGuard(ConnectionBudget("public API", public_cap), limits.request_head_timeout_s)
    sandbox_budget = ConnectionBudget("sandbox-facing", sandbox_cap, limits.connections_per_sandbox)
    proxy = EgressProxy(egress_policy(services), egress_event(services), settings.network.private_cidrs,
                        sandbox_budget, limits.request_head_timeout_s)
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
            gateway_guard = ConnectionGuard(sandbox_budget, limits.request_head_timeout_s,
                                            RateLimiter(limits.requests_per_minute, limits.burst))
            runner = runner_for(sandbox_app(services, scheduler, upstream, webhooks, gateway_guard), settings)
            await runner.setup()
            runners.append(runner)
            port = await _bind_gateway(runner, gateway_host, settings, gateway_guard)
            services.gateway_url = f"http://{gateway_host}:{port}/api/v1"
            proxy_port = await proxy.start(gateway_host, settings.network.proxy_port)
            services.proxy_address = f"{gateway_host}:{proxy_port}"
            await backend.restrict_host([port, proxy_port])
        await scheduler.recover()
        runner = runner_for(public_app(services, scheduler, upstream, webhooks, public_guard), settings)
        await runner.setup()
        runners.append(runner)
        await GuardedSite(runner, settings.server.host, settings.server.port, public_guard).start()
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
        claim.release()
