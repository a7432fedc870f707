from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from critique_local.config import PATH_SETTINGS, SCALAR_SECTIONS, ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_documented_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, environ={})
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8787)
    assert s.server.data_dir == tmp_path / ".critique-local" and s.git.local_root == tmp_path / "repos"
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


def test_paths_resolve_once_against_the_config_files_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    etc.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = etc / "c.toml"
    cfg.write_text('[git]\nlocal_root = "../srv//git/./repos"\n[github]\napp_id = "1"\napp_private_key_path = "~/app.pem"\n')
    s = load_settings(Path("../etc/c.toml"), environ={})
    assert s.server.data_dir == etc / ".critique-local"  # a default counts as written in the file
    assert s.git.local_root == tmp_path / "srv" / "git" / "repos"
    assert s.github.app_private_key_path == str(tmp_path / "home" / "app.pem")
    # relative values from the environment are taken from where the command runs
    s = load_settings(cfg, environ={"CRITIQUE_LOCAL_SERVER_DATA_DIR": "state", "CRITIQUE_LOCAL_GIT_LOCAL_ROOT": "/srv/x"})
    assert s.server.data_dir == elsewhere / "state" and s.git.local_root == Path("/srv/x")
    assert load_settings(cfg, environ={}).github.app_private_key_path != ""
    assert load_settings(None, environ={}).github.app_private_key_path == ""  # unset stays unset


def test_settings_built_in_code_are_absolute_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.server.data_dir == tmp_path / ".critique-local" and s.git.local_root == tmp_path / "repos"
    s.server.data_dir = Path("moved")
    assert s.server.data_dir == tmp_path / "moved"
    assert Settings().server.data_dir == tmp_path / ".critique-local"  # sections are not shared defaults


def test_every_path_like_setting_is_resolved() -> None:
    """A new setting naming a file or directory must be listed in PATH_SETTINGS."""
    path_like = set()
    for section in SCALAR_SECTIONS:
        model = Settings.model_fields[section].annotation
        for key, field in model.model_fields.items():  # type: ignore[union-attr]
            if field.annotation is Path or key.endswith(("_path", "_dir", "_root", "_file")):
                path_like.add((section, key))
    assert path_like == set(PATH_SETTINGS)


def test_config_get_prints_what_the_server_loads(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRITIQUE_LOCAL_")}
    cli = [sys.executable, "-m", "critique_local", "config", "get"]
    got = subprocess.run([*cli, "git.local_root"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == str(tmp_path / "repos")
    (tmp_path / "critique-local.toml").write_text('[git]\nlocal_root = "bare"\n')
    got = subprocess.run([*cli, "git.local_root"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == str(tmp_path / "bare")
    bad = subprocess.run([*cli, "server.nope"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown setting" in bad.stderr
