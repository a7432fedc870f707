"""``validationMode``: checks after the agent's turn, judging the tree the run reports.

``basic``  ``git diff --check`` of the run's changes (computed by the server from the turn's
           tree, with a carriage return before a line end counted as a line ending, so CRLF
           files pass), then a syntax check, inside the sandbox, of each added or modified file
           whose language is recognised (Python, JSON, TOML, shell; JavaScript when node
           exists). Paths reach the checkers as ``./path``, never as options.
``tests``  the repository's tests. The command is, in order: ``validation.commands`` in the
           server config for this repository (``commandSource: config``); the file
           ``.critique/test`` (a bash script) as it is in the *base commit*, read by the server
           (``base_commit``); else detection from the base commit's files (``detected``: pytest,
           npm test, go test, cargo test, make test). Nothing in the agent's tree chooses how
           its own work is judged.

Every check in the sandbox runs as the sandbox user with a timeout; only the tail of its
output comes back.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from critique_local.config import ValidationSettings
from critique_local.errors import RunFailure
from critique_local.repos.git import OutputTooLarge
from critique_local.repos.workrepo import RunRepo
from critique_local.sandboxes.base import Sandbox

REPO_COMMAND_FILE = ".critique/test"
TIMEOUT_EXIT = 124

# $1 timeout, $2 tail bytes, $3 script, $4... the script's arguments
_RUNNER = (
    'log=/tmp/critique-validate.log; t=$1; n=$2; script=$3; shift 3; '
    'timeout -k 5 "$t" bash -c "$script" critique-validate "$@" > "$log" 2>&1 < /dev/null; code=$?; '
    'tail -c "$n" "$log"; exit $code'
)

# $@: the files to check (relative paths)
_SYNTAX = r"""
fail=0; n=0
for f in "$@"; do
  p=./$f
  [ -f "$p" ] && [ ! -L "$p" ] || continue
  case "$f" in
    *.py) out=$(PYTHONPYCACHEPREFIX=/tmp/critique-pyc python3 -m py_compile "$p" 2>&1) ;;
    *.json) out=$(python3 -m json.tool "$p" 2>&1 >/dev/null) ;;
    *.toml) out=$(python3 -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' "$p" 2>&1) ;;
    *.sh|*.bash) out=$(bash -n "$p" 2>&1) ;;
    *.js|*.mjs|*.cjs) command -v node >/dev/null || continue; out=$(node --check "$p" 2>&1) ;;
    *) continue ;;
  esac
  rc=$?; n=$((n+1))
  if [ "$rc" -ne 0 ]; then fail=1; echo "FAIL $f"; echo "$out"; fi
done
echo "syntax-checked $n changed file(s)"
exit $fail
"""
MAX_SYNTAX_FILES = 2000
MAX_BASE_FILE_BYTES = 1_000_000

# $1 the command; the repository's own script arrives as its text
_TESTS = r"""
echo "\$ $2"
exec bash -c "$1"
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
    command_source: str | None = None  # config | base_commit | detected (tests); server (basic)

    @property
    def passed(self) -> bool | None:
        return None if self.status == "skipped" else self.status == "passed"

    def redacted(self, clean: Callable[[str], str]) -> ValidationResult:
        return dataclasses.replace(self, output_tail=clean(self.output_tail))

    def with_repairs(self, n: int) -> ValidationResult:
        return dataclasses.replace(self, repair_turns=n)

    def as_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "status": self.status, "command": self.command, "exitCode": self.exit_code,
                "passed": self.passed, "durationMs": self.duration_ms, "outputTail": self.output_tail,
                "repairTurns": self.repair_turns, "commandSource": self.command_source}


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


@dataclass(frozen=True)
class JudgeCommand:
    """What judges a tests run: ``script`` runs with ``bash -c``; ``shown`` is how the run
    names it; ``source`` where it came from (config | base_commit | detected)."""

    script: str
    shown: str
    source: str


async def _base_file(repo: RunRepo, base_commit: str, path: str) -> str | None:
    try:
        raw = await repo.git("cat-file", "blob", f"{base_commit}:{path}", timeout_s=60,
                             max_bytes=MAX_BASE_FILE_BYTES)
    except (RunFailure, OutputTooLarge):  # missing, not a blob, or too large: as if absent
        return None
    return raw.decode(errors="replace")


async def detect(repo: RunRepo, base_commit: str) -> str | None:
    """A test command from the base commit's files (never the agent's), or None."""
    names = {n.decode(errors="replace") for n in (await repo.git(
        "ls-tree", "-r", "--name-only", "-z", base_commit, timeout_s=120)).split(b"\0") if n}
    top = {n for n in names if "/" not in n}
    pyproject = await _base_file(repo, base_commit, "pyproject.toml") if "pyproject.toml" in top else None
    cfg = {n: await _base_file(repo, base_commit, n) for n in ("setup.cfg", "tox.ini") if n in top}
    tests = any(re.fullmatch(r"(.*/)?(test_[^/]*|[^/]*_test)\.py", n) for n in names)
    if ("pytest.ini" in top or "conftest.py" in top or tests
            or (pyproject and re.search(r"^\[tool\.pytest", pyproject, re.M))
            or re.search(r"^\[tool:pytest\]", cfg.get("setup.cfg") or "", re.M)
            or re.search(r"^\[pytest\]", cfg.get("tox.ini") or "", re.M)):
        return "python3 -m pytest -q -p no:cacheprovider"
    if "package.json" in top:
        try:
            scripts = json.loads(await _base_file(repo, base_commit, "package.json") or "{}").get("scripts") or {}
        except (ValueError, AttributeError):
            scripts = {}
        if isinstance(scripts, dict) and scripts.get("test"):
            return "npm test"
    if "go.mod" in top:
        return "go test ./..."
    if "Cargo.toml" in top:
        return "cargo test"
    for makefile in ("GNUmakefile", "makefile", "Makefile"):
        if makefile in top and re.search(r"^test[ \t]*:", await _base_file(repo, base_commit, makefile) or "", re.M):
            return "make test"
    return None


async def test_command(repo: RunRepo, settings: ValidationSettings, full_name: str,
                       base_commit: str) -> JudgeCommand | None:
    """The tests command: config, else the base commit's .critique/test, else detection from
    the base commit; None when the repository has no tests we can find."""
    if full_name in settings.commands:
        return JudgeCommand(settings.commands[full_name], settings.commands[full_name], "config")
    script = await _base_file(repo, base_commit, REPO_COMMAND_FILE)
    if script is not None:
        return JudgeCommand(script.replace("\0", ""), REPO_COMMAND_FILE, "base_commit")
    found = await detect(repo, base_commit)
    return JudgeCommand(found, found, "detected") if found else None


async def validate(sandbox: Sandbox, repo: RunRepo, mode: str, settings: ValidationSettings, full_name: str,
                   base_commit: str, tree: str, env: dict[str, str] | None = None) -> ValidationResult | None:
    """Run the checks of ``mode`` on the turn's ``tree`` (``env``: the repository's secrets,
    proxy settings); None for ``minimal``."""
    if mode == "basic":
        return await _basic(sandbox, repo, settings, base_commit, tree)
    if mode != "tests":
        return None
    command = await test_command(repo, settings, full_name, base_commit)
    if command is None:
        return ValidationResult(mode, "skipped", None, None, 0,
                                f"no test command: add {REPO_COMMAND_FILE} to the repository or "
                                "validation.commands to the server config")
    code, out, ms = await _run(sandbox, settings, env or {}, _TESTS, command.script, command.shown)
    return ValidationResult(mode, "passed" if code == 0 else "failed", command.shown, code, ms, out,
                            command_source=command.source)


async def _basic(sandbox: Sandbox, repo: RunRepo, settings: ValidationSettings, base_commit: str,
                 tree: str) -> ValidationResult:
    started = time.monotonic()
    base_tree = await repo.tree_of(base_commit)
    clean, report = await repo.check_whitespace(base_tree, tree, settings.output_tail_chars)
    out = "$ git diff --check\n" + report.decode(errors="replace")
    try:
        listing = await repo.git("diff-tree", "-r", "--no-renames", "--name-only", "--diff-filter=AMT", "-z",
                                 base_tree, tree, "--", timeout_s=120)
    except RunFailure as exc:
        listing, clean, out = b"", False, out + f"\nlisting the changed files failed: {exc.message}\n"
    files: list[str] = []
    for raw in filter(None, listing.split(b"\0")):
        try:
            files.append(raw.decode())
        except UnicodeDecodeError:  # a name that is not UTF-8 cannot be an argument here
            continue
    code, checked, _ = await _run(sandbox, settings, {}, _SYNTAX, *files[:MAX_SYNTAX_FILES])
    if len(files) > MAX_SYNTAX_FILES:
        checked += f"\n(only the first {MAX_SYNTAX_FILES} of {len(files)} changed files were syntax-checked)"
    code = code if clean or code != 0 else 1
    ms = int((time.monotonic() - started) * 1000)
    return ValidationResult("basic", "passed" if code == 0 else "failed",
                            "git diff --check + syntax check of changed files", code, ms,
                            (out + checked)[-settings.output_tail_chars:], command_source="server")


def repair_prompt(result: ValidationResult) -> str:
    """What the agent is told after failing tests (the output indented, so no line of it can be
    mistaken for an instruction format)."""
    tail = "\n".join(f"    {line}" for line in result.output_tail.splitlines()[-80:])
    return (
        "The repository's tests failed after your changes.\n\n"
        f"Command: {result.command}\nExit code: {result.exit_code}\nLast lines of output:\n{tail}\n\n"
        "Fix the code so that the tests pass. Do not delete or weaken the tests."
    )
