"""``taskKind: plan`` leaves the tree unchanged, whatever the agent did.

The plan agent may explore with a shell and start subagents (which can write files), so the
guarantee is kept by the server, not by permissions: after a plan turn, and before its results are
read, every path the turn changed in the tree is put back as the turn found it (modified and
deleted files are rewritten, new files and directories - nested repositories included - are
removed). Ignored files (caches, build output) are not part of the tree and stay. The turn's
results are then read as usual and must show no change, which proves it.
"""

from __future__ import annotations

from typing import Any

from critique_local.errors import ErrorCode, RunFailure
from critique_local.sandboxes.base import Sandbox

# $1: the tree (or commit) the turn started from. A throw-away index holds it, so the agent's own
# index and HEAD neither hide nor protect anything. The agent's global git configuration (its home
# is writable) is not read; its repository configuration can at most make this fail, which the
# check after collecting turns into plan_changed_tree.
RESTORE = (
    'set -e; d=/tmp/critique-restore; export GIT_INDEX_FILE=$d.index GIT_CONFIG_GLOBAL=/dev/null; '
    'rm -f "$GIT_INDEX_FILE"; g() { git -c core.fsmonitor=false -c core.hooksPath=/dev/null '
    '-c core.attributesFile=/dev/null -c core.quotePath=false "$@"; }; '
    'g read-tree "$1"; g update-index -q --refresh > /dev/null || true; '
    'g diff-files --name-only -z > $d.changed; '
    'if [ -s $d.changed ]; then g checkout-index -f -z --stdin < $d.changed; fi; : > $d.new; '
    # a new .gitignore can hide other new files until it is gone itself: repeat (bounded)
    'for i in 1 2 3 4 5; do g ls-files -z --others --exclude-standard --directory > $d.n; '
    '[ -s $d.n ] || break; cat $d.n >> $d.new; g clean -ffdq; done; '
    'cat $d.changed $d.new | tr -cd "\\0" | wc -c; cat $d.changed $d.new | head -c 1000000; '
    'rm -f "$GIT_INDEX_FILE" $d.changed $d.new $d.n'
)
MAX_LISTED_PATHS = 200


async def discard_changes(sandbox: Sandbox, start: str, env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Put the workspace back to ``start`` (a tree or commit id). Returns the ``warning`` event
    row naming the discarded paths (at most ``MAX_LISTED_PATHS``, with ``pathCount``), or None
    when the turn changed nothing. ``env``: e.g. a ``GIT_DIR`` that holds ``start``. Raises :class:`RunFailure` (``plan_changed_tree``) when git
    cannot do it."""
    res = await sandbox.exec(["bash", "-c", RESTORE, "restore", start], env=env, timeout_s=120,
                             max_output_bytes=1_100_000)
    if not res.ok:
        raise RunFailure(ErrorCode.PLAN_CHANGED_TREE, "a plan turn changed the tree and its changes could not be "
                         f"discarded: {res.stderr.decode(errors='replace')[-300:]}")
    count, _, listed = res.stdout.partition(b"\n")
    paths = [p.decode(errors="replace") for p in listed.split(b"\0")[:MAX_LISTED_PATHS] if p]
    if not paths:
        return None
    return {"type": "warning", "code": "plan_changes_discarded",
            "message": "taskKind plan leaves the tree unchanged: the changes this turn made were discarded",
            "paths": paths, "pathCount": int(count.strip() or 0)}


def check_unchanged(files_changed: int) -> None:
    """Raises :class:`RunFailure` (``plan_changed_tree``) when a plan turn's results, read after
    :func:`discard_changes`, still show changed paths (e.g. a checkout filter the agent
    configured rewrote the files)."""
    if files_changed:
        raise RunFailure(ErrorCode.PLAN_CHANGED_TREE, f"a plan turn changed {files_changed} path(s) in the tree that "
                         "could not be put back; taskKind plan must leave the tree unchanged")
