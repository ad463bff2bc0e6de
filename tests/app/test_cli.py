"""The CLI binary without a server: bad arguments are refused in one line, before anything runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SENDENSE = str(Path(sys.executable).with_name("sendense"))


def refused(tmp_path: Path, *args: str) -> tuple[int, str]:
    env = dict(os.environ, SENDENSE_HOME=str(tmp_path), SENDENSE_TEMPORAL="127.0.0.1:1")
    p = subprocess.run([SENDENSE, *args], capture_output=True, text=True, env=env, timeout=60)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return p.returncode, lines[0].removeprefix("error: ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("lab", "write", "vol-1", "0", "--pattern", "7", "--length", str(2 << 30)),
            "--pattern needs a byte",
        ),
        (("lab", "write", "vol-1", "0", "--pattern", "300", "--length", "1"), "--pattern needs a byte value"),
        (("lab", "instance", "web", "--disk-gib", "0"), "--disk-gib: sizes are 1 to 16384 GiB, not [0]"),
        (("lab", "instance", "web", "--disk-gib", "99999"), "--disk-gib: sizes are 1 to 16384 GiB"),
        (("up", "--port", "0"), "Invalid value for '--port'"),
        (("job", "settings", "web1"), "give at least one of --interval, --retention, --bandwidth"),
        (("job", "settings", "web1", "--interval", "0s"), "settings.interval: interval must be at least 1s"),
        (
            ("point", "export", "web1", "--format", "[/x]", "--output", "/tmp"),
            "--format: '[/x]' is not one of",
        ),
        (("job", "[/x]"), "No such command '[/x]'. (see `sendense job --help`)"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    """Before: `lab write --length 2G` built 2 GiB in memory, `--disk-gib 0` reached the lab, `up --port 0`
    reached the server start; `[/x]` in an argument went through rich markup."""
    code, msg = refused(tmp_path, *args)
    assert msg.startswith(expected), msg


def test_lab_write_refuses_a_file_over_the_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate((1 << 30) + 1)
    _, msg = refused(tmp_path, "lab", "write", "vol-1", "0", "--file", str(big))
    assert msg == f"--file {big}: larger than 1073741824 bytes; write it in parts"


def test_no_server_is_one_line(tmp_path: Path) -> None:
    _, msg = refused(tmp_path, "job", "status", "web1")
    assert "not reachable" in msg
