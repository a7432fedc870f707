"""The egress proxy's view of runs: the policy of the run a proxy token belongs to, and where
its decisions go (the run's events and the metrics). The proxy itself is ``egress.py``."""

from __future__ import annotations

from collections.abc import Mapping

from critique_local.egress import DecisionHook, Policy, PolicyLookup
from critique_local.runs.network import network_policy
from critique_local.runs.states import RunStatus
from critique_local.services import Services
from critique_local.store import runs as runs_store
from critique_local.tokens import token_hash


def egress_policy(services: Services, setup_tokens: Mapping[str, Policy]) -> PolicyLookup:
    """The egress proxy's view of a run: only a running turn of a restricted run gets out, and
    an environment's running setup (``setup_tokens``: ``Environments.egress_tokens``)."""

    async def lookup(token: str) -> Policy | None:
        if token in setup_tokens:  # an environment's setup (envs/builder.py)
            return setup_tokens[token]
        run = await runs_store.run_for_sandbox_token(services.db, token_hash(token))
        if run is None or run.status is not RunStatus.RUNNING:
            return None
        mode, allowlist = network_policy(services.settings, run.spec.network)
        return Policy(run.id, tuple(allowlist)) if mode == "restricted" else None

    return lookup


def egress_event(services: Services) -> DecisionHook:
    """Each proxy decision becomes a builder event of its run and counts in the metrics."""

    async def record(run_id: str, event: dict[str, object]) -> None:
        services.metrics.egress_decision(event)
        await services.hub.builder(run_id, event)

    return record
