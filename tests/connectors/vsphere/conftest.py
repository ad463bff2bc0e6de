"""The vSphere connector's tests run against the vSphere lab (vcsim-lab: real thin VMDKs, a delta per
snapshot, change tracking from the files) with the agent's environment for it: the lab's login and its
VDDK stand-in (labs/vsphere/vddk_standin.py), as `sendense lab up` registers them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_vsphere import vsphere_agent_env

from connectors.vsphere import session
from labs.vsphere import VsphereLab


@pytest.fixture(scope="session")
def vlab() -> Iterator[VsphereLab]:
    with VsphereLab(vms=1) as lab, vsphere_agent_env(lab):
        yield lab


@pytest.fixture(autouse=True)
def fresh_sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test logs in afresh (the connector keeps sessions per server in the process)."""
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))
    session._sessions.clear()
    yield
    session._sessions.clear()
