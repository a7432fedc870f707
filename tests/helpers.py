"""Test helpers: a real server process, bare repositories, and polling."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "critique_local"]
TERMINAL = {"completed", "failed", "cancelled"}


def git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(root: Path, full_name: str, files: dict[str, str] | dict[str, str | bytes],
              branches: dict[str, dict[str, str]] | None = None) -> Path:
    """A bare repository at <root>/<owner>/<name>.git with ``files`` on main (and extra branches);
    ``bytes`` contents are written as they are."""
    owner, name = full_name.split("/")
    bare = root / owner / f"{name}.git"
    work = root / ".work" / owner / name
    work.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=work)
    for path, text in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            (work / path).write_bytes(text)
        else:
            (work / path).write_text(text)
    git("add", "-A", cwd=work)
    git("commit", "-qm", "initial", cwd=work)
    for branch, extra in (branches or {}).items():
        git("checkout", "-q", "-b", branch, cwd=work)
        for path, text in extra.items():
            (work / path).write_text(text)
        git("add", "-A", cwd=work)
        git("commit", "-qm", f"on {branch}", cwd=work)
        git("checkout", "-q", "main", cwd=work)
    bare.parent.mkdir(parents=True, exist_ok=True)
    git("clone", "-q", "--bare", str(work), str(bare))
    return bare


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A ``critique-local serve`` process on loopback with its own data dir and repos."""

    base: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    module: str = "critique_local"  # what `python -m` runs (tests.e2b_serve: with the E2B stand-in)

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def repos(self) -> Path:
        return self.base / "repos"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CRITIQUE_LOCAL_SERVER_DATA_DIR": str(self.data_dir),
            "CRITIQUE_LOCAL_GIT_LOCAL_ROOT": str(self.repos),
            "CRITIQUE_LOCAL_SERVER_PORT": str(self.port),
            "CRITIQUE_LOCAL_DOCKER_GATEWAY_PORT": "0",
            "CRITIQUE_LOCAL_POOL_SIZE": "0",  # tests that want a warm pool say so
            "CRITIQUE_LOCAL_SERVER_DRAIN_TIMEOUT_S": "0",  # stop at once; tests of draining say so
            **self.extra_env,
        }

    def start(self) -> None:
        self.repos.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        log = (self.base / "server.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, "serve"], env=self.env, cwd=ROOT,
                                     stdout=log, stderr=log)
        deadline = time.monotonic() + 180  # bounds below are sized for a loaded 2-core machine
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.base / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy")

    def print_log_tail(self, chars: int = 12000) -> None:
        """The server log's end, on stdout: pytest shows it under a failed test's report."""
        path = self.base / "server.log"
        if path.exists():
            print(f"---- {path} (end) ----\n{path.read_bytes()[-chars:].decode(errors='replace')}")

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, like a crash."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        """Stop the server and remove its sandboxes: a graceful stop keeps warm ones for the next
        start, but a test's data dir is thrown away, so they would be orphans."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        self.print_log_tail()
        instance = self.data_dir / "instance_id"
        if instance.exists():
            ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=critique.instance={instance.read_text().strip()}"],
                                 capture_output=True, text=True).stdout.split()
            if ids:
                subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)

    def cli(self, *args: str, check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*CLI, *args], env=self.env, cwd=ROOT, capture_output=True, text=True, input=input_text)
        if check and res.returncode != 0:
            raise AssertionError(f"critique-local {' '.join(args[:2])} exited {res.returncode}:\n"
                                 f"stdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}")
        return res

    def new_key(self, user: str, scopes: str | None = None) -> str:
        args = ["keys", "create", "--user", user] + (["--scopes", scopes] if scopes else [])
        return self.cli(*args).stdout.strip().splitlines()[-1]

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def wait_for(client: httpx.Client, run_id: str, statuses: set[str], timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = client.get(f"/api/v1/coding-agent/runs/{run_id}").json()["run"]
        if run["status"] in statuses:
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} still {run.get('status')}/{run.get('lifecycle')} after {timeout_s}s")


def wait_lifecycle(client: httpx.Client, run_id: str, lifecycle: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(f"/api/v1/coding-agent/runs/{run_id}").json()["run"]["lifecycle"] != lifecycle:
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} never reached {lifecycle}")
        time.sleep(0.1)


def sse_events(client: httpx.Client, run_id: str, headers: dict[str, str] | None = None,
               params: dict[str, str] | None = None) -> list[tuple[int, str, dict[str, Any]]]:
    """Read the run's stream until the server closes it: [(id, event, data)]."""
    from httpx_sse import connect_sse

    out = []
    with connect_sse(client, "GET", f"/api/v1/coding-agent/runs/{run_id}/stream", headers=headers or {},
                     params=params or {}, timeout=httpx.Timeout(30, read=60)) as source:
        assert source.response.status_code == 200, source.response.read()
        for sse in source.iter_sse():
            if sse.data:  # heartbeat comments arrive as events without data
                out.append((int(sse.id), sse.event, json.loads(sse.data)))
    return out


def our_containers(run_id: str) -> list[str]:
    """Short ids of the run's containers, found the way README "Finding a run's sandbox" says: by
    the name ``critique-<run id>`` (a pooled sandbox is renamed when a run takes it, while its
    labels keep naming the pool) or by the label ``critique.run=<run id>``."""
    found: list[str] = []
    for how in (f"name=^/?critique-{run_id}$", f"label=critique.run={run_id}"):
        res = subprocess.run(["docker", "ps", "-aq", "--filter", how], capture_output=True, text=True, check=True)
        found += [c for c in res.stdout.split() if c not in found]
    return found


def sandbox_contains(container: str, needle: str) -> str:
    """What in the sandbox holds ``needle``: process environments and every place it can write."""
    script = (f"cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -F -- '{needle}';"
              f" grep -rlsF -- '{needle}' /workspace /tmp /home /root /var /run 2>/dev/null; true")
    return subprocess.run(["docker", "exec", container, "sh", "-c", script], capture_output=True, text=True,
                          check=True).stdout
