"""Replication activities: thin wrappers that call connectors and the data path.

All are synchronous (blocking SDKs, subprocesses, libnbd) and run on the worker's thread pool.
Activities that touch a host's disks are routed by the workflow to that host's task queue.
"""

from __future__ import annotations

import contextvars
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio import activity

from activities import exports
from activities.errors import mapped, to_application_error
from activities.guard import authorized
from activities.leases import governed
from sendense import policy
from sendense.datapath.sync import Checkpoint, planned_bytes
from sendense.datapath.sync import copy_disk as run_copy_disk
from sendense.errors import InvalidSpec, SendenseError
from sendense.models import (
    MAX_DISKS,
    AbortRequest,
    BeginResult,
    CommitRequest,
    CopyRequest,
    CopyStats,
    CopyToken,
    DiskCopyResult,
    DiskInfo,
    FinishResult,
    JobRequest,
    JobSpec,
    PointDisk,
    PointInfo,
    PrepareRequest,
    PruneRequest,
    PruneResult,
    ReleaseRequest,
    SnapshotRef,
    SnapshotRequest,
    VmInfo,
)
from sendense.platforms import source_for, target_for
from sendense.private import work_dir, write_atomic
from sendense.protocols import SourceDisk

log = logging.getLogger(__name__)


@activity.defn(name="validate_job")
@mapped
@authorized
def validate_job(req: JobRequest) -> VmInfo:
    src = source_for(req.spec, work_dir(req.spec.name))
    src.validate()
    if policy.is_local(req.spec.target):  # (another agent's target: prepare_target there checks it)
        target_for(req.spec).validate()
    vm = src.discover()
    _refuse_too_many_disks(req.spec, len(vm.disks))
    return vm


def _refuse_too_many_disks(spec: JobSpec, count: int) -> None:
    """A VM found with more disks than a spec may list (a running VM's are discovered, not listed)
    is refused: its snapshot, copy and commit payloads would outgrow what Temporal carries."""
    if count > MAX_DISKS:
        raise InvalidSpec(
            f"source {spec.source.describe()}: the VM has {count} disks; at most {MAX_DISKS} per VM"
        )


HEARTBEAT_EVERY = 1.0  # seconds between copy heartbeats (progress, cancellation, liveness)


@activity.defn(name="create_snapshot")
@mapped
@authorized
def create_snapshot(req: SnapshotRequest) -> SnapshotRef:
    """Heartbeats while it runs: a cloud snapshot may take long to complete (a cloud's first snapshot
    of a large volume: hours), and a dead worker must still be noticed after the heartbeat timeout."""
    with heartbeating(HEARTBEAT_EVERY * 5):
        return _create_snapshot(req)


def _create_snapshot(req: SnapshotRequest) -> SnapshotRef:
    src = source_for(req.spec, work_dir(req.spec.name))
    snap = src.create_snapshot(req.snapshot_id, req.base)
    with _released_on_error(req, snap, "snapshot"):  # (a disk added since the job was validated)
        _refuse_too_many_disks(req.spec, len(snap.disks))
    for d in snap.disks:
        if d.tracking_lost:
            activity.logger.warning(
                "job %s disk %s: change tracking lost: %s", req.spec.name, d.key, d.tracking_lost
            )
    return snap


@activity.defn(name="prepare_target")
@mapped
@authorized
def prepare_target(req: PrepareRequest) -> None:
    target_for(req.spec).prepare(req.sync_id, req.disks)


def _release(req: ReleaseRequest) -> None:
    exports.unexport(req.spec, req.snapshot.snapshot_id)  # (a sync read across a link: its export ends)
    source_for(req.spec, work_dir(req.spec.name)).release_snapshot(req.snapshot, req.committed)
    # no copy of a released snapshot resumes: the resume tokens a failed sync's copies left are dead
    for dead in (work_dir(req.spec.name) / "tokens").glob(f"{req.snapshot.snapshot_id}-*.json"):
        dead.unlink(missing_ok=True)


@activity.defn(name="begin_sync")
@mapped
@authorized
def begin_sync(req: SnapshotRequest) -> SnapshotRef:
    """create_snapshot, then prepare_target, in one task: the workflow uses it when the source and
    the target are served by the same host queue. If the target cannot be prepared, the snapshot is
    released uncommitted before the error goes up, so a failed begin leaves nothing behind.
    Heartbeats while it runs, as create_snapshot does."""
    with heartbeating(HEARTBEAT_EVERY * 5):
        return _begin(req)


def _begin(req: SnapshotRequest) -> SnapshotRef:
    snap = _create_snapshot(req)
    # a new snapshot: resume tokens an earlier attempt of this sync left belong to another one
    for stale in (work_dir(req.spec.name) / "tokens").glob(f"{req.snapshot_id}-*.json"):
        stale.unlink(missing_ok=True)
    with _released_on_error(req, snap, "prepare"):
        disks = [DiskInfo(key=d.key, size=d.size) for d in snap.disks]
        target_for(req.spec).prepare(req.snapshot_id, disks)
    return snap


@activity.defn(name="begin_and_copy")
@mapped
@authorized
def begin_and_copy(req: SnapshotRequest) -> BeginResult:
    """begin_sync, then the copy of the first disks whose changes fit in `req.copy_up_to` bytes in all,
    inside this task: a small sync needs no copy_disk task (one activity and one workflow task less
    per sync, the bulk of a small sync's control-plane cost). The disks that do not fit are left to
    copy_disk, with its heartbeats and resume tokens. A failed inline copy releases the snapshot
    uncommitted, as a failed prepare does. Heartbeats every HEARTBEAT_EVERY * 5 while it runs, so a
    dead worker is noticed after the job's heartbeat timeout rather than the task's long timeout.

    With `req.finish`, a sync whose disks were all copied is also committed and its snapshot released
    (finish_sync), so the whole sync is one task. Once every disk is copied (and flushed) the snapshot
    and the copy results are kept in a local record: a retry of this task (the worker died while
    committing, or before its result reached the server) finds it and goes straight to the commit,
    which is idempotent, never copying into a replica that may already be a committed point.
    """
    record = work_dir(req.spec.name) / "finishing" / f"{req.snapshot_id}.json"
    if req.finish:
        done = _finished_before(req, record)
        if done is not None:
            return done
    with heartbeating(HEARTBEAT_EVERY * 5):
        snap = _begin(req)
        copied: list[DiskCopyResult] = []
        with _released_on_error(req, snap, "inline copy"):
            budget = req.copy_up_to
            src, tgt = source_for(req.spec, work_dir(req.spec.name)), target_for(req.spec)
            for d in snap.disks:
                with src.open_disk(snap, d.key) as sd, tgt.open_disk(req.snapshot_id, d.key) as td:
                    need = planned_bytes(sd, td, d)
                    if need > budget:
                        break
                    with governed(req.spec) as throttle:  # (a job on a link: its share of the link)
                        copied.append(
                            run_copy_disk(
                                sd,
                                td,
                                d,
                                req.spec.tuning,
                                total=need,
                                cancelled=activity.is_cancelled,
                                throttle=throttle,
                            )
                        )
                    budget -= need
        begun = BeginResult(snapshot=snap, copied=copied)
        if not req.finish or len(copied) < len(snap.disks):
            return begun
        record.parent.mkdir(parents=True, exist_ok=True)
        for stale in record.parent.glob("*.json"):  # records of earlier syncs of this job
            stale.unlink(missing_ok=True)
        write_atomic(record, begun.model_dump_json())
        begun.finished = _finish(_commit_request(req, begun))
    return begun


def _finished_before(req: SnapshotRequest, record: Path) -> BeginResult | None:
    """The sync an earlier attempt of this task copied in full, committed (again: commit is idempotent)
    and released; None if no attempt got that far."""
    try:
        begun = BeginResult.model_validate_json(record.read_text())
    except (OSError, ValueError):
        return None
    activity.logger.info(
        "sync %s of job %s: committing what an earlier attempt copied", req.snapshot_id, req.spec.name
    )
    begun.finished = _finish(_commit_request(req, begun))
    return begun


def _commit_request(req: SnapshotRequest, begun: BeginResult) -> CommitRequest:
    return CommitRequest(
        spec=req.spec,
        sync_id=req.snapshot_id,
        snapshot=begun.snapshot,
        results=begun.copied,
        keep=req.spec.retention.points,
    )


@contextmanager
def _released_on_error(req: SnapshotRequest, snap: SnapshotRef, step: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        try:
            _release(ReleaseRequest(spec=req.spec, snapshot=snap, committed=False))
        except Exception as e:  # noqa: BLE001 - the step's error is the one to report
            activity.logger.warning("release of %s after a failed %s failed: %s", req.snapshot_id, step, e)
        raise


@contextmanager
def heartbeating(every: float) -> Iterator[None]:
    """Heartbeat from a side thread while the block runs (a task with several steps and no natural
    checkpoint); nothing is sent for a block shorter than `every`. At least three beats per heartbeat
    timeout of the activity, whatever `every` says (a job's timeout may be as short as 1 s)."""
    timeout = activity.info().heartbeat_timeout if activity.in_activity() else None
    if timeout is not None and timeout.total_seconds() > 0:
        every = min(every, timeout.total_seconds() / 3)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every):
            activity.heartbeat()

    # the activity's context (a context variable) goes with the thread, so heartbeat() finds it
    t = threading.Thread(target=contextvars.copy_context().run, args=(tick,), daemon=True, name="heartbeat")
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


@activity.defn(name="copy_disk")
@mapped
@authorized
def copy_disk(req: CopyRequest) -> DiskCopyResult:
    """Copy one disk of a snapshot into the sync's replica, resuming from the last resume token
    (`resumable_copy`)."""
    tgt = target_for(req.spec)
    disk = req.snapshot.disk(req.disk)

    def source() -> AbstractContextManager[SourceDisk]:
        if req.export is not None:  # the source is another agent's: read across the link
            return nullcontext(exports.remote_source(req.export, req.disk, req.spec))
        return source_for(req.spec, work_dir(req.spec.name)).open_disk(req.snapshot, req.disk)

    def copy(start: int, checkpoint: Checkpoint) -> DiskCopyResult:
        with (
            source() as sd,
            tgt.open_disk(req.sync_id, req.disk) as td,
            governed(req.spec) as throttle,  # a job on a link: its share of the link (None: none)
        ):
            return run_copy_disk(
                sd,
                td,
                disk,
                req.spec.tuning,
                start=start,
                on_checkpoint=checkpoint,
                cancelled=activity.is_cancelled,
                throttle=throttle,
            )

    return resumable_copy(req.spec, req.sync_id, req.disk, req.snapshot.created_at, copy)


def resumable_copy(
    spec: JobSpec,
    sync_id: str,
    key: str,
    snapshot_at: datetime,
    copy: Callable[[int, Checkpoint], DiskCopyResult],
) -> DiskCopyResult:
    """Run `copy(start, checkpoint)` for disk `key` of sync `sync_id`, from the last resume token.

    The token (everything below `offset` is on the target and flushed) is kept in a local file at
    every checkpoint, and heartbeated at most every HEARTBEAT_EVERY, never at the copy's last
    checkpoint (the result follows at once; a small sync's copy then heartbeats not at all): each
    call costs the copy ~1 ms of GIL for the payload conversion, the first one of an attempt a server
    round trip. A retry of the activity runs on the same host queue, so the local token bounds what
    is copied again to one checkpoint.
    """
    start = 0
    carried = CopyStats()
    tokens = [CopyToken.model_validate(d) for d in activity.info().heartbeat_details[:1]]
    store = work_dir(spec.name) / "tokens" / f"{sync_id}-{key}.json"
    try:
        tokens.append(CopyToken.model_validate_json(store.read_text()))
    except (OSError, ValueError):
        pass
    valid = [
        t
        for t in tokens
        if t.sync_id == sync_id
        and t.disk == key
        and t.snapshot_at in (None, snapshot_at)  # None: a token of an older worker
    ]
    if valid:
        best = max(valid, key=lambda t: t.offset)
        start, carried = best.offset, best.stats
        activity.logger.info("resuming disk %s of %s at offset %d", key, sync_id, start)
    store.parent.mkdir(parents=True, exist_ok=True)
    for stale in store.parent.glob("*.json"):  # tokens of abandoned syncs of this job
        if not stale.name.startswith(f"{sync_id}-"):
            stale.unlink(missing_ok=True)

    last_beat = [float("-inf")]

    def checkpoint(offset: int, done: int, total: int, stats: CopyStats) -> None:
        merged = carried.model_copy()
        merged.add(stats)
        token = CopyToken(
            sync_id=sync_id,
            disk=key,
            offset=max(offset, start),
            stats=merged,
            snapshot_at=snapshot_at,
        )
        token.done, token.total = done, total
        write_atomic(store, token.model_dump_json())
        now = time.monotonic()
        if now - last_beat[0] >= HEARTBEAT_EVERY and done < total:  # the last one: the result follows
            last_beat[0] = now
            activity.heartbeat(token)

    result = copy(start, checkpoint)
    result.stats.add(carried)
    store.unlink(missing_ok=True)
    return result


@activity.defn(name="commit_point")
@mapped
@authorized
def commit_point(req: CommitRequest) -> PointInfo:
    return _commit(req)


def _commit(req: CommitRequest) -> PointInfo:
    stats = CopyStats()
    for r in req.results:
        stats.add(r.stats)
    kinds = {r.kind for r in req.results}
    kind = "resync" if "resync" in kinds else "full" if kinds == {"full"} else "incremental"
    point = PointInfo(
        point_id=req.sync_id,
        job=req.spec.name,
        created_at=req.snapshot.created_at,
        committed_at=datetime.now(UTC),
        kind=kind,  # type: ignore[arg-type]
        disks=[PointDisk(key=d.key, size=d.size, change_id=d.change_id) for d in req.snapshot.disks],
        stats=stats,
    )
    target = target_for(req.spec)
    committed = target.commit(req.sync_id, point)
    if req.keep is not None:  # retention in the same activity: one task less per sync
        try:
            removed = target.prune(req.keep)
            if removed:
                activity.logger.info("job %s: pruned %s", req.spec.name, ", ".join(removed))
        except SendenseError as e:  # the point is committed; the next commit prunes again
            activity.logger.warning("job %s: pruning failed: %s", req.spec.name, e.message)
    return committed


@activity.defn(name="release_snapshot")
@mapped
@authorized
def release_snapshot(req: ReleaseRequest) -> None:
    _release(req)


@activity.defn(name="finish_sync")
@mapped
@authorized
def finish_sync(req: CommitRequest) -> FinishResult:
    """commit_point (with retention), then release_snapshot(committed), in one task (same host queue).
    A failed release is returned, not raised: the point is committed either way, and the workflow
    then runs release_snapshot by itself with its retries."""
    return _finish(req)


def _finish(req: CommitRequest) -> FinishResult:
    return _release_committed(req.spec, req.snapshot, _commit(req))


def _release_committed(spec: JobSpec, snap: SnapshotRef, point: PointInfo) -> FinishResult:
    try:
        _release(ReleaseRequest(spec=spec, snapshot=snap, committed=True))
    except Exception as e:  # noqa: BLE001 - whatever it was, the point stands
        err = to_application_error(e)
        activity.logger.warning("release of %s failed: %s", snap.snapshot_id, err)
        return FinishResult(point=point, release_error=str(err))
    return FinishResult(point=point)


@activity.defn(name="abort_sync")
@mapped
@authorized
def abort_sync(req: AbortRequest) -> None:
    target_for(req.spec).abort(req.sync_id)


@activity.defn(name="prune_points")
@mapped
@authorized
def prune_points(req: PruneRequest) -> PruneResult:
    return PruneResult(removed=target_for(req.spec).prune(req.keep))


@activity.defn(name="destroy_target")
@mapped
@authorized
def destroy_target(req: JobRequest) -> None:
    target_for(req.spec).destroy()


@activity.defn(name="forget_source")
@mapped
@authorized
def forget_source(req: JobRequest) -> None:
    """The job is deleted: remove its change tracking from the source, then its local work files."""
    source_for(req.spec, work_dir(req.spec.name)).forget()
    shutil.rmtree(work_dir(req.spec.name))


HOST_ACTIVITIES: list[Callable[..., Any]] = [
    validate_job,
    exports.export_snapshot,
    create_snapshot,
    prepare_target,
    begin_sync,
    begin_and_copy,
    copy_disk,
    commit_point,
    release_snapshot,
    finish_sync,
    abort_sync,
    prune_points,
    destroy_target,
    forget_source,
]
