"""The KVM platform as sendense.platforms sees it. Connectors are imported when first made."""

from __future__ import annotations

from pathlib import Path

from connectors.kvm.spec import KvmSource, KvmTarget
from sendense.agents import LocalVm
from sendense.platforms import Platform
from sendense.protocols import (
    FailbackSink,
    SourceConnector,
    SourcePower,
    TargetConnector,
    VmChanges,
    VmProvisioner,
)


def _source(spec: KvmSource, job: str, work_dir: Path) -> SourceConnector:
    from connectors.kvm.source import make_kvm_source

    return make_kvm_source(job, spec, work_dir)


def _power(spec: KvmSource, job: str, work_dir: Path) -> SourcePower:
    from connectors.kvm.power import make_kvm_power

    return make_kvm_power(job, spec, work_dir)


def _target(spec: KvmTarget, job: str, job_id: str) -> TargetConnector:
    from connectors.kvm.target import KvmTarget as Target

    return Target(job, spec.path, job_id=job_id)


def _vms(spec: KvmTarget, job: str, job_id: str) -> VmProvisioner:
    from connectors.kvm.vms import KvmVms

    return KvmVms(job, spec.path, job_id, libvirt_uri=spec.libvirt.uri if spec.libvirt else None)


def _vm_changes(spec: KvmTarget, job: str, job_id: str) -> VmChanges:
    from connectors.kvm.vm_changes import KvmVmChanges
    from connectors.kvm.vms import KvmVms

    vms = KvmVms(job, spec.path, job_id, libvirt_uri=spec.libvirt.uri if spec.libvirt else None)
    return KvmVmChanges(job, spec.path, job_id, vms=vms)


def _local_vms() -> list[LocalVm]:
    from connectors.kvm.inventory import local_vms

    return local_vms()


def _failback_sink(spec: KvmSource, job: str, work_dir: Path) -> FailbackSink:
    from connectors.kvm.failback_sink import KvmFailbackSink

    return KvmFailbackSink(job, spec, work_dir)


PLATFORM = Platform(
    name="kvm",
    summary="KVM/QEMU: a stopped VM's qcow2 images, a running VM over QMP or a libvirt domain; "
    "qcow2 replicas",
    source_spec=KvmSource,
    target_spec=KvmTarget,
    source=_source,
    target=_target,
    vms=_vms,
    source_power=_power,
    vm_changes=_vm_changes,
    failback_sink=_failback_sink,
    local_vms=_local_vms,
    lab_note="KVM runs for real here: source.disks (stopped VM), source.qmp or source.libvirt; no lab",
    starter_source_roots=("/var/lib/libvirt/images",),  # libvirt's default image pool
    starter_endpoints=("qemu:///system", "qemu:///session"),
    # libvirt's client: its default URI and config, qemu:///session's runtime dir, qemu+ssh's agent
    agent_env=("LIBVIRT_*", "VIRSH_*", "XDG_RUNTIME_DIR", "SSH_AUTH_SOCK", "SENDENSE_KVM_*"),
)
