"""The recovery plans' own activity: a hook command before or after a tier, on the agent the plan names,
only if that agent's policy lists its program (sendense.policy `hooks`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from activities.errors import mapped
from activities.replication import HEARTBEAT_EVERY, heartbeating
from sendense import policy
from sendense.errors import ResourceNotFound
from sendense.plans import HookRequest, HookResult, JobFailbackRequest, JobFailoverRequest
from sendense.recovery import FailbackRequest, FailbackResult, FailoverRequest, FailoverResult

OUTPUT_TAIL = 2000  # characters of a hook's output kept in its result


@activity.defn(name="run_hook")
@mapped
def run_hook(req: HookRequest) -> HookResult:
    """Run the hook; its exit code and output's tail say how it went (a hook that fails or times out
    is a result, not an error: the plan decides). Refused by the policy, or missing: an error."""
    what = f"plan {req.plan} tier {req.tier} {req.when} hook"
    policy.require_hook(req.command[0], what)
    if not os.access(req.command[0], os.X_OK):
        raise ResourceNotFound(f"{what}: {req.command[0]} is not an executable file on this agent")
    started = time.monotonic()
    with heartbeating(HEARTBEAT_EVERY * 5):
        try:
            p = subprocess.run(
                req.command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=req.timeout_seconds,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},  # no secrets of the agent
                cwd="/",
            )
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") + (e.stderr or b"")
            return HookResult(
                tier=req.tier,
                when=req.when,
                ok=False,
                seconds=round(time.monotonic() - started, 2),
                output=f"timed out after {req.timeout_seconds:g}s; "
                + out.decode(errors="replace")[-OUTPUT_TAIL:],
            )
    text = (p.stdout + p.stderr).decode(errors="replace")
    return HookResult(
        tier=req.tier,
        when=req.when,
        ok=p.returncode == 0,
        exit_code=p.returncode,
        seconds=round(time.monotonic() - started, 2),
        output=text[-OUTPUT_TAIL:],
    )


PLAN_ACTIVITIES: list[Callable[..., Any]] = [run_hook]


class JobOperations:
    """Activities that act on jobs through their workflows (a plan's failover asks each job's own
    `failover` update): they hold the worker's Temporal client, and run on the control queue."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @activity.defn(name="failback_job")
    async def failback_job(self, req: JobFailbackRequest) -> FailbackResult:
        """The job's failback, by update id: a retried step attaches to the same failback. A job that
        is not failed over is refused with type NotFailedOver (a plan skips it)."""
        arg = FailbackRequest(failback_id=req.failback_id, stop_source=req.stop_source)
        r: FailbackResult = await self._update(
            req.job, req.job_workflow_id, "failback", arg, req.failback_id, FailbackResult, None
        )
        return r

    @activity.defn(name="failover_job")
    async def failover_job(self, req: JobFailoverRequest) -> FailoverResult:
        """The job's failover, by update id: a retried step attaches to the same failover."""
        arg = FailoverRequest(failover_id=req.failover_id, point_id=req.point_id)
        r: FailoverResult = await self._update(
            req.job, req.job_workflow_id, "failover", arg, req.failover_id, FailoverResult, "FailoverRefused"
        )
        return r

    async def _update(
        self,
        job: str,
        workflow_id: str,
        update: str,
        arg: Any,
        op_id: str,
        result_type: type,
        refused: str | None,
    ) -> Any:
        """The job's update `update` by id `<update>-<op_id>`, heartbeating while it runs. Refused (failed
        over already, not failed over, being deleted...): one line naming the job, non-retryable, of
        type `refused` (None: the type of the job's own reason)."""
        h = self.client.get_workflow_handle(workflow_id)
        running = asyncio.ensure_future(
            h.execute_update(update, arg, id=f"{update}-{op_id}", result_type=result_type)
        )
        while not running.done():
            activity.heartbeat()
            await asyncio.wait([running], timeout=2)
        try:
            return running.result()
        except WorkflowUpdateFailedError as e:
            why = getattr(e.cause, "message", None) or str(e.cause)
            kind = refused or getattr(e.cause, "type", None) or "Refused"
            raise ApplicationError(f"job {job}: {why}", type=kind, non_retryable=True) from None
