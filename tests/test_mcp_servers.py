"""mcpServers without a sandbox: what a create body may hold, what is stored and sealed, the
agent's OpenCode section, and the relay's address rule (private targets refused)."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from critique_local.agent.opencode.config import MCP_TIMEOUT_MS, TOKEN_ENV, opencode_config
from critique_local.api.schemas import CreateRunRequest
from critique_local.appkeys import DB
from critique_local.config import Settings
from critique_local.crypto import SecretBox
from critique_local.errors import InvalidRequest, McpServersNeedNetwork
from critique_local.gateway.mcp_relay import GuardedResolver, target_problem
from critique_local.runs import mcp_servers
from critique_local.runs.spec import RunOrder, RunSpec
from critique_local.runs.states import Phase, RunStatus, SessionEnd
from critique_local.store import runs as store
from tests.conftest import SAMPLE_FILES
from tests.helpers import make_repo
from tests.inprocess import app_client, new_key, settings_for

SECRET = "token-9d1f0c3b7a"
RUNS = "/api/v1/coding-agent/runs"


def body(mode: str | None = "restricted", **server: object) -> CreateRunRequest:
    spec = {"url": "https://mcp.example.com/mcp", "headers": {"Authorization": f"Bearer {SECRET}"}, **server}
    safety = {"network": {"mode": mode}} if mode else None
    return CreateRunRequest.model_validate({"repository": "acme/web", "prompt": "p", "mcpServers": {"docs": spec},
                                            "safety": safety})


def spec(mode: str | None = "restricted", **server: object) -> RunSpec:
    return body(mode, **server).order().spec


def test_servers_need_a_network_and_plain_urls() -> None:
    settings = Settings()
    mcp_servers.check(settings, spec("restricted"))
    mcp_servers.check(settings, spec("open"))
    with pytest.raises(McpServersNeedNetwork) as refused:
        mcp_servers.check(settings, spec("none"))
    assert refused.value.status == 422 and refused.value.field == "mcpServers"
    assert settings.network.default_mode == "none"
    with pytest.raises(McpServersNeedNetwork):
        mcp_servers.check(settings, spec(None))  # the server's default mode decides
    with pytest.raises(InvalidRequest, match="credentials"):
        mcp_servers.check(settings, spec(url="https://user:pw@mcp.example.com/mcp"))
    with pytest.raises(InvalidRequest, match="port"):
        mcp_servers.check(settings, spec(url="https://mcp.example.com:99999/mcp"))


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
    order: RunOrder = body().order()
    stored = order.spec.to_stored()
    assert stored["mcpServers"] == {"docs": {"url": "https://mcp.example.com/mcp", "headerNames": ["Authorization"]}}
    assert SECRET not in json.dumps(stored) and RunSpec.from_stored(stored) == order.spec
    box = SecretBox(os.urandom(32))
    sealed = mcp_servers.seal_headers(box, "run_a", order.mcp_headers)
    assert sealed is not None and SECRET not in sealed
    assert mcp_servers.open_headers(box, "run_a", sealed) == {"docs": {"Authorization": f"Bearer {SECRET}"}}
    with pytest.raises(Exception):  # bound to its run: another run cannot open it  # noqa: B017
        mcp_servers.open_headers(box, "run_b", sealed)
    assert mcp_servers.seal_headers(box, "run_a", body(headers={}).order().mcp_headers) is None

    servers = mcp_servers.relay_servers("http://172.18.0.1:4000/api/v1", order.spec)
    config = json.loads(opencode_config("http://gw/api/v1", "m", 1000, 100, servers))
    assert config["mcp"] == {"docs": {"type": "remote", "url": "http://172.18.0.1:4000/api/v1/mcp-relay/docs",
                                      "enabled": True, "oauth": False, "timeout": MCP_TIMEOUT_MS,
                                      "headers": {"Authorization": "Bearer {env:" + TOKEN_ENV + "}"}}}
    assert "mcp" not in json.loads(opencode_config("http://gw/api/v1", "m", 1000, 100))
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


@pytest.mark.parametrize(("body_extra", "gone"), [
    ({"billing": {"mode": "openrouter", "openRouterApiKey": "sk-or-chain-test"}}, "BYOK key"),
    ({"safety": {"network": {"mode": "restricted", "allowlist": ["mcp.example.com"]}},
      "mcpServers": {"docs": {"url": "https://mcp.example.com/mcp", "headers": {"X-Key": SECRET}}}}, "MCP server headers"),
])
async def test_a_run_whose_secrets_ended_with_its_session_is_not_chained(
        tmp_path: Path, body_extra: dict[str, object], gone: str) -> None:
    """A chained run could not have the key or headers (deleted when the session ended): the
    message is refused with 409 session_expired and no run is created. Without such secrets
    the same message chains (202, a new run)."""
    make_repo(tmp_path / "repos", "acme/web", SAMPLE_FILES)
    async with app_client(settings_for(tmp_path)) as client:
        auth = {"Authorization": f"Bearer {await new_key(client, 'alice')}"}
        db = client.app[DB]

        async def expired_run(extra: dict[str, object]) -> str:
            resp = await client.post(RUNS, json={"repository": "acme/web", "prompt": "@say hi", **extra}, headers=auth)
            assert resp.status == 201, await resp.text()
            run_id = str((await resp.json())["run"]["id"])
            # as the reaper ends an expired session (runs/executor.close_session)
            await store.update_run(db, run_id, status=RunStatus.COMPLETED.value, phase=Phase.FINISHED.value,
                                   session_end_reason=SessionEnd.EXPIRED.value, byok_key=None, mcp_headers=None)
            return run_id

        with_secrets = await expired_run(body_extra)
        resp = await client.post(f"{RUNS}/{with_secrets}/messages", json={"prompt": "more"}, headers=auth)
        assert resp.status == 409, await resp.text()
        error = (await resp.json())["error"]
        assert error["code"] == "session_expired" and gone in error["message"]
        assert len((await (await client.get(RUNS, headers=auth)).json())["data"]) == 1

        plain = await expired_run({})
        resp = await client.post(f"{RUNS}/{plain}/messages", json={"prompt": "more"}, headers=auth)
        assert resp.status == 202, await resp.text()
        assert (await resp.json())["run"]["chainedFromRunId"] == plain
