"""The run watchdog: a sandbox's limits, watched during a turn and read when one breaks.

A sandbox that stopped (killed from outside, engine restart) ends the turn with
``sandbox_gone``; one stuck at its process limit (a fork bomb) stops it with ``process_limit``; a
turn that broke is explained by the limit it hit (``out_of_memory``, ``workspace_full``,
``sandbox_storage_full``) when one explains it; a full workspace after a turn ends the run
before git tries to write to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from critique_local.config import SandboxSettings
from critique_local.errors import AgentError, ErrorCode, RunFailure
from critique_local.runs.snapshot import DiskCheck
from critique_local.sandboxes.base import Sandbox, SandboxBackend, SandboxError

WORKSPACE = "/workspace"
WRITABLE = (WORKSPACE, "/tmp", "/home/agent", "/home/agent/.local", "/home/agent/.cache")
WATCH_INTERVAL_S = 2.0
PIDS_HEADROOM = 8  # "at the limit": within this many processes of it
PIDS_STRIKES = 3  # consecutive checks at the limit before the turn is stopped
MIN_FREE_KB = 1024
STOPPED_RECHECKS_S = (0.0, 0.25, 0.25, 0.5)
SANDBOX_GONE = "the sandbox stopped during the turn (removed from outside, or its engine restarted)"
T = TypeVar("T")


def full_of(df_output: str) -> list[str]:
    """``df -P -k`` output -> the mounts with less than :data:`MIN_FREE_KB` KiB free."""
    full = []
    for line in df_output.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 6 and fields[3].isdigit() and int(fields[3]) < MIN_FREE_KB:
            full.append(fields[5])
    return full


class Watchdog:
    def __init__(self, backend: SandboxBackend, settings: SandboxSettings) -> None:
        self.backend = backend
        self.settings = settings

    async def watch(self, sandbox: Sandbox, work: Awaitable[T], stop: Callable[[], Awaitable[None]]) -> T:
        """Run ``work`` (an agent turn); ``stop`` aborts the agent when the watchdog ends it."""
        task = asyncio.ensure_future(work)
        strikes = 0
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=WATCH_INTERVAL_S)
                if done:
                    break
                if not await self.backend.alive(sandbox.id):
                    task.cancel()
                    raise RunFailure(ErrorCode.SANDBOX_GONE, SANDBOX_GONE)
                with contextlib.suppress(SandboxError):
                    usage = await self.backend.usage(sandbox.id)
                    at_limit = usage.pids is not None and usage.pids_limit is not None and (
                        usage.pids >= usage.pids_limit - PIDS_HEADROOM)
                    strikes = strikes + 1 if at_limit else 0
                if strikes >= PIDS_STRIKES:
                    task.cancel()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(stop(), 2)
                    raise RunFailure(ErrorCode.PROCESS_LIMIT, f"the sandbox stayed at its process limit "
                                     f"(sandbox.pids_limit = {self.settings.pids_limit}): a fork bomb "
                                     "or runaway processes; the run was stopped")
            return task.result()
        except (AgentError, RunFailure) as exc:
            if isinstance(exc, RunFailure) and exc.code in (ErrorCode.PROCESS_LIMIT, ErrorCode.SANDBOX_GONE):
                raise
            if await self.stopped(sandbox):
                raise RunFailure(ErrorCode.SANDBOX_GONE, SANDBOX_GONE) from exc
            cause = await self.diagnose(sandbox)
            if cause is not None:
                raise cause from exc
            raise
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def stopped(self, sandbox: Sandbox) -> bool:
        """Whether the sandbox stopped. A killed container drops the agent's connection a moment
        before its engine reports it exited, so a running answer is asked again for a second."""
        for delay in STOPPED_RECHECKS_S:
            await asyncio.sleep(delay)
            if not await self.backend.alive(sandbox.id):
                return True
        return False

    def disk_check(self) -> DiskCheck:
        """The check of a turn's end, done by the snapshot's own command (``runs/snapshot.py``):
        a full workspace ends the run (``workspace_full``) before git tries to use it."""
        def check(df_output: str) -> None:
            if WORKSPACE in full_of(df_output):
                raise RunFailure(ErrorCode.WORKSPACE_FULL, f"the workspace is full (sandbox.workspace_mb = "
                                 f"{self.settings.workspace_mb}); the run was stopped")
        return DiskCheck(WRITABLE, MIN_FREE_KB, check)

    async def full_mounts(self, sandbox: Sandbox) -> list[str]:
        """The sandbox's writable mounts with (almost) no space left."""
        try:
            res = await sandbox.exec(["df", "-P", "-k", *WRITABLE], timeout_s=30)
        except SandboxError:
            return []
        return full_of(res.stdout.decode(errors="replace"))

    async def diagnose(self, sandbox: Sandbox) -> RunFailure | None:
        """Why an agent turn broke, when the sandbox's limits explain it."""
        try:
            usage = await self.backend.usage(sandbox.id)
        except SandboxError:
            return None
        if usage.memory_limit_hits:
            return RunFailure(ErrorCode.OUT_OF_MEMORY, "the sandbox reached its memory limit (sandbox.memory_mb) and the "
                              "agent stopped: runaway memory use or output")
        full = await self.full_mounts(sandbox)
        if WORKSPACE in full:
            return RunFailure(ErrorCode.WORKSPACE_FULL, f"the workspace is full (sandbox.workspace_mb = "
                              f"{self.settings.workspace_mb})")
        if full:
            return RunFailure(ErrorCode.SANDBOX_STORAGE_FULL, f"{', '.join(full)} filled up (sandbox.home_mb / tmp_mb) and "
                              "the agent stopped: runaway output?")
        return None
