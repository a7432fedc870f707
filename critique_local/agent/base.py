"""The agent harness contract: what a run needs from the coding agent in its sandbox.

A :class:`Harness` starts an agent server in a sandbox (:meth:`Harness.launch`) or reattaches
to one that is running (:meth:`Harness.attach`, from what the run persisted: the sandbox and the
agent's secret). Either gives an :class:`Agent`, a connection to that server: open a session,
prompt it (one turn, its progress reported through a callback as :data:`TurnEvent` values, its
outcome a :class:`TurnReply`), abort a turn, export and import a session's state, close the
connection. An exported state is the harness's own format: only the harness reads it
(:meth:`Harness.message_count`, :meth:`Harness.truncate`); the server seals and stores it as is.
:meth:`Harness.stop` ends the agent's processes and keeps its files: a later
:meth:`Harness.launch` in the same sandbox continues its sessions (:meth:`Agent.has_session`),
which is how a Docker session pauses. ``runs/`` knows only this module; ``agent/opencode/`` is
the one implementation.

Units: times in seconds (``*_s``), sizes in characters (``*_chars``) or bytes (``*_bytes``);
ids are the agent's own strings (at most 200 characters).

What the harness reports is untrusted (the agent controls its server): it decides *when* the
server looks (``runs/modelwatch.py``), never a verdict on its own.

Errors: every method raises :class:`~critique_local.errors.AgentError` (``agent_error``,
``agent_unreachable``, ``agent_start_timeout``, ``turn_timeout``) or, for what it runs in the
sandbox, :class:`~critique_local.errors.SandboxError`; foreign errors (HTTP clients) never escape.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from critique_local.sandboxes.base import Sandbox

WORKSPACE = "/workspace"


@dataclass(frozen=True)
class McpServer:
    """A remote MCP server the agent may use: ``name`` (its tools appear as ``<name>_<tool>``)
    at ``url``, which takes the sandbox's gateway token as its bearer token (the server's relay)."""

    name: str
    url: str


@dataclass(frozen=True)
class LaunchConfig:
    """What an agent server starts with. ``gateway_url``: the server's OpenAI-compatible
    ``/api/v1`` as the sandbox reaches it; ``gateway_token``: the sandbox's bearer token there;
    ``secret``: the agent server's own password (the caller persists it sealed, see
    :meth:`Harness.attach`); ``context_tokens``/``output_tokens``: the model's limits as the
    agent is told them; ``env``: extra environment (a restricted run's egress proxy);
    ``mcp_servers``: remote MCP servers the agent may use."""

    gateway_url: str
    gateway_token: str
    model_id: str
    context_tokens: int
    output_tokens: int
    secret: str
    env: Mapping[str, str] = field(default_factory=dict)
    mcp_servers: tuple[McpServer, ...] = ()


@dataclass(frozen=True)
class TurnRequest:
    """One prompt. ``read_only``: a plan turn (the agent is told not to edit; the server does
    not rely on it). ``timeout_s``: the whole turn; ``connect_timeout_s``: how long the agent's
    event stream may take to open; ``max_text_chars``: the reply's texts are clipped to this."""

    session_id: str
    text: str
    model_id: str
    read_only: bool
    timeout_s: float
    connect_timeout_s: float
    max_text_chars: int


# ---- what a turn reports while it runs (the ``on_event`` callback of :meth:`Agent.prompt`) --------


@dataclass(frozen=True)
class EventRow:
    """One row of the run's event log (``builder.event``, the API's shape, README "Events"):
    ``tool`` (``tool``, ``status`` pending/running/completed/error, ``callId``, and ``input``,
    ``title``, ``output``, ``error``, ``childSessionId`` when known), ``file.edited`` (``path``),
    ``text`` (an assistant text, finished), ``step.start``, ``step.finish`` (``reason``,
    ``tokens``), ``retry`` (``attempt``, ``message``, ``retryAt``), ``error`` (``name``,
    ``message``), ``permission.rejected`` (``permission``, ``patterns``). Rows of a subagent
    carry ``sessionId`` and ``parentSessionId``. Values are bounded (``bounds.clip_json``)."""

    row: dict[str, Any]


@dataclass(frozen=True)
class PromptSent:
    """The prompt reached the agent: from now on it needs the model."""


@dataclass(frozen=True)
class ToolActivity:
    """A tool call of the run's own session started (``running``) or ended: while one runs,
    the agent does not need the model."""

    tool_id: str
    running: bool


@dataclass(frozen=True)
class ModelRetry:
    """The agent retries a failed model call (``message``: its reason, as the agent says it)."""

    message: str


@dataclass(frozen=True)
class EventsDropped:
    """``count`` events of the agent could not be read (too large, not JSON); reported once,
    when the turn ends."""

    count: int


TurnEvent = EventRow | PromptSent | ToolActivity | ModelRetry | EventsDropped
OnEvent = Callable[[TurnEvent], Awaitable[None]]


# ---- how a turn ended ------------------------------------------------------------------------------


class TurnErrorKind(StrEnum):
    """Why the agent ended a turn with an error; the run layer maps it to a code
    (``budget_exceeded`` stop, ``model_unreachable`` stop or ``model_error``, ``agent_error``)."""

    BUDGET = "budget"  # the gateway refused a model call (``budget_exceeded``): message is its reason
    MODEL = "model"  # a model call failed (the provider, or the way to it)
    AGENT = "agent"  # the agent failed for another reason


@dataclass(frozen=True)
class TurnError:
    """The error the agent ended a turn with (what it reported, untrusted)."""

    kind: TurnErrorKind
    message: str  # at most TurnRequest.max_text_chars


@dataclass(frozen=True)
class TurnReply:
    """A finished turn: ``summary`` is the agent's last answer (at most
    ``TurnRequest.max_text_chars``; its last text so far when the turn failed); ``error`` is set
    when the agent ended the turn with an error."""

    summary: str
    error: TurnError | None = None


class Agent(abc.ABC):
    """A connection to one agent server in one sandbox. Not shared between tasks that prompt
    concurrently; :meth:`close` releases the connection (the server keeps running)."""

    address: str  # how the server reaches the agent, e.g. ``http://10.0.0.5:4096`` (persisted with the
    # run as ``agent_url``; a follow-up reattaches only when it is non-empty)

    @abc.abstractmethod
    async def wait_healthy(self, timeout_s: float) -> None:
        """Return once the agent answers healthy; ``AgentError`` ``agent_start_timeout`` after
        ``timeout_s`` seconds."""

    @abc.abstractmethod
    async def open_session(self, title: str) -> str:
        """A new session titled ``title`` (at most 200 characters) in the workspace; returns its
        id (at most 200 characters). ``AgentError`` when the agent refuses or does not answer."""

    @abc.abstractmethod
    async def prompt(self, turn: TurnRequest, on_event: OnEvent) -> TurnReply:
        """Run one turn to its end. Progress goes to ``on_event`` (awaited in order). An error
        the agent reports ends the turn normally, as :attr:`TurnReply.error`; ``AgentError``
        when the agent cannot be reached (``agent_unreachable``), breaks the protocol
        (``agent_error``) or exceeds ``turn.timeout_s`` (``turn_timeout``, the turn is aborted)."""

    @abc.abstractmethod
    async def abort(self, session_id: str) -> None:
        """Stop the session's running turn (its running commands too); returns within one call's
        bound (tens of seconds). ``AgentError`` when the agent does not answer (callers that
        tear the sandbox down anyway suppress it)."""

    @abc.abstractmethod
    async def has_session(self, session_id: str) -> bool:
        """Whether the agent holds session ``session_id`` (in its own storage: after
        :meth:`Harness.stop` and a new :meth:`Harness.launch` in the same sandbox, it does).
        ``AgentError`` ``agent_unreachable`` when the agent does not answer."""

    @abc.abstractmethod
    async def export_session(self, session_id: str) -> bytes:
        """The session's state (its messages and parts) as UTF-8 text in the harness's own format,
        for :meth:`import_session` on an agent of the same harness, also in another sandbox.
        Bounded in size by the harness (tens of MB); ``AgentError`` when the export fails or is
        not the session asked for."""

    @abc.abstractmethod
    async def import_session(self, state: bytes) -> str:
        """Recreate an exported session here (its id is kept); returns its id. ``AgentError``
        when ``state`` is not an export of this harness or the import fails; ``SandboxError``
        when the state cannot be copied into the sandbox."""

    async def warm_up(self, model_id: str, timeout_s: float, in_workspace: bool = False) -> None:
        """Do the agent's one-time first-turn work now (a sandbox waiting in the warm pool), so
        that a run's first turn does not pay it; ``in_workspace`` when the workspace already
        holds the checkout a run will use (its per-project work can be done too). Nothing of it
        may reach a run's session or the workspace's files. Never raises for the agent's own
        failure; the default does nothing."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection (idempotent)."""


class Harness(abc.ABC):
    """A kind of coding agent (OpenCode, ...): how to start it in a sandbox and reach it."""

    name: str  # as users know the agent, e.g. in messages that quote it

    @abc.abstractmethod
    async def launch(self, sandbox: Sandbox, config: LaunchConfig, timeout_s: float) -> Agent:
        """Start the agent server in ``sandbox`` (its working directory: :data:`WORKSPACE`) and
        wait until it is healthy, at most ``timeout_s`` seconds (``AgentError``
        ``agent_start_timeout``; ``SandboxError`` when it cannot be started). The agent's model
        calls go to ``config.gateway_url`` with ``config.gateway_token``, never elsewhere. In a
        sandbox whose agent was stopped (:meth:`stop`) the new server has the old one's sessions."""

    @abc.abstractmethod
    async def stop(self, sandbox: Sandbox, timeout_s: float) -> None:
        """End the agent server in ``sandbox`` and every process it started (its tools' commands
        and what they left running), and wait until they are gone, so the memory they held is
        freed. The sandbox and its files stay, the agent's own storage of its sessions included;
        processes the agent did not start (services of ``.critique/start.sh``) keep running.
        No error when no agent runs; SandboxError when some of its processes are still running
        after ``timeout_s`` seconds."""

    @abc.abstractmethod
    async def attach(self, sandbox: Sandbox, secret: str) -> Agent:
        """A connection to the agent server already running in ``sandbox``, started with
        ``secret``. Checks nothing: call :meth:`Agent.wait_healthy` when it may be gone.
        ``SandboxError`` when the sandbox has no reachable address."""

    # ---- exported session states (:meth:`Agent.export_session`): opaque outside the harness

    @abc.abstractmethod
    def message_count(self, state: bytes) -> int:
        """How many messages (the user's and the agent's) an exported session ``state`` holds (a
        turn records the count it ended with). ``AgentError`` when ``state`` is not an export of
        this harness."""

    @abc.abstractmethod
    def truncate(self, state: bytes, messages: int) -> bytes:
        """``state`` with only its first ``messages`` messages (at most all of them, none when
        ``messages`` < 1): the transcript as it was at the end of an earlier turn (a fork's, a
        restore's), importable like any export (:meth:`Agent.import_session`). ``AgentError`` when
        ``state`` is not an export of this harness."""
