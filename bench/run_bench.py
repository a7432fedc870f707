"""Issues 2 and 18: what a user waits for, side by side in one run on this machine.

1. One-step runs (``@say hi``), one at a time, with the warm pool off (cold) and on
   (``pool.size = 1``, waiting for it to refill between runs): POST -> ``agent.ready``
   (``agentReadyAt - createdAt``), POST -> first model call (``firstModelCallAt - createdAt``:
   the gateway received the turn's first chat completion) and POST -> ``idle`` (client clock).
2. The same one-step turn sent to a bare, already-warm ``opencode serve`` on the host (one
   process, a new session per sample, the same scripted model through our gateway): the floor.
3. A warm follow-up on the same run: message -> first model call.
4. A burst of N runs posted at once with the pool on: the distribution of POST -> first model
   call, and how many found a warm sandbox.

    .venv/bin/python bench/run_bench.py [--runs N] [--burst N] [--smoke]
    .venv/bin/python bench/run_bench.py --timeline [--runs N]

``--timeline`` runs only the pool-with-the-repository set-up, with the server at debug level,
and prints where a run's start and its turns spend their time, step by step (medians of the
server's timeline lines, ``runs/timeline.py``; debug logging slows the server a little).

Loopback only. Prints a table and writes bench/results/run-bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    NO_RATE_LIMIT,
    RUNS,
    add_smoke,
    get,
    load_note,
    machine,
    poll,
    post,
    summary,
    write,
)
from critique_local.agent.opencode.config import HEADLESS_PERMISSIONS  # noqa: E402
from critique_local.clock import ms_between, parse_iso  # noqa: E402
from tests.helpers import Server, free_port, git, make_repo  # noqa: E402

PROMPT = "@say hi"
FOLLOW_UP = "@say again"
METRICS = (("ready_ms", "POST -> agent.ready"), ("first_call_ms", "POST -> first model call"),
           ("idle_ms", "POST -> idle (client)"))


def wait_warm(server: Server, count: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{server.url}/healthz").json().get("warmSandboxes", 0) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the warm pool did not fill")
        time.sleep(0.05)


def one_run(api: httpx.Client, follow_up: bool = False) -> dict[str, Any]:
    t0 = time.monotonic()
    run = post(api, RUNS, {"repository": "bench/small", "prompt": PROMPT})
    run = poll(api, run["id"], {"idle", "failed", "completed", "cancelled"}, interval_s=0.01)
    idle_ms = (time.monotonic() - t0) * 1000
    if run["status"] != "idle":
        raise RuntimeError(f"run {run['id']} {run['status']}: {run['error']}")
    row: dict[str, Any] = {"ready_ms": ms_between(run["createdAt"], run["agentReadyAt"]),
                           "first_call_ms": ms_between(run["createdAt"], run["firstModelCallAt"]),
                           "idle_ms": idle_ms, "warm": None}
    events = get(api, f"{RUNS}/{run['id']}", params={"events": "1"}).json()["run"]["events"]
    ready = next((e["data"] for e in events if e["data"].get("type") == "sandbox.ready"), {})
    row["warm"] = ready.get("warm")
    if follow_up:
        t_sent = time.time()  # the server's clock is this machine's
        resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": FOLLOW_UP})
        if resp.status_code != 202:
            raise RuntimeError(f"follow-up -> {resp.status_code}: {resp.text[:300]}")
        done = poll(api, run["id"], {"idle", "failed"}, interval_s=0.01)
        first = parse_iso(done["turns"][-1]["firstModelCallAt"]).timestamp()
        row["follow_up_first_call_ms"] = (first - t_sent) * 1000
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})
    return row


def start_bare(server: Server, key: str, repo: Path, opencode: Path, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A bare ``opencode serve`` on the host in a clone of ``repo``: (process, base URL), healthy."""
    git("clone", "-q", str(repo), str(work / "ws"))
    port = free_port()
    config = {"autoupdate": False, "share": "disabled",
              "provider": {"gw": {"npm": "@ai-sdk/openai-compatible", "name": "gw",
                                  "options": {"baseURL": server.url + "/api/v1", "apiKey": key},
                                  "models": {"critique/scripted": {"name": "s", "tool_call": True,
                                                                   "limit": {"context": 128000, "output": 8192}}}}},
              "model": "gw/critique/scripted", "small_model": "gw/critique/scripted",
              "permission": HEADLESS_PERMISSIONS}  # the same rules as a sandbox's OpenCode
    env = {**os.environ, "HOME": str(work / "home"), "OPENCODE_CONFIG_CONTENT": json.dumps(config),
           "OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_AUTOUPDATE": "1",
           "OPENCODE_DISABLE_PROJECT_CONFIG": "1", "OPENCODE_CLIENT": "sdk"}
    proc = subprocess.Popen([str(opencode), "serve", "--hostname", "127.0.0.1", "--port", str(port)],
                            cwd=work / "ws", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/global/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("bare opencode did not become healthy")
        time.sleep(0.05)


def bare_turn(base: str) -> dict[str, Any]:
    """One one-step turn on a new session of the warm bare OpenCode: session + prompt, ms."""
    with httpx.Client(base_url=base, timeout=120) as oc:
        t0 = time.monotonic()
        sid = oc.post("/session", json={"title": "bench"}).json()["id"]
        res = oc.post(f"/session/{sid}/message", json={
            "parts": [{"type": "text", "text": PROMPT}], "agent": "build",
            "model": {"providerID": "gw", "modelID": "critique/scripted"}}).json()
        if res["info"].get("error"):
            raise RuntimeError(f"bare turn failed: {res['info']['error']}")
        return {"idle_ms": (time.monotonic() - t0) * 1000}


STEP = re.compile(r"(\S+) \+(\d+)(?:/(\d+))?")
LINES = (("start", re.compile(r"run (\S+) start, (\d+) ms after its POST, timeline \(ms, \+start/duration\): (.*)$")),
         ("turn", re.compile(r"run (\S+) turn (\d+) timeline \(ms, \+start/duration\): (.*)$")),
         ("opencode turn", re.compile(r"OpenCode turn of (\S+) \(ms from its start\): (.*)$")))


def timelines(log: str) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """The server's timeline lines -> {group: {step: [(start ms, duration ms)]}}; groups: ``start``,
    ``turn N``, ``opencode turn N`` (N: the turn of its run, or of its agent session)."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    seen: dict[str, int] = {}
    for line in log.splitlines():
        for kind, pattern in LINES:
            m = pattern.search(line)
            if not m:
                continue
            if kind == "start":
                group, steps = "start", f"POST +{m.group(2)} " + " ".join(
                    f"{n} +{int(a) + int(m.group(2))}" for n, a, _ in STEP.findall(m.group(3)))
            elif kind == "turn":
                group, steps = f"turn {m.group(2)}", m.group(3)
            else:
                seen[m.group(1)] = seen.get(m.group(1), 0) + 1
                group, steps = f"opencode turn {seen[m.group(1)]}", m.group(2)
            for name, start, took in STEP.findall(steps):
                out.setdefault(group, {}).setdefault(name, []).append((float(start), float(took or 0)))
    return out


def timeline_mode(args: argparse.Namespace, work: Path) -> None:
    """``--timeline``: one-step runs and a follow-up each on a pool holding the repository,
    the server at debug level; the median of every step of their timelines."""
    server = Server(work / "timeline", extra_env={
        **NO_RATE_LIMIT, "CRITIQUE_LOCAL_POOL_SIZE": "0", "CRITIQUE_LOCAL_POOL_REPOSITORIES": '{"bench/small": 1}',
        "CRITIQUE_LOCAL_SERVER_LOG_LEVEL": "debug"})
    make_repo(server.repos, "bench/small", {"README.md": "# bench\n", "app.py": "x = 1\n"})
    server.start()
    rows = []
    try:
        with server.client(server.new_key("bench")) as api:
            one_run(api)  # warm-up
            skip = (server.base / "server.log").stat().st_size
            for _ in range(args.runs):
                wait_warm(server, 1)
                rows.append(one_run(api, follow_up=True))
        with (server.base / "server.log").open("rb") as fh:
            fh.seek(skip)
            log = fh.read().decode(errors="replace")
    finally:
        server.stop()
    print(f"N={len(rows)} one-step runs + a follow-up each, pool holding the repository, server at debug level; "
          f"load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())} at end")
    for metric, what in (*METRICS, ("follow_up_first_call_ms", "follow-up: message -> 1st call")):
        print(f"  {what:<32} median {summary([r[metric] for r in rows])['median']:7.0f} ms")
    for group, steps in timelines(log).items():
        print(f"{group} (ms, median start / median duration):")
        for name, samples in steps.items():
            starts, took = summary([a for a, _ in samples]), summary([d for _, d in samples])
            print(f"  {name:<20} +{starts['median']:6.0f} {took['median']:7.0f}")


def burst(server: Server, key: str, n: int) -> dict[str, Any]:
    def go(_: int) -> dict[str, Any]:
        with server.client(key) as api:
            api.timeout = httpx.Timeout(60)
            return one_run(api)

    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        rows = list(pool.map(go, range(n)))
    return {"runs": n, "wall_s": time.monotonic() - t0, "first_call_ms": summary([r["first_call_ms"] for r in rows]),
            "ready_ms": summary([r["ready_ms"] for r in rows]), "warm": sum(1 for r in rows if r["warm"]),
            "samples_first_call_ms": sorted(r["first_call_ms"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--pool-max", type=int, default=4, help="pool.max_size for the burst (pool.size = 1)")
    parser.add_argument("--timeline", action="store_true",
                        help="only the pool holding the repository, server at debug level: step by step timelines")
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.burst = 1, 2
    opencode = next((ROOT / ".cache").glob("opencode-*/opencode"))
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    if args.timeline:
        try:
            timeline_mode(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    result: dict[str, Any] = {"machine": machine(), "runs": args.runs}
    rows: dict[str, list[dict[str, Any]]] = {"cold": [], "pool": [], "repo": [], "bare": []}
    configs = [("pool", {"CRITIQUE_LOCAL_POOL_SIZE": "1", "CRITIQUE_LOCAL_POOL_MAX_SIZE": str(args.pool_max)})]
    if not args.smoke:  # the cold path is the pool-off path of every other e2e test
        configs.insert(0, ("cold", {}))
        # the pool holding the repository's checkout (pool.repositories): OpenCode's per-directory
        # start is paid by the pooled sandbox's warm-up turn in /workspace, before the run claims it
        configs.insert(1, ("repo", {"CRITIQUE_LOCAL_POOL_SIZE": "0",
                                    "CRITIQUE_LOCAL_POOL_REPOSITORIES": '{"bench/small": 1}'}))
    try:
        for name, env in configs:
            server = Server(work / name, extra_env={**NO_RATE_LIMIT, **env,
                                                    "CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS": str(args.burst)})
            repo = make_repo(server.repos, "bench/small", {"README.md": "# bench\n", "app.py": "x = 1\n"})
            server.start()
            try:
                key = server.new_key("bench")
                with server.client(key) as api:
                    if not args.smoke:
                        one_run(api)  # warm-up: image layers, page cache, mirror
                    for _ in range(args.runs):
                        if name in ("pool", "repo"):
                            wait_warm(server, 1)
                        rows[name].append(one_run(api, follow_up=name in ("pool", "repo")))
                if name == "pool":
                    proc, base = start_bare(server, key, repo, opencode, work / "bare")
                    try:
                        bare_turn(base)  # already warm: its first turn is not measured
                        for _ in range(args.runs):
                            rows["bare"].append(bare_turn(base))
                    finally:
                        proc.kill()
                        proc.wait()
                    wait_warm(server, 1)
                    result["burst"] = burst(server, key, args.burst)
            except BaseException:
                log = server.base / "server.log"
                if log.exists():  # why, before the data dir goes
                    print(f"--- {name}: server.log (tail)\n{log.read_text(errors='replace')[-6000:]}", file=sys.stderr)
                raise
            finally:
                server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, samples in rows.items():
        if samples:
            result[name] = {m: summary([s[m] for s in samples if m in s])
                            for m in ("ready_ms", "first_call_ms", "idle_ms", "follow_up_first_call_ms")
                            if any(m in s for s in samples)}
    result["ratio_idle_pool_over_bare"] = result["pool"]["idle_ms"]["median"] / result["bare"]["idle_ms"]["median"]
    if "repo" in result:
        result["ratio_idle_repo_pool_over_bare"] = (result["repo"]["idle_ms"]["median"]
                                                    / result["bare"]["idle_ms"]["median"])
    write("run-bench", result, args.smoke)
    print(f"N={args.runs} one-step runs ({PROMPT!r}) per set-up; {load_note(result)}")
    print(f"{'':48}{'median':>9}{'p90':>9}{'min':>9}{'max':>9}")
    for name, label in (("cold", "pool off"), ("pool", "warm pool (size 1)"), ("repo", "pool with the repo")):
        for metric, what in (*METRICS, ("follow_up_first_call_ms", "warm follow-up: message -> 1st call")):
            s = result.get(name, {}).get(metric)
            if s:
                print(f"{label:<20}{what:<28}{s['median']:>9.0f}{s['p90']:>9.0f}{s['min']:>9.0f}{s['max']:>9.0f}")
    s = result["bare"]["idle_ms"]
    print(f"{'bare opencode serve':<20}{'new session + turn (warm)':<28}{s['median']:>9.0f}{s['p90']:>9.0f}"
          f"{s['min']:>9.0f}{s['max']:>9.0f}")
    print(f"POST -> idle, warm pool / bare warm opencode (median): {result['ratio_idle_pool_over_bare']:.2f}x")
    if "ratio_idle_repo_pool_over_bare" in result:
        print(f"POST -> idle, pool with the repo / bare warm opencode (median): "
              f"{result['ratio_idle_repo_pool_over_bare']:.2f}x")
    b = result["burst"]
    print(f"burst of {b['runs']} at once ({b['warm']} found a warm sandbox, wall {b['wall_s']:.1f} s): POST -> first "
          f"model call median {b['first_call_ms']['median']:.0f} ms, p90 {b['first_call_ms']['p90']:.0f}, "
          f"max {b['first_call_ms']['max']:.0f}")


if __name__ == "__main__":
    main()
