"""The vSphere platform as sendense.platforms sees it. Connectors (and pyvmomi) are imported when first
made."""

from __future__ import annotations

from pathlib import Path

from connectors.vsphere.spec import VsphereSource, VsphereTarget
from sendense.platforms import Platform
from sendense.protocols import (
    FailbackSink,
    SourceConnector,
    SourcePower,
    TargetConnector,
    VmChanges,
    VmProvisioner,
)


def _source(spec: VsphereSource, job: str, work_dir: Path) -> SourceConnector:
    from connectors.vsphere.source import VsphereSourceConnector

    return VsphereSourceConnector(job, spec, work_dir)


def _power(spec: VsphereSource, job: str, work_dir: Path) -> SourcePower:
    from connectors.vsphere.power import VsphereSourcePower

    return VsphereSourcePower(job, spec)


def _target(spec: VsphereTarget, job: str, job_id: str) -> TargetConnector:
    from connectors.vsphere.target import VsphereTargetConnector

    return VsphereTargetConnector(job, spec, job_id)


def _vms(spec: VsphereTarget, job: str, job_id: str) -> VmProvisioner:
    from connectors.vsphere.vms import VsphereVmProvisioner

    return VsphereVmProvisioner(job, spec, job_id)


def _failback_sink(spec: VsphereSource, job: str, work_dir: Path) -> FailbackSink:
    from connectors.vsphere.failback_sink import VsphereFailbackSink

    return VsphereFailbackSink(job, spec, work_dir)


def _vm_changes(spec: VsphereTarget, job: str, job_id: str) -> VmChanges:
    from connectors.vsphere.vm_changes import VsphereVmChanges

    return VsphereVmChanges(job, spec, job_id)


PLATFORM = Platform(
    name="vsphere",
    summary="VMware vSphere (vCenter, ESXi): a VM's disks by Changed Block Tracking and VM snapshots, "
    "read through nbdkit's vddk plugin; points as snapshots of a placeholder VM",
    source_spec=VsphereSource,
    target_spec=VsphereTarget,
    source=_source,
    target=_target,
    vms=_vms,
    vm_changes=_vm_changes,
    failback_sink=_failback_sink,
    source_power=_power,
    lab="labs.vsphere.hook",
    starter_endpoints=("vsphere:*",),  # any vCenter or ESXi host the agent can reach
    agent_env=("SENDENSE_VSPHERE_*", "SENDENSE_VDDK_*"),  # logins, and the agent's VDDK
    reached_by_api=True,  # no host: its steps run on the control queue
)
