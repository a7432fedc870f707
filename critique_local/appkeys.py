"""Typed application state keys (one module, so every owner of app state is listed here)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from critique_local.api.ratelimit import RateLimiter
from critique_local.api.registry import Route
from critique_local.config import Settings
from critique_local.egress import EgressProxy
from critique_local.envs.builder import Environments
from critique_local.gateway.upstream import Upstream
from critique_local.hoststate import InstanceClaim
from critique_local.listeners import ConnectionBudget, ConnectionGuard
from critique_local.ops.readiness import Readiness
from critique_local.runs.control import RunControl
from critique_local.runs.pool import WarmPool
from critique_local.runs.scheduler import Scheduler
from critique_local.services import Services
from critique_local.store.db import Database
from critique_local.webhooks import Webhooks

SERVICES = web.AppKey("services", Services)
DB = web.AppKey("db", Database)
SCHEDULER = web.AppKey("scheduler", Scheduler)
UPSTREAM = web.AppKey("upstream", Upstream)
CONTROL = web.AppKey("control", RunControl)
WEBHOOKS = web.AppKey("webhooks", Webhooks)
LIMITER = web.AppKey("limiter", RateLimiter)  # absent: this listener has no rate limit
POOL = web.AppKey("pool", WarmPool)
ENVIRONMENTS = web.AppKey("environments", Environments)  # kept environments (envs/): builds, reuse, eviction
SERVED_ROUTES = web.AppKey("routes", tuple[Route, ...])  # what this application serves (router, auth, OpenAPI)
SETTINGS = web.AppKey("settings", Settings)
CLAIM = web.AppKey("claim", InstanceClaim)  # this data dir's instance id, held by this process
GUARD = web.AppKey("guard", ConnectionGuard)  # the listener's connection budget and head deadline
SANDBOX_BUDGET = web.AppKey("sandbox_budget", ConnectionBudget)  # shared by the gateway listener and the proxy
PUBLIC_URL = web.AppKey("public_url", str)  # how clients reach us (serve() sets it once the port is bound)
GATEWAY_PORT = web.AppKey("gateway_port", int)  # the sandbox-facing listener's port, once bound
GATEWAY_RUNNER = web.AppKey("gateway_runner", web.AppRunner)  # the sandbox-facing listener, once bound
EGRESS = web.AppKey("egress", EgressProxy)  # the egress proxy (listening once the sandbox-facing address is known)
STOPPING = web.AppKey("stopping", asyncio.Event)  # set when the application shuts down: streams end
READINESS = web.AppKey("readiness", Readiness)  # /readyz checks, one shared round per second
