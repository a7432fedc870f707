"""Running git on the server's side: bounded in time, errors as run failures, and never with
user or system configuration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from critique_local.errors import ErrorCode, RunFailure


def clean_env() -> dict[str, str]:
    """Environment for git on the server's own repositories: no user or system config, no prompts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull})
    return env


async def run_git(args: list[str], cwd: Path | None, env: dict[str, str], timeout_s: float) -> str:
    """git's stdout as text (stripped); :class:`RunFailure` ``git_error`` when git fails,
    ``clone_timeout`` after ``timeout_s`` seconds."""
    return (await run_git_bytes(args, cwd, env, timeout_s)).decode(errors="replace").strip()


class OutputTooLarge(Exception):
    """git wrote more than ``max_bytes`` to stdout (it was killed)."""


async def run_git_bytes(args: list[str], cwd: Path | None, env: dict[str, str], timeout_s: float, *,
                        max_bytes: int | None = None, stdin: bytes | None = None,
                        ok_codes: tuple[int, ...] = (0,)) -> bytes:
    """git's exact stdout bytes. With ``max_bytes`` git is killed as soon as it writes more
    (:class:`OutputTooLarge`); ``stdin`` is fed to it; exit codes in ``ok_codes`` are success.
    Errors as for :func:`run_git`."""
    proc = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
    )
    try:
        out, err = await asyncio.wait_for(_communicate(proc, stdin, max_bytes), timeout_s)
    except OutputTooLarge:
        await _reap(proc)
        raise
    except TimeoutError as exc:
        await _reap(proc)
        raise RunFailure(ErrorCode.CLONE_TIMEOUT, f"git {args[0]} took longer than {timeout_s:.0f}s") from exc
    except BaseException:  # cancelled: a push must not land after its run was reported ended
        await asyncio.shield(_reap(proc))
        raise
    if proc.returncode not in ok_codes:
        command = next((a for a in args if not a.startswith("-") and "=" not in a), args[0])
        raise RunFailure(ErrorCode.GIT_ERROR, f"git {command} failed: {err.decode(errors='replace').strip()[-500:]}")
    return out


REAP_TIMEOUT_S = 30.0
log = logging.getLogger(__name__)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill git and wait for it, within :data:`REAP_TIMEOUT_S`. On Python 3.11
    ``Process.wait()`` returns only once every pipe of the process is closed (CPython's
    ``BaseSubprocessTransport._call_connection_lost`` wakes its waiters), and a pipe whose reader
    stopped early, paused by flow control with git's output still in it, never reads its end of
    file: so what is left is read and dropped first. Without this a patch over its limit (git
    killed mid-output) left the turn waiting forever."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()

    async def drain(stream: asyncio.StreamReader | None) -> None:
        if stream is not None:
            with contextlib.suppress(RuntimeError, ConnectionError):  # RuntimeError: another task reads it
                while await stream.read(65536):
                    pass

    try:
        await asyncio.wait_for(asyncio.gather(drain(proc.stdout), drain(proc.stderr), proc.wait()), REAP_TIMEOUT_S)
    except TimeoutError:
        log.warning("git (pid %s) was killed but did not end within %.0f s", proc.pid, REAP_TIMEOUT_S)


async def _communicate(proc: asyncio.subprocess.Process, stdin: bytes | None,
                       max_bytes: int | None) -> tuple[bytes, bytes]:
    if max_bytes is None:
        return await proc.communicate(stdin)
    assert proc.stdout is not None and proc.stderr is not None

    async def feed() -> None:
        if proc.stdin is not None:
            with contextlib.suppress(ConnectionError):
                proc.stdin.write(stdin or b"")
                await proc.stdin.drain()
                proc.stdin.close()

    async def read_out() -> bytes:
        assert proc.stdout is not None
        chunks: list[bytes] = []
        size = 0
        while chunk := await proc.stdout.read(65536):
            size += len(chunk)
            if size > max_bytes:
                raise OutputTooLarge(f"more than {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    _, out, err = await asyncio.gather(feed(), read_out(), proc.stderr.read(1_000_000))
    await proc.wait()
    return out, err
