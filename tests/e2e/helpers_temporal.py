"""Look inside a job's workflow: pending copy heartbeats and completed copy results."""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio.api.enums.v1 import EventType

from app.cli.client import Jobs


def copy_progress(job: str) -> dict[str, Any] | None:
    async def go() -> dict[str, Any] | None:
        jobs = await Jobs.connect()
        toks = await jobs.copy_progress(jobs.handle(job))
        return next((t.model_dump() for t in toks.values()), None)

    return asyncio.run(go())


def copy_results(job: str) -> list[dict[str, Any]]:
    """The results of every completed copy_disk activity in the job's current run."""

    async def go() -> list[dict[str, Any]]:
        jobs = await Jobs.connect()
        h = jobs.handle(job)
        scheduled: dict[int, str] = {}
        out = []
        async for ev in h.fetch_history_events():
            if ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                scheduled[ev.event_id] = ev.activity_task_scheduled_event_attributes.activity_type.name
            elif ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                attrs = ev.activity_task_completed_event_attributes
                if scheduled.get(attrs.scheduled_event_id) == "copy_disk":
                    vals = await jobs.client.data_converter.decode(list(attrs.result.payloads))
                    out.append(vals[0])
        return out

    return asyncio.run(go())
