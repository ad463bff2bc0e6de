"""Pick the KVM source implementation for a spec: stopped VM, QMP socket, or libvirt domain."""

from __future__ import annotations

from pathlib import Path

from connectors.kvm.spec import KvmSource
from sendense.protocols import SourceConnector


def make_kvm_source(job: str, spec: KvmSource, work_dir: Path) -> SourceConnector:
    if spec.disks is not None:
        from connectors.kvm.offline import OfflineQcow2Source

        return OfflineQcow2Source(job, spec.disks, spec.hardware)
    if spec.qmp is not None:
        from connectors.kvm.live import QmpSource

        return QmpSource(job, spec.qmp, work_dir)
    assert spec.libvirt is not None
    from connectors.kvm.libvirt_source import LibvirtSource

    return LibvirtSource(job, spec.libvirt.uri, spec.libvirt.domain, work_dir, uuid=spec.libvirt.uuid)
