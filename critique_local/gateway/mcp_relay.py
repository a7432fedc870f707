"""The MCP relay: a sandbox reaches its run's ``mcpServers`` through the server, which adds the
headers (credentials) the sandbox never sees.

``/api/v1/mcp-relay/{name}`` on the model gateway takes the run's sandbox token (only while a
turn of that run is running, as the gateway does), forwards the MCP Streamable HTTP request
(body and the protocol's headers only) to that server's URL with the stored headers, and
streams the answer back (JSON or Server-Sent Events). Outbound connections follow the egress
proxy's address rule: a name or IP that is private, loopback or reserved is refused unless it
is inside ``network.private_cidrs``, checked on the addresses actually connected to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from critique_local.api.middleware import bearer
from critique_local.api.registry import Route
from critique_local.appkeys import LIMITER, SERVICES
from critique_local.egress import blocked_address
from critique_local.errors import ErrorCode, Forbidden, McpServerUnreachable, NotFound, RequestTimeout, Unauthorized
from critique_local.runs import mcp_servers
from critique_local.runs.states import RunStatus
from critique_local.store import runs as store
from critique_local.tokens import SANDBOX_TOKEN_PREFIX, token_hash

CONNECT_TIMEOUT_S = 10.0
READ_IDLE_TIMEOUT_S = 300.0  # an SSE stream may stay quiet while a long tool runs
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
FORWARDED_REQUEST = ("Content-Type", "Accept", "Mcp-Session-Id", "Mcp-Protocol-Version", "Last-Event-ID")
FORWARDED_RESPONSE = ("Content-Type", "Mcp-Session-Id", "Mcp-Protocol-Version", "Cache-Control")
Networks = list[ipaddress.IPv4Network | ipaddress.IPv6Network]


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default and refuses a name with any private or reserved address
    (outside ``private_ok``), so the connection can only go to addresses that were checked."""

    def __init__(self, private_ok: Networks) -> None:
        self.inner = DefaultResolver()
        self.private_ok = private_ok

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        if any(blocked_address(r["host"], self.private_ok) for r in found):
            raise OSError(f"{host} resolves to a private or reserved address")
        return found

    async def close(self) -> None:
        await self.inner.close()


def target_problem(url: str, private_ok: Networks) -> str | None:
    """Why ``url`` may not be relayed to before any name is resolved (an IP literal is never
    handed to the resolver), or None."""
    host = urlsplit(url).hostname or ""
    ip = mcp_servers.ip_literal(host)
    if ip is not None and blocked_address(str(ip), private_ok):
        return f"{host} is a private or reserved address"
    return None


async def relay(request: web.Request, _: Any) -> web.StreamResponse:
    s = request.app[SERVICES]
    token = bearer(request)
    if not token or not token.startswith(SANDBOX_TOKEN_PREFIX):
        raise Unauthorized("the MCP relay takes a run's sandbox token")
    run = await store.run_for_sandbox_token(s.db, token_hash(token))
    if run is None or run.status is not RunStatus.RUNNING:
        raise Unauthorized("sandbox token is not valid (unknown run, or no turn of it is running)")
    if (limiter := request.app.get(LIMITER)) is not None:
        limiter.check(f"run:{run.id}")
    name = request.match_info["name"]
    server = run.spec.mcp_servers.get(name)
    if server is None:
        raise NotFound(f"this run has no MCP server {name!r}", code=ErrorCode.MCP_SERVER_NOT_FOUND)
    headers: dict[str, str] = {}
    if server.header_names:
        sealed = await store.mcp_headers(s.db, run.id)
        if sealed is None:
            raise Forbidden("this run's MCP server credentials are gone (they are deleted when a session ends)",
                            code=ErrorCode.MCP_CREDENTIALS_GONE)
        headers = mcp_servers.open_headers(s.box, run.id, sealed).get(name, {})
        for value in headers.values():  # if a tool echoes it, events show [REDACTED]
            s.redactor.add(value, run.id)
            s.redactor.add(value.split(" ")[-1], run.id)  # the token of "Bearer <token>"
    private_ok: Networks = [ipaddress.ip_network(c, strict=False) for c in s.settings.network.private_cidrs]
    if problem := target_problem(server.url, private_ok):
        await s.hub.builder(run.id, {"type": "mcp.request", "server": name, "error": problem})
        raise McpServerUnreachable(f"MCP server {name}: {problem}; refused")
    try:
        async with asyncio.timeout(s.settings.limits.request_body_timeout_s):
            body = await request.read()
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive in time") from None
    outbound = {k: request.headers[k] for k in FORWARDED_REQUEST if k in request.headers}
    outbound.update(headers)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_IDLE_TIMEOUT_S)
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(private_ok), force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                     trust_env=False) as session:
        try:
            upstream = await session.request(request.method, server.url, data=body or None, headers=outbound,
                                             allow_redirects=False)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            await s.hub.builder(run.id, {"type": "mcp.request", "server": name, "method": request.method,
                                         "error": reason[:300]})
            raise McpServerUnreachable(f"MCP server {name} is unreachable: {reason[:300]}") from None
        async with upstream:
            await s.hub.builder(run.id, {"type": "mcp.request", "server": name, "method": request.method,
                                         "status": upstream.status})
            response = web.StreamResponse(status=upstream.status)
            for key in FORWARDED_RESPONSE:
                if key in upstream.headers:
                    response.headers[key] = upstream.headers[key]
            if "Content-Encoding" in upstream.headers:
                response.headers["Content-Encoding"] = upstream.headers["Content-Encoding"]
            await response.prepare(request)
            sent = 0
            try:
                async for chunk in upstream.content.iter_any():
                    sent += len(chunk)
                    if sent > MAX_RESPONSE_BYTES:
                        break
                    await response.write(chunk)
            except (aiohttp.ClientError, TimeoutError, ConnectionError):
                pass  # the stream ends here; the client sees it end
            await response.write_eof()
            return response


ROUTES = [  # POST only: the protocol's optional GET stream and DELETE answer 405, which clients accept
    Route("POST", "/api/v1/mcp-relay/{name}", relay,
          "A sandbox's way to its run's mcpServers (sandbox token only; credentials added here)", None,
          raw=("text/event-stream", "The MCP server's answer, relayed"), errors=(401, 403, 404, 502),
          tag="inference"),
]
