"""Local labs register the credentials they hand out for their endpoint (issue 10 item 2): an agent
already running here reaches a lab started after it; no other endpoint ever gets them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sendense import config


def test_a_lab_registers_its_credentials_for_its_endpoint_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path))
    env = {"AWS_ACCESS_KEY_ID": "LABKEY", "AWS_SECRET_ACCESS_KEY": "labsecret"}
    assert config.lab_env("http://127.0.0.1:4566") is None
    config.register_lab("http://127.0.0.1:4566", env)
    assert config.lab_env("http://127.0.0.1:4566") == env
    assert config.lab_env("http://127.0.0.1:4566/") == env
    assert config.lab_env("http://127.0.0.1:4567") is None  # another endpoint: the agent's own chain
    assert config.lab_env("https://ec2.us-east-1.amazonaws.com") is None
    assert config.lab_env(None) is None
    f = tmp_path / "labs" / "endpoints.json"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600  # credentials: the owner's only
    config.unregister_lab("http://127.0.0.1:4566")
    assert config.lab_env("http://127.0.0.1:4566") is None
    config.unregister_lab("http://127.0.0.1:4566")  # gone already: no error


def test_lab_credentials_never_go_through_a_planted_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: the temporary file was a fixed `endpoints.tmp`, opened without O_EXCL: a symlink
    planted there made the lab's credentials land in (or overwrite) the file it points at."""
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path))
    labs = tmp_path / "labs"
    labs.mkdir(mode=0o777)
    victim = tmp_path / "victim"
    victim.write_text("victim's data\n")
    for planted in ("endpoints.tmp", "endpoints.json.tmp"):
        (labs / planted).symlink_to(victim)
    config.register_lab("http://127.0.0.1:4566", {"AWS_SECRET_ACCESS_KEY": "labsecret"})
    assert victim.read_text() == "victim's data\n"
    assert stat.S_IMODE(labs.stat().st_mode) == 0o700
    assert config.lab_env("http://127.0.0.1:4566") == {"AWS_SECRET_ACCESS_KEY": "labsecret"}
