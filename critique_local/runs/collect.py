"""Read a turn's results: the sandbox sends a snapshot of its work tree as git objects
(``runs/snapshot.py``), and the server computes changed paths, diff stats and the patch itself,
in the run's own repository (``repos/workrepo.py``), against the base commit.

Everything stays bytes: the patch is exactly what ``git diff-tree --binary`` writes (so ``git
apply`` recreates the sandbox's files byte for byte, whatever their encoding), and it is what
publishing commits. Sizes are bounded: the pack by ``publish.max_bundle_bytes`` before it is
read, the patch by ``limits.max_patch_bytes`` while it is written (``patch_too_large``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from critique_local.repos.workrepo import Numstat, RunRepo
from critique_local.runs import snapshot
from critique_local.runs.timeline import Timeline
from critique_local.sandboxes.base import Sandbox


def path_text(path: bytes) -> str:
    """A path for JSON: UTF-8, bytes that are not valid UTF-8 shown as U+FFFD (the patch keeps
    the exact bytes)."""
    return path.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class TurnResult:
    """Cumulative results against the base commit, plus this turn's own stats. ``tree`` is the
    tree the patch leads to (verified by the server); ``nested`` the nested repositories whose
    files were taken as ordinary files."""

    changed_paths: list[str]
    additions: int
    deletions: int
    patch: bytes
    tree: str
    turn_stats: dict[str, int]
    nested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # git's messages about files it could not read

    @property
    def diff_stats(self) -> dict[str, int]:
        return {"filesChanged": len(self.changed_paths), "additions": self.additions, "deletions": self.deletions}


async def collect(sandbox: Sandbox, repo: RunRepo, base_commit: str, previous: str, max_patch_bytes: int,
                  max_pack_bytes: int, *, base_tree: str | None = None,
                  disk: snapshot.DiskCheck | None = None, timeline: Timeline | None = None) -> TurnResult:
    """``previous``: the tree (or commit) the turn started from, for the turn's own stats;
    ``base_tree``: the base commit's tree when the caller knows it; ``disk``: the free-space
    check done by the snapshot's command; ``timeline``: its steps are timed there. Raises :class:`RunFailure` ``collect_failed`` or
    ``patch_too_large``, or what ``disk`` raises.

    The diffs against the base and against ``previous`` are computed side by side; a tree that
    is the base's (or ``previous``) needs no diff at all."""
    timeline = timeline or Timeline()
    base_tree = base_tree or await repo.tree_of(base_commit)
    with timeline.step("collect.snapshot"):
        snap = await snapshot.take(sandbox, base_tree, max_pack_bytes, disk)
    with timeline.step("collect.index"):
        await repo.add_pack(snap.pack, snap.tree)
    unchanged = Numstat([], 0, 0)

    async def total() -> Numstat:
        return unchanged if snap.tree == base_tree else await repo.numstat(base_tree, snap.tree)

    async def patch() -> bytes:
        return b"" if snap.tree == base_tree else await repo.patch(base_tree, snap.tree, max_patch_bytes)

    async def turn() -> Numstat | None:
        if previous == base_commit or previous == base_tree:
            return None  # the same as the total
        if previous == snap.tree:
            return unchanged
        return await repo.numstat(previous, snap.tree) if await repo.has(f"{previous}^{{tree}}") else None

    with timeline.step("collect.diff"):
        results = await asyncio.gather(total(), patch(), turn(), return_exceptions=True)
    for failed in results:
        if isinstance(failed, BaseException):
            raise failed
    stats, diff, own = results
    assert isinstance(stats, Numstat) and isinstance(diff, bytes) and not isinstance(own, BaseException)
    own = own or stats
    return TurnResult([path_text(p) for p in stats.paths], stats.additions, stats.deletions, diff, snap.tree,
                      own.as_stats(), [path_text(p) for p in snap.nested], snap.skipped)
