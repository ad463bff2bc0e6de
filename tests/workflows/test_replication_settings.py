"""The settings update refuses what the spec refuses, in one line, even when the SDK calls it with raw
values; a paused job shows no next sync. Time-skipping server, activities faked by name (the fakes and
the harness of test_replication_workflow)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from sendense.links import GovernorInput, LeaseRequest
from sendense.models import Settings
from tests.workflows.test_replication_workflow import Job, _run, spec
from workflows.governor import LinkGovernorWorkflow
from workflows.replication import ReplicationWorkflow


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"interval": 0}, "settings.interval: interval must be at least 1s"),
        ({"interval": 99999999 * 86400}, "settings.interval: interval must be at most 30d"),
        (
            {"bandwidth_limit": 1000},
            "settings.bandwidth_limit: bandwidth limit must be 1048576 (1 MiB/s) to ",
        ),
        ({"retention_points": 0}, "settings.retention_points: Input should be greater than or equal to 1"),
        ({"interval": 60, "colour": "red"}, "settings.colour: unknown field"),
    ],
)
async def test_settings_out_of_bounds_are_refused_by_the_update_validator(
    env: Any,  # noqa: F811
    raw: dict[str, Any],
    expected: str,
) -> None:
    """Before: `interval 0` was stored and every activity then failed "Failed decoding arguments"
    (the spec no longer validated); `99999999d` failed the workflow task itself (a datetime overflow)."""

    async def body(job: Job) -> None:
        await job.settled(1)
        with pytest.raises(WorkflowUpdateFailedError) as ei:
            await job.handle.execute_update("update_settings", raw)  # the SDK, bypassing the CLI's checks
        cause = ei.value.cause
        assert isinstance(cause, ApplicationError) and cause.type == "InvalidSpec"
        assert cause.message.startswith(expected) and "\n" not in cause.message, cause.message
        st = await job.status()
        assert (st.interval_seconds, st.retention_points) == (600, 24)  # nothing applied
        # the job still works: the next sync's activities get a spec that decodes
        await job.sync_now()
        assert all(r.spec.schedule.interval == timedelta(minutes=10) for r in job.host.of("commit_point"))
        assert (await job.status()).failures == 0

    await _run(env, spec(interval=timedelta(minutes=10)), body)


async def test_valid_settings_pass_the_validator(env: Any) -> None:  # noqa: F811
    async def body(job: Job) -> None:
        await job.settled(1)
        st = await job.handle.execute_update(
            ReplicationWorkflow.update_settings,
            Settings(interval=timedelta(days=30), retention_points=10000, bandwidth_limit=1 << 20),
        )
        assert (st.interval_seconds, st.retention_points) == (30 * 86400, 10000)
        st = await job.handle.execute_update(ReplicationWorkflow.update_settings, Settings(bandwidth_limit=0))
        await job.sync_now()
        assert job.host.of("commit_point")[-1].spec.tuning.bandwidth_limit is None  # 0 = unlimited

    await _run(env, spec(interval=timedelta(minutes=10)), body)


async def test_a_paused_job_has_no_next_sync(env: Any) -> None:  # noqa: F811
    async def body(job: Job) -> None:
        st = await job.settled(1)
        assert st.next_sync_at is not None
        await job.handle.signal(ReplicationWorkflow.pause)
        st = await job.until(lambda s: s.state == "paused", "paused")
        assert st.next_sync_at is None
        await job.handle.signal(ReplicationWorkflow.resume)
        st = await job.until(lambda s: s.state != "paused", "resumed")
        assert st.next_sync_at is not None

    await _run(env, spec(interval=timedelta(minutes=10)), body)


async def test_a_priority_change_reaches_the_jobs_link(env: Any) -> None:  # noqa: F811
    """`job settings --priority`: the job's spec changes (its next copies carry it) and its link's
    governor counts its running copies in the new class at once (their spec still says the old one)."""
    link = f"wan-{uuid.uuid4().hex[:8]}"
    q = f"gov-{uuid.uuid4().hex[:8]}"
    async with Worker(env.client, task_queue=q, workflows=[LinkGovernorWorkflow]):
        gov = await env.client.start_workflow(
            LinkGovernorWorkflow.run,
            GovernorInput(spec={"name": link, "rate": 30_000_000}),
            id=f"link-{link}",
            task_queue=q,
        )
        running = LeaseRequest(holder="web01/x", job="web01", priority="low")
        assert (await gov.execute_update(LinkGovernorWorkflow.lease, running)).priority == "low"

        async def body(job: Job) -> None:
            await job.settled(1)
            st = await job.handle.execute_update(
                ReplicationWorkflow.update_settings, Settings(priority="critical")
            )
            assert (st.priority, st.link) == ("critical", link)
            for _ in range(100):
                grant = await gov.execute_update(LinkGovernorWorkflow.lease, running)
                if grant.priority == "critical":
                    break
                await asyncio.sleep(0.05)
            assert grant.priority == "critical"
            await job.sync_now()
            assert job.host.of("commit_point")[-1].spec.priority == "critical"

        await _run(env, spec(interval=timedelta(minutes=10)).model_copy(update={"link": link}), body)
        await gov.terminate()


async def test_a_priority_change_without_a_governor_still_applies(env: Any) -> None:  # noqa: F811
    async def body(job: Job) -> None:
        await job.settled(1)
        st = await job.handle.execute_update(ReplicationWorkflow.update_settings, Settings(priority="low"))
        assert st.priority == "low"
        await job.sync_now()
        assert (await job.status()).failures == 0
        with pytest.raises(WorkflowUpdateFailedError) as ei:
            await job.handle.execute_update("update_settings", {"priority": "urgent"})
        assert ei.value.cause.message.startswith("settings.priority: Input should be")  # type: ignore[union-attr]

    await _run(env, spec(interval=timedelta(minutes=10)).model_copy(update={"link": "nowhere"}), body)
