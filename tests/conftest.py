from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, make_repo
from tests.made_server import MadeServer, make_serve
from tests.upstream_standin import UpstreamStandIn

SAMPLE_FILES = {
    "README.md": "# web\n",
    "app.py": "def add(a, b):\n    return a + b\n",
    "test_app.py": "from app import add\n\n\ndef test_add():\n    assert add(1, 2) == 3\n",
}


UPSTREAM_KEY = "sk-upstream-operator-key-0123456789"
# warm sessions end soon in tests, so idle sandboxes do not pile up on a 2-core machine; long enough
# that a follow-up sent right after a turn (a CLI start, a docker call) still finds a loaded machine's session
SHORT_SESSIONS = {"CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": "60", "CRITIQUE_LOCAL_SANDBOX_REAP_INTERVAL_S": "0.5"}


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamStandIn]:
    standin = UpstreamStandIn()
    standin.start()
    yield standin
    standin.stop()


def standin_config(upstream_port: int) -> str:
    """A config file's text: catalog models served by the loopback upstream stand-in."""
    return (
        f'[providers.standin]\nbase_url = "http://127.0.0.1:{upstream_port}/v1"\napi_key = "{UPSTREAM_KEY}"\n'
        '[[catalog]]\nid = "acme/coder-large"\nprovider = "standin"\nupstream_id = "coder-large-v2"\n'
        # OpenCode gives gpt-* models apply_patch instead of edit/write
        '[[catalog]]\nid = "acme/gpt-5-coder"\nprovider = "standin"\nupstream_id = "gpt-5-coder"\n'
        + "".join(f'[[catalog]]\nid = "acme/{m}"\nprovider = "standin"\nupstream_id = "{m}"\n'
                  for m in ("status-400", "status-401", "status-429", "status-500"))
        + f'[providers.slowpoke]\nbase_url = "http://127.0.0.1:{upstream_port}/v1"\ntimeout_s = 1\n'
        '[[catalog]]\nid = "acme/slow"\nprovider = "slowpoke"\nupstream_id = "slow"\n'
    )


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamStandIn) -> Iterator[Server]:
    """One real server for the session (Docker backend, scripted model, one loopback upstream)."""
    base = tmp_path_factory.mktemp("server")
    config = base / "config.toml"
    config.write_text(standin_config(upstream.port))
    srv = Server(base, extra_env={"CRITIQUE_LOCAL_CONFIG": str(config), **SHORT_SESSIONS})
    srv.repos.mkdir(parents=True)
    make_repo(srv.repos, "acme/web", SAMPLE_FILES, branches={"feature": {"FEATURE.md": "on feature\n"}})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def alice(server: Server) -> str:
    return server.new_key("alice")


@pytest.fixture(scope="session")
def bob(server: Server) -> str:
    return server.new_key("bob")


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Server]:
    """A server of its own, for tests that kill or restart it."""
    srv = Server(tmp_path, extra_env=dict(SHORT_SESSIONS))
    srv.repos.mkdir(parents=True)
    make_repo(srv.repos, "acme/web", SAMPLE_FILES)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def made_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MadeServer]:
    """``make serve`` in a clean copy of the tree, with every default (see tests/made_server.py)."""
    made = make_serve(tmp_path_factory.mktemp("make-serve"))
    yield made
    made.stop()
