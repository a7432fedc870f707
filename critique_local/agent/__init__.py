"""The coding agent in the sandbox: the harness contract a run needs (``base.py``), its one
implementation (``opencode/``), and a bounded Server-Sent Events reader any harness may use
(``sse.py``)."""

from __future__ import annotations

from critique_local.agent.base import Harness


def default_harness() -> Harness:
    """The harness runs use: OpenCode (imported here, so that importing the contract does not
    load an implementation)."""
    from critique_local.agent.opencode import OpenCodeHarness

    return OpenCodeHarness()
