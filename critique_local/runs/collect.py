"""Read a turn's results out of the sandbox with git: changed paths, diff stats, the patch.

Everything runs inside the sandbox against the run's base commit with a throw-away index, so
new (untracked) files are included and the agent's own index is left alone. Sizes are
bounded: a patch over the configured limit fails the run instead of being loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from critique_local.errors import RunFailure
from critique_local.sandboxes.base import Sandbox

PREPARE = (
    'set -e; export GIT_INDEX_FILE=/tmp/critique-collect.index; rm -f "$GIT_INDEX_FILE"; '
    'g() { git -c core.fsmonitor=false -c core.hooksPath=/dev/null "$@"; }; '
    'g read-tree "$1"; g add -A; '
    'g diff --cached --no-renames --no-ext-diff --binary "$1" > /tmp/critique.patch; '
    'g diff --cached --no-renames --numstat -z "$1"; '
    'printf "\\0SIZE %s" "$(wc -c < /tmp/critique.patch)"; '
    'printf "\\0TREE %s" "$(g write-tree)"'
)
TURN_STATS = 'git -c core.fsmonitor=false diff --no-renames --numstat -z "$1" "$2"'



@dataclass(frozen=True)
class TurnResult:
    """Cumulative results against the base commit, plus this turn's own stats."""

    changed_paths: list[str]
    additions: int
    deletions: int
    patch: str
    tree: str
    turn_stats: dict[str, int]

    @property
    def diff_stats(self) -> dict[str, int]:
        return {"filesChanged": len(self.changed_paths), "additions": self.additions, "deletions": self.deletions}


def parse_numstat(raw: bytes) -> tuple[list[str], int, int, int, str]:
    """``git diff --numstat -z`` output + our ``SIZE n`` / ``TREE sha`` trailers -> paths, +, -,
    patch size, tree."""
    fields = raw.split(b"\0")
    size = -1
    tree = ""
    paths: list[str] = []
    adds = dels = 0
    for item in fields:
        if not item:
            continue
        if item.startswith(b"SIZE "):
            size = int(item[5:])
            continue
        if item.startswith(b"TREE "):
            tree = item[5:].decode().strip()
            continue
        added, deleted, path = item.split(b"\t", 2)
        adds += int(added) if added.isdigit() else 0
        dels += int(deleted) if deleted.isdigit() else 0
        paths.append(path.decode(errors="replace"))
    return paths, adds, dels, size, tree


async def collect(sandbox: Sandbox, base_commit: str, previous: str, max_patch_bytes: int) -> TurnResult:
    """``previous`` is the tree (or commit) the turn started from, for the turn's own stats."""
    res = await sandbox.exec(["bash", "-c", PREPARE, "collect", base_commit], timeout_s=120,
                             max_output_bytes=8_000_000)
    if not res.ok or res.truncated:
        raise RunFailure("collect_failed", f"reading the diff failed: {res.stderr.decode(errors='replace')[-300:]}")
    paths, adds, dels, size, tree = parse_numstat(res.stdout)
    if size > max_patch_bytes:
        raise RunFailure("patch_too_large", f"the patch is {size} bytes; the limit is {max_patch_bytes}")
    patch = b""
    if size > 0:
        got = await sandbox.exec(["head", "-c", str(max_patch_bytes), "/tmp/critique.patch"], timeout_s=60,
                                 max_output_bytes=max_patch_bytes)
        if not got.ok:
            raise RunFailure("collect_failed", "reading the patch failed")
        patch = got.stdout
    turn = await sandbox.exec(["bash", "-c", TURN_STATS, "stats", previous, tree], timeout_s=60)
    if not turn.ok:
        raise RunFailure("collect_failed", "reading the turn's diff stats failed")
    t_paths, t_adds, t_dels, _, _ = parse_numstat(turn.stdout)
    turn_stats = {"filesChanged": len(t_paths), "additions": t_adds, "deletions": t_dels}
    return TurnResult(paths, adds, dels, patch.decode(errors="replace"), tree, turn_stats)
