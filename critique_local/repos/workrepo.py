"""The server's own repository of a run: where the run's changes are checked, diffed and
committed, so that what a client reads and what is pushed are built from the same bytes.

One bare repository per run under ``<data_dir>/runs/<run id>.git``, made by the server, with
the base commit's objects borrowed from the repository (``git.local_root``) or its mirror
through ``objects/info/alternates``, else fetched (``--depth=1``). Each turn the sandbox sends a
git pack of the objects its tree adds to the base (see ``runs/snapshot.py``); it is indexed
with ``index-pack --strict`` (hashes recomputed, malformed objects refused) and the tree must be
complete. The patch, numstat and turn stats are then computed here, by the server's git with no
user, system or repository configuration, no attributes, no text conversion or external diff
drivers and fixed prefixes, so nothing the agent wrote into its repository can shape them.
The repository is removed when the run ends.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

from critique_local.errors import ErrorCode, RunFailure
from critique_local.repos.git import OutputTooLarge, clean_env, run_git, run_git_bytes
from critique_local.repos.hosts import Source

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
# every git command here: no replace refs, no attributes from the system or from trees
SAFE_ENV = {"GIT_NO_REPLACE_OBJECTS": "1", "GIT_ATTR_NOSYSTEM": "1", "GIT_NO_LAZY_FETCH": "1"}
# options that fix how a diff is written, whatever git's defaults or configuration say
DIFF_OPTIONS = ["-r", "--no-renames", "--no-textconv", "--no-ext-diff", "--no-color", "--full-index",
                "--src-prefix=a/", "--dst-prefix=b/", "--no-relative"]
_CONFIG = ["-c", "core.attributesFile=/dev/null", "-c", f"attr.tree={EMPTY_TREE}", "-c", "core.quotePath=true",
           "-c", "diff.noprefix=false", "-c", "diff.mnemonicPrefix=false", "-c", "core.hooksPath=/dev/null",
           "-c", "gc.auto=0", "-c", "maintenance.auto=false"]


@dataclass(frozen=True)
class Numstat:
    """``git diff --numstat -z``: changed paths (bytes, as git stores them), lines + and -."""

    paths: list[bytes]
    additions: int
    deletions: int

    def as_stats(self) -> dict[str, int]:
        return {"filesChanged": len(self.paths), "additions": self.additions, "deletions": self.deletions}


def parse_numstat(raw: bytes) -> Numstat:
    """``git diff --numstat -z --no-renames`` output -> :class:`Numstat` (binary files count 0 lines)."""
    paths: list[bytes] = []
    adds = dels = 0
    for item in raw.split(b"\0"):
        if not item:
            continue
        added, deleted, path = item.split(b"\t", 2)
        adds += int(added) if added.isdigit() else 0
        dels += int(deleted) if deleted.isdigit() else 0
        paths.append(path)
    return Numstat(paths, adds, dels)


class RunRepo:
    """``<root>/<run id>.git``; every method runs git without blocking the event loop."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.path = root / f"{run_id}.git"
        self.env = {**clean_env(), **SAFE_ENV}

    async def git(self, *args: str, timeout_s: float = 120, max_bytes: int | None = None,
                  stdin: bytes | None = None, ok_codes: tuple[int, ...] = (0,)) -> bytes:
        return await run_git_bytes([*_CONFIG, *args], self.path, self.env, timeout_s, max_bytes=max_bytes,
                                   stdin=stdin, ok_codes=ok_codes)

    async def has(self, rev: str) -> bool:
        try:
            await self.git("cat-file", "-e", rev, timeout_s=60)
            return True
        except RunFailure:
            return False

    async def ensure(self, source: Source | None, base_commit: str, mirror: Path | None,
                     timeout_s: float) -> None:
        """Create the repository (once) and make sure it holds the base commit."""
        if not self.path.exists():
            partial = self.path.with_name(self.path.name + ".partial")
            await asyncio.to_thread(shutil.rmtree, partial, True)
            await asyncio.to_thread(partial.parent.mkdir, parents=True, exist_ok=True)
            await run_git(["init", "--quiet", "--bare", "--template=", str(partial)], None, self.env, 60)
            borrowed = [p / "objects" for p in (Path(source.url) if source and source.local else None, mirror)
                        if p is not None and (p / "objects").is_dir()]
            if borrowed:
                info = partial / "objects" / "info"
                await asyncio.to_thread(info.mkdir, parents=True, exist_ok=True)
                await asyncio.to_thread((info / "alternates").write_text,
                                        "".join(f"{p.resolve()}\n" for p in borrowed))
            await asyncio.to_thread(partial.rename, self.path)
        if await self.has(f"{base_commit}^{{tree}}"):
            return
        if source is None:
            raise RunFailure(ErrorCode.REPOSITORY_NOT_FOUND, "the repository is no longer available")
        await run_git(["fetch", "--quiet", "--no-tags", "--depth=1", "--", source.url, base_commit], self.path,
                      {**await source.git_env(), **SAFE_ENV}, timeout_s)

    async def add_pack(self, pack: bytes, tree: str) -> None:
        """Index a pack from the sandbox (``--strict``: every object is hashed again, checked,
        and everything it links to must be in the pack or already here), then check that
        ``tree`` is a tree here; ``collect_failed`` otherwise."""
        try:
            if pack:
                await self.git("index-pack", "--strict", "--fix-thin", "--stdin", timeout_s=300, stdin=pack)
            kind = (await self.git("cat-file", "-t", tree, timeout_s=60)).strip()
        except RunFailure as exc:
            raise RunFailure(ErrorCode.COLLECT_FAILED, f"the changes read from the sandbox were refused: "
                                               f"{exc.message}") from exc
        if kind != b"tree":
            raise RunFailure(ErrorCode.COLLECT_FAILED, f"the sandbox reported {tree[:12]}, which is not a tree")

    async def tree_of(self, commit: str) -> str:
        return (await self.git("rev-parse", "--verify", f"{commit}^{{tree}}", timeout_s=60)).decode().strip()

    async def numstat(self, old: str, new: str) -> Numstat:
        return parse_numstat(await self.git("diff-tree", *DIFF_OPTIONS, "--numstat", "-z", old, new, "--",
                                            timeout_s=300))

    async def patch(self, old: str, new: str, max_bytes: int) -> bytes:
        """The exact patch from ``old`` to ``new`` (``git apply`` applies it); ``patch_too_large``
        over ``max_bytes``."""
        try:
            return await self.git("diff-tree", *DIFF_OPTIONS, "-p", "--binary", old, new, "--", timeout_s=300,
                                  max_bytes=max_bytes)
        except OutputTooLarge as exc:
            raise RunFailure(ErrorCode.PATCH_TOO_LARGE, f"the patch is over {max_bytes} bytes "
                                                "(limits.max_patch_bytes)") from exc

    async def check_whitespace(self, old: str, new: str, max_bytes: int) -> tuple[bool, bytes]:
        """``git diff --check`` from ``old`` to ``new``: whitespace errors (a carriage return
        before a line end is a line ending, not an error) -> (clean, report)."""
        try:
            report = await self.git("-c", "core.whitespace=cr-at-eol", "diff", *DIFF_OPTIONS, "--check", old, new,
                                    "--", timeout_s=300, max_bytes=max_bytes, ok_codes=(0, 1, 2, 3))
        except OutputTooLarge:
            return False, b"(more whitespace errors than fit the output)"
        return not report.strip(), report

    async def commit(self, tree: str, parent: str, message: str, env: dict[str, str]) -> str:
        """A commit of ``tree`` on ``parent`` (made here, by the server); ``env`` names its author."""
        out = await run_git_bytes([*_CONFIG, "commit-tree", tree, "-p", parent, "-F", "-"], self.path,
                                  {**self.env, **env}, 60, stdin=message.encode())
        return out.decode().strip()

    async def discard(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.path, True)


async def prune(root: Path, keep: set[str]) -> None:
    """Remove the repositories of runs not in ``keep`` (ended runs, leftovers of a crash)."""
    def sweep() -> None:
        if not root.is_dir():
            return
        for entry in root.iterdir():
            if entry.name.removesuffix(".git").removesuffix(".git.partial") not in keep:
                shutil.rmtree(entry, ignore_errors=True)
    await asyncio.to_thread(sweep)
