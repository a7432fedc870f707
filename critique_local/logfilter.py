"""Rate limits for log lines about the same thing.

A flood (thousands of connections from one sandbox, the process out of file descriptors)
makes the same error happen thousands of times a second; logging each one fills the disk and
burns the event loop that should be answering requests. :class:`RepeatFilter` lets the first
``burst`` records of one kind through per ``window_s`` and counts the rest; the first record of
that kind in a later window says how many were suppressed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_KINDS = 10_000  # distinct kinds tracked at once (memory stays bounded under odd messages)


@dataclass
class _Window:
    started: float
    passed: int = 0
    suppressed: int = 0


class RepeatFilter(logging.Filter):
    """A record's kind is its logger, level, message template (``record.msg`` before
    arguments, so ``"refused %s"`` is one kind whatever the address) and exception type. Only
    records of ``min_level`` (warnings) and above are limited."""

    def __init__(self, burst: int = 5, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 min_level: int = logging.WARNING) -> None:
        super().__init__()
        self.min_level = min_level
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[tuple[str, int, str, str], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:  # floods are of warnings and errors; info lines name their run
            return True
        exc_type = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        kind = (record.name, record.levelno, str(record.msg)[:200], exc_type)
        now = self.clock()
        window = self._windows.get(kind)
        if window is None or now - window.started >= self.window_s:
            suppressed = window.suppressed if window is not None else 0
            if len(self._windows) >= MAX_KINDS:
                self._windows.clear()
            self._windows[kind] = _Window(now, passed=1)
            if suppressed:
                record.msg = f"{record.msg} [{suppressed} similar messages suppressed in the last " \
                             f"{self.window_s:.0f} s]"
            return True
        if window.passed < self.burst:
            window.passed += 1
            return True
        window.suppressed += 1
        return False


def install(burst: int = 5, window_s: float = 60.0) -> RepeatFilter:
    """Attach one :class:`RepeatFilter` to every handler of the root logger."""
    repeat = RepeatFilter(burst, window_s)
    for handler in logging.getLogger().handlers:
        handler.addFilter(repeat)
    return repeat
