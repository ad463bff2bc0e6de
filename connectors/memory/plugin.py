"""The memory platform as sendense.platforms sees it: for developers and tests (developer_only)."""

from __future__ import annotations

from pathlib import Path

from connectors.memory.spec import MemorySource, MemoryTarget
from sendense.platforms import Platform
from sendense.protocols import (
    FailbackSink,
    SourceConnector,
    SourcePower,
    TargetConnector,
    VmChanges,
    VmProvisioner,
)


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


def _vm_changes(spec: MemoryTarget, job: str, job_id: str) -> VmChanges:
    from connectors.memory.failback import MemoryVmChanges

    return MemoryVmChanges(job, spec, job_id)


def _failback_sink(spec: MemorySource, job: str, work_dir: Path) -> FailbackSink:
    from connectors.memory.failback import MemoryFailbackSink

    return MemoryFailbackSink(job, spec, work_dir)


PLATFORM = Platform(
    name="memory",
    summary="in-process memory or plain files: VMs made by tests, exact change tracking, fault injection",
    source_spec=MemorySource,
    target_spec=MemoryTarget,
    source=_source,
    target=_target,
    vms=_vms,
    source_power=_power,
    vm_changes=_vm_changes,
    failback_sink=_failback_sink,
    lab_note="the memory platform needs no lab: tests make its VMs (connectors.memory.store)",
    developer_only=True,
)
