"""The one registry of platforms (DESIGN.md "Platforms are plug-ins").

A platform's package owns everything about it: its spec models, its source, target and VM connectors,
its lab hook and its dependencies (a pyproject extra), all named by the `Platform` its `plugin` module
exports as PLATFORM. The core knows platforms only through REGISTRY below, by module name, imported the
first time the platform is used: adding a platform is its package plus one line here.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sendense import config
from sendense.agents import LocalVm, Located
from sendense.errors import InvalidSpec
from sendense.models import JobSpec, SourceSpec, TargetSpec
from sendense.protocols import (
    FailbackSink,
    SourceConnector,
    SourcePower,
    TargetConnector,
    VmChanges,
    VmProvisioner,
)

REGISTRY: dict[str, str] = {
    "kvm": "connectors.kvm.plugin",
    "aws": "connectors.aws.plugin",
    "vsphere": "connectors.vsphere.plugin",
    "cloudstack": "connectors.cloudstack.plugin",
    "memory": "connectors.memory.plugin",
}

# Platforms for developers (developer_only) are offered in specs only when this is set to 1.
DEVELOPER_PLATFORMS = "SENDENSE_DEVELOPER_PLATFORMS"


@dataclass(frozen=True)
class Platform:
    """What a platform's package declares about itself."""

    name: str
    summary: str  # one line: what the platform is and what of it sendense uses
    source_spec: type[SourceSpec] | None = None
    target_spec: type[TargetSpec] | None = None
    # (its source spec, job name, the job's work directory on the agent)
    source: Callable[[Any, str, Path], SourceConnector] | None = None
    # (its target spec, job name, job id)
    target: Callable[[Any, str, str], TargetConnector] | None = None
    vms: Callable[[Any, str, str], VmProvisioner] | None = None
    # the source VM's power (failover, failback): (its source spec, job name, the job's work directory)
    source_power: Callable[[Any, str, Path], SourcePower] | None = None
    # failback: what a VM made from a point changed (its target spec, job name, job id), and the
    # original place written back (its source spec, job name, the job's work directory)
    vm_changes: Callable[[Any, str, str], VmChanges] | None = None
    failback_sink: Callable[[Any, str, Path], FailbackSink] | None = None
    lab: str | None = None  # module of its lab hook (labs/...: LAB), imported by the app only
    lab_note: str = ""  # said by `sendense lab up/status` for a platform without a lab
    developer_only: bool = False  # not offered in specs unless DEVELOPER_PLATFORMS=1
    # what the starter agent policy (sendense.policy.starter) allows for it: its usual image
    # directories and its own endpoints (patterns)
    starter_source_roots: tuple[str, ...] = ()
    # and where it writes replicas ("{home}/..." is under the agent's SENDENSE_HOME, e.g. its lab's)
    starter_target_roots: tuple[str, ...] = ()
    starter_endpoints: tuple[str, ...] = ()
    # environment its connectors read on an agent (names; a trailing * is a prefix): the embedded
    # stack hands its worker these and the common ones, not the caller's whole environment
    agent_env: tuple[str, ...] = ()
    # its ends are reached through the platform's API from any agent (no disk of a host of ours):
    # an end that names no `host` runs its steps on the control queue, not on the creating CLI's host
    reached_by_api: bool = False
    # the VMs it runs on this agent's host, announced to the registry (sendense.agents) so that a job
    # follows its VM to another host; raises with a one-line message when it cannot list them
    local_vms: Callable[[], list[LocalVm]] | None = None
    # where its source VM runs now, asked of the platform's API on the control queue before each sync
    # (a cloud of hypervisor hosts: the VM's host's agent runs the sync's source steps)
    locate: Callable[[Any], Located] | None = None


_loaded: dict[str, Platform] = {}
_lock = threading.Lock()


def get(name: str) -> Platform | None:
    """The platform named `name`, its package imported on first use; None if there is none."""
    p = _loaded.get(name)
    if p is not None or name not in REGISTRY:
        return p
    with _lock:
        if name not in _loaded:
            platform = importlib.import_module(REGISTRY[name]).PLATFORM
            assert isinstance(platform, Platform) and platform.name == name, REGISTRY[name]
            _loaded[name] = platform
    return _loaded[name]


def load_all() -> list[Platform]:
    """Every registered platform (a worker loads them before its workflows decode a spec)."""
    return [p for name in REGISTRY if (p := get(name)) is not None]


def developer_platforms() -> bool:
    return os.environ.get(DEVELOPER_PLATFORMS) == "1"


def offered(kind: str) -> list[str]:
    """Names of the platforms a spec may name as `kind` (source or target)."""
    dev = developer_platforms()
    return [
        p.name
        for p in load_all()
        if (p.source_spec if kind == "source" else p.target_spec) is not None
        and (dev or not p.developer_only)
    ]


def spec_model(kind: str, name: str) -> type[SourceSpec] | type[TargetSpec] | None:
    """The spec model of platform `name` as `kind`, whether offered to users or not (workers decode
    every spec they are given; what users may write is decided where specs are read)."""
    p = get(name)
    if p is None:
        return None
    return p.source_spec if kind == "source" else p.target_spec


def _platform(kind: str, name: str) -> Platform:
    p = get(name)
    if p is None:
        raise InvalidSpec(f"{kind}.platform: {name!r} is not supported (one of: {', '.join(offered(kind))})")
    return p


def source_for(spec: JobSpec, work_dir: Path) -> SourceConnector:
    p = _platform("source", spec.source.platform)
    if p.source is None:
        raise InvalidSpec(f"source.platform: {p.name} cannot be a source")
    return p.source(spec.source, spec.name, work_dir)


def target_for(spec: JobSpec) -> TargetConnector:
    p = _platform("target", spec.target.platform)
    if p.target is None:
        raise InvalidSpec(f"target.platform: {p.name} cannot be a target")
    return p.target(spec.target, spec.name, spec.job_id)


def vms_for(spec: JobSpec) -> VmProvisioner:
    p = _platform("target", spec.target.platform)
    if p.vms is None:
        raise InvalidSpec(f"target.platform: {p.name} cannot make VMs from recovery points")
    return p.vms(spec.target, spec.name, spec.job_id)


def source_power_for(spec: JobSpec, work_dir: Path) -> SourcePower:
    """The power verbs of the job's source VM (sendense.protocols.SourcePower)."""
    p = _platform("source", spec.source.platform)
    if p.source_power is None:
        raise InvalidSpec(f"source.platform: {p.name} cannot pause, stop or start its VMs")
    return p.source_power(spec.source, spec.name, work_dir)


def vm_changes_for(spec: JobSpec) -> VmChanges:
    """What the job's failed-over VM changed since its point (sendense.protocols.VmChanges)."""
    p = _platform("target", spec.target.platform)
    if p.vm_changes is None:
        raise InvalidSpec(f"target.platform: {p.name} cannot replicate a failed-over VM back (failback)")
    return p.vm_changes(spec.target, spec.name, spec.job_id)


def failback_sink_for(spec: JobSpec, work_dir: Path) -> FailbackSink:
    """The job's source place written back by a failback (sendense.protocols.FailbackSink)."""
    p = _platform("source", spec.source.platform)
    if p.failback_sink is None:
        raise InvalidSpec(f"source.platform: {p.name} cannot be written back (failback)")
    return p.failback_sink(spec.source, spec.name, work_dir)


def queues(spec: JobSpec) -> tuple[str, str]:
    """The task queues of a job's source and target steps (queue_of each end), but a target reached
    by API with a source on an agent runs where the source does: the copy writes it from there, and
    a target keeps records of what its writer started (e.g. snapshots begun, their block lists) that
    its commit reads. A source reached by API keeps its own on the control queue and its reads need
    none, so its copy runs on the target's agent (workflows.common.placement)."""
    source, target = queue_of(spec.source), queue_of(spec.target)
    if target == config.CONTROL_QUEUE and source != config.CONTROL_QUEUE:
        target = source
    return source, target


def queue_of(end: SourceSpec | TargetSpec) -> str:
    """The task queue that runs an end's steps: its host's agent (`host`); with no host, the control
    queue for a platform reached by API (a cloud: any agent reaches it, so the job does not depend
    on the machine that created it), else this machine's agent (a local disk or hypervisor)."""
    if end.host:
        return config.host_queue(end.host)
    p = get(end.platform)
    if p is not None and p.reached_by_api:
        return config.CONTROL_QUEUE
    return config.host_queue()
