"""ReplicationWorkflow with the REAL activities (activities.replication.HOST_ACTIVITIES) on the memory
platform, under the time-skipping test server.

Nothing is faked: the activities make the memory platform's connectors through the registry, the data
path copies real bytes between its stores, and faults are injected through the store's test API
(connectors.memory.faults). Each test writes to the VM as its guest would, keeping a shadow of every
disk (tests/contract/shadow.py); every point is exported and compared with the shadow of its instant.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from contract.shadow import Shadow
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities import exports
from activities.failback import FAILBACK_ACTIVITIES
from activities.plans import PLAN_ACTIVITIES, JobOperations
from activities.recovery import RECOVERY_ACTIVITIES
from activities.replication import HOST_ACTIVITIES
from connectors.memory.spec import MemorySource, MemoryTarget
from connectors.memory.store import Store
from sendense import config
from sendense.errors import TargetError
from sendense.models import (
    DeleteRequest,
    JobSpec,
    JobStatus,
    ReplicationInput,
    Retention,
    Schedule,
    SyncNowRequest,
    SyncResult,
    Tuning,
)
from sendense.platforms import target_for
from tools import certs
from workflows.drill import DrillWorkflow
from workflows.failback import FailbackWorkflow
from workflows.failover import FailoverWorkflow
from workflows.plan import PlanDrillWorkflow, PlanFailbackWorkflow, PlanFailoverWorkflow
from workflows.replication import ReplicationWorkflow

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB  # the source's change tracking granularity in these tests
SIZES = {"disk0": 8 * MiB, "disk1": 2 * MiB + 4 * KiB}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The activities' work files (resume tokens, records) go to the test's own SENDENSE_HOME."""
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


class Job:
    """A job on the memory platform: its VM and shadows, its workflow, and its points."""

    def __init__(self, env: WorkflowEnvironment, spec: JobSpec, store: Store, tmp: Path) -> None:
        self.env, self.spec, self.store, self.tmp = env, spec, store, tmp
        self.guest = store.guest("web")
        self.shadows = {k: Shadow(s) for k, s in SIZES.items()}
        self.handle: WorkflowHandle[Any, JobStatus] | None = None
        self.queue = ""  # the job's (target's) task queue, once it runs

    # the guest
    def write(self, key: str, offset: int, length: int, byte: int) -> None:
        self.guest.write(key, offset, bytes([byte]) * length)
        self.shadows[key].write(offset, bytes([byte]) * length)

    def zero(self, key: str, offset: int, length: int) -> None:
        self.guest.zero(key, offset, length)
        self.shadows[key].zero(offset, length)

    def now(self) -> dict[str, Shadow]:
        return {k: s.copy() for k, s in self.shadows.items()}

    # the workflow
    async def status(self) -> JobStatus:
        """The status query, asked again through transport errors of a loaded test server."""
        assert self.handle is not None
        for _ in range(150):
            try:
                return await self.handle.query(ReplicationWorkflow.status, rpc_timeout=timedelta(seconds=10))
            except RPCError:
                await asyncio.sleep(0.2)
        raise AssertionError("the status query kept failing")

    async def until(self, pred: Callable[[JobStatus], bool], what: str, timeout: float = 30.0) -> JobStatus:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            st = await self.status()
            if pred(st):
                return st
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status: {st!r}")
            await asyncio.sleep(0.02)

    async def settled(self, syncs: int, failures: int = 0) -> JobStatus:
        return await self.until(
            lambda s: (
                s.syncs == syncs
                and s.failures == failures
                and s.current_sync is None
                and s.state in ("idle", "error")
            ),
            f"{syncs} syncs / {failures} failures settled",
        )

    async def sync_now(self) -> SyncResult:
        assert self.handle is not None
        return await asyncio.wait_for(
            self.handle.execute_update(ReplicationWorkflow.sync_now, SyncNowRequest()), 30
        )

    # the target
    def target(self) -> Any:
        return target_for(self.spec)

    def points(self) -> list[str]:
        return [p.point_id for p in self.target().list_points()]

    def differs(self, point_id: str, shadows: dict[str, Shadow]) -> list[str]:
        out = self.tmp / f"export-{point_id}"
        try:
            files = dict(self.target().export(point_id, "raw", out))
            assert sorted(files) == sorted(shadows)
            return [
                f"point {point_id} disk {k}: {d}" for k, p in files.items() if (d := shadows[k].differs(p))
            ]
        finally:
            shutil.rmtree(out, ignore_errors=True)


def make_spec(store: Store, directory: Path | None = None, keep: int = 24, **tuning: Any) -> JobSpec:
    place: dict[str, Any] = {"directory": directory} if directory is not None else {"store": store.name}
    return JobSpec(
        name=f"web-{uuid.uuid4().hex[:6]}",
        source=MemorySource(platform="memory", vm="web", block_size=BLOCK, **place),
        target=MemoryTarget(platform="memory", **place),
        schedule=Schedule(interval=timedelta(hours=1)),
        retention=Retention(points=keep),
        tuning=Tuning(**{"chunk_size": 64 * KiB, "connections": 2, "checkpoint_bytes": 1 * MiB, **tuning}),
    )


@contextlib.asynccontextmanager
async def running(
    env: WorkflowEnvironment, job: Job, *, source_queue: bool = False, api_end: str | None = None
) -> AsyncIterator[Job]:
    """The job's workflow with the real activities on a worker of this process; deleted at the end.
    `source_queue`: the source's activities on a queue of their own (the split path: no combined
    or inline steps). `api_end` ("source" or "target"): that end's steps on the control queue, as
    for an end reached by API (workflows.common.placement)."""
    q = f"mem-{uuid.uuid4()}"
    sq = f"{q}-source" if source_queue else q
    if api_end == "source":
        sq = config.CONTROL_QUEUE
    elif api_end == "target":
        q, sq = config.CONTROL_QUEUE, q
    with contextlib.ExitStack() as agents:
        if source_queue:  # two agents (in this process): the target's pulls the source's export
            q = agents.enter_context(data_agent(job.tmp))
            sq = f"{q}-source"
        async with _running(env, job, q, sq) as j:
            yield j


@contextlib.contextmanager
def data_agent(tmp: Path) -> Iterator[str]:
    """This process as an agent serving source disks over mutual TLS on loopback (activities.exports),
    with a certificate for a host id of its own; yields its host queue."""
    host = f"mem{uuid.uuid4().hex[:8]}"
    d = tmp / "agent-certs"
    certs.agent(d, host, ["127.0.0.1"])
    env = {
        "SENDENSE_HOST_ID": host,
        "SENDENSE_DATA_LISTEN": "127.0.0.1:0",
        "SENDENSE_AGENT_CERT": str(d / f"agent-{host}.pem"),
        "SENDENSE_AGENT_KEY": str(d / f"agent-{host}-key.pem"),
        "SENDENSE_AGENT_CA": str(d / "ca.pem"),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        exports.start_server()
        yield config.host_queue(host)
    finally:
        exports.stop_server()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.asynccontextmanager
async def _running(env: WorkflowEnvironment, job: Job, q: str, sq: str) -> AsyncIterator[Job]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        workers = [
            Worker(
                env.client,
                task_queue=name,
                workflows=[
                    ReplicationWorkflow,
                    DrillWorkflow,
                    FailoverWorkflow,
                    FailbackWorkflow,
                    PlanDrillWorkflow,
                    PlanFailoverWorkflow,
                    PlanFailbackWorkflow,
                ]
                if name == q
                else [],
                activities=[
                    *HOST_ACTIVITIES,
                    *RECOVERY_ACTIVITIES,
                    *FAILBACK_ACTIVITIES,
                    *PLAN_ACTIVITIES,
                    JobOperations(env.client).failover_job,
                    JobOperations(env.client).failback_job,
                ],
                activity_executor=pool,
                max_heartbeat_throttle_interval=timedelta(seconds=1),
                default_heartbeat_throttle_interval=timedelta(seconds=1),
            )
            for name in dict.fromkeys([q, sq])
        ]
        async with contextlib.AsyncExitStack() as stack:
            for w in workers:
                await stack.enter_async_context(w)
            started = await env.client.start_workflow(
                ReplicationWorkflow.run,
                ReplicationInput(spec=job.spec, source_queue=sq, target_queue=q, search_attributes=False),
                id=f"job-{job.spec.name}",
                task_queue=q,
            )
            job.handle = env.client.get_workflow_handle_for(ReplicationWorkflow.run, started.id)
            job.queue = q
            try:
                yield job
            finally:
                await _close(job.handle)


async def _close(handle: WorkflowHandle[Any, JobStatus]) -> None:
    """Delete the job (no activity left in flight: see test_replication_workflow._close)."""
    try:
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            return
        await asyncio.wait_for(handle.execute_update(ReplicationWorkflow.delete, DeleteRequest()), 20)
        await asyncio.wait_for(handle.result(), 20)
    except Exception:
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("test teardown")


@pytest.fixture
def store() -> Any:
    s = Store.named(f"wf-{uuid.uuid4().hex[:8]}")
    yield s
    Store.discard(s)


def new_job(env: WorkflowEnvironment, store: Store, tmp: Path, *, files: bool = False, **kw: Any) -> Job:
    """A VM `web` with two disks (in `store`, or in a directory of plain files) and a job for it."""
    where = Store.at(tmp / "store") if files else store
    where.create_vm("web", SIZES)
    return Job(env, make_spec(store, tmp / "store" if files else None, **kw), where, tmp)


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("files", [False, True], ids=["memory", "files"])
async def test_seed_then_incrementals_of_exactly_the_written_blocks(
    env: WorkflowEnvironment, store: Store, tmp_path: Path, files: bool
) -> None:
    job = new_job(env, store, tmp_path, files=files)
    job.write("disk0", 0, 1 * MiB, 0x11)
    job.write("disk1", 2 * MiB, 4 * KiB, 0x12)  # the disk's last 4 KiB
    shadows = {}
    async with running(env, job):
        st = await job.settled(1)
        assert st.last_sync is not None and st.last_sync.kind == "full"
        shadows[st.last_sync.point_id] = job.now()
        assert (st.last_sync.bytes_read, st.last_sync.bytes_written) == (1 * MiB + 4 * KiB,) * 2

        job.write("disk0", 2 * MiB, BLOCK, 0x21)  # one whole block
        job.write("disk0", 3 * MiB + 10, 100, 0x22)  # 100 bytes: one block read, one 4 KiB compare block sent
        job.zero("disk0", 0, BLOCK)  # a zero write over data: a zero range, no payload
        r2 = await job.sync_now()
        shadows[r2.point_id] = job.now()
        assert r2.kind == "incremental"
        assert (r2.bytes_read, r2.bytes_written, r2.bytes_zeroed) == (2 * BLOCK, BLOCK + 4 * KiB, BLOCK)

        job.write("disk1", 2 * MiB + 4 * KiB - 1, 1, 0x31)  # the very last byte
        r3 = await job.sync_now()
        shadows[r3.point_id] = job.now()
        assert (r3.kind, r3.bytes_read, r3.bytes_written, r3.bytes_zeroed) == (
            "incremental",
            4 * KiB,
            4 * KiB,
            0,
        )

        await job.settled(3)
        assert job.points() == sorted(shadows, reverse=True)
        for pid, sh in shadows.items():  # every point reads exactly its instant, after the later syncs
            assert job.differs(pid, sh) == []
        last = job.target().list_points()[0]
        # a committed release advances the base: the disks track only the newest point's change id
        assert job.store.change_ids("web") == {d.key: [d.change_id] for d in last.disks}


async def test_a_retryable_fault_in_copy_resumes_from_the_last_checkpoint(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = new_job(env, store, tmp_path, inline_copy_bytes=0, connections=1)  # copy_disk, in order
    job.write("disk0", 0, 4 * MiB, 0x11)
    fault = job.store.faults.kill_after(2 * MiB + 512 * KiB)  # the seed's copy of disk0 dies mid-way
    async with running(env, job):
        await job.until(lambda s: fault.fired == 1, "the copy to die")
        await env.sleep(timedelta(seconds=3))  # the copy's retry backoff
        st = await job.settled(1)
        assert st.last_sync is not None and st.last_sync.kind == "full" and st.failures == 0
        assert job.differs(st.last_sync.point_id, job.now()) == []
    # 64 writes of 64 KiB make disk0's 4 MiB (disk1 is all zero: nothing to write). 40 landed before
    # the kill, then the killed one; the retry resumed from the last checkpoint, at 2 MiB (every 1 MiB)
    # or a time-based one after it: 24 to 32 writes, never the 64 of a copy started over.
    resumed = job.store.faults.calls["target.write"] - 41
    assert 24 <= resumed <= 32


@pytest.mark.parametrize("api_end", ["source", "target"])
async def test_an_end_reached_by_api_runs_on_the_control_queue_and_the_agent_copies_without_an_export(
    env: WorkflowEnvironment, store: Store, tmp_path: Path, api_end: str
) -> None:
    """An end on the control queue (AWS, vSphere with no host): its steps run there, and the copy runs
    on the other end's agent, reading or writing it by API: no export, nothing through the link."""
    job = new_job(env, store, tmp_path, inline_copy_bytes=0)
    job.write("disk0", 0, 1 * MiB, 0x31)
    seeded = job.now()
    async with running(env, job, api_end=api_end):
        st = await job.settled(1)
        assert st.last_sync is not None and job.differs(st.last_sync.point_id, seeded) == []
        job.write("disk0", 2 * MiB, BLOCK, 0x32)
        r2 = await job.sync_now()
        assert r2.kind == "incremental" and r2.bytes_on_wire is None
        assert job.differs(r2.point_id, job.now()) == []
        assert job.handle is not None
        ran: dict[str, set[str]] = {}
        async for ev in job.handle.fetch_history_events():
            if ev.HasField("activity_task_scheduled_event_attributes"):
                a = ev.activity_task_scheduled_event_attributes
                ran.setdefault(a.activity_type.name, set()).add(a.task_queue.name)
    agent = [q for q in ran["copy_disk"] if q != config.CONTROL_QUEUE]
    assert len(agent) == 1 and ran["copy_disk"] == set(agent), ran
    api, other = ("create_snapshot", "commit_point")[:: 1 if api_end == "source" else -1]
    assert ran[api] == {config.CONTROL_QUEUE} and ran[other] == set(agent), ran
    assert "export_snapshot" not in ran, ran


async def test_a_non_retryable_fault_fails_the_sync_leaves_no_point_and_the_next_recovers(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = new_job(env, store, tmp_path)
    job.write("disk0", 0, 1 * MiB, 0x11)
    async with running(env, job):
        seed = (await job.settled(1)).last_point
        assert seed is not None
        seed_shadows = job.now()
        before = job.store.contents(f"target/{job.spec.name}/")
        job.write("disk0", 4 * MiB, BLOCK, 0x21)
        job.write("disk1", 0, 10, 0x22)
        msg = "replica of disk0 is read-only"
        job.store.faults.fail("target.write", retryable=False, error=TargetError, message=msg)
        with pytest.raises(WorkflowUpdateFailedError) as ei:
            await job.sync_now()
        assert isinstance(ei.value.cause, ApplicationError) and ei.value.cause.message == msg
        st = await job.settled(1, failures=1)
        assert st.last_error is not None and st.last_error.endswith(msg) and st.state == "error"
        assert job.points() == [seed]  # no point
        assert job.store.contents(f"target/{job.spec.name}/") == before  # nothing of the sync left
        assert job.differs(seed, seed_shadows) == []

        r = await job.sync_now()  # the next sync recovers: an incremental from the seed
        assert (r.kind, r.bytes_read) == ("incremental", 2 * BLOCK)
        st = await job.settled(2, failures=1)
        assert st.last_error is None and st.state == "idle"
        assert job.differs(r.point_id, job.now()) == []


async def test_tracking_lost_resyncs_with_the_reason_in_status(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = new_job(env, store, tmp_path)
    job.write("disk0", 0, 2 * MiB, 0x11)
    async with running(env, job, source_queue=True):  # the split path: create_snapshot, copy_disk, ...
        await job.settled(1)
        job.write("disk0", 1 * MiB, 10, 0x21)
        job.write("disk1", 0, 10, 0x22)
        job.store.lose_tracking("web", "disk0")  # a lost bitmap, a CBT reset
        r = await job.sync_now()
        assert r.kind == "resync"
        assert r.resync_reason is not None and r.resync_reason.startswith("disk0: disk disk0 of VM web")
        assert "does not track change id" in r.resync_reason
        # the resync reads disk0 whole and sends only the compare block that differs (+ disk1's change)
        assert (r.bytes_read, r.bytes_written) == (2 * MiB + BLOCK, 4 * KiB + 4 * KiB)
        st = await job.settled(2)
        assert (st.resyncs, st.last_resync_reason) == (1, r.resync_reason)
        assert job.differs(r.point_id, job.now()) == []

        job.write("disk0", 5 * MiB, 10, 0x31)
        r = await job.sync_now()  # tracking records again from the resync's point
        assert (r.kind, r.bytes_read) == ("incremental", BLOCK)
        assert job.differs(r.point_id, job.now()) == []


async def test_with_change_tracking_off_every_sync_is_a_resync(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = new_job(env, store, tmp_path)
    job.spec.source = job.spec.source.model_copy(update={"change_tracking": False})
    job.write("disk0", 0, 1 * MiB, 0x11)
    async with running(env, job):
        await job.settled(1)
        job.write("disk0", 3 * MiB, 10, 0x21)
        r = await job.sync_now()
        assert r.kind == "resync" and r.resync_reason is not None
        assert "change tracking is off" in r.resync_reason
        assert r.bytes_written == 4 * KiB
        assert job.differs(r.point_id, job.now()) == []


async def test_retention_keeps_a_held_point(env: WorkflowEnvironment, store: Store, tmp_path: Path) -> None:
    job = new_job(env, store, tmp_path, keep=2)
    shadows = {}
    job.write("disk0", 0, BLOCK, 0x10)
    async with running(env, job):
        p1 = (await job.settled(1)).last_point
        assert p1 is not None
        shadows[p1] = job.now()
        job.target().hold(p1, "drill-1", "a drill's test VM runs on it")
        for n in range(2, 5):
            job.write("disk0", n * BLOCK, BLOCK, 0x10 + n)
            shadows[(await job.sync_now()).point_id] = job.now()
        pids = sorted(shadows)
        assert job.points() == [pids[3], pids[2], p1]  # the two newest, and the held one
        for pid in job.points():
            assert job.differs(pid, shadows[pid]) == []

        job.target().release(p1, "drill-1")
        job.write("disk0", 6 * BLOCK, BLOCK, 0x16)
        r = await job.sync_now()
        assert job.points() == [r.point_id, pids[3]]
        assert job.differs(r.point_id, job.now()) == []


async def test_delete_with_purge_leaves_nothing(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = new_job(env, store, tmp_path)
    job.write("disk0", 0, BLOCK, 0x11)
    async with running(env, job):
        await job.settled(1)
        assert job.handle is not None
        await asyncio.wait_for(
            job.handle.execute_update(ReplicationWorkflow.delete, DeleteRequest(purge=True)), 20
        )
        st = await asyncio.wait_for(job.handle.result(), 20)
        assert st.state == "deleted" and st.left_behind == []
    assert job.store.contents(f"target/{job.spec.name}/") == []
    assert job.store.contents(f"snap/web/{job.spec.name}/") == []
    assert job.store.change_ids("web") == {"disk0": [], "disk1": []}
