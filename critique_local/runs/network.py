"""``safety.network``: what a run's sandbox may reach.

``none``        only the model gateway (no route out, no DNS).
``restricted``  the gateway, and hosts on the run's allowlist through the server's egress proxy
                (``HTTP_PROXY``/``HTTPS_PROXY`` point at it; there is still no route out, so
                nothing that ignores the proxy gets anywhere).
``open``        a route out; only when the operator enables ``network.allow_open``.
"""

from __future__ import annotations

import re

from critique_local.config import Settings
from critique_local.errors import InvalidRequest, NetworkModeNotAllowed, NetworkModeNotSupported
from critique_local.runs.spec import NetworkSpec

_HOST = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check(settings: Settings, network: NetworkSpec | None, supported: frozenset[str]) -> None:
    """Refuse a policy this server would not (operator settings) or could not (its sandbox
    backend) enforce, rather than run with weaker isolation than asked."""
    mode = network.mode if network is not None else settings.network.default_mode
    if mode not in supported:
        raise NetworkModeNotSupported(f"safety.network.mode {mode} is not available on the "
                                      f"{settings.sandbox.backend} sandbox backend", field="safety.network.mode")
    if network is None:
        return
    if network.mode == "open" and not settings.network.allow_open:
        raise NetworkModeNotAllowed("safety.network.mode open is not enabled on this server (network.allow_open)",
                                    field="safety.network.mode")
    if network.allowlist and network.mode != "restricted":
        raise InvalidRequest("safety.network.allowlist needs mode restricted", field="safety.network.allowlist")
    for entry in network.allowlist:
        if not allowlist_entry_ok(entry):
            raise InvalidRequest(f"allowlist entry {entry[:80]!r} is not a host name, *.domain or host:port",
                                 field="safety.network.allowlist")


def allowlist_entry_ok(entry: str) -> bool:
    """A host name, ``*.domain`` or ``host:port``."""
    name, colon, port = entry.lower().rpartition(":")
    if colon and not (port.isdigit() and 0 < int(port) < 65536):
        return False
    name = name if colon else entry.lower()
    return len(name) <= 253 and bool(_HOST.fullmatch(name))


def network_policy(settings: Settings, network: NetworkSpec | None) -> tuple[str, list[str]]:
    """(mode, allowlist) of a run's ``safety.network``, with the server's defaults filled in."""
    mode = str((network.mode if network is not None else None) or settings.network.default_mode)
    allowlist = list(network.allowlist) if network is not None else []
    if mode == "restricted" and not allowlist:
        allowlist = list(settings.network.default_allowlist)
    return mode, allowlist


def proxy_env(proxy_address: str, token: str, gateway_host: str) -> dict[str, str]:
    """Environment that sends a restricted sandbox's HTTP(S) traffic to the egress proxy,
    identified by the run's token; the gateway stays direct."""
    url = f"http://run:{token}@{proxy_address}"
    no_proxy = f"{gateway_host},localhost,127.0.0.1"
    return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
            "NO_PROXY": no_proxy, "no_proxy": no_proxy}
