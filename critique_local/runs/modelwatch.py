"""A model that cannot be reached ends the turn: ``model_unreachable``, within a bound.

Two sides see different things. The gateway sees every call the sandbox makes and how the
provider answered (:mod:`critique_local.gateway.calls`, the server's own record). The agent's
harness reports when the agent needs the model (:class:`PromptSent`, or a
:class:`ToolActivity` that ends the last running tool) and when it retries
(:class:`ModelRetry`). With B = ``models.unreachable_timeout_s``, the turn ends with
``model_unreachable`` when:

1. the provider has failed every call for B seconds (refused, timed out, 5xx or 429),
2. a call has waited B seconds for the provider's first answer, or
3. the agent has needed the model for B seconds and no call reached the gateway, and a probe
   run inside the sandbox cannot reach the gateway either (when it can, the agent is slow for
   another reason and the watch waits on, probing again every B; ``turn_timeout_s`` still
   bounds the turn). A probe that cannot run convicts only if the agent reported retries.

The agent may give up first (retrying a few times over about a minute): its error is then explained by the
same record. What the agent reports only decides *when* to look; the verdict rests on the
gateway's record and the probe, so an agent cannot make a run fail with this code by faking events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from critique_local.agent.base import ModelRetry, PromptSent, ToolActivity, TurnEvent
from critique_local.errors import ErrorCode, TurnStop
from critique_local.gateway.calls import CallLog, ModelCalls
from critique_local.sandboxes.base import Sandbox, SandboxError
from critique_local.services import Services
from critique_local.store.runs import RunRow

log = logging.getLogger(__name__)
T = TypeVar("T")
CHECK_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 5
# Any HTTP answer (the gateway says 401 to a call without a token) means the gateway is reachable.
# -I: the agent's ~/.local site-packages and PYTHON* variables cannot change what runs.
PROBE = """\
import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    opener.open(sys.argv[1], timeout=float(sys.argv[2])).close()
    print("HTTP 200")
except urllib.error.HTTPError as exc:
    print("HTTP", exc.code)
except Exception as exc:
    print(type(exc).__name__ + ":", getattr(exc, "reason", exc))
    sys.exit(3)
"""


class ModelWatch:
    """One prompt's watch. Feed it what the agent's harness reports with :meth:`observe`, run
    the prompt under :meth:`guard`, and ask :meth:`explain` when the agent ends the turn with a
    model error. :meth:`close` when the prompt is done."""

    def __init__(self, calls: ModelCalls, run_id: str, *, model_id: str, provider: str | None,
                 bound_s: float, gateway_url: str, sandbox: Sandbox | None, agent_name: str = "the agent",
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``calls``: the server's registry the gateway writes to; ``provider``: the
        [providers.NAME] the run's model calls go to (None: served in-process); ``bound_s``:
        ``models.unreachable_timeout_s``; ``gateway_url``: the gateway as the sandbox reaches it;
        ``sandbox``: where the reachability probe runs (None: no probe, the verdict is unknown);
        ``agent_name``: the agent as messages name it."""
        self.registry = calls
        self.run_id = run_id
        self.model_id = model_id
        self.provider = provider
        self.bound_s = bound_s
        self.gateway_url = gateway_url
        self.sandbox = sandbox
        self.agent_name = agent_name
        self.clock = clock
        self.calls: CallLog = calls.open(run_id, provider)
        self.tools: set[str] = set()  # tool calls running: the agent does not need the model
        self.needs_model_since = clock()
        self.retries = 0
        self.retries_in_wait = 0  # since the agent last went back to the model
        self.last_retry = ""
        self.probed_at: float | None = None  # a probe last gave no verdict (reachable, or could not run)

    @classmethod
    def for_prompt(cls, services: Services, run: RunRow, sandbox: Sandbox) -> ModelWatch:
        entry = services.catalog.get(run.model_id)
        provider = entry.provider if entry is not None else None
        if provider is not None and run.spec.byok:
            provider = services.settings.billing.byok_provider
        return cls(services.model_calls, run.id, model_id=run.model_id, provider=provider,
                   bound_s=services.settings.models.unreachable_timeout_s, gateway_url=services.gateway_url,
                   sandbox=sandbox, agent_name=services.harness.name)

    def close(self) -> None:
        self.registry.close(self.run_id, self.calls)

    def observe(self, event: TurnEvent) -> None:
        """What the harness reported during the turn (rows of the event log are ignored)."""
        if isinstance(event, PromptSent):
            self.needs_model_since, self.retries_in_wait = self.clock(), 0
        elif isinstance(event, ToolActivity):
            if event.running:
                self.tools.add(event.tool_id)
            else:
                self.tools.discard(event.tool_id)
                if not self.tools:  # back to the model
                    self.needs_model_since = self.clock()
                    self.retries_in_wait = 0
        elif isinstance(event, ModelRetry):
            self.retries += 1
            self.retries_in_wait += 1
            self.last_retry = event.message[:300]

    # ---- verdicts ------------------------------------------------------------------------------

    def _no_call_reached_us(self) -> bool:
        """The agent needs the model and no call of it has reached the gateway since."""
        c = self.calls
        return not self.tools and c.open_calls == 0 and (c.last_start is None or c.last_start < self.needs_model_since)

    async def check(self) -> str | None:
        """Why the turn must end now (the ``model_unreachable`` message), or None."""
        now, c, bound = self.clock(), self.calls, self.bound_s
        if c.failing_since is not None and now - c.failing_since >= bound:
            return self._provider_failing(now)
        oldest = c.oldest_unanswered()
        if oldest is not None and now - oldest >= bound:
            return self._provider_silent(now - oldest)
        if self._no_call_reached_us() and now - self.needs_model_since >= bound:
            if self.probed_at is not None and self.probed_at >= self.needs_model_since and now - self.probed_at < bound:
                return None  # probed during this same wait, without a verdict: look again later
            reachable, detail = await self.probe()
            # a probe that could not run (a loaded machine, an image without python3) convicts
            # only together with the agent's own connection retries
            if reachable or (reachable is None and not self.retries_in_wait):
                self.probed_at = now
                log.info("run %s: %s has not called the model for %.0f s; from the sandbox: %s",
                         self.run_id, self.agent_name, now - self.needs_model_since, detail)
                return None
            return self._gateway_unreachable(now, detail)
        return None

    async def explain(self) -> str | None:
        """The agent ended the turn with a model error: the ``model_unreachable`` message when
        the model could not be reached, else None (a plain ``model_error``)."""
        now = self.clock()
        if self.calls.failing_since is not None:
            return self._provider_failing(now)
        if self._no_call_reached_us():
            reachable, detail = await self.probe()
            if not reachable:
                return self._gateway_unreachable(now, detail)
        return None

    async def guard(self, work: Awaitable[T], abort: Callable[[], Awaitable[None]], partial: Callable[[], str]) -> T:
        """Await ``work`` (the prompt); when :meth:`check` gives a reason, ``abort`` the agent's
        turn and raise :class:`TurnStop` ``model_unreachable`` with the text so far."""
        self.needs_model_since, self.retries_in_wait = self.clock(), 0
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=CHECK_INTERVAL_S)
                if done:
                    return task.result()
                reason = await self.check()
                if task.done():
                    return task.result()
                if reason is not None:
                    log.info("run %s: model_unreachable: %s", self.run_id, reason)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(abort(), 5)
                    raise TurnStop(ErrorCode.MODEL_UNREACHABLE, reason, partial())
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def probe(self) -> tuple[bool | None, str]:
        """Whether the sandbox reaches the gateway now (None: the probe could not run)."""
        if self.sandbox is None:
            return None, "no probe"
        url = self.gateway_url.rstrip("/") + "/models"
        try:
            res = await self.sandbox.exec(["python3", "-I", "-c", PROBE, url, str(PROBE_TIMEOUT_S)], cwd="/",
                                          timeout_s=PROBE_TIMEOUT_S + 25, max_output_bytes=4096)
        except SandboxError as exc:
            return None, f"the probe could not run: {exc}"
        out = res.stdout.decode(errors="replace").strip()[:200]
        if res.exit_code == 0:
            return True, out
        if res.exit_code == 3:
            return False, out
        return None, f"the probe could not run (exit {res.exit_code})"

    # ---- messages: the cause, and what to do ---------------------------------------------------

    def _bound(self) -> str:
        return f"models.unreachable_timeout_s = {self.bound_s:g}"

    def _provider_failing(self, now: float) -> str:
        c = self.calls
        since = now - (c.failing_since or now)
        name = self.provider or "?"
        return (f"the model {self.model_id} could not be reached: its provider {name!r} failed "
                f"{c.failures} call(s) in a row over {since:.0f} s ({self._bound()}); last: {c.last_failure}. "
                f"The provider is down, overloaded or refusing connections: check it (providers.{name}.base_url), "
                "then send the message again")

    def _provider_silent(self, waited: float) -> str:
        name = self.provider or "?"
        return (f"the model {self.model_id} did not answer: its provider {name!r} has not started answering a "
                f"call for {waited:.0f} s ({self._bound()}). The provider is down or overloaded, or needs longer "
                "than that to start answering (then raise models.unreachable_timeout_s); send the message again")

    def _gateway_unreachable(self, now: float, probe: str) -> str:
        seen = f"; {self.agent_name} retried {self.retries} time(s): {self.last_retry}" if self.retries else ""
        return (f"the sandbox cannot reach the model gateway ({self.gateway_url}): no model call arrived for "
                f"{now - self.needs_model_since:.0f} s ({self._bound()}){seen}; from the sandbox: {probe}. "
                "Check the sandbox firewall (docker.host_firewall; on a shared host another server may have "
                "removed this one's rules) or, with E2B, e2b.gateway_url; then send the message again")
