"""The embedded stack against the real Temporal dev server (free ports, tmp state dir)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client

from app import stack
from sendense import config
from sendense.agents import REGISTRY_ID
from sendense.errors import ServerUnreachable

SLEEPER = [sys.executable, "-c", "import time; time.sleep(3600)"]


def free_ports(n: int = 2) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def dead(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_dead(pid: int | None, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not dead(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


async def list_workflows(address: str) -> list[str]:
    client = await Client.connect(address)
    return [wf.id async for wf in client.list_workflows()]


async def custom_search_attributes(address: str) -> dict[str, int]:
    client = await Client.connect(address)
    resp = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace="default")
    )
    return dict(resp.custom_attributes)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    st = tmp_path / "state"
    yield st
    stack.down(st, timeout=5)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, stack.StackInfo]]:
    """One stack (server + stand-in worker) shared by the read-only checks."""
    st = tmp_path_factory.mktemp("shared") / "state"
    port, ui = free_ports()
    info = stack.up(st, port=port, ui_port=ui, worker=True, worker_cmd=SLEEPER, worker_grace=0.3)
    yield st, info
    stack.down(st, timeout=5)


def test_up_records_and_status_reachable(running: tuple[Path, stack.StackInfo]) -> None:
    st, info = running
    recorded = json.loads((st / "stack.json").read_text())
    for key in ("address", "ui_url", "namespace", "server_pid", "worker_pid", "state_dir", "started_at"):
        assert key in recorded
    assert recorded["address"] == info.address and recorded["address"].startswith("127.0.0.1:")
    assert recorded["ui_url"].startswith("http://127.0.0.1:")
    assert recorded["namespace"] == "default"
    assert st.stat().st_mode & 0o777 == 0o700  # the server's database and logs: its user's only (issue 11)
    assert (st / "temporal.db").exists()
    assert (st / "logs" / "temporal.log").exists()
    # every file of it too, explicitly: the database and its WAL, stack.json, the logs (issue 11)
    files = [f for d in (st, st / "logs") for f in d.iterdir() if f.is_file()]
    assert {f.name for f in files} >= {"temporal.db", "stack.json", "temporal.log"}
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o600 for f in files}

    s = stack.status(st)
    assert s["server_alive"] and s["server_reachable"] and s["worker_alive"]
    assert s["address"] == info.address and s["ui_url"] == info.ui_url
    # nothing but the agent registry, which the worker's announcements start (workflows.agents)
    assert set(asyncio.run(list_workflows(info.address))) <= {REGISTRY_ID}
    stack.ensure_server_reachable(info.address, "default")


def test_config_reads_stack_file(
    running: tuple[Path, stack.StackInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    st, info = running
    monkeypatch.setenv("SENDENSE_HOME", str(st))
    monkeypatch.delenv("SENDENSE_TEMPORAL", raising=False)
    cfg = config.temporal_config()
    assert cfg.address == info.address and cfg.ui_url == info.ui_url


def test_worker_environment(running: tuple[Path, stack.StackInfo]) -> None:
    st, info = running
    assert info.worker_pid is not None
    env = psutil.Process(info.worker_pid).environ()
    assert env["SENDENSE_TEMPORAL"] == info.address
    assert env["SENDENSE_HOME"] == str(st.resolve())
    # detached: its own session, not ours
    assert os.getsid(info.worker_pid) == info.worker_pid != os.getsid(0)
    assert info.server_pid is not None and os.getsid(info.server_pid) == info.server_pid


def test_up_again_is_idempotent(running: tuple[Path, stack.StackInfo]) -> None:
    st, info = running
    again = stack.up(st, port=int(info.address.rsplit(":", 1)[1]), worker=True, worker_cmd=SLEEPER)
    assert (again.server_pid, again.worker_pid, again.started_at) == (
        info.server_pid,
        info.worker_pid,
        info.started_at,
    )


def test_search_attributes_registered(running: tuple[Path, stack.StackInfo]) -> None:
    _, info = running
    attrs = asyncio.run(custom_search_attributes(info.address))
    for name in config.SEARCH_ATTRIBUTES:
        assert name in attrs, attrs
    # and the CLI sees them too
    out = subprocess.run(
        [stack.temporal_binary(), "operator", "search-attribute", "list", "--address", info.address],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "SendenseJob" in out


def test_restart_worker_with_stand_in(state: Path) -> None:
    port, ui = free_ports()
    info = stack.up(state, port=port, ui_port=ui, worker=True, worker_cmd=SLEEPER, worker_grace=0.3)
    old = info.worker_pid
    assert old and not dead(old)
    new_info = stack.restart_worker(state, worker_grace=0.3)
    assert wait_dead(old)
    assert new_info.worker_pid and new_info.worker_pid != old and not dead(new_info.worker_pid)
    assert json.loads((state / "stack.json").read_text())["worker_pid"] == new_info.worker_pid
    assert psutil.Process(new_info.worker_pid).cmdline() == SLEEPER
    # server untouched
    assert new_info.server_pid == info.server_pid and stack.status(state)["server_reachable"]
    # SIGTERM works too
    newer = stack.restart_worker(state, signal.SIGTERM, worker_grace=0.3)
    assert wait_dead(new_info.worker_pid) and not dead(newer.worker_pid)


def test_down_stops_everything_and_state_persists(state: Path) -> None:
    port, ui = free_ports()
    info = stack.up(state, port=port, ui_port=ui, worker=True, worker_cmd=SLEEPER, worker_grace=0.3)

    async def start_one() -> None:
        client = await Client.connect(info.address)
        await client.start_workflow("NoSuchWorkflow", id="persist-me", task_queue="nobody-listens")

    asyncio.run(start_one())

    assert stack.down(state) is True
    assert wait_dead(info.server_pid) and wait_dead(info.worker_pid)
    recorded = json.loads((state / "stack.json").read_text())
    assert recorded["server_pid"] is None and recorded["worker_pid"] is None
    s = stack.status(state)
    assert not s["server_alive"] and not s["server_reachable"] and not s["worker_alive"]
    assert stack.down(state) is False
    with pytest.raises(ServerUnreachable):
        stack.ensure_server_reachable(info.address, "default", timeout=2)

    # same db, same ports: the workflow and the search attributes are still there
    again = stack.up(state, port=port, ui_port=ui, worker=False)
    assert again.server_pid != info.server_pid
    assert "persist-me" in asyncio.run(list_workflows(again.address))
    assert set(config.SEARCH_ATTRIBUTES) <= set(asyncio.run(custom_search_attributes(again.address)))
    assert stack.down(state) is True
    assert wait_dead(again.server_pid)


def test_port_in_use_is_one_clear_line(state: Path) -> None:
    port, ui = free_ports()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        with pytest.raises(stack.StackError) as exc:
            stack.up(state, port=port, ui_port=ui, worker=False)
    msg = str(exc.value)
    assert "\n" not in msg and f"port {port}" in msg and "in use" in msg
    assert not stack.status(state)["server_alive"]


def test_worker_that_exits_at_once_reports_its_last_line(state: Path) -> None:
    port, ui = free_ports()
    broken = [
        sys.executable,
        "-c",
        "import sys; print('noise'); print('ImportError: broken worker'); sys.exit(3)",
    ]
    with pytest.raises(stack.StackError) as exc:
        stack.up(state, port=port, ui_port=ui, worker=True, worker_cmd=broken)
    msg = str(exc.value)
    assert "\n" not in msg and "ImportError: broken worker" in msg and "code 3" in msg
    s = stack.status(state)
    assert s["server_reachable"] and not s["worker_alive"] and s["worker_pid"] is None


def test_ensure_server_reachable_message() -> None:
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    with pytest.raises(ServerUnreachable) as exc:
        stack.ensure_server_reachable(address, "default", timeout=2)
    assert str(exc.value) == (
        f"Temporal server at {address} is not reachable; start the embedded stack with 'sendense up' "
        "(or set SENDENSE_TEMPORAL)"
    )


def test_missing_temporal_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(stack.StackError, match="temporal CLI not found"):
        stack.temporal_binary()


def test_processes_outlive_the_caller(state: Path) -> None:
    """`sendense up` exits at once; the stack keeps running until `down`."""
    port, ui = free_ports()
    code = (
        "import sys; from pathlib import Path; from app import stack; "
        f"stack.up(Path({str(state)!r}), port={port}, ui_port={ui}, worker=True, "
        f"worker_cmd={SLEEPER!r}, worker_grace=0.3)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    s = stack.status(state)
    assert s["server_reachable"] and s["worker_alive"]
    assert stack.down(state) is True
    assert wait_dead(s["server_pid"]) and wait_dead(s["worker_pid"])
