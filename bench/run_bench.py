"""Issue-2 benchmark: for N runs, POST -> agent session ready (median, p90), and a full scripted
turn end to end through critique-local compared, in the same run, with the same turn sent
directly to a bare `opencode serve` on the host (our overhead as a ratio).

Both paths use the same model: the scripted model behind our gateway (the bare OpenCode reaches
it with an inference-scoped key), so the ratio isolates orchestration: checkout, container,
OpenCode start inside it, event persistence, diff collection and teardown.

    .venv/bin/python bench/run_bench.py [--runs N]

Loopback only. Prints a table and writes bench/results/run-bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from critique_local.agent.opencode.config import HEADLESS_PERMISSIONS  # noqa: E402
from critique_local.clock import ms_between  # noqa: E402
from tests.helpers import Server, free_port, git, make_repo  # noqa: E402

PROMPT = ("Add a greeting.\n@write greeting.py\ndef greet(name):\n    return f'Hello, {name}!'\n@end\n"
          "@bash python3 -c 'import greeting; print(greeting.greet(1))'\n@say Added greeting.py.")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p90": pct(values, 0.9), "min": min(values), "max": max(values)}


def ours(server: Server, key: str) -> dict[str, float]:
    with server.client(key) as api:
        t0 = time.monotonic()
        run = api.post("/api/v1/coding-agent/runs", json={"repository": "bench/small", "prompt": PROMPT}).json()["run"]
        while True:
            run = api.get(f"/api/v1/coding-agent/runs/{run['id']}").json()["run"]
            if run["terminal"]:
                break
            time.sleep(0.02)
        total = (time.monotonic() - t0) * 1000
    assert run["status"] == "completed", run["error"]
    return {"ready_ms": ms_between(run["createdAt"], run["agentReadyAt"]), "e2e_ms": total,
            "turn_ms": ms_between(run["agentReadyAt"], run["finishedAt"])}


def bare(server: Server, key: str, repo: Path, opencode: Path) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bench-bare-"))
    try:
        t0 = time.monotonic()
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
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=120) as oc:
                while True:
                    try:
                        if oc.get("/global/health", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.05)
                sid = oc.post("/session", json={"title": "bench"}).json()["id"]
                ready = (time.monotonic() - t0) * 1000
                t_turn = time.monotonic()
                res = oc.post(f"/session/{sid}/message", json={
                    "parts": [{"type": "text", "text": PROMPT}], "agent": "build",
                    "model": {"providerID": "gw", "modelID": "critique/scripted"}}).json()
                assert not res["info"].get("error"), res["info"]
                subprocess.run(["git", "add", "-A"], cwd=work / "ws", check=True)
                subprocess.run(["git", "diff", "--cached", "HEAD"], cwd=work / "ws", check=True, capture_output=True)
                turn = (time.monotonic() - t_turn) * 1000
            total = (time.monotonic() - t0) * 1000
        finally:
            proc.kill()
            proc.wait()
        return {"ready_ms": ready, "e2e_ms": total, "turn_ms": turn}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    opencode = next((ROOT / ".cache").glob("opencode-*/opencode"))
    base = Path(tempfile.mkdtemp(prefix="bench-"))
    server = Server(base, extra_env={"CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS": "1"})
    repo = make_repo(server.repos, "bench/small", {"README.md": "# bench\n", "app.py": "x = 1\n"})
    server.start()
    try:
        key = server.new_key("bench")
        ours(server, key)  # warm-up: image layers and page cache
        bare(server, key, repo, opencode)
        rows: dict[str, list[dict[str, float]]] = {"ours": [], "bare": []}
        for _ in range(args.runs):  # interleaved, so both see the same machine noise
            rows["ours"].append(ours(server, key))
            rows["bare"].append(bare(server, key, repo, opencode))
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "runs": args.runs}
    for name, samples in rows.items():
        result[name] = {metric: summary([s[metric] for s in samples]) for metric in ("ready_ms", "e2e_ms", "turn_ms")}
    result["ratio_e2e_median"] = result["ours"]["e2e_ms"]["median"] / result["bare"]["e2e_ms"]["median"]
    result["ratio_turn_median"] = result["ours"]["turn_ms"]["median"] / result["bare"]["turn_ms"]["median"]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "run-bench.json").write_text(json.dumps(result, indent=2))
    print(f"N={args.runs} runs each, interleaved, {os.cpu_count()} CPUs")
    print(f"{'':40}{'median':>10}{'p90':>10}{'min':>10}{'max':>10}")
    for name, label in (("ours", "critique-local"), ("bare", "bare opencode serve")):
        for metric, what in (("ready_ms", "POST->agent ready"), ("e2e_ms", "full turn e2e"), ("turn_ms", "turn only")):
            s = result[name][metric]
            print(f"{label:<22}{what:<18}{s['median']:>10.0f}{s['p90']:>10.0f}{s['min']:>10.0f}{s['max']:>10.0f}")
    print(f"overhead ratio (full turn e2e, median): {result['ratio_e2e_median']:.2f}x")
    print(f"overhead ratio (turn only, median):     {result['ratio_turn_median']:.2f}x")


if __name__ == "__main__":
    main()
