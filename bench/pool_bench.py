"""Issue-7 benchmark, side by side in one run on this machine:

1. POST -> agent session ready (agentReadyAt - createdAt), warm pool off vs on.
2. Repository preparation (the `sandbox.ready` event's checkoutMs + uploadMs: resolving the ref,
   building or reusing the packed checkout, getting it into the sandbox) for a small repository
   and a generated large one (default 50,000 files, 5,000 commits), in three set-ups:
   no mirror cache (a full clone per run), the mirror cache (first run builds the packed
   checkout, later runs reuse it), and the mirror cache with a pool preloaded with the
   repository's default branch.

    .venv/bin/python bench/pool_bench.py [--runs 8] [--files 50000] [--commits 5000] [--smoke]

Loopback only. Prints tables and writes bench/results/pool-bench.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import NO_RATE_LIMIT, add_smoke, load_note, machine, poll, post, write  # noqa: E402
from critique_local.clock import ms_between  # noqa: E402
from tests.helpers import Server, make_repo  # noqa: E402

RUNS = "/api/v1/coding-agent/runs"


def large_repo(root: Path, files: int, commits: int) -> Path:
    """A bare repository with ``files`` files and ``commits`` commits, made with git fast-import."""
    bare = root / "bench" / "large.git"
    bare.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    stream: list[bytes] = []

    def blob(mark: int, text: str) -> None:
        data = text.encode()
        stream.append(f"blob\nmark :{mark}\ndata {len(data)}\n".encode() + data + b"\n")

    mark = 1
    paths = [f"src/pkg{i // 500:03d}/mod{i:05d}.py" for i in range(files)]
    first: list[tuple[str, int]] = []
    for i, path in enumerate(paths):
        blob(mark, f"VALUE_{i} = {i}\n\ndef f{i}():\n    return VALUE_{i}\n")
        first.append((path, mark))
        mark += 1
    for n in range(commits):
        changes = first if n == 0 else []
        if n:
            blob(mark, f"VALUE = {n}\n")
            changes = [(paths[(n * 7919) % files], mark)]
            mark += 1
        msg = f"commit {n}".encode()
        lines = [f"commit refs/heads/main\nmark :{mark}\ncommitter bench <b@localhost> {1700000000 + n} +0000\n"
                 f"data {len(msg)}\n".encode() + msg + b"\n"]
        lines += [f"M 100644 :{m} {p}\n".encode() for p, m in changes]
        stream.append(b"".join(lines) + b"\n")
        mark += 1
    subprocess.run(["git", "fast-import", "--quiet"], input=b"".join(stream), cwd=bare, check=True)
    subprocess.run(["git", "gc", "-q", "--aggressive"], cwd=bare, check=False)
    return bare


def run_once(api: httpx.Client, repo: str) -> dict[str, Any]:
    run = post(api, RUNS, {"repository": repo, "prompt": "@say ready"})
    run = poll(api, run["id"], {"idle", "failed", "completed"}, interval_s=0.05, events=True)
    assert run["status"] == "idle", run["error"]
    ready = next(e["data"] for e in run["events"] if e["data"].get("type") == "sandbox.ready")
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})
    return {"ready_ms": ms_between(run["createdAt"], run["agentReadyAt"]),
            "prep_ms": ready["checkoutMs"] + ready["uploadMs"], **ready}


def wait_warm(server: Server, count: int) -> None:
    deadline = time.monotonic() + 300
    while httpx.get(f"{server.url}/healthz").json()["warmSandboxes"] < count:
        if time.monotonic() > deadline:
            raise RuntimeError("pool did not fill")
        time.sleep(0.1)


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))])


def server_with(base: Path, env: dict[str, str], large: Path) -> Server:
    server = Server(base, extra_env={**NO_RATE_LIMIT, **env})
    make_repo(server.repos, "bench/small", {"README.md": "# bench\n", "app.py": "x = 1\n"})
    (server.repos / "bench").mkdir(parents=True, exist_ok=True)
    os.symlink(large, server.repos / "bench" / "large.git")
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--commits", type=int, default=5_000)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.files, args.commits = 1, 200, 20
    work = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    result: dict[str, Any] = {"machine": machine(), "runs": args.runs,
                              "large": {"files": args.files, "commits": args.commits}}
    try:
        t0 = time.monotonic()
        large = large_repo(work / "gen", args.files, args.commits)
        result["large"]["generate_s"] = round(time.monotonic() - t0, 1)
        result["large"]["bare_mb"] = round(sum(p.stat().st_size for p in large.rglob("*") if p.is_file()) / 1e6, 1)

        # 1. agent ready, pool off vs on (small repository)
        ready: dict[str, list[float]] = {}
        modes: tuple[tuple[str, dict[str, str]], ...] = (("pool_off", {}), ("pool_on", {"CRITIQUE_LOCAL_POOL_SIZE": "1"}))
        for name, env in modes[1:] if args.smoke else modes:  # smoke: the cold path is every e2e test's
            server = server_with(work / name, {"CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS": "1", **env}, large)
            server.start()
            try:
                api = server.client(server.new_key("bench"))
                if env:
                    wait_warm(server, 1)
                if not args.smoke:
                    run_once(api, "bench/small")  # warm-up: page cache, mirror
                samples = []
                for _ in range(args.runs):
                    if env:
                        wait_warm(server, 1)
                    samples.append(run_once(api, "bench/small")["ready_ms"])
                ready[name] = samples
            finally:
                server.stop()
        result["agent_ready_ms"] = {k: {"median": med(v), "p90": p90(v), "samples": v} for k, v in ready.items()}
        result["agent_ready_ratio"] = med(ready.get("pool_off", [float("nan")])) / med(ready["pool_on"])

        # 2. preparation, small vs large, three set-ups
        setups = {
            "no_mirror_cache": {"CRITIQUE_LOCAL_GIT_MIRROR_CACHE": "false"},
            "mirror_cache": {},
            "mirror_cache_preloaded_pool": {"CRITIQUE_LOCAL_POOL_SIZE": "0",
                                            "CRITIQUE_LOCAL_POOL_REPOSITORIES": '{"bench/small": 1, "bench/large": 1}'},
        }
        prep: dict[str, Any] = {}
        if args.smoke:  # the most involved set-up only
            setups = {k: v for k, v in setups.items() if k == "mirror_cache_preloaded_pool"}
        for name, env in setups.items():
            server = server_with(work / name, {"CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS": "1",
                                               "CRITIQUE_LOCAL_SANDBOX_WORKSPACE_MB": "4096", **env}, large)
            server.start()
            try:
                api = server.client(server.new_key("bench"))
                rows: dict[str, Any] = {}
                for repo in ("bench/small", "bench/large"):
                    if "POOL_REPOSITORIES" in "".join(env):
                        wait_warm(server, 2)
                    first = run_once(api, repo)
                    later = []
                    for _ in range(max(1, args.runs // 2)):
                        if "POOL_REPOSITORIES" in "".join(env):
                            wait_warm(server, 2)
                        later.append(run_once(api, repo))
                    rows[repo] = {"first_prep_ms": first["prep_ms"], "prep_ms": med([r["prep_ms"] for r in later]),
                                  "checkout_ms": med([r["checkoutMs"] for r in later]),
                                  "upload_ms": med([r["uploadMs"] for r in later]),
                                  "ready_ms": med([r["ready_ms"] for r in later]),
                                  "preloaded": all(r["preloaded"] for r in later)}
                rows["large_over_small"] = rows["bench/large"]["prep_ms"] / max(1.0, rows["bench/small"]["prep_ms"])
                prep[name] = rows
            finally:
                server.stop()
        result["preparation"] = prep
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write("pool-bench", result, args.smoke)
    a = result["agent_ready_ms"]
    print(f"{load_note(result)}; large repo: {args.files} files, {args.commits} commits "
          f"({result['large']['bare_mb']} MB packed)")
    off = a.get("pool_off", {"median": float("nan"), "p90": float("nan")})
    print(f"POST -> agent ready (N={args.runs}): pool off median {off['median']:.0f} ms "
          f"(p90 {off['p90']:.0f}), pool on median {a['pool_on']['median']:.0f} ms "
          f"(p90 {a['pool_on']['p90']:.0f}) -> {result['agent_ready_ratio']:.1f}x")
    print(f"{'set-up':30} {'small ms':>9} {'large ms':>9} {'large/small':>11} {'large 1st':>9} {'large ready':>11}")
    for name, rows in prep.items():
        print(f"{name:30} {rows['bench/small']['prep_ms']:9.0f} {rows['bench/large']['prep_ms']:9.0f} "
              f"{rows['large_over_small']:11.1f} {rows['bench/large']['first_prep_ms']:9.0f} "
              f"{rows['bench/large']['ready_ms']:11.0f}")


if __name__ == "__main__":
    main()
