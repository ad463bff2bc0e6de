"""Recovery plan drills (workflows.plan) with the REAL activities on the memory platform, under the
time-skipping server: three jobs in two tiers, hooks before and after, the points nearest one instant;
a failing hook or a VM that does not boot stops the plan, and every drill it started cleans up."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from temporalio.testing import WorkflowEnvironment

from connectors.memory.store import Store
from sendense.models import BootCheckSpec, RecoverySpec
from sendense.plans import (
    Hook,
    PlanDrillInput,
    PlanDrillResult,
    PlanFailbackInput,
    PlanFailbackResult,
    PlanFailoverInput,
    PlanFailoverResult,
    PlanJob,
    PlanSpec,
    PlanVm,
    Tier,
)
from tests.workflows.test_memory_platform_workflow import Job, new_job, running
from workflows.plan import PlanDrillWorkflow, PlanFailbackWorkflow, PlanFailoverWorkflow

READY = "SENDENSE-GUEST-READY"


@pytest.fixture(autouse=True)
def policy_with_hooks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, agent_policy: Path) -> None:
    monkeypatch.setenv("SENDENSE_DEVELOPER_PLATFORMS", "1")
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))
    doc = yaml.safe_load(agent_policy.read_text())
    doc["hooks"] = ["/bin/true", "/bin/false"]
    p = tmp_path / "policy.yaml"
    p.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("SENDENSE_POLICY", str(p))


@pytest.fixture
def stores() -> Iterator[list[Store]]:
    s = [Store.named(f"plan-{uuid.uuid4().hex[:8]}") for _ in range(3)]
    yield s
    for x in s:
        Store.discard(x)


def plan_job(env: WorkflowEnvironment, store: Store, tmp: Path, boots: bool = True) -> Job:
    job = new_job(env, store, tmp)
    check = BootCheckSpec(console_contains=READY, timeout=timedelta(seconds=30))
    job.spec = job.spec.model_copy(update={"recovery": RecoverySpec(boot_check=check)})
    if boots:
        job.guest.write("disk0", 512, READY.encode())
    return job


@contextlib.asynccontextmanager
async def three_jobs(
    env: WorkflowEnvironment, stores: list[Store], tmp: Path, boots: tuple[bool, ...] = (True, True, True)
) -> AsyncIterator[list[Job]]:
    jobs = [plan_job(env, s, tmp / f"j{i}", b) for i, (s, b) in enumerate(zip(stores, boots, strict=True))]
    async with contextlib.AsyncExitStack() as stack:
        for j in jobs:
            await stack.enter_async_context(running(env, j))
        yield jobs


def plan_of(jobs: list[Job], before: Hook | None = None, after: Hook | None = None) -> PlanSpec:
    return PlanSpec(
        name="shop",
        tiers=[
            Tier(vms=[PlanVm(job=jobs[0].spec.name)], after=after),
            Tier(vms=[PlanVm(job=jobs[1].spec.name), PlanVm(job=jobs[2].spec.name)], before=before),
        ],
    )


async def drill_plan(env: WorkflowEnvironment, jobs: list[Job], plan: PlanSpec) -> PlanDrillResult:
    assert all(j.handle is not None for j in jobs)
    h = await env.client.start_workflow(
        PlanDrillWorkflow.run,
        PlanDrillInput(
            plan=plan,
            jobs={
                j.spec.name: PlanJob(spec=j.spec, job_workflow_id=j.handle.id, target_queue=j.queue)  # type: ignore[union-attr]
                for j in jobs
            },
            hook_queues={"": jobs[0].queue},
            drill_id=uuid.uuid4().hex[:8],
            search_attributes=False,
        ),
        id=f"plan-drill-{uuid.uuid4()}",
        task_queue=jobs[0].queue,
    )
    # (no time skipping while it runs: the failed-over jobs have no timer, so the test server would
    # skip straight to their 10-year execution timeout and time them out: "update ... not found")
    with env.auto_time_skipping_disabled():
        return await asyncio.wait_for(h.result(), 120)


def ended_at_once(r: PlanDrillResult) -> bool:
    """The plan ended its drills itself (each child keeps its VM for days unless told to end)."""
    assert r.started_at is not None and r.ended_at is not None
    return r.ended_at - r.started_at < timedelta(days=1)


def no_holds(jobs: list[Job]) -> bool:
    return all(not p.holds for j in jobs for p in j.target().list_points())


def left(stores: list[Store]) -> list[list[str]]:
    """What a drill could leave in each store: VMs (records, disks, consoles, networks) and holds. (The
    time-skipping server skips hours while a plan waits, so the jobs commit more points meanwhile.)"""
    kinds = ("/vms/", "/vm-disks/", "/vm-consoles/", "/vm-networks/", "/holds")
    return [[k for k in s.contents() if any(x in k for x in kinds)] for s in stores]


async def test_a_plan_drill_boots_every_tier_in_order_from_points_nearest_one_instant(
    env: WorkflowEnvironment, stores: list[Store], tmp_path: Path
) -> None:
    async with three_jobs(env, stores, tmp_path) as jobs:
        for j in jobs:
            await j.settled(1)
        await env.sleep(timedelta(minutes=30))
        await jobs[1].sync_now()  # jobs[1]: a newer point too, 30 min after its first
        before = left(stores)
        hook = Hook(command=["/bin/true"])
        r = await drill_plan(env, jobs, plan_of(jobs, before=hook, after=hook))
        assert r.error is None and r.cleaned, r
        assert [v.job for v in r.vms] == [j.spec.name for j in jobs]
        assert all(v.boot is not None and v.boot.ok for v in r.vms)
        # the common instant is the oldest newest point; jobs[1] gets the point nearest it (its first)
        firsts = {j.spec.name: j.target().list_points()[-1] for j in jobs}
        assert {c.job: c.point_id for c in r.points} == {n: p.point_id for n, p in firsts.items()}
        assert r.spread_seconds is not None and r.spread_seconds < 60
        assert [(h.tier, h.when, h.ok) for h in r.hooks] == [(1, "after", True), (2, "before", True)]
        # tier 2 started only once tier 1 had booted
        tier1, tier2 = r.vms[0], r.vms[1]
        assert tier1.started_at is not None and tier2.started_at is not None
        assert tier2.started_at >= tier1.started_at
        assert left(stores) == before and no_holds(jobs) and ended_at_once(r)


async def test_a_failing_hook_stops_the_plan_and_every_started_drill_cleans_up(
    env: WorkflowEnvironment, stores: list[Store], tmp_path: Path
) -> None:
    async with three_jobs(env, stores, tmp_path) as jobs:
        for j in jobs:
            await j.settled(1)
        before = left(stores)
        r = await drill_plan(env, jobs, plan_of(jobs, before=Hook(command=["/bin/false"])))
        assert r.error is not None and r.error.startswith("tier 2 before hook /bin/false failed (exit 1)")
        assert [v.job for v in r.vms] == [jobs[0].spec.name] and r.vms[0].cleaned and r.cleaned
        assert left(stores) == before and no_holds(jobs) and ended_at_once(r)


async def test_a_vm_that_does_not_boot_stops_the_plan_before_the_next_tier(
    env: WorkflowEnvironment, stores: list[Store], tmp_path: Path
) -> None:
    async with three_jobs(env, stores, tmp_path, boots=(False, True, True)) as jobs:
        for j in jobs:
            await j.settled(1)
        before = left(stores)
        r = await drill_plan(env, jobs, plan_of(jobs))
        assert r.error is not None and r.error.startswith(f"tier 1: {jobs[0].spec.name}: did not boot")
        assert [v.job for v in r.vms] == [jobs[0].spec.name] and r.cleaned
        assert left(stores) == before and no_holds(jobs) and ended_at_once(r)


async def test_a_hook_the_agent_policy_does_not_list_is_refused(
    env: WorkflowEnvironment, stores: list[Store], tmp_path: Path
) -> None:
    async with three_jobs(env, stores, tmp_path) as jobs:
        for j in jobs:
            await j.settled(1)
        before = left(stores)
        r = await drill_plan(env, jobs, plan_of(jobs, after=Hook(command=["/bin/sh", "-c", "id"])))
        assert (
            r.error
            == "plan shop tier 1 after hook: /bin/sh is not among this agent's hooks (/bin/true, /bin/false)"
        )
        assert r.cleaned and left(stores) == before and no_holds(jobs)


def test_a_plan_names_each_job_once() -> None:
    with pytest.raises(ValueError, match="job a is in tier 1 and tier 2: once only"):
        PlanSpec(name="p", tiers=[Tier(vms=[PlanVm(job="a")]), Tier(vms=[PlanVm(job="a")])])
    with pytest.raises(ValueError, match="the program must be an absolute path"):
        Hook(command=["true"])


async def fail_plan_over(env: WorkflowEnvironment, jobs: list[Job], plan: PlanSpec) -> PlanFailoverResult:
    h = await env.client.start_workflow(
        PlanFailoverWorkflow.run,
        PlanFailoverInput(
            plan=plan,
            jobs={
                j.spec.name: PlanJob(spec=j.spec, job_workflow_id=j.handle.id, target_queue=j.queue)  # type: ignore[union-attr]
                for j in jobs
            },
            hook_queues={"": jobs[0].queue},
            failover_id=uuid.uuid4().hex[:8],
            control_queue=jobs[0].queue,
            search_attributes=False,
        ),
        id=f"plan-failover-{uuid.uuid4()}",
        task_queue=jobs[0].queue,
    )
    # (no time skipping while it runs: the failed-over jobs have no timer, so the test server would
    # skip straight to their 10-year execution timeout and time them out: "update ... not found")
    with env.auto_time_skipping_disabled():
        return await asyncio.wait_for(h.result(), 120)


async def test_a_plan_fails_over_every_tier_through_each_jobs_own_failover(
    env: WorkflowEnvironment, stores: list[Store], tmp_path: Path
) -> None:
    async with three_jobs(env, stores, tmp_path) as jobs:
        for j in jobs:
            await j.settled(1)
        r = await fail_plan_over(env, jobs, plan_of(jobs, after=Hook(command=["/bin/true"])))
        assert r.error is None, r
        assert [j.job for j in r.jobs] == [j.spec.name for j in jobs]
        assert {j.job: j.point_id for j in r.jobs} == {c.job: c.point_id for c in r.points}
        assert all(j.boot is not None and j.boot.ok and not j.planned for j in r.jobs)  # at the chosen points
        for j in jobs:
            st = await j.status()
            assert st.state == "failed-over" and st.failed_over is not None


async def test_a_plan_failover_stops_at_a_failing_tier_and_leaves_later_tiers_alone(
    env: WorkflowEnvironment, stores: list[Store], tmp_path: Path
) -> None:
    async with three_jobs(env, stores, tmp_path, boots=(True, True, False)) as jobs:
        for j in jobs:
            await j.settled(1)
        r = await fail_plan_over(env, jobs, plan_of(jobs))
        assert r.error is not None and r.error.startswith(f"tier 2: {jobs[2].spec.name}: VM ")
        states = [(await j.status()).state for j in jobs]
        assert states == ["failed-over", "failed-over", "idle"]  # tier 2's failed job rolled back


async def fail_plan_back(
    env: WorkflowEnvironment, jobs: list[Job], plan: PlanSpec, stop_source: bool = True
) -> PlanFailbackResult:
    h = await env.client.start_workflow(
        PlanFailbackWorkflow.run,
        PlanFailbackInput(
            plan=plan,
            jobs={
                j.spec.name: PlanJob(spec=j.spec, job_workflow_id=j.handle.id, target_queue=j.queue)  # type: ignore[union-attr]
                for j in jobs
            },
            hook_queues={"": jobs[0].queue},
            failback_id=uuid.uuid4().hex[:8],
            control_queue=jobs[0].queue,
            stop_source=stop_source,
            search_attributes=False,
        ),
        id=f"plan-failback-{uuid.uuid4()}",
        task_queue=jobs[0].queue,
    )
    # (no time skipping while it runs: the failed-over jobs have no timer, so the test server would
    # skip straight to their 10-year execution timeout and time them out: "update ... not found")
    with env.auto_time_skipping_disabled():
        return await asyncio.wait_for(h.result(), 120)


async def test_a_plan_fails_back_tier_by_tier_through_each_jobs_own_failback(
    env: WorkflowEnvironment, stores: list[Store], tmp_path: Path
) -> None:
    async with three_jobs(env, stores, tmp_path) as jobs:
        for j in jobs:
            await j.settled(1)
        assert (await fail_plan_over(env, jobs, plan_of(jobs))).error is None
        # unplanned (the plan's points): the sources never stopped, so failback refuses to write them
        r = await fail_plan_back(env, jobs, plan_of(jobs), stop_source=False)
        assert r.error is not None and r.error.startswith(f"tier 1: {jobs[0].spec.name}: the source VM")
        assert "--stop-source" in r.error and [j.job for j in r.jobs] == [jobs[0].spec.name]
        assert [(await j.status()).state for j in jobs] == ["failed-over"] * 3  # the next tier untouched

        r = await fail_plan_back(env, jobs, plan_of(jobs, after=Hook(command=["/bin/true"])))
        assert r.error is None, r
        assert [j.job for j in r.jobs] == [j.spec.name for j in jobs] and r.skipped == []
        assert all(j.started and j.syncs >= 2 for j in r.jobs) and [h.ok for h in r.hooks] == [True]
        for j in jobs:
            st = await j.settled(2)  # replicating again
            assert st.failed_over is None and st.last_failback is not None


async def test_a_plan_failback_skips_jobs_that_are_not_failed_over(
    env: WorkflowEnvironment, stores: list[Store], tmp_path: Path
) -> None:
    async with three_jobs(env, stores, tmp_path, boots=(True, True, False)) as jobs:
        for j in jobs:
            await j.settled(1)
        assert (await fail_plan_over(env, jobs, plan_of(jobs))).error is not None  # the third rolled back
        r = await fail_plan_back(env, jobs, plan_of(jobs))
        assert r.error is None, r
        assert [j.job for j in r.jobs] == [jobs[0].spec.name, jobs[1].spec.name]
        assert r.skipped == [jobs[2].spec.name]
        assert [(await j.status()).failed_over for j in jobs] == [None, None, None]
