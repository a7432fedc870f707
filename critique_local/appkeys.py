"""Typed application state keys (one module, so every owner of app state is listed here)."""

from __future__ import annotations

from aiohttp import web

from critique_local.api.ratelimit import RateLimiter
from critique_local.gateway.upstream import Upstream
from critique_local.runs.control import RunControl
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
