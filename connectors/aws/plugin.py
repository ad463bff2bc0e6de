"""The AWS platform as sendense.platforms sees it. Connectors (and boto3) are imported when first made."""

from __future__ import annotations

from pathlib import Path

from connectors.aws.spec import AwsSource, AwsTarget
from sendense.platforms import Platform
from sendense.protocols import (
    FailbackSink,
    SourceConnector,
    SourcePower,
    TargetConnector,
    VmChanges,
    VmProvisioner,
)


def _source(spec: AwsSource, job: str, work_dir: Path) -> SourceConnector:
    from connectors.aws.source import AwsSourceConnector

    return AwsSourceConnector(job, spec, work_dir)


def _power(spec: AwsSource, job: str, work_dir: Path) -> SourcePower:
    from connectors.aws.power import AwsSourcePower

    return AwsSourcePower(job, spec)


def _target(spec: AwsTarget, job: str, job_id: str) -> TargetConnector:
    from connectors.aws.target import AwsTargetConnector

    return AwsTargetConnector(job, spec, job_id=job_id)


def _vms(spec: AwsTarget, job: str, job_id: str) -> VmProvisioner:
    from connectors.aws.vms import AwsVmProvisioner

    return AwsVmProvisioner(job, spec, job_id)


def _vm_changes(spec: AwsTarget, job: str, job_id: str) -> VmChanges:
    from connectors.aws.vm_changes import AwsVmChanges

    return AwsVmChanges(job, spec, job_id)


def _failback_sink(spec: AwsSource, job: str, work_dir: Path) -> FailbackSink:
    from connectors.aws.failback_sink import AwsFailbackSink

    return AwsFailbackSink(job, spec, work_dir)


PLATFORM = Platform(
    name="aws",
    summary="AWS EC2: an instance's EBS volumes (EBS direct APIs); points as EBS snapshots, "
    "instances launched from them",
    source_spec=AwsSource,
    target_spec=AwsTarget,
    source=_source,
    target=_target,
    vms=_vms,
    source_power=_power,
    vm_changes=_vm_changes,
    failback_sink=_failback_sink,
    lab="labs.aws.hook",
    starter_endpoints=("aws:*",),  # AWS's own endpoints, every region (aws:<region>)
    agent_env=("AWS_*", "BOTO_CONFIG"),  # the standard credential chain and its files
    reached_by_api=True,  # no host: its steps run on the control queue
)
