from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, make_repo

SAMPLE_FILES = {
    "README.md": "# web\n",
    "app.py": "def add(a, b):\n    return a + b\n",
    "test_app.py": "from app import add\n\n\ndef test_add():\n    assert add(1, 2) == 3\n",
}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server for the session (Docker backend, scripted model)."""
    base = tmp_path_factory.mktemp("server")
    srv = Server(base)
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
    srv = Server(tmp_path)
    srv.repos.mkdir(parents=True)
    make_repo(srv.repos, "acme/web", SAMPLE_FILES)
    yield srv
    srv.stop()
