"""The mirror cache: one bare mirror per repository under ``<data_dir>/mirrors``, fetched (at
most every ``git.mirror_max_age_s``) before a run resolves its ref. Checkouts are then built
from the mirror with a shallow local fetch, so a run's preparation no longer depends on the
repository's history or on the remote's speed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from pathlib import Path

from critique_local.config import GitSettings
from critique_local.repos.git import run_git
from critique_local.repos.hosts import Source


class Mirrors:
    def __init__(self, root: Path, git: GitSettings) -> None:
        self.root = root
        self.git = git
        self._locks: dict[str, asyncio.Lock] = {}
        self._fetched: dict[str, float] = {}

    def path(self, source: Source) -> Path:
        owner, name = source.full_name.split("/", 1)
        tag = hashlib.sha256(source.url.encode()).hexdigest()[:8]  # a moved source gets a new mirror
        return self.root / source.kind / owner / f"{name}-{tag}.git"

    async def ensure(self, source: Source) -> Path:
        """The repository's mirror, created or brought up to date."""
        path = self.path(source)
        key = str(path)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            fresh = time.monotonic() - self._fetched.get(key, -1e9) < self.git.mirror_max_age_s
            if path.exists() and fresh:
                return path
            env = await source.git_env()
            t = self.git.clone_timeout_s
            if not path.exists():
                partial = path.with_name(path.name + ".partial")
                await asyncio.to_thread(_remove, partial)
                partial.parent.mkdir(parents=True, exist_ok=True)
                await run_git(["clone", "--quiet", "--mirror", "--", source.url, str(partial)], None, env, t)
                await asyncio.to_thread(os.replace, partial, path)
            else:
                await run_git(["fetch", "--quiet", "--prune", "--", source.url,
                               "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"], path, env, t)
                head = await _remote_head(source, env, t)
                if head:
                    await run_git(["symbolic-ref", "HEAD", f"refs/heads/{head}"], path, env, t)
            self._fetched[key] = time.monotonic()
            return path


async def _remote_head(source: Source, env: dict[str, str], timeout_s: float) -> str | None:
    out = await run_git(["ls-remote", "--symref", "--", source.url, "HEAD"], None, env, timeout_s)
    for line in out.splitlines():
        if line.startswith("ref: ") and line.endswith("\tHEAD"):
            return line[5:-5].removeprefix("refs/heads/")
    return None


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
