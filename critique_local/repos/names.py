"""Validation of repository names and git refs that reach a command line."""

from __future__ import annotations

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
