"""A snapshot of the agent's work tree, taken inside the sandbox with a git the agent cannot
configure, and sent to the server as git objects.

The agent owns ``/workspace`` including ``.git``: its configuration (colour, prefixes, external
diff and text conversion drivers, pagers, hooks, filters, ``core.autocrlf``, fsmonitor,
includes), its attributes, info/exclude, replace refs and index. So the snapshot uses none of
it: git runs with a private repository made for this snapshot (``GIT_DIR`` in a fresh
temporary directory, our configuration on the command line, no system or global
configuration, every ``GIT_*`` variable removed), with ``$GIT_DIR/info/attributes`` switching
off every content conversion (it takes precedence over the tree's ``.gitattributes``), so each
file is hashed as its exact bytes. Only the work tree's files and ``.gitignore`` rules count.
The agent's object store is used read-only for speed; an object it forged there fails the
server's checks instead of changing the result.

A file that cannot be read (mode 000, removed while the snapshot runs) is left out and
reported (``SKIPPED``) instead of failing the turn.

Nested repositories (a directory with its own ``.git`` that the base does not track, e.g. from
``git init`` or ``git clone``): their files are taken as ordinary files (the nested ``.git`` is
left out, the top-level ignore rules apply), and their paths are reported so the run can warn.
Submodules of the base (gitlinks) are left as the base has them.

One ``docker exec`` (each costs tens of milliseconds) does all of it: first the free space of
the writable mounts (``DF``: when the workspace is full the script stops there, before git
runs), then the snapshot, then the pack itself on stdout; its temporary directory removes itself
(the server removes it only when the script was killed).

Output: NUL-separated ``KEY\\0VALUE\\0`` records (``DF``, ``FULL``, ``DIR``, ``BASETREE``,
``NESTED`` per nested repository, ``SKIPPED``, ``TREE``, ``PACKSIZE``), then ``PACKDATA\\0``
followed by the pack's raw bytes to the end (left out when the pack is over the limit). The pack
holds the objects the tree adds to the base tree (thin: deltas may refer to base objects; empty
when the tree is the base tree), read by the server with ``index-pack --strict --fix-thin``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

from critique_local.errors import ErrorCode, RunFailure
from critique_local.repos.checkout import NEUTRAL_ATTRIBUTES
from critique_local.sandboxes.base import Sandbox, SandboxError

_GIT_CONFIG = " ".join(f"-c {kv}" for kv in (
    "core.autocrlf=false", "core.safecrlf=false", "core.eol=lf", "core.fsmonitor=false", "core.hooksPath=/dev/null",
    "core.excludesFile=/etc/gitignore", "core.attributesFile=/dev/null", "core.symlinks=true", "core.fileMode=true",
    "core.ignoreCase=false", "core.precomposeUnicode=false", "core.untrackedCache=false", "core.splitIndex=false",
    "core.sparseCheckout=false", "core.bare=false", "gc.auto=0", "maintenance.auto=false",
    "advice.addEmbeddedRepo=false", "pack.threads=1", "index.threads=1", "user.useConfigOnly=false",
))

# $1 the base tree (as the server knows it), $2 the neutral attributes, $3 the largest pack sent
# (bytes), $4 the least free space of a usable workspace (KiB), $5... the mounts whose space is reported
SCRIPT = r"""
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
for f in $(compgen -A function); do unset -f "$f"; done
for v in $(compgen -e); do case $v in GIT_*|BASH_ENV|ENV|CDPATH) unset "$v";; esac; done
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null GIT_ATTR_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0 \
  GIT_NO_REPLACE_OBJECTS=1 GIT_OPTIONAL_LOCKS=0 GIT_NO_LAZY_FETCH=1 \
  GIT_AUTHOR_NAME=critique GIT_AUTHOR_EMAIL=critique@localhost GIT_AUTHOR_DATE='@0 +0000' \
  GIT_COMMITTER_NAME=critique GIT_COMMITTER_EMAIL=critique@localhost GIT_COMMITTER_DATE='@0 +0000'
ws=$PWD
want=$1 attrs=$2 maxpack=$3 minkb=$4
shift 4
if [ $# -gt 0 ]; then
  printf 'DF\0%s\0' "$(df -P -k "$@" 2>/dev/null)"
  # a full workspace ends the turn before git runs (it would fail, or fill /tmp copying the filler)
  avail=
  read -r _ _ _ avail _ < <(df -P -k "$ws" 2>/dev/null | tail -n 1)
  case $avail in ''|*[!0-9]*) ;; *) if [ "$avail" -lt "$minkb" ]; then printf 'FULL\0%s\0' "$ws"; exit 0; fi;; esac
fi
d=$(mktemp -d /tmp/critique-snapshot.XXXXXXXX) || { echo "mktemp failed" >&2; exit 3; }
trap 'rm -rf -- "$d"' EXIT
printf 'DIR\0%s\0' "$d"
git init -q --template= "$d/repo" >/dev/null || exit 3
export GIT_DIR="$d/repo/.git" GIT_WORK_TREE="$ws" GIT_INDEX_FILE="$d/index"
mkdir -p "$GIT_DIR/info" "$GIT_DIR/objects/info" || exit 3
printf '%s' "$attrs" > "$GIT_DIR/info/attributes"
if [ -d "$ws/.git/objects" ] && [ ! -L "$ws/.git" ] && [ ! -L "$ws/.git/objects" ]; then
  printf '%s\n' "$ws/.git/objects" > "$GIT_DIR/objects/info/alternates"
fi
g() { git GITCONFIG "$@"; }
basetree=
if [ "$(g cat-file -t "$want" 2>/dev/null)" = tree ]; then
  g read-tree "$want" || exit 4
  basetree=$want
fi
printf 'BASETREE\0%s\0' "$basetree"
# submodules of the base stay as they are; nested repositories are walked as ordinary directories
g ls-files -s -z | while IFS= read -r -d '' e; do
  case $e in 160000\ *) printf '%s\0' "${e#*$'\t'}";; esac
done > "$d/gitlinks" || exit 4
g ls-files -o --exclude-standard -z | while IFS= read -r -d '' p; do
  case $p in */) printf '%s\0' "${p%/}";; esac
done > "$d/nested" || exit 4
{ printf '.\0'
  cat "$d/gitlinks" "$d/nested" | while IFS= read -r -d '' p; do printf ':(exclude,literal)%s\0' "$p"; done
} > "$d/pathspec"
# a file that cannot be read (mode 000, gone meanwhile) is left out and reported, not fatal
g add -A --ignore-errors --pathspec-from-file="$d/pathspec" --pathspec-file-nul 2> "$d/add-errors"
if [ $? -ne 0 ]; then
  if [ ! -s "$d/add-errors" ] || grep -q '^fatal:' "$d/add-errors"; then cat "$d/add-errors" >&2; exit 5; fi
  printf 'SKIPPED\0%s\0' "$(grep -v '^error: open' "$d/add-errors" | head -c 4000)"
fi
if [ -s "$d/nested" ]; then
  while IFS= read -r -d '' n; do printf 'NESTED\0%s\0' "$n"; done < "$d/nested"
  while IFS= read -r -d '' n; do
    find "./$n" -name .git -prune -o \( -type f -o -type l \) -print0
  done < "$d/nested" | while IFS= read -r -d '' f; do printf '%s\0' "${f#./}"; done > "$d/nested-files"
  # the top-level ignore rules apply inside nested repositories too
  g check-ignore --no-index --stdin -z -v -n < "$d/nested-files" |
    while IFS= read -r -d '' src && IFS= read -r -d '' _ && IFS= read -r -d '' pat && IFS= read -r -d '' f; do
      if [ -n "$src" ] && [ "${pat:0:1}" != '!' ]; then continue; fi
      if [ -L "$f" ] || [ -r "$f" ]; then printf '%s\0' "$f"; else printf "SKIPPED\0error: unable to index file '%s'\0" "$f" >&3; fi
    done 3>&1 > "$d/nested-keep"
  g update-index --add -z --stdin < "$d/nested-keep" || exit 5
fi
tree=$(g write-tree) || exit 6
printf 'TREE\0%s\0' "$tree"
if [ -n "$basetree" ] && [ "$tree" = "$basetree" ]; then
  : > "$d/changes.pack"  # no changes: the server has every object of the tree
else
  new=$(g commit-tree "$tree" -m snapshot < /dev/null) || exit 6
  if [ -n "$basetree" ]; then
    old=$(g commit-tree "$basetree" -m base < /dev/null) || exit 6
    printf '%s\n^%s\n' "$new" "$old" | g pack-objects --revs --thin --stdout -q > "$d/changes.pack" || exit 7
  else
    printf '%s\n' "$new" | g pack-objects --revs --stdout -q > "$d/changes.pack" || exit 7
  fi
fi
size=$(stat -c %s "$d/changes.pack") || exit 7
printf 'PACKSIZE\0%s\0' "$size"
if [ "$size" -le "$maxpack" ]; then
  printf 'PACKDATA\0'
  base64 -w0 "$d/changes.pack" || exit 7
fi
""".replace("GITCONFIG", _GIT_CONFIG)

_SHA = re.compile(r"[0-9a-f]{40}")
PACK_MARK = b"PACKDATA"
MAX_RECORDS_BYTES = 4_000_000  # the script's records (nested repositories' paths, git's messages)
_DIR = re.compile(r"/tmp/critique-snapshot\.[A-Za-z0-9]{8}")


@dataclass(frozen=True)
class DiskCheck:
    """The free space read together with the snapshot: ``mounts`` are reported (``df -P -k``
    output) to ``check``, which raises the turn's failure when one is full; the script stops
    before git runs when the workspace has less than ``min_free_kb`` KiB left."""

    mounts: tuple[str, ...]
    min_free_kb: int
    check: Callable[[str], None]


@dataclass(frozen=True)
class Snapshot:
    """The work tree as git objects: ``tree`` (40 hex), the base tree the pack is relative to
    ("" when the sandbox no longer had it: the pack is then complete), the nested
    repositories found (paths as bytes) and the pack itself (empty when ``tree`` is the base
    tree)."""

    tree: str
    base_tree: str
    nested: list[bytes]
    pack: bytes
    skipped: list[str] = dataclasses.field(default_factory=list)


def parse_records(raw: bytes) -> dict[bytes, list[bytes]]:
    """``KEY\\0VALUE\\0`` records -> {key: [values]}."""
    fields = raw.split(b"\0")
    out: dict[bytes, list[bytes]] = {}
    for key, value in zip(fields[0::2], fields[1::2], strict=False):
        out.setdefault(key, []).append(value)
    return out


def split_pack(raw: bytes) -> tuple[bytes, bytes | None]:
    """The script's output -> (its records, the pack sent base64-encoded after ``PACKDATA\\0``,
    decoded; None when none was sent or it is not valid base64). Base64, because not every
    backend carries a command's stdout as bytes (E2B's SDK gives text). Walks the records key by
    value, so a value that reads ``PACKDATA`` (a path) is not taken for the marker."""
    pos = 0
    while (key_end := raw.find(b"\0", pos)) >= 0:
        if raw[pos:key_end] == PACK_MARK:
            try:
                return raw[:pos], base64.b64decode(raw[key_end + 1:], validate=True)
            except binascii.Error:
                return raw[:pos], None
        value_end = raw.find(b"\0", key_end + 1)
        if value_end < 0:
            break
        pos = value_end + 1
    return raw, None


async def take(sandbox: Sandbox, base_tree: str, max_pack_bytes: int, disk: DiskCheck | None = None) -> Snapshot:
    """Snapshot ``/workspace`` in one command. Raises what ``disk.check`` raises for a full
    mount (before git ran, for the workspace), ``collect_failed`` when git fails in the sandbox
    and ``patch_too_large`` when the pack is over ``max_pack_bytes`` (``publish.max_bundle_bytes``)."""
    mounts = disk.mounts if disk is not None else ()
    res = await sandbox.exec(["bash", "-c", SCRIPT, "critique-snapshot", base_tree, NEUTRAL_ATTRIBUTES,
                              str(max_pack_bytes), str(disk.min_free_kb if disk is not None else 0), *mounts],
                             timeout_s=300, max_output_bytes=MAX_RECORDS_BYTES + (max_pack_bytes + 2) // 3 * 4)
    head, pack = split_pack(res.stdout)
    records = parse_records(head)
    folder = (records.get(b"DIR") or [b""])[0].decode(errors="replace")
    try:
        if disk is not None and b"DF" in records:
            disk.check(records[b"DF"][0].decode(errors="replace"))
        if b"FULL" in records:
            raise RunFailure(ErrorCode.COLLECT_FAILED, "the workspace has no space left to read the work tree")
        if not res.ok or res.truncated:
            why = res.stderr.decode(errors="replace").strip()[-300:] or f"exit code {res.exit_code}"
            raise RunFailure(ErrorCode.COLLECT_FAILED, f"reading the work tree failed: {why}")
        tree = (records.get(b"TREE") or [b""])[0].decode(errors="replace")
        base = (records.get(b"BASETREE") or [b""])[0].decode(errors="replace")
        size = (records.get(b"PACKSIZE") or [b""])[0]
        if not _SHA.fullmatch(tree) or (base and base != base_tree) or not size.isdigit():
            raise RunFailure(ErrorCode.COLLECT_FAILED, "reading the work tree gave an unexpected answer")
        if int(size) > max_pack_bytes:
            raise RunFailure(ErrorCode.PATCH_TOO_LARGE, f"the changes are {int(size)} bytes as a git pack; the limit is "
                                                f"{max_pack_bytes} (publish.max_bundle_bytes)")
        if pack is None or len(pack) != int(size):
            raise RunFailure(ErrorCode.COLLECT_FAILED, "reading the changes out of the sandbox failed")
        skipped = [line.decode(errors="replace") for text in records.get(b"SKIPPED", []) for line in text.splitlines()
                   if line.strip()]
        return Snapshot(tree, base, records.get(b"NESTED", []), pack, skipped)
    finally:
        # the script removes its folder on exit; one killed at its time limit cannot
        if not res.ok and _DIR.fullmatch(folder):
            with contextlib.suppress(SandboxError):
                await sandbox.exec(["rm", "-rf", "--", folder], timeout_s=60)
