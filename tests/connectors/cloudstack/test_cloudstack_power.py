"""The CloudStack source power's answers that need no running VM, against the CloudStack lab's API
without hosts (no root): power_state in bounded time, "unreachable" for a server that does not answer
or fails (429, 5xx, CloudStack's internal error), "gone" for a VM the zone does not have, and a
configuration fault (a refused key, an unknown zone) raised in one line without the secret. The verbs
on a running VM are the source power contract's (tests/contract, root)."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.cloudstack.client import AccessDenied
from connectors.cloudstack.power import CloudStackSourcePower
from connectors.cloudstack.spec import CloudStackSource, key_envs
from labs.cloudstack.server import LabServer
from labs.cloudstack.state import LabConfig
from sendense.errors import InvalidSpec, ResourceNotFound


@pytest.fixture(scope="module")
def lab() -> Iterator[LabServer]:
    root = Path(tempfile.mkdtemp(prefix="cslab-power-"))
    server = LabServer(root, LabConfig(libvirt=False)).start()
    yield server
    server.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def keys(lab: LabServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    key_env, secret_env = key_envs("default")
    monkeypatch.setenv(key_env, lab.info["api_key"])
    monkeypatch.setenv(secret_env, lab.info["secret_key"])
    lab.cloud.faults.clear()
    yield
    lab.cloud.faults.clear()


def power(lab: LabServer, **kw: str) -> CloudStackSourcePower:
    spec = CloudStackSource(
        platform="cloudstack", url=lab.url, **{"zone": lab.info["zone"], "vm": "web-1", **kw}
    )
    return CloudStackSourcePower("job1", spec)


def test_a_vm_the_zone_does_not_have_is_gone_and_cannot_be_started(lab: LabServer) -> None:
    p = power(lab)
    assert p.power_state() == "gone"
    assert power(lab, vm="00000000-0000-4000-8000-000000000000").power_state() == "gone"
    p.pause_vm()  # gone: nothing to stop, no error
    p.power_off_vm()
    p.resume_vm()
    with pytest.raises(ResourceNotFound) as e:
        p.power_on_vm()
    assert "\n" not in str(e.value) and "CloudStack VM web-1" in str(e.value)


@pytest.mark.parametrize("code", [429, 503, 530])
def test_a_failing_or_throttling_server_is_unreachable_at_once(lab: LabServer, code: int) -> None:
    lab.cloud.faults.inject("listVirtualMachines", code, count=10)
    t0 = time.monotonic()
    assert power(lab).power_state() == "unreachable"
    assert time.monotonic() - t0 < 2  # one attempt, no backoff


def test_a_server_that_does_not_answer_is_unreachable_in_bounded_time(lab: LabServer) -> None:
    with socket.socket() as s:  # accepts connections (the backlog) and never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/client/api"
        p = CloudStackSourcePower(
            "job1", CloudStackSource(platform="cloudstack", url=url, zone="z", vm="web-1")
        )
        p.state_seconds = 1.0
        t0 = time.monotonic()
        assert p.power_state() == "unreachable"
        took = time.monotonic() - t0
    assert took < 2 * p.state_seconds + 0.5, took
    with socket.socket() as s:  # nothing listens: refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/client/api"
    p = CloudStackSourcePower("job1", CloudStackSource(platform="cloudstack", url=url, zone="z", vm="web-1"))
    assert p.power_state() == "unreachable"


def test_a_refused_key_and_an_unknown_zone_raise_one_line_without_the_secret(
    lab: LabServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidSpec) as e:
        power(lab, zone="no-such-zone").power_state()
    assert "\n" not in str(e.value) and "no zone 'no-such-zone'" in str(e.value)
    monkeypatch.setenv(key_envs("default")[1], "not-the-secret-key")
    for verb in ("power_state", "pause_vm", "power_on_vm"):
        with pytest.raises(AccessDenied) as e:
            getattr(power(lab), verb)()
        msg = str(e.value)
        assert "\n" not in msg and "not-the-secret-key" not in msg and lab.info["api_key"] not in msg
