"""Temporal Schedules of drills (a job's, a plan's): made or replaced, and removed, one way for both."""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
)
from temporalio.service import RPCError, RPCStatusCode

from sendense.errors import ResourceNotFound


async def put_schedule(
    client: Client, sid: str, action: ScheduleActionStartWorkflow, every: timedelta, at: timedelta
) -> str:
    """Schedule `sid`: `action` every `every`, `at` past the interval's start (UTC); a run still going
    when the next is due is skipped. One of that id already: replaced."""
    sched = Schedule(
        action=action,
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every, offset=at)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    try:
        await client.create_schedule(sid, sched)
    except ScheduleAlreadyRunningError:
        await client.get_schedule_handle(sid).delete()
        await client.create_schedule(sid, sched)
    return sid


async def delete_schedule(client: Client, sid: str, what: str) -> None:
    """Remove schedule `sid`; none: ResourceNotFound saying `what` has no drill schedule."""
    try:
        await client.get_schedule_handle(sid).delete()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise ResourceNotFound(f"{what} has no drill schedule") from None
        raise
