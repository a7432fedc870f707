"""Issue-3 benchmark: a warm follow-up (message -> agent working) against a chained cold
follow-up on the same repository (message after expiry -> the chained run's agent working),
as a ratio; and the time from endSession to container gone.

"Agent working" is the first ``step.start`` event of the turn (OpenCode has called the model),
read from the SSE stream; times are client wall-clock from the POST.

    .venv/bin/python bench/session_bench.py [--runs N] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import NO_RATE_LIMIT, add_smoke, get, load_note, machine, write  # noqa: E402
from tests.helpers import Server, make_repo, wait_for  # noqa: E402

RUNS = "/api/v1/coding-agent/runs"


def until_working(api: httpx.Client, run_id: str, after: int) -> None:
    with connect_sse(api, "GET", f"{RUNS}/{run_id}/stream", params={"after": str(after)},
                     timeout=httpx.Timeout(30, read=120)) as source:
        for sse in source.iter_sse():
            if sse.event == "builder.event" and json.loads(sse.data).get("type") == "step.start":
                return
    raise RuntimeError("stream ended before the agent started")


def last_event(api: httpx.Client, run_id: str) -> int:
    events = get(api, f"{RUNS}/{run_id}", params={"events": "1"}).json()["run"]["events"]
    return int(events[-1]["id"]) if events else 0


def containers(run_id: str) -> list[str]:
    return subprocess.run(["docker", "ps", "-aq", "--filter", f"label=critique.run={run_id}"],
                          capture_output=True, text=True, check=True).stdout.split()


def one(api: httpx.Client, idle_timeout_s: float) -> dict[str, float]:
    run = api.post(RUNS, json={"repository": "bench/small", "prompt": "@say first"}).json()["run"]["id"]
    wait_for(api, run, {"idle"})
    after = last_event(api, run)
    t0 = time.monotonic()
    assert api.post(f"{RUNS}/{run}/messages", json={"prompt": "@bash true\n@say warm"}).status_code == 202
    until_working(api, run, after)
    warm = (time.monotonic() - t0) * 1000
    wait_for(api, run, {"idle"})
    wait_for(api, run, {"completed"}, timeout_s=idle_timeout_s + 30)  # let the session expire
    t0 = time.monotonic()
    chained = api.post(f"{RUNS}/{run}/messages", json={"prompt": "@bash true\n@say cold",
                                                             "fallback": "chain"}).json()["run"]["id"]
    until_working(api, chained, 0)
    cold = (time.monotonic() - t0) * 1000
    wait_for(api, chained, {"idle"})
    t0 = time.monotonic()
    assert api.post(f"{RUNS}/{chained}/messages", json={"endSession": True}).status_code == 200
    gone = (time.monotonic() - t0) * 1000
    assert containers(chained) == []
    return {"warm_ms": warm, "chained_ms": cold, "end_session_ms": gone}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.runs = 1
    idle = 3.0
    base = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    server = Server(base, extra_env={**NO_RATE_LIMIT, "CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": str(idle),
                                     "CRITIQUE_LOCAL_SANDBOX_REAP_INTERVAL_S": "0.2"})
    make_repo(server.repos, "bench/small", {"README.md": "# bench\n"})
    server.start()
    try:
        with server.client(server.new_key("bench")) as api:
            if not args.smoke:
                one(api, idle)  # warm-up
            samples = [one(api, idle) for _ in range(args.runs)]
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    result: dict[str, Any] = {"runs": args.runs, "machine": machine()}
    for metric in ("warm_ms", "chained_ms", "end_session_ms"):
        values = [s[metric] for s in samples]
        result[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    result["ratio_chained_over_warm"] = result["chained_ms"]["median"] / result["warm_ms"]["median"]
    write("session-bench", result, args.smoke)
    print(f"N={args.runs}; {load_note(result)}")
    for metric, label in (("warm_ms", "warm follow-up: message -> agent working"),
                          ("chained_ms", "chained cold follow-up: message -> agent working"),
                          ("end_session_ms", "endSession -> container gone")):
        s = result[metric]
        print(f"{label:<50} median {s['median']:7.0f} ms  (min {s['min']:.0f}, max {s['max']:.0f})")
    print(f"chained / warm (median): {result['ratio_chained_over_warm']:.1f}x")


if __name__ == "__main__":
    main()
