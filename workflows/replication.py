"""ReplicationWorkflow: one long-lived workflow per replication job.

Seed (full sync), then incremental syncs on the job's interval or on request. Each sync:
create_snapshot -> prepare_target -> copy_disk per disk -> commit_point (and retention) ->
release_snapshot. A failed sync aborts its pending writes and releases its snapshot without
committing, so no point is touched and the next sync diffs from the last committed change ids.
Delete: destroy_target (with purge), then forget_source on the source host; a failed forget is
logged and kept in last_error, and the delete completes all the same.
Deterministic: no I/O, no clocks but workflow.now(), no connector imports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

from workflows.common import SA_STATE, SA_VM, failure_message, failure_type, placement
from workflows.job_recovery import JobRecovery

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from sendense import config, platforms
    from sendense.agents import Located
    from sendense.config import host_of_queue
    from sendense.links import JobPriority
    from sendense.models import (
        AbortRequest,
        BeginResult,
        CarriedState,
        CommitRequest,
        CopyRequest,
        DeleteRequest,
        DiskCopyResult,
        DiskInfo,
        ExportRequest,
        FinishResult,
        JobRequest,
        JobSpec,
        JobStatus,
        PointInfo,
        PrepareRequest,
        ReleaseRequest,
        RemoteExport,
        ReplicationInput,
        Settings,
        SettingsChange,
        SnapshotRef,
        SnapshotRequest,
        SyncNowRequest,
        SyncResult,
        VmInfo,
    )
    from sendense.spec import format_validation_error

    # The platforms' spec models decode JobSpec: load them here, outside the sandbox, so that a
    # workflow never imports a platform's package into its sandbox.
    platforms.load_all()

# workflow.patched ids (each guards a change to the command sequence; histories before it replay)
PATCH_COMBINED_STEPS = "begin-finish-sync"  # begin_sync/finish_sync when source and target queues match
PATCH_INLINE_COPY = "begin-and-copy"  # small syncs copied inside their first task (begin_and_copy)
PATCH_INLINE_FINISH = "begin-copy-finish"  # ... and committed there too when every disk was copied
PATCH_RESNAPSHOT = "resnapshot-at-once"  # a snapshot the source changed under is taken again at once
PATCH_DELETE_LEFTOVERS = "delete-reports-leftovers"  # a failed purge is reported, the delete completes
PATCH_REMOTE_COPY = "remote-copy"  # split: the target's agent pulls the source's export across the link
PATCH_LOCATE = "locate-source"  # a source that can move is looked up before each sync (followed)

RESNAPSHOT_LIMIT = 3  # new snapshots in a row after SnapshotInconsistent, then wait for the interval

SHORT = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30), maximum_attempts=5
)
COPY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=20), maximum_attempts=20
)
SNAPSHOT_TIMEOUT = timedelta(hours=12)  # snapshot steps heartbeat: a dead worker shows much sooner


@dataclass(frozen=True)
class Step:
    """How one activity runs: on which end's queue, for how long at most, retried how, heartbeating."""

    queue: Literal["source", "target"]
    timeout: timedelta
    retry: RetryPolicy = field(default_factory=lambda: SHORT)
    heartbeat: bool = False  # heartbeat timeout: the job's tuning.heartbeat_timeout
    activity: str | None = None  # the activity it runs, when not the step's name


# Every activity of a job, in one table (the activities live in activities/replication.py).
STEPS: dict[str, Step] = {
    "validate_job": Step("source", timedelta(minutes=5)),
    "create_snapshot": Step("source", SNAPSHOT_TIMEOUT, heartbeat=True),  # a cloud snapshot: hours
    "begin_sync": Step("source", SNAPSHOT_TIMEOUT, heartbeat=True),  # create_snapshot + prepare_target
    "begin_and_copy": Step("source", SNAPSHOT_TIMEOUT + timedelta(minutes=53), heartbeat=True),
    "prepare_target": Step("target", timedelta(minutes=3)),
    "copy_disk": Step("source", timedelta(hours=48), retry=COPY, heartbeat=True),
    # two agents: the source's serves the snapshot, the target's copies it across the link
    "export_snapshot": Step("source", timedelta(minutes=5)),
    "copy_remote": Step("target", timedelta(hours=48), retry=COPY, heartbeat=True, activity="copy_disk"),
    # a source reached by API (the control queue's) and a target on an agent: that agent reads by API
    "copy_at_target": Step("target", timedelta(hours=48), retry=COPY, heartbeat=True, activity="copy_disk"),
    "commit_point": Step("target", timedelta(minutes=20)),  # includes pruning (a merge of two points)
    "finish_sync": Step("target", timedelta(minutes=23)),  # commit_point + release_snapshot
    "release_snapshot": Step("source", timedelta(minutes=5)),
    "abort_sync": Step("target", timedelta(minutes=5)),
    "destroy_target": Step("target", timedelta(minutes=30)),
    "forget_source": Step("source", timedelta(minutes=5)),
    # a planned failover's source steps (activities/recovery.py): asked once or twice, in bounded time
    "source_power_state": Step(
        "source", timedelta(minutes=1), retry=RetryPolicy(maximum_attempts=2), heartbeat=True
    ),
    "pause_source": Step("source", timedelta(minutes=15), heartbeat=True),  # a cloud instance: waited for
    "resume_source": Step("source", timedelta(minutes=15), heartbeat=True),
    "power_off_source": Step("source", timedelta(minutes=15), heartbeat=True),
}


@dataclass
class Attempt:
    """One sync as it goes: the snapshot once taken (a failed sync releases it), the disks copied."""

    sync_id: str
    request: SnapshotRequest
    snap: SnapshotRef | None = None
    results: list[DiskCopyResult] = field(default_factory=list)


@workflow.defn(name="ReplicationWorkflow")
class ReplicationWorkflow(JobRecovery):
    def __init__(self) -> None:
        self.inp: ReplicationInput | None = None
        self.st = CarriedState()
        self.state = ""
        self.deleting: DeleteRequest | None = None
        self.current: str | None = None
        self.started_count = 0
        self.outcomes: dict[int, SyncResult | str] = {}
        self.next_sync_at: datetime | None = None
        self.vm: VmInfo | None = None
        self.left_behind: list[str] = []  # what a delete could not remove, said in its result
        self.failing_over = False  # the failover update runs (its child makes the VM)
        self.failing_back = False  # the failback update runs (its child replicates the VM back)
        self.link_signals: list[asyncio.Task[None]] = []  # priority changes on their way to the link

    # ------------------------------------------------------------------ handlers

    @workflow.query
    def status(self) -> JobStatus:
        assert self.inp is not None
        spec = self.inp.spec
        return JobStatus(
            name=spec.name,
            state=self.state or "starting",  # type: ignore[arg-type]
            source=spec.source.describe(),
            target=spec.target.describe(),
            interval_seconds=spec.schedule.interval.total_seconds(),
            retention_points=spec.retention.points,
            syncs=self.st.syncs,
            failures=self.st.failures,
            last_point=self.st.last_point.point_id if self.st.last_point else None,
            last_point_at=self.st.last_point.created_at if self.st.last_point else None,
            last_sync=self.st.last_sync,
            # a paused or deleting job has no next sync (the due time is kept for when it resumes)
            next_sync_at=None if self.st.paused or self.deleting is not None else self.next_sync_at,
            last_error=self.st.last_error,
            last_resync_reason=self.st.last_resync_reason,
            resyncs=self.st.resyncs,
            total_bytes_written=self.st.total_bytes_written,
            current_sync=self.current,
            left_behind=list(self.left_behind),
            last_drill=self.st.last_drill,
            failed_over=self.st.failed_over,
            last_failback=self.st.last_failback,
            priority=spec.priority,
            link=spec.link,
            source_host=None
            if self.inp.source_queue == config.CONTROL_QUEUE
            else host_of_queue(self.inp.source_queue),
            last_move=self.st.last_move,
        )

    @workflow.query
    def get_spec(self) -> JobSpec:
        assert self.inp is not None
        return self.inp.spec

    @workflow.signal
    def pause(self) -> None:
        self.st.paused = True

    @workflow.signal
    def resume(self) -> None:
        self.st.paused = False

    @workflow.signal
    def request_sync(self) -> None:
        self.st.pending_requests += 1

    @workflow.update
    async def sync_now(self, req: SyncNowRequest) -> SyncResult:
        """Start a sync now (or right after the running one) and return its result."""
        self.st.pending_requests += 1
        ticket = self.st.seq + 1
        await workflow.wait_condition(lambda: ticket in self.outcomes or self.deleting is not None)
        outcome = self.outcomes.get(ticket)
        if isinstance(outcome, SyncResult):
            return outcome
        if outcome is None:
            raise ApplicationError("job is being deleted", type="JobDeleted", non_retryable=True)
        raise ApplicationError(outcome, type="SyncFailed", non_retryable=True)

    @sync_now.validator
    def _validate_sync_now(self, req: SyncNowRequest) -> None:
        if self.deleting is not None:
            raise ApplicationError("job is being deleted", type="JobDeleted")
        if self.st.paused:
            raise ApplicationError("job is paused; resume it first", type="JobPaused")
        if self.failing_over or self.st.failed_over is not None:
            raise ApplicationError("job is failed over: its VM runs on the target now", type="FailedOver")

    @workflow.update
    def update_settings(self, settings: SettingsChange) -> JobStatus:
        assert self.inp is not None
        spec = self.inp.spec
        if settings.interval is not None:
            spec.schedule.interval = settings.interval
        if settings.retention_points is not None:
            spec.retention.points = settings.retention_points
        if settings.bandwidth_limit is not None:
            spec.tuning.bandwidth_limit = settings.bandwidth_limit or None
        if settings.priority is not None and settings.priority != spec.priority:
            spec.priority = settings.priority  # type: ignore[assignment]  # (the validator checked it)
            if spec.link is not None:  # copies running now move class too, at their next renewal
                self.link_signals = [t for t in self.link_signals if not t.done()]
                self.link_signals.append(asyncio.create_task(self._tell_link(spec.link, spec.priority)))
        self._reschedule()
        return self.status()

    async def _tell_link(self, link: str, priority: str) -> None:
        """The job's priority changed: its link's governor (workflows.governor) counts the job's
        running copies in the new class (their spec, from when they started, says the old one)."""
        assert self.inp is not None
        try:
            await workflow.get_external_workflow_handle(config.link_workflow_id(link)).signal(
                "job_priority",
                JobPriority(job=self.inp.spec.name, job_id=self.inp.spec.job_id, priority=priority),
            )
        except FailureError as e:  # no governor: the job's next copies carry the new priority anyway
            workflow.logger.warning("link %s: the priority change was not delivered: %s", link, e)

    @update_settings.validator
    def _validate_settings(self, settings: SettingsChange) -> None:
        """Refuse settings the spec would refuse (the SDK can call the update directly): stored, they
        would fail every activity that decodes the spec, or the workflow task itself."""
        assert self.inp is not None
        try:
            Settings.model_validate(settings.model_dump(exclude_none=True))
        except ValidationError as e:
            raise ApplicationError(format_validation_error(e, "settings."), type="InvalidSpec") from None
        try:  # (a job whose stored settings predate these checks must be given valid ones together)
            settings.applied(self.inp.spec)
        except ValidationError as e:
            msg = f"the job's spec with these settings: {format_validation_error(e)}"
            raise ApplicationError(msg, type="InvalidSpec") from None

    @workflow.update
    async def delete(self, req: DeleteRequest) -> None:
        self.deleting = req
        await workflow.wait_condition(lambda: self.state == "deleted")

    # ------------------------------------------------------------------ main loop

    @workflow.run
    async def run(self, inp: ReplicationInput) -> JobStatus:
        self.inp = inp
        self.st = inp.state
        self.outcomes = {}
        spec = inp.spec
        if not self.st.validated:
            self._set_state("starting")
            self.vm = await self._step("validate_job", JobRequest(spec=spec), VmInfo)
            # the VM the job was created for: a source that names it by a name another VM could take
            # refuses another VM under that name in every later step
            spec = inp.spec = spec.model_copy(update={"source": spec.source.pinned(self.vm.vm_id)})
            self.st.vm = self.vm  # (what a VM made from its points looks like: failover)
            self.st.validated = True
            if inp.search_attributes:
                workflow.upsert_search_attributes([SA_VM.value_set(self.vm.name)])
        self._reschedule()
        syncs_this_run = 0
        while self.deleting is None:
            self._set_state(self._resting_state())
            if self._held():  # paused, or failing over / failed over: no syncs
                await workflow.wait_condition(lambda: not self._held() or self.deleting is not None)
                self._reschedule()
                continue
            if self.st.pending_requests == 0:
                delay = self._delay()
                if delay > 0:
                    due = self.next_sync_at
                    try:
                        await workflow.wait_condition(
                            lambda: (
                                self.st.pending_requests > 0
                                or self._held()
                                or self.deleting is not None
                                or self.next_sync_at != due  # noqa: B023
                            ),  # update_settings changed the interval
                            timeout=delay,
                        )
                    except TimeoutError:
                        pass
                    continue  # re-check pause, delete, requests and the (possibly new) due time
            if self._held() or self.deleting is not None:
                continue
            self.st.pending_requests = 0
            await self._sync()
            syncs_this_run += 1
            if (
                syncs_this_run >= inp.max_syncs_per_run or workflow.info().is_continue_as_new_suggested()
            ) and workflow.all_handlers_finished():
                self._set_state("idle")
                workflow.continue_as_new(
                    ReplicationInput(
                        spec=inp.spec,  # (its source may have moved: _follow_source)
                        state=self.st,
                        source_queue=inp.source_queue,
                        target_queue=inp.target_queue,
                        search_attributes=inp.search_attributes,
                        max_syncs_per_run=inp.max_syncs_per_run,
                    )
                )
        self._set_state("deleting")
        if self.deleting.purge:
            try:
                await self._step("destroy_target", JobRequest(spec=inp.spec))
            except ActivityError as e:  # say what stays; the job is deleted all the same
                if not workflow.patched(PATCH_DELETE_LEFTOVERS):
                    raise
                msg = failure_message(e)
                workflow.logger.warning("purging the replicas of job %s failed: %s", spec.name, msg)
                self.left_behind.append(f"replicas: {msg}")
        try:  # the job's bitmaps/checkpoints would otherwise stay on the source, recording every write
            await self._step("forget_source", JobRequest(spec=inp.spec))
        except ActivityError as e:  # a VM that is gone or unreachable must not make the job undeletable
            msg = failure_message(e)
            workflow.logger.warning("removing the change tracking of job %s failed: %s", spec.name, msg)
            self.st.last_error = f"delete: change tracking left on the source: {msg}"
            self.left_behind.append(f"change tracking: {msg}")
        self._set_state("deleted")
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.status()

    # ------------------------------------------------------------------ one sync

    async def _sync(self) -> None:
        """One sync: the sequence of steps its strategy runs (begin, copy, commit), then the story's
        end either way: a point committed and its snapshot released, or the attempt undone."""
        assert self.inp is not None
        await self._follow_source()
        spec = self.inp.spec
        self.st.seq += 1
        seq = self.st.seq
        now = workflow.now()
        sync_id = f"{now:%Y%m%dT%H%M%SZ}-{seq:04d}"
        self.current = sync_id
        self.st.last_sync_started_at = now
        self._set_state("syncing")
        self._reschedule()
        t0 = workflow.now()
        attempt = Attempt(sync_id, SnapshotRequest(spec=spec, snapshot_id=sync_id, base=self.st.base))
        strategy, releases = self._strategy()
        try:
            finished = await strategy(attempt)
        except (ActivityError, ApplicationError) as e:
            await self._failed(attempt, seq, e)
            return
        assert attempt.snap is not None
        self._committed(attempt.snap, finished.point, seq, t0)
        if not releases or finished.release_error is not None:  # (the strategy's last step released it)
            await self._after_commit(attempt.snap)

    async def _follow_source(self) -> None:
        """A source that can move between hosts (a hypervisor's VM, migrated): ask the agent registry
        which agent runs it now, and run this sync's source steps there. Its first sync there has no
        change tracking of ours (it stays with the old host's hypervisor): a resync, said in
        status. Not found (stopped, its agent down) or claimed twice: the last host is kept."""
        assert self.inp is not None
        spec = self.inp.spec
        if spec.source.locator() is None or not workflow.patched(PATCH_LOCATE):
            return
        try:
            found: Located = await workflow.execute_activity(
                "locate_source",
                JobRequest(spec=spec),
                result_type=Located,
                # the control plane's own queue (this workflow's): the worker that runs it asks
                task_queue=workflow.info().task_queue,
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=timedelta(minutes=2),
                retry_policy=RetryPolicy(maximum_attempts=2),
            )
        except ActivityError as e:  # the sync runs where the last one did
            workflow.logger.warning("job %s: locating its source failed: %s", spec.name, failure_message(e))
            return
        was = host_of_queue(self.inp.source_queue)
        if found.host_id is None or found.host_id == was:
            if found.host_id is None:
                workflow.logger.info("job %s: source stays on host %s: %s", spec.name, was, found.why)
            return
        try:
            source = spec.source.moved(found.host_id, found.where)
        except ValueError as e:  # (an address the spec would refuse: the job stays where it was)
            workflow.logger.warning(
                "job %s: not following its source to host %s: %s", spec.name, found.host_id, e
            )
            return
        self.inp.spec = spec.model_copy(update={"source": source})
        target = platforms.get(spec.target.platform)
        if (
            self.inp.target_queue == self.inp.source_queue
            and spec.target.host is None
            and target is not None
            and target.reached_by_api
        ):
            # a cloud target written from the source's agent (platforms.queues) goes with it
            self.inp.target_queue = config.host_queue(found.host_id)
        self.inp.source_queue = config.host_queue(found.host_id)
        self.st.last_move = f"{workflow.now():%Y-%m-%d %H:%M:%S}Z: from host {was} to host {found.host_id}"
        workflow.logger.info("job %s: its source VM moved %s", spec.name, self.st.last_move)

    def _strategy(self) -> tuple[Callable[[Attempt], Awaitable[FinishResult]], bool]:
        """The sequence of steps this sync runs, and whether its last step releases the snapshot too:

        - split (source and target on two queues): create_snapshot, prepare_target, copy_disk per disk,
          commit_point; then release_snapshot;
        - combined (one queue serves both ends): begin_sync, copy_disk per disk, finish_sync;
        - inline (one queue, tuning.inline_copy_bytes > 0): begin_and_copy copies the disks that fit
          and commits when all did; copy_disk for the rest, then finish_sync.

        Each newer sequence came behind a workflow.patched marker, asked here in the order recorded
        histories asked them, so that they replay."""
        assert self.inp is not None
        inp, spec = self.inp, self.inp.spec
        if not (inp.source_queue == inp.target_queue and workflow.patched(PATCH_COMBINED_STEPS)):
            return self._sync_split, False
        if spec.tuning.inline_copy_bytes > 0 and workflow.patched(PATCH_INLINE_COPY):
            finish = workflow.patched(PATCH_INLINE_FINISH)
            return (lambda attempt: self._sync_inline(attempt, finish)), True
        return self._sync_combined, True

    async def _sync_split(self, attempt: Attempt) -> FinishResult:
        attempt.snap = await self._step("create_snapshot", attempt.request, SnapshotRef)
        snap = attempt.snap
        disks = [DiskInfo(key=d.key, size=d.size) for d in snap.disks]
        await self._step(
            "prepare_target", PrepareRequest(spec=self._spec, sync_id=attempt.sync_id, disks=disks)
        )
        export = None
        assert self.inp is not None
        where = placement(self.inp.source_queue, self.inp.target_queue)
        if where == "link":
            if workflow.patched(PATCH_REMOTE_COPY):  # two agents: the target's reads across the link
                export = await self._step(
                    "export_snapshot",
                    ExportRequest(
                        spec=self._spec,
                        sync_id=attempt.sync_id,
                        snapshot=snap,
                        peer_host=host_of_queue(self.inp.target_queue),
                    ),
                    RemoteExport,
                )
        await self._copy_rest(attempt, export, at_target=where == "target")
        point = await self._step("commit_point", self._commit_request(attempt), PointInfo)
        return FinishResult(point=point)

    async def _sync_combined(self, attempt: Attempt) -> FinishResult:
        attempt.snap = await self._step("begin_sync", attempt.request, SnapshotRef)
        await self._copy_rest(attempt)
        return await self._step("finish_sync", self._commit_request(attempt), FinishResult)

    async def _sync_inline(self, attempt: Attempt, finish: bool) -> FinishResult:
        request = attempt.request.model_copy(
            update={"copy_up_to": self._spec.tuning.inline_copy_bytes, "finish": finish}
        )
        begun = await self._step("begin_and_copy", request, BeginResult)
        attempt.snap, attempt.results = begun.snapshot, list(begun.copied)
        if begun.finished is not None:  # every disk fitted: the sync is done in one task
            return begun.finished
        await self._copy_rest(attempt)
        return await self._step("finish_sync", self._commit_request(attempt), FinishResult)

    async def _copy_rest(
        self, attempt: Attempt, export: RemoteExport | None = None, at_target: bool = False
    ) -> None:
        """copy_disk for each disk of the snapshot not copied yet, in order: on the source's agent; or
        on the target's, with an export (reading the source across the link) or, for a source reached
        by API, without (`at_target`)."""
        assert attempt.snap is not None
        for d in attempt.snap.disks[len(attempt.results) :]:
            # the snapshot with this disk only: a copy reads one disk, and n copies of every disk's
            # handles would make a sync's history grow with the square of the disk count
            one = attempt.snap.model_copy(update={"disks": [d]})
            req = CopyRequest(
                spec=self._spec, sync_id=attempt.sync_id, snapshot=one, disk=d.key, export=export
            )
            step = "copy_remote" if export is not None else "copy_at_target" if at_target else "copy_disk"
            attempt.results.append(await self._step(step, req, DiskCopyResult))

    def _commit_request(self, attempt: Attempt) -> CommitRequest:
        assert attempt.snap is not None
        spec = self._spec
        return CommitRequest(
            spec=spec,
            sync_id=attempt.sync_id,
            snapshot=attempt.snap,
            results=attempt.results,
            keep=spec.retention.points,
        )

    def _committed(self, snap: SnapshotRef, point: PointInfo, seq: int, t0: datetime) -> None:
        """The job's state after a committed point: the next sync diffs from it."""
        self.st.inconsistent_in_row = 0
        self.st.base = {d.key: d.change_id for d in snap.disks}
        self.st.last_point = point
        self.st.syncs += 1
        self.st.last_error = None
        resync = [f"{d.key}: {d.tracking_lost}" for d in snap.disks if d.tracking_lost]
        if point.kind == "resync":
            self.st.resyncs += 1
            self.st.last_resync_reason = "; ".join(resync) or "no change tracking for the existing replica"
        self.st.total_bytes_written += point.stats.bytes_written
        result = SyncResult(
            point_id=point.point_id,
            kind=point.kind,
            bytes_read=point.stats.bytes_read,
            bytes_written=point.stats.bytes_written,
            bytes_zeroed=point.stats.bytes_zeroed,
            bytes_skipped=point.stats.bytes_skipped,
            bytes_on_wire=point.stats.bytes_on_wire if self._remote() else None,
            seconds=(workflow.now() - t0).total_seconds(),
            created_at=point.created_at,
            resync_reason=self.st.last_resync_reason if point.kind == "resync" else None,
            notes=list(snap.notes),
        )
        self.st.last_sync = result
        self.outcomes[seq] = result
        self.current = None

    async def _failed(self, attempt: Attempt, seq: int, e: BaseException) -> None:
        """A failed sync: say why, undo the attempt (abort the target's writes, release the snapshot),
        and take a new snapshot at once when the source changed under this one."""
        msg = failure_message(e)
        workflow.logger.warning("sync %s of job %s failed: %s", attempt.sync_id, self._spec.name, msg)
        self.st.failures += 1
        self.st.last_error = f"sync {attempt.sync_id}: {msg}"
        self.outcomes[seq] = msg
        await self._cleanup_failed(attempt.sync_id, attempt.snap)
        self.current = None
        if failure_type(e) == "SnapshotInconsistent" and workflow.patched(PATCH_RESNAPSHOT):
            # the source changed under the snapshot (a stopped disk written after it): retrying
            # the copy cannot help, a new snapshot can; take one now, a few times in a row
            self.st.inconsistent_in_row += 1
            if self.st.inconsistent_in_row <= RESNAPSHOT_LIMIT:
                self.st.pending_requests += 1

    async def _after_commit(self, snap: SnapshotRef) -> None:
        try:
            await self._step(
                "release_snapshot", ReleaseRequest(spec=self._spec, snapshot=snap, committed=True)
            )
        except ActivityError as e:  # the point is committed; housekeeping is retried after the next sync
            workflow.logger.warning("housekeeping after %s failed: %s", snap.snapshot_id, failure_message(e))

    async def _cleanup_failed(self, sync_id: str, snap: SnapshotRef | None) -> None:
        try:
            await self._step("abort_sync", AbortRequest(spec=self._spec, sync_id=sync_id))
        except ActivityError as e:
            workflow.logger.warning("abort of %s failed: %s", sync_id, failure_message(e))
        if snap is None:
            return
        try:  # independent of the abort: a leaked source snapshot would block the next sync
            await self._step(
                "release_snapshot", ReleaseRequest(spec=self._spec, snapshot=snap, committed=False)
            )
        except ActivityError as e:
            workflow.logger.warning("release of %s failed: %s", snap.snapshot_id, failure_message(e))

    # ------------------------------------------------------------------ steps

    @property
    def _spec(self) -> JobSpec:
        assert self.inp is not None
        return self.inp.spec

    async def _step(self, name: str, arg: Any, result_type: type | None = None) -> Any:
        """Run activity `name` as STEPS says: on its end's queue, with its timeout, retries and heartbeat."""
        assert self.inp is not None
        step = STEPS[name]
        return await workflow.execute_activity(
            step.activity or name,
            arg,
            result_type=result_type,
            task_queue=self.inp.source_queue if step.queue == "source" else self.inp.target_queue,
            start_to_close_timeout=step.timeout,
            heartbeat_timeout=self._spec.tuning.heartbeat_timeout if step.heartbeat else None,
            retry_policy=step.retry,
        )

    # ------------------------------------------------------------------ helpers

    def _remote(self) -> bool:
        """Source and target on two agents: syncs read across the link between them."""
        return self.inp is not None and placement(self.inp.source_queue, self.inp.target_queue) == "link"

    def _delay(self) -> float:
        if self.next_sync_at is None:
            return 0.0
        return max(0.0, (self.next_sync_at - workflow.now()).total_seconds())

    def _reschedule(self) -> None:
        assert self.inp is not None
        if self.st.last_sync_started_at is None:
            self.next_sync_at = workflow.now()
        else:
            self.next_sync_at = self.st.last_sync_started_at + self.inp.spec.schedule.interval

    def _held(self) -> bool:
        """No syncs: paused, failing over, failed over or failing back."""
        return self.st.paused or self.failing_over or self.failing_back or self.st.failed_over is not None

    def _resting_state(self) -> str:
        if self.failing_over:
            return "failing-over"
        if self.failing_back:
            return "failing-back"
        if self.st.failed_over is not None:
            return "failed-over"
        return "paused" if self.st.paused else ("error" if self.st.last_error else "idle")

    def _set_state(self, state: str) -> None:
        assert self.inp is not None
        if state == self.state:
            return
        self.state = state
        if self.inp.search_attributes:
            workflow.upsert_search_attributes([SA_STATE.value_set(state)])
        lp = self.st.last_point
        workflow.set_current_details(
            f"**{state}** · syncs {self.st.syncs} · failures {self.st.failures}"
            + (f" · last point `{lp.point_id}` ({lp.kind})" if lp else "")
            + (f"\n\nlast error: {self.st.last_error}" if self.st.last_error else "")
        )
