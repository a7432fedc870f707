"""Helpers of a turn's overlapping steps (``runs/turn.py``) and its timeline (``runs/timeline.py``)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from critique_local.runs.timeline import Timeline
from critique_local.runs.turn import settle


async def test_settle_cancels_what_runs_and_swallows_what_failed() -> None:
    running = asyncio.create_task(asyncio.sleep(60))
    await settle(running)
    assert running.cancelled()

    async def fail() -> None:
        raise RuntimeError("nobody needs this outcome")

    failed = asyncio.create_task(fail())
    await asyncio.sleep(0)
    await settle(failed)  # does not raise
    assert isinstance(failed.exception(), RuntimeError)
    done = asyncio.create_task(asyncio.sleep(0, result=3))
    await asyncio.wait({done})
    await settle(done)  # a finished task is left as it is
    assert done.result() == 3


async def test_settle_lets_the_callers_cancellation_through() -> None:
    stubborn_started = asyncio.Event()

    async def stubborn() -> None:
        stubborn_started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(60)  # takes its time to end

    inner = asyncio.create_task(stubborn())
    await stubborn_started.wait()
    outer = asyncio.create_task(settle(inner))
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    inner.cancel()
    await asyncio.wait({inner})


async def test_timeline_steps_and_log_line(caplog: pytest.LogCaptureFixture) -> None:
    timeline = Timeline()
    with timeline.step("a"):
        await asyncio.sleep(0.01)
    with pytest.raises(ValueError), timeline.step("b"):
        raise ValueError
    timeline.mark("c")
    assert [name for name, _, _ in timeline.steps] == ["a", "b", "c"]
    assert timeline.steps[0][2] >= 9 and timeline.steps[2][2] == 0
    with caplog.at_level(logging.DEBUG, logger="critique_local.timeline"):
        timeline.log("run r turn 1")
    assert caplog.records[-1].getMessage().startswith("run r turn 1 timeline (ms, +start/duration): a +0/")
