"""`critique-local doctor` prints each problem with its fix and exits 1 when one fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def doctor(data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "CRITIQUE_LOCAL_SERVER_DATA_DIR": str(data_dir), **env}
    full.pop("CRITIQUE_LOCAL_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "critique_local", "doctor", "--json"], cwd=data_dir.parent,
                          env=full, capture_output=True, text=True, timeout=300)


def findings(res: subprocess.CompletedProcess[str]) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for line in res.stdout.splitlines():
        f = json.loads(line)
        out.setdefault(f["check"], []).append(f)
    return out


def test_doctor_names_each_problem_with_its_fix_and_exits_1(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    key = data / "secret.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    res = doctor(data, CRITIQUE_LOCAL_SANDBOX_BACKEND="e2b", CRITIQUE_LOCAL_SERVER_HOST="0.0.0.0")
    assert res.returncode == 1, res.stderr
    found = findings(res)
    (secret,) = found["secret.key"]
    assert secret["level"] == "fail" and secret["fix"] == f"chmod 600 {key}"
    config = {f["level"]: f for f in found["configuration"]}
    assert "e2b.gateway_url" in config["fail"]["detail"] and "server.public_url" in config["warn"]["fix"]
    assert found["disk"][0]["level"] in ("ok", "warn") and found["database"][0]["level"] == "ok"

    key.chmod(0o600)
    ok = doctor(data, CRITIQUE_LOCAL_SANDBOX_BACKEND="e2b", CRITIQUE_LOCAL_E2B_GATEWAY_URL="https://x.example/api/v1")
    assert ok.returncode == 0, ok.stdout
    fixed = findings(ok)
    assert fixed["secret.key"][0]["level"] == "ok"
    assert all(f["level"] == "ok" for f in fixed["configuration"])
    warned = doctor(data, CRITIQUE_LOCAL_SANDBOX_BACKEND="e2b", CRITIQUE_LOCAL_E2B_GATEWAY_URL="https://x.example/api/v1",
                    CRITIQUE_LOCAL_SERVER_HOST="0.0.0.0")
    assert warned.returncode == 0 and {f["level"] for f in findings(warned)["configuration"]} == {"ok", "warn"}
    text = subprocess.run([sys.executable, "-m", "critique_local", "doctor"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "CRITIQUE_LOCAL_SERVER_DATA_DIR": str(data), "CRITIQUE_LOCAL_SANDBOX_BACKEND": "e2b"})
    assert "FAIL  configuration: sandbox.backend is e2b but e2b.gateway_url is empty" in text.stdout
    assert "      fix: set e2b.gateway_url" in text.stdout
