"""Attacks from inside the sandbox, by a scripted agent with a shell: what it can reach and read,
what restricted networking lets out, and what happens to runaway processes, disks and output.
Every address involved is loopback or belongs to networks and containers these tests create."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.helpers import Server, our_containers, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
REPO_SECRET = "repo-secret-value-5b1f0c9e2d"

PROBE = r'''
import glob, hashlib, json, os, socket, sys
gw, gw_port, other_port, peer, data_dir = sys.argv[1:6]
wanted = set(sys.argv[6:])
def tcp(host, port):
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        return "open"
    except Exception as exc:
        return type(exc).__name__
r = {"gateway": tcp(gw, gw_port), "host_other_port": tcp(gw, other_port), "peer_opencode": tcp(peer, 4096)}
r["docker_sock"] = any(os.path.exists(p) for p in ("/var/run/docker.sock", "/run/docker.sock"))
r["data_dir"] = os.path.exists(data_dir)
try:
    socket.getaddrinfo("example.com", 80)
    r["dns"] = "resolved"
except OSError as exc:
    r["dns"] = type(exc).__name__
values = list(os.environ.values())
for path in glob.glob("/proc/[0-9]*/environ"):
    try:
        values += [item.partition("=")[2] for item in open(path, "rb").read().decode(errors="replace").split("\0")]
    except OSError:
        pass
r["secrets_seen"] = sorted({hashlib.sha256(v.encode()).hexdigest() for v in values} & wanted)
r["uid"] = os.getuid()
r["cap_eff"] = [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")][0]
try:
    open("/usr/bin/planted", "w")
    r["rootfs"] = "writable"
except OSError as exc:
    r["rootfs"] = exc.strerror
standard = {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/sbin/docker-init", "/usr/sbin/docker-init"}
r["host_mounts"] = [l.split()[1] for l in open("/proc/mounts") if l.split()[0].startswith("/dev/") and l.split()[1] not in standard]
print(json.dumps(r))
'''


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def patch_file(api: httpx.Client, run_id: str, name: str) -> str:
    """The content of a file the run created, read back from its patch."""
    patch = api.get(f"{RUNS}/{run_id}", params={"patch": "1"}).json()["run"]["patch"]
    section = patch.split(f"+++ b/{name}\n", 1)[1].split("\ndiff --git", 1)[0]
    return "\n".join(line[1:] for line in section.splitlines() if line.startswith("+"))


def network_gateway() -> str:
    out = subprocess.run(["docker", "network", "inspect", "critique-sandboxes", "--format",
                          "{{(index .IPAM.Config 0).Gateway}}"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def container_ip(run_id: str) -> str:
    out = subprocess.run(["docker", "inspect", f"critique-{run_id}", "--format",
                          "{{(index .NetworkSettings.Networks \"critique-sandboxes\").IPAddress}}"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_a_sandbox_cannot_reach_or_read_what_is_not_its_own(server: Server, alice: str) -> None:
    api = server.client(alice)
    server.cli("secrets", "set", "acme/web", "DEPLOY_TOKEN", input_text=REPO_SECRET)
    peer = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say I am the neighbour"}).json()["run"]
    assert wait_for(api, peer["id"], {"idle", "failed"})["status"] == "idle"
    gateway = network_gateway()
    gateway_port = (server.data_dir / "gateway_port").read_text().strip()
    # a host service on the sandbox network's own gateway address, next to our gateway
    with socket.socket() as listener:
        listener.bind((gateway, 0))
        listener.listen()
        other_port = listener.getsockname()[1]
        args = [gateway, gateway_port, str(other_port), container_ip(peer["id"]), str(server.data_dir),
                sha(UPSTREAM_KEY), sha(REPO_SECRET)]
        prompt = f"@write probe.py\n{PROBE}\n@end\n@bash python3 probe.py {' '.join(args)} > probe.json\n@say probed"
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": prompt}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "idle", done["error"]
    found: dict[str, Any] = json.loads(patch_file(api, run["id"], "probe.json"))
    assert found["gateway"] == "open"  # the model gateway: the one thing it may reach
    assert found["host_other_port"] != "open"  # host firewall: nothing else on the host
    assert found["peer_opencode"] != "open"  # no container-to-container traffic
    assert found["docker_sock"] is False and found["data_dir"] is False
    assert found["dns"] != "resolved"  # no DNS: names go nowhere
    assert found["secrets_seen"] == []  # operator keys and repository secrets are not in any environment
    assert found["uid"] == 1000 and found["cap_eff"] == "0000000000000000"
    assert found["rootfs"] == "Read-only file system" and found["host_mounts"] == []
    for run_id in (peer["id"], run["id"]):
        api.post(f"{RUNS}/{run_id}/messages", json={"endSession": True})


class _Origin(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"origin says {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[int]:
    """An HTTP server on loopback that an allowlisted sandbox may reach through the proxy."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield int(httpd.server_address[1])
    httpd.shutdown()


EGRESS = r'''
import base64, http.client, json, os, sys, urllib.error, urllib.parse, urllib.request
port = int(sys.argv[1])
os.environ.pop("NO_PROXY"), os.environ.pop("no_proxy")  # localhost is the proxy's (allowlisted) origin here
r = {}
def get(url):
    try:
        return urllib.request.urlopen(url, timeout=60).read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code
    except Exception as exc:
        return type(exc).__name__
r["plain"] = get(f"http://localhost:{port}/plain")
r["denied"] = get("http://denied.example/")
r["by_address"] = get(f"http://127.0.0.1:{port}/by-address")
proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
auth = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
conn = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=60)
conn.set_tunnel("localhost", port, headers={"Proxy-Authorization": "Basic " + auth})
conn.request("GET", "/tunnel")
r["tunnel"] = conn.getresponse().read().decode()
conn = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=60)
conn.request("CONNECT", f"localhost:{port}")
r["no_token"] = conn.getresponse().status
print(json.dumps(r))
'''


def test_restricted_mode_lets_out_only_the_allowlist_and_records_every_decision(fresh_server: Server,
                                                                               origin: int) -> None:
    fresh_server.extra_env["CRITIQUE_LOCAL_NETWORK_PRIVATE_CIDRS"] = '["127.0.0.0/8"]'
    fresh_server.start()
    api = fresh_server.client(fresh_server.new_key("egress"))
    prompt = f"@write egress.py\n{EGRESS}\n@end\n@bash python3 egress.py {origin} > egress.json\n@say checked"
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": prompt,
                               "safety": {"network": {"mode": "restricted", "allowlist": ["localhost"]}}}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "idle", done["error"]
    assert done["safety"]["network"] == {"mode": "restricted", "allowlist": ["localhost"]}
    found = json.loads(patch_file(api, run["id"], "egress.json"))
    assert found["plain"] == "origin says /plain"  # absolute-URI HTTP through the proxy
    assert found["tunnel"] == "origin says /tunnel"  # CONNECT tunnel
    assert found["denied"] == 403 and found["by_address"] == 403  # not on the allowlist
    assert found["no_token"] == 407  # the proxy serves only a running restricted run's token
    events = api.get(f"{RUNS}/{run['id']}", params={"events": "1"}).json()["run"]["events"]
    decisions = [(e["data"]["decision"], e["data"]["host"]) for e in events if e["data"].get("type") == "network"]
    assert decisions.count(("allowed", "localhost")) == 2
    assert ("denied", "denied.example") in decisions and ("denied", "127.0.0.1") in decisions


def test_none_mode_gets_no_proxy_and_open_mode_needs_the_operator(server: Server, alice: str) -> None:
    api = server.client(alice)
    refused = api.post(RUNS, json={"repository": "acme/web", "prompt": "x", "safety": {"network": {"mode": "open"}}})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "network_mode_not_allowed"
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@bash env | grep -ci proxy; true\n@say env",
                               "safety": {"network": {"mode": "none"}}}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    events = api.get(f"{RUNS}/{run['id']}", params={"events": "1"}).json()["run"]["events"]
    outputs = [e["data"]["output"] for e in events if e["data"].get("tool") == "bash" and "output" in e["data"]]
    assert done["status"] == "idle" and outputs and outputs[-1].strip() == "0"
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})


# Each runaway ends at its own limit, within seconds on an idle machine; the turn timeout is only
# a backstop, sized so that a loaded 2-core machine still reaches the limit first.
RUNAWAYS = {
    "fork_bomb": ("@bash bomb() { bomb | bomb & }; bomb; sleep 600\n@say done", {"process_limit"}),
    "disk_fill": ("@bash dd if=/dev/zero of=fill.bin bs=1M count=1024; echo dd-exit=$?\n@say filled",
                  {"workspace_full"}),
    # OpenCode keeps tool output under ~/.local: the flood fills that tmpfs, or memory, first
    "output_flood": ("@bash head -c 1000000000 /dev/zero | tr '\\0' x\n@say printed",
                     {"sandbox_storage_full", "out_of_memory"}),
    "huge_patch": ("@bash head -c 300000 /dev/urandom | base64 > big.txt\n@say big", {"patch_too_large"}),
}
BACKSTOP_TURN_TIMEOUT_S = 600


@pytest.mark.timeout(BACKSTOP_TURN_TIMEOUT_S + 600)
def test_runaway_agents_fail_with_clear_errors_while_a_neighbour_completes(fresh_server: Server) -> None:
    fresh_server.extra_env.update({
        "CRITIQUE_LOCAL_SANDBOX_WORKSPACE_MB": "128",
        "CRITIQUE_LOCAL_SANDBOX_TURN_TIMEOUT_S": str(BACKSTOP_TURN_TIMEOUT_S),
        "CRITIQUE_LOCAL_LIMITS_MAX_PATCH_BYTES": "100000",
        "CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS": "6", "CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS_PER_USER": "6",
    })
    fresh_server.start()
    api = fresh_server.client(fresh_server.new_key("mallory"))
    prompts = {name: prompt for name, (prompt, _) in RUNAWAYS.items()}
    prompts["neighbour"] = "@write ok.txt\nfine\n@end\n@say ok"
    ids = {name: api.post(RUNS, json={"repository": "acme/web", "prompt": p}).json()["run"]["id"]
           for name, p in prompts.items()}
    # the neighbour's warm session may expire (idle -> completed) while the runaways still run
    results = {name: wait_for(api, run_id, {"idle", "failed", "completed"}, timeout_s=BACKSTOP_TURN_TIMEOUT_S + 300)
               for name, run_id in ids.items()}
    neighbour = results["neighbour"]
    assert neighbour["status"] in ("idle", "completed") and neighbour["error"] is None, neighbour["error"]
    assert neighbour["changedPaths"] == ["ok.txt"]
    for name, (_, codes) in RUNAWAYS.items():
        assert results[name]["status"] == "failed" and results[name]["error"]["code"] in codes, (name, results[name])
    assert httpx.get(f"{fresh_server.url}/healthz").json()["ok"] is True
    deadline = time.monotonic() + 60
    while any(our_containers(ids[name]) for name in RUNAWAYS):  # removed with the run's teardown
        assert time.monotonic() < deadline, {name: our_containers(ids[name]) for name in RUNAWAYS}
        time.sleep(0.5)


def test_a_turn_over_its_time_limit_fails_with_turn_timeout(fresh_server: Server) -> None:
    fresh_server.extra_env["CRITIQUE_LOCAL_SANDBOX_TURN_TIMEOUT_S"] = "15"
    fresh_server.start()
    api = fresh_server.client(fresh_server.new_key("sleepy"))
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@bash sleep 100000\n@say never"}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "failed" and done["error"]["code"] == "turn_timeout", done["error"]
    assert "sandbox.turn_timeout_s" in done["error"]["message"]
    assert our_containers(run["id"]) == []


def test_open_mode_when_the_operator_allows_it_adds_a_route_out(fresh_server: Server) -> None:
    fresh_server.extra_env["CRITIQUE_LOCAL_NETWORK_ALLOW_OPEN"] = "true"
    fresh_server.start()
    api = fresh_server.client(fresh_server.new_key("opener"))
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@bash ip route 2>/dev/null || cat /proc/net/route\n@say routes",
                               "safety": {"network": {"mode": "open"}}}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "idle", done["error"]
    info = json.loads(subprocess.run(["docker", "inspect", f"critique-{run['id']}"], capture_output=True, text=True,
                                     check=True).stdout)[0]
    assert set(info["NetworkSettings"]["Networks"]) == {"critique-sandboxes", "critique-sandboxes-open"}
    assert info["HostConfig"]["Dns"] in (None, [])  # real DNS in open mode
    default = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say closed"}).json()["run"]
    wait_for(api, default["id"], {"idle", "failed"})
    info = json.loads(subprocess.run(["docker", "inspect", f"critique-{default['id']}"], capture_output=True,
                                     text=True, check=True).stdout)[0]
    assert set(info["NetworkSettings"]["Networks"]) == {"critique-sandboxes"} and info["HostConfig"]["Dns"] == [
        "127.0.0.1"]
