"""Running git on the server's side: bounded in time, errors as run failures, and never with
user or system configuration."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from critique_local.errors import RunFailure


def clean_env() -> dict[str, str]:
    """Environment for git on the server's own repositories: no user or system config, no prompts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull})
    return env


async def run_git(args: list[str], cwd: Path | None, env: dict[str, str], timeout_s: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise RunFailure("clone_timeout", f"git {args[0]} took longer than {timeout_s:.0f}s") from exc
    except BaseException:  # cancelled: a push must not land after its run was reported ended
        proc.kill()
        await asyncio.shield(proc.wait())
        raise
    if proc.returncode != 0:
        raise RunFailure("git_error", f"git {args[0]} failed: {err.decode(errors='replace').strip()[-500:]}")
    return out.decode().strip()
