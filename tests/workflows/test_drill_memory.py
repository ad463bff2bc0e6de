"""Drills with the REAL recovery activities on the memory platform (its VMs: connectors/memory/vms.py),
under the time-skipping server, next to the job's own workflow: a fault before or after the effect of
every step leaves the store exactly as before the drill, and the job keeps replicating meanwhile."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from connectors.memory.store import Store
from sendense.models import BootCheckSpec, RecoverySpec
from sendense.recovery import DrillInput, DrillResult
from tests.workflows.test_memory_platform_workflow import Job, MiB, new_job, running
from workflows.drill import DrillWorkflow

READY = "SENDENSE-GUEST-READY"


@pytest.fixture(autouse=True)
def developer_platforms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SENDENSE_DEVELOPER_PLATFORMS", "1")
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))


@pytest.fixture
def store() -> Iterator[Store]:
    s = Store.named(f"drill-{uuid.uuid4().hex[:8]}")
    yield s
    Store.discard(s)


def drill_job(env: WorkflowEnvironment, store: Store, tmp: Path, **kw: Any) -> Job:
    job = new_job(env, store, tmp, **kw)
    check = BootCheckSpec(console_contains=READY, timeout=timedelta(seconds=30))
    job.spec = job.spec.model_copy(update={"recovery": RecoverySpec(boot_check=check)})
    job.write("disk0", 0, 4096, 0)
    job.guest.write("disk0", 512, READY.encode())  # what its console shows once it is up
    return job


async def run_drill(job: Job, keep: timedelta = timedelta(0), during: Any = None) -> DrillResult:
    assert job.handle is not None
    h = await job.env.client.start_workflow(
        DrillWorkflow.run,
        DrillInput(
            spec=job.spec,
            drill_id=uuid.uuid4().hex[:8],
            job_workflow_id=job.handle.id,
            target_queue=job.queue,
            keep=keep,
            search_attributes=False,
        ),
        id=f"drill-{uuid.uuid4()}",
        task_queue=job.queue,
    )
    if during is not None:
        await during(h)
    return await asyncio.wait_for(h.result(), 60)


def vm_state(store: Store) -> list[str]:
    """What of the store a drill could leave: VMs, their disks and networks, and holds."""
    return [k for k in store.contents() if "/vms/" in k or k.startswith("vms") or "hold" in k]


async def test_a_drill_boots_the_newest_point_and_leaves_the_store_as_it_was(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = drill_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        before = store.contents()
        r = await run_drill(job)
        assert r.error is None and r.boot is not None and r.boot.ok and READY in r.boot.evidence
        assert r.point_id == job.points()[0] and r.cleaned
        assert store.contents() == before
        st = await job.until(lambda s: s.last_drill is not None, "the job told of the drill")
        assert st.last_drill is not None and st.last_drill.drill_id == r.drill_id and st.last_drill.ok


async def test_a_drill_with_the_guest_agent_check_needs_an_agent_that_answers(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    """recovery.boot_check.guest_agent / status_checks go from the job's spec to the VM's boot check."""
    job = drill_job(env, store, tmp_path)
    check = BootCheckSpec(
        console_contains=READY, timeout=timedelta(seconds=30), guest_agent=True, status_checks=True
    )
    job.spec = job.spec.model_copy(update={"recovery": RecoverySpec(boot_check=check)})
    async with running(env, job):
        await job.settled(1)
        r = await run_drill(job)  # its disk carries no agent
        assert r.boot is not None and not r.boot.ok and r.cleaned
        assert r.boot.evidence.endswith("did not answer") and r.boot.via == "agent", r.boot
        job.guest.write("disk0", 4096, b"SENDENSE-GUEST-AGENT")
        await job.sync_now()
        r = await run_drill(job)
        assert r.boot is not None and r.boot.ok, r.boot
        assert r.boot.evidence == f"{READY}; guest agent answered; status running"


STEPS = [
    ("target.hold", False),
    ("target.hold", True),
    ("vms.create_vm", False),
    ("vms.create_vm", True),
    ("vms.power_on", False),
    ("vms.power_on", True),
    ("vms.boot_check", False),
]


@pytest.mark.parametrize(
    "verb, after_effect", STEPS, ids=[f"{v}-{'after' if a else 'before'}" for v, a in STEPS]
)
@pytest.mark.parametrize("retryable", [False, True], ids=["fatal", "retried"])
async def test_a_fault_at_any_step_leaves_nothing(
    env: WorkflowEnvironment, store: Store, tmp_path: Path, verb: str, after_effect: bool, retryable: bool
) -> None:
    """A fatal fault ends the drill there and the undos remove what it made; a retried one (a worker
    that died mid-step) is retried, the step idempotent by name: the drill passes, and nothing is
    left either way."""
    job = drill_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        before = store.contents()
        store.faults.fail(verb, retryable=retryable, after_effect=after_effect)
        r = await run_drill(job)
        if retryable:
            assert r.error is None and r.boot is not None and r.boot.ok, r
        else:
            assert r.error is not None and verb in r.error, r
        assert r.cleaned, r.left_behind
        assert store.contents() == before
        assert job.target().list_points()[0].holds == []


async def test_an_undo_that_fails_once_is_retried_and_nothing_is_left(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = drill_job(env, store, tmp_path)
    async with running(env, job):
        await job.settled(1)
        before = store.contents()
        store.faults.fail("vms.destroy_vm")
        store.faults.fail("target.release", after_effect=True)
        r = await run_drill(job)
        assert r.cleaned and store.contents() == before


async def test_the_job_replicates_while_a_drill_keeps_its_vm_and_prune_spares_the_held_point(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    job = drill_job(env, store, tmp_path, keep=1)
    async with running(env, job):
        await job.settled(1)
        first = job.points()[0]

        async def meanwhile(h: Any) -> None:
            deadline = asyncio.get_running_loop().time() + 60  # (a loaded machine)
            while not (await h.query(DrillWorkflow.status)).step.startswith("keeping VM"):
                assert asyncio.get_running_loop().time() < deadline, "the drill never kept its VM"
                await asyncio.sleep(0.05)
            job.write("disk1", 0, 1 * MiB, 0x44)
            await job.sync_now()
            await job.sync_now()
            points = job.points()
            assert len(points) == 2 and first in points  # retention 1, but the drill's point is held
            await h.signal(DrillWorkflow.end)

        r = await run_drill(job, keep=timedelta(hours=2), during=meanwhile)
        assert r.point_id == first and r.cleaned and r.boot is not None and r.boot.ok
        await job.sync_now()  # released: the next prune may take it
        assert first not in job.points()
