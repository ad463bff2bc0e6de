"""The AWS platform's part of a job spec: an EC2 instance (source) and a region where recovery points
are EBS snapshots and instances are launched from them (target)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from sendense.models import PlatformSpec, Reach, SourceSpec, Strict, TargetSpec, capped, check_url_secrets

_AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+\Z")  # \Z: $ admits a trailing newline

MAX_SECURITY_GROUPS = 16  # per network interface: AWS allows 5, up to 16 by a quota increase

AWS_CREDENTIALS = (
    "the agent uses the AWS credential chain "
    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, an instance role)"
)


# Errors name the rule, never the value given: a secret pasted into the wrong field is not echoed.


def _check_region(v: str) -> str:
    if not _AWS_REGION.match(v):
        raise ValueError("not an AWS region name (e.g. us-east-1)")
    return v


def _check_endpoint(v: str | None) -> str | None:
    if v is None:
        return v
    if not re.match(r"^https?://[^\s/?#@]", v):
        raise ValueError("not an http(s) URL (e.g. https://ec2.eu-west-1.amazonaws.com)")
    return check_url_secrets(v, f"an endpoint has none; {AWS_CREDENTIALS}", user=False)


class _AwsPlace(PlatformSpec):
    """Where an AWS end is reached: its region, an optional endpoint, and the agent that calls it."""

    region: str = Field(description="the region, e.g. eu-west-1")
    endpoint_url: str | None = Field(default=None, description="EC2 and EBS endpoint (e.g. the lab's)")

    credentials_hint = AWS_CREDENTIALS

    _region = field_validator("region")(_check_region)
    _endpoint = field_validator("endpoint_url")(_check_endpoint)

    def reach(self) -> Reach:
        """The lab's or another endpoint if given, else AWS's own endpoints of the region (aws:<region>)."""
        end = "source" if isinstance(self, SourceSpec) else "target"
        if self.endpoint_url is not None:
            return Reach(endpoints=[(f"{end}.endpoint_url", self.endpoint_url.rstrip("/"))])
        return Reach(endpoints=[(f"{end}.region", f"aws:{self.region}")])


class AwsSource(_AwsPlace, SourceSpec):
    """An EC2 instance: its EBS volumes are snapshotted together (CreateSnapshots) and the snapshots
    diffed and read through the EBS direct APIs."""

    platform: Literal["aws"]
    instance_id: str = Field(pattern=r"^i-[0-9a-f]{8,17}$", description="the EC2 instance, e.g. i-0abc...")

    def describe(self) -> str:
        return f"aws:{self.region}:{self.instance_id}"


class AwsInstanceSettings(Strict):
    """How an instance launched from a recovery point looks (failover, test failover)."""

    instance_type: str = Field(default="t3.medium", pattern=r"^[a-z0-9-]+\.[a-z0-9]+$")
    subnet_id: str | None = Field(default=None, pattern=r"^subnet-[0-9a-f]{8,17}$")
    security_group_ids: Annotated[list[str], capped("security groups", MAX_SECURITY_GROUPS)] = Field(
        default_factory=list
    )
    key_name: str | None = None
    architecture: Literal["x86_64", "arm64"] = "x86_64"
    boot_mode: Literal["legacy-bios", "uefi", "uefi-preferred"] | None = None

    @field_validator("security_group_ids")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        for g in v:
            if not re.match(r"^sg-[0-9a-f]{8,17}\Z", g):
                raise ValueError("not a security group id (sg- and 8 or 17 hex digits)")
        return v


class AwsTarget(_AwsPlace, TargetSpec):
    """Recovery points as EBS snapshots (one per disk, written with the EBS direct APIs)."""

    platform: Literal["aws"]
    availability_zone: str | None = Field(default=None, description="where instances are launched")
    instance: AwsInstanceSettings = Field(default_factory=AwsInstanceSettings)

    @field_validator("availability_zone")
    @classmethod
    def _zone(cls, v: str | None, info: Any) -> str | None:
        region = info.data.get("region")
        if v is not None and region is not None and not (v.startswith(region) and len(v) > len(region)):
            raise ValueError(f"not a zone of region {region} (e.g. {region}a)")
        return v

    def describe(self) -> str:
        return f"aws:{self.region}" + (f":{self.availability_zone}" if self.availability_zone else "")
