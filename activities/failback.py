"""Failback's activities (workflows.failback): the failed-over VM's snapshots read back into the
source's disks in place, and the source VM started again. They run on the job's source host queue
(the source's disks are written there; the VM's changes are read through its target platform), ask
the agent's policy first, and are idempotent by the snapshot id their workflow chose before they ran.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from temporalio import activity

from activities import exports
from activities.errors import mapped
from activities.guard import authorized
from activities.leases import governed
from activities.recovery import beating, source_power
from activities.replication import resumable_copy, work_dir
from sendense.datapath.extents import Extent
from sendense.datapath.reverse import WithDiverged
from sendense.datapath.sync import Checkpoint, planned_bytes
from sendense.datapath.sync import copy_disk as run_copy_disk
from sendense.errors import ChangeTrackingLost, VmNotStartable
from sendense.models import DiskCopyResult, JobRequest, JobSpec, SnapshotRef
from sendense.platforms import failback_sink_for, vm_changes_for
from sendense.protocols import FailbackSink, SourceDisk
from sendense.recovery import (
    ReverseCopyRequest,
    ReverseCopyResult,
    ReverseReleaseRequest,
    ReverseSnapshotRequest,
    VmNameRequest,
)


def _sink(spec: JobSpec) -> FailbackSink:
    """The job's source place written back, with the job's work directory on this agent."""
    return failback_sink_for(spec, work_dir(spec.name))


@activity.defn(name="reverse_snapshot")
@mapped
@beating
@authorized
def reverse_snapshot(req: ReverseSnapshotRequest) -> SnapshotRef:
    """A crash-consistent snapshot of the failed-over VM's disks, incremental from `base` (the last
    committed reverse snapshot's change ids) or from its point."""
    return vm_changes_for(req.spec).snapshot_vm(req.vm, req.snapshot_id, req.base)


@activity.defn(name="reverse_copy")
@mapped
@authorized
def reverse_copy(req: ReverseCopyRequest) -> ReverseCopyResult:
    """Copy one disk of the VM's snapshot into the source's disk in place, resuming from the last
    resume token. The first reverse sync (`since`) also copies where the source changed since the
    failover point; when the source no longer knows where (its change tracking is gone), the disk is
    compared whole (a resync: only what differs is written), never skipped."""
    sink = _sink(req.spec)
    disk = req.snapshot.disk(req.disk)
    whole = [False]
    planned = [0]

    diverged: list[Extent] | None = None
    if req.since is not None:  # read before the disk is opened for writing (which holds its image)
        try:
            diverged = list(sink.diverged(req.disk, req.since))
        except ChangeTrackingLost as e:
            activity.logger.warning(
                "job %s disk %s: comparing the whole disk: %s", req.spec.name, req.disk, e.message
            )
            whole[0], disk = True, disk.model_copy(update={"base_change_id": None})

    def vm_side() -> AbstractContextManager[SourceDisk]:
        if req.export is not None:  # the VM is another agent's (two sites): read across the link
            return nullcontext(exports.remote_source(req.export, req.disk, req.spec))
        return vm_changes_for(req.spec).open_disk(req.snapshot, req.disk)

    def copy(start: int, checkpoint: Checkpoint) -> DiskCopyResult:
        with (
            vm_side() as vm_disk,
            sink.open_disk(req.disk) as original,
            governed(req.spec) as throttle,  # a job on a link: reverse copies take its share too
        ):
            src: SourceDisk = vm_disk if diverged is None else WithDiverged(vm_disk, diverged)
            planned[0] = planned_bytes(src, original, disk, start)
            return run_copy_disk(
                src,
                original,
                disk,
                req.spec.tuning,
                start=start,
                on_checkpoint=checkpoint,
                cancelled=activity.is_cancelled,
                total=planned[0],
                throttle=throttle,
            )

    sync_id = f"reverse-{req.snapshot.snapshot_id}"
    result = resumable_copy(req.spec, sync_id, req.disk, req.snapshot.created_at, copy)
    return ReverseCopyResult(result=result, planned_bytes=planned[0], compared_whole=whole[0])


@activity.defn(name="reverse_release")
@mapped
@beating
@authorized
def reverse_release(req: ReverseReleaseRequest) -> None:
    """Committed: the snapshot's change ids are the next reverse sync's base. Its export to the
    source's agent, if any (two sites), ends."""
    exports.unexport(req.spec, req.snapshot.snapshot_id)
    vm_changes_for(req.spec).release(req.snapshot, req.committed)


@activity.defn(name="reverse_forget")
@mapped
@beating
@authorized
def reverse_forget(req: VmNameRequest) -> None:
    """A failback given up: every snapshot and change id failback made on the VM goes (the next
    failback starts from the VM's point again, which is always right)."""
    vm_changes_for(req.spec).forget(req.name)


@activity.defn(name="failback_cut_over")
@mapped
@beating
@authorized
def failback_cut_over(req: JobRequest) -> None:
    """The VM off and the final reverse sync done: what the reverse syncs wrote becomes the disks the
    source VM starts on (volumes swapped at their devices; written in place: nothing to do)."""
    _sink(req.spec).cut_over()


@activity.defn(name="failback_undo_cut_over")
@mapped
@beating
@authorized
def failback_undo_cut_over(req: JobRequest) -> None:
    _sink(req.spec).undo_cut_over()


@activity.defn(name="failback_cleanup")
@mapped
@beating
@authorized
def failback_cleanup(req: JobRequest) -> None:
    """What the failback made or kept beside the source's disks goes (its failback is over)."""
    _sink(req.spec).cleanup()


@activity.defn(name="power_on_source")
@mapped
@beating
@authorized
def power_on_source(req: JobRequest) -> str:
    """Start the source VM where the product can: '' once started, else why not (a VM the product
    cannot start: its disks are current, it is the operator's to start)."""
    power = source_power(req.spec)
    try:
        power.power_on_vm()
    except VmNotStartable as e:
        return e.message
    return ""


FAILBACK_ACTIVITIES: list[Callable[..., Any]] = [
    reverse_snapshot,
    reverse_copy,
    reverse_release,
    reverse_forget,
    failback_cut_over,
    failback_undo_cut_over,
    failback_cleanup,
    power_on_source,
]
