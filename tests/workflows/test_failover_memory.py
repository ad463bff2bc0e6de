"""Failover (unplanned: a chosen or the newest point) with the REAL activities on the memory platform,
under the time-skipping server: the job's update stops its schedule, its child makes the production VM,
boots and checks it; the job is failed-over and refuses syncs and a second failover. A fault at any
step, or a VM that does not boot, rolls back to exactly the store as before, and the job syncs on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from connectors.memory.store import Store
from sendense.models import BootCheckSpec, RecoverySpec
from sendense.recovery import FailoverRequest, FailoverResult
from tests.workflows.test_memory_platform_workflow import Job, MiB, new_job, running
from workflows.replication import ReplicationWorkflow

READY = "SENDENSE-GUEST-READY"


@pytest.fixture(autouse=True)
def developer_platforms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SENDENSE_DEVELOPER_PLATFORMS", "1")
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))


@pytest.fixture
def store() -> Iterator[Store]:
    s = Store.named(f"fo-{uuid.uuid4().hex[:8]}")
    yield s
    Store.discard(s)


def failover_job(env: WorkflowEnvironment, store: Store, tmp: Path, *, boots: bool = True) -> Job:
    job = new_job(env, store, tmp)
    check = BootCheckSpec(console_contains=READY, timeout=timedelta(seconds=30))
    job.spec = job.spec.model_copy(update={"recovery": RecoverySpec(cpus=2, boot_check=check)})
    if boots:
        job.guest.write("disk0", 512, READY.encode())
        job.shadows["disk0"].write(512, READY.encode())
    return job


async def failover(job: Job, point_id: str | None = None) -> FailoverResult:
    assert job.handle is not None
    return await asyncio.wait_for(
        job.handle.execute_update(
            ReplicationWorkflow.failover, FailoverRequest(failover_id=uuid.uuid4().hex[:8], point_id=point_id)
        ),
        60,
    )


async def test_failover_makes_the_production_vm_and_the_job_stops_syncing(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = failover_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        job.write("disk1", 0, 1 * MiB, 0x22)
        await job.sync_now()
        store.set_power("web", reachable=False)  # unplanned: the source does not answer
        newest, older = job.points()
        r = await failover(job)
        assert r.error is None and r.point_id == newest and not r.planned
        assert r.boot is not None and r.boot.ok and READY in r.boot.evidence
        assert r.vm is not None and r.vm.name == job.spec.name and r.vm.mode == "production"
        assert r.rto_seconds is not None and r.rto_seconds >= 0
        st = await job.status()
        assert st.state == "failed-over" and st.failed_over is not None
        assert (st.failed_over.point_id, st.failed_over.vm) == (newest, job.spec.name)
        assert job.target().list_points()[0].holds  # the VM runs on its point: held
        with pytest.raises(WorkflowUpdateFailedError) as e:
            await job.sync_now()
        assert "job is failed over" in str(e.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as e:
            await failover(job)
        assert "job is failed over already (point" in str(e.value.cause)
        await job.env.sleep(timedelta(hours=3))  # three intervals: no sync
        assert (await job.status()).syncs == 2


async def test_failover_to_a_chosen_older_point(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = failover_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        [first] = job.points()
        job.write("disk1", 0, 1 * MiB, 0x22)
        await job.sync_now()
        r = await failover(job, point_id=first)
        assert r.error is None and r.point_id == first


@pytest.mark.parametrize(
    "verb, after_effect",
    [
        ("target.hold", True),
        ("vms.create_vm", False),
        ("vms.create_vm", True),
        ("vms.power_on", True),
        ("vms.boot_check", False),
    ],
)
async def test_a_failed_failover_rolls_back_and_the_job_syncs_on(
    env: WorkflowEnvironment, store: Store, tmp_path: Path, verb: str, after_effect: bool
) -> None:
    job = failover_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        store.set_power("web", reachable=False)  # unplanned (a planned one also takes a final sync)
        before = store.contents()
        store.faults.fail(verb, retryable=False, after_effect=after_effect)
        r = await failover(job)
        assert r.error is not None and verb in r.error and r.cleaned and r.vm is None
        assert store.contents() == before
        st = await job.status()
        assert st.state == "idle" and st.failed_over is None
        store.set_power("web", reachable=True)
        job.write("disk1", 0, 4096, 0x33)
        await job.sync_now()  # the schedule is back
        assert (await job.status()).syncs == 2


async def test_a_vm_that_does_not_boot_is_rolled_back(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = failover_job(env, store, tmp_path, boots=False)
    async with running(env, job):
        await job.settled(1)
        store.set_power("web", reachable=False)
        before = store.contents()
        r = await failover(job)
        assert r.error is not None and "did not boot" in r.error and r.cleaned
        assert store.contents() == before and (await job.status()).failed_over is None


async def test_an_unknown_point_is_one_line(env: WorkflowEnvironment, store: Store, tmp_path: Path) -> None:
    job = failover_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        r = await failover(job, point_id="nope")
        assert r.error == f"job {job.spec.name}: no recovery point nope"


def power(store: Store) -> str:
    """The source VM's power (set_power with nothing to set reads it)."""
    return str(store.set_power("web").get("power", "running"))


async def test_a_planned_failover_pauses_the_source_takes_a_final_sync_and_powers_it_off(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = failover_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        job.write("disk1", 0, 1 * MiB, 0x5A)  # written after the last point: the final sync takes it
        last_write = job.now()
        r = await failover(job)
        assert r.error is None and r.planned and r.source_note is None, r
        assert r.point_id == job.points()[0] and len(job.points()) == 2  # a final sync made it
        assert job.differs(r.point_id, last_write) == []  # it holds every write up to the pause
        assert power(store) == "stopped"
        st = await job.status()
        assert st.state == "failed-over" and st.failed_over is not None and st.failed_over.planned


async def test_a_planned_failover_that_fails_resumes_the_source(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = failover_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        store.faults.fail("vms.create_vm", retryable=False)
        r = await failover(job)
        assert r.error is not None and r.planned and r.cleaned
        assert power(store) == "running"  # resumed: the guest writes on
        job.write("disk1", 0, 4096, 0x33)
        await job.sync_now()
        assert (await job.status()).state == "idle"


async def test_a_source_that_does_not_answer_means_an_unplanned_failover_to_the_newest_point(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = failover_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        [newest] = job.points()
        store.set_power("web", reachable=False)
        r = await failover(job)
        assert r.error is None and not r.planned and r.point_id == newest
        assert job.points() == [newest]  # no final sync
        assert power(store) == "running"  # untouched


async def test_a_source_that_cannot_be_paused_fails_the_failover_and_the_job_syncs_on(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = failover_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        before = store.contents()
        store.faults.fail("source.pause_vm", retryable=False)
        r = await failover(job)
        assert r.error is not None and r.error.startswith("pausing the source VM failed:")
        assert power(store) == "running" and store.contents() == before
        await job.sync_now()
