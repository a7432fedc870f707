"""deploy/: the systemd unit passes `systemd-analyze verify`, and the compose file validates
against the Compose Specification's JSON schema (tests/data/compose-spec.json, from
compose-spec/compose-spec at 170098ba07d9, Apache-2.0: tests/data/compose-spec.LICENSE; the
schema `docker compose config` validates with) and has what the server needs (the Docker
engine's socket, a data volume, an environment file, host networking, a healthcheck on
/readyz, a stop grace period beyond the drain timeout). `docker compose config` runs too when
the compose plugin is installed (Debian 12 has none). Neither check is ever skipped: without
systemd-analyze the test fails and says how to get it (scripts/ensure-system.sh installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from critique_local.config import ServerSettings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed: run scripts/ensure-system.sh (apt-get install systemd)")
    unit = (DEPLOY / "critique-local.service").read_text()
    # verify checks that ExecStart's program exists: point it at this checkout's entry point
    exe = Path(sys.executable).parent / "critique-local"
    unit = unit.replace("/opt/critique-local/.venv/bin/critique-local", str(exe))
    (tmp_path / "critique-local.service").write_text(unit)
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "critique-local.service")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout + res.stderr == "", res.stdout + res.stderr
    stop_s = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))  # type: ignore[union-attr]
    assert stop_s > ServerSettings().drain_timeout_s
    assert re.search(r"^ExecStart=\S+ serve$", unit, re.M) and "EnvironmentFile=" in unit


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(doc)
    broken = {**doc, "services": {"server": {**doc["services"]["server"], "stop_grace_period": ["150s"]}}}
    with pytest.raises(jsonschema.ValidationError):  # the schema does check: a list is no duration
        jsonschema.Draft7Validator(schema).validate(broken)
    typo = {**doc, "services": {"server": {**doc["services"]["server"], "healtcheck": {}}}}
    with pytest.raises(jsonschema.ValidationError, match="healtcheck"):  # and unknown keys
        jsonschema.Draft7Validator(schema).validate(typo)


def test_compose_file_has_what_the_server_needs(tmp_path: Path) -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    (_name, server), = doc["services"].items()
    assert server["command"] == ["serve"] and server["network_mode"] == "host"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]}
    assert mounts["/var/run/docker.sock"] == "/var/run/docker.sock"
    assert mounts["/var/lib/critique-local"] in doc["volumes"]  # a named volume for the data dir
    assert mounts["/run/critique-local"] == "/run/critique-local"  # instance claims shared with the host
    assert server["env_file"] == ["critique-local.env"] and (DEPLOY / "critique-local.env.example").exists()
    assert "/readyz" in " ".join(server["healthcheck"]["test"])
    grace = int(server["stop_grace_period"].removesuffix("s"))
    assert server["stop_signal"] == "SIGTERM" and grace > ServerSettings().drain_timeout_s
    assert server["environment"]["CRITIQUE_LOCAL_CONFIG"].startswith("/etc/critique-local/")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        copy = tmp_path / "deploy"
        shutil.copytree(DEPLOY, copy)
        shutil.copy(copy / "critique-local.env.example", copy / "critique-local.env")
        res = subprocess.run(["docker", "compose", "-f", str(copy / "compose.yaml"), "config", "-q"],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
