"""The backend the AWS connector's contract tests run against: the AWS lab, or real AWS."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from labs.aws import AwsLab


@contextmanager
def lab_in_env(directory: Path, snapshot_delay: float) -> Iterator[AwsLab]:
    """A running AWS lab whose endpoint and key pair the AWS SDK finds in the environment (no profile)."""
    lab = AwsLab(directory, snapshot_delay=snapshot_delay).start()
    mp = pytest.MonkeyPatch()
    for k, v in lab.env().items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    try:
        yield lab
    finally:
        mp.undo()
        lab.stop()


@dataclass
class Backend:
    name: str
    region: str
    endpoint_url: str | None
    instance_id: str
    volumes: list[tuple[str, str, int]] = field(default_factory=list)  # device, volume id, GiB
    lab: AwsLab | None = None

    def ec2(self) -> Any:
        import boto3

        return boto3.client("ec2", region_name=self.region, endpoint_url=self.endpoint_url)

    def ebs(self) -> Any:
        import boto3

        return boto3.client("ebs", region_name=self.region, endpoint_url=self.endpoint_url)

    def tagged(self, job: str) -> list[dict[str, Any]]:
        """Every snapshot tagged with the job's name, whichever side made it."""
        f = [{"Name": "tag:sendense:job", "Values": [job]}]
        return list(self.ec2().describe_snapshots(OwnerIds=["self"], Filters=f)["Snapshots"])

    def need_lab(self) -> AwsLab:
        if self.lab is None:
            pytest.skip("writes into a volume as its guest would: lab only")
        return self.lab
