"""What a run's environment is: the setup and start scripts (the server's configuration for
the repository, else the repository's ``.critique/setup.sh`` and ``.critique/start.sh`` as they
are in the run's base commit, read from the packed checkout on the server, never from a
sandbox), the key files, the setup network, and the key that names the environment.

The key is a SHA-256 over: the repository, both scripts, the key files' paths and contents
(``.critique/key-files`` lists them one per line, else ``environments.key_files``), the setup
network policy, the base image (or template) and the agent. A later run whose key matches starts
from the kept environment on any commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from critique_local.config import Settings
from critique_local.envs.settings import EnvironmentSettings
from critique_local.repos.git import clean_env, run_git_bytes

SETUP_FILE = ".critique/setup.sh"
START_FILE = ".critique/start.sh"
KEY_FILES_FILE = ".critique/key-files"
MAX_SCRIPT_BYTES = 100_000  # a script travels as one argument (Linux: 128 KiB at most)
MAX_KEY_FILE_BYTES = 64 * 1024 * 1024
MAX_KEY_FILES = 100
ENV_FORMAT = 1  # part of the key: environments of another layout are not reused


@dataclass(frozen=True)
class EnvPlan:
    repository: str
    setup: str | None  # bash script; None: nothing to set up (no environment is kept)
    start: str | None  # bash script run at every sandbox start
    network_mode: str  # of setup: none | restricted | open
    allowlist: tuple[str, ...]
    key: str  # hex SHA-256; meaningful only with ``setup``
    key_files: tuple[str, ...]
    setup_timeout_s: float = 1800.0


class Tree(Protocol):
    """The run's base commit, as the server holds it."""

    async def read(self, paths: set[str], cap: int) -> dict[str, bytes]:
        """The regular files among ``paths`` and their bytes (at most ``cap`` each)."""

    async def digests(self, paths: set[str]) -> dict[str, str]:
        """A content digest of each file among ``paths`` that exists."""


@dataclass(frozen=True)
class GitTree:
    """A commit in a repository on the server (the mirror, or the fresh clone of an uncached
    checkout): ``git cat-file`` reads blobs, never the file system, so links lead nowhere."""

    git_dir: Path
    commit: str

    async def _batch(self, paths: set[str], check: bool) -> bytes:
        names = sorted(p for p in paths if p and "\n" not in p)
        stdin = "".join(f"{self.commit}:{p}\n" for p in names).encode()
        return await run_git_bytes([f"--git-dir={self.git_dir}", "cat-file", "--batch-check" if check else "--batch"],
                                   None, clean_env(), 120, stdin=stdin)

    async def digests(self, paths: set[str]) -> dict[str, str]:
        names = sorted(p for p in paths if p and "\n" not in p)
        lines = (await self._batch(set(names), True)).decode(errors="replace").splitlines()
        out = {}
        for name, line in zip(names, lines, strict=False):
            parts = line.split()
            if len(parts) == 3 and parts[1] == "blob":
                out[name] = parts[0]  # the blob id: a digest of the contents
        return out

    async def read(self, paths: set[str], cap: int) -> dict[str, bytes]:
        names = sorted(p for p in paths if p and "\n" not in p)
        raw, out, pos = await self._batch(set(names), False), {}, 0
        for name in names:
            end = raw.index(b"\n", pos)
            parts = raw[pos:end].split()
            pos = end + 1
            if len(parts) == 3 and parts[1] in (b"blob", b"tree", b"commit", b"tag"):
                size = int(parts[2])
                if parts[1] == b"blob":
                    out[name] = raw[pos:pos + min(size, cap)]
                pos += size + 1
        return out


@dataclass(frozen=True)
class TarTree:
    """A packed checkout (scanned whole: for tests and when no repository is at hand)."""

    tar_path: Path

    async def read(self, paths: set[str], cap: int) -> dict[str, bytes]:
        return await asyncio.to_thread(_read_members, self.tar_path, paths, cap)

    async def digests(self, paths: set[str]) -> dict[str, str]:
        found = await asyncio.to_thread(_read_members, self.tar_path, paths, MAX_KEY_FILE_BYTES)
        return {name: hashlib.sha256(data).hexdigest() for name, data in found.items()}


def _read_members(tar_path: Path, wanted: set[str], cap: int) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name in wanted and member.isfile():
                fh = tar.extractfile(member)
                data = fh.read(cap) if fh else b""
                if member.size > cap:
                    data += f"\0size={member.size}".encode()
                found[name] = data
    return found


def _setting(settings: EnvironmentSettings, repository: str) -> tuple[str | None, str | None, list[str] | None, str,
                                                                     list[str]]:
    repo = settings.repositories.get(repository)
    mode = (repo.network_mode if repo and repo.network_mode else None) or settings.network_mode
    allowlist = repo.allowlist if repo and repo.allowlist is not None else settings.allowlist
    return (repo.setup if repo else None, repo.start if repo else None, repo.key_files if repo else None, mode,
            list(allowlist))


def _text(data: bytes | None) -> str | None:
    if data is None or not data.strip():
        return None
    return data[:MAX_SCRIPT_BYTES].decode(errors="replace").replace("\0", "")


async def plan(settings: Settings, repository: str, tree: Tree, base_identity: str,
               supported_modes: frozenset[str]) -> EnvPlan | None:
    """The run's environment plan, or None when the repository declares neither script (or
    environments are disabled). ``base_identity``: the sandbox image or template and agent."""
    envs = settings.environments
    if not envs.enabled:
        return None
    conf_setup, conf_start, conf_keys, mode, allowlist = _setting(envs, repository)
    scripts = await tree.read({SETUP_FILE, START_FILE, KEY_FILES_FILE}, MAX_SCRIPT_BYTES)
    setup = conf_setup if conf_setup is not None else _text(scripts.get(SETUP_FILE))
    start = conf_start if conf_start is not None else _text(scripts.get(START_FILE))
    if setup is None and start is None:
        return None
    if conf_keys is not None:
        key_files = conf_keys
    elif KEY_FILES_FILE in scripts:
        key_files = [line.strip() for line in scripts[KEY_FILES_FILE].decode(errors="replace").splitlines()
                     if line.strip() and not line.startswith("#")]
    else:
        key_files = list(envs.key_files)
    key_files = sorted(set(key_files))[:MAX_KEY_FILES]
    if mode == "open" and not settings.network.allow_open:
        mode = "restricted"  # open only where the operator allows it
    if mode not in supported_modes:
        mode = "none"  # narrower, never wider: e.g. E2B cannot log each connection of restricted mode
    contents = await tree.digests(set(key_files))
    digest = hashlib.sha256()
    for part in (f"env-format-{ENV_FORMAT}", repository, setup or "", start or "", base_identity,
                 json.dumps([mode, sorted(allowlist) if mode == "restricted" else []])):
        digest.update(hashlib.sha256(part.encode()).digest())
    for name in key_files:
        digest.update(hashlib.sha256(name.encode()).digest())
        digest.update(contents.get(name, "absent").encode())
    repo = envs.repositories.get(repository)
    return EnvPlan(repository, setup, start, mode, tuple(allowlist) if mode == "restricted" else (),
                   digest.hexdigest(), tuple(key_files),
                   repo.setup_timeout_s if repo and repo.setup_timeout_s else envs.setup_timeout_s)
