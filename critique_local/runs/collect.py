"""Read a turn's results: the sandbox sends a snapshot of its work tree as git objects
(``runs/snapshot.py``), and the server computes changed paths, diff stats and the patch itself,
in the run's own repository (``repos/workrepo.py``), against the base commit.

Everything stays bytes: the patch is exactly what ``git diff-tree --binary`` writes (so ``git
apply`` recreates the sandbox's files byte for byte, whatever their encoding), and it is what
publishing commits. Sizes are bounded: the pack by ``publish.max_bundle_bytes`` before it is
read, the patch by ``limits.max_patch_bytes`` while it is written (``patch_too_large``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from critique_local.repos.workrepo import RunRepo
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
                  max_pack_bytes: int, *, timeline: Timeline | None = None) -> TurnResult:
    """``previous``: the tree (or commit) the turn started from, for the turn's own stats;
    ``timeline``: its steps are timed there. Raises :class:`RunFailure` ``collect_failed`` or
    ``patch_too_large``."""
    timeline = timeline or Timeline()
    base_tree = await repo.tree_of(base_commit)
    with timeline.step("collect.snapshot"):
        snap = await snapshot.take(sandbox, base_tree, max_pack_bytes, timeline)
    with timeline.step("collect.index"):
        await repo.add_pack(snap.pack, snap.tree)
    with timeline.step("collect.diff"):
        total = await repo.numstat(base_tree, snap.tree)
        patch = await repo.patch(base_tree, snap.tree, max_patch_bytes) if total.paths else b""
        if previous != base_commit and await repo.has(f"{previous}^{{tree}}"):
            turn = await repo.numstat(previous, snap.tree)
        else:
            turn = total
    return TurnResult([path_text(p) for p in total.paths], total.additions, total.deletions, patch, snap.tree,
                      turn.as_stats(), [path_text(p) for p in snap.nested], snap.skipped)
