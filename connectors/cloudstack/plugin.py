"""The CloudStack platform as sendense.platforms sees it. Connectors are imported when first made."""

from __future__ import annotations

from pathlib import Path

from connectors.cloudstack.spec import CloudStackSource, CloudStackTarget
from sendense.agents import Located
from sendense.platforms import Platform
from sendense.protocols import (
    FailbackSink,
    SourceConnector,
    SourcePower,
    TargetConnector,
    VmChanges,
    VmProvisioner,
)


def _source(spec: CloudStackSource, job: str, work_dir: Path) -> SourceConnector:
    from connectors.cloudstack.source import CloudStackSourceConnector

    return CloudStackSourceConnector(job, spec, work_dir)


def _power(spec: CloudStackSource, job: str, work_dir: Path) -> SourcePower:
    from connectors.cloudstack.power import CloudStackSourcePower

    return CloudStackSourcePower(job, spec)


def _failback_sink(spec: CloudStackSource, job: str, work_dir: Path) -> FailbackSink:
    from connectors.cloudstack.failback_sink import CloudStackFailbackSink

    return CloudStackFailbackSink(job, spec, work_dir)


def _target(spec: CloudStackTarget, job: str, job_id: str) -> TargetConnector:
    from connectors.cloudstack.target import CloudStackTargetConnector

    return CloudStackTargetConnector(job, spec, job_id)


def _vms(spec: CloudStackTarget, job: str, job_id: str) -> VmProvisioner:
    from connectors.cloudstack.vms import CloudStackVms

    return CloudStackVms(job, spec, job_id)


def _vm_changes(spec: CloudStackTarget, job: str, job_id: str) -> VmChanges:
    from connectors.cloudstack.vm_changes import CloudStackVmChanges

    return CloudStackVmChanges(job, spec, job_id)


def _locate(spec: CloudStackSource) -> Located:
    from connectors.cloudstack.placement import locate

    return locate(spec)


PLATFORM = Platform(
    name="cloudstack",
    summary="Apache CloudStack on KVM: a VM located through the signed API, its volumes read on its "
    "host with libvirt checkpoints; points as qcow2 files on a primary storage pool, VMs from them "
    "over imported volumes",
    source_spec=CloudStackSource,
    target_spec=CloudStackTarget,
    source=_source,
    target=_target,
    vms=_vms,
    locate=_locate,
    failback_sink=_failback_sink,
    vm_changes=_vm_changes,
    source_power=_power,
    lab="labs.cloudstack.hook",
    starter_endpoints=("cloudstack:*",),
    # where CloudStack's KVM agent mounts NFS primary storage (/mnt/<pool id>), and the lab's pool
    starter_target_roots=("/mnt", "{home}/labs/cloudstack/primary"),
    # the logins' keys, and the host's libvirt (the VM's domain is read through it)
    agent_env=("SENDENSE_CLOUDSTACK_*", "SENDENSE_KVM_*", "LIBVIRT_*"),
    reached_by_api=True,  # no host in the spec: located through the API before each sync
)
