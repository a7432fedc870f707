"""Rebuilding a session from its durable turn state (``runs/durable.py``): a new sandbox with the
workspace at a turn's tree and the agent's transcript imported. Used when a message reaches an
idle run whose sandbox expired, was removed or was lost to a restart (or a paused session whose
kept sandbox cannot be resumed, ``runs/pause.py``), and when a run is forked at a turn. The new sandbox starts from the environment the run's checkout
needs, as the run's first one did (``runs/envstart.py``: the kept one, or built again when it
was removed meanwhile), and ``.critique/start.sh`` runs on the restored tree.

The tree is put in place the way a plan turn is undone (``runs/plan_guard.py``), with a git the
agent cannot configure: the server sends the tree's files (``git archive`` from the run's own
repository), the sandbox hashes them into a private repository and checks the result is exactly
that tree, then the workspace is made equal to it (changed files rewritten, files the tree lacks
removed; ignored files stay). The same puts a live workspace back to the last good turn after a
turn that failed on its own (a model error, a patch over the limit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import tempfile
import time
from pathlib import Path

from critique_local.agent.base import WORKSPACE
from critique_local.clock import now_iso
from critique_local.errors import ErrorCode, RunFailure, SandboxError
from critique_local.repos import checkout
from critique_local.repos.checkout import NEUTRAL_ATTRIBUTES
from critique_local.repos.workrepo import RunRepo
from critique_local.runs import durable, envstart
from critique_local.runs.mcp_servers import relay_servers
from critique_local.runs.network import network_policy
from critique_local.runs.pause import Pauser
from critique_local.runs.plan_guard import discard_changes
from critique_local.runs.pool import launch_config
from critique_local.runs.provision import Job, Provisioner
from critique_local.sandboxes.base import Sandbox, SandboxSpec
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store import sessions as sessions_store
from critique_local.tokens import SANDBOX_TOKEN_PREFIX, new_token, token_hash

TREE_DIR = "/tmp/critique-tree"
MAX_TREE_BYTES = 4_000_000_000

# $1 the tree expected, $2 neutral attributes. Hashes the files in TREE_DIR into a private
# repository (borrowing the workspace's objects) and prints that repository's git dir.
_HASH_TREE = r"""
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin GIT_CONFIG_NOSYSTEM=1 \
  GIT_CONFIG_GLOBAL=/dev/null GIT_ATTR_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0 GIT_NO_REPLACE_OBJECTS=1
unset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE
d=$(mktemp -d /tmp/critique-put.XXXXXXXX) || exit 3
git init -q --template= "$d/repo" >/dev/null || exit 3
export GIT_DIR="$d/repo/.git"
mkdir -p "$GIT_DIR/info" "$GIT_DIR/objects/info" || exit 3
printf '%s' "$2" > "$GIT_DIR/info/attributes"
if [ -d /workspace/.git/objects ] && [ ! -L /workspace/.git ]; then
  printf '%s\n' /workspace/.git/objects > "$GIT_DIR/objects/info/alternates"
fi
g() { git -c core.autocrlf=false -c core.safecrlf=false -c core.fsmonitor=false -c core.hooksPath=/dev/null \
  -c core.attributesFile=/dev/null -c core.excludesFile=/dev/null -c core.symlinks=true -c core.fileMode=true "$@"; }
cd "$TREE_DIR" || exit 3
GIT_WORK_TREE="$TREE_DIR" GIT_INDEX_FILE="$d/index" g add -A -f -- . || exit 4
tree=$(GIT_INDEX_FILE="$d/index" g write-tree) || exit 4
cd / && rm -rf "$TREE_DIR" "$d/index"
if [ "$tree" != "$1" ]; then echo "the files give tree $tree, not $1" >&2; rm -rf "$d"; exit 5; fi
printf '%s' "$GIT_DIR"
""".replace("$TREE_DIR", TREE_DIR)


async def put_tree(sandbox: Sandbox, repo: RunRepo, tree: str) -> None:
    """Make ``/workspace`` hold exactly ``tree`` (of ``repo``). Raises SandboxError."""
    archive = await repo.git("archive", "--format=tar", tree, timeout_s=300, max_bytes=MAX_TREE_BYTES)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tree.tar"
        await asyncio.to_thread(path.write_bytes, archive)
        await sandbox.exec(["bash", "-c", 'rm -rf -- "$1" && mkdir -p -- "$1"', "tree-dir", TREE_DIR], timeout_s=60)
        await sandbox.upload_tar(TREE_DIR, path)
    res = await sandbox.exec(["bash", "-c", _HASH_TREE, "put-tree", tree, NEUTRAL_ATTRIBUTES], timeout_s=300)
    if not res.ok:
        raise SandboxError(f"putting the tree in place failed: {res.stderr.decode(errors='replace')[-300:]}")
    git_dir = res.stdout.decode(errors="replace").strip()
    try:
        await discard_changes(sandbox, tree, env={"GIT_DIR": git_dir, "GIT_WORK_TREE": WORKSPACE})
    except RunFailure as exc:
        raise SandboxError(f"putting the tree in place failed: {exc.message}") from exc
    finally:
        await sandbox.exec(["rm", "-rf", "--", git_dir.removesuffix("/repo/.git")], timeout_s=60)


def ms(start: float, end: float) -> int:
    return round((end - start) * 1000)


class Restorer:
    """Restores sessions of runs from their durable state (see the module docstring)."""

    def __init__(self, services: Services, provisioner: Provisioner, states: durable.SessionStates) -> None:
        self.s = services
        self.provisioner = provisioner
        self.states = states
        self.pauser = Pauser(services, provisioner, self.restorable)

    def repo(self, run_id: str) -> RunRepo:
        return RunRepo(self.s.settings.server.data_dir / "runs", run_id)

    async def restorable(self, run_id: str) -> bool:
        """Whether the run's session can be rebuilt (its last kept turn's tree and transcript)."""
        return (await sessions_store.restore_point(self.s.db, run_id) is not None and self.states.exists(run_id)
                and self.repo(run_id).path.exists())

    async def reattach(self, job: Job, reason: str | None = None) -> None:
        """A follow-up's sandbox and agent: the live ones, else a paused session resumed in its
        kept sandbox (``runs/pause.py``), else (expired, lost, or its resume failed) the session
        rebuilt from its durable state. RunFailure ``sandbox_gone`` when none of these works."""
        run = job.run
        live = (run.session_expires_at or "") > now_iso()  # past it, the sandbox's lifetime is over
        if run.sandbox_id and not run.paused_at and live:
            attached = await self.provisioner.attach(run)
            if attached is not None:
                job.sandbox, job.agent = attached
                job.sandbox_id = job.sandbox.id
                return
        why = reason or ("paused" if run.paused_at else "sandbox_lost")
        if run.sandbox_id and run.paused_at and live and await self.pauser.resume(job):  # its sandbox was kept
            return
        if run.sandbox_id:
            await self._destroy(run.sandbox_id)
            await store.update_run(self.s.db, run.id, sandbox_id=None)
            job.run = dataclasses.replace(job.run, sandbox_id=None)
        point = await sessions_store.restore_point(self.s.db, run.id)
        state = await self.states.load(run.id)
        if point is None or state is None:
            raise RunFailure(ErrorCode.SANDBOX_GONE, "the run's sandbox or its agent is no longer available and "
                             "its session state was not kept")
        if reason is None and run.session_expires_at and run.session_expires_at <= now_iso():
            why = "expired"
        # the transcript as the restored turn ended (the kept export may hold more: a later turn
        # whose tree was not kept), as a fork cuts it
        await self.restore(job, point[0], point[1], self.s.harness.truncate(state, point[2]), why)

    async def _destroy(self, sandbox_id: str) -> None:
        try:
            await self.s.backend.destroy(sandbox_id)
        except SandboxError:
            pass  # the sweep removes what is left

    async def restore(self, job: Job, turn: int, tree: str, state: bytes, reason: str) -> None:
        """A new sandbox for ``job.run`` with the workspace at ``tree`` (in the run's own
        repository) and the agent's transcript ``state`` imported; fills ``job`` and writes the
        run's bindings; a ``session.restored`` event carries the timings and when this agent was
        ready (the run's ``agentReadyAt`` stays its first session's). Raises RunError."""
        run, s, settings = job.run, self.s, self.s.settings
        assert run.base_commit is not None
        t0 = time.monotonic()
        prepared = await checkout.prepare(settings.git, s.hosts.resolve(run.repository_full_name), run.base_commit,
                                          settings.server.data_dir, s.mirrors)
        t_checkout = time.monotonic()
        mode = network_policy(settings, run.spec.network)[0]
        mcp = relay_servers(s.gateway_url, run.spec)
        try:
            if prepared.base_commit != run.base_commit:
                raise RunFailure(ErrorCode.CHECKOUT_FAILED, "the run's base commit is no longer available")
            # the environment the checkout needs (kept, else built again), and a warm sandbox of it
            # when one fits: it has the agent running already (and maybe this checkout)
            start = await envstart.origin(s, self.provisioner.envs, self.provisioner.pool, run, prepared, mode,
                                          warm_ok=not mcp)
            warm = start.warm
            t_env = time.monotonic()
            token = warm.token if warm else new_token(SANDBOX_TOKEN_PREFIX)
            password = warm.password if warm else secrets.token_urlsafe(24)
            s.redactor.add(token, run.id)
            await store.update_run(s.db, run.id, sandbox_token_hash=token_hash(token),
                                   sandbox_token=s.box.seal(token, f"{run.id}:token"))
            if warm is not None:
                sandbox = warm.sandbox
            else:
                sandbox = await s.backend.create(SandboxSpec(run.id, run.user_id, network_mode=mode,
                                                             environment=start.environment))
            job.sandbox_id, started = sandbox.id, now_iso()
            await store.update_run(s.db, run.id, sandbox_id=sandbox.id, sandbox_started_at=started)
            if warm is not None:  # bound first: a taken pool sandbox is the run's before it bears its name
                await s.backend.adopt(sandbox.id, run.id)
            job.sandbox = sandbox
            t_sandbox = time.monotonic()
            if warm is None or warm.checkout_key != prepared.key:
                await sandbox.upload_tar(WORKSPACE, prepared.tar_path)
        finally:
            await asyncio.shield(checkout.discard(prepared))
        t_upload = time.monotonic()
        done: dict[str, float] = {}

        async def tree_in_place() -> None:
            await put_tree(sandbox, self.repo(run.id), tree)
            done["tree"] = time.monotonic()
            # on the turn's tree, as at the run's first start (a warm sandbox ran it already)
            await envstart.start_script(s, self.provisioner.envs, start, run, sandbox,
                                        self.provisioner.network_env(run, token))

        async def agent_up() -> None:
            if warm is not None:
                job.agent = await s.harness.attach(sandbox, password)
            else:
                config = launch_config(s, token, password, run.model_id, self.provisioner.network_env(run, token),
                                       mcp)
                job.agent = await s.harness.launch(sandbox, config, settings.sandbox.agent_ready_timeout_s)
            done["agent"] = time.monotonic()

        async def imported() -> str:
            if warm is None:  # a starting server and the import CLI would both set up its storage
                await agent_up()
            assert job.agent is not None
            return await job.agent.import_session(state)

        # the three are independent: the workspace's files, the agent's server, its transcript
        if warm is not None:
            await agent_up()
        try:
            async with asyncio.TaskGroup() as group:  # one failing cancels the other
                group.create_task(tree_in_place())
                importing = group.create_task(imported())
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        session_id = importing.result()
        assert job.agent is not None
        t_import = time.monotonic()
        sealed = s.box.seal(password, run.id)
        ready = now_iso()
        first_ready = run.agent_ready_at or ready  # the run's first session's (a fork's first is this one)
        await store.update_run(s.db, run.id, agent_session_id=session_id, agent_url=job.agent.address,
                               agent_secret=sealed, agent_ready_at=first_ready, paused_at=None)
        await s.hub.builder(run.id, {
            "type": "session.restored", "reason": reason, "fromTurn": turn, "warm": warm is not None,
            "messages": s.harness.message_count(state), "agentReadyAt": ready,
            "checkoutMs": ms(t0, t_checkout), **start.event(), "environmentMs": ms(t_checkout, t_env),
            "sandboxMs": ms(t_env, t_sandbox), "uploadMs": ms(t_sandbox, t_upload),
            # tree and agent run side by side from the upload on; the import follows the agent
            "treeMs": ms(t_upload, done["tree"]), "agentMs": ms(t_upload, done["agent"]),
            "importMs": ms(done["agent"], t_import), "totalMs": ms(t0, t_import)})
        job.run = dataclasses.replace(run, sandbox_id=sandbox.id, sandbox_started_at=started,
                                      agent_session_id=session_id, agent_url=job.agent.address, agent_secret=sealed,
                                      agent_ready_at=first_ready, paused_at=None)
