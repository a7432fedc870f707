"""A job's CancelledError means "stop" only when the job's task was cancelled: one that escapes
from an awaited operation fails the run instead of leaving it ``running`` (runs/executor.py)."""

from __future__ import annotations

import asyncio

import pytest

from critique_local.runs.executor import cancel_requested


async def test_a_cancel_of_the_job_is_a_cancel() -> None:
    seen: list[bool] = []

    async def job() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append(cancel_requested())
            raise

    task = asyncio.create_task(job())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [True]


async def test_a_cancelled_error_from_an_awaited_operation_is_not_a_cancel() -> None:
    async def job() -> bool:
        operation = asyncio.get_running_loop().create_future()
        operation.cancel()  # e.g. a library's inner future, cancelled under the job
        try:
            await operation
        except asyncio.CancelledError:
            return cancel_requested()
        return True

    assert await asyncio.create_task(job()) is False
