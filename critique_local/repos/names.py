"""Validation of repository names and git refs that reach a command line."""

from __future__ import annotations

import fnmatch
import re

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
_FULL_NAME = re.compile(rf"^{_SEGMENT}/{_SEGMENT}$")
_REF_CHARS = re.compile(r"^[A-Za-z0-9._/+-]+$")


def repository_name_problem(name: str) -> str | None:
    """Why ``name`` is not a safe ``owner/name``, or None."""
    if not _FULL_NAME.fullmatch(name):
        return "must be owner/name of letters, digits, '.', '_' or '-' (each part starting with a letter or digit)"
    if ".." in name or name.endswith(".git") or name.endswith("."):
        return "must not contain '..' or end in '.git' or '.'"
    return None


def ref_problem(ref: str) -> str | None:
    """Why ``ref`` could be misread by git (option injection, ranges, reflog syntax), or None."""
    if not ref or len(ref) > 200:
        return "must be 1-200 characters"
    if ref.startswith("-") or ref.startswith("/") or ref.endswith("/") or ref.endswith("."):
        return "must not start with '-' or '/' or end with '/' or '.'"
    if ".." in ref or "@{" in ref or "//" in ref or ref.endswith(".lock") or "/." in ref or ref.startswith("."):
        return "must not contain '..', '@{', '//', '/.' or end in '.lock'"
    if not _REF_CHARS.fullmatch(ref):
        return "may contain only letters, digits and . _ / + -"
    return None


def branch_problem(branch: str) -> str | None:
    """Why ``branch`` cannot be a branch we push to, or None."""
    problem = ref_problem(branch)
    if problem:
        return problem
    if branch == "HEAD" or branch.startswith("refs/") or "+" in branch:
        return "must be a plain branch name (not HEAD, not refs/..., no '+')"
    return None


def protected_pattern(branch: str, patterns: list[str]) -> str | None:
    """The configured pattern that protects ``branch``, or None."""
    return next((p for p in patterns if fnmatch.fnmatchcase(branch, p)), None)


def slug(text: str, max_chars: int = 40) -> str:
    """A branch-safe slug of the first line of a title or prompt."""
    words = re.sub(r"[^a-z0-9]+", "-", text.strip().splitlines()[0].lower() if text.strip() else "").strip("-")
    return words[:max_chars].rstrip("-") or "change"
