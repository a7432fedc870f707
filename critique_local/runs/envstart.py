"""Where a run's sandbox starts from: the environment its checkout needs (``envs/``) and, when
one fits, a warm sandbox of the pool (``runs/pool.py``). Shared by a run's first start
(``runs/provision.py``) and a session's restore or fork (``runs/restore.py``), so a restored
session has what the repository's ``.critique/setup.sh`` produced and its ``start.sh`` running,
exactly as the run's first sandbox had.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from critique_local.envs.builder import Environments, EnvUse
from critique_local.envs.spec import EnvPlan
from critique_local.errors import SandboxError
from critique_local.repos.checkout import Checkout
from critique_local.runs.pool import WarmPool, WarmSandbox
from critique_local.sandboxes.base import Sandbox
from critique_local.services import Services
from critique_local.store.runs import RunRow


@dataclass(frozen=True)
class Origin:
    """What a run's new sandbox starts from: ``env`` (None: the plain sandbox image) and
    ``warm`` (None: a sandbox is created, of ``env.ref`` when there is one)."""

    plan: EnvPlan | None  # None: the repository declares no setup or start script
    env: EnvUse | None
    warm: WarmSandbox | None

    @property
    def environment(self) -> str | None:
        """The backend's reference for ``SandboxSpec.environment``."""
        return self.env.ref if self.env is not None else None

    def event(self) -> dict[str, object]:
        """``{"environment": {key, status, built, reused, buildMs}}`` or ``{}`` without one."""
        return {"environment": self.env.event()} if self.env is not None else {}


async def origin(s: Services, envs: Environments, pool: WarmPool | None, run: RunRow, prepared: Checkout,
                 network_mode: str, warm_ok: bool = True) -> Origin:
    """The environment ``run`` needs at ``prepared`` (reused when kept, else built now: setup
    runs, with its events on ``run``) and a warm sandbox of it when the pool has one (never when
    not ``warm_ok``). Raises RunFailure(setup_failed) when setup fails."""
    env_plan = await envs.plan(run, prepared)
    env_key = env_plan.key if env_plan is not None and env_plan.setup is not None else None
    warm: WarmSandbox | None = None
    env: EnvUse | None = None
    if warm_ok and pool is not None and pool.eligible(run.model_id, network_mode) and (
            env_plan is None or env_key is not None):
        warm = await pool.take(prepared.key, env_key)
        if warm is not None and env_plan is not None:  # started from the kept environment
            env = await envs.reused(env_plan, run)
            if env is None:  # removed meanwhile (envs prune)
                with contextlib.suppress(SandboxError):
                    await s.backend.destroy(warm.sandbox.id)
                warm = None
    if env_plan is not None and env_plan.setup is not None and env is None:
        env = await envs.ensure(env_plan, run, prepared.tar_path)
        if env.status == "built" and pool is not None:
            pool.wake()  # pool.environments may want sandboxes of it
    return Origin(env_plan, env, warm)


async def start_script(s: Services, envs: Environments, origin: Origin, run: RunRow, sandbox: Sandbox,
                       network_env: dict[str, str]) -> None:
    """Run ``.critique/start.sh`` in ``sandbox`` (a warm one ran it when it started) with a
    ``start.finished`` event on ``run``. Raises RunFailure(setup_failed) when it fails."""
    if origin.plan is None or origin.plan.start is None or origin.warm is not None:
        return
    result = await envs.start(sandbox, origin.plan, network_env)
    await s.hub.builder(run.id, {"type": "start.finished", **result})
