"""Environments (issue 16), end to end with real containers and the real OpenCode: a Python
repository whose tests import a package that is not in the sandbox image. Its setup.sh fetches
pip and installs the package from a package index this test serves on 127.0.0.2 (a wheel the
test builds), through the egress proxy in restricted mode (the index's host:port allowlisted,
its address listed in network.private_cidrs). Later runs start from the kept environment."""

from __future__ import annotations

import ensurepip
import hashlib
import http.server
import io
import json
import subprocess
import threading
import zipfile
from base64 import urlsafe_b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2b_standin import SNAPSHOT_REPOSITORY
from tests.e2e.test_e2b_backend import calls as e2b_calls
from tests.e2e.test_e2b_backend import e2b_server  # noqa: F401 - a fixture
from tests.helpers import Server, free_port, git, make_repo, our_containers, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
INDEX_HOST = "127.0.0.2"  # not in the sandbox's NO_PROXY (127.0.0.1, localhost): pip goes through the proxy
SECRET = "repo-token-5b1e9c27d04a"
PROMPT = ("@bash echo agent-env=${REPO_TOKEN:-unset}; echo procs=$(grep -l REPO_TOKEN /proc/[0-9]*/environ "
          "2>/dev/null | wc -l); python3 -c 'import greetlib; print(greetlib.greet())'\n@say checked")


def wheel(name: str, version: str, source: str) -> bytes:
    """A pure-Python wheel holding ``name/__init__.py``."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": source.encode(),
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},sha256={urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{dist}/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, data in {**files, f"{dist}/RECORD": record.encode()}.items():
            zf.writestr(path, data)
    return buf.getvalue()


class PackageIndex:
    """A PEP 503 simple index on INDEX_HOST: greetlib 1.0, and pip's own wheel at /pip.whl."""

    def __init__(self) -> None:
        pip_wheel = next((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl")).read_bytes()
        greet = wheel("greetlib", "1.0", "def greet():\n    return 'hello from greetlib'\n")
        self.files = {"/pip.whl": pip_wheel, "/files/greetlib-1.0-py3-none-any.whl": greet,
                      "/simple/greetlib/": b'<a href="/files/greetlib-1.0-py3-none-any.whl">greetlib-1.0</a>'}
        self.hits: list[str] = []
        files, hits = self.files, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = "/" + self.path.split("://", 1)[-1].split("/", 1)[-1] if "://" in self.path else self.path
                hits.append(path)
                body = files.get(path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                if path.startswith("/simple/"):
                    self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer((INDEX_HOST, self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{INDEX_HOST}:{self.port}"


SETUP_NEEDS_TOKEN = 'test -n "${REPO_TOKEN:-}" || { echo "setup has no REPO_TOKEN"; exit 3; }\n'


def setup_script(index: PackageIndex) -> str:
    return (
        "set -eu\n"
        f"{SETUP_NEEDS_TOKEN}"
        "echo installing greetlib\n"
        f"python3 -c \"import urllib.request; urllib.request.urlretrieve('{index.url}/pip.whl', '/tmp/pip.whl')\"\n"
        "python3 /tmp/pip.whl/pip install --user --break-system-packages --no-cache-dir --disable-pip-version-check "
        "-r requirements.txt\n"
        "mkdir -p build-output && echo generated > build-output/marker.txt\n")


@pytest.fixture(scope="module")
def index() -> Iterator[PackageIndex]:
    idx = PackageIndex()
    yield idx
    idx.httpd.shutdown()


@pytest.fixture(scope="module")
def env_server(tmp_path_factory: pytest.TempPathFactory, index: PackageIndex) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("envs")
    config = base / "config.toml"
    config.write_text(
        f'[network]\nprivate_cidrs = ["{INDEX_HOST}/32"]\n'
        f'[environments]\nallowlist = ["{INDEX_HOST}:{index.port}"]\n'
        '[environments.repositories."acme/envslow"]\nsetup_timeout_s = 3\n')
    # OpenCode's start is bounded generously: several sandboxes start at once on a shared 2-core machine
    srv = Server(base, extra_env={"CRITIQUE_LOCAL_CONFIG": str(config), "CRITIQUE_LOCAL_SANDBOX_AGENT_READY_TIMEOUT_S": "300"})
    srv.repos.mkdir(parents=True)
    make_repo(srv.repos, "acme/envpy", {
        "requirements.txt": f"--index-url {index.url}/simple\ngreetlib==1.0\n",
        ".gitignore": "build-output/\n",
        ".critique/setup.sh": setup_script(index),
        ".critique/test": 'test -n "$REPO_TOKEN" && test -f build-output/marker.txt && python3 -m pytest -q\n',
        "test_greet.py": "from greetlib import greet\n\n\ndef test_greet():\n    assert greet() == 'hello from greetlib'\n",
    })
    make_repo(srv.repos, "acme/envkeep", {
        "requirements.txt": f"--index-url {index.url}/simple\ngreetlib==1.0\n",
        ".gitignore": "build-output/\n",
        ".critique/setup.sh": setup_script(index).replace(SETUP_NEEDS_TOKEN, ""),
        ".critique/start.sh": "echo started >> /tmp/start-marker\n",  # /tmp is not kept: it ran in this sandbox
        ".critique/test": "test -f build-output/marker.txt && python3 -m pytest -q\n",
        "test_greet.py": "from greetlib import greet\n\n\ndef test_greet():\n    assert greet() == 'hello from greetlib'\n",
    })
    make_repo(srv.repos, "acme/envfail", {"README.md": "x\n", ".critique/setup.sh":
                                          'echo "resolving deps"\necho "fatal: no such package" >&2\nexit 7\n'})
    make_repo(srv.repos, "acme/envslow", {"README.md": "x\n", ".critique/setup.sh": "echo begun\nsleep 300\n"})
    srv.start()
    srv.cli("secrets", "set", "acme/envpy", "REPO_TOKEN", input_text=SECRET)
    yield srv
    srv.stop()
    instance = (srv.data_dir / "instance_id").read_text().strip()
    images = subprocess.run(["docker", "images", "-q", "--filter", "label=critique.env=1", "--filter",
                             f"label=critique.instance={instance}"], capture_output=True, text=True).stdout.split()
    if images:
        subprocess.run(["docker", "rmi", "-f", *set(images)], capture_output=True)


def commit(server: Server, full_name: str, files: dict[str, str]) -> None:
    owner, name = full_name.split("/")
    work = server.repos / ".work" / owner / name
    for path, text in files.items():
        (work / path).write_text(text)
    git("add", "-A", cwd=work)
    git("commit", "-qm", "change", cwd=work)
    git("push", "-q", str(server.repos / owner / f"{name}.git"), "main", cwd=work)


def events(api: Any, run_id: str) -> list[dict[str, Any]]:
    view = api.get(f"{RUNS}/{run_id}", params={"events": "1"}).json()["run"]
    return [e["data"] for e in view["events"] if e["event"] == "builder.event"]


def of_type(evs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in evs if e.get("type") == kind]


def envs(server: Server) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.cli("envs", "list", "--json").stdout.splitlines()]


def run_once(api: Any, repo: str, prompt: str = PROMPT) -> dict[str, Any]:
    run = api.post(RUNS, json={"repository": repo, "prompt": prompt, "validationMode": "tests"}).json()["run"]
    return run


def finish(api: Any, run_id: str) -> dict[str, Any]:
    done = wait_for(api, run_id, {"idle", "failed", "completed"}, timeout_s=600)
    if done["status"] == "idle":
        api.post(f"{RUNS}/{run_id}/messages", json={"endSession": True})
    return done


def test_setup_once_then_reuse_on_a_newer_commit_then_a_new_lockfile_builds_anew(
        env_server: Server, index: PackageIndex) -> None:
    api = env_server.client(env_server.new_key("envs"))
    first = finish(api, run_once(api, "acme/envpy")["id"])
    assert first["status"] == "idle", first["error"]
    assert first["validation"]["status"] == "passed", first["validation"]
    evs = events(api, first["id"])
    assert of_type(evs, "setup.started") and of_type(evs, "setup.finished")[0]["exitCode"] == 0
    assert "installing greetlib" in "".join(e["output"] for e in of_type(evs, "setup.output"))
    ready = of_type(evs, "sandbox.ready")[0]
    assert ready["environment"]["status"] == "built"
    assert first["environment"]["reused"] is False and first["environment"]["buildMs"] > 0
    key = first["environment"]["key"]
    agent_view = api.get(f"{RUNS}/{first['id']}", params={"events": "1"}).text
    assert "agent-env=unset" in agent_view and "procs=0" in agent_view  # not in the agent's processes
    assert "hello from greetlib" in agent_view and SECRET not in agent_view
    assert any(h.startswith("/files/greetlib") for h in index.hits)  # pip fetched it through the proxy
    network = [e for e in evs if e.get("type") == "network" and e.get("decision") == "allowed"]
    assert network and all(e["host"] == "127.0.0.2" and e["port"] == index.port for e in network)

    # the kept image: neither its configuration nor its files hold the secret
    (kept,) = [e for e in envs(env_server) if e["key"] == key]
    assert kept["repository"] == "acme/envpy" and kept["sizeBytes"] > 0 and kept["buildMs"] > 0
    inspect = subprocess.run(["docker", "image", "inspect", kept["ref"]], capture_output=True, text=True,
                             check=True).stdout
    history = subprocess.run(["docker", "history", "--no-trunc", kept["ref"]], capture_output=True, text=True,
                             check=True).stdout
    assert SECRET not in inspect and "REPO_TOKEN" not in inspect and SECRET not in history
    scan = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "bash", kept["ref"], "-c",
         f'tar -xOf /opt/critique-env/env.tar | grep -c -a -F greetlib; tar -xOf /opt/critique-env/env.tar | '
         f'grep -c -a -F "{SECRET}"; grep -rlaF "{SECRET}" /opt /home /workspace /etc /root /tmp /var 2>/dev/null | wc -l; '
         'tar -xOf /opt/critique-env/env.tar | grep -c -a -F crs_'],
        capture_output=True, text=True, timeout=300).stdout.split()
    # the scan sees the package, never the secret nor setup's proxy token (crs_...)
    assert int(scan[0]) > 0 and scan[1:] == ["0", "0", "0"], scan

    # run 2, a newer commit with the same lockfile: no setup, passes
    commit(env_server, "acme/envpy", {"NOTES.md": "a newer commit\n"})
    second = finish(api, run_once(api, "acme/envpy")["id"])
    assert second["status"] == "idle", second["error"]
    assert second["validation"]["status"] == "passed", second["validation"]
    evs2 = events(api, second["id"])
    assert not [e for e in evs2 if str(e.get("type", "")).startswith("setup.")]
    assert of_type(evs2, "sandbox.ready")[0]["environment"]["status"] == "reused"
    assert second["environment"] == {"key": key, "reused": True, "buildMs": None}
    assert second["baseCommit"] != first["baseCommit"]
    # (how much sooner it is agent-ready is machine speed: bench/env_bench.py measures it)

    # a changed lockfile: a new environment, built once for two runs that need it at once
    commit(env_server, "acme/envpy", {"requirements.txt": f"--index-url {index.url}/simple\ngreetlib==1.0\n# v2\n"})
    pair = [run_once(api, "acme/envpy")["id"], run_once(api, "acme/envpy")["id"]]
    done = [finish(api, run_id) for run_id in pair]
    assert all(d["status"] == "idle" and d["validation"]["status"] == "passed" for d in done), done
    assert done[0]["environment"]["key"] == done[1]["environment"]["key"] != key
    statuses = sorted(of_type(events(api, r), "sandbox.ready")[0]["environment"]["status"] for r in pair)
    assert statuses == ["built", "joined"]
    assert sum(len(of_type(events(api, r), "setup.started")) for r in pair) == 1

    # prune removes the environment the new one replaced
    assert {e["key"] for e in envs(env_server)} == {key, done[0]["environment"]["key"]}
    pruned = env_server.cli("envs", "prune").stdout
    assert key[:16] in pruned and "removed" in pruned
    assert [e["key"] for e in envs(env_server)] == [done[0]["environment"]["key"]]
    gone = subprocess.run(["docker", "image", "inspect", kept["ref"]], capture_output=True, text=True)
    assert gone.returncode != 0
    newest = done[0]["environment"]["key"]
    shown = json.loads(env_server.cli("envs", "show", newest[:12]).stdout)
    assert shown["key"] == newest and shown["stale"] is False and shown["lastUsedAt"] >= shown["createdAt"]
    env_server.cli("envs", "rebuild", newest[:12])  # the next run needing it runs setup again
    assert json.loads(env_server.cli("envs", "show", newest[:12]).stdout)["stale"] is True


def message(api: Any, run_id: str, prompt: str) -> dict[str, Any]:
    resp = api.post(f"{RUNS}/{run_id}/messages", json={"prompt": prompt})
    assert resp.status_code == 202 and resp.json()["run"]["id"] == run_id, resp.text  # the same run
    done = wait_for(api, run_id, {"idle", "failed", "completed"}, timeout_s=600)
    assert done["status"] == "idle", done["error"]
    return done


def bash_output(api: Any, run_id: str) -> str:
    return [e["output"] for e in events(api, run_id) if e.get("tool") == "bash" and "output" in e][-1]


def test_a_restored_session_starts_from_the_run_environment_built_again_when_removed(env_server: Server) -> None:
    """A session whose sandbox was removed is restored from the environment its checkout needs:
    the package setup installed imports, start.sh ran in the new sandbox; when the kept
    environment was marked for rebuild meanwhile, the restore builds it again."""
    api = env_server.client(env_server.new_key("envs-restore"))
    check = ("@bash echo start-lines=$(wc -l < /tmp/start-marker); python3 -c "
             "'import greetlib; print(\"{tag}\", greetlib.greet())'\n@say checked")
    first = wait_for(api, run_once(api, "acme/envkeep", "@say hi")["id"], {"idle", "failed", "completed"},
                     timeout_s=600)
    assert first["status"] == "idle" and first["validation"]["status"] == "passed", first
    run_id, key = first["id"], first["environment"]["key"]
    for turn, rebuilt in ((2, False), (3, True)):
        if rebuilt:
            env_server.cli("envs", "rebuild", key[:12])  # the next sandbox needing it runs setup again
        boxes = our_containers(run_id)
        assert len(boxes) == 1
        subprocess.run(["docker", "rm", "-f", *boxes], check=True, capture_output=True)
        done = message(api, run_id, check.format(tag=f"turn{turn}"))
        assert done["turnCount"] == turn and done["validation"]["status"] == "passed", done["validation"]
        assert f"turn{turn} hello from greetlib" in bash_output(api, run_id)
        assert "start-lines=1" in bash_output(api, run_id)  # start.sh ran once, in this new sandbox
        evs = events(api, run_id)
        restored = of_type(evs, "session.restored")
        assert len(restored) == turn - 1 and restored[-1]["reason"] == "sandbox_lost"
        env = restored[-1]["environment"]
        assert env["key"] == key and env["reused"] is (not rebuilt) and env["status"] == (
            "built" if rebuilt else "reused")
        assert (env["buildMs"] > 0) if rebuilt else env["buildMs"] is None
        assert len(of_type(evs, "setup.started")) == 1 + rebuilt
        assert len(of_type(evs, "start.finished")) == turn
        assert our_containers(run_id) != boxes
    assert done["environment"] == first["environment"]  # what the run started from
    assert json.loads(env_server.cli("envs", "show", key[:12]).stdout)["stale"] is False
    api.post(f"{RUNS}/{run_id}/messages", json={"endSession": True})


@pytest.mark.parametrize(("repo", "expected"), [
    ("acme/envfail", ["setup.sh exited with 7", "resolving deps", "fatal: no such package"]),
    ("acme/envslow", ["setup.sh did not finish within 3 s", "begun"]),
])
def test_failing_or_slow_setup_fails_the_run_with_its_tail_and_keeps_nothing(
        env_server: Server, repo: str, expected: list[str]) -> None:
    api = env_server.client(env_server.new_key("envs-fail"))
    done = finish(api, run_once(api, repo, "@say never reached")["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "setup_failed"
    for text in expected:
        assert text in done["error"]["message"]
    assert done["environment"] is None
    assert not [e for e in envs(env_server) if e["repository"] == repo]
    assert of_type(events(api, done["id"]), "setup.finished")


def test_e2b_builds_a_snapshot_once_and_starts_later_runs_from_it(e2b_server: Server) -> None:  # noqa: F811
    """The E2B backend through the SDK stand-in: setup runs in a sandbox of the base template,
    the SDK's create_snapshot keeps it, later sandboxes are created from the snapshot's id."""
    make_repo(e2b_server.repos, "acme/enve2b", {
        ".gitignore": "gen/\n",
        ".critique/setup.sh": "mkdir -p ~/.local/share/tool gen && echo ready > ~/.local/share/tool/state && "
                              "echo made > gen/out.txt && echo set up\n",
        ".critique/test": "test -f ~/.local/share/tool/state && test -f gen/out.txt && test -f README.md\n",
        "README.md": "one\n"})
    e2b_server.extra_env["CRITIQUE_LOCAL_SANDBOX_AGENT_READY_TIMEOUT_S"] = "300"  # a shared, loaded machine
    e2b_server.start()
    api = e2b_server.client(e2b_server.new_key("cloud-envs"))
    first = finish(api, run_once(api, "acme/enve2b", "@say hi")["id"])
    assert first["status"] == "idle" and first["validation"]["status"] == "passed", first
    snapshots = [c for c in e2b_calls(e2b_server) if c["call"] == "create_snapshot"]
    assert len(snapshots) == 1
    snapshot_id = snapshots[0]["snapshot_id"]
    made = [c for c in e2b_calls(e2b_server) if c["call"] == "create"]
    assert [c["template"] for c in made] == ["critique-local-opencode", snapshot_id]  # build, then the run
    assert snapshots[0]["sandbox_id"] in {c["sandbox_id"] for c in e2b_calls(e2b_server) if c["call"] == "kill"}
    assert [e["ref"] for e in envs(e2b_server)] == [snapshot_id]

    commit(e2b_server, "acme/enve2b", {"README.md": "two\n"})
    second = finish(api, run_once(api, "acme/enve2b", "@bash cat README.md\n@say hi")["id"])
    assert second["status"] == "idle" and second["validation"]["status"] == "passed", second
    assert second["environment"]["reused"] is True and second["environment"]["key"] == first["environment"]["key"]
    assert "two" in api.get(f"{RUNS}/{second['id']}", params={"events": "1"}).text  # the newer commit's tree
    assert len([c for c in e2b_calls(e2b_server) if c["call"] == "create_snapshot"]) == 1
    assert [c["template"] for c in e2b_calls(e2b_server) if c["call"] == "create"][-1] == snapshot_id
    subprocess.run(["docker", "rmi", "-f", f"{SNAPSHOT_REPOSITORY}:{snapshot_id}"], capture_output=True)
