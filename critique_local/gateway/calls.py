"""What the gateway saw of a running turn's model calls: the server's own, trusted record.

The executor opens a :class:`CallLog` when it sends a prompt and closes it when the prompt
returns; the gateway writes into it for every call the run's sandbox makes (calls of runs
without an open log are not recorded, so memory stays bounded by the turns running now). The
run's model watch reads it to tell "the provider keeps failing or never answers" (calls arrive,
nothing comes back) from "the sandbox cannot reach the gateway" (no call arrives at all).

Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class CallLog:
    """One run's model calls since its current prompt was sent."""

    provider: str | None = None  # [providers.NAME] of the run's model; None for critique/scripted
    calls: int = 0  # calls that reached the gateway
    last_start: float | None = None
    open_calls: int = 0  # started and not finished (waiting, or streaming an answer)
    unanswered: dict[int, float] = field(default_factory=dict)  # call -> start, no answer from the provider yet
    failing_since: float | None = None  # first provider failure with no answer since
    failures: int = 0  # provider failures since failing_since
    last_failure: str = ""
    clock: Callable[[], float] = time.monotonic
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def start(self) -> int:
        """A call arrived; returns its id for :meth:`answered`, :meth:`failed` and :meth:`end`."""
        call = next(self._ids)
        now = self.clock()
        self.calls += 1
        self.last_start = now
        self.open_calls += 1
        self.unanswered[call] = now
        return call

    def answered(self, call: int) -> None:
        """The provider answered (success, or an answer that says it is reachable: 4xx)."""
        self.unanswered.pop(call, None)
        self.failing_since = None
        self.failures = 0
        self.last_failure = ""

    def failed(self, call: int, cause: str) -> None:
        """The provider could not be reached, timed out, or answered 5xx / 429."""
        self.unanswered.pop(call, None)
        if self.failing_since is None:
            self.failing_since = self.clock()
        self.failures += 1
        self.last_failure = cause

    def end(self, call: int, *, cancelled: bool = False) -> None:
        """The gateway finished with the call. One neither answered nor failed by then was
        answered by the gateway itself (refused, or served in-process), unless ``cancelled``
        (the sandbox hung up first: that says nothing about the provider)."""
        if self.unanswered.pop(call, None) is not None and not cancelled:
            self.answered(call)
        self.open_calls = max(0, self.open_calls - 1)

    def oldest_unanswered(self) -> float | None:
        return min(self.unanswered.values(), default=None)


class ModelCalls:
    """The open call logs, by run id."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._logs: dict[str, CallLog] = {}

    def open(self, run_id: str, provider: str | None) -> CallLog:
        """A fresh log for the run's prompt (replacing any earlier one)."""
        log = CallLog(provider=provider, clock=self.clock)
        self._logs[run_id] = log
        return log

    def close(self, run_id: str, log: CallLog) -> None:
        if self._logs.get(run_id) is log:
            del self._logs[run_id]

    def get(self, run_id: str) -> CallLog | None:
        return self._logs.get(run_id)
