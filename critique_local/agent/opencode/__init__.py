"""OpenCode (``opencode serve``, opencode-ai 1.18) as the agent harness: ``harness.py`` the
:class:`~critique_local.agent.base.Harness`, ``client.py`` its HTTP API, ``config.py`` the
configuration a sandbox gets, ``sessions.py`` session export and import, ``normalize.py``
OpenCode's events as the run's event rows."""

from critique_local.agent.opencode.harness import OpenCodeHarness

__all__ = ["OpenCodeHarness"]
