"""Environments without containers: the key (what determines an environment), the setup
network's narrowing, the eviction rule, and host:port allowlist entries."""

from __future__ import annotations

import asyncio
import io
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest

from critique_local.clock import iso, now
from critique_local.config import Settings
from critique_local.egress import host_allowed
from critique_local.envs import evict
from critique_local.envs.spec import EnvPlan, GitTree, TarTree, plan
from critique_local.runs.network import allowlist_entry_ok
from critique_local.store.environments import EnvironmentRow

ALL_MODES = frozenset({"none", "restricted", "open"})


def packed(tmp_path: Path, files: dict[str, str], name: str = "ws.tar") -> Path:
    path = tmp_path / name
    with tarfile.open(path, "w") as tar:
        for member, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"./{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def plan_of(tmp_path: Path, files: dict[str, str], settings: Settings | None = None, base: str = "img-1",
            modes: frozenset[str] = ALL_MODES, name: str = "ws.tar") -> EnvPlan | None:
    return asyncio.run(plan(settings or Settings(), "acme/web", TarTree(packed(tmp_path, files, name)), base, modes))


REPO = {".critique/setup.sh": "pip install -r requirements.txt\n", "requirements.txt": "greetlib==1.0\n",
        "app.py": "print(1)\n"}


def test_the_key_follows_scripts_key_files_and_base_but_not_other_files(tmp_path: Path) -> None:
    first = plan_of(tmp_path, REPO)
    assert first is not None and first.setup == REPO[".critique/setup.sh"] and first.start is None
    assert first.network_mode == "restricted" and "pypi.org" in first.allowlist
    same = plan_of(tmp_path, {**REPO, "app.py": "print(2)\n", "new.py": "x\n"}, name="b.tar")
    assert same is not None and same.key == first.key  # a newer commit with the same lockfile
    for changed in ({**REPO, "requirements.txt": "greetlib==1.1\n"},
                    {**REPO, ".critique/setup.sh": "pip install -r requirements.txt --pre\n"},
                    {**REPO, ".critique/start.sh": "redis-server --daemonize yes\n"},
                    {**REPO, "package-lock.json": "{}"}):
        other = plan_of(tmp_path, changed, name="c.tar")
        assert other is not None and other.key != first.key, changed
    rebased = plan_of(tmp_path, REPO, base="img-2", name="d.tar")
    assert rebased is not None and rebased.key != first.key


def test_declared_key_files_replace_the_default_list(tmp_path: Path) -> None:
    files = {**REPO, ".critique/key-files": "# what the setup reads\ndeps.lock\n", "deps.lock": "a\n"}
    first = plan_of(tmp_path, files)
    assert first is not None and first.key_files == ("deps.lock",)
    changed_requirements = plan_of(tmp_path, {**files, "requirements.txt": "other\n"}, name="b.tar")
    changed_lock = plan_of(tmp_path, {**files, "deps.lock": "b\n"}, name="c.tar")
    assert changed_requirements is not None and changed_requirements.key == first.key
    assert changed_lock is not None and changed_lock.key != first.key


def test_server_configuration_wins_and_network_only_narrows(tmp_path: Path) -> None:
    settings = Settings.model_validate({"environments": {"repositories": {"acme/web": {
        "setup": "make deps", "network_mode": "open", "allowlist": ["pkgs.internal:8443"], "setup_timeout_s": 5}}}})
    chosen = plan_of(tmp_path, REPO, settings)
    assert chosen is not None and chosen.setup == "make deps" and chosen.setup_timeout_s == 5
    assert chosen.network_mode == "restricted"  # open needs network.allow_open
    assert chosen.allowlist == ("pkgs.internal:8443",)
    settings.network.allow_open = True
    assert (opened := plan_of(tmp_path, REPO, settings, name="b.tar")) is not None and opened.network_mode == "open"
    narrowed = plan_of(tmp_path, REPO, modes=frozenset({"none", "open"}), name="c.tar")  # e.g. E2B
    assert narrowed is not None and narrowed.network_mode == "none" and narrowed.allowlist == ()


def test_no_scripts_or_disabled_means_no_environment(tmp_path: Path) -> None:
    assert plan_of(tmp_path, {"app.py": "x\n", ".critique/setup.sh": "  \n"}) is None
    off = Settings.model_validate({"environments": {"enabled": False}})
    assert plan_of(tmp_path, REPO, off, name="b.tar") is None
    start_only = plan_of(tmp_path, {".critique/start.sh": "echo hi\n"}, name="c.tar")
    assert start_only is not None and start_only.setup is None and start_only.start == "echo hi\n"


def row(key: str, repo: str, created_ago_s: float, used_ago_s: float, size: int | None = 100) -> EnvironmentRow:
    at = now()
    return EnvironmentRow(key, repo, "docker", f"sha256:{key}", size, 1000, iso(at - timedelta(seconds=created_ago_s)),
                          iso(at - timedelta(seconds=used_ago_s)), False)


def test_eviction_by_age_replacement_and_total_size() -> None:
    old = row("old", "acme/a", 900, 800)
    replaced = row("replaced", "acme/b", 500, 400)
    newer = row("newer", "acme/b", 300, 10)
    other = row("other", "acme/c", 50, 20, size=250)
    rows = [old, replaced, newer, other]
    assert [r.key for r in evict.choose(rows, 600, 10_000, superseded=False)] == ["old"]
    assert [r.key for r in evict.choose(rows, 600, 10_000, superseded=True)] == ["replaced", "old"]
    # over the total: the least recently used go first, until the rest fit
    assert [r.key for r in evict.choose(rows, 10_000, 360, superseded=False)] == ["replaced", "old"]
    assert [r.key for r in evict.choose(rows, 600, 10_000, superseded=True, keep={"old"})] == ["replaced"]
    # still used after the newer one was built (another branch): not replaced
    assert evict.choose([row("a", "acme/b", 500, 5), newer], 600, 10_000, superseded=True) == []


@pytest.mark.parametrize(("entry", "ok"), [("pypi.org", True), ("*.npmjs.org", True), ("127.0.0.2:8080", True),
                                           ("pkgs.internal:443", True), ("pypi.org:0", False),
                                           ("pypi.org:99999", False), ("pypi.org:x", False), ("a b", False)])
def test_allowlist_entries(entry: str, ok: bool) -> None:
    assert allowlist_entry_ok(entry) is ok


def test_host_port_entries_allow_that_port_only() -> None:
    allowlist = ("127.0.0.2:8080", "pypi.org", "*.npmjs.org")
    assert host_allowed("127.0.0.2", allowlist, 8080)
    assert not host_allowed("127.0.0.2", allowlist, 8787) and not host_allowed("127.0.0.2", allowlist)
    assert host_allowed("pypi.org", allowlist, 443) and host_allowed("registry.npmjs.org", allowlist, 443)


def test_git_and_tar_readers_agree(tmp_path: Path) -> None:
    """The server reads the base commit with git (mirror or fresh clone); both readers find the
    same scripts, and key files change the key alike."""
    from tests.helpers import git, make_repo

    bare = make_repo(tmp_path / "repos", "acme/web", {**REPO, "link": "x"})
    commit = git("rev-parse", "HEAD", cwd=bare)
    tree = GitTree(bare, commit)
    found = asyncio.run(tree.read({".critique/setup.sh", "missing", "requirements.txt"}, 100))
    assert found == {".critique/setup.sh": REPO[".critique/setup.sh"].encode(),
                     "requirements.txt": REPO["requirements.txt"].encode()}
    digests = asyncio.run(tree.digests({"requirements.txt", "package.json"}))
    assert list(digests) == ["requirements.txt"]
    from_git = asyncio.run(plan(Settings(), "acme/web", tree, "img", ALL_MODES))
    assert from_git is not None and from_git.setup == REPO[".critique/setup.sh"]
