"""Prepare a run's checkout on the server and pack it for upload into a sandbox.

The clone happens in a private temporary directory that no agent can touch, so running git
there is safe (an agent-controlled ``.git/config`` could otherwise run commands on the host).
Remote credentials are passed to git through the environment, never on the command line or
into the packed checkout; the packed checkout has no remote at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from critique_local.config import GitSettings
from critique_local.errors import ErrorCode, RunFailure
from critique_local.repos.git import clean_env, run_git
from critique_local.repos.hosts import Source
from critique_local.repos.mirrors import Mirrors

SANDBOX_UID = 1000
CHECKOUT_FORMAT = 2  # part of the cache key: packed checkouts of another format are not reused
NEUTRAL_ATTRIBUTES = "* -text -filter -ident !eol !working-tree-encoding\n"


@dataclass(frozen=True)
class Checkout:
    tar_path: Path
    base_commit: str
    base_ref: str
    base_branch: str | None  # None when the base is a tag or commit
    workdir: Path | None  # temporary (removed by :func:`discard`); None: tar_path is a cached checkout
    key: str | None = None  # what the packed checkout holds (repository, commit, branch, depth); None: uncached


async def prepare(git: GitSettings, source: Source | None, ref: str | None, data_dir: Path,
                  mirrors: Mirrors | None = None) -> Checkout:
    """The run's checkout, packed for upload. With the mirror cache: resolve ``ref`` in the
    local mirror (fetched first), then reuse a packed checkout of that commit if one is cached,
    else build it with a shallow fetch from the mirror (``git.checkout_depth``)."""
    if source is None:
        raise RunFailure(ErrorCode.REPOSITORY_NOT_FOUND, "the repository is no longer available")
    if mirrors is None or not git.mirror_cache:
        return await _prepare_direct(git, source, ref, data_dir / "tmp")
    mirror = await mirrors.ensure(source)
    env = clean_env()
    commit, branch = await _resolve_ref(mirror, env, ref, prefix="refs/heads/")
    key = f"{source.full_name}\0{commit}\0{branch or ''}\0{git.checkout_depth}\0{CHECKOUT_FORMAT}"
    cached = data_dir / "checkouts" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.tar"
    base_ref = ref or branch or commit
    if cached.exists():
        await asyncio.to_thread(os.utime, cached)
        return Checkout(cached, commit, base_ref, branch, None, key)
    workdir = await asyncio.to_thread(_new_workdir, data_dir / "tmp")
    try:
        ws = workdir / "ws"
        t = git.clone_timeout_s
        await run_git(["init", "--quiet", str(ws)], None, env, t)
        depth = [f"--depth={git.checkout_depth}"] if git.checkout_depth else []
        await run_git(["fetch", "--quiet", *depth, "--", str(mirror), commit], ws, env, t)
        await _checkout_and_pack(ws, env, commit, branch, workdir / "workspace.tar", t)
        cached.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(os.replace, workdir / "workspace.tar", cached)
        await asyncio.to_thread(_evict, cached.parent, git.checkout_cache_entries)
        return Checkout(cached, commit, base_ref, branch, None, key)
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, True)


async def _prepare_direct(git: GitSettings, source: Source, ref: str | None, scratch: Path) -> Checkout:
    """No cache: a full clone from the source for every run (``git.mirror_cache = false``)."""
    env = await source.git_env()
    workdir = await asyncio.to_thread(_new_workdir, scratch)
    try:
        ws = workdir / "ws"
        t = git.clone_timeout_s
        await run_git(["clone", "--quiet", "--no-checkout", "--", source.url, str(ws)], None, env, t)
        commit, branch = await _resolve_ref(ws, env, ref, prefix="refs/remotes/origin/")
        await _checkout_and_pack(ws, env, commit, branch, workdir / "workspace.tar", t)
        return Checkout(workdir / "workspace.tar", commit, ref or branch or commit, branch, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


async def _checkout_and_pack(ws: Path, env: dict[str, str], commit: str, branch: str | None, tar_path: Path,
                             timeout_s: float) -> None:
    # the work tree holds the exact bytes of the commit's blobs: no eol, text, filter, ident or
    # encoding conversion, whatever the repository's .gitattributes say (what the agent
    # leaves is read back the same way, see runs/snapshot.py)
    info = ws / ".git" / "info"
    await asyncio.to_thread(info.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread((info / "attributes").write_text, NEUTRAL_ATTRIBUTES)
    if branch:
        await run_git(["checkout", "--quiet", "-B", branch, commit], ws, env, timeout_s)
    else:
        await run_git(["checkout", "--quiet", "--detach", commit], ws, env, timeout_s)
    with contextlib.suppress(RunFailure):
        await run_git(["remote", "remove", "origin"], ws, env, timeout_s)
    proc = await asyncio.create_subprocess_exec(
        "tar", "-C", str(ws), f"--owner={SANDBOX_UID}", f"--group={SANDBOX_UID}", "--numeric-owner",
        "-cf", str(tar_path), ".", stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RunFailure(ErrorCode.CHECKOUT_FAILED, f"packing the checkout failed: {err.decode()[-300:]}")


def _evict(folder: Path, keep: int) -> None:
    entries = sorted(folder.glob("*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        old.unlink(missing_ok=True)


async def _resolve_ref(repo: Path, env: dict[str, str], ref: str | None, prefix: str) -> tuple[str, str | None]:
    """A branch (checked out under its own name), else a tag or commit (detached); no ref: the
    default branch. ``prefix``: where the source's branches are in ``repo``."""
    if not ref:
        commit = await run_git(["rev-parse", "--verify", "HEAD^{commit}"], repo, env, 60)
        head = await run_git(["symbolic-ref", "HEAD"], repo, env, 60)
        return commit, head.removeprefix("refs/heads/") or None
    try:
        commit = await run_git(["rev-parse", "--verify", "--quiet", f"{prefix}{ref}^{{commit}}"], repo, env, 60)
        return commit, ref
    except RunFailure:
        pass
    try:
        return await run_git(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"], repo, env,
                             60), None
    except RunFailure as exc:
        raise RunFailure(ErrorCode.REF_NOT_FOUND, f"ref {ref!r} does not exist in the repository") from exc


def _new_workdir(scratch: Path) -> Path:
    scratch.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="checkout-", dir=scratch))


async def discard(checkout: Checkout) -> None:
    """Remove the temporary checkout (in a worker thread: a large tree takes a while)."""
    if checkout.workdir is not None:
        await asyncio.to_thread(shutil.rmtree, checkout.workdir, True)
