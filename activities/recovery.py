"""The disaster-recovery activities (workflows.drill): hold a point, make a VM from it, power it,
check that it booted, destroy it, release the hold. Each runs on the job's target host queue, asks the
agent's policy first, and is idempotent by the name or hold id its saga chose before it ran."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from temporalio import activity

from activities.errors import mapped
from activities.guard import authorized
from activities.replication import HEARTBEAT_EVERY, heartbeating, work_dir
from sendense.errors import ResourceNotFound
from sendense.models import BootCheck, JobRequest, JobSpec, PointInfo, VmRef
from sendense.platforms import source_power_for, target_for, vms_for
from sendense.protocols import SourcePower
from sendense.recovery import BootRequest, HoldRequest, PointRequest, VmNameRequest, VmRequest


def beating(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Heartbeat while the step runs, whatever it is: a worker killed in any step of a saga is noticed
    within the job's heartbeat timeout, and the step retried on another, not after its whole timeout."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with heartbeating(HEARTBEAT_EVERY * 2):
            return fn(*args, **kwargs)

    return wrapper


@activity.defn(name="choose_point")
@mapped
@beating
@authorized
def choose_point(req: PointRequest) -> PointInfo:
    """The point asked for, or the newest; one line naming the job if there is none."""
    points = target_for(req.spec).list_points()
    if req.point_id is None:
        if not points:
            raise ResourceNotFound(f"job {req.spec.name} has no recovery point yet")
        return points[0]
    for p in points:
        if p.point_id == req.point_id:
            return p
    raise ResourceNotFound(f"job {req.spec.name}: no recovery point {req.point_id}")


@activity.defn(name="list_points")
@mapped
@beating
@authorized
def list_points(req: PointRequest) -> list[PointInfo]:
    """The job's points, newest first (a plan picks the ones nearest one instant)."""
    return target_for(req.spec).list_points()


@activity.defn(name="hold_point")
@mapped
@beating
@authorized
def hold_point(req: HoldRequest) -> None:
    target_for(req.spec).hold(req.point_id, req.hold_id, req.reason)


@activity.defn(name="release_point")
@mapped
@beating
@authorized
def release_point(req: HoldRequest) -> None:
    target_for(req.spec).release(req.point_id, req.hold_id)


@activity.defn(name="create_vm")
@mapped
@beating
@authorized
def create_vm(req: VmRequest) -> VmRef:
    return vms_for(req.spec).create_vm(req.plan)  # (a cloud volume from a snapshot: minutes)


@activity.defn(name="power_on")
@mapped
@beating
@authorized
def power_on(req: VmNameRequest) -> VmRef:
    return vms_for(req.spec).power_on(req.name)


@activity.defn(name="power_off")
@mapped
@beating
@authorized
def power_off(req: VmNameRequest) -> VmRef:
    return vms_for(req.spec).power_off(req.name)


@activity.defn(name="boot_check")
@mapped
@beating
@authorized
def boot_check(req: BootRequest) -> BootCheck:
    check = req.spec.recovery.boot_check  # (a plan's per-VM recovery is in the spec it sends)
    return vms_for(req.spec).boot_check(
        req.name,
        req.pattern,
        req.timeout_seconds,
        guest_agent=check.guest_agent,
        status_checks=check.status_checks,
    )


@activity.defn(name="destroy_vm")
@mapped
@beating
@authorized
def destroy_vm(req: VmNameRequest) -> None:
    vms_for(req.spec).destroy_vm(req.name)


# ------------------------------------------------------------------ the source VM (planned failover)


def source_power(spec: JobSpec) -> SourcePower:
    """The job's source VM's power verbs, with the job's work directory on this agent."""
    return source_power_for(spec, work_dir(spec.name))


@activity.defn(name="source_power_state")
@mapped
@beating
@authorized
def source_power_state(req: JobRequest) -> str:
    """running, paused, stopped, gone or unreachable: a failover is planned when the source answers."""
    return str(source_power(req.spec).power_state())


@activity.defn(name="pause_source")
@mapped
@beating
@authorized
def pause_source(req: JobRequest) -> None:
    source_power(req.spec).pause_vm()


@activity.defn(name="resume_source")
@mapped
@beating
@authorized
def resume_source(req: JobRequest) -> None:
    source_power(req.spec).resume_vm()


@activity.defn(name="power_off_source")
@mapped
@beating
@authorized
def power_off_source(req: JobRequest) -> None:
    source_power(req.spec).power_off_vm()  # (a cloud instance: minutes)


RECOVERY_ACTIVITIES: list[Callable[..., Any]] = [
    choose_point,
    list_points,
    hold_point,
    release_point,
    create_vm,
    power_on,
    power_off,
    boot_check,
    destroy_vm,
    source_power_state,
    pause_source,
    resume_source,
    power_off_source,
]
