"""Failback with the REAL activities on the memory platform, under the time-skipping server: a
failed-over job's VM is replicated back into the source's disks (reverse syncs while it runs, then a
cutover: VM off, a final reverse sync, the source started), the VM and its hold go, and the job
replicates again from its old base, without a full copy. Every byte is checked against shadows of
what the source and the VM wrote; a fault at any step rolls back to the VM running as production
and nothing of failback left behind."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from activities import leases
from connectors.memory.store import Store
from connectors.memory.vms import MemoryVms
from sendense import config
from sendense.links import LeaseGrant, LeaseRelease, LeaseRequest
from sendense.models import BootCheckSpec, RecoverySpec
from sendense.platforms import vms_for
from sendense.recovery import FailbackRequest, FailbackResult, FailoverRequest, FailoverResult
from tests.contract.shadow import Shadow
from tests.workflows.test_memory_platform_workflow import SIZES, Job, KiB, MiB, new_job, running
from workflows.replication import ReplicationWorkflow

READY = "SENDENSE-GUEST-READY"


@pytest.fixture(autouse=True)
def developer_platforms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SENDENSE_DEVELOPER_PLATFORMS", "1")
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))


@pytest.fixture
def store() -> Iterator[Store]:
    s = Store.named(f"fb-{uuid.uuid4().hex[:8]}")
    yield s
    Store.discard(s)


def fb_job(env: WorkflowEnvironment, store: Store, tmp: Path) -> Job:
    job = new_job(env, store, tmp)
    check = BootCheckSpec(console_contains=READY, timeout=timedelta(seconds=30))
    job.spec = job.spec.model_copy(update={"recovery": RecoverySpec(boot_check=check)})
    job.write("disk0", 0, 1 * MiB, 0x11)
    job.guest.write("disk0", 512, READY.encode())
    job.shadows["disk0"].write(512, READY.encode())
    return job


async def failover(job: Job, point_id: str | None = None) -> FailoverResult:
    assert job.handle is not None
    r = await asyncio.wait_for(
        job.handle.execute_update(
            ReplicationWorkflow.failover, FailoverRequest(failover_id=uuid.uuid4().hex[:8], point_id=point_id)
        ),
        60,
    )
    assert r.error is None, r.error
    return r


async def failback(job: Job, **kw: object) -> FailbackResult:
    assert job.handle is not None
    return await asyncio.wait_for(
        job.handle.execute_update(
            ReplicationWorkflow.failback, FailbackRequest(failback_id=uuid.uuid4().hex[:8], **kw)
        ),
        60,
    )


class Vm:
    """The failed-over VM's disks as its guest writes them, with shadows of what they must read."""

    def __init__(self, job: Job, shadows: dict[str, Shadow]) -> None:
        self.job, self.shadows = job, {k: s.copy() for k, s in shadows.items()}
        self.vms = vms_for(job.spec)
        assert isinstance(self.vms, MemoryVms)
        self.written = 0

    def write(self, key: str, offset: int, length: int, byte: int) -> None:
        self.vms.write_disk(self.job.spec.name, key, offset, bytes([byte]) * length)
        self.shadows[key].write(offset, bytes([byte]) * length)
        self.written += length

    def zero(self, key: str, offset: int, length: int) -> None:
        self.vms.zero_disk(self.job.spec.name, key, offset, length)
        self.shadows[key].zero(offset, length)
        self.written += length


def source_differs(job: Job, shadows: dict[str, Shadow]) -> list[str]:
    """Where the source's disks do not read what `shadows` say."""
    out = []
    for key, sh in shadows.items():
        got = job.guest.read(key, 0, SIZES[key])
        want = sh.read(0, SIZES[key])
        if got != want:
            i = next(i for i in range(len(got)) if got[i] != want[i])
            out.append(f"{key}: byte {i} reads {got[i]:#04x}, expected {want[i]:#04x}")
    return out


def power(store: Store) -> str:
    return str(store.set_power("web").get("power", "running"))


def leftovers(store: Store, job: Job) -> list[str]:
    """What a failover or failback could leave: VM disks, snapshots, consoles, holds."""
    return [n for n in store.contents(f"target/{job.spec.name}/") if "/vm" in n]


async def test_failback_copies_back_what_the_vm_wrote_and_the_job_replicates_again(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = fb_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        job.write("disk1", 0, 256 * KiB, 0x22)
        fo = await failover(job)  # planned: a final sync, the source powered off
        assert fo.planned and power(store) == "stopped"
        vm = Vm(job, job.now())
        vm.write("disk0", 2 * MiB, 128 * KiB, 0xA1)  # over zeros
        vm.write("disk0", 0, 64 * KiB, 0xA2)  # over the point's data
        vm.zero("disk1", 0, 64 * KiB)  # zeroed where the point has data
        vm.write("disk1", 2 * MiB, 4 * KiB, 0xA3)  # the disk's last 4 KiB
        reads = store.faults.calls["changes.read"]

        r = await failback(job)
        assert r.error is None and r.started and r.start_note is None, r
        assert r.syncs == 2 and [s.cutover for s in r.reverse_syncs] == [False, True]
        # what the VM wrote, once: 196 KiB written and 64 KiB zeroed; the final sync had nothing to do
        assert r.bytes_written == vm.written == 260 * KiB
        assert r.reverse_syncs[1].bytes_read == 0 and r.reverse_syncs[1].planned_bytes == 0
        assert store.faults.calls["changes.read"] - reads <= 4  # the VM's changed blocks, read once
        assert r.cutover_seconds is not None and r.cutover_seconds >= 0
        assert source_differs(job, vm.shadows) == []
        assert power(store) == "running"
        assert leftovers(store, job) == []  # the failed-over VM, its snapshots and console: gone
        # what the web UI shows of it: its summary, and its last step as current details
        child = job.env.client.get_workflow_handle(f"failback-{job.spec.name}-{r.failback_id}")
        desc = await child.describe()
        assert await desc.static_summary() == f"Failback {r.failback_id} of job {job.spec.name}"
        meta = await child.query("__temporal_workflow_metadata")
        assert meta.current_details == "Failback: failed back", meta
        assert not job.target().list_points()[0].holds  # the failover's hold: released

        st = await job.settled(3)  # the job syncs again at once: an incremental, not a full copy
        assert st.state == "idle" and st.failed_over is None and st.last_failback is not None
        assert (st.last_failback.syncs, st.last_failback.bytes_written) == (2, vm.written)
        assert st.last_sync is not None and st.last_sync.kind == "incremental"
        assert st.last_sync.bytes_read <= 4 * 64 * KiB  # the blocks failback wrote, nothing else
        job.shadows = vm.shadows
        assert job.differs(st.last_sync.point_id, job.now()) == []
        job.write("disk0", 5 * MiB, 4 * KiB, 0x44)  # and on as before
        r3 = await job.sync_now()
        assert r3.kind == "incremental" and job.differs(r3.point_id, job.now()) == []


@pytest.mark.parametrize("api_end", ["source", "target"])
async def test_failback_with_an_end_on_the_control_queue_keeps_the_sinks_steps_together(
    env: WorkflowEnvironment, store: Store, tmp_path: Path, api_end: str
) -> None:
    """A cloud source (its steps on the control queue) with the VM on an agent: the VM's steps, the
    reverse copy and the cut-over run on the agent; a cloud target: all on the source's side. Either
    way the source reads what the VM wrote, and each step ran where the placement says."""
    job = fb_job(env, store, tmp_path)
    async with running(env, job, api_end=api_end):
        await job.settled(1)
        await failover(job)
        vm = Vm(job, job.now())
        vm.write("disk0", 2 * MiB, 128 * KiB, 0xA1)
        r = await failback(job)
        assert r.error is None and r.started and source_differs(job, vm.shadows) == []
        child = job.env.client.get_workflow_handle(f"failback-{job.spec.name}-{r.failback_id}")
        ran: dict[str, set[str]] = {}
        async for ev in child.fetch_history_events():
            if ev.HasField("activity_task_scheduled_event_attributes"):
                a = ev.activity_task_scheduled_event_attributes
                ran.setdefault(a.activity_type.name, set()).add(a.task_queue.name)
    agent = (ran["reverse_copy"] - {config.CONTROL_QUEUE}) or ran["reverse_copy"]
    for name in ("reverse_snapshot", "reverse_copy", "reverse_release", "failback_cut_over"):
        assert ran[name] == agent, ran
    assert (ran["source_power_state"] == {config.CONTROL_QUEUE}) == (api_end == "source"), ran
    assert config.CONTROL_QUEUE not in agent and "export_snapshot" not in ran, ran


class Governor:
    """A link's governor as the lease keeper sees it (activities.leases.Governor): grants every lease
    at 64 MiB/s and records who leased (the real one: tests/workflows/test_governor.py)."""

    def __init__(self) -> None:
        self.holders: list[str] = []

    def lease(self, link: str, req: LeaseRequest, timeout: float) -> LeaseGrant:
        self.holders.append(req.holder)
        return LeaseGrant(rate=64 * MiB, share=1.0, budget=None, priority=req.priority, valid_for=4.0)

    def release(self, link: str, req: LeaseRelease, timeout: float) -> None:
        pass


async def test_reverse_copies_of_a_job_on_a_link_take_its_share(
    env: WorkflowEnvironment, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failback's reverse copies cross the job's link like its syncs: each leases its share of the
    link from the link's governor (a failback must not take the whole link from the other jobs)."""
    gov = Governor()
    monkeypatch.setattr(leases, "_attached", gov)
    job = fb_job(env, store, tmp_path)
    job.spec = job.spec.model_copy(update={"link": "wan"})
    async with running(env, job):
        await job.settled(1)
        await failover(job)
        vm = Vm(job, job.now())
        vm.write("disk0", 2 * MiB, 128 * KiB, 0xA1)
        r = await failback(job)
        assert r.error is None and source_differs(job, vm.shadows) == []
        child = await job.env.client.get_workflow_handle(
            f"failback-{job.spec.name}-{r.failback_id}"
        ).describe()
    reverse = {h for h in gov.holders if f"/{child.run_id[:8]}/" in h}  # (job/run/activity#attempt)
    assert len(reverse) >= r.syncs, gov.holders  # (a disk with nothing to copy may take none)


async def test_reverse_syncs_repeat_until_the_delta_is_small(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = fb_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        await failover(job)
        vm = Vm(job, job.now())
        vm.write("disk0", 3 * MiB, 1 * MiB, 0xB1)
        r = await failback(job, small_bytes=0, max_syncs=3)  # every reverse sync "too big" but the empty
        assert r.error is None
        assert [(s.planned_bytes, s.cutover) for s in r.reverse_syncs] == [
            (1 * MiB, False),
            (0, False),  # nothing changed since the first: cut over
            (0, True),
        ]
        assert source_differs(job, vm.shadows) == []


@pytest.mark.parametrize("older", [False, True], ids=["newest-point", "older-point"])
async def test_an_unplanned_failover_the_source_wrote_after_is_put_back(
    env: WorkflowEnvironment, store: Store, tmp_path: Path, older: bool
) -> None:
    job = fb_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        [first] = job.points()
        at_first = job.now()
        job.write("disk0", 4 * MiB, 256 * KiB, 0x31)  # in the newer point only
        await job.sync_now()
        at_newest = job.now()
        store.set_power("web", reachable=False)
        fo = await failover(job, point_id=first if older else None)
        assert not fo.planned
        store.set_power("web", reachable=True)  # back, and it never stopped: split brain
        job.write("disk1", 64 * KiB, 64 * KiB, 0x32)  # in no point at all
        vm = Vm(job, at_first if older else at_newest)
        vm.write("disk0", 6 * MiB, 64 * KiB, 0xC1)

        r = await failback(job)
        assert r.error is not None and "is running" in r.error and "--stop-source" in r.error
        assert r.syncs == 0 and power(store) == "running"  # refused: nothing touched

        r = await failback(job, stop_source=True)
        assert r.error is None, r.error
        assert source_differs(job, vm.shadows) == []  # the source's own writes after the point: undone
        if older:  # the source keeps the newest point's change id only: where it diverged is unknown
            assert sorted(r.reverse_syncs[0].compared_whole) == ["disk0", "disk1"]
            first = r.reverse_syncs[0]  # compared: the VM's data written, the source's own writes zeroed
            assert (first.bytes_written, first.bytes_read) == (64 * KiB, 1 * MiB + 64 * KiB)
        else:
            assert r.reverse_syncs[0].compared_whole == []
            assert r.bytes_written == 64 * KiB + 64 * KiB
            assert r.reverse_syncs[0].bytes_read == 64 * KiB + 64 * KiB  # not a byte more
        st = await job.settled(3)
        job.shadows = vm.shadows
        assert st.last_sync is not None and st.last_sync.kind == "incremental"
        assert job.differs(st.last_sync.point_id, job.now()) == []


async def test_a_source_that_lost_its_change_tracking_is_compared_whole(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = fb_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        store.set_power("web", reachable=False)
        await failover(job)
        store.set_power("web", "stopped", reachable=True)
        job.guest.store.set_power("web", "running")
        job.write("disk0", 7 * MiB, 64 * KiB, 0x55)  # the source wrote after the point...
        store.set_power("web", "stopped")
        store.lose_tracking("web")  # ...and does not know where any more
        vm = Vm(job, job.now())
        vm.shadows["disk0"].write(7 * MiB, bytes(64 * KiB))  # the VM's disk has the point's zeros there
        vm.write("disk1", 0, 64 * KiB, 0xD1)
        r = await failback(job)
        assert r.error is None, r.error
        assert sorted(r.reverse_syncs[0].compared_whole) == ["disk0", "disk1"]
        assert source_differs(job, vm.shadows) == []
        assert r.reverse_syncs[0].bytes_written == 64 * KiB  # the VM's data; the source's own write: zeroed
        st = await job.settled(2)  # the job's base is gone too: a resync, compared, not copied whole
        assert st.last_sync is not None and st.last_sync.kind == "resync"


@pytest.mark.parametrize(
    "verb, after_effect",
    [
        ("changes.snapshot_vm", True),
        ("changes.open_disk", False),
        ("sink.open_disk", False),
        ("sink.write", False),
        ("sink.diverged", False),
        ("changes.release", True),
        ("vms.power_off", True),
        ("sink.cut_over", True),
        ("source.power_on_vm", False),
    ],
)
async def test_a_failed_failback_rolls_back_to_the_vm_running(
    env: WorkflowEnvironment, store: Store, tmp_path: Path, verb: str, after_effect: bool
) -> None:
    job = fb_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        await failover(job)
        vm = Vm(job, job.now())
        vm.write("disk0", 2 * MiB, 64 * KiB, 0xE1)
        before = store.contents()
        store.faults.fail(verb, retryable=False, after_effect=after_effect)
        r = await failback(job)
        assert r.error is not None and verb in r.error and r.cleaned, r
        assert store.contents() == before  # failback's snapshots and change ids: gone
        assert vm.vms.list_vms()[0].state == "running" and power(store) == "stopped"
        st = await job.status()
        assert st.state == "failed-over" and st.failed_over is not None and st.last_failback is None
        with pytest.raises(WorkflowUpdateFailedError):
            await job.sync_now()
        vm.write("disk0", 3 * MiB, 64 * KiB, 0xE2)  # the VM runs on; a failback later takes it all
        r = await failback(job)
        assert r.error is None and source_differs(job, vm.shadows) == []
        assert (await job.settled(3)).failed_over is None


async def test_a_source_the_product_cannot_start_has_current_disks_and_is_the_operators(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = fb_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        await failover(job)
        store.set_power("web", startable=False)
        vm = Vm(job, job.now())
        vm.write("disk1", 0, 64 * KiB, 0xF1)
        r = await failback(job)
        assert r.error is None and not r.started
        assert r.start_note is not None and "operator's to start" in r.start_note
        assert power(store) == "stopped" and source_differs(job, vm.shadows) == []
        st = await job.settled(3)  # a stopped VM's disks replicate all the same
        assert st.last_failback is not None and not st.last_failback.started


async def test_a_vm_whose_changes_are_read_only_while_stopped_is_cut_over_at_once(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    """A platform that cannot snapshot the running VM (a libvirt-run KVM VM) says NotWhileRunning: no
    reverse sync before the cutover, the cutover's takes everything."""
    from sendense.errors import NotWhileRunning

    job = fb_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        await failover(job)
        vm = Vm(job, job.now())
        vm.write("disk0", 2 * MiB, 256 * KiB, 0x71)
        store.faults.fail("changes.snapshot_vm", error=NotWhileRunning, retryable=False, message="VM runs")
        r = await failback(job)
        assert r.error is None, r
        assert [s.cutover for s in r.reverse_syncs] == [True] and r.notes == [
            f"no reverse sync while VM {r.vm} runs: VM runs"
        ]
        assert r.bytes_written == vm.written and source_differs(job, vm.shadows) == []


async def test_a_cleanup_that_fails_is_said_and_the_failback_stands(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = fb_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        await failover(job)
        store.faults.fail("sink.cleanup", retryable=False)
        r = await failback(job)
        assert r.error is None and r.started
        assert r.left_behind == [
            "what failback made beside the source's disks: injected fault: sink.cleanup (call 1)"
        ]
        assert (await job.settled(3)).failed_over is None


async def test_bad_failbacks_are_one_line_and_change_nothing(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = fb_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        with pytest.raises(WorkflowUpdateFailedError) as e:
            await failback(job)
        assert getattr(e.value.cause, "message", "") == "not failed over: nothing to fail back"
        await failover(job)
        before = store.contents()
        store.delete_vm("web")
        r = await failback(job)
        assert r.error == (
            f"the source VM of job {job.spec.name} is gone: failback writes the disks of "
            f"{job.spec.source.describe()}"
        )
        assert (await job.status()).state == "failed-over"
        assert [
            n for n in store.contents() if not n.startswith(("blob:vm/", "record:vm/", "record:tracking/"))
        ] == [n for n in before if not n.startswith(("blob:vm/", "record:vm/", "record:tracking/"))]
