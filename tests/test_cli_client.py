"""The CLI's HTTP client finds the server the configuration describes and fails in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from critique_local.cli import main
from tests.helpers import free_port


def test_the_cli_follows_the_configured_port_and_says_when_nothing_answers() -> None:
    port = free_port()  # nothing listens there
    result = CliRunner().invoke(main, ["runs", "list", "--key", "crt_x"],
                                env={"CRITIQUE_LOCAL_SERVER_PORT": str(port), "CRITIQUE_LOCAL_URL": None,
                                     "CRITIQUE_LOCAL_CONFIG": None})
    assert result.exit_code == 1
    assert f"cannot reach http://127.0.0.1:{port}/api/v1/coding-agent/runs" in result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1


def test_an_explicit_url_wins() -> None:
    port = free_port()
    result = CliRunner().invoke(main, ["runs", "get", "run_x", "--key", "crt_x", "--url", f"http://127.0.0.1:{port}"],
                                env={"CRITIQUE_LOCAL_SERVER_PORT": "1"})
    assert result.exit_code == 1 and f"127.0.0.1:{port}" in result.output


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "CRITIQUE_LOCAL_CONFIG"}
        env.update({"CRITIQUE_LOCAL_SERVER_DATA_DIR": str(tmp_path / "data"), "CRITIQUE_LOCAL_SERVER_PORT": str(port),
                    "CRITIQUE_LOCAL_SERVER_HOST_STATE_DIR": str(tmp_path / "host"),
                    "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})  # this checkout's code
        result = subprocess.run([sys.executable, "-m", "critique_local", "serve"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"Error: 127.0.0.1:{port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr
