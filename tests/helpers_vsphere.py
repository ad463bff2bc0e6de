"""What the vSphere connector's tests run against: the vSphere lab (vcsim-lab), with the agent's
environment for it (the lab's login and its VDDK stand-in, as `sendense lab up` registers them)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import labs.vsphere
from labs.vsphere import VsphereLab

STANDIN = Path(labs.vsphere.__file__).with_name("vddk_standin.py")


@contextmanager
def vsphere_agent_env(lab: VsphereLab) -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    mp.setenv("SENDENSE_VSPHERE_USER", lab.user)
    mp.setenv("SENDENSE_VSPHERE_PASSWORD", lab.password)
    mp.setenv("SENDENSE_VDDK_PLUGIN", str(STANDIN))
    mp.setenv("SENDENSE_DEVELOPER_PLATFORMS", "1")  # (vsphere is developer-only until issue 13 lands)
    try:
        yield
    finally:
        mp.undo()
