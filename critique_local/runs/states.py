"""Run status, phase and the lifecycle contract clients read.

``status`` is the coarse public state of the reference docs; ``phase`` is where a running run
is. Everything else (``lifecycle``, ``terminal``, ``awaitingFollowUp``, ``canFollowUp``,
``nextActions``) is derived here, in pure functions, so it can never disagree with ``status``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    IDLE = "idle"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Phase(StrEnum):
    QUEUED = "queued"
    PROVISIONING = "provisioning"
    AGENT_RUNNING = "agent_running"
    COLLECTING = "collecting"
    VALIDATING = "validating"
    PUBLISHING = "publishing"
    AWAITING_FOLLOW_UP = "awaiting_follow_up"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})

_ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.RUNNING: frozenset({RunStatus.RUNNING, RunStatus.IDLE, RunStatus.COMPLETED, RunStatus.FAILED,
                                  RunStatus.CANCELLED}),
    RunStatus.IDLE: frozenset({RunStatus.RUNNING, RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.COMPLETED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}


class IllegalTransition(Exception):
    pass


def check_transition(current: RunStatus, target: RunStatus) -> None:
    if target not in _ALLOWED[current]:
        raise IllegalTransition(f"{current} -> {target}")


class SessionEnd(StrEnum):
    """Why a run's sandbox is gone (``session_end_reason``); decides what a message does next."""

    END_SESSION = "end_session"  # the client ended it: messages get 409 run_terminal
    EXPIRED = "expired"  # idle timeout or lifetime cap: messages start a chained run
    SANDBOX_LOST = "sandbox_lost"  # sandbox or agent died (idle, or in a follow-up turn): messages restore or chain
    IDLE_LIMIT = "idle_limit"  # least recently used beyond scheduler.max_idle_sessions(_per_user): messages chain
    FINISHED = "finished"  # turn ended with the run (failed, cancelled)
    SERVER_STOPPED = "server_stopped"  # server.end_idle_sessions_on_stop: messages start a chained run


CHAINABLE = frozenset({SessionEnd.EXPIRED, SessionEnd.SANDBOX_LOST, SessionEnd.IDLE_LIMIT,
                       SessionEnd.SERVER_STOPPED})

# Lifecycle values (the stable contract documented in README and OpenAPI):
LIFECYCLE_DOC: dict[str, str] = {
    "queued": "Accepted, waiting for a free execution slot.",
    "provisioning": "Preparing the repository checkout and the sandbox; starting the agent.",
    "agent_running": "The agent is working on the current turn.",
    "collecting": "The turn ended; changed paths, diff stats and the patch are being read.",
    "validating": "validationMode checks (or tests) are running; a failure may send the agent a repair prompt.",
    "publishing": "The turn's changes are being committed, pushed and the draft pull request opened or updated.",
    "awaiting_follow_up": "Idle with a warm session: send a message or end the session.",
    "finished": "Completed (terminal).",
    "failed": "Failed (terminal); see error.code.",
    "cancelled": "Cancelled (terminal).",
}

NEXT_ACTIONS_DOC: dict[str, str] = {
    "send_message": "POST /runs/{id}/messages {prompt}: a follow-up turn (warm), or a chained run once the "
                    "session expired.",
    "end_session": "POST /runs/{id}/messages {endSession: true}: destroy the sandbox, complete the run.",
    "cancel": "POST /runs/{id}/cancel: abort the turn, destroy the sandbox, status cancelled.",
    "get_patch": "GET /runs/{id}/patch (exact bytes) or GET /runs/{id}?patch=1 returns a patch.",
}


_RUNNING_PHASES = frozenset({Phase.PROVISIONING, Phase.AGENT_RUNNING, Phase.COLLECTING, Phase.VALIDATING,
                             Phase.PUBLISHING})


@dataclass(frozen=True)
class Lifecycle:
    lifecycle: str
    terminal: bool
    awaiting_follow_up: bool
    can_follow_up: bool
    session_active: bool
    next_actions: tuple[str, ...]


def lifecycle_of(status: RunStatus, phase: Phase, has_patch: bool, session_end: str | None = None,
                 chained_to: str | None = None) -> Lifecycle:
    """Everything a client reads about what it may do next, from the stored state alone."""
    terminal = status in TERMINAL
    idle = status is RunStatus.IDLE
    if status is RunStatus.QUEUED:
        name = "queued"
    elif status is RunStatus.RUNNING:
        name = phase.value if phase in _RUNNING_PHASES else "provisioning"
    elif idle:
        name = "awaiting_follow_up"
    elif status is RunStatus.COMPLETED:
        name = "finished"
    else:
        name = status.value
    chainable = status is RunStatus.COMPLETED and session_end in CHAINABLE and chained_to is None
    actions: list[str] = []
    if idle or chainable:
        actions.append("send_message")
    if idle:
        actions.append("end_session")
    if status in (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.IDLE):
        actions.append("cancel")
    if has_patch:
        actions.append("get_patch")
    # an idle run whose follow-up lost its sandbox has no session until a message restores it
    return Lifecycle(name, terminal, idle, idle or chainable, idle and session_end is None, tuple(actions))
