from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from critique_local.config import SCALAR_SECTIONS, ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_documented_pins() -> None:
    s = load_settings(None, environ={})
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8787)
    assert s.server.data_dir == Path("./.critique-local")
    assert s.sandbox.backend == "docker"
    assert s.models.default == "critique/scripted"


def test_env_overrides_each_section_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = 9000\n[git]\nlocal_root = "/srv/a"\n')
    s = load_settings(cfg, environ={"CRITIQUE_LOCAL_GIT_LOCAL_ROOT": "/srv/b", "CRITIQUE_LOCAL_SERVER_PORT": "9100",
                                    "CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS": "7"})
    assert s.git.local_root == Path("/srv/b") and s.server.port == 9100 and s.scheduler.max_concurrent_runs == 7


@pytest.mark.parametrize("text", ["[server]\nnope = 1\n", "[nosuchsection]\n", "[server]\nport = 'x'\n",
                                  "[server\n", "[sandbox]\nbackend = 'lxc'\n"])
def test_bad_config_fails_at_startup(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError):
        load_settings(cfg, environ={})


def test_bad_env_override_fails() -> None:
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_settings(None, environ={"CRITIQUE_LOCAL_SERVER_PORT": "many"})


def test_example_config_documents_every_key_and_loads() -> None:
    example = ROOT / "config.example.toml"
    load_settings(example, environ={})
    text = example.read_text()
    for section in SCALAR_SECTIONS:
        model = Settings.model_fields[section].annotation
        assert f"[{section}]" in text, section
        for key in model.model_fields:  # type: ignore[union-attr]
            assert re.search(rf"^#? ?{key} = ", text, re.M), f"{section}.{key} is not in config.example.toml"
    parsed = tomllib.loads(text)
    assert "providers" in parsed and "catalog" in parsed
