"""A run's durable turn state: what it takes to rebuild its session outside any sandbox.

Two parts, both under ``server.data_dir``:

- the workspace's tree at each turn: git objects in the run's own repository
  (``<data_dir>/runs/<run id>.git``, ``repos/workrepo.py``, relative to the base commit, which is
  what the patch, validation and publishing are built from too) and the tree id on the turn;
- the agent's session (its transcript) as the harness exports it, sealed with the server's key
  (it can hold secrets the agent read), in ``<data_dir>/sessions/<run id>.state``: one file per
  run, the latest export, written at the end of every turn *before* the run goes idle. Each turn
  records how many of the agent's messages it ended with (counted by the harness, which alone
  knows the export's format: ``Harness.message_count``), so turn N's transcript is the first
  messages of a later export (``Harness.truncate``): a fork of turn N, and every restore, which
  imports the transcript of the turn whose tree it puts back. A follow-up that failed on its own
  records the count of the last good turn (its workspace went back to that turn's tree), so a
  restore forgets what the failed turn said and did. The export's format is the harness's:
  nothing here reads it.

Bounded: an export over ``sandbox.max_state_bytes`` is not kept (the turn says so with a
``warning`` event; a later restore of that run chains instead). Removed with the run: when its
session ends for good (``end_session``, cancel, failure), else ``sandbox.state_keep_s`` after
it ended (the reaper's sweep).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from critique_local.errors import AgentError
from critique_local.services import Services

STATE_SUFFIX = ".state"


class SessionStates:
    """Sealed agent session exports, one file per run."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.root = services.settings.server.data_dir / "sessions"

    def path(self, run_id: str) -> Path:
        return self.root / f"{run_id}{STATE_SUFFIX}"

    async def save(self, run_id: str, state: bytes) -> bool:
        """Keep ``state`` as the run's latest; False (nothing written) when it is over
        ``sandbox.max_state_bytes``. AgentError when it is not UTF-8 text."""
        if len(state) > self.s.settings.sandbox.max_state_bytes:
            return False
        try:
            text = state.decode()
        except UnicodeDecodeError as exc:  # the contract: UTF-8 text (the sandbox's word, unchecked)
            raise AgentError("the agent's session state is not UTF-8 text") from exc
        sealed = self.s.box.seal(text, f"{run_id}:session")
        path = self.path(run_id)

        def write() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(sealed)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(path)

        await asyncio.to_thread(write)
        return True

    async def load(self, run_id: str) -> bytes | None:
        """The run's latest export, or None when none is kept (or it cannot be opened)."""
        path = self.path(run_id)
        try:
            sealed = await asyncio.to_thread(path.read_text)
        except OSError:
            return None
        try:
            return self.s.box.open(sealed, f"{run_id}:session").encode()
        except Exception:  # another key (a restored backup of another server), or damaged
            return None

    def exists(self, run_id: str) -> bool:
        return self.path(run_id).is_file()

    async def discard(self, run_id: str) -> None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.path(run_id).unlink)

    async def kept(self) -> set[str]:
        """Run ids with a kept state."""
        def listing() -> set[str]:
            if not self.root.is_dir():
                return set()
            return {p.name.removesuffix(STATE_SUFFIX) for p in self.root.iterdir() if p.name.endswith(STATE_SUFFIX)}
        return await asyncio.to_thread(listing)

    async def older_than(self, seconds: float) -> list[str]:
        """Run ids whose state was last written more than ``seconds`` ago."""
        cutoff = time.time() - seconds

        def listing() -> list[str]:
            if not self.root.is_dir():
                return []
            return [p.name.removesuffix(STATE_SUFFIX) for p in self.root.iterdir()
                    if p.name.endswith(STATE_SUFFIX) and p.stat().st_mtime < cutoff]
        return await asyncio.to_thread(listing)
