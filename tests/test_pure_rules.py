"""Pure rules: intent classification, lifecycle derivation, name checks, diff parsing."""

from __future__ import annotations

import pytest

from critique_local.repos.names import ref_problem, repository_name_problem
from critique_local.runs.collect import parse_numstat
from critique_local.runs.intent import classify
from critique_local.runs.states import IllegalTransition, Phase, RunStatus, check_transition, lifecycle_of


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


@pytest.mark.parametrize("status", list(RunStatus))
def test_lifecycle_agrees_with_status(status: RunStatus) -> None:
    for phase in Phase:
        for has_patch in (False, True):
            lc = lifecycle_of(status, phase, has_patch)
            assert lc.terminal == (status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED))
            assert lc.awaiting_follow_up == lc.can_follow_up == False  # noqa: E712 (no warm sessions yet)
            assert ("get_patch" in lc.next_actions) == (has_patch and status in (RunStatus.COMPLETED, RunStatus.IDLE))
            if status is RunStatus.COMPLETED:
                assert lc.lifecycle == "finished"


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
    raw = b"1\t0\tnew.txt\x002\t3\tdir/a b.py\x00-\t-\timg.png\x00\x00SIZE 123"
    assert parse_numstat(raw) == (["new.txt", "dir/a b.py", "img.png"], 3, 3, 123)
