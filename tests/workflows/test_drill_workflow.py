"""DrillWorkflow as a saga, on the time-skipping server with the recovery activities faked (their
state kept like a target's: holds and VMs), so that every step can fail, before or after its effect:
whatever fails, the undos run newest first and nothing is left (no VM, no hold); the job is told."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity, workflow
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from connectors.kvm.spec import KvmSource, KvmTarget
from sendense.models import BootCheck, BootCheckSpec, DrillSummary, JobSpec, PointInfo, RecoverySpec, VmRef
from sendense.recovery import (
    BootRequest,
    DrillInput,
    DrillResult,
    HoldRequest,
    PointRequest,
    VmNameRequest,
    VmRequest,
)
from workflows.drill import DrillWorkflow

POINTS = ["p3", "p2", "p1"]  # newest first


@workflow.defn(name="JobStub")
class JobStub:
    """Stands in for the job's workflow: what the drill tells it."""

    def __init__(self) -> None:
        self.drills: list[DrillSummary] = []

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)

    @workflow.signal
    def drill_finished(self, s: DrillSummary) -> None:
        self.drills.append(s)

    @workflow.query
    def told(self) -> list[DrillSummary]:
        return self.drills


@dataclass
class FakeTarget:
    """The recovery activities over a target's state. `fail[name] = "before" | "after"` fails that
    activity once, before or after its effect (a worker killed before its result reached the server)."""

    holds: dict[str, str] = field(default_factory=dict)  # hold id -> point
    vms: dict[str, str] = field(default_factory=dict)  # VM name -> state
    calls: list[str] = field(default_factory=list)
    fail: dict[str, str] = field(default_factory=dict)
    console: str = "Linux version 6.1\nSENDENSE-GUEST-READY\n"

    def _maybe(self, name: str, when: str) -> None:
        if self.fail.get(name) == when:
            del self.fail[name]
            raise ApplicationError(
                f"injected: {name} {when} its effect", type="InjectedFault", non_retryable=True
            )

    def activities(self) -> list[Any]:
        t = self

        @activity.defn(name="choose_point")
        async def choose_point(req: PointRequest) -> PointInfo:
            t.calls.append("choose_point")
            t._maybe("choose_point", "before")
            pid = req.point_id or POINTS[0]
            if pid not in POINTS:
                raise ApplicationError(f"job {req.spec.name}: no recovery point {pid}", non_retryable=True)
            return PointInfo(
                point_id=pid,
                job=req.spec.name,
                created_at=datetime.now(UTC),
                committed_at=datetime.now(UTC),
                kind="full",
                disks=[],
            )

        @activity.defn(name="hold_point")
        async def hold_point(req: HoldRequest) -> None:
            t.calls.append("hold_point")
            t._maybe("hold_point", "before")
            t.holds[req.hold_id] = req.point_id
            t._maybe("hold_point", "after")

        @activity.defn(name="release_point")
        async def release_point(req: HoldRequest) -> None:
            t.calls.append("release_point")
            t._maybe("release_point", "before")
            t.holds.pop(req.hold_id, None)

        @activity.defn(name="create_vm")
        async def create_vm(req: VmRequest) -> VmRef:
            t.calls.append("create_vm")
            t._maybe("create_vm", "before")
            assert req.plan.mode == "test"
            t.vms[req.plan.name] = "stopped"
            t._maybe("create_vm", "after")
            return VmRef(
                name=req.plan.name, platform="kvm", point_id=req.plan.point_id, mode="test", state="stopped"
            )

        @activity.defn(name="power_on")
        async def power_on(req: VmNameRequest) -> VmRef:
            t.calls.append("power_on")
            t._maybe("power_on", "before")
            t.vms[req.name] = "running"
            t._maybe("power_on", "after")
            return VmRef(name=req.name, platform="kvm", point_id="", mode="test", state="running")

        @activity.defn(name="boot_check")
        async def boot_check(req: BootRequest) -> BootCheck:
            t.calls.append("boot_check")
            t._maybe("boot_check", "before")
            import re

            m = re.search(req.pattern, t.console)
            return BootCheck(ok=m is not None, seconds=3.0, evidence=m.group(0) if m else t.console[-100:])

        @activity.defn(name="destroy_vm")
        async def destroy_vm(req: VmNameRequest) -> None:
            t.calls.append("destroy_vm")
            t._maybe("destroy_vm", "before")
            t.vms.pop(req.name, None)

        return [choose_point, hold_point, release_point, create_vm, power_on, boot_check, destroy_vm]


def job_spec(pattern: str = "SENDENSE-GUEST-READY") -> JobSpec:
    return JobSpec(
        name="web01",
        source=KvmSource(platform="kvm", disks=[Path("/vms/web01/disk0.qcow2")]),
        target=KvmTarget(platform="kvm", path=Path("/replicas")),
        recovery=RecoverySpec(
            cpus=2, boot_check=BootCheckSpec(console_contains=pattern, timeout=timedelta(minutes=1))
        ),
    )


async def drill(
    env: WorkflowEnvironment,
    target: FakeTarget,
    spec: JobSpec | None = None,
    point_id: str | None = None,
    keep: timedelta = timedelta(0),
    during: Any = None,
) -> tuple[DrillResult, list[DrillSummary]]:
    q = f"drill-{uuid.uuid4()}"
    async with Worker(
        env.client, task_queue=q, workflows=[DrillWorkflow, JobStub], activities=target.activities()
    ):
        job = await env.client.start_workflow(JobStub.run, id=f"job-{uuid.uuid4()}", task_queue=q)
        h = await env.client.start_workflow(
            DrillWorkflow.run,
            DrillInput(
                spec=spec or job_spec(),
                drill_id="d1",
                job_workflow_id=job.id,
                target_queue=q,
                point_id=point_id,
                keep=keep,
                search_attributes=False,
            ),
            id=f"drill-{uuid.uuid4()}",
            task_queue=q,
        )
        if during is not None:
            await during(h)
        result = await asyncio.wait_for(h.result(), 60)
        told = await job.query(JobStub.told)
        with contextlib.suppress(RPCError):  # (the test server sometimes calls it completed already)
            await job.terminate()
        return result, told


UNDONE = ["destroy VM drill-d1", "release the hold on point p3"]


async def test_a_drill_boots_the_newest_point_and_cleans_up(env: WorkflowEnvironment) -> None:
    t = FakeTarget()
    r, told = await drill(env, t)
    assert (
        r.point_id == "p3" and r.boot is not None and r.boot.ok and r.boot.evidence == "SENDENSE-GUEST-READY"
    )
    assert r.vm is not None and r.vm.name == "drill-d1" and r.error is None
    assert t.calls == [
        "choose_point", "hold_point", "create_vm", "power_on", "boot_check", "destroy_vm", "release_point",
    ]  # fmt: skip
    assert r.cleaned and r.undone == UNDONE and r.left_behind == [] and t.vms == {} and t.holds == {}
    assert [(s.drill_id, s.point_id, s.ok, s.cleaned) for s in told] == [("d1", "p3", True, True)]


async def test_a_vm_that_does_not_boot_is_a_failed_drill_and_still_cleaned_up(
    env: WorkflowEnvironment,
) -> None:
    t = FakeTarget(console="Kernel panic - not syncing: VFS: Unable to mount root fs\n")
    r, told = await drill(env, t)
    assert r.boot is not None and not r.boot.ok and "Kernel panic" in r.boot.evidence
    assert r.cleaned and t.vms == {} and t.holds == {}
    assert told[0].ok is False


@pytest.mark.parametrize(
    "step, when, undone",
    [
        ("choose_point", "before", []),
        ("hold_point", "before", ["release the hold on point p3"]),
        ("hold_point", "after", ["release the hold on point p3"]),
        ("create_vm", "before", UNDONE),
        ("create_vm", "after", UNDONE),  # the VM exists though its result never came: destroyed by name
        ("power_on", "before", UNDONE),
        ("power_on", "after", UNDONE),
        ("boot_check", "before", UNDONE),
    ],
)
async def test_a_failure_at_any_step_leaves_nothing(
    env: WorkflowEnvironment, step: str, when: str, undone: list[str]
) -> None:
    t = FakeTarget(fail={step: when})
    r, told = await drill(env, t)
    assert r.error == f"injected: {step} {when} its effect"
    assert r.undone == undone and r.cleaned
    assert t.vms == {} and t.holds == {}
    assert told[0].error == r.error and told[0].cleaned


async def test_an_undo_that_keeps_failing_is_said_and_the_other_undos_still_run(
    env: WorkflowEnvironment,
) -> None:
    t = FakeTarget()

    @activity.defn(name="destroy_vm")
    async def broken(req: VmNameRequest) -> None:
        raise ApplicationError("the VM's process would not die", non_retryable=True)

    acts = [a for a in t.activities() if a.__temporal_activity_definition.name != "destroy_vm"] + [broken]
    t.activities = lambda: acts  # type: ignore[method-assign]
    r, _ = await drill(env, t)
    assert not r.cleaned
    assert r.left_behind == ["destroy VM drill-d1: the VM's process would not die"]
    assert r.undone == ["release the hold on point p3"] and t.holds == {}


async def test_an_unknown_point_is_one_line_and_nothing_is_made(env: WorkflowEnvironment) -> None:
    t = FakeTarget()
    r, _ = await drill(env, t, point_id="p9")
    assert r.error == "job web01: no recovery point p9" and r.cleaned and t.calls == ["choose_point"]


async def test_a_kept_drill_waits_for_its_keep_or_for_end(env: WorkflowEnvironment) -> None:
    t = FakeTarget()

    async def end_early(h: Any) -> None:
        deadline = asyncio.get_running_loop().time() + 60  # (a loaded machine)
        while not (await h.query(DrillWorkflow.status)).step.startswith("keeping VM drill-d1 until"):
            assert asyncio.get_running_loop().time() < deadline, "the drill never kept its VM"
            await asyncio.sleep(0.05)
        assert t.vms == {"drill-d1": "running"}
        await h.signal(DrillWorkflow.end)

    r, _ = await drill(env, t, keep=timedelta(hours=6), during=end_early)
    assert r.cleaned and r.boot is not None and r.boot.ok and t.vms == {}

    t2 = FakeTarget()
    r2, _ = await drill(env, t2, keep=timedelta(minutes=30))  # the time-skipping server skips the keep
    assert r2.cleaned and t2.vms == {} and r2.ended_at is not None and r2.started_at is not None
    assert r2.ended_at - r2.started_at >= timedelta(minutes=30)
