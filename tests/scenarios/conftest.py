"""The AWS lab for the scenario runner's AWS target (one per session, as the connector tests do)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labs.aws import AwsLab


@pytest.fixture(scope="session")
def scenario_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsLab]:
    lab = AwsLab(tmp_path_factory.mktemp("scenario-awslab"), snapshot_delay=0.0).start()
    mp = pytest.MonkeyPatch()
    for k, v in lab.env().items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    try:
        yield lab
    finally:
        mp.undo()
        lab.stop()


@pytest.fixture(params=["kvm", "aws"])
def target(request: pytest.FixtureRequest) -> tuple[str, AwsLab | None]:
    if request.param == "aws":
        return "aws", request.getfixturevalue("scenario_lab")
    return "kvm", None
