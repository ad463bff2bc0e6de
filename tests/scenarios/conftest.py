"""The AWS lab for the scenario runner's AWS target (one per session, as the connector tests do)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers_aws import lab_in_env

from labs.aws import AwsLab


@pytest.fixture(scope="session")
def scenario_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsLab]:
    with lab_in_env(tmp_path_factory.mktemp("scenario-awslab"), snapshot_delay=0.0) as lab:
        yield lab


@pytest.fixture(params=["kvm", "aws"])
def target(request: pytest.FixtureRequest) -> tuple[str, AwsLab | None]:
    if request.param == "aws":
        return "aws", request.getfixturevalue("scenario_lab")
    return "kvm", None
