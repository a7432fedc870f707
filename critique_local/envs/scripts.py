"""Running a repository's setup and start scripts inside a sandbox, and readying a set-up
sandbox to be kept. Output goes to a log file in the sandbox's ``/tmp`` (so processes a script
leaves running never hold the command's output open), read in increments while the script runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from critique_local.sandboxes.base import Sandbox, SandboxError

SETUP_LOG = "/tmp/critique-setup.log"
START_LOG = "/tmp/critique-start.log"
POLL_S = 1.0
CHUNK_BYTES = 16_384
MARKER = "CRITIQUE_SETUP_RUN"
TIMED_OUT = 137  # `timeout --signal=KILL`

# Run the script given as $1 (with bash), its output into $2. The exit code is the script's.
_WRAP = 'bash -c "$1" "$3" >"$2" 2>&1'

# After setup: end the processes it left behind (found by the marker in their environment, which
# holds the repository's secrets: E2B snapshots keep memory), drop the checkout's tracked files
# and .git (a later run uploads its own commit), keep what setup produced.
PREPARE = r'''
for env in /proc/[0-9]*/environ; do
  pid=${env#/proc/}; pid=${pid%/environ}
  [ "$pid" = "$$" ] && continue
  if tr '\0' '\n' <"$env" 2>/dev/null | grep -qx "$1=$2"; then kill -9 "$pid" 2>/dev/null; fi
done
cd /workspace || exit 1
if [ -d .git ]; then
  git -c core.quotepath=off ls-files -z | xargs -0 -r rm -f --
  rm -rf .git
fi
rm -f /tmp/critique-setup.log
exit 0
'''


@dataclass(frozen=True)
class ScriptResult:
    exit_code: int
    duration_ms: int
    timed_out: bool
    tail: str  # the output's last characters


async def run_script(sandbox: Sandbox, script: str, name: str, log_path: str, env: Mapping[str, str],
                     timeout_s: float, tail_chars: int,
                     on_output: Callable[[str], Awaitable[None]] | None = None) -> ScriptResult:
    """Run ``script`` (bash) in ``/workspace`` as the sandbox user with ``env``, killed after
    ``timeout_s``; ``on_output`` hears new output about every second. Raises SandboxError when
    the sandbox fails (not when the script does)."""
    started = time.monotonic()
    task = asyncio.ensure_future(sandbox.exec(["bash", "-c", _WRAP, "wrap", script, log_path, name],
                                              env=env, timeout_s=timeout_s, max_output_bytes=4096))
    offset = 0
    tail = ""

    async def pull() -> None:
        nonlocal offset, tail
        res = await sandbox.exec(["bash", "-c", 'tail -c +"$1" "$2" 2>/dev/null | head -c "$3"', "pull",
                                  str(offset + 1), log_path, str(CHUNK_BYTES)], timeout_s=30,
                                 max_output_bytes=CHUNK_BYTES)
        if res.stdout:
            offset += len(res.stdout)
            text = res.stdout.decode(errors="replace")
            tail = (tail + text)[-tail_chars:]
            if on_output is not None:
                await on_output(text)

    try:
        while not task.done():
            await asyncio.wait({task}, timeout=POLL_S)
            await pull()
        result = task.result()
        for _ in range(64):  # what is left (bounded: a script that wrote a lot is summarised by its tail)
            before = offset
            await pull()
            if offset == before:
                break
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    elapsed = time.monotonic() - started
    timed_out = result.exit_code == TIMED_OUT and elapsed >= timeout_s - 1
    return ScriptResult(result.exit_code, round(elapsed * 1000), timed_out, tail)


async def prepare_for_keeping(sandbox: Sandbox, marker: str) -> None:
    res = await sandbox.exec(["bash", "-c", PREPARE, "prepare", MARKER, marker], timeout_s=300, cwd="/")
    if not res.ok:
        raise SandboxError(f"readying the environment failed: {res.stderr.decode(errors='replace')[-300:]}")
