"""Issue-16 benchmark, side by side in one run on this machine: POST -> agent ready
(agentReadyAt - createdAt) for

1. a repository whose ``.critique/setup.sh`` takes at least 20 s: the first run (builds the
   environment) and later runs on newer commits (reuse it);
2. a repository with no setup (the same files otherwise), alternated with (1)'s later runs;
3. the same two with the warm pool on: ``pool.environments`` holding the environment's
   repository, ``pool.size`` for the no-setup one.

Goals: a reusing run within 1.2x of a no-setup run; under 1 s with the pool holding the
environment.

    .venv/bin/python bench/env_bench.py [--runs 5] [--setup-s 20] [--smoke]

Loopback only. Prints a table and writes bench/results/env-bench.json.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import NO_RATE_LIMIT, add_smoke, load_note, machine, poll, post, summary, write  # noqa: E402
from critique_local.clock import ms_between  # noqa: E402
from tests.helpers import Server, git, make_repo  # noqa: E402

RUNS = "/api/v1/coding-agent/runs"
FILES = {"app.py": "def add(a, b):\n    return a + b\n", "README.md": "bench\n"}


def run_once(api: httpx.Client, repo: str) -> dict[str, Any]:
    run = post(api, RUNS, {"repository": repo, "prompt": "@say ready"})
    run = poll(api, run["id"], {"idle", "failed", "completed"}, interval_s=0.05, events=True)
    assert run["status"] == "idle", run["error"]
    ready = next(e["data"] for e in run["events"] if e["data"].get("type") == "sandbox.ready")
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})
    return {"ready_ms": ms_between(run["createdAt"], run["agentReadyAt"]), "warm": ready["warm"],
            "environment": (ready.get("environment") or {}).get("status")}


def new_commit(server: Server, full_name: str, n: int) -> None:
    owner, name = full_name.split("/")
    work = server.repos / ".work" / owner / name
    (work / "NOTES.md").write_text(f"commit {n}\n")
    git("add", "-A", cwd=work)
    git("commit", "-qm", f"commit {n}", cwd=work)
    git("push", "-q", str(server.repos / owner / f"{name}.git"), "main", cwd=work)


def wait_warm(server: Server, count: int) -> None:
    deadline = time.monotonic() + 600
    while httpx.get(f"{server.url}/healthz").json()["warmSandboxes"] < count:
        if time.monotonic() > deadline:
            raise RuntimeError("pool did not fill")
        time.sleep(0.1)


def stats(values: list[float]) -> dict[str, float]:
    return summary(values)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--setup-s", type=int, default=20)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.setup_s = 1, 1
    work = Path(tempfile.mkdtemp(prefix="env-bench-"))
    result: dict[str, Any] = {"machine": machine(), "runs": args.runs, "setup_s": args.setup_s}
    setup = (f"sleep {args.setup_s}\nmkdir -p ~/.local/share/bench deps && head -c 20000000 /dev/urandom "
             "> ~/.local/share/bench/blob && echo ok > deps/state\n")
    server = Server(work, extra_env={**NO_RATE_LIMIT,
                                     "CRITIQUE_LOCAL_SANDBOX_AGENT_READY_TIMEOUT_S": "300"})  # a loaded machine
    try:
        server.repos.mkdir(parents=True)
        make_repo(server.repos, "bench/setup", {**FILES, ".gitignore": "deps/\n", ".critique/setup.sh": setup})
        make_repo(server.repos, "bench/plain", FILES)
        server.start()
        api = server.client(server.new_key("bench"))
        first = run_once(api, "bench/setup")
        assert first["environment"] == "built"
        reuse, plain = [], []
        for i in range(args.runs):
            new_commit(server, "bench/setup", i)
            got = run_once(api, "bench/setup")
            assert got["environment"] == "reused"
            reuse.append(got["ready_ms"])
            plain.append(run_once(api, "bench/plain")["ready_ms"])
        pooled, pooled_plain = [], []
        if not args.smoke:  # within the smoke budget: build and reuse only
            server.stop()
            # the same data dir (the environment is kept) with the pool holding it
            server.extra_env.update({"CRITIQUE_LOCAL_POOL_ENVIRONMENTS": '{"bench/setup": 1}',
                                     "CRITIQUE_LOCAL_POOL_SIZE": "1"})
            server.start()
        for _ in range(0 if args.smoke else args.runs):
            wait_warm(server, 2)
            got = run_once(api, "bench/setup")
            assert got["warm"] and got["environment"] == "reused", got
            pooled.append(got["ready_ms"])
            wait_warm(server, 2)
            got = run_once(api, "bench/plain")
            assert got["warm"], got
            pooled_plain.append(got["ready_ms"])
    finally:
        server.stop()
        ids = subprocess.run(["docker", "images", "-q", "--filter", "label=critique.env.key"], capture_output=True,
                             text=True).stdout.split()
        instance = (server.data_dir / "instance_id").read_text().strip() if (server.data_dir / "instance_id").exists() \
            else None
        if instance:
            mine = subprocess.run(["docker", "images", "-q", "--filter", f"label=critique.instance={instance}"],
                                  capture_output=True, text=True).stdout.split()
            for image in set(ids) & set(mine):
                subprocess.run(["docker", "rmi", "-f", image], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    result.update(first_build_ms=first["ready_ms"], reuse=stats(reuse), plain=stats(plain),
                  pooled_env=stats(pooled), pooled_plain=stats(pooled_plain))
    result["reuse_over_plain"] = result["reuse"]["median"] / result["plain"]["median"]
    write("env-bench", result, args.smoke)
    print(f"{load_note(result)}; setup.sh takes >= {args.setup_s} s; N={args.runs}; POST -> agent ready, ms")
    print(f"{'first run (builds)':34} {first['ready_ms']:8.0f}")
    for name, key in (("reuse (newer commit)", "reuse"), ("no setup", "plain"),
                      ("reuse, pool holds the environment", "pooled_env"), ("no setup, pool", "pooled_plain")):
        row = result[key]
        print(f"{name:34} {row['median']:8.0f}  (min {row['min']:.0f}, max {row['max']:.0f})")
    print(f"reuse / no setup: {result['reuse_over_plain']:.2f}x (goal <= 1.2); pooled reuse median "
          f"{result['pooled_env']['median']:.0f} ms (goal < 1000)")


if __name__ == "__main__":
    main()
