"""A model that cannot be reached ends the turn with ``model_unreachable``, quickly and clearly.

Real OpenCode in real containers, against a server whose bound (``models.unreachable_timeout_s``)
is 30 s and whose turn timeout is 900 s: a provider refusing connections (a loopback port bound
and never listened on), a provider answering 503 forever, a provider that accepts calls and never
answers, and the sandbox's traffic to the gateway dropped in the middle of a turn (an iptables
rule for that one container, removed afterwards). Each turn ends with ``model_unreachable``
(never ``turn_timeout``), OpenCode's retries are on the run as ``retry`` events where OpenCode
made any, and the run stays idle and usable.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import SAMPLE_FILES, SHORT_SESSIONS
from tests.helpers import Server, make_repo, wait_for
from tests.upstream_standin import UpstreamStandIn

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
BOUND_S = 30
TURN_TIMEOUT_S = 900
# the turn ends within the bound plus a probe and an abort; far below the turn timeout
DEADLINE_S = 300


@pytest.fixture(scope="module")
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield int(sock.getsockname()[1])
    sock.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamStandIn, closed_port: int) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("unreachable")
    config = base / "config.toml"
    config.write_text(
        f'[providers.down]\nbase_url = "http://127.0.0.1:{closed_port}/v1"\n'
        '[[catalog]]\nid = "acme/refused"\nprovider = "down"\nupstream_id = "anything"\n'
        f'[providers.standin]\nbase_url = "http://127.0.0.1:{upstream.port}/v1"\n'
        '[[catalog]]\nid = "acme/unavailable"\nprovider = "standin"\nupstream_id = "status-503"\n'
        '[[catalog]]\nid = "acme/silent"\nprovider = "standin"\nupstream_id = "hang"\n'
    )
    server = Server(base, extra_env={"CRITIQUE_LOCAL_CONFIG": str(config), **SHORT_SESSIONS,
                                     "CRITIQUE_LOCAL_MODELS_UNREACHABLE_TIMEOUT_S": str(BOUND_S),
                                     "CRITIQUE_LOCAL_SANDBOX_TURN_TIMEOUT_S": str(TURN_TIMEOUT_S)})
    server.repos.mkdir(parents=True)
    make_repo(server.repos, "acme/web", SAMPLE_FILES)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(srv: Server) -> Iterator[httpx.Client]:
    with srv.client(srv.new_key("unreachable")) as client:
        yield client


def events(api: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    return [e["data"] for e in api.get(f"{RUNS}/{run_id}", params={"events": "1"}).json()["run"]["events"]]


def unreachable_turn(api: httpx.Client, model: str, prompt: str = "@say hello") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": prompt, "modelId": model}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "completed", "failed"}, timeout_s=DEADLINE_S)
    assert done["error"] is not None and done["error"]["code"] == "model_unreachable", done["error"]
    # the turn ended, the session did not: the run waits for a follow-up
    assert done["status"] == "idle" and done["sessionActive"] is True
    rows = events(api, run["id"])
    assert [e["code"] for e in rows if e.get("type") == "error" and "code" in e] == ["model_unreachable"]
    return done, rows


def retries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in rows if e.get("type") == "retry"]


def test_a_provider_refusing_connections_ends_the_turn(api: httpx.Client) -> None:
    done, rows = unreachable_turn(api, "acme/refused")
    message = done["error"]["message"]
    assert "'down'" in message and "providers.down.base_url" in message and "ConnectError" in message, message
    assert retries(rows) and all(r["attempt"] >= 1 and r["message"] for r in retries(rows)), rows
    api.post(f"{RUNS}/{done['id']}/messages", json={"endSession": True})


def test_a_provider_answering_503_forever_ends_the_turn(api: httpx.Client) -> None:
    done, rows = unreachable_turn(api, "acme/unavailable")
    message = done["error"]["message"]
    assert "'standin'" in message and "503" in message, message
    assert len(retries(rows)) >= 2, rows  # OpenCode kept retrying, and it shows
    assert any(r.get("retryAt") for r in retries(rows))
    api.post(f"{RUNS}/{done['id']}/messages", json={"endSession": True})


def test_a_provider_that_never_answers_ends_the_turn(api: httpx.Client) -> None:
    done, _ = unreachable_turn(api, "acme/silent")
    message = done["error"]["message"]
    assert "did not answer" in message and "'standin'" in message and "unreachable_timeout_s" in message, message
    api.post(f"{RUNS}/{done['id']}/messages", json={"endSession": True})


def _gateway(srv: Server, container: str) -> tuple[str, str, int]:
    """The container's address, the gateway's address on its network, and the gateway's port."""
    info = json.loads(subprocess.run(["docker", "inspect", container], capture_output=True, text=True,
                                     check=True).stdout)[0]
    network = next(iter(info["NetworkSettings"]["Networks"].values()))
    port = int((srv.data_dir / "gateway_port").read_text())
    return network["IPAddress"], network["Gateway"], port


def test_traffic_to_the_gateway_dropped_mid_turn_ends_the_turn_and_the_session_recovers(
        srv: Server, api: httpx.Client) -> None:
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@bash sleep 10\n@say after the sleep"}).json()["run"]
    deadline = time.monotonic() + 180
    while not any(e.get("type") == "tool" and e.get("tool") == "bash" and e.get("status") == "running"
                  for e in events(api, run["id"])):
        assert time.monotonic() < deadline, "the bash step never started"
        time.sleep(0.2)
    address, gateway, port = _gateway(srv, f"critique-{run['id']}")
    rule = ["INPUT", "-s", f"{address}/32", "-d", f"{gateway}/32", "-p", "tcp", "--dport", str(port),
            "-m", "comment", "--comment", f"critique-test-{run['id']}", "-j", "DROP"]
    subprocess.run(["iptables", "-w", "-I", *rule[:1], "1", *rule[1:]], check=True, capture_output=True)
    try:
        done = wait_for(api, run["id"], {"idle", "completed", "failed"}, timeout_s=DEADLINE_S)
    finally:
        subprocess.run(["iptables", "-w", "-D", *rule], check=True, capture_output=True)
    assert done["error"] is not None and done["error"]["code"] == "model_unreachable", done["error"]
    message = done["error"]["message"]
    assert "cannot reach the model gateway" in message and "docker.host_firewall" in message, message
    assert done["status"] == "idle"
    rows = events(api, run["id"])
    assert retries(rows), rows  # OpenCode's failed connection attempts show on the run
    assert "Unable to connect" in retries(rows)[0]["message"] or "connect" in retries(rows)[0]["message"].lower()

    # the path is back: the next message works in the same session
    resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say back again"})
    assert resp.status_code == 202, resp.text
    again = wait_for(api, run["id"], {"idle", "completed", "failed"}, timeout_s=180)
    assert again["status"] == "idle" and again["error"] is None and again["summary"] == "back again", again
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})

