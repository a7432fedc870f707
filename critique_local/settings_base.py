"""The base of every settings section (``config.py`` assembles them): unknown keys fail, values
are checked on assignment; and :func:`absolute_path`, how path settings are made absolute."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationInfo


def absolute_path(value: str | Path, info: ValidationInfo | None = None) -> Path:
    """``value`` as an absolute, normalised path: ``~`` expanded, a relative path taken from
    ``info.context["base_dir"]`` (the configuration file's directory) or else the working
    directory. Symbolic links are kept (nothing is resolved on disk)."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        base = (info.context or {}).get("base_dir") if info is not None else None
        path = Path(base or Path.cwd()) / path
    return Path(os.path.normpath(path))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
