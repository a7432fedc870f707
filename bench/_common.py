"""What every benchmark shares: the ``--smoke`` switch, polling a run that survives the rate
limit (429 + Retry-After), percentiles, the machine description (CPUs, load average at start
and end: numbers taken under load are not quiet-machine numbers) and writing results.

A module whose name starts with ``_`` is not a benchmark: tests/e2e/test_bench_smoke.py runs
every other ``bench/*.py`` with ``--smoke``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RUNS = "/api/v1/coding-agent/runs"
# Benchmark servers measure the server, not its rate limiter: polling every few ms would hit it.
NO_RATE_LIMIT = {"CRITIQUE_LOCAL_LIMITS_REQUESTS_PER_MINUTE": "0"}


def add_smoke(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help="a few iterations so CI sees the benchmark still works; numbers printed, not asserted, "
                             "results not written")


def get(api: httpx.Client, path: str, **kwargs: Any) -> httpx.Response:
    """GET, waiting out 429s (Retry-After seconds, at most 60 in all); raises on other errors."""
    deadline = time.monotonic() + 60
    while True:
        resp = api.get(path, **kwargs)
        if resp.status_code == 429 and time.monotonic() < deadline:
            time.sleep(min(5.0, float(resp.headers.get("Retry-After", "1"))))
            continue
        resp.raise_for_status()
        return resp


def post(api: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a JSON body and return the ``run`` object; a non-2xx answer raises with the body."""
    resp = api.post(path, json=body)
    if resp.status_code >= 300:
        raise RuntimeError(f"POST {path} -> {resp.status_code}: {resp.text[:500]}")
    run: dict[str, Any] = resp.json()["run"]
    return run


def poll(api: httpx.Client, run_id: str, statuses: set[str], interval_s: float = 0.02, timeout_s: float = 600,
         events: bool = False) -> dict[str, Any]:
    """GET the run until its status is in ``statuses``; returns the run object."""
    deadline = time.monotonic() + timeout_s
    params = {"events": "1"} if events else {}
    while True:
        run: dict[str, Any] = get(api, f"{RUNS}/{run_id}", params=params).json()["run"]
        if run["status"] in statuses:
            return run
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run_id} still {run['status']}/{run.get('lifecycle')} after {timeout_s} s")
        time.sleep(interval_s)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def summary(values: list[float]) -> dict[str, float]:
    """median, p90, min, max (NaN for no samples)."""
    if not values:
        return {"median": float("nan"), "p90": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": float(statistics.median(values)), "p90": pct(values, 0.9), "min": min(values), "max": max(values)}


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "node": platform.node(),
            "loadavg_start": list(os.getloadavg())}


def load_note(result: dict[str, Any]) -> str:
    m = result["machine"]
    return (f"{m['cpus']} CPUs, load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in m['loadavg_start'])} at start, "
            f"{'/'.join(f'{x:.1f}' for x in m.get('loadavg_end', m['loadavg_start']))} at end")


def write(name: str, result: dict[str, Any], smoke: bool) -> None:
    """bench/results/<name>.json; a smoke run writes nothing (its numbers mean little)."""
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    if smoke:
        return
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
