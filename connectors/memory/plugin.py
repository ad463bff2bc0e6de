"""The memory platform as sendense.platforms sees it: for developers and tests (developer_only)."""

from __future__ import annotations

from pathlib import Path

from connectors.memory.spec import MemorySource, MemoryTarget
from sendense.platforms import Platform
from sendense.protocols import SourceConnector, SourcePower, TargetConnector, VmProvisioner


def _source(spec: MemorySource, job: str, work_dir: Path) -> SourceConnector:
    from connectors.memory.source import MemorySourceConnector

    return MemorySourceConnector(job, spec, work_dir)


def _power(spec: MemorySource, job: str, work_dir: Path) -> SourcePower:
    from connectors.memory.power import MemorySourcePower

    return MemorySourcePower(job, spec, work_dir)


def _target(spec: MemoryTarget, job: str, job_id: str) -> TargetConnector:
    from connectors.memory.target import MemoryTargetConnector

    return MemoryTargetConnector(job, spec, job_id=job_id)


def _vms(spec: MemoryTarget, job: str, job_id: str) -> VmProvisioner:
    from connectors.memory.vms import MemoryVms

    return MemoryVms(job, spec, job_id)


PLATFORM = Platform(
    name="memory",
    summary="in-process memory or plain files: VMs made by tests, exact change tracking, fault injection",
    source_spec=MemorySource,
    target_spec=MemoryTarget,
    source=_source,
    target=_target,
    vms=_vms,
    source_power=_power,
    lab_note="the memory platform needs no lab: tests make its VMs (connectors.memory.store)",
    developer_only=True,
)
