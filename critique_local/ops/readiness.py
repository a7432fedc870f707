"""``/readyz``: whether this server can take work now. Each check is bounded in time; a check
that does not apply to the configured backend (E2B has no local engine, gateway listener or
egress proxy) reports ``skipped``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from urllib.parse import urlsplit

from critique_local.services import Services
from critique_local.store import opsstats

CHECK_TIMEOUT_S = 3.0
CACHE_S = 1.0  # /readyz is unauthenticated: at most one round of checks per second, shared
CHECKS = ("database", "sandbox_engine", "sandbox_image", "gateway_listener", "egress_proxy")


class Skipped(Exception):
    """The check does not apply here."""


async def _connect(address: str) -> None:
    host, _, port = address.rpartition(":")
    _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    writer.close()
    await writer.wait_closed()


async def _engine(s: Services, image: bool) -> None:
    client = getattr(s.backend, "client", None)  # the Docker backend's engine client
    if client is None:
        raise Skipped
    if image:
        await asyncio.to_thread(client.images.get, s.settings.sandbox.image)
    else:
        await asyncio.to_thread(client.ping)


async def _gateway(s: Services) -> None:
    if s.backend.gateway_bind_host() is None:
        raise Skipped  # sandboxes reach the gateway through the public listener (this one)
    url = urlsplit(s.gateway_url)
    if not url.hostname or not url.port:
        raise RuntimeError("the gateway listener is not bound")
    await _connect(f"{url.hostname}:{url.port}")


async def _proxy(s: Services) -> None:
    if s.backend.gateway_bind_host() is None:
        raise Skipped
    if not s.proxy_address:
        raise RuntimeError("the egress proxy is not listening")
    await _connect(s.proxy_address)


async def _bounded(check: Awaitable[None]) -> str:
    try:
        await asyncio.wait_for(check, CHECK_TIMEOUT_S)
    except Skipped:
        return "skipped"
    except TimeoutError:
        return f"failed: no answer within {CHECK_TIMEOUT_S:.0f} s"
    except Exception as exc:
        return f"failed: {exc.__class__.__name__}: {str(exc)[:300]}"
    return "ok"


async def check(s: Services) -> dict[str, str]:
    """Every check's result: ``ok``, ``skipped`` or ``failed: <why>``, in :data:`CHECKS` order."""
    results = await asyncio.gather(_bounded(opsstats.ping(s.db)), _bounded(_engine(s, image=False)),
                                   _bounded(_engine(s, image=True)), _bounded(_gateway(s)), _bounded(_proxy(s)))
    return dict(zip(CHECKS, results, strict=True))


class Readiness:
    """:func:`check` for one server, run at most once per :data:`CACHE_S` however many callers
    ask (they share the round in flight; one caller hanging up does not cancel it for the others)."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._round: tuple[float, asyncio.Future[dict[str, str]]] | None = None

    async def cached(self) -> dict[str, str]:
        """Every check's result, as :func:`check` gives them."""
        now = time.monotonic()
        if self._round is None or now - self._round[0] >= CACHE_S:
            self._round = (now, asyncio.ensure_future(check(self._services)))
        return await asyncio.shield(self._round[1])
