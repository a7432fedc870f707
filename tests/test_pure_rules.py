"""Pure rules: intent classification, lifecycle derivation, name checks, diff parsing, whose a
sandbox is."""

from __future__ import annotations

import pytest

from critique_local.errors import ErrorCode
from critique_local.repos.names import ref_problem, repository_name_problem
from critique_local.repos.workrepo import Numstat, parse_numstat
from critique_local.runs.intent import classify
from critique_local.runs.states import IllegalTransition, Phase, RunStatus, check_transition, lifecycle_of
from critique_local.runs.turnstate import session_lost
from critique_local.sandboxes.base import run_of_sandbox


@pytest.mark.parametrize(("prompt", "intent"), [
    ("Bump requests to 2.32", "dependency"),
    ("Add a regression test for expired signatures", "test"),
    ("Update the README", "docs"),
    ("Fix the crash on empty input", "bugfix"),
    ("Refactor the settings module", "refactor"),
    ("Add Stripe webhook signature verification", "feature"),
    ("Hello there", "other"),
    ("@bash fix everything\nplease look", "other"),
])
def test_intent(prompt: str, intent: str) -> None:
    assert classify(prompt) == intent


LIFECYCLE_TABLE = [
    # status, phase, session end, chained to -> lifecycle, awaitingFollowUp, canFollowUp, nextActions
    (RunStatus.QUEUED, Phase.QUEUED, None, None, "queued", False, False, {"cancel"}),
    (RunStatus.RUNNING, Phase.PROVISIONING, None, None, "provisioning", False, False, {"cancel"}),
    (RunStatus.RUNNING, Phase.AGENT_RUNNING, None, None, "agent_running", False, False, {"cancel"}),
    (RunStatus.IDLE, Phase.AWAITING_FOLLOW_UP, None, None, "awaiting_follow_up", True, True,
     {"send_message", "end_session", "cancel"}),
    # a follow-up lost its sandbox: idle without a session until a message restores it
    (RunStatus.IDLE, Phase.AWAITING_FOLLOW_UP, "sandbox_lost", None, "awaiting_follow_up", True, True,
     {"send_message", "end_session", "cancel"}),
    (RunStatus.COMPLETED, Phase.FINISHED, "end_session", None, "finished", False, False, set()),
    (RunStatus.COMPLETED, Phase.FINISHED, "expired", None, "finished", False, True, {"send_message"}),
    (RunStatus.COMPLETED, Phase.FINISHED, "sandbox_lost", None, "finished", False, True, {"send_message"}),
    (RunStatus.COMPLETED, Phase.FINISHED, "expired", "run_x", "finished", False, False, set()),
    (RunStatus.FAILED, Phase.FAILED, "finished", None, "failed", False, False, set()),
    (RunStatus.CANCELLED, Phase.CANCELLED, "finished", None, "cancelled", False, False, set()),
]


@pytest.mark.parametrize(("status", "phase", "end", "chained", "name", "awaiting", "can", "actions"), LIFECYCLE_TABLE)
def test_lifecycle_table(status: RunStatus, phase: Phase, end: str | None, chained: str | None, name: str,
                         awaiting: bool, can: bool, actions: set[str]) -> None:
    for has_patch in (False, True):
        lc = lifecycle_of(status, phase, has_patch, end, chained)
        assert lc.lifecycle == name
        assert lc.terminal == (status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED))
        assert (lc.awaiting_follow_up, lc.can_follow_up, lc.session_active) == (
            awaiting, can, status is RunStatus.IDLE and end is None)
        assert set(lc.next_actions) == actions | ({"get_patch"} if has_patch else set())


@pytest.mark.parametrize(("code", "idx", "lost"), [
    (ErrorCode.SANDBOX_GONE, 2, True),
    (ErrorCode.AGENT_UNREACHABLE, 3, True),
    (ErrorCode.OUT_OF_MEMORY, 2, True),
    (ErrorCode.SANDBOX_GONE, 1, False),  # a first turn has nothing to restore: the run fails
    (ErrorCode.MODEL_ERROR, 2, False),  # the turn's own failure: the sandbox stays
    (ErrorCode.TURN_TIMEOUT, 2, False),
    (ErrorCode.INTERNAL_ERROR, 2, False),
])
def test_which_failures_end_only_the_session(code: ErrorCode, idx: int, lost: bool) -> None:
    assert session_lost(code, idx) is lost


def test_terminal_states_are_final() -> None:
    for terminal in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED):
        for target in RunStatus:
            with pytest.raises(IllegalTransition):
                check_transition(terminal, target)
    check_transition(RunStatus.QUEUED, RunStatus.RUNNING)
    with pytest.raises(IllegalTransition):
        check_transition(RunStatus.QUEUED, RunStatus.COMPLETED)


@pytest.mark.parametrize("name", ["acme/web", "a/b", "Org-1/repo.name_2"])
def test_good_repository_names(name: str) -> None:
    assert repository_name_problem(name) is None


@pytest.mark.parametrize("name", ["acme", "acme/web/x", "../x", "acme/..", "-a/b", "a/-b", "a/b.git", "a b/c",
                                  "a/b;c", "a/$(x)", "a/b\n", ""])
def test_bad_repository_names(name: str) -> None:
    assert repository_name_problem(name) is not None


@pytest.mark.parametrize("ref", ["main", "feature/x", "v1.2.3", "0123abcd", "release-2026.1"])
def test_good_refs(ref: str) -> None:
    assert ref_problem(ref) is None


@pytest.mark.parametrize("ref", ["main\n", "-x", "--upload-pack=x", "a..b", "HEAD@{1}", "a b", "x\x01", "a/", "/a", "x.lock",
                                 "a//b", ".hidden", "a/.b", "", "x" * 201, "a~1", "a^", "a:b", "a\\b"])
def test_bad_refs(ref: str) -> None:
    assert ref_problem(ref) is not None


def test_parse_numstat() -> None:
    raw = b"1\t0\tnew.txt\x002\t3\tdir/a b.py\x00-\t-\timg.png\x00caf\xe9\tx\x001\t1\tcaf\xe9\tx\x00"
    assert parse_numstat(raw[:raw.index(b"caf")]) == Numstat([b"new.txt", b"dir/a b.py", b"img.png"], 3, 3)
    # paths are bytes as git stores them (any encoding, tabs allowed)
    assert parse_numstat(b"1\t1\tcaf\xe9\tx\x00").paths == [b"caf\xe9\tx"]


@pytest.mark.parametrize(("sandbox_id", "created_for", "bound", "name", "owner"), [
    ("c1", "run_a", {}, "/critique-run_a", "run_a"),  # started for its run
    ("c2", "pool-0a1b", {}, "/critique-pool-0a1b", None),  # waiting in the pool
    ("c3", "pool-0a1b", {"c3": "run_b"}, "/critique-run_b", "run_b"),  # taken: the store says whose
    ("c4", "pool-0a1b", {"c4": "run_b"}, "/critique-pool-0a1b", "run_b"),  # taken, its rename failed
    ("c5", "pool-0a1b", {}, "/critique-run_c", "run_c"),  # taken, then the run moved on (a restore)
    ("c6", "pool-0a1b", {}, None, None),  # E2B: no names, a waiting one
    ("c7", "run_a", {"c7": "run_z"}, "critique-run_a", "run_z"),  # the store wins
    ("c8", None, {}, "someone-else", None),
])
def test_whose_sandbox_it_is(sandbox_id: str, created_for: str | None, bound: dict[str, str], name: str | None,
                             owner: str | None) -> None:
    """A pooled sandbox keeps its labels (``critique.run=pool-...``) when a run takes it: the
    store's binding decides, then the label, then the name ``critique-<run id>``."""
    assert run_of_sandbox(sandbox_id, created_for, bound, name) == owner
