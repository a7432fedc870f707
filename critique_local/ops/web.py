"""The operator's HTTP surface: ``/readyz``, ``/metrics`` (on the public listener only with
``metrics.token``; on a listener of its own with ``metrics.enabled``), and the middleware that
gives every request an id (``X-Request-Id``), tags its logs with it and the run it names, and
records audited run actions."""

from __future__ import annotations

import hmac
import logging
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from pydantic import Field

from critique_local.api.http import respond
from critique_local.api.middleware import bearer
from critique_local.api.registry import Route
from critique_local.api.schemas import ErrorBody, Model
from critique_local.appkeys import POOL, READINESS, SERVICES
from critique_local.errors import ErrorCode, NotFound, Unauthorized
from critique_local.ops import auditing
from critique_local.ops.logs import REQUEST_ID, RUN_ID
from critique_local.ops.metrics import CONTENT_TYPE
from critique_local.runs.pool import WarmPool
from critique_local.services import Services
from critique_local.store.keys import Principal

log = logging.getLogger(__name__)
REQUEST_ID_SHAPE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id (the client's ``X-Request-Id`` when well-formed, else a new one) and run id
    for the logs, the id echoed in the response, and the audit trail of run actions."""
    given = request.headers.get("X-Request-Id", "")
    # a request id needs to be unique, not secret: no getrandom() call per request
    request_id = given if REQUEST_ID_SHAPE.fullmatch(given) else f"{random.getrandbits(64):016x}"
    REQUEST_ID.set(request_id)
    RUN_ID.set(request.match_info.get("id", ""))
    response = await handler(request)
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    services = request.app.get(SERVICES)
    if services is not None:
        try:
            await auditing.audit_request(services, request, response)
        except Exception:
            log.exception("audit: %s %s not recorded", request.method, request.path)
    return response


class ReadinessView(Model):
    ready: bool
    checks: dict[str, str] = Field(description="Each check: ok, skipped (does not apply here) or failed: <why>.")
    error: ErrorBody | None = Field(None, description="When not ready: not_ready, naming what failed.")


async def readyz(request: web.Request, principal: Principal) -> web.StreamResponse:
    """200 when every check is ok or skipped, else 503 naming what failed."""
    checks = await request.app[READINESS].cached()
    failed = [name for name, result in checks.items() if result.startswith("failed")]
    if not failed:
        return respond(ReadinessView(ready=True, checks=checks))
    message = "; ".join(f"{name} {checks[name]}" for name in failed)
    return respond(ReadinessView(ready=False, checks=checks, error=ErrorBody(code=ErrorCode.NOT_READY, message=message)),
                   503)


async def scrape(services: Services, pool: WarmPool) -> web.Response:
    await services.metrics.refresh(services.db, lambda: pool.ready_count)
    return web.Response(body=services.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})


async def public_metrics(request: web.Request, principal: Principal) -> web.StreamResponse:
    """On the public listener only when ``metrics.token`` is set, and only with that token."""
    services = request.app[SERVICES]
    token = services.settings.metrics.token
    if not token:
        raise NotFound(f"no route for {request.path}")
    given = bearer(request) or ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("send Authorization: Bearer <metrics.token>")
    return await scrape(services, request.app[POOL])


ROUTES = [
    Route("GET", "/readyz", readyz, "Readiness: database, sandbox engine and image, gateway listener, egress "
          "proxy (503 names what failed)", None, response=ReadinessView, other_statuses=(503,), tag="meta"),
    Route("GET", "/metrics", public_metrics, "Prometheus metrics (only with metrics.token, as the bearer token)",
          None, raw=("text/plain", "Prometheus text exposition format 0.0.4"), errors=(401, 404), tag="meta"),
]


async def metrics_listener(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: serve ``/metrics`` on ``metrics.host:metrics.port`` when
    ``metrics.enabled`` (no auth: bind it where only the scraper reaches)."""
    services, pool = app[SERVICES], app[POOL]
    cfg = services.settings.metrics
    if not cfg.enabled:
        yield
        return

    async def handle(request: web.Request) -> web.StreamResponse:
        return await scrape(services, pool)

    metrics_app = web.Application()
    metrics_app.router.add_get("/metrics", handle)
    runner = web.AppRunner(metrics_app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.host, cfg.port).start()
        bound = runner.addresses[0][1] if runner.addresses else cfg.port
        log.info("metrics on http://%s:%s/metrics", cfg.host, bound)
        yield
    finally:
        await runner.cleanup()
