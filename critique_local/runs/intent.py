"""Deterministic intent classification of a prompt (a cheap first pass for dashboards).

Rules, first match wins, on the lower-cased prompt with ``@`` script lines removed:
  dependency  bump, upgrade, dependency, dependencies, version of, renovate, dependabot
  test        test, tests, coverage, regression test, flaky
  docs        readme, docs, documentation, docstring, comment, changelog
  bugfix      fix, bug, error, crash, broken, regression, fails, failing, issue
  refactor    refactor, rename, clean up, cleanup, simplify, extract, migrate, reorganize
  feature     add, implement, support, create, introduce, build, new
  other       anything else
"""

from __future__ import annotations

import re

RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dependency", ("bump", "upgrade", "dependency", "dependencies", "version of", "renovate", "dependabot")),
    ("test", ("test", "tests", "coverage", "regression test", "flaky")),
    ("docs", ("readme", "docs", "documentation", "docstring", "comment", "changelog")),
    ("bugfix", ("fix", "bug", "error", "crash", "broken", "regression", "fails", "failing", "issue")),
    ("refactor", ("refactor", "rename", "clean up", "cleanup", "simplify", "extract", "migrate", "reorganize")),
    ("feature", ("add", "implement", "support", "create", "introduce", "build", "new")),
)
INTENTS = (*tuple(name for name, _ in RULES), "other")


def classify(prompt: str) -> str:
    text = " ".join(line for line in prompt.lower().splitlines() if not line.startswith("@"))
    for name, words in RULES:
        if any(re.search(rf"\b{re.escape(w)}\b", text) for w in words):
            return name
    return "other"
