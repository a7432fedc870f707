"""The one route list: the router, the auth check (per-route scope) and the OpenAPI document
all read these. The sandbox-facing listener serves only the gateway's routes."""

from __future__ import annotations

from critique_local.api import mcp, meta, runs
from critique_local.api.registry import Route
from critique_local.gateway import routes as gateway
from critique_local.ops import web as ops
from critique_local.ui import web as ui

PUBLIC_ROUTES: tuple[Route, ...] = (*runs.ROUTES, *meta.ROUTES, *gateway.ROUTES, *ops.ROUTES, *mcp.ROUTES,
                                     *ui.ROUTES)
SANDBOX_ROUTES: tuple[Route, ...] = tuple(gateway.ROUTES)
