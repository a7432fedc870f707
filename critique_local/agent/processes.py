"""Stopping an agent's processes inside its sandbox, for any harness: the agent server is started
with a mark in its environment (``NAME=VALUE``), which every process it starts inherits (its tools'
commands and whatever they leave running). :func:`stop_marked` ends every process that carries the
mark or descends from one that does, and waits until they are gone, so the memory they held is
freed; the sandbox's other processes (its init, services of ``.critique/start.sh``) keep running.

Processes are frozen (``SIGSTOP``) until the set no longer grows, so nothing forks or is reparented
away while it is collected, then killed together (``SIGKILL``): an idle agent has nothing in flight
that a graceful stop would finish (its storage is a crash-safe database).
"""

from __future__ import annotations

from critique_local.errors import SandboxError
from critique_local.sandboxes.base import Sandbox

# $1 the mark (NAME=VALUE), $2 seconds to wait for the processes to be gone. Prints nothing; exit 0
# when none is left (zombies hold no memory and count as gone), 1 otherwise.
_STOP = r"""
set -u
mark=$1; limit=$2
scan() {  # the marked processes, their descendants and the pids in $1 that still live, sorted
  { grep -lsxzF -- "$mark" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | sed 's/^/M /'
    cat /proc/[0-9]*/stat 2>/dev/null | sed -nE 's/^([0-9]+) \(.*\) ([A-Za-z]) ([0-9]+) .*/P \1 \3 \2/p'
  } | awk -v me="$$" -v known="$1" '
    BEGIN { n = split(known, k, " "); for (i = 1; i <= n; i++) a[k[i]] = 1 }
    $1 == "M" { a[$2] = 1; next }
    $1 == "P" && $4 != "Z" && $4 != "X" { par[$2] = $3 }
    END {
      do { c = 0; for (q in par) if (!(q in a) && (par[q] in a)) { a[q] = 1; c = 1 } } while (c)
      for (q in a) if ((q in par) && q != me) print q
    }' | sort -n | tr '\n' ' '
}
known=""
for round in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  found=$(scan "$known")
  [ -n "$found" ] && kill -STOP $found 2>/dev/null
  [ "$found" = "$known" ] && break
  known=$found
done
[ -z "$known" ] && exit 0
kill -KILL $known 2>/dev/null
end=$(( $(date +%s) + limit ))
while :; do
  left=""
  for p in $known; do
    state=$(sed -nE 's/^[0-9]+ \(.*\) ([A-Za-z]) .*/\1/p' "/proc/$p/stat" 2>/dev/null)
    if [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]; then left="$left $p"; fi
  done
  [ -z "$left" ] && exit 0
  [ "$(date +%s)" -ge "$end" ] && { echo "still running:$left" >&2; exit 1; }
  kill -KILL $left 2>/dev/null
  sleep 0.05
done
"""


async def stop_marked(sandbox: Sandbox, mark: str, timeout_s: float) -> None:
    """End every process in ``sandbox`` whose environment holds ``mark`` (``NAME=VALUE``) and
    every descendant of one, and wait until they are gone. SandboxError when some are still
    running after ``timeout_s`` seconds, or the sandbox cannot run the command."""
    res = await sandbox.exec(["bash", "-c", _STOP, "stop-agent", mark, str(max(1, int(timeout_s)))], cwd="/",
                             timeout_s=timeout_s + 10, max_output_bytes=4096)
    if not res.ok:
        raise SandboxError(f"the agent's processes did not stop (exit {res.exit_code}): "
                           f"{res.stderr.decode(errors='replace')[-300:]}")
