"""The one route list: the router, the auth check (per-route scope) and the OpenAPI document
all read these. The sandbox-facing listener serves only the gateway's routes."""

from __future__ import annotations

from critique_local.api import meta, runs
from critique_local.api.registry import Route
from critique_local.gateway import routes as gateway

PUBLIC_ROUTES: tuple[Route, ...] = (*runs.ROUTES, *meta.ROUTES, *gateway.ROUTES)
SANDBOX_ROUTES: tuple[Route, ...] = tuple(gateway.ROUTES)
