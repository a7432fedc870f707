"""The long-lived objects one server owns, handed to routes, the scheduler and the executor."""

from __future__ import annotations

from dataclasses import dataclass, field

from critique_local.agent import default_harness
from critique_local.agent.base import Harness
from critique_local.config import Settings
from critique_local.crypto import SecretBox
from critique_local.gateway.calls import ModelCalls
from critique_local.gateway.catalog import Catalog
from critique_local.redact import Redactor
from critique_local.repos.hosts import Hosts
from critique_local.repos.mirrors import Mirrors
from critique_local.runs.events import EventHub
from critique_local.sandboxes.base import SandboxBackend
from critique_local.store.db import Database


@dataclass
class Services:
    settings: Settings
    db: Database
    hub: EventHub
    backend: SandboxBackend
    catalog: Catalog
    instance_id: str
    box: SecretBox
    hosts: Hosts
    redactor: Redactor = field(default_factory=Redactor)
    mirrors: Mirrors | None = None
    gateway_url: str = ""  # how sandboxes reach /api/v1; set once the sandbox-facing listener is bound
    public_url: str = ""  # how clients reach us; set once the public listener is bound
    proxy_address: str = ""  # host:port of the egress proxy on the sandbox-facing address
    model_calls: ModelCalls = field(default_factory=ModelCalls)  # running turns' model calls, as the gateway saw them
    harness: Harness = field(default_factory=default_harness)  # the coding agent runs drive
