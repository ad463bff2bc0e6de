"""The labs for the scenario runner's AWS and vSphere targets (one each per session, as the connector
tests do)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from helpers_aws import lab_in_env
from helpers_vsphere import vsphere_agent_env

from labs.aws import AwsLab
from labs.vsphere import VsphereLab


@pytest.fixture(scope="session")
def scenario_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsLab]:
    with lab_in_env(tmp_path_factory.mktemp("scenario-awslab"), snapshot_delay=0.0) as lab:
        yield lab


@pytest.fixture(scope="session")
def scenario_vsphere_lab() -> Iterator[VsphereLab]:
    with VsphereLab(vms=1) as lab, vsphere_agent_env(lab):
        yield lab


@pytest.fixture(params=["kvm", "aws", "vsphere"])
def target(request: pytest.FixtureRequest) -> tuple[str, Any]:
    if request.param == "aws":
        return "aws", request.getfixturevalue("scenario_lab")
    if request.param == "vsphere":
        return "vsphere", request.getfixturevalue("scenario_vsphere_lab")
    return "kvm", None
