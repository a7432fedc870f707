"""The E2B template definition renders offline with the pinned OpenCode and the same tools and
user as the Docker image (building it needs E2B's cloud)."""

from __future__ import annotations

import sys
from pathlib import Path

from e2b import Template

ROOT = Path(__file__).resolve().parent.parent


def test_template_pins_opencode_and_matches_the_docker_image() -> None:
    sys.path.insert(0, str(ROOT / "sandboxes" / "e2b"))
    try:
        import template as definition  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    dockerfile = Template.to_dockerfile(definition.template())
    version = (ROOT / "sandboxes" / "docker" / "OPENCODE_VERSION").read_text().strip()
    assert f"opencode-linux-x64-{version}.tgz" in dockerfile
    for tool in ("git", "python3-pytest", "ripgrep"):
        assert tool in dockerfile
    assert "useradd -m -s /bin/bash agent" in dockerfile and "USER agent" in dockerfile
    assert "WORKDIR /workspace" in dockerfile and "OPENCODE_DISABLE_PROJECT_CONFIG=1" in dockerfile
    assert definition.ALIAS == "critique-local-opencode"
