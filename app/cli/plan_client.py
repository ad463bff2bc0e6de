"""Client-side operations on recovery plans (workflows.plan), shared by the CLI and SDK users."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from temporalio.client import (
    ScheduleActionStartWorkflow,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from app.cli.client import Jobs
from app.cli.schedules import delete_schedule, put_schedule
from sendense import config, platforms
from sendense.errors import InvalidSpec, ResourceNotFound
from sendense.plans import (
    PlanDrillInput,
    PlanDrillResult,
    PlanFailbackInput,
    PlanFailbackResult,
    PlanFailoverInput,
    PlanFailoverResult,
    PlanJob,
    PlanSpec,
)
from sendense.spec import format_validation_error, load_yaml
from workflows.common import SA_JOB, SA_OPERATION
from workflows.plan import PlanDrillWorkflow, PlanFailbackWorkflow, PlanFailoverWorkflow, PlanWorkflow


def plan_workflow_id(name: str) -> str:
    return f"plan-{name}"


def plan_schedule_id(name: str) -> str:
    return f"plan-drill-schedule-{name}"


def load_plan(path: Path) -> PlanSpec:
    data = load_yaml(path)
    try:
        return PlanSpec.model_validate(data)
    except ValidationError as e:
        raise InvalidSpec(f"{path}: {format_validation_error(e)}") from None


class Plans:
    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.client = jobs.client

    async def create(self, plan: PlanSpec) -> None:
        missing = [j for j in plan.jobs() if not await self.jobs.exists(j)]
        if missing:
            raise ResourceNotFound(f"plan {plan.name}: no running job {', '.join(missing)}")
        try:
            await self.client.start_workflow(
                PlanWorkflow.run,
                plan,
                id=plan_workflow_id(plan.name),
                task_queue=config.CONTROL_QUEUE,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                static_summary=f"Recovery plan {plan.name}: {len(plan.tiers)} tiers, {len(plan.jobs())} VMs",
            )
        except WorkflowAlreadyStartedError:
            raise InvalidSpec(f"name: plan {plan.name!r} already exists") from None

    async def spec(self, name: str) -> PlanSpec:
        try:
            return await self.client.get_workflow_handle_for(PlanWorkflow.run, plan_workflow_id(name)).query(
                PlanWorkflow.get_spec
            )
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise ResourceNotFound(f"plan {name}: not found") from None
            raise

    async def list(self) -> list[str]:
        query = 'WorkflowType = "PlanWorkflow" AND ExecutionStatus = "Running"'
        return sorted([wf.id.removeprefix("plan-") async for wf in self.client.list_workflows(query)])

    async def status(self, name: str) -> dict[str, Any]:
        spec = await self.spec(name)
        h = self.client.get_workflow_handle_for(PlanWorkflow.run, plan_workflow_id(name))
        last = await h.query(PlanWorkflow.get_last_drill)
        return {"plan": spec, "last_drill": last}

    async def delete(self, name: str) -> None:
        await self.spec(name)
        with contextlib.suppress(ResourceNotFound):  # no more drills of a plan that is gone
            await self.unschedule(name)
        await self.client.get_workflow_handle_for(PlanWorkflow.run, plan_workflow_id(name)).signal(
            PlanWorkflow.delete
        )

    async def _plan_jobs(self, name: str) -> tuple[PlanSpec, dict[str, PlanJob], dict[str, str]]:
        """The plan, each VM's job (its spec as the job holds it now, with the plan's overrides) and the
        queues of the agents its hooks run on."""
        plan = await self.spec(name)
        jobs: dict[str, PlanJob] = {}
        for tier in plan.tiers:
            for vm in tier.vms:
                if not await self.jobs.exists(vm.job):
                    raise ResourceNotFound(f"plan {name}: job {vm.job} is not running")
                spec = await self.jobs.spec(vm.job)
                if vm.recovery is not None:
                    spec = spec.model_copy(update={"recovery": vm.recovery})
                jobs[vm.job] = PlanJob(
                    spec=spec,
                    job_workflow_id=config.workflow_id(vm.job),
                    target_queue=platforms.queues(spec)[1],
                )
        agents = {h.agent or "" for t in plan.tiers for h in (t.before, t.after) if h is not None}
        return plan, jobs, {a: config.host_queue(a or None) for a in agents}

    async def failover(self, name: str) -> PlanFailoverResult:
        """Fail the plan over, tier by tier, to the points nearest one instant; its result."""
        plan, jobs, hook_queues = await self._plan_jobs(name)
        failover_id = secrets.token_hex(4)
        h = await self.client.start_workflow(
            PlanFailoverWorkflow.run,
            PlanFailoverInput(
                plan=plan,
                jobs=jobs,
                hook_queues=hook_queues,
                failover_id=failover_id,
                control_queue=config.CONTROL_QUEUE,
            ),
            id=f"plan-failover-{name}-{failover_id}",
            task_queue=config.CONTROL_QUEUE,
            static_summary=f"Failover {failover_id} of recovery plan {name}",
        )
        return await h.result()

    async def failback(self, name: str, stop_source: bool = False) -> PlanFailbackResult:
        """Fail the plan's failed-over jobs back, tier by tier; its result."""
        plan, jobs, hook_queues = await self._plan_jobs(name)
        failback_id = secrets.token_hex(4)
        h = await self.client.start_workflow(
            PlanFailbackWorkflow.run,
            PlanFailbackInput(
                plan=plan,
                jobs=jobs,
                hook_queues=hook_queues,
                failback_id=failback_id,
                control_queue=config.CONTROL_QUEUE,
                stop_source=stop_source,
            ),
            id=f"plan-failback-{name}-{failback_id}",
            task_queue=config.CONTROL_QUEUE,
            static_summary=f"Failback {failback_id} of recovery plan {name}",
        )
        return await h.result()

    async def drill(self, name: str, keep: timedelta = timedelta(0), search_attributes: bool = True) -> Any:
        """Start the plan's drill: each VM's job spec as its job holds it now, with the plan's overrides."""
        plan, jobs, hook_queues = await self._plan_jobs(name)
        drill_id = secrets.token_hex(4)
        sa = TypedSearchAttributes(
            [SearchAttributePair(SA_JOB, f"plan:{name}"), SearchAttributePair(SA_OPERATION, "plan-drill")]
        )
        return await self.client.start_workflow(
            PlanDrillWorkflow.run,
            PlanDrillInput(
                plan=plan,
                jobs=jobs,
                hook_queues=hook_queues,
                drill_id=drill_id,
                keep=keep,
                plan_workflow_id=plan_workflow_id(name),
                search_attributes=search_attributes,
            ),
            id=f"plan-drill-{name}-{drill_id}",
            task_queue=config.CONTROL_QUEUE,
            search_attributes=sa if search_attributes else TypedSearchAttributes.empty,
            static_summary=f"Drill {drill_id} of recovery plan {name}",
        )

    async def wait(self, name: str, h: Any, on_step: Any = None) -> PlanDrillResult:
        result = asyncio.ensure_future(h.result())
        seen = ""
        while not result.done():
            if on_step is not None:
                try:
                    step = await h.query(PlanDrillWorkflow.status)
                except Exception:  # noqa: BLE001 - a query between tasks may fail: the result decides
                    step = seen
                if step != seen:
                    seen = step
                    on_step(step)
            await asyncio.wait([result], timeout=0.5)
        r: PlanDrillResult = result.result()
        return r

    async def schedule(self, name: str, every: timedelta, at: timedelta = timedelta(0)) -> str:
        """Drill the plan on a Temporal Schedule (each run its own drill; skipped while one runs); the
        plan and its jobs' specs as they are now. Again: replaced."""
        plan, jobs, hook_queues = await self._plan_jobs(name)
        action = ScheduleActionStartWorkflow(
            PlanDrillWorkflow.run,
            PlanDrillInput(
                plan=plan, jobs=jobs, hook_queues=hook_queues, plan_workflow_id=plan_workflow_id(name)
            ),
            id=f"plan-drill-{name}-scheduled",
            task_queue=config.CONTROL_QUEUE,
            static_summary=f"Scheduled drill of recovery plan {name}",
        )
        return await put_schedule(self.client, plan_schedule_id(name), action, every, at)

    async def unschedule(self, name: str) -> None:
        await delete_schedule(self.client, plan_schedule_id(name), f"plan {name}")
