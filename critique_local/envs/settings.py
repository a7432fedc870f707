"""The ``[environments]`` settings section (issue 16; see ``envs/``): defaults for setup's
network, time and size limits, and per-repository overrides."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from critique_local.settings_base import Section

DEFAULT_KEY_FILES = [
    "requirements.txt", "requirements-dev.txt", "requirements-test.txt", "pyproject.toml", "setup.py", "setup.cfg",
    "poetry.lock", "uv.lock", "Pipfile.lock", "package.json", "package-lock.json", "yarn.lock", "pnpm-lock.yaml",
    "bun.lockb", "go.mod", "go.sum", "Cargo.lock", "Gemfile.lock", "composer.lock", "mix.lock", "pubspec.lock"]
DEFAULT_REGISTRIES = [
    "pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "registry.yarnpkg.com", "proxy.golang.org",
    "sum.golang.org", "index.crates.io", "static.crates.io", "crates.io", "rubygems.org", "index.rubygems.org",
    "repo.maven.apache.org", "repo1.maven.org", "repo.packagist.org"]


class RepositoryEnvironment(Section):
    setup: str | None = Field(None, description="Setup script (bash) used instead of the repository's .critique/setup.sh.")
    start: str | None = Field(None, description="Start script (bash) used instead of the repository's .critique/start.sh.")
    key_files: list[str] | None = Field(None, description="Files whose contents key the environment (default: "
                                        ".critique/key-files, else environments.key_files).")
    network_mode: Literal["none", "restricted", "open"] | None = Field(None, description="Network of setup.")
    allowlist: list[str] | None = Field(None, description="Hosts (host or host:port) setup may reach when restricted.")
    setup_timeout_s: float | None = Field(None, gt=0, description="Upper bound for this repository's setup.sh.")


class EnvironmentSettings(Section):
    enabled: bool = Field(True, description="Run .critique/setup.sh once per environment and start later runs from it.")
    setup_timeout_s: float = Field(1800, gt=0, description="Upper bound for one setup.sh.")
    start_timeout_s: float = Field(120, gt=0, description="Upper bound for start.sh, at every sandbox start.")
    output_tail_chars: int = Field(4000, ge=100, le=100_000, description="Setup output kept in a setup_failed message.")
    network_mode: Literal["none", "restricted", "open"] = Field(
        "restricted", description="Network of setup: restricted (through the egress proxy, allowlist only), none, "
        "or open (only with network.allow_open).")
    allowlist: list[str] = Field(default_factory=lambda: list(DEFAULT_REGISTRIES),
                                 description="Hosts (host, *.domain or host:port) setup may reach in restricted mode.")
    key_files: list[str] = Field(default_factory=lambda: list(DEFAULT_KEY_FILES),
                                 description="Files keying an environment when the repository declares none.")
    max_size_mb: int = Field(4096, ge=1, description="Largest environment (what setup leaves in ~ and /workspace).")
    max_total_mb: int = Field(20480, ge=1, description="Environments kept in all; least recently used go first.")
    max_unused_s: float = Field(604800, gt=0, description="An environment unused this long is removed (default 7 days).")
    repositories: dict[str, RepositoryEnvironment] = Field(
        default_factory=dict, description="Per repository full name: setup, start, key_files, network_mode, allowlist.")
