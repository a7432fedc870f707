"""The README documents every route, lifecycle value, next action and run error code."""

from __future__ import annotations

import re
from pathlib import Path

from critique_local.api.openapi import document
from critique_local.api.routes import PUBLIC_ROUTES
from critique_local.runs.states import LIFECYCLE_DOC, NEXT_ACTIONS_DOC

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
PACKAGE = Path(__file__).resolve().parent.parent / "critique_local"


def test_every_route_is_in_the_readme() -> None:
    for route in PUBLIC_ROUTES:
        base = route.path.split("?")[0]
        assert f"`{base}" in README, f"{route.method} {route.path} is not documented in README.md"


def test_every_lifecycle_value_and_next_action_is_documented() -> None:
    for value in LIFECYCLE_DOC:
        assert f"`{value}`" in README, value
    for action in NEXT_ACTIONS_DOC:
        assert f"`{action}`" in README, action
    description = document(PUBLIC_ROUTES)["info"]["description"]
    assert all(v in description for v in (*LIFECYCLE_DOC, *NEXT_ACTIONS_DOC))


def test_every_run_error_code_is_documented() -> None:
    codes: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        codes |= set(re.findall(r'RunFailure\(\s*"([a-z_]+)"', text))
        codes |= set(re.findall(r'SandboxError\([^)]*?,\s*"([a-z_]+)"\)', text))
        codes |= set(re.findall(r'AgentError\([^)]*?,\s*"([a-z_]+)"\)', text))
        codes |= set(re.findall(r'TurnStop\(\s*"([a-z_]+)"', text))
    assert codes, "no codes found"
    for code in codes:
        assert f"`{code}`" in README, f"run error code {code} is not documented"
