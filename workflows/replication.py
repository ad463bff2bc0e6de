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

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from sendense import platforms
    from sendense.models import (
        AbortRequest,
        BeginResult,
        CarriedState,
        CommitRequest,
        CopyRequest,
        DeleteRequest,
        DiskCopyResult,
        DiskInfo,
        FinishResult,
        JobRequest,
        JobSpec,
        JobStatus,
        PointInfo,
        PrepareRequest,
        ReleaseRequest,
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

SA_JOB = SearchAttributeKey.for_keyword("SendenseJob")
SA_SOURCE = SearchAttributeKey.for_keyword("SendenseSource")
SA_TARGET = SearchAttributeKey.for_keyword("SendenseTarget")
SA_VM = SearchAttributeKey.for_keyword("SendenseVm")
SA_STATE = SearchAttributeKey.for_keyword("SendenseState")

# workflow.patched ids (each guards a change to the command sequence; histories before it replay)
PATCH_COMBINED_STEPS = "begin-finish-sync"  # begin_sync/finish_sync when source and target queues match
PATCH_INLINE_COPY = "begin-and-copy"  # small syncs copied inside their first task (begin_and_copy)
PATCH_INLINE_FINISH = "begin-copy-finish"  # ... and committed there too when every disk was copied
PATCH_RESNAPSHOT = "resnapshot-at-once"  # a snapshot the source changed under is taken again at once
PATCH_DELETE_LEFTOVERS = "delete-reports-leftovers"  # a failed purge is reported, the delete completes

RESNAPSHOT_LIMIT = 3  # new snapshots in a row after SnapshotInconsistent, then wait for the interval

SNAPSHOT_TIMEOUT = timedelta(hours=12)  # snapshot steps heartbeat: a dead worker shows much sooner
SHORT = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30), maximum_attempts=5
)
COPY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=20), maximum_attempts=20
)


def failure_type(e: BaseException) -> str | None:
    """The root cause's ApplicationError type (the connector error's kind), if any."""
    cause: BaseException | None = e
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    return cause.type if isinstance(cause, ApplicationError) else None


def failure_message(e: BaseException) -> str:
    """The root cause's one-line message (activity failures wrap it)."""
    cause: BaseException | None = e
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, FailureError):
        return cause.message
    return str(cause)


@workflow.defn(name="ReplicationWorkflow")
class ReplicationWorkflow:
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
        self._reschedule()
        return self.status()

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
            self.vm = await workflow.execute_activity(
                "validate_job",
                JobRequest(spec=spec),
                result_type=VmInfo,
                task_queue=inp.source_queue,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=SHORT,
            )
            self.st.validated = True
            if inp.search_attributes:
                workflow.upsert_search_attributes([SA_VM.value_set(self.vm.name)])
        self._reschedule()
        syncs_this_run = 0
        while self.deleting is None:
            self._set_state("paused" if self.st.paused else ("error" if self.st.last_error else "idle"))
            if self.st.paused:
                await workflow.wait_condition(lambda: not self.st.paused or self.deleting is not None)
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
                                or self.st.paused
                                or self.deleting is not None
                                or self.next_sync_at != due  # noqa: B023
                            ),  # update_settings changed the interval
                            timeout=delay,
                        )
                    except TimeoutError:
                        pass
                    continue  # re-check pause, delete, requests and the (possibly new) due time
            if self.st.paused or self.deleting is not None:
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
                        spec=spec,
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
                await workflow.execute_activity(
                    "destroy_target",
                    JobRequest(spec=spec),
                    task_queue=inp.target_queue,
                    start_to_close_timeout=timedelta(minutes=30),
                    retry_policy=SHORT,
                )
            except ActivityError as e:  # say what stays; the job is deleted all the same
                if not workflow.patched(PATCH_DELETE_LEFTOVERS):
                    raise
                msg = failure_message(e)
                workflow.logger.warning("purging the replicas of job %s failed: %s", spec.name, msg)
                self.left_behind.append(f"replicas: {msg}")
        try:  # the job's bitmaps/checkpoints would otherwise stay on the source, recording every write
            await workflow.execute_activity(
                "forget_source",
                JobRequest(spec=spec),
                task_queue=inp.source_queue,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=SHORT,
            )
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
        assert self.inp is not None
        inp, spec = self.inp, self.inp.spec
        self.st.seq += 1
        seq = self.st.seq
        now = workflow.now()
        sync_id = f"{now:%Y%m%dT%H%M%SZ}-{seq:04d}"
        self.current = sync_id
        self.st.last_sync_started_at = now
        self._set_state("syncing")
        self._reschedule()
        t0 = workflow.now()
        snap: SnapshotRef | None = None
        # One host serves both ends: snapshot+prepare and commit+release run as one task each.
        combined = inp.source_queue == inp.target_queue and workflow.patched(PATCH_COMBINED_STEPS)
        # ... and a small sync is copied inside that first task too (the disks that fit, in order)
        inline = combined and spec.tuning.inline_copy_bytes > 0 and workflow.patched(PATCH_INLINE_COPY)
        release_error: str | None = None
        results: list[DiskCopyResult] = []
        finished: FinishResult | None = None
        try:
            request = SnapshotRequest(spec=spec, snapshot_id=sync_id, base=self.st.base)
            if inline:
                copy_up_to, finish = spec.tuning.inline_copy_bytes, workflow.patched(PATCH_INLINE_FINISH)
                begun = await workflow.execute_activity(
                    "begin_and_copy",
                    request.model_copy(update={"copy_up_to": copy_up_to, "finish": finish}),
                    result_type=BeginResult,
                    task_queue=inp.source_queue,
                    start_to_close_timeout=SNAPSHOT_TIMEOUT + timedelta(minutes=53 if finish else 30),
                    heartbeat_timeout=spec.tuning.heartbeat_timeout,
                    retry_policy=SHORT,
                )
                snap, results, finished = begun.snapshot, list(begun.copied), begun.finished
            else:
                snap = await workflow.execute_activity(
                    "begin_sync" if combined else "create_snapshot",  # begin_sync also prepares the target
                    request,
                    result_type=SnapshotRef,
                    task_queue=inp.source_queue,
                    start_to_close_timeout=SNAPSHOT_TIMEOUT,  # a cloud snapshot may take hours
                    heartbeat_timeout=spec.tuning.heartbeat_timeout,
                    retry_policy=SHORT,
                )
            if not combined:
                await self._prepare(sync_id, snap)
            for d in snap.disks[len(results) :]:
                results.append(
                    await workflow.execute_activity(
                        "copy_disk",
                        CopyRequest(spec=spec, sync_id=sync_id, snapshot=snap, disk=d.key),
                        result_type=DiskCopyResult,
                        task_queue=inp.source_queue,
                        start_to_close_timeout=timedelta(hours=48),
                        heartbeat_timeout=spec.tuning.heartbeat_timeout,
                        retry_policy=COPY,
                    )
                )
            commit = CommitRequest(
                spec=spec, sync_id=sync_id, snapshot=snap, results=results, keep=spec.retention.points
            )
            if finished is None and combined:  # (begin_and_copy may have finished it already)
                finished = await workflow.execute_activity(
                    "finish_sync",
                    commit,
                    result_type=FinishResult,
                    task_queue=inp.target_queue,
                    start_to_close_timeout=timedelta(minutes=23),  # includes pruning (qemu-img commit)
                    retry_policy=SHORT,
                )
            if finished is not None:
                point, release_error = finished.point, finished.release_error
            else:
                point = await workflow.execute_activity(
                    "commit_point",
                    commit,
                    result_type=PointInfo,
                    task_queue=inp.target_queue,
                    start_to_close_timeout=timedelta(minutes=20),  # includes pruning (qemu-img commit)
                    retry_policy=SHORT,
                )
        except (ActivityError, ApplicationError) as e:
            msg = failure_message(e)
            workflow.logger.warning("sync %s of job %s failed: %s", sync_id, spec.name, msg)
            self.st.failures += 1
            self.st.last_error = f"sync {sync_id}: {msg}"
            self.outcomes[seq] = msg
            await self._cleanup_failed(sync_id, snap)
            self.current = None
            if failure_type(e) == "SnapshotInconsistent" and workflow.patched(PATCH_RESNAPSHOT):
                # the source changed under the snapshot (a stopped disk written after it): retrying
                # the copy cannot help, a new snapshot can; take one now, a few times in a row
                self.st.inconsistent_in_row += 1
                if self.st.inconsistent_in_row <= RESNAPSHOT_LIMIT:
                    self.st.pending_requests += 1
            return
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
            seconds=(workflow.now() - t0).total_seconds(),
            created_at=point.created_at,
            resync_reason=self.st.last_resync_reason if point.kind == "resync" else None,
        )
        self.st.last_sync = result
        self.outcomes[seq] = result
        self.current = None
        if not combined or release_error is not None:  # finish_sync released it, unless that failed
            await self._after_commit(snap)

    async def _prepare(self, sync_id: str, snap: SnapshotRef) -> None:
        assert self.inp is not None
        inp, spec = self.inp, self.inp.spec
        await workflow.execute_activity(
            "prepare_target",
            PrepareRequest(
                spec=spec, sync_id=sync_id, disks=[DiskInfo(key=d.key, size=d.size) for d in snap.disks]
            ),
            task_queue=inp.target_queue,
            start_to_close_timeout=timedelta(minutes=3),
            retry_policy=SHORT,
        )

    async def _after_commit(self, snap: SnapshotRef) -> None:
        assert self.inp is not None
        inp, spec = self.inp, self.inp.spec
        try:
            await workflow.execute_activity(
                "release_snapshot",
                ReleaseRequest(spec=spec, snapshot=snap, committed=True),
                task_queue=inp.source_queue,
                start_to_close_timeout=timedelta(minutes=3),
                retry_policy=SHORT,
            )
        except ActivityError as e:  # the point is committed; housekeeping is retried after the next sync
            workflow.logger.warning("housekeeping after %s failed: %s", snap.snapshot_id, failure_message(e))

    async def _cleanup_failed(self, sync_id: str, snap: SnapshotRef | None) -> None:
        assert self.inp is not None
        inp, spec = self.inp, self.inp.spec
        try:
            await workflow.execute_activity(
                "abort_sync",
                AbortRequest(spec=spec, sync_id=sync_id),
                task_queue=inp.target_queue,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=SHORT,
            )
        except ActivityError as e:
            workflow.logger.warning("abort of %s failed: %s", sync_id, failure_message(e))
        if snap is None:
            return
        try:  # independent of the abort: a leaked source snapshot would block the next sync
            await workflow.execute_activity(
                "release_snapshot",
                ReleaseRequest(spec=spec, snapshot=snap, committed=False),
                task_queue=inp.source_queue,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=SHORT,
            )
        except ActivityError as e:
            workflow.logger.warning("release of %s failed: %s", snap.snapshot_id, failure_message(e))

    # ------------------------------------------------------------------ helpers

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
