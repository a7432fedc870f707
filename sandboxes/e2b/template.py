"""The E2B template for critique-local: the same tools as the Docker image (git, bash,
python3 + pytest, ripgrep) and the pinned OpenCode binary from npm, an unprivileged ``agent``
user owning ``/workspace``, and the same OpenCode environment switches.

OpenCode is installed and run once at build time (its first start unpacks itself, so sandboxes
created from the snapshot start it faster), but ``opencode serve`` is started by the server
right after a sandbox is created: its per-run settings (gateway token, password, model) must
never be baked into a template snapshot. The warm pool (``[pool]``) hides that start.

Build (needs E2B_API_KEY and internet access):

    python sandboxes/e2b/build_template.py
"""

from __future__ import annotations

from pathlib import Path

from e2b import Template

VERSION = (Path(__file__).resolve().parent.parent / "docker" / "OPENCODE_VERSION").read_text().strip()
ALIAS = "critique-local-opencode"

ENV = {
    "OPENCODE_DISABLE_PROJECT_CONFIG": "1",
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_CLIENT": "sdk",
    "PYTHONDONTWRITEBYTECODE": "1",
    "LANG": "C.UTF-8",
}


def template():  # type: ignore[no-untyped-def]
    return (
        Template()
        .from_debian_image("bookworm")
        .set_user("root")
        .apt_install(["git", "ca-certificates", "curl", "python3", "python3-pytest", "ripgrep", "procps"])
        .run_cmd([
            f"curl -fsSL https://registry.npmjs.org/opencode-linux-x64/-/opencode-linux-x64-{VERSION}.tgz"
            " | tar -xz -C /tmp && install -m 0755 /tmp/package/bin/opencode /usr/local/bin/opencode"
            " && rm -rf /tmp/package",
            "useradd -m -s /bin/bash agent",
            "mkdir -p /workspace && chown agent:agent /workspace",
            "git config --system init.defaultBranch main && git config --system safe.directory '*'",
            "printf '__pycache__/\\n*.py[co]\\n.pytest_cache/\\n' > /etc/gitignore"
            " && git config --system core.excludesFile /etc/gitignore",
        ])
        .set_envs(ENV)
        .set_user("agent")
        .set_workdir("/workspace")
        .run_cmd("opencode --version")
    )
