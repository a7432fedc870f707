"""Several servers on one host never break each other, and a sandbox learns nothing about the
others from DNS. Real servers, real containers; every address is loopback or belongs to the
networks and containers these tests create."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SAMPLE_FILES, SHORT_SESSIONS
from tests.e2e.test_isolation import patch_file
from tests.helpers import CLI, ROOT, Server, make_repo, wait_for, wait_lifecycle

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
SANDBOX_IMAGE = "critique-local/sandbox:latest"

REACH = r'''
import json, socket, sys
def tcp(host, port):
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        return "open"
    except Exception as exc:
        return type(exc).__name__
pairs = sys.argv[1:]
print(json.dumps({f"{h}:{p}": tcp(h, p) for h, p in zip(pairs[::2], pairs[1::2])}))
'''

DNS_PROBE = r'''
import json, socket, sys
name, address = sys.argv[1:3]
def attempt(fn):
    try:
        return "answered " + repr(fn())
    except Exception as exc:
        return type(exc).__name__
query = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
         + b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01")
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(query, ("127.0.0.11", 53))
    return s.recv(512)[:2]
def tcp():
    s = socket.create_connection(("127.0.0.11", 53), timeout=3)
    s.sendall(len(query).to_bytes(2, "big") + query)
    return s.recv(512)[:2]
print(json.dumps({"name": attempt(lambda: socket.getaddrinfo(name, 80)[0][4][0]),
                  "ptr": attempt(lambda: socket.gethostbyaddr(address)[0]),
                  "udp": attempt(udp), "tcp": attempt(tcp)}))
'''


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def instance_of(server: Server) -> str:
    return (server.data_dir / "instance_id").read_text().strip()


def chain(server: Server) -> list[str]:
    """The server's own firewall rules (empty when it has no chain)."""
    res = subprocess.run(["iptables", "-w", "-S", f"CRIT-{instance_of(server)}"], capture_output=True, text=True)
    return sorted(line for line in res.stdout.splitlines() if line.startswith("-A ")) if res.returncode == 0 else []


def containers(server: Server) -> set[str]:
    return set(sh("docker", "ps", "-aq", "--no-trunc", "--filter",
                  f"label=critique.instance={instance_of(server)}").split())


def gateway_of(network: str) -> str:
    return sh("docker", "network", "inspect", network, "--format", "{{(index .IPAM.Config 0).Gateway}}")


def bridge_of(network: str) -> str:
    return "br-" + sh("docker", "network", "inspect", network, "--format", "{{.Id}}")[:12]


def gateway_port(server: Server) -> int:
    return int((server.data_dir / "gateway_port").read_text())


def run_to_idle(api: httpx.Client, prompt: str) -> dict[str, Any]:
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": prompt}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"}, timeout_s=240)
    assert done["status"] == "idle", done["error"]
    return done


def wait_until(check: Any, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


@pytest.fixture
def three_servers(tmp_path: Path) -> Iterator[tuple[Server, Server, Server]]:
    """A and C share a network, B has its own. Networks are removed afterwards (nobody else
    uses these names)."""
    tag = secrets.token_hex(3)
    x, y = f"crit-hosts-{tag}-x", f"crit-hosts-{tag}-y"
    env = {**SHORT_SESSIONS, "CRITIQUE_LOCAL_SANDBOX_SWEEP_INTERVAL_S": "2", "CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": "600"}
    servers = tuple(Server(tmp_path / name, extra_env={**env, "CRITIQUE_LOCAL_DOCKER_NETWORK": net})
                    for name, net in (("a", x), ("b", y), ("c", x)))
    for srv in servers:
        make_repo(srv.repos, "acme/web", SAMPLE_FILES)
    yield servers  # type: ignore[misc]
    for srv in servers:
        srv.stop()
    for net in (x, y):
        subprocess.run(["docker", "network", "rm", net], capture_output=True)


@pytest.mark.timeout(900)  # four server starts and eight turns, on a loaded 2-core machine
def test_servers_on_one_host_start_run_stop_and_crash_without_breaking_each_other(
        three_servers: tuple[Server, Server, Server]) -> None:
    a, b, c = three_servers
    x, y = a.extra_env["CRITIQUE_LOCAL_DOCKER_NETWORK"], b.extra_env["CRITIQUE_LOCAL_DOCKER_NETWORK"]
    a.start()
    api_a = a.client(a.new_key("ann"))
    before = chain(a)
    assert before and all(f"-i {bridge_of(x)}" in r and f"-d {gateway_of(x)}/32" in r for r in before), before
    assert any(f"--dport {gateway_port(a)}" in r for r in before)

    # B (its own network) and C (A's network) start while a turn of A's runs: the reported fault
    # was B deleting A's rules, after which A's next runs never reached the model
    first = api_a.post(RUNS, json={"repository": "acme/web", "prompt": "@bash echo a > a.txt\n@sleep 2\n@say a"}).json()["run"]
    wait_lifecycle(api_a, first["id"], "agent_running", timeout_s=120)
    starters = [threading.Thread(target=s.start) for s in (b, c)]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    assert b.proc is not None and c.proc is not None
    assert wait_for(api_a, first["id"], {"idle", "failed"}, timeout_s=240)["status"] == "idle"
    assert chain(a) == before  # nobody touched A's rules
    api_b, api_c = b.client(b.new_key("bea")), c.client(c.new_key("cal"))
    rules = {"b": chain(b), "c": chain(c)}
    assert all(f"-i {bridge_of(y)}" in r and f"-d {gateway_of(y)}/32" in r for r in rules["b"])
    assert all(f"-i {bridge_of(x)}" in r and f"-d {gateway_of(x)}/32" in r for r in rules["c"])

    # all three complete runs at once; B's sandbox reaches its own gateway but not A's, on the
    # host's address on A's network (rules name the destination address, not only a port)
    results: dict[str, dict[str, Any]] = {}
    probe = f"@write reach.py\n{REACH}\n@end\n@bash python3 reach.py {gateway_of(y)} {gateway_port(b)} " \
            f"{gateway_of(x)} {gateway_port(a)} > reach.json\n@say probed"
    jobs = {"a": (api_a, "@bash echo a2 > a2.txt\n@say a2"), "b": (api_b, probe), "c": (api_c, "@bash echo c > c.txt\n@say c")}
    workers = [threading.Thread(target=lambda k=k, j=j: results.__setitem__(k, run_to_idle(*j))) for k, j in jobs.items()]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert set(results) == {"a", "b", "c"}
    reach = json.loads(patch_file(api_b, results["b"]["id"], "reach.json"))
    assert reach[f"{gateway_of(y)}:{gateway_port(b)}"] == "open"
    assert reach[f"{gateway_of(x)}:{gateway_port(a)}"] != "open"

    # A dies with SIGKILL in the middle of a turn: B and C keep working, and once A is proven
    # gone (its claim is free) the others remove its rules, but not its sandboxes (A may return)
    doomed = api_a.post(RUNS, json={"repository": "acme/web", "prompt": "@bash echo started\n@sleep 120\n@say late"}).json()["run"]
    wait_lifecycle(api_a, doomed["id"], "agent_running", timeout_s=120)
    left_by_a = containers(a)
    kept_b, kept_c = containers(b), containers(c)
    a.kill()
    wait_until(lambda: chain(a) == [], "the rules of the killed server stayed")
    assert containers(a) == left_by_a
    follow = api_b.post(f"{RUNS}/{results['b']['id']}/messages", json={"prompt": "@bash echo more > more.txt\n@say more"})
    assert follow.status_code == 202
    run_to_idle(api_c, "@bash echo c2 > c2.txt\n@say c2")  # C shares A's network and bridge
    assert wait_for(api_b, results["b"]["id"], {"idle", "failed"}, timeout_s=240)["status"] == "idle"
    assert {"b": chain(b), "c": chain(c)} == rules
    assert kept_b <= containers(b) and kept_c <= containers(c)

    # C stops gracefully: its rules go, the shared network and its jump stay for A
    c.stop()
    assert chain(c) == [] and sh("docker", "network", "inspect", x, "--format", "{{.Name}}") == x
    assert f"-A INPUT -i {bridge_of(x)} -j CRITIQUE-SANDBOX" in sh("iptables", "-w", "-S", "INPUT").splitlines()

    # A restarts: what its previous life left is gone (the killed turn's sandbox; the idle runs'
    # sandboxes are reattached), its rules are back, and B's are untouched
    a.start()
    assert wait_for(api_a, doomed["id"], {"failed"}, timeout_s=60)["error"]["code"] == "server_restarted"
    assert sh("docker", "ps", "-aq", "--filter", f"label=critique.run={doomed['id']}") == ""
    assert containers(a) < left_by_a  # the idle runs' sandboxes were reattached, nothing new
    assert chain(a) and all(f"-d {gateway_of(x)}/32" in r for r in chain(a))
    assert any(f"--dport {gateway_port(a)}" in r for r in chain(a))
    run_to_idle(api_a, "@bash echo back > back.txt\n@say back")
    assert chain(b) == rules["b"] and kept_b <= containers(b)

    # B dies and its data dir is deleted: it can never come back, so A removes its rules and
    # its sandboxes too
    assert containers(b)
    a_now, a_rules = containers(a), chain(a)
    b.kill()
    b_instance = instance_of(b)
    shutil.rmtree(b.data_dir)
    wait_until(lambda: sh("docker", "ps", "-aq", "--filter", f"label=critique.instance={b_instance}") == "",
               "the sandboxes of a server that can never return stayed")
    res = subprocess.run(["iptables", "-w", "-S", f"CRIT-{b_instance}"], capture_output=True)
    assert res.returncode != 0  # its chain is gone
    assert chain(a) == a_rules and containers(a) == a_now


def test_a_second_server_on_the_same_data_dir_is_refused(fresh_server: Server) -> None:
    fresh_server.start()
    res = subprocess.run(["timeout", "120", *CLI, "serve"], env={**fresh_server.env, "CRITIQUE_LOCAL_SERVER_PORT": "0"},
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1 and "is already running on this host" in res.stderr, res.stderr[-2000:]
    assert httpx.get(fresh_server.url + "/healthz").status_code == 200  # the first one is unharmed


def test_an_open_mode_sandbox_reaches_no_host_service_through_its_second_network(fresh_server: Server) -> None:
    fresh_server.extra_env["CRITIQUE_LOCAL_NETWORK_ALLOW_OPEN"] = "true"
    fresh_server.start()
    api = fresh_server.client(fresh_server.new_key("opener"))
    internal, outside = gateway_of("critique-sandboxes"), gateway_of("critique-sandboxes-open")
    with socket.socket() as listener:  # a host service on the open network's gateway address
        listener.bind((outside, 0))
        listener.listen()
        port = listener.getsockname()[1]
        prompt = (f"@write reach.py\n{REACH}\n@end\n@bash python3 reach.py {internal} {gateway_port(fresh_server)} "
                  f"{outside} {port} > reach.json\n@say probed")
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": prompt,
                                   "safety": {"network": {"mode": "open"}}}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"}, timeout_s=240)
    assert done["status"] == "idle", done["error"]
    reach = json.loads(patch_file(api, run["id"], "reach.json"))
    assert reach == {f"{internal}:{gateway_port(fresh_server)}": "open", f"{outside}:{port}": reach[f"{outside}:{port}"]}
    assert reach[f"{outside}:{port}"] != "open"
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})


def test_a_sandbox_cannot_resolve_other_sandboxes(server: Server, alice: str) -> None:
    api = server.client(alice)
    peer = run_to_idle(api, "@say I am the neighbour")
    name = f"critique-{peer['id']}"
    address = sh("docker", "inspect", name, "--format", '{{(index .NetworkSettings.Networks "critique-sandboxes").IPAddress}}')
    # control: the same probe, from a plain container of ours on that network, does resolve
    control = sh("docker", "run", "--rm", "--network", "critique-sandboxes", "--label", "critique.test=dns-control",
                 "--entrypoint", "python3", SANDBOX_IMAGE, "-c", DNS_PROBE, name, address)
    assert json.loads(control)["name"].startswith("answered")
    prompt = f"@write dns.py\n{DNS_PROBE}\n@end\n@bash python3 dns.py {name} {address} > dns.json\n@say probed"
    probed = run_to_idle(api, prompt)
    found = json.loads(patch_file(api, probed["id"], "dns.json"))
    assert not any(v.startswith("answered") for v in found.values()), found
    for run_id in (peer["id"], probed["id"]):
        api.post(f"{RUNS}/{run_id}/messages", json={"endSession": True})

