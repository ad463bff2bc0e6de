"""The embedded stack's trust boundaries (issue 11): every port on loopback only, each process's
environment built for it (the server gets none of the caller's secrets), the payload key made once
and private, and the codec server wired into the web UI."""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import stack
from tests.app.test_stack import SLEEPER, free_ports
from workers import codec

FAKE_SECRET = "fakeSECRETa1b2c3d4e5f6g7h8i9j0kLmNoPqRsT"
CALLER_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE1234",
    "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
    "UNRELATED_API_TOKEN": "tok-" + FAKE_SECRET[::-1],
}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, stack.StackInfo]]:
    """A stack started by a caller whose environment holds AWS credentials and an unrelated token."""
    st = tmp_path_factory.mktemp("trust") / "state"
    port, ui = free_ports()
    saved = {k: os.environ.get(k) for k in (*CALLER_ENV, "SENDENSE_CODEC_KEY")}
    os.environ.update(CALLER_ENV)
    os.environ.pop("SENDENSE_CODEC_KEY", None)
    try:
        info = stack.up(st, port=port, ui_port=ui, worker=True, worker_cmd=SLEEPER, worker_grace=0.3)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield st, info
    stack.down(st, timeout=5)


def environ(pid: int | None) -> dict[str, str]:
    assert pid is not None
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def listening(pid: int) -> list[tuple[str, int]]:
    """(local address, port) of every TCP socket `pid` listens on, from /proc/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = cols[1].split(":")
            assert len(addr) == width
            raw = bytes.fromhex(addr)
            ip = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out.append((ip.hex() if width == 32 else ".".join(str(b) for b in ip), int(port, 16)))
    return out


def test_every_port_is_bound_to_loopback(running: tuple[Path, stack.StackInfo]) -> None:
    _, info = running
    assert info.server_pid and info.codec_pid and info.codec_url
    server = listening(info.server_pid)
    codec_srv = listening(info.codec_pid)
    ports = {p for _, p in server + codec_srv}
    frontend, ui = int(info.address.rsplit(":", 1)[1]), int(info.ui_url.rsplit(":", 1)[1])
    assert {frontend, ui, int(info.codec_url.rsplit(":", 1)[1])} <= ports, (server, codec_srv)
    # the frontend, UI, HTTP API, metrics, internal services: none on a wildcard or a public address
    assert len(server) >= 3
    for addr, port in server + codec_srv:
        assert addr == "127.0.0.1", f"{addr}:{port} is not loopback ({server}, {codec_srv})"


def test_server_environment_holds_none_of_the_callers_secrets(
    running: tuple[Path, stack.StackInfo],
) -> None:
    _, info = running
    env = environ(info.server_pid)
    assert not [k for k in env if k.startswith(("AWS_", "SENDENSE_"))], sorted(env)
    assert "UNRELATED_API_TOKEN" not in env
    flat = "\n".join(f"{k}={v}" for k, v in env.items())
    assert FAKE_SECRET not in flat and FAKE_SECRET[::-1] not in flat
    assert env["PATH"] == os.environ["PATH"] and env["GOGC"]  # what it does need


def test_worker_gets_what_its_platforms_read_and_not_the_rest(
    running: tuple[Path, stack.StackInfo],
) -> None:
    st, info = running
    env = environ(info.worker_pid)
    # AWS jobs run on this worker: the standard credential chain must reach it
    assert env["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET and env["AWS_ACCESS_KEY_ID"]
    assert "UNRELATED_API_TOKEN" not in env
    assert env["SENDENSE_CODEC_KEY"] == str(st.resolve() / "codec.key")
    codec_env = environ(info.codec_pid)
    assert not [k for k in codec_env if k.startswith("AWS_")] and "UNRELATED_API_TOKEN" not in codec_env
    assert codec_env["SENDENSE_CODEC_KEY"] == env["SENDENSE_CODEC_KEY"]


def test_payload_key_made_once_private_and_never_logged(running: tuple[Path, stack.StackInfo]) -> None:
    st, info = running
    key_file = st / "codec.key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.stat().st_size == 32
    key = key_file.read_bytes()
    again = stack.up(st, port=int(info.address.rsplit(":", 1)[1]), worker=True, worker_cmd=SLEEPER)
    assert again.server_pid == info.server_pid and key_file.read_bytes() == key  # idempotent: same key
    forms = [key, key.hex().encode(), base64.b64encode(key), base64.b64encode(key).rstrip(b"=")]
    for f in [*(st / "logs").iterdir(), st / "stack.json"]:
        data = f.read_bytes()
        assert not any(form in data for form in forms), f
    for pid in (info.server_pid, info.worker_pid, info.codec_pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert not any(form in cmdline for form in forms)
    assert codec.key_id(key) in (st / "logs" / "codec.log").read_text()  # its id names it


def test_web_ui_is_given_the_codec_server(running: tuple[Path, stack.StackInfo]) -> None:
    _, info = running
    cmdline = Path(f"/proc/{info.server_pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[cmdline.index(b"--ui-codec-endpoint") + 1].decode() == info.codec_url
    # what the UI itself tells the browser
    with urllib.request.urlopen(f"{info.ui_url}/api/v1/settings", timeout=10) as r:
        settings = json.loads(r.read())
    assert settings["Codec"]["Endpoint"] == info.codec_url, settings
    # and the codec server answers the UI's origin (CORS preflight, as the browser sends it)
    req = urllib.request.Request(
        f"{info.codec_url}/decode",
        method="OPTIONS",
        headers={
            "Origin": info.ui_url,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-namespace",
        },
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == info.ui_url
        assert "x-namespace" in r.headers["Access-Control-Allow-Headers"].lower()
    s = stack.status(running[0])
    assert s["codec_alive"] and s["codec_url"] == info.codec_url
