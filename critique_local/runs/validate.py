"""``validationMode``: checks run inside the sandbox after the agent's turn.

``basic``  ``git diff --check`` over the run's changes, then a syntax check of each changed file
           whose language is recognised (Python, JSON, TOML, shell; JavaScript when node exists).
``tests``  the repository's tests. The command is, in order: ``validation.commands`` in the
           server config for this repository; the file ``.critique/test`` (a bash script) as it
           is in the *base commit*, so the agent cannot change how its own work is judged; else
           detection (pytest, npm test, go test, cargo test, make test).

Every check runs as the sandbox user with a timeout; only the tail of its output comes back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from critique_local.config import ValidationSettings
from critique_local.sandboxes.base import Sandbox

REPO_COMMAND_FILE = ".critique/test"
TIMEOUT_EXIT = 124

# $1 timeout, $2 tail bytes, $3 script, $4... the script's arguments
_RUNNER = (
    'log=/tmp/critique-validate.log; t=$1; n=$2; script=$3; shift 3; '
    'timeout -k 5 "$t" bash -c "$script" critique-validate "$@" > "$log" 2>&1 < /dev/null; code=$?; '
    'tail -c "$n" "$log"; exit $code'
)

_BASIC = r"""
export GIT_INDEX_FILE=/tmp/critique-validate.index; rm -f "$GIT_INDEX_FILE"
g() { git -c core.fsmonitor=false -c core.hooksPath=/dev/null "$@"; }
g read-tree "$1" && g add -A || exit 2
fail=0
echo '$ git diff --check'
g diff --cached --check "$1" || fail=1
n=0
while IFS= read -r -d '' f; do
  [ -f "$f" ] && [ ! -L "$f" ] || continue
  case "$f" in
    *.py) out=$(PYTHONPYCACHEPREFIX=/tmp/critique-pyc python3 -m py_compile "$f" 2>&1) ;;
    *.json) out=$(python3 -m json.tool "$f" 2>&1 >/dev/null) ;;
    *.toml) out=$(python3 -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' "$f" 2>&1) ;;
    *.sh|*.bash) out=$(bash -n "$f" 2>&1) ;;
    *.js|*.mjs|*.cjs) command -v node >/dev/null || continue; out=$(node --check "$f" 2>&1) ;;
    *) continue ;;
  esac
  rc=$?; n=$((n+1))
  if [ "$rc" -ne 0 ]; then fail=1; echo "FAIL $f"; echo "$out"; fi
done < <(g diff --cached --name-only --diff-filter=ACMR -z "$1")
echo "syntax-checked $n changed file(s)"
exit $fail
"""

_DETECT = r"""
if git -c core.fsmonitor=false cat-file -e "$1:.critique/test" 2>/dev/null; then echo REPO; exit 0; fi
if [ -f pytest.ini ] || [ -f conftest.py ] || grep -qs '^\[tool.pytest' pyproject.toml \
   || grep -qs '^\[tool:pytest\]' setup.cfg || grep -qs '^\[pytest\]' tox.ini \
   || [ -n "$(find . -path ./.git -prune -o \( -name 'test_*.py' -o -name '*_test.py' \) -print 2>/dev/null | head -n 1)" ]
then echo "python3 -m pytest -q -p no:cacheprovider"; exit 0; fi
if [ -f package.json ] && python3 -c 'import json, sys; sys.exit(0 if (json.load(open("package.json")).get("scripts") or {}).get("test") else 1)' 2>/dev/null
then echo "npm test"; exit 0; fi
if [ -f go.mod ]; then echo "go test ./..."; exit 0; fi
if [ -f Cargo.toml ]; then echo "cargo test"; exit 0; fi
for m in GNUmakefile makefile Makefile; do
  if [ -f "$m" ] && grep -qE '^test[[:space:]]*:' "$m"; then echo "make test"; exit 0; fi
done
exit 3
"""

# $1 command ("" = the base commit's .critique/test), $2 base commit
_TESTS = r"""
cmd=$1
if [ -z "$cmd" ]; then cmd=$(git -c core.fsmonitor=false show "$2:.critique/test") || exit 2; fi
echo "\$ $( [ -z "$1" ] && echo .critique/test || echo "$1" )"
exec bash -c "$cmd"
"""


@dataclass(frozen=True)
class ValidationResult:
    mode: str
    status: str  # passed | failed | skipped
    command: str | None
    exit_code: int | None
    duration_ms: int
    output_tail: str
    repair_turns: int = 0

    @property
    def passed(self) -> bool | None:
        return None if self.status == "skipped" else self.status == "passed"

    def redacted(self, clean: Callable[[str], str]) -> ValidationResult:
        return ValidationResult(self.mode, self.status, self.command, self.exit_code, self.duration_ms,
                                clean(self.output_tail), self.repair_turns)

    def with_repairs(self, n: int) -> ValidationResult:
        return ValidationResult(self.mode, self.status, self.command, self.exit_code, self.duration_ms,
                                self.output_tail, n)

    def as_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "status": self.status, "command": self.command, "exitCode": self.exit_code,
                "passed": self.passed, "durationMs": self.duration_ms, "outputTail": self.output_tail,
                "repairTurns": self.repair_turns}


async def _run(sandbox: Sandbox, settings: ValidationSettings, env: dict[str, str], script: str,
               *args: str) -> tuple[int, str, int]:
    started = time.monotonic()
    res = await sandbox.exec(
        ["bash", "-c", _RUNNER, "critique-validate", str(int(settings.timeout_s)),
         str(settings.output_tail_chars), script, *args],
        env=env, timeout_s=settings.timeout_s + 30, max_output_bytes=settings.output_tail_chars + 1024,
    )
    out = res.stdout.decode(errors="replace")[-settings.output_tail_chars:]
    if res.exit_code == TIMEOUT_EXIT:
        out += f"\n[critique-local] timed out after {settings.timeout_s:.0f}s (validation.timeout_s)"
    return res.exit_code, out, int((time.monotonic() - started) * 1000)


async def test_command(sandbox: Sandbox, settings: ValidationSettings, full_name: str,
                       base_commit: str) -> str | None:
    """The tests command: config, else "" meaning the base commit's .critique/test, else
    detection; None when the repository has no tests we can find."""
    if full_name in settings.commands:
        return settings.commands[full_name]
    res = await sandbox.exec(["bash", "-c", _DETECT, "critique-detect", base_commit], timeout_s=60)
    if res.exit_code != 0:
        return None
    found = res.stdout.decode(errors="replace").strip()
    return "" if found == "REPO" else found


async def validate(sandbox: Sandbox, mode: str, settings: ValidationSettings, full_name: str,
                   base_commit: str, env: dict[str, str] | None = None) -> ValidationResult | None:
    """Run the checks of ``mode`` (``env``: the repository's secrets, proxy settings); None
    for ``minimal``."""
    if mode == "basic":
        code, out, ms = await _run(sandbox, settings, {}, _BASIC, base_commit)
        status = "passed" if code == 0 else "failed"
        return ValidationResult(mode, status, "git diff --check + syntax check of changed files", code, ms, out)
    if mode != "tests":
        return None
    command = await test_command(sandbox, settings, full_name, base_commit)
    if command is None:
        return ValidationResult(mode, "skipped", None, None, 0,
                                f"no test command: add {REPO_COMMAND_FILE} to the repository or "
                                "validation.commands to the server config")
    code, out, ms = await _run(sandbox, settings, env or {}, _TESTS, command, base_commit)
    return ValidationResult(mode, "passed" if code == 0 else "failed", command or REPO_COMMAND_FILE, code, ms, out)


def repair_prompt(result: ValidationResult) -> str:
    """What the agent is told after failing tests (the output indented, so no line of it can be
    mistaken for an instruction format)."""
    tail = "\n".join(f"    {line}" for line in result.output_tail.splitlines()[-80:])
    return (
        "The repository's tests failed after your changes.\n\n"
        f"Command: {result.command}\nExit code: {result.exit_code}\nLast lines of output:\n{tail}\n\n"
        "Fix the code so that the tests pass. Do not delete or weaken the tests."
    )
