"""Issue-4 benchmark: what the gateway adds per model call. Time to first token of a streamed
chat completion through critique-local vs sent directly to the same upstream (a loopback
OpenAI-compatible stand-in), and throughput of concurrent streamed calls both ways.

    .venv/bin/python bench/gateway_bench.py [--calls N] [--concurrency C] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import NO_RATE_LIMIT, add_smoke, load_note, machine, write  # noqa: E402
from tests.helpers import Server  # noqa: E402
from tests.upstream_standin import UpstreamStandIn  # noqa: E402

BODY = {"stream": True, "messages": [{"role": "user", "content": "hello"}]}


async def ttft(client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str) -> float:
    t0 = time.perf_counter()
    async with client.stream("POST", url, json={**BODY, "model": model}, headers=headers) as resp:
        assert resp.status_code == 200, await resp.aread()
        first = None
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {") and '"content"' in line:
                first = time.perf_counter() - t0
        assert first is not None
        return first * 1000


async def throughput(url: str, headers: dict[str, str], model: str, calls: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one() -> None:
            async with sem:
                await ttft(client, url, headers, model)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(calls)))
        return calls / (time.perf_counter() - t0)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(server: Server, key: str, upstream_port: int, calls: int, concurrency: int,
                  warm_up: int = 20) -> dict[str, Any]:
    ours = (server.url + "/api/v1/chat/completions", {"Authorization": f"Bearer {key}"}, "bench/upstream")
    direct = (f"http://127.0.0.1:{upstream_port}/v1/chat/completions", {}, "bench-upstream")
    lat: dict[str, list[float]] = {"ours": [], "direct": []}
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(warm_up):
            await ttft(client, *ours)
            await ttft(client, *direct)
        for _ in range(calls):  # interleaved
            lat["ours"].append(await ttft(client, *ours))
            lat["direct"].append(await ttft(client, *direct))
    result: dict[str, Any] = {}
    for name, values in lat.items():
        result[f"ttft_{name}_ms"] = {"p50": statistics.median(values), "p99": pct(values, 0.99)}
    result["ttft_ratio_p50"] = result["ttft_ours_ms"]["p50"] / result["ttft_direct_ms"]["p50"]
    result["ttft_added_p50_ms"] = result["ttft_ours_ms"]["p50"] - result["ttft_direct_ms"]["p50"]
    result["throughput_ours_per_s"] = await throughput(*ours, calls, concurrency)
    result["throughput_direct_per_s"] = await throughput(*direct, calls, concurrency)
    result["throughput_ratio"] = result["throughput_ours_per_s"] / result["throughput_direct_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.calls, args.concurrency = 10, 4
    upstream = UpstreamStandIn()
    upstream.start()
    base = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    config = base / "config.toml"
    config.write_text(f'[providers.up]\nbase_url = "http://127.0.0.1:{upstream.port}/v1"\napi_key = "k"\n'
                      '[[catalog]]\nid = "bench/upstream"\nprovider = "up"\nupstream_id = "bench-upstream"\n')
    server = Server(base, extra_env={**NO_RATE_LIMIT, "CRITIQUE_LOCAL_CONFIG": str(config)})
    result: dict[str, Any] = {"machine": machine()}
    server.start()
    try:
        result.update(asyncio.run(measure(server, server.new_key("bench"), upstream.port, args.calls, args.concurrency,
                                          2 if args.smoke else 20)))
    finally:
        server.stop()
        upstream.stop()
        shutil.rmtree(base, ignore_errors=True)
    result.update({"calls": args.calls, "concurrency": args.concurrency})
    write("gateway-bench", result, args.smoke)
    print(f"{args.calls} streamed calls each way, interleaved; throughput at concurrency {args.concurrency}; "
          f"{load_note(result)}")
    for name in ("direct", "ours"):
        t = result[f"ttft_{name}_ms"]
        print(f"TTFT {name:<7} p50 {t['p50']:6.2f} ms   p99 {t['p99']:6.2f} ms")
    print(f"TTFT ratio (p50): {result['ttft_ratio_p50']:.2f}x, added {result['ttft_added_p50_ms']:.2f} ms")
    print(f"throughput: direct {result['throughput_direct_per_s']:.0f}/s, through us "
          f"{result['throughput_ours_per_s']:.0f}/s (ratio {result['throughput_ratio']:.2f})")


if __name__ == "__main__":
    main()
