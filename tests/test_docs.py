"""The README documents every route, lifecycle value, next action and error code."""

from __future__ import annotations

import ast
from pathlib import Path

from critique_local.api.openapi import document
from critique_local.api.routes import PUBLIC_ROUTES
from critique_local.errors import ErrorCode
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


def test_every_error_code_is_documented() -> None:
    """Every code a client can see (API errors and run errors) is one ``ErrorCode`` member."""
    assert len(ErrorCode) > 40
    for code in ErrorCode:
        assert f"`{code.value}`" in README, f"error code {code.value} is not documented in README.md"


def test_no_error_code_is_written_out_as_a_string() -> None:
    """Codes are raised as ``ErrorCode`` members: a string literal naming one in an error's
    constructor, a ``code`` attribute or keyword, a ``"code"`` or ``"error_code"`` key (an error
    envelope, an error event), or a run's ``error_code`` bypasses the enum."""
    values = {code.value for code in ErrorCode}
    found: list[str] = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            strings: list[ast.expr] = []
            if isinstance(node, ast.Call):
                strings += [a for a in node.args[:2] if _is_error_call(node)]
                strings += [kw.value for kw in node.keywords if kw.arg in ("code", "error_code")]
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
                strings.append(node.value)
            elif isinstance(node, ast.Dict):
                strings += [v for k, v in zip(node.keys, node.values, strict=True)
                            if isinstance(k, ast.Constant) and k.value in ("code", "error_code")]
            found += [f"{path.name}:{s.lineno} {s.value}" for s in strings
                      if isinstance(s, ast.Constant) and s.value in values]
    assert not found, found


def _is_error_call(node: ast.Call) -> bool:
    name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
    return name.endswith(("Error", "Failure", "Stop", "Gone")) or name == "fail"
