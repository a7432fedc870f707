"""Issue-8 load benchmark, on this machine, loopback only:

1. Status polling: GET /runs/{id} latency (p50/p99) and throughput with 50 and 200 concurrent
   connections for a fixed time, next to a bare aiohttp server answering the same JSON body (the
   floor for this machine) -> ratio. The load comes from ``wrk`` (Debian package; ``make bench``
   installs it); without it, from an httpx async client in this process, which is itself the
   bottleneck on two cores (recorded as ``client``).
2. SSE fan-out: S subscribers (default 500) on R active runs; delivery lag = time the client
   receives an event minus the time the server persisted it (same clock), p50/p99, for events
   created after every subscriber connected.
3. Concurrency: C scripted runs (default 20) started at once on the Docker backend; wall time
   until all are idle, failures, server CPU seconds and peak RSS; next to one run alone.

    .venv/bin/python bench/load_bench.py [--seconds 10] [--subscribers 500] [--runs 20] [--smoke]

Writes bench/results/load-bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import NO_RATE_LIMIT, add_smoke, load_note, machine, write  # noqa: E402
from tests.helpers import Server, free_port, make_repo  # noqa: E402

RUNS = "/api/v1/coding-agent/runs"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def wait_status(api: httpx.Client, run_id: str, statuses: set[str], timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = api.get(f"{RUNS}/{run_id}").json()["run"]
        if run["status"] in statuses:
            return dict(run)
        time.sleep(0.25)
    raise RuntimeError(f"run {run_id} did not reach {statuses}")


async def hammer(url: str, headers: dict[str, str], clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30) as client:
        stop = time.monotonic() + seconds

        async def one() -> None:
            nonlocal errors
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                resp = await client.get(url)
                latencies.append((time.perf_counter() - t0) * 1000)
                if resp.status_code != 200:
                    errors += 1

        await asyncio.gather(*(one() for _ in range(clients)))
    return {"clients": clients, "requests": len(latencies), "rps": len(latencies) / seconds, "errors": errors,
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99)}


WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_hammer(url: str, headers: dict[str, str], clients: int, seconds: float) -> dict[str, Any]:
    """``wrk`` with two threads; latency percentiles from its ``--latency`` distribution."""
    argv = ["wrk", "-t2", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "--timeout", "30s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    lat = {m.group(1): float(m.group(2)) * WRK_UNITS[m.group(3)]
           for m in re.finditer(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    total = re.search(r"^\s*(\d+) requests in", out, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if not (total and rps and "50" in lat and "99" in lat):
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    errors = int(non2xx.group(1)) if non2xx else 0
    errors += sum(int(g) for g in socket.groups()) if socket else 0
    return {"client": "wrk", "clients": clients, "requests": int(total.group(1)), "rps": float(rps.group(1)),
            "errors": errors, "p50_ms": lat["50"], "p99_ms": lat["99"]}


def load(url: str, headers: dict[str, str], clients: int, seconds: float) -> dict[str, Any]:
    if shutil.which("wrk"):
        return wrk_hammer(url, headers, clients, seconds)
    return {"client": "httpx", **asyncio.run(hammer(url, headers, clients, seconds))}


def bare_server(body: bytes) -> tuple[str, web.AppRunner, asyncio.AbstractEventLoop]:
    """A bare aiohttp server in a thread answering ``body``: the floor for polling."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    def run() -> None:
        asyncio.set_event_loop(loop)
        app = web.Application()
        app.router.add_get("/run", handler)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        holder["runner"] = runner
        holder["port"] = runner.addresses[0][1]
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait(10)
    return f"http://127.0.0.1:{holder['port']}/run", holder["runner"], loop


BARE_SSE = r"""
import asyncio, json, sys
from datetime import datetime, timezone
from aiohttp import web
streams, events, interval = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
subscribers: dict[int, list[web.StreamResponse]] = {i: [] for i in range(streams)}
start, done = asyncio.Event(), asyncio.Event()

async def stream(request):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    subscribers[int(request.match_info["n"])].append(resp)
    await done.wait()
    return resp

async def go(request):
    start.set()
    return web.Response(text="ok")

async def emit(app):
    async def run():
        await start.wait()
        for i in range(events):
            for n, subs in subscribers.items():
                data = json.dumps({"id": i, "createdAt": datetime.now(timezone.utc).isoformat(), "data": {"n": n}})
                for resp in subs:
                    await resp.write(f"id: {i}\ndata: {data}\n\n".encode())
            await asyncio.sleep(interval)
        done.set()
    task = asyncio.create_task(run())
    yield
    task.cancel()

app = web.Application()
app.router.add_get("/s/{n}", stream)
app.router.add_post("/go", go)
app.cleanup_ctx.append(emit)
print(sys.argv[4], flush=True)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[4]), print=None, access_log=None)
"""


def bare_sse(streams: int, subscribers: int, events: int, interval_s: float = 0.1) -> dict[str, float]:
    """The floor for SSE fan-out on this machine: a bare aiohttp server in its own process writing
    ``events`` small events on each of ``streams`` streams, to the same client as ours."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE_SSE, str(streams), str(events), str(interval_s), str(port)],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()

        async def go() -> None:
            async with httpx.AsyncClient() as c:
                await c.post(f"http://127.0.0.1:{port}/go")

        async def measure() -> dict[str, float]:
            return await fan_out(f"http://127.0.0.1:{port}", "-", [f"/s/{i}" for i in range(streams)], subscribers, go)

        return asyncio.run(measure())
    finally:
        proc.kill()
        proc.wait()


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


async def fan_out(base_url: str, key: str, paths: list[str], subscribers: int,
                  on_connected: Callable[[], Awaitable[None]] | None = None) -> dict[str, float]:
    """``subscribers`` SSE clients in this process over ``paths`` (round robin); the lag of each
    event created after all connected: receive time minus its ``createdAt``."""
    lags: list[float] = []
    connected = 0
    all_connected = asyncio.Event()
    limits = httpx.Limits(max_connections=subscribers + 10, max_keepalive_connections=0)

    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=httpx.Timeout(30, read=120)) as client:

        async def subscribe(path: str) -> None:
            nonlocal connected
            async with client.stream("GET", path, params={"after": "0"}) as resp:
                connected += 1
                if connected == subscribers:
                    all_connected.set()
                data = ""
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        data = line[5:].strip()
                    elif line == "" and data:
                        received = time.time()
                        event = json.loads(data)
                        created = datetime.fromisoformat(event["createdAt"].replace("Z", "+00:00")).timestamp()
                        if all_connected.is_set() and created > connected_at[0]:
                            lags.append((received - created) * 1000)
                        data = ""

        connected_at = [time.time() + 3600]
        tasks = [asyncio.create_task(subscribe(paths[i % len(paths)])) for i in range(subscribers)]
        await asyncio.wait_for(all_connected.wait(), 120)
        connected_at[0] = time.time()
        if on_connected is not None:
            await on_connected()
        await asyncio.wait(tasks, timeout=300)
        for task in tasks:
            task.cancel()
    return {"subscribers": subscribers, "events_measured": len(lags), "p50_ms": pct(lags, 0.5),
            "p99_ms": pct(lags, 0.99), "max_ms": max(lags) if lags else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--runs", type=int, default=20)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.subscribers, args.runs = 1, 20, 2
    base = Path(tempfile.mkdtemp(prefix="load-bench-"))
    result: dict[str, Any] = {"machine": machine()}
    server = Server(base, extra_env={**NO_RATE_LIMIT,
                                     "CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS": str(args.runs),
                                     "CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS_PER_USER": str(args.runs),
                                     "CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": "600"})
    make_repo(server.repos, "bench/small", {"README.md": "# bench\n", "app.py": "x = 1\n"})
    server.start()
    try:
        key = server.new_key("load")
        headers = {"Authorization": f"Bearer {key}"}
        api = server.client(key)
        api.timeout = httpx.Timeout(60)

        # 1. polling
        run = api.post(RUNS, json={"repository": "bench/small", "prompt": "@say polled"}).json()["run"]
        wait_status(api, run["id"], {"idle"})
        url = f"{server.url}{RUNS}/{run['id']}"
        body = httpx.get(url, headers=headers).content
        bare_url, runner, loop = bare_server(body)
        polling = {}
        for clients in (50, 200):
            ours = load(url, headers, clients, args.seconds)
            bare = load(bare_url, headers, clients, args.seconds)
            polling[str(clients)] = {"ours": ours, "bare_aiohttp": bare,
                                     "p50_ratio": ours["p50_ms"] / bare["p50_ms"], "rps_ratio": bare["rps"] / ours["rps"]}
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        result["polling"] = polling
        api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})

        # 2. SSE fan-out on active runs
        steps = "".join("@bash echo step\n@sleep 0.5\n" for _ in range(4 if args.smoke else 16)) + "@say streamed"
        active = [api.post(RUNS, json={"repository": "bench/small", "prompt": steps}).json()["run"]["id"]
                  for _ in range(2 if args.smoke else 5)]
        for run_id in active:
            deadline = time.monotonic() + 120
            while api.get(f"{RUNS}/{run_id}").json()["run"]["lifecycle"] != "agent_running":
                if time.monotonic() > deadline:
                    raise RuntimeError("run did not start")
                time.sleep(0.1)
        result["sse"] = asyncio.run(fan_out(server.url, key, [f"{RUNS}/{r}/stream" for r in active], args.subscribers))
        events = max(1, round(result["sse"]["events_measured"] / args.subscribers))
        result["sse_bare"] = bare_sse(len(active), args.subscribers, events)
        for run_id in active:
            wait_status(api, run_id, {"idle", "failed"})
            api.post(f"{RUNS}/{run_id}/messages", json={"endSession": True})

        # 3. concurrency: one alone, then N at once
        assert server.proc is not None
        prompt = "@write out.txt\nhello\n@end\n@bash cat out.txt\n@say done"
        t0 = time.monotonic()
        single = api.post(RUNS, json={"repository": "bench/small", "prompt": prompt}).json()["run"]
        wait_status(api, single["id"], {"idle", "failed"})
        single_s = time.monotonic() - t0
        api.post(f"{RUNS}/{single['id']}/messages", json={"endSession": True})
        cpu0, _ = proc_stats(server.proc.pid)
        peak = 0
        t0 = time.monotonic()
        ids = [api.post(RUNS, json={"repository": "bench/small", "prompt": prompt}).json()["run"]["id"]
               for _ in range(args.runs)]
        done: dict[str, dict[str, Any]] = {}
        while len(done) < len(ids):
            for run_id in ids:
                if run_id not in done:
                    got = api.get(f"{RUNS}/{run_id}").json()["run"]
                    if got["status"] in ("idle", "failed"):
                        done[run_id] = got
            peak = max(peak, proc_stats(server.proc.pid)[1])
            time.sleep(0.5)
        wall = time.monotonic() - t0
        cpu1, _ = proc_stats(server.proc.pid)
        failures = [r["error"] for r in done.values() if r["status"] != "idle"]
        result["concurrency"] = {"runs": args.runs, "wall_s": wall, "single_run_s": single_s,
                                 "wall_vs_serial": wall / (single_s * args.runs), "failures": failures,
                                 "server_cpu_s": cpu1 - cpu0, "server_peak_rss_mb": peak / 1e6}
        for run_id in ids:
            api.post(f"{RUNS}/{run_id}/messages", json={"endSession": True})
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    write("load-bench", result, args.smoke)
    print(load_note(result))
    for clients, row in result["polling"].items():
        o, b = row["ours"], row["bare_aiohttp"]
        print(f"polling c={clients} ({o['client']}): ours p50 {o['p50_ms']:.1f} ms p99 {o['p99_ms']:.1f} ms {o['rps']:.0f} req/s "
              f"({o['errors']} errors); bare aiohttp p50 {b['p50_ms']:.1f} ms "
              f"p99 {b['p99_ms']:.1f} ms {b['rps']:.0f} req/s")
    s = result["sse"]
    print(f"SSE {s['subscribers']} subscribers: lag p50 {s['p50_ms']:.1f} ms p99 {s['p99_ms']:.1f} ms "
          f"over {s['events_measured']} deliveries")
    b = result["sse_bare"]
    print(f"SSE bare aiohttp, same client: lag p50 {b['p50_ms']:.1f} ms p99 {b['p99_ms']:.1f} ms "
          f"over {b['events_measured']} deliveries")
    c = result["concurrency"]
    print(f"{c['runs']} concurrent runs: wall {c['wall_s']:.1f} s (one alone {c['single_run_s']:.1f} s), "
          f"{len(c['failures'])} failures, server CPU {c['server_cpu_s']:.1f} s, peak RSS {c['server_peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
