"""The CLI's HTTP client finds the server the configuration describes and fails in one line."""

from __future__ import annotations

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
