"""``mcpServers`` on a run: remote MCP servers the agent may use, their credentials kept out of
the sandbox.

The agent is given each server as a URL on the model gateway (``<gateway>/mcp-relay/<name>``,
see :func:`relay_servers`), reached with the run's sandbox token, never the server's own URL or
headers. The relay (``gateway/mcp_relay.py``) forwards to the server and adds the headers,
which are stored sealed with the server's key (bound to the run id) and deleted when the run's
session ends, like a BYOK key. What the run's request keeps is ``{name: {url, headerNames}}``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from urllib.parse import urlsplit

from critique_local.agent.base import McpServer
from critique_local.config import Settings
from critique_local.crypto import SecretBox
from critique_local.errors import InvalidRequest, McpServersNeedNetwork
from critique_local.runs.spec import RunSpec

RELAY_PATH = "/mcp-relay"  # under the gateway's /api/v1


def check(settings: Settings, spec: RunSpec) -> None:
    """Refuse servers a run could not use. Raises :class:`McpServersNeedNetwork` (422) in
    network mode ``none`` and :class:`InvalidRequest` for a URL that is not ``http(s)://host``
    or carries credentials (they belong in ``headers``)."""
    if not spec.mcp_servers:
        return
    mode = spec.network.mode if spec.network is not None else settings.network.default_mode
    if mode == "none":
        raise McpServersNeedNetwork("mcpServers need safety.network.mode restricted or open (this run may reach "
                                    "nothing outside its sandbox)", field="mcpServers")
    for name, server in spec.mcp_servers.items():
        field = f"mcpServers.{name}.url"
        try:
            url = urlsplit(server.url)
            url.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise InvalidRequest("not a valid URL (host or port)", field=field) from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise InvalidRequest("must be an http:// or https:// URL with a host", field=field)
        if url.username or url.password:
            raise InvalidRequest("must not carry credentials: put them in headers", field=field)


def _aad(run_id: str) -> str:
    return f"mcp-headers:{run_id}"


def seal_headers(box: SecretBox, run_id: str, headers: Mapping[str, Mapping[str, str]]) -> str | None:
    """``{server name: {header: value}}`` sealed for ``run_id`` (None when there are none)."""
    values = {name: dict(h) for name, h in headers.items() if h}
    return box.seal(json.dumps(values), _aad(run_id)) if values else None


def open_headers(box: SecretBox, run_id: str, sealed: str) -> dict[str, dict[str, str]]:
    """``{server name: {header: value}}`` from :func:`seal_headers`."""
    return dict(json.loads(box.open(sealed, _aad(run_id))))


def relay_servers(gateway_url: str, spec: RunSpec) -> tuple[McpServer, ...]:
    """The run's servers as its agent is given them: each at the relay, by name."""
    return tuple(McpServer(name, f"{gateway_url}{RELAY_PATH}/{name}") for name in spec.mcp_servers)


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
