"""Pick the configured backend."""

from __future__ import annotations

from critique_local.config import Settings
from critique_local.hoststate import InstanceClaim
from critique_local.sandboxes.base import SandboxBackend


def make_backend(settings: Settings, claim: InstanceClaim) -> SandboxBackend:
    """The configured backend, acting for the instance ``claim`` holds."""
    if settings.sandbox.backend == "docker":
        from critique_local.sandboxes.docker import DockerBackend

        return DockerBackend(settings.sandbox, settings.docker, claim, settings.network.allow_open)
    if settings.sandbox.backend == "e2b":
        from critique_local.sandboxes.e2b import E2BBackend

        return E2BBackend(settings.e2b, settings.sandbox, claim.instance_id, settings.e2b.gateway_url,
                          settings.network.allow_open)
    raise ValueError(f"unknown sandbox backend {settings.sandbox.backend!r}")
