"""Connection limits and request-head deadlines for every listener.

Each listener (the public API, the sandbox-facing model gateway, the egress proxy) takes
connections from a :class:`ConnectionBudget` of its own kind: a cap on open connections in all
and, on the sandbox-facing side, per peer address (one address is one sandbox: sandboxes cannot
choose their source address). A connection over budget is answered ``503`` and closed at once,
so a flood from one sandbox can neither take the file descriptors the public API needs nor
starve other sandboxes.

:class:`GuardedSite` serves an aiohttp application with such a budget and with a deadline for
request heads: a connection must deliver a complete request head within ``head_timeout_s`` of
opening, or of its previous response, or it is closed (slowloris). Bodies are bounded in time
where they are read (``api/http.py``). Both sit in front of aiohttp (an asyncio protocol
wrapper and a middleware); aiohttp's own request handling is left as it is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

from critique_local.api.ratelimit import RateLimiter
from critique_local.errors import ErrorCode, RateLimited

log = logging.getLogger(__name__)
FD_RESERVE = 512  # descriptors kept for everything else: SQLite, the engine, agent clients, git


def fit_to_open_files(public: int, sandbox: int) -> tuple[int, int]:
    """Connection caps that fit the process's open-files limit: the soft limit is raised (up to
    the hard one) to hold ``public`` + 2 x ``sandbox`` connections (a proxied connection holds
    two descriptors) plus :data:`FD_RESERVE`; when it cannot be, both caps are scaled down, with
    a warning, so that running out of descriptors (EMFILE) stays impossible."""
    want = public + 2 * sandbox + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit to %d: %s", target, exc)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return public, sandbox
    scale = max(soft - FD_RESERVE, 64) / (public + 2 * sandbox)
    fitted = max(16, int(public * scale)), max(16, int(sandbox * scale))
    log.warning("the open-files limit (%d) is too low for limits.public_connections = %d and "
                "limits.sandbox_connections = %d; using %d and %d", soft, public, sandbox, *fitted)
    return fitted


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": {"code": ErrorCode.TOO_MANY_CONNECTIONS.value, "message": message}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class ConnectionBudget:
    """Open connections of one kind: at most ``total``, and at most ``per_peer`` from one address
    (0: no per-address cap)."""

    def __init__(self, name: str, total: int, per_peer: int = 0) -> None:
        self.name = name
        self.total = total
        self.per_peer = per_peer
        self.open = 0
        self._by_peer: Counter[str] = Counter()
        self.refused = 0

    def take(self, peer: str) -> str | None:
        """Count a new connection from ``peer``; None, or why it is refused (then not counted)."""
        if self.open >= self.total:
            reason = f"this server's {self.name} listener is at its connection limit ({self.total})"
        elif self.per_peer and self._by_peer[peer] >= self.per_peer:
            reason = f"{peer} already has {self.per_peer} connections open to the {self.name} listener"
        else:
            self.open += 1
            self._by_peer[peer] += 1
            return None
        self.refused += 1
        log.warning("refused a connection from %s: %s", peer, reason)  # rate-limited by logfilter
        return reason

    def release(self, peer: str) -> None:
        self.open -= 1
        self._by_peer[peer] -= 1
        if self._by_peer[peer] <= 0:
            del self._by_peer[peer]

    def from_peer(self, peer: str) -> int:
        return self._by_peer[peer]


def peer_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"


class _Guarded(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection: counts it against the budget and closes it
    when no request is in progress and no complete request head arrived in time."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self.guard = guard
        self.factory = factory
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.busy = 0  # requests being handled (aiohttp handles one at a time per connection)
        self._timer: asyncio.TimerHandle | None = None
        self._head_seen = False  # a complete head arrived since the deadline was set
        self._tail = b""
        self._grace = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.peer = peer_of(transport)
        refused = self.guard.budget.take(self.peer)
        if refused is not None:
            transport.write(_refusal(refused))
            transport.close()
            return
        self.transport = transport
        self.guard.connections[transport] = self
        self.inner = self.factory()
        self.inner.connection_made(transport)
        self.arm()

    def arm(self) -> None:
        self.disarm()
        self._head_seen, self._tail, self._grace = False, b"", False
        self._timer = asyncio.get_running_loop().call_later(self.guard.head_timeout_s, self._expired)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or self.busy or transport.is_closing():
            return
        if transport.get_write_buffer_size():  # still sending the last response: not idle
            self.arm()
            return
        if self._head_seen and not self._grace:  # its handler is about to start: one more period
            self._grace = True
            self._timer = asyncio.get_running_loop().call_later(self.guard.head_timeout_s, self._expired)
            return
        transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self.busy and not self._head_seen:
            window = self._tail + data
            self._head_seen = b"\r\n\r\n" in window or b"\n\n" in window
            self._tail = window[-3:]
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self.inner is None:
            return
        if self.transport is not None:
            self.guard.connections.pop(self.transport, None)
        self.guard.budget.release(self.peer)
        self.inner.connection_lost(exc)
        self.inner = None


class ConnectionGuard:
    """A budget and a head deadline for one aiohttp listener; add :attr:`middleware` to the
    application so the deadline pauses while a request is handled."""

    def __init__(self, budget: ConnectionBudget, head_timeout_s: float, per_peer: RateLimiter | None = None) -> None:
        self.budget = budget
        self.head_timeout_s = head_timeout_s
        self.per_peer = per_peer  # requests per peer address (sandbox-facing: before any token is looked up)
        self.connections: dict[asyncio.BaseTransport, _Guarded] = {}

    def protocol_factory(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, factory)

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        conn = self.connections.get(request.transport) if request.transport is not None else None
        if conn is None:
            return await handler(request)
        if self.per_peer is not None:
            try:
                self.per_peer.check(conn.peer)
            except RateLimited as exc:
                return web.json_response(exc.body(), status=exc.status, headers=exc.headers())
        conn.busy += 1
        conn.disarm()
        try:
            return await handler(request)
        finally:
            conn.busy -= 1
            if not conn.busy:
                conn.arm()  # the next request head (keep-alive) must come in time too


async def prebind(runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard,
                  backlog: int = 1024) -> asyncio.Server:
    """Bind a guarded listener before ``runner`` is set up, without accepting yet (connections
    are refused until a :class:`GuardedSite` made with ``bound=`` starts): the port is known
    early, e.g. for ``server.public_url``. Raises OSError when the address is taken."""

    def handler() -> asyncio.Protocol:
        assert runner.server is not None, "a connection was accepted before the runner was set up"
        return runner.server()

    return await asyncio.get_running_loop().create_server(
        guard.protocol_factory(handler), host, port, backlog=backlog, reuse_address=True, start_serving=False)


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`ConnectionGuard` (on a socket from
    :func:`prebind` when ``bound`` is given)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard,
                 backlog: int = 1024, bound: asyncio.Server | None = None) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard
        self._bound = bound

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        if self._bound is not None:
            self._server = self._bound
            await self._bound.start_serving()
            return
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server), self._host, self._port, backlog=self._backlog, reuse_address=True)
