"""Prepare a run's checkout on the server and pack it for upload into a sandbox.

The clone happens in a private temporary directory that no agent can touch, so running git
there is safe (an agent-controlled ``.git/config`` could otherwise run commands on the host).
Remote credentials are passed to git through the environment, never on the command line or
into the packed checkout; the packed checkout has no remote at all.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from critique_local.config import GitSettings
from critique_local.errors import RunFailure
from critique_local.repos.hosts import Source

SANDBOX_UID = 1000


@dataclass(frozen=True)
class Checkout:
    tar_path: Path
    base_commit: str
    base_ref: str
    base_branch: str | None  # None when the base is a tag or commit
    workdir: Path  # temporary; removed by :func:`discard`


async def run_git(args: list[str], cwd: Path | None, env: dict[str, str], timeout_s: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError as exc:
        proc.kill()
        raise RunFailure("clone_timeout", f"git {args[0]} took longer than {timeout_s:.0f}s") from exc
    if proc.returncode != 0:
        raise RunFailure("git_error", f"git {args[0]} failed: {err.decode(errors='replace').strip()[-500:]}")
    return out.decode().strip()


async def prepare(git: GitSettings, source: Source | None, ref: str | None, scratch: Path) -> Checkout:
    if source is None:
        raise RunFailure("repository_not_found", "the repository is no longer available")
    env = await source.git_env()
    workdir = await asyncio.to_thread(_new_workdir, scratch)
    try:
        ws = workdir / "ws"
        t = git.clone_timeout_s
        await run_git(["clone", "--quiet", "--no-checkout", "--", source.url, str(ws)], None, env, t)
        if ref:
            commit, branch = await _resolve_ref(ws, env, ref)
        else:
            commit = await run_git(["rev-parse", "--verify", "HEAD^{commit}"], ws, env, t)
            branch = await run_git(["symbolic-ref", "--short", "HEAD"], ws, env, t)
        if branch:
            await run_git(["checkout", "--quiet", "-B", branch, commit], ws, env, t)
        else:
            await run_git(["checkout", "--quiet", "--detach", commit], ws, env, t)
        await run_git(["remote", "remove", "origin"], ws, env, t)
        tar_path = workdir / "workspace.tar"
        proc = await asyncio.create_subprocess_exec(
            "tar", "-C", str(ws), f"--owner={SANDBOX_UID}", f"--group={SANDBOX_UID}", "--numeric-owner",
            "-cf", str(tar_path), ".", stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RunFailure("checkout_failed", f"packing the checkout failed: {err.decode()[-300:]}")
        shutil.rmtree(ws, ignore_errors=True)
        return Checkout(tar_path, commit, ref or branch or commit, branch or None, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


async def _resolve_ref(ws: Path, env: dict[str, str], ref: str) -> tuple[str, str | None]:
    """A branch of the source (checked out under its own name), else a tag or commit (detached)."""
    try:
        commit = await run_git(["rev-parse", "--verify", "--quiet", f"refs/remotes/origin/{ref}^{{commit}}"], ws, env, 60)
        return commit, ref
    except RunFailure:
        pass
    try:
        return await run_git(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"], ws, env, 60), None
    except RunFailure as exc:
        raise RunFailure("ref_not_found", f"ref {ref!r} does not exist in the repository") from exc


def _new_workdir(scratch: Path) -> Path:
    scratch.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="checkout-", dir=scratch))


async def discard(checkout: Checkout) -> None:
    """Remove the temporary checkout (in a worker thread: a large tree takes a while)."""
    await asyncio.to_thread(shutil.rmtree, checkout.workdir, True)
