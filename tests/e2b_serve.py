"""``python -m tests.e2b_serve serve``: the real critique-local server, with the e2b SDK
replaced by the stand-in in ``tests/e2b_standin.py`` (the backend imports ``e2b`` lazily)."""

from __future__ import annotations

import sys

from tests import e2b_standin

sys.modules["e2b"] = e2b_standin

from critique_local.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
