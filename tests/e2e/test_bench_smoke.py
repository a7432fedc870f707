"""Benchmarks must not rot: every ``bench/*.py`` (except ``_*`` helpers) runs with ``--smoke``
(a few iterations, numbers printed, nothing about speed asserted) and must exit 0.

New benchmarks are picked up by the glob. To keep the file's wall time low on two cores, the
selected benchmarks run as subprocesses two at a time as soon as the first of them is needed;
each test then waits for its own.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHES = sorted(p.name for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
PARALLEL = 2
TIMEOUT_S = 900  # one smoke run, on a loaded machine

pytestmark = pytest.mark.e2e


def _smoke(name: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        res = subprocess.run([sys.executable, str(ROOT / "bench" / name), "--smoke"], cwd=ROOT,
                             capture_output=True, text=True, timeout=TIMEOUT_S)
        code, out = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = -1, f"timed out after {TIMEOUT_S} s\n{exc.stdout!r}\n{exc.stderr!r}"
    return code, out, time.monotonic() - t0


@pytest.fixture(scope="module")
def smoke_runs(request: pytest.FixtureRequest) -> dict[str, Future[tuple[int, str, float]]]:
    here = request.node.nodeid  # run only the benchmarks this session selected
    wanted = [item.callspec.params["bench"] for item in request.session.items
              if item.nodeid.startswith(here) and hasattr(item, "callspec")]
    pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="bench-smoke")
    request.addfinalizer(pool.shutdown)
    return {name: pool.submit(_smoke, name) for name in wanted}


def test_the_glob_finds_the_benchmarks() -> None:
    assert "run_bench.py" in BENCHES and "load_bench.py" in BENCHES


@pytest.mark.parametrize("bench", BENCHES)
def test_benchmark_smoke_run_exits_zero(bench: str, smoke_runs: dict[str, Future[tuple[int, str, float]]]) -> None:
    code, out, took_s = smoke_runs[bench].result()
    print(f"{bench} --smoke: exit {code} after {took_s:.0f} s\n{out[-3000:]}")
    assert code == 0, f"bench/{bench} --smoke exited {code}:\n{out[-6000:]}"
