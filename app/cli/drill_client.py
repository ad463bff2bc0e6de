"""Client-side operations on drills (workflows.drill), shared by the CLI and services using the SDK."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio.client import (
    ScheduleActionStartWorkflow,
    WorkflowExecutionStatus,
    WorkflowHandle,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from app.cli.client import Jobs
from app.cli.schedules import delete_schedule, put_schedule
from sendense import config, platforms
from sendense.errors import ResourceNotFound
from sendense.recovery import DrillInput, DrillResult, DrillStatus
from workflows.common import SA_JOB, SA_OPERATION, SA_STATE
from workflows.drill import DrillWorkflow

DRILL_PREFIX = "drill-"


def drill_workflow_id(job: str, drill_id: str) -> str:
    return f"{DRILL_PREFIX}{job}-{drill_id}"


def schedule_id(job: str) -> str:
    return config.drill_schedule_id(job)


class Drills:
    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.client = jobs.client

    async def start(
        self,
        job: str,
        point_id: str | None = None,
        keep: timedelta = timedelta(0),
        search_attributes: bool = True,
    ) -> WorkflowHandle[Any, DrillResult]:
        """Start a drill of a running job (its spec as the job holds it now)."""
        if not await self.jobs.exists(job):
            raise ResourceNotFound(f"job {job}: not found (or not running)")
        spec = await self.jobs.spec(job)
        drill_id = secrets.token_hex(4)
        sa = TypedSearchAttributes(
            [
                SearchAttributePair(SA_JOB, job),
                SearchAttributePair(SA_OPERATION, "drill"),
                SearchAttributePair(SA_STATE, "starting"),
            ]
        )
        return await self.client.start_workflow(
            DrillWorkflow.run,
            DrillInput(
                spec=spec,
                drill_id=drill_id,
                job_workflow_id=config.workflow_id(job),
                target_queue=platforms.queues(spec)[1],
                point_id=point_id,
                keep=keep,
                search_attributes=search_attributes,
            ),
            id=drill_workflow_id(job, drill_id),
            task_queue=config.CONTROL_QUEUE,
            search_attributes=sa if search_attributes else TypedSearchAttributes.empty,
            static_summary=f"Drill {drill_id} of job {job}",
            static_details=f"Test failover of job {job} from point {point_id or '(newest)'} in an isolated "
            f"network, boot check, then cleanup{f' after {keep}' if keep else ''}.",
        )

    async def schedule(self, job: str, every: timedelta, at: timedelta = timedelta(0)) -> str:
        """Drill `job` every `every` on a Temporal Schedule (at `at` past the interval's start, UTC:
        `every=1d, at=2h` is 02:00 UTC daily); a drill still running when the next is due: skipped.
        Each run is a drill of its own (id, VM name, hold). Again for a job that has one: replaced."""
        if not await self.jobs.exists(job):
            raise ResourceNotFound(f"job {job}: not found (or not running)")
        spec = await self.jobs.spec(job)
        sa = TypedSearchAttributes(
            [SearchAttributePair(SA_JOB, job), SearchAttributePair(SA_OPERATION, "drill")]
        )
        action = ScheduleActionStartWorkflow(
            DrillWorkflow.run,
            DrillInput(
                spec=spec,
                job_workflow_id=config.workflow_id(job),
                target_queue=platforms.queues(spec)[1],
            ),
            id=drill_workflow_id(job, "scheduled"),
            task_queue=config.CONTROL_QUEUE,
            typed_search_attributes=sa,
            static_summary=f"Scheduled drill of job {job}",
        )
        return await put_schedule(self.client, schedule_id(job), action, every, at)

    async def unschedule(self, job: str) -> None:
        await delete_schedule(self.client, schedule_id(job), f"job {job}")

    async def wait(
        self, h: WorkflowHandle[Any, DrillResult], on_step: Callable[[DrillStatus], None] | None = None
    ) -> DrillResult:
        """The drill's result once it has ended; `on_step` sees each new step on the way."""
        result = asyncio.ensure_future(h.result())
        seen = ""
        while not result.done():
            if on_step is not None:
                try:
                    st = await h.query(DrillWorkflow.status)
                except Exception:  # noqa: BLE001 - a query between tasks may fail: the result decides
                    st = None
                if st is not None and st.step != seen:
                    seen = st.step
                    on_step(st)
            await asyncio.wait([result], timeout=0.5)
        return result.result()

    async def _running(self, job: str) -> list[WorkflowHandle[Any, DrillResult]]:
        query = f'SendenseJob = "{job}" AND SendenseOperation = "drill" AND ExecutionStatus = "Running"'
        return [
            self.client.get_workflow_handle_for(DrillWorkflow.run, wf.id, run_id=wf.run_id)
            async for wf in self.client.list_workflows(query)
        ]

    async def end(self, job: str) -> list[str]:
        """End the kept drills of `job` now (they clean up); the drill ids."""
        running = await self._running(job)
        if not running:
            raise ResourceNotFound(f"job {job} has no drill running")
        for h in running:
            await h.signal(DrillWorkflow.end)
        return [h.id.removeprefix(drill_workflow_id(job, "")) for h in running]

    async def list(self, job: str, limit: int = 20) -> list[DrillResult | DrillStatus]:
        """The job's drills, newest first: the result of each that ended, the status of each running."""
        out: list[DrillResult | DrillStatus] = []
        query = f'SendenseJob = "{job}" AND SendenseOperation = "drill"'
        async for wf in self.client.list_workflows(query, limit=limit):
            h = self.client.get_workflow_handle_for(DrillWorkflow.run, wf.id, run_id=wf.run_id)
            if wf.status == WorkflowExecutionStatus.RUNNING:
                out.append(await h.query(DrillWorkflow.status))
            elif wf.status == WorkflowExecutionStatus.COMPLETED:
                out.append(await h.result())
        return out
