"""The egress proxy for ``safety.network.mode: "restricted"``.

Sandboxes live on a network with no route out; in restricted mode their only way out is this
HTTP proxy, run by the server on the sandbox-facing address. It handles ``CONNECT host:port``
(HTTPS and any TLS) and absolute-URI HTTP requests, identifies the run by the per-run token in
``Proxy-Authorization``, and allows a connection only when the host matches the run's
allowlist (exact, or ``*.example.com`` for subdomains) and every address it resolves to is
public (or inside ``network.private_cidrs`` set by the operator), so an allowlisted name
cannot be pointed at internal services. Every decision becomes a run event.

Hand-written rather than a library: it is ~150 lines of asyncio with a per-run policy lookup
and event hook, which general-purpose proxies (proxy.py, mitmproxy) would need plugins and a
second process for.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from critique_local.listeners import ConnectionBudget, peer_of

log = logging.getLogger(__name__)
MAX_HEAD_BYTES = 16_384
HEAD_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Policy:
    run_id: str
    allowlist: tuple[str, ...]


PolicyLookup = Callable[[str], Awaitable[Policy | None]]  # proxy token -> the run's policy
DecisionHook = Callable[[str, dict[str, object]], Awaitable[None]]  # run id, event


def host_allowed(host: str, allowlist: tuple[str, ...], port: int | None = None) -> bool:
    """Whether ``host`` (at ``port``) is on ``allowlist``: an entry is a host, ``*.domain`` (its
    subdomains) or ``host:port`` (that port only)."""
    host = host.lower().rstrip(".")
    for entry in allowlist:
        entry = entry.lower().rstrip(".")
        name, colon, entry_port = entry.rpartition(":")
        if colon and entry_port.isdigit():
            if port is None or int(entry_port) != port:
                continue
            entry = name.rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def blocked_address(address: str, private_ok: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    ip = ipaddress.ip_address(address)
    if any(ip in net for net in private_ok):
        return False
    return not ip.is_global or ip.is_multicast


class EgressProxy:
    """Connections come from the sandbox-facing :class:`ConnectionBudget` (shared with the
    model gateway, so one sandbox cannot hold more than its share of both); a request head must
    arrive within ``head_timeout_s`` and be at most :data:`MAX_HEAD_BYTES`."""

    def __init__(self, policy_for: PolicyLookup, on_decision: DecisionHook, private_cidrs: list[str],
                 budget: ConnectionBudget | None = None, head_timeout_s: float = HEAD_TIMEOUT_S) -> None:
        self.policy_for = policy_for
        self.on_decision = on_decision
        self.private_ok = [ipaddress.ip_network(c, strict=False) for c in private_cidrs]
        self.budget = budget or ConnectionBudget("egress proxy", 1024, 64)
        self.head_timeout_s = head_timeout_s
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._client, host, port, limit=MAX_HEAD_BYTES, backlog=1024)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer.transport)
        refused = self.budget.take(peer)
        if refused is not None:
            with contextlib.suppress(ConnectionError):
                await _reply(writer, 503, refused)
            writer.close()
            return
        try:
            await self._handle(reader, writer)
        except asyncio.LimitOverrunError:
            with contextlib.suppress(ConnectionError):
                await _reply(writer, 431, "request head too large")
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            pass
        except Exception:
            log.exception("egress proxy error")
        finally:
            self.budget.release(peer)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.head_timeout_s)
        if len(head) > MAX_HEAD_BYTES:
            return await _reply(writer, 431, "request head too large")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = [*lines[0].split(" "), "", "", ""][:3]
        headers = [line for line in lines[1:] if line]
        token = _proxy_token(headers)
        policy = await self.policy_for(token) if token else None
        if policy is None:
            return await _reply(writer, 407, "proxy authentication required (this sandbox has no network access)",
                                {"Proxy-Authenticate": 'Basic realm="critique-local"'})
        if method == "CONNECT":
            host, _, port_text = target.rpartition(":")
            rest = b""
        else:
            url = urlsplit(target)
            if url.scheme != "http" or not url.hostname:
                return await _reply(writer, 400, "only CONNECT and absolute http:// URLs are proxied")
            host, port_text = url.hostname, str(url.port or 80)
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            kept = [h for h in headers if not h.lower().startswith(("proxy-authorization:", "proxy-connection:"))]
            rest = ("\r\n".join([f"{method} {path} {version}", *kept]) + "\r\n\r\n").encode("latin-1")
        host = host.strip("[]")
        try:
            port = int(port_text)
            if not 0 < port < 65536:
                raise ValueError
        except ValueError:
            return await _reply(writer, 400, "bad target port")
        upstream = await self._open(policy, host, port)
        if isinstance(upstream, str):
            return await _reply(writer, 403, upstream)
        up_reader, up_writer = upstream
        if method == "CONNECT":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            up_writer.write(rest)
        await writer.drain()
        await _pipe_both(reader, writer, up_reader, up_writer)

    async def _open(self, policy: Policy, host: str, port: int
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | str:
        async def decide(allowed: bool, reason: str, address: str | None = None) -> None:
            event: dict[str, object] = {"type": "network", "decision": "allowed" if allowed else "denied",
                                        "host": host, "port": port, "reason": reason}
            if address:
                event["address"] = address
            await self.on_decision(policy.run_id, event)

        if not host_allowed(host, policy.allowlist, port):
            await decide(False, "host is not in safety.network.allowlist")
            return f"{host} is not in this run's network allowlist"
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            await decide(False, "name does not resolve")
            return f"{host} does not resolve"
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        blocked = [a for a in addresses if blocked_address(a, self.private_ok)]
        if blocked:
            await decide(False, "resolves to a private or reserved address", blocked[0])
            return f"{host} resolves to a private address; refused"
        try:
            up = await asyncio.wait_for(asyncio.open_connection(addresses[0], port), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            await decide(False, "connection failed", addresses[0])
            return f"could not connect to {host}:{port}"
        await decide(True, "allowlisted", addresses[0])
        return up


def _proxy_token(headers: list[str]) -> str | None:
    for line in headers:
        name, _, value = line.partition(":")
        if name.strip().lower() == "proxy-authorization":
            scheme, _, cred = value.strip().partition(" ")
            if scheme.lower() != "basic":
                return None
            try:
                return base64.b64decode(cred).decode().partition(":")[2] or None
            except (ValueError, UnicodeDecodeError):
                return None
    return None


async def _reply(writer: asyncio.StreamWriter, status: int, message: str,
                 headers: dict[str, str] | None = None) -> None:
    reasons = {400: "Bad Request", 403: "Forbidden", 407: "Proxy Authentication Required",
               431: "Request Header Fields Too Large", 503: "Service Unavailable"}
    body = (message + "\n").encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n".encode() + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), IDLE_TIMEOUT_S)
            if not chunk:
                break
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, TimeoutError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


async def _pipe_both(r1: asyncio.StreamReader, w1: asyncio.StreamWriter, r2: asyncio.StreamReader,
                     w2: asyncio.StreamWriter) -> None:
    try:
        await asyncio.gather(_pipe(r1, w2), _pipe(r2, w1))
    finally:
        w2.close()
