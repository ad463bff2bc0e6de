"""The link governor (workflows.governor) on the real dev server, with the real clock: leases by
class, a release or a lapsed lease handing its share to the others, `set` reaching holders at their
next renewal, a time-of-day window starting a few seconds from now, a job's priority moved by signal,
and leases in flight across continue-as-new. Leases are taken here directly through the client, as
activities.leases does."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from app import stack
from sendense.links import GovernorInput, JobPriority, LeaseGrant, LeaseRelease, LeaseRequest, LinkChange
from workflows.governor import LEASE_VALID, LinkGovernorWorkflow

M = 1_000_000


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server() -> AsyncIterator[Client]:
    async with await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter, dev_server_existing_path=stack.temporal_binary()
    ) as env:
        yield env.client


class Link:
    def __init__(self, client: Client, handle: WorkflowHandle[Any, Any]) -> None:
        self.client, self.handle = client, handle

    async def lease(
        self, holder: str, priority: str = "normal", cap: int | None = None, **kw: Any
    ) -> LeaseGrant:
        job = kw.pop("job", holder)
        req = LeaseRequest(holder=holder, job=job, priority=priority, cap=cap, **kw)
        return await self.handle.execute_update(LinkGovernorWorkflow.lease, req)

    async def release(self, holder: str) -> None:
        await self.handle.execute_update(LinkGovernorWorkflow.release, LeaseRelease(holder=holder))

    async def set(self, **spec: Any) -> None:
        current = (await self.handle.query(LinkGovernorWorkflow.status)).spec
        await self.handle.execute_update(LinkGovernorWorkflow.set_link, LinkChange(spec={**current, **spec}))


async def governed(client: Client, body: Any, max_updates: int = 500, **spec: Any) -> None:
    queue = f"gov-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[LinkGovernorWorkflow]):
        name = f"l{uuid.uuid4().hex[:8]}"
        h = await client.start_workflow(
            LinkGovernorWorkflow.run,
            GovernorInput(spec={"name": name, **spec}, max_updates=max_updates),
            id=f"link-{name}",
            task_queue=queue,
        )
        try:
            await body(Link(client, h))
        finally:
            with contextlib.suppress(RPCError):  # (one that ended already)
                await h.terminate()


async def test_leases_by_class_and_a_release_returns_the_share(server: Client) -> None:
    async def body(link: Link) -> None:
        await link.lease("c", "critical")
        await link.lease("n", "normal")
        await link.lease("l", "low")
        got = {h: await link.lease(h, p) for h, p in (("c", "critical"), ("n", "normal"), ("l", "low"))}
        assert {h: g.rate for h, g in got.items()} == {"c": 15 * M, "n": 9 * M, "l": 6 * M}
        assert got["c"].share == 0.5 and got["c"].budget == 30 * M
        await link.release("c")
        # at their next renewal: 30 x 30/50 and 30 x 20/50
        assert (await link.lease("n")).rate == 18 * M
        assert (await link.lease("l", "low")).rate == 12 * M
        st = await link.handle.query(LinkGovernorWorkflow.status)
        assert [(h.holder, h.priority, h.rate) for h in st.holders] == [
            ("n", "normal", 18 * M),
            ("l", "low", 12 * M),
        ]

    await governed(server, body, rate=30 * M)


async def test_a_lapsed_lease_returns_its_share(server: Client) -> None:
    """A holder that stops renewing (its agent was killed) lapses after LEASE_VALID seconds."""

    async def body(link: Link) -> None:
        await link.lease("dead", "critical")
        assert (await link.lease("n")).rate == 30 * M * 30 // 80
        t0 = time.monotonic()
        rate = None
        while time.monotonic() - t0 < LEASE_VALID + 5:
            rate = (await link.lease("n")).rate
            if rate == 30 * M:
                break
            await asyncio.sleep(0.5)
        took = time.monotonic() - t0
        assert rate == 30 * M, "the dead holder's share never came back"
        assert LEASE_VALID - 0.5 <= took <= LEASE_VALID + 2, took
        assert [h.holder for h in (await link.handle.query(LinkGovernorWorkflow.status)).holders] == ["n"]

    await governed(server, body, rate=30 * M)


async def test_a_cap_and_a_budget_change_reach_holders_at_their_next_renewal(server: Client) -> None:
    async def body(link: Link) -> None:
        await link.lease("c", "critical", cap=5 * M)
        assert (await link.lease("l", "low")).rate == 25 * M  # critical capped: low takes the rest
        await link.set(rate="80Mbit")  # 10 MB/s
        assert (await link.lease("c", "critical", cap=5 * M)).rate == 5 * M
        assert (await link.lease("l", "low")).rate == 5 * M
        await link.set(weights={"critical": 10, "normal": 30, "low": 90})
        assert (await link.lease("c", "critical")).rate == 1 * M  # 10 x 10/100, no cap now
        await link.set(rate="unlimited")
        g = await link.lease("l", "low")
        assert (g.rate, g.share, g.budget) == (None, None, None)
        with pytest.raises(WorkflowUpdateFailedError) as ei:
            await link.set(timezone="Mars/Olympus")
        assert str(ei.value.cause.message).startswith("link.timezone: not an IANA time zone")  # type: ignore[union-attr]

    await governed(server, body, rate=30 * M)


async def test_a_window_starting_in_seconds_switches_the_grants(server: Client) -> None:
    """Real clock: a window from a few seconds from now (HH:MM:SS, UTC) to an hour later: the grants
    switch at the next renewal after its start, not before it."""

    async def body(link: Link) -> None:
        start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=4)
        end = start + timedelta(hours=1)  # (near midnight it crosses midnight: that works too)
        await link.set(windows=[{"start": f"{start:%H:%M:%S}", "end": f"{end:%H:%M:%S}", "rate": 10 * M}])
        await link.lease("l", "low")
        assert (await link.lease("c", "critical")).rate == 30 * M * 50 // 70
        while True:  # renew both every 0.5 s until the window starts
            await link.lease("l", "low")
            g = await link.lease("c", "critical")
            now = datetime.now(UTC)
            if g.budget == 10 * M:
                break
            assert now < start + timedelta(seconds=2), "the window did not start"
            await asyncio.sleep(0.5)
        assert now >= start - timedelta(seconds=0.5)  # not before it starts (0.5 s: server vs here)
        assert g.rate == 10 * M * 50 // 70
        st = await link.handle.query(LinkGovernorWorkflow.status)
        assert st.budget == 10 * M and st.window is not None and st.window.startswith(f"{start:%H:%M:%S}")

    await governed(server, body, rate=30 * M)


async def test_a_jobs_priority_change_moves_its_running_copies(server: Client) -> None:
    async def body(link: Link) -> None:
        await link.lease("web/1", "low", job="web")
        assert (await link.lease("db/1", "normal", job="db")).rate == 18 * M
        await link.handle.signal(
            LinkGovernorWorkflow.job_priority, JobPriority(job="web", priority="critical")
        )
        # the copy still says "low" (its spec is the one it started with): the job's class counts
        g = await link.lease("web/1", "low", job="web")
        assert (g.priority, g.rate) == ("critical", 30 * M * 50 // 80)
        assert (await link.lease("db/1", "normal", job="db")).rate == 30 * M * 30 // 80

    await governed(server, body, rate=30 * M)


async def test_leases_in_flight_across_continue_as_new(server: Client) -> None:
    """Three holders renewing at once while the governor continues-as-new every 10 leases: every
    lease is answered, the holders stay, and the grants are right after it."""

    async def body(link: Link) -> None:
        first_run = (await link.handle.describe()).run_id

        async def renew(holder: str, priority: str) -> list[int | None]:
            return [(await link.lease(holder, priority)).rate for _ in range(15)]

        results = await asyncio.gather(renew("c", "critical"), renew("n", "normal"), renew("l", "low"))
        assert [r[-1] for r in results] == [15 * M, 9 * M, 6 * M]
        desc = await link.client.get_workflow_handle(link.handle.id).describe()
        assert desc.run_id != first_run  # it did continue as new
        st = await link.client.get_workflow_handle(link.handle.id).query(LinkGovernorWorkflow.status)
        assert sorted(h.holder for h in st.holders) == ["c", "l", "n"]

    await governed(server, body, max_updates=10, rate=30 * M)


async def test_measured_rate_from_reported_bytes_and_refusals(server: Client) -> None:
    async def body(link: Link) -> None:
        await link.lease("a", "normal")
        await link.lease("a", "normal", bytes=4 * M, seconds=1.0)
        await link.lease("a", "normal", bytes=2 * M, seconds=1.0)
        st = await link.handle.query(LinkGovernorWorkflow.status)
        assert st.holders[0].measured_rate == 3 * M and st.holders[0].bytes == 6 * M
        with pytest.raises(WorkflowUpdateFailedError) as ei:
            await link.lease("b", "urgent")
        assert ei.value.cause.message == "priority: one of critical, normal, low"  # type: ignore[union-attr]
        with pytest.raises(WorkflowUpdateFailedError) as ei:
            await link.handle.execute_update(LinkGovernorWorkflow.delete)
        assert "copies of a cross it now" in ei.value.cause.message  # type: ignore[union-attr]
        await link.release("a")
        final = await link.handle.execute_update(LinkGovernorWorkflow.delete)
        assert final.holders == []
        await link.handle.result()

    await governed(server, body, rate=30 * M)


async def test_a_priority_change_is_the_jobs_not_a_new_job_of_the_same_name(server: Client) -> None:
    """The change counts for the job (by its unique id): a job re-created under its name is not moved."""

    async def body(link: Link) -> None:
        change = JobPriority(job="web", job_id="a1", priority="critical")
        await link.handle.signal(LinkGovernorWorkflow.job_priority, change)
        assert (await link.lease("web/1", "low", job="web", job_id="a1")).priority == "critical"
        assert (await link.lease("web/2", "low", job="web", job_id="b2")).priority == "low"
        history = await link.handle.fetch_history()
        await Replayer(
            workflows=[LinkGovernorWorkflow], data_converter=pydantic_data_converter
        ).replay_workflow(history)

    await governed(server, body, rate=30 * M)


async def test_a_copy_moving_less_than_its_grant_leaves_the_rest_to_the_others(server: Client) -> None:
    """Work-conserving within what copies use: one that its throttle never held back (a slow source)
    is granted a little more than it moved, the others get the rest; held back again, its share is back."""

    async def body(link: Link) -> None:
        await link.lease("slow", "critical")
        await link.lease("n", "normal")
        await asyncio.sleep(2.1)  # (a copy's first seconds are its start: not judged)
        g = await link.lease("slow", "critical", bytes=2 * M, seconds=1.0, waited=0.0)
        assert g.rate == 2_500_000  # 2 MB/s moved, 1.25 x
        assert (await link.lease("n", "normal", bytes=11 * M, seconds=1.0, waited=0.4)).rate == 27_500_000
        st = await link.handle.query(LinkGovernorWorkflow.status)
        assert {h.holder: h.demand for h in st.holders} == {"slow": 2_500_000, "n": None}
        g = await link.lease("slow", "critical", bytes=2_500_000, seconds=1.0, waited=0.3)  # it sped up
        assert g.rate == 30 * M * 50 // 80
        assert (
            await link.lease("n", "normal", bytes=11 * M, seconds=1.0, waited=0.4)
        ).rate == 30 * M * 30 // 80

    await governed(server, body, rate=30 * M)
