"""mcpServers without a sandbox: what a create body may hold, what is stored and sealed, the
agent's OpenCode section, and the relay's address rule (private targets refused)."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest
from pydantic import ValidationError

from critique_local.agent.config import TOKEN_ENV, opencode_config
from critique_local.api.schemas import CreateRunRequest
from critique_local.config import Settings
from critique_local.crypto import SecretBox
from critique_local.errors import InvalidRequest
from critique_local.gateway.mcp_relay import GuardedResolver, target_problem
from critique_local.runs import mcp_servers

SECRET = "token-9d1f0c3b7a"


def body(mode: str | None = "restricted", **server: object) -> CreateRunRequest:
    spec = {"url": "https://mcp.example.com/mcp", "headers": {"Authorization": f"Bearer {SECRET}"}, **server}
    safety = {"network": {"mode": mode}} if mode else None
    return CreateRunRequest.model_validate({"repository": "acme/web", "prompt": "p", "mcpServers": {"docs": spec},
                                            "safety": safety})


def test_servers_need_a_network_and_plain_urls() -> None:
    settings = Settings()
    mcp_servers.check(settings, body("restricted"))
    mcp_servers.check(settings, body("open"))
    with pytest.raises(mcp_servers.McpServersNeedNetwork) as refused:
        mcp_servers.check(settings, body("none"))
    assert refused.value.status == 422 and refused.value.field == "mcpServers"
    assert settings.network.default_mode == "none"
    with pytest.raises(mcp_servers.McpServersNeedNetwork):
        mcp_servers.check(settings, body(None))  # the server's default mode decides
    with pytest.raises(InvalidRequest, match="credentials"):
        mcp_servers.check(settings, body(url="https://user:pw@mcp.example.com/mcp"))
    with pytest.raises(InvalidRequest, match="port"):
        mcp_servers.check(settings, body(url="https://mcp.example.com:99999/mcp"))


@pytest.mark.parametrize("server", [
    {"url": "ftp://mcp.example.com/x"},
    {"headers": {"Bad Name": "x"}},
    {"headers": {"X-Key": "a\r\nInjected: yes"}},
    {"headers": {f"X-{i}": "v" for i in range(21)}},
])
def test_bad_servers_are_refused_by_the_schema(server: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        body(**server)


def test_bad_server_names_are_refused() -> None:
    for name in ("", "a b", "../x", "x" * 33):
        with pytest.raises(ValidationError):
            CreateRunRequest.model_validate({"repository": "acme/web", "prompt": "p",
                                             "mcpServers": {name: {"url": "https://mcp.example.com/"}}})


def test_the_stored_request_and_the_agent_config_hold_no_header_value() -> None:
    req = body()
    stored = mcp_servers.stored(req)
    assert stored == {"docs": {"url": "https://mcp.example.com/mcp", "headerNames": ["Authorization"]}}
    box = SecretBox(os.urandom(32))
    sealed = mcp_servers.seal_headers(box, "run_a", req)
    assert sealed is not None and SECRET not in sealed
    assert mcp_servers.open_headers(box, "run_a", sealed) == {"docs": {"Authorization": f"Bearer {SECRET}"}}
    with pytest.raises(Exception):  # bound to its run: another run cannot open it  # noqa: B017
        mcp_servers.open_headers(box, "run_b", sealed)
    assert mcp_servers.seal_headers(box, "run_a", body(headers={})) is None

    section = mcp_servers.opencode_mcp("http://172.18.0.1:4000/api/v1", {"mcpServers": stored})
    assert section == {"docs": {"type": "remote", "url": "http://172.18.0.1:4000/api/v1/mcp-relay/docs",
                                "enabled": True, "oauth": False, "timeout": mcp_servers.AGENT_TIMEOUT_MS,
                                "headers": {"Authorization": "Bearer {env:" + TOKEN_ENV + "}"}}}
    config = json.loads(opencode_config("http://gw/api/v1", "m", 1000, 100, section))
    assert config["mcp"] == section and "mcp" not in json.loads(opencode_config("http://gw/api/v1", "m", 1000, 100))
    assert "mcp.example.com" not in json.dumps(config)  # the agent only knows the relay


def test_the_relay_refuses_private_targets_unless_the_operator_allows_them() -> None:
    for url in ("http://127.0.0.1:8000/mcp", "http://10.1.2.3/mcp", "http://[::1]:80/mcp",
                "http://169.254.169.254/latest"):
        assert target_problem(url, []) is not None, url
    assert target_problem("http://8.8.8.8/mcp", []) is None
    assert target_problem("https://mcp.example.com/mcp", []) is None  # names are checked when resolved
    assert target_problem("http://127.0.0.1:8000/mcp", [ipaddress.ip_network("127.0.0.0/8")]) is None


async def test_names_that_resolve_to_private_addresses_are_refused() -> None:
    resolver = GuardedResolver([])
    with pytest.raises(OSError, match="private or reserved"):
        await resolver.resolve("localhost", 80)
    allowed = GuardedResolver([ipaddress.ip_network("127.0.0.0/8")])
    assert {r["host"] for r in await allowed.resolve("localhost", 80)} == {"127.0.0.1"}
    await resolver.close()
    await allowed.close()
