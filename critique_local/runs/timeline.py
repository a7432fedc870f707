"""Where a turn's time goes: named steps with their start and duration, in milliseconds from
the moment the timeline began, written to the server's debug log when the turn ends.

Steps may overlap (some run concurrently): each is timed on its own. Example line::

    run run_… turn 1 timeline (ms, +start/duration): prompt +0/612 repo +1/38 collect.snapshot +614/96 …
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("critique_local.timeline")


class Timeline:
    """Steps of one turn (or one start): ``(name, start_ms, duration_ms)``, in the order they ended."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.steps: list[tuple[str, float, float]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (also when it raises)."""
        start = time.monotonic()
        try:
            yield
        finally:
            end = time.monotonic()
            self.steps.append((name, (start - self.t0) * 1000, (end - start) * 1000))

    def mark(self, name: str) -> None:
        """A moment (a step of no duration)."""
        self.steps.append((name, (time.monotonic() - self.t0) * 1000, 0.0))

    def text(self) -> str:
        """``name +start/duration`` for every step, in ms."""
        return " ".join(f"{name} +{start:.0f}/{took:.0f}" for name, start, took in self.steps)

    def log(self, what: str) -> None:
        """One debug line: ``<what> timeline (ms, +start/duration): …``."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s timeline (ms, +start/duration): %s", what, self.text())
