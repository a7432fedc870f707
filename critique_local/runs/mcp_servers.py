"""``mcpServers`` on a run: remote MCP servers the agent may use, their credentials kept out of
the sandbox.

The agent's OpenCode configuration names each server with a URL on the model gateway
(``<gateway>/mcp-relay/<name>``) and the run's sandbox token, never the server's own URL or
headers. The relay (``gateway/mcp_relay.py``) forwards to the server and adds the headers,
which are stored sealed with the server's key (bound to the run id) and deleted when the run's
session ends, like a BYOK key. What the run's request keeps is ``{name: {url, headerNames}}``.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

from critique_local.agent.config import TOKEN_ENV
from critique_local.api.schemas import CreateRunRequest
from critique_local.config import Settings
from critique_local.crypto import SecretBox
from critique_local.errors import InvalidRequest

RELAY_PATH = "/mcp-relay"  # under the gateway's /api/v1
AGENT_TIMEOUT_MS = 30_000  # OpenCode's per-request MCP timeout (its 5 s default is tight on a loaded host)


class McpServersNeedNetwork(InvalidRequest):
    code = "mcp_servers_need_network"


def check(settings: Settings, req: CreateRunRequest) -> None:
    """Refuse servers a run could not use. Raises :class:`McpServersNeedNetwork` (422) in
    network mode ``none`` and :class:`InvalidRequest` for a URL that is not ``http(s)://host``
    or carries credentials (they belong in ``headers``)."""
    if not req.mcp_servers:
        return
    network = req.safety.network if req.safety else None
    mode = network.mode if network is not None else settings.network.default_mode
    if mode == "none":
        raise McpServersNeedNetwork("mcpServers need safety.network.mode restricted or open (this run may reach "
                                    "nothing outside its sandbox)", field="mcpServers")
    for name, server in req.mcp_servers.items():
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


def stored(req: CreateRunRequest) -> dict[str, dict[str, Any]]:
    """What the run's stored request keeps of ``mcpServers``: no header values."""
    return {name: {"url": s.url, "headerNames": sorted(s.headers)} for name, s in req.mcp_servers.items()}


def _aad(run_id: str) -> str:
    return f"mcp-headers:{run_id}"


def seal_headers(box: SecretBox, run_id: str, req: CreateRunRequest) -> str | None:
    """The headers of every server, sealed for ``run_id`` (None when there are none)."""
    values = {name: {k: v.get_secret_value() for k, v in s.headers.items()} for name, s in req.mcp_servers.items()
              if s.headers}
    return box.seal(json.dumps(values), _aad(run_id)) if values else None


def open_headers(box: SecretBox, run_id: str, sealed: str) -> dict[str, dict[str, str]]:
    """``{server name: {header: value}}`` from :func:`seal_headers`."""
    return dict(json.loads(box.open(sealed, _aad(run_id))))


def opencode_mcp(gateway_url: str, request: dict[str, Any]) -> dict[str, Any]:
    """The ``mcp`` section of the agent's OpenCode config: each server through the relay,
    authenticated with the run's sandbox token (read from the environment, like the model's)."""
    return {name: {"type": "remote", "url": f"{gateway_url}{RELAY_PATH}/{name}", "enabled": True, "oauth": False,
                   "timeout": AGENT_TIMEOUT_MS,
                   "headers": {"Authorization": "Bearer {env:" + TOKEN_ENV + "}"}}
            for name in (request.get("mcpServers") or {})}


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
