"""PlanDrillWorkflow: a drill of a recovery plan, its VMs tier by tier in boot order.

Picks, for every job, the point nearest one common instant (the newest instant every job's points
reach: the oldest of their newest points) and reports the spread. Then per tier: its `before` hook,
a DrillWorkflow child per VM (kept up until the plan ends them), until every VM of the tier booted;
then its `after` hook. A failing hook, a VM that does not boot or a failed child stops the plan: every
drill it started is ended (each cleans up its own VM and hold), newest tier first. With every tier up,
the plan keeps them for `keep` (or until `end`), then ends them the same way.
Deterministic: no I/O, no clocks but workflow.now(), no connector imports.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from sendense import platforms
    from sendense.models import PointInfo
    from sendense.plans import (
        HookRequest,
        HookResult,
        JobFailbackRequest,
        JobFailoverRequest,
        PlanDrillInput,
        PlanDrillResult,
        PlanFailbackInput,
        PlanFailbackResult,
        PlanFailoverInput,
        PlanFailoverResult,
        PlanSpec,
        PointChoice,
    )
    from sendense.recovery import DrillInput, DrillResult, FailbackResult, FailoverResult, PointRequest

    platforms.load_all()

from workflows.common import failure_message, failure_type
from workflows.saga import BOOT_MARGIN, STEP, STEP_TIMEOUT

UP_FOR = timedelta(days=7)  # a child drill's keep: the plan ends it long before


@workflow.defn(name="PlanDrillWorkflow")
class PlanDrillWorkflow:
    def __init__(self) -> None:
        self.booted: set[str] = set()
        self.checked: set[str] = set()
        self.evidence: dict[str, str] = {}
        self.done: dict[str, DrillResult | None] = {}
        self.ended = False
        self.step = "starting"
        self.watchers: list[asyncio.Task[None]] = []

    @workflow.signal
    def vm_checked(self, job: str, ok: bool, evidence: str) -> None:
        """A child drill's boot check is done (a VM that did not boot stays up for a look until the
        plan ends it)."""
        self.checked.add(job)
        self.evidence[job] = evidence
        if ok:
            self.booted.add(job)

    @workflow.signal
    def end(self) -> None:
        self.ended = True

    @workflow.query
    def status(self) -> str:
        return self.step

    def _step_is(self, step: str) -> None:
        self.step = step
        workflow.set_current_details(step)  # (the web UI shows it)

    @workflow.run
    async def run(self, inp: PlanDrillInput) -> PlanDrillResult:
        if not inp.drill_id:  # a scheduled run: its own id, from the id the schedule gave its workflow
            digest = hashlib.sha1(workflow.info().workflow_id.encode()).hexdigest()[:8]
            inp = inp.model_copy(update={"drill_id": digest})
        result = PlanDrillResult(plan=inp.plan.name, drill_id=inp.drill_id, started_at=workflow.now())
        children: list[tuple[str, Any]] = []  # (job, child handle), in start order
        try:
            self._step_is("choosing the points")
            await self._choose_points(inp, result)
            chosen = {c.job: c.point_id for c in result.points}
            for n, tier in enumerate(inp.plan.tiers, 1):
                if tier.before is not None:
                    await self._hook(inp, result, n, "before")
                self._step_is(f"tier {n}: drilling {', '.join(vm.job for vm in tier.vms)}")
                for vm in tier.vms:
                    job = inp.jobs[vm.job]
                    h = await workflow.start_child_workflow(
                        "DrillWorkflow",
                        DrillInput(
                            spec=job.spec,
                            drill_id=f"{inp.drill_id}-{len(children) + 1}",
                            job_workflow_id=job.job_workflow_id,
                            target_queue=job.target_queue,
                            point_id=chosen[vm.job],
                            keep=UP_FOR,
                            notify_workflow_id=workflow.info().workflow_id,
                            search_attributes=inp.search_attributes,
                        ),
                        id=f"drill-{vm.job}-{inp.drill_id}",
                        result_type=DrillResult,
                    )
                    children.append((vm.job, h))
                    self.done[vm.job] = None
                    self.watchers.append(asyncio.create_task(self._watch(vm.job, h)))
                jobs = [vm.job for vm in tier.vms]
                await workflow.wait_condition(
                    lambda: all(j in self.checked or self.done[j] is not None for j in jobs)  # noqa: B023
                )
                failed = [j for j in jobs if j not in self.booted]
                if failed:
                    why = [self._why(j) for j in failed]
                    raise PlanStopped(f"tier {n}: " + "; ".join(why))
                if tier.after is not None:
                    await self._hook(inp, result, n, "after")
            self._step_is("every tier up")
            if inp.keep > timedelta(0) and not self.ended:
                try:
                    await workflow.wait_condition(lambda: self.ended, timeout=inp.keep)
                except TimeoutError:
                    pass
        except PlanStopped as e:
            result.error = str(e)
        except ActivityError as e:
            result.error = failure_message(e)
        except asyncio.CancelledError:
            result.error = "the plan's drill was cancelled"
        self._step_is("ending the drills")
        for job, h in reversed(children):  # newest tier first
            if self.done.get(job) is None:
                await workflow.get_external_workflow_handle(h.id).signal("end")
            await workflow.wait_condition(lambda: self.done.get(job) is not None)  # noqa: B023
        result.vms = [r for j, _ in children if (r := self.done.get(j)) is not None]
        result.cleaned = all(r.cleaned for r in result.vms)
        result.ended_at = workflow.now()
        self._step_is("ended" if result.error is None else "failed")
        if inp.plan_workflow_id is not None:  # `plan status` shows the newest drill; a plan gone: no error
            try:
                await workflow.get_external_workflow_handle(inp.plan_workflow_id).signal(
                    "drill_finished", result
                )
            except Exception as e:  # noqa: BLE001 - the drill's own result stands
                workflow.logger.info("plan %s not told of drill %s: %s", inp.plan.name, inp.drill_id, e)
        return result

    async def _watch(self, job: str, h: Any) -> None:
        try:
            self.done[job] = await h
        except ChildWorkflowError as e:
            self.done[job] = DrillResult(drill_id=h.id, job=job, error=failure_message(e), cleaned=False)

    def _why(self, job: str) -> str:
        if job in self.checked and job not in self.booted:
            return f"{job}: did not boot ({self.evidence.get(job, '')})"
        r = self.done.get(job)
        if r is None:
            return f"{job}: no answer"
        if r.error:
            return f"{job}: {r.error}"
        if r.boot is not None and not r.boot.ok:
            return f"{job}: did not boot ({r.boot.evidence})"
        return f"{job}: ended before it booted"

    async def _choose_points(self, inp: PlanDrillInput, result: PlanDrillResult) -> None:
        await choose_points(inp, result)

    async def _hook(self, inp: PlanDrillInput, result: PlanDrillResult, n: int, when: str) -> None:
        self._step_is(f"tier {n}: {when} hook")
        await run_hook(inp, result, n, when)


async def choose_points(inp: Any, result: Any) -> None:
    """For every job of the plan, the point nearest one common instant: the newest instant every job's
    points reach (the oldest of their newest points); the spread is the newest minus the oldest chosen."""
    points: dict[str, list[PointInfo]] = {}
    for name in inp.plan.jobs():
        job = inp.jobs[name]
        points[name] = await workflow.execute_activity(
            "list_points",
            PointRequest(spec=job.spec),
            result_type=list[PointInfo],
            task_queue=job.target_queue,
            start_to_close_timeout=STEP_TIMEOUT,
            heartbeat_timeout=job.spec.tuning.heartbeat_timeout,
            retry_policy=STEP,
        )
        if not points[name]:
            raise PlanStopped(f"job {name} has no recovery point yet")
    instant = min(p[0].created_at for p in points.values())  # every job has a point this new
    for name, pts in points.items():
        best = min(pts, key=lambda p: abs((p.created_at - instant).total_seconds()))
        result.points.append(PointChoice(job=name, point_id=best.point_id, created_at=best.created_at))
    stamps = [c.created_at for c in result.points]
    result.instant = instant
    result.spread_seconds = round((max(stamps) - min(stamps)).total_seconds(), 3)


async def run_hook(inp: Any, result: Any, n: int, when: str) -> None:
    """Tier `n`'s `when` hook on its agent; a failed one stops the plan (PlanStopped)."""
    tier = inp.plan.tiers[n - 1]
    hook = tier.before if when == "before" else tier.after
    assert hook is not None
    r: HookResult = await workflow.execute_activity(
        "run_hook",
        HookRequest(
            plan=inp.plan.name,
            tier=n,
            when=when,  # type: ignore[arg-type]
            command=hook.command,
            timeout_seconds=hook.timeout.total_seconds(),
        ),
        result_type=HookResult,
        task_queue=inp.hook_queues[hook.agent or ""],
        start_to_close_timeout=hook.timeout + BOOT_MARGIN,
        heartbeat_timeout=timedelta(seconds=30),  # (the hook activity beats every 5 s)
        retry_policy=STEP,
    )
    result.hooks.append(r)
    if not r.ok:
        tail = " ".join(r.output.split())[-300:]
        raise PlanStopped(
            f"tier {n} {when} hook {hook.command[0]} failed "
            f"({'exit ' + str(r.exit_code) if r.exit_code is not None else 'timed out'}): {tail}"
        )


async def tier_by_tier(
    inp: Any,
    result: Any,
    step_is: Callable[[str], None],
    doing: str,
    act: Callable[[Any, int], Awaitable[Any]],
    done: type[FailoverResult] | type[FailbackResult],
    skipped: list[str] | None = None,
) -> None:
    """A plan's operation on its jobs, tier by tier: the tier's `before` hook, `act(vm, i)` for each of
    its VMs at once (a job's own operation, whose result of type `done` goes to `result.jobs`), its
    `after` hook. A job's failure (or a hook's) stops the plan there (PlanStopped, one line). With
    `skipped`, a job refused as not failed over is skipped and listed there."""
    for n, tier in enumerate(inp.plan.tiers, 1):
        if tier.before is not None:
            step_is(f"tier {n}: before hook")
            await run_hook(inp, result, n, "before")
        step_is(f"tier {n}: {doing} {', '.join(vm.job for vm in tier.vms)}")
        outcomes = await asyncio.gather(
            *(act(vm, i) for i, vm in enumerate(tier.vms)), return_exceptions=True
        )
        failed = []
        for vm, out in zip(tier.vms, outcomes, strict=True):
            if isinstance(out, done):
                result.jobs.append(out)
                if out.error is not None:
                    failed.append(f"{vm.job}: {out.error}")
            elif (
                skipped is not None
                and isinstance(out, BaseException)
                and failure_type(out) == "NotFailedOver"
            ):
                skipped.append(vm.job)
            else:
                failed.append(f"{vm.job}: {failure_message(out) if isinstance(out, BaseException) else out}")
        if failed:
            raise PlanStopped(f"tier {n}: " + "; ".join(failed))
        if tier.after is not None:
            step_is(f"tier {n}: after hook")
            await run_hook(inp, result, n, "after")


class PlanStopped(Exception):
    """Why a plan's drill stops before every tier is up (one line)."""


@workflow.defn(name="PlanWorkflow")
class PlanWorkflow:
    """A recovery plan, kept as a workflow (`plan-<name>`) like a job: its spec and its last drill."""

    def __init__(self) -> None:
        self.spec: PlanSpec | None = None
        self.last_drill: PlanDrillResult | None = None
        self.deleted = False

    @workflow.run
    async def run(self, spec: PlanSpec) -> None:
        self.spec = spec
        await workflow.wait_condition(lambda: self.deleted and workflow.all_handlers_finished())

    @workflow.query
    def get_spec(self) -> PlanSpec:
        assert self.spec is not None
        return self.spec

    @workflow.query
    def get_last_drill(self) -> PlanDrillResult | None:
        return self.last_drill

    @workflow.signal
    def drill_finished(self, result: PlanDrillResult) -> None:
        self.last_drill = result

    @workflow.signal
    def delete(self) -> None:
        self.deleted = True


@workflow.defn(name="PlanFailoverWorkflow")
class PlanFailoverWorkflow:
    """A plan's failover: the points nearest one instant, then tier by tier its `before` hook, each of
    its jobs failed over through the job's own `failover` update (its schedule stops, its VM is made
    and boot-checked; a job's failure is rolled back by the job), its `after` hook. A failure stops the
    plan there: the tiers before stay failed over, later tiers are not touched, and the result says so."""

    def __init__(self) -> None:
        self.step = "starting"

    @workflow.query
    def status(self) -> str:
        return self.step

    def _step_is(self, step: str) -> None:
        self.step = step
        workflow.set_current_details(step)  # (the web UI shows it)

    @workflow.run
    async def run(self, inp: PlanFailoverInput) -> PlanFailoverResult:
        result = PlanFailoverResult(
            plan=inp.plan.name, failover_id=inp.failover_id, started_at=workflow.now()
        )
        try:
            self._step_is("choosing the points")
            await choose_points(inp, result)
            chosen = {c.job: c.point_id for c in result.points}
            await tier_by_tier(
                inp,
                result,
                self._step_is,
                "failing over",
                lambda vm, i: self._failover(inp, vm.job, chosen[vm.job], len(result.jobs) + i),
                FailoverResult,
            )
            result.rto_seconds = round((workflow.now() - result.started_at).total_seconds(), 1)  # type: ignore[operator]
        except PlanStopped as e:
            result.error = str(e)
        except ActivityError as e:
            result.error = failure_message(e)
        result.ended_at = workflow.now()
        self._step_is("failed over" if result.error is None else "stopped")
        return result

    async def _failover(self, inp: PlanFailoverInput, job: str, point_id: str, n: int) -> FailoverResult:
        r: FailoverResult = await workflow.execute_activity(
            "failover_job",
            JobFailoverRequest(
                job=job,
                job_workflow_id=inp.jobs[job].job_workflow_id,
                failover_id=f"{inp.failover_id}-{n + 1}",
                point_id=point_id,
            ),
            result_type=FailoverResult,
            task_queue=inp.control_queue,
            start_to_close_timeout=timedelta(hours=2),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=STEP,
        )
        return r


@workflow.defn(name="PlanFailbackWorkflow")
class PlanFailbackWorkflow:
    """A plan's failback: tier by tier in boot order, its `before` hook, each of its failed-over jobs
    failed back through the job's own `failback` update (its VM replicated back, cut over, the source
    started; a job's failure is rolled back by the job: its VM runs on), its `after` hook. Jobs that are
    not failed over are skipped and said. A failure stops the plan there: tiers before stay failed
    back, later tiers stay failed over."""

    def __init__(self) -> None:
        self.step = "starting"

    @workflow.query
    def status(self) -> str:
        return self.step

    def _step_is(self, step: str) -> None:
        self.step = step
        workflow.set_current_details(step)  # (the web UI shows it)

    @workflow.run
    async def run(self, inp: PlanFailbackInput) -> PlanFailbackResult:
        result = PlanFailbackResult(
            plan=inp.plan.name, failback_id=inp.failback_id, started_at=workflow.now()
        )
        try:
            await tier_by_tier(
                inp,
                result,
                self._step_is,
                "failing back",
                lambda vm, i: self._failback(inp, vm.job, len(result.jobs) + len(result.skipped) + i),
                FailbackResult,
                skipped=result.skipped,
            )
        except PlanStopped as e:
            result.error = str(e)
        except ActivityError as e:
            result.error = failure_message(e)
        result.ended_at = workflow.now()
        self._step_is("failed back" if result.error is None else "stopped")
        return result

    async def _failback(self, inp: PlanFailbackInput, job: str, n: int) -> FailbackResult:
        r: FailbackResult = await workflow.execute_activity(
            "failback_job",
            JobFailbackRequest(
                job=job,
                job_workflow_id=inp.jobs[job].job_workflow_id,
                failback_id=f"{inp.failback_id}-{n + 1}",
                stop_source=inp.stop_source,
            ),
            result_type=FailbackResult,
            task_queue=inp.control_queue,
            start_to_close_timeout=timedelta(hours=48),  # reverse syncs of large disks
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=STEP,
        )
        return r
