"""``critique-local doctor``: what the server needs, checked from outside it. Each check gives
a :class:`Finding`: ``ok``, ``warn`` (works, but worth fixing) or ``fail`` (the server cannot
start, or runs unsafely), with the fix. Checks block (Docker SDK, subprocesses): call
:func:`run_checks` from a plain thread or the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from critique_local import datalock
from critique_local.config import Settings
from critique_local.hoststate import HostState, default_root
from critique_local.sandboxes import firewall
from critique_local.store import readonly
from critique_local.store.migrations import MIGRATIONS

PIN = Path(__file__).resolve().parents[2] / "sandboxes" / "docker" / "OPENCODE_VERSION"
MIN_FREE_BYTES = 1 << 30  # below: fail
LOW_FREE_BYTES = 5 << 30  # below: warn
MAX_SKEW_S = 5.0


@dataclass(frozen=True)
class Finding:
    check: str
    level: str  # ok | warn | fail
    detail: str
    fix: str = ""


def _ok(check: str, detail: str) -> Finding:
    return Finding(check, "ok", detail)


def _instance(settings: Settings) -> tuple[str | None, bool]:
    """This data dir's instance id (None before the first start) and whether a server runs it
    (its claim on the host, or the data dir's own lock: see datalock.py)."""
    path = settings.server.data_dir / "instance_id"
    if not path.exists():
        return None, False
    instance = path.read_text().strip()
    return instance, HostState(default_root(settings.server.host_state_dir)).alive(instance) or \
        datalock.served(settings.server.data_dir)


def check_instance(settings: Settings) -> list[Finding]:
    instance, running = _instance(settings)
    if instance is None:
        return [_ok("server", "not started yet on this data dir")]
    claimed = HostState(default_root(settings.server.host_state_dir)).alive(instance)
    if running and not claimed:
        return [Finding("server", "warn", f"a server runs on {settings.server.data_dir} but holds no claim in "
                        f"{settings.server.host_state_dir}: this configuration is not the server's",
                        "run critique-local commands with the server's --config (server.host_state_dir)")]
    return [_ok("server", f"instance {instance} {'running' if running else 'not running'}")]


def check_config(settings: Settings) -> list[Finding]:
    out = [_ok("configuration", "loaded and valid")]
    host = settings.server.host
    if host not in ("127.0.0.1", "::1", "localhost") and not settings.server.public_url:
        out.append(Finding("configuration", "warn", f"server.host is {host} but server.public_url is empty: "
                           "statusUrl/streamUrl name this machine's address, not the one clients use",
                           "set server.public_url to the URL clients use (e.g. https://agents.example.com)"))
    if settings.sandbox.backend == "e2b" and not settings.e2b.gateway_url:
        out.append(Finding("configuration", "fail", "sandbox.backend is e2b but e2b.gateway_url is empty",
                           "set e2b.gateway_url to this server's /api/v1 as E2B sandboxes reach it (https)"))
    if settings.metrics.enabled and settings.metrics.host not in ("127.0.0.1", "::1", "localhost"):
        out.append(Finding("configuration", "warn", f"/metrics is served without authentication on "
                           f"{settings.metrics.host}:{settings.metrics.port}",
                           "bind metrics.host to loopback or a network only the scraper reaches"))
    return out


def check_engine(settings: Settings) -> list[Finding]:
    if settings.sandbox.backend != "docker":
        return [_ok("sandbox engine", f"backend {settings.sandbox.backend}: no local engine")]
    import docker
    import docker.errors

    try:
        client = docker.from_env(timeout=30)
        version = client.version()
    except docker.errors.DockerException as exc:
        return [Finding("sandbox engine", "fail", f"the Docker engine is not reachable: {exc}",
                        "start dockerd (systemctl start docker), run as a user in the docker group, or set DOCKER_HOST")]
    out = [_ok("sandbox engine", f"Docker {version.get('Version')} (API {version.get('ApiVersion')})")]
    try:
        engine_time = datetime.fromisoformat(str(client.info().get("SystemTime", "")).replace("Z", "+00:00")[:26])
        skew = abs((datetime.now(UTC) - engine_time.astimezone(UTC)).total_seconds())
        out.append(_ok("clock", f"within {skew:.1f} s of the engine's") if skew <= MAX_SKEW_S else
                   Finding("clock", "fail", f"this machine's clock and the Docker engine's differ by {skew:.0f} s",
                           "synchronise both clocks (systemd-timesyncd, chrony)"))
    except (ValueError, docker.errors.DockerException):
        pass
    image = settings.sandbox.image
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        out.append(Finding("sandbox image", "fail", f"{image} is missing", "run `make image` (sandboxes/docker/build.sh)"))
        return out
    res = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "opencode", image, "--version"],
                         capture_output=True, text=True, timeout=120)
    found = res.stdout.strip() if res.returncode == 0 else ""
    pinned = PIN.read_text().strip() if PIN.exists() else ""
    if not found:
        out.append(Finding("sandbox image", "fail", f"{image} has no working opencode: {res.stderr.strip()[:200]}",
                           "rebuild it: `make image`"))
    elif pinned and found != pinned:
        out.append(Finding("sandbox image", "warn", f"{image} has OpenCode {found}, this release pins {pinned}",
                           "rebuild it: `make image`"))
    else:
        out.append(_ok("sandbox image", f"{image} with OpenCode {found}"))
    return out


def check_firewall(settings: Settings) -> list[Finding]:
    if settings.sandbox.backend != "docker" or not settings.docker.host_firewall:
        return [_ok("firewall", "docker.host_firewall is off: not needed")]
    try:
        firewall.check_available()
    except firewall.FirewallError as exc:
        return [Finding("firewall", "fail", f"{exc}: sandboxes could reach every host service listening on all "
                        "addresses", "install iptables and run the server as root, or accept the risk with "
                        "docker.host_firewall = false")]
    instance, running = _instance(settings)
    if not running or instance is None:
        return [_ok("firewall", "iptables usable (rules are installed when the server starts)")]
    if instance in firewall.instance_chains():
        return [_ok("firewall", f"iptables usable; chain {firewall.chain_of(instance)} of the running server present")]
    return [Finding("firewall", "fail", f"the server runs but its chain {firewall.chain_of(instance)} is missing "
                    "(removed by hand, or iptables flushed)", "restart the server: it installs its rules at start")]


def check_disk(settings: Settings) -> list[Finding]:
    where = settings.server.data_dir
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    gib = free / (1 << 30)
    out = []
    if free < MIN_FREE_BYTES:
        out.append(Finding("disk", "fail", f"{gib:.1f} GiB free under {where}", "free space or move server.data_dir"))
    elif free < LOW_FREE_BYTES:
        out.append(Finding("disk", "warn", f"only {gib:.1f} GiB free under {where}", "free space or move server.data_dir"))
    else:
        out.append(_ok("disk", f"{gib:.1f} GiB free under {where}"))
    if not os.access(where, os.W_OK):
        out.append(Finding("disk", "fail", f"{where} is not writable by this user", "chown it to the server's user"))
    return out


def check_secret_key(settings: Settings) -> list[Finding]:
    key = settings.server.data_dir / "secret.key"
    if not key.exists():
        return [_ok("secret.key", "not created yet (the server creates it, mode 0600)")]
    st = key.stat()
    if st.st_mode & 0o077:
        return [Finding("secret.key", "fail", f"{key} is readable by others (mode {st.st_mode & 0o777:o})",
                        f"chmod 600 {key}")]
    if st.st_size != 32:
        return [Finding("secret.key", "fail", f"{key} is {st.st_size} bytes, not 32: sealed secrets will not open",
                        "restore the key from the backup it came with")]
    return [_ok("secret.key", "mode 0600, 32 bytes")]


def check_database(settings: Settings) -> list[Finding]:
    path = settings.db_path
    if not path.exists():
        return [_ok("database", "not created yet")]
    try:
        version, newest = readonly.schema_and_newest_run(path)
    except readonly.DatabaseError as exc:
        return [Finding("database", "fail", f"{path}: {exc}", "restore the last backup (critique-local restore)")]
    out = []
    if version > len(MIGRATIONS):
        out.append(Finding("database", "fail", f"schema {version} is newer than this release's {len(MIGRATIONS)}",
                           "run the newer critique-local, or restore a backup made by this one"))
    elif version < len(MIGRATIONS):
        out.append(Finding("database", "warn", f"schema {version}; {len(MIGRATIONS) - version} migration(s) run at "
                           "the next start", "back up first: critique-local backup PATH (see migrate --check)"))
    else:
        out.append(_ok("database", f"schema {version} (current)"))
    if newest and newest > datetime.now(UTC).isoformat():
        out.append(Finding("clock", "fail", f"the newest stored run was created at {newest}, after this machine's "
                           "time: the clock went back", "synchronise the clock (systemd-timesyncd, chrony)"))
    return out


CHECKS: list[Callable[[Settings], list[Finding]]] = [
    check_config, check_instance, check_engine, check_firewall, check_disk, check_secret_key, check_database]


def run_checks(settings: Settings) -> list[Finding]:
    out: list[Finding] = []
    for check in CHECKS:
        try:
            out.extend(check(settings))
        except Exception as exc:  # one broken check must not hide the others
            out.append(Finding(check.__name__.removeprefix("check_"), "fail", f"{exc.__class__.__name__}: {exc}"))
    return out
