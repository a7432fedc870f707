"""Environments: a repository's setup runs once, every later run starts from what it produced.

``Environments.ensure`` gives a run the environment its plan (``envs/spec.py``) names: a kept
one (reused), or one built now. A build runs in a sandbox of its own, never the run's: the
checkout is uploaded, setup runs as the sandbox user with the repository's secrets and (in
restricted mode) the egress proxy settings in its environment, under the setup network policy;
then the processes setup left are ended, the checkout's tracked files and ``.git`` are dropped
(what setup produced stays: ignored or untracked files in ``/workspace``, everything under
``$HOME``), and the backend keeps the rest (``SandboxBackend.save_environment``). The build
sandbox is removed either way, so nothing of setup (its environment, its processes) is ever in
a sandbox an agent runs in. Runs needing the same new environment at once share one build.

Events (``builder.event``, on the run that started the build): ``setup.started``,
``setup.output`` (increments of output), ``setup.finished`` (``exitCode``, ``durationMs``). A
failing or timed-out setup fails the run (and every run waiting for the same build) with
``setup_failed`` and the output's tail; nothing is kept for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from critique_local.egress import Policy
from critique_local.envs import evict, scripts
from critique_local.envs.spec import EnvPlan, GitTree, TarTree, Tree, plan
from critique_local.errors import ErrorCode, RunFailure, SandboxError
from critique_local.repos.checkout import Checkout
from critique_local.runs.network import proxy_env
from critique_local.sandboxes.base import Sandbox, SandboxSpec
from critique_local.services import Services
from critique_local.store import environments as store
from critique_local.store import secrets as secrets_store
from critique_local.store.runs import RunRow
from critique_local.tokens import SANDBOX_TOKEN_PREFIX, new_token

log = logging.getLogger(__name__)
WORKSPACE = "/workspace"


@dataclass(frozen=True)
class EnvUse:
    key: str
    ref: str
    status: str  # built (this run's build) | joined (another run's build) | reused (kept before)
    build_ms: int | None

    def event(self) -> dict[str, object]:
        return {"key": self.key, "status": self.status, "built": self.status != "reused",
                "reused": self.status == "reused", "buildMs": self.build_ms}


@dataclass(frozen=True)
class _Built:
    ref: str
    build_ms: int


class Environments:
    def __init__(self, services: Services) -> None:
        self.s = services
        self._builds: dict[str, asyncio.Task[_Built]] = {}
        # egress proxy tokens of running builds (the proxy consults them: app.egress_policy)
        self.egress_tokens: dict[str, Policy] = {}

    async def plan(self, run: RunRow, prepared: Checkout) -> EnvPlan | None:
        """The run's environment plan from its base commit (None: no setup or start script)."""
        return await self.plan_for(run.repository_full_name, prepared)

    def tree(self, repository: str, prepared: Checkout) -> Tree:
        """The base commit where the server reads it fastest: the mirror, or an uncached
        checkout's fresh clone (``git cat-file``); the packed checkout only as a last resort."""
        source = self.s.hosts.resolve(repository)
        if prepared.workdir is not None and (prepared.workdir / "ws" / ".git").is_dir():
            return GitTree(prepared.workdir / "ws" / ".git", prepared.base_commit)
        if self.s.mirrors is not None and self.s.settings.git.mirror_cache and source is not None:
            return GitTree(self.s.mirrors.path(source), prepared.base_commit)
        return TarTree(prepared.tar_path)

    async def plan_for(self, repository: str, prepared: Checkout) -> EnvPlan | None:
        if not self.s.settings.environments.enabled:
            return None
        base = await self.s.backend.environment_base()
        identity = f"{base}\0agent={getattr(self.s.harness, 'version', type(self.s.harness).__name__)}"
        return await plan(self.s.settings, repository, self.tree(repository, prepared), identity,
                          self.s.backend.network_modes)

    async def reused(self, env_plan: EnvPlan, run: RunRow) -> EnvUse | None:
        """The kept environment of ``env_plan`` as a reuse (recorded for ``run``), or None."""
        row = await store.get(self.s.db, env_plan.key)
        if row is None or row.stale:
            return None
        await store.touch(self.s.db, row.key)
        await store.record_run(self.s.db, run.id, row.key, "reused", None)
        return EnvUse(row.key, row.ref, "reused", None)

    async def ensure(self, env_plan: EnvPlan, run: RunRow, tar_path: Path) -> EnvUse:
        """The kept environment of ``env_plan`` (built now when there is none, or it is marked
        for rebuild). Raises RunFailure(setup_failed) when setup fails."""
        db = self.s.db
        kept = await self.reused(env_plan, run)
        if kept is not None:
            return kept
        row = await store.get(db, env_plan.key)
        task = self._builds.get(env_plan.key)
        status = "joined"
        if task is None:
            status = "built"
            task = asyncio.ensure_future(self._build(env_plan, run, tar_path, row.ref if row else None))
            self._builds[env_plan.key] = task
            task.add_done_callback(functools.partial(self._forget, env_plan.key))
        else:
            await self.s.hub.builder(run.id, {"type": "setup.waiting", "environmentKey": env_plan.key})
        built = await asyncio.shield(task)  # a cancelled run does not cancel a build others may share
        await store.record_run(db, run.id, env_plan.key, status, built.build_ms)
        return EnvUse(env_plan.key, built.ref, status, built.build_ms)

    def _forget(self, key: str, _task: asyncio.Task[_Built]) -> None:
        self._builds.pop(key, None)

    async def _build(self, env_plan: EnvPlan, run: RunRow, tar_path: Path, old_ref: str | None) -> _Built:
        s, settings = self.s, self.s.settings.environments
        assert env_plan.setup is not None
        t0 = time.monotonic()
        await s.hub.builder(run.id, {"type": "setup.started", "environmentKey": env_plan.key,
                                     "network": env_plan.network_mode})
        marker = secrets.token_hex(8)
        env = await secrets_store.env_for(s.db, s.box, run.repository_full_name)
        for value in env.values():
            s.redactor.add(value, run.id)
        token = new_token(SANDBOX_TOKEN_PREFIX)
        s.redactor.add(token, run.id)
        if env_plan.network_mode == "restricted" and s.proxy_address:
            env.update(proxy_env(s.proxy_address, token, s.proxy_address.rpartition(":")[0]))
            self.egress_tokens[token] = Policy(run.id, env_plan.allowlist)
        env[scripts.MARKER] = marker
        sandbox: Sandbox | None = None
        try:
            sandbox = await s.backend.create(SandboxSpec(f"env-{env_plan.key[:12]}-{secrets.token_hex(3)}", run.user_id,
                                                         network_mode=env_plan.network_mode))
            await sandbox.upload_tar(WORKSPACE, tar_path)

            async def output(text: str) -> None:
                await s.hub.builder(run.id, {"type": "setup.output", "output": text})

            result = await scripts.run_script(sandbox, env_plan.setup, "setup.sh", scripts.SETUP_LOG, env,
                                              env_plan.setup_timeout_s, settings.output_tail_chars, output)
            await s.hub.builder(run.id, {"type": "setup.finished", "exitCode": result.exit_code,
                                         "durationMs": result.duration_ms, "timedOut": result.timed_out})
            if result.timed_out:
                raise RunFailure(ErrorCode.SETUP_FAILED, f"setup.sh did not finish within "
                                 f"{env_plan.setup_timeout_s:g} s; output tail:\n{result.tail}")
            if result.exit_code != 0:
                raise RunFailure(ErrorCode.SETUP_FAILED, f"setup.sh exited with {result.exit_code}; output tail:\n"
                                 f"{result.tail}")
            await scripts.prepare_for_keeping(sandbox, marker)
            ref, size = await s.backend.save_environment(sandbox, env_plan.key, settings.max_size_mb * 1_000_000)
        except SandboxError as exc:
            raise RunFailure(ErrorCode.SETUP_FAILED, f"setting up the environment failed: {exc.message}") from exc
        finally:
            self.egress_tokens.pop(token, None)
            if sandbox is not None:
                with contextlib.suppress(SandboxError):
                    await asyncio.shield(s.backend.destroy(sandbox.id))
        build_ms = round((time.monotonic() - t0) * 1000)
        await store.put(s.db, env_plan.key, env_plan.repository, s.backend.name, ref, size, build_ms)
        if old_ref is not None and old_ref != ref:  # a rebuilt one replaces its predecessor
            with contextlib.suppress(SandboxError):
                await s.backend.delete_environment(old_ref)
        await self.evict(keep={env_plan.key})
        return _Built(ref, build_ms)

    async def start(self, sandbox: Sandbox, env_plan: EnvPlan, env: dict[str, str]) -> dict[str, object]:
        """Run the start script in a run's sandbox (no repository secrets: what it starts runs
        beside the agent). Raises RunFailure(setup_failed) when it fails."""
        assert env_plan.start is not None
        return await run_start(self.s, sandbox, env_plan.start, env)

    async def evict(self, keep: set[str] | frozenset[str] = frozenset(), superseded: bool = False) -> list[str]:
        """Remove environments unused for ``environments.max_unused_s``, then the least recently
        used beyond ``environments.max_total_mb`` (and, with ``superseded``, those a newer
        environment of the same repository replaced); returns the removed keys."""
        settings = self.s.settings.environments
        rows = await store.all_of(self.s.db, self.s.backend.name)
        removed = []
        for row in evict.choose(rows, settings.max_unused_s, settings.max_total_mb * 1_000_000, superseded,
                                keep | set(self._builds)):
            try:
                if await self.s.backend.delete_environment(row.ref):
                    await store.delete(self.s.db, row.key)
                    removed.append(row.key)
            except SandboxError as exc:
                log.warning("could not remove environment %s: %s", row.key[:12], exc)
        return removed


async def run_start(s: Services, sandbox: Sandbox, script: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """``.critique/start.sh`` in ``sandbox``: {exitCode, durationMs}. Raises
    RunFailure(setup_failed) when it fails or exceeds ``environments.start_timeout_s``."""
    settings = s.settings.environments
    result = await scripts.run_script(sandbox, script, "start.sh", scripts.START_LOG, env or {},
                                      settings.start_timeout_s, settings.output_tail_chars)
    if result.timed_out or result.exit_code != 0:
        why = (f"did not finish within {settings.start_timeout_s:g} s" if result.timed_out
               else f"exited with {result.exit_code}")
        raise RunFailure(ErrorCode.SETUP_FAILED, f"start.sh {why}; output tail:\n{result.tail}")
    return {"exitCode": 0, "durationMs": result.duration_ms}
