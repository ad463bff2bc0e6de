"""Three real copies (the copy engine, each through its own throttle driven by its own lease keeper)
share one link's governor (the real workflow on the real dev server, real clock): the bytes they
actually move are 50/30/20 of the budget within 10%, and when the critical copy ends the others
take its share within 5 s. Rates are measured from the bytes the copies' writers received."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator

import pytest_asyncio
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.leases import Governors, LeaseKeeper, link_throttle
from app import stack
from sendense.datapath.copy import CopyPlan, run_copy
from sendense.datapath.extents import Extent
from sendense.datapath.throttle import Throttle
from sendense.errors import DataPathError
from sendense.links import GovernorInput
from workflows.governor import LinkGovernorWorkflow

M = 1_000_000
BUDGET = 30 * M
CHUNK = 256 << 10
PATTERN = b"\x5a" * CHUNK


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server() -> AsyncIterator[Client]:
    async with await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter, dev_server_existing_path=stack.temporal_binary()
    ) as env:
        yield env.client


class Received:
    """What a copy's writers received: bytes, in all (read from the test's thread)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.lock = threading.Lock()


class Reader:
    def read(self, offset: int, length: int) -> bytes:
        return PATTERN if length == CHUNK else PATTERN[:length]

    def close(self) -> None: ...

    def wire(self) -> None:
        return None


class SlowReader(Reader):
    """A source that gives 1.5 MB/s a connection (3 MB/s for a copy's two)."""

    def read(self, offset: int, length: int) -> bytes:
        time.sleep(length / 1_500_000)
        return super().read(offset, length)


class Writer(Reader):
    def __init__(self, received: Received) -> None:
        self.received = received

    def write(self, offset: int, data: bytes) -> None:
        with self.received.lock:
            self.received.bytes += len(data)

    def zero(self, offset: int, length: int) -> None:
        raise AssertionError("no zero ranges here")

    def flush(self) -> None: ...


def copy(
    size: int, received: Received, throttle: Throttle, stop: threading.Event, reader: type[Reader] = Reader
) -> None:
    plan = CopyPlan(
        extents=[Extent(0, size)],
        open_reader=reader,
        open_writer=lambda: Writer(received),
        chunk_size=CHUNK,
        connections=2,
        throttle=throttle,
        cancelled=stop.is_set,
    )
    with contextlib.suppress(DataPathError):  # (cancelled at the test's end)
        run_copy(plan)


async def test_three_copies_get_50_30_20_and_take_up_a_finished_ones_share(server: Client) -> None:
    queue, name = f"gov-{uuid.uuid4().hex[:8]}", f"l{uuid.uuid4().hex[:8]}"
    async with Worker(server, task_queue=queue, workflows=[LinkGovernorWorkflow]):
        h = await server.start_workflow(
            LinkGovernorWorkflow.run,
            GovernorInput(spec={"name": name, "rate": BUDGET}),
            id=f"link-{name}",
            task_queue=queue,
        )
        governors = Governors(server, asyncio.get_running_loop())
        stop = threading.Event()
        received = {p: Received() for p in ("critical", "normal", "low")}
        ended: dict[str, float] = {}
        # critical: about 11 s at its 15 MB/s; the others run until the test stops them
        sizes = {"critical": 165 * M, "normal": 10_000 * M, "low": 10_000 * M}

        def run(p: str) -> None:
            throttle = link_throttle()
            keeper = LeaseKeeper(name, f"job-{p}", p, None, f"job-{p}/1", throttle, governors)
            keeper.start()
            try:
                copy(sizes[p], received[p], throttle, stop)
            finally:
                keeper.stop()
                ended[p] = time.monotonic()

        copies = [asyncio.create_task(asyncio.to_thread(run, p)) for p in received]
        try:
            await asyncio.sleep(3)  # every copy leased and renewed at least twice
            t1, b1 = time.monotonic(), {p: r.bytes for p, r in received.items()}
            await asyncio.sleep(5)
            t2, b2 = time.monotonic(), {p: r.bytes for p, r in received.items()}
            assert "critical" not in ended, "the critical copy ended before the measurement did"
            rates = {p: (b2[p] - b1[p]) / (t2 - t1) for p in received}
            total = sum(rates.values())
            shares = {p: r / total for p, r in rates.items()}
            print(f"\nrates MB/s { ({p: round(r / M, 2) for p, r in rates.items()}) }, shares {shares}")
            assert 0.9 * BUDGET <= total <= 1.1 * BUDGET, total
            for p, want in (("critical", 0.5), ("normal", 0.3), ("low", 0.2)):
                assert abs(shares[p] - want) <= 0.1 * want, (p, shares)

            st = await h.query(LinkGovernorWorkflow.status)
            measured = {x.priority: x.measured_rate or 0 for x in st.holders}
            assert all(abs(measured[p] - rates[p]) <= 0.2 * rates[p] for p in rates), (measured, rates)

            # the critical copy ends: the others take its share (30 x 30/50, 30 x 20/50)
            await copies[0]
            t_end = ended["critical"]
            history: list[tuple[float, int, int]] = []
            took = None
            while time.monotonic() - t_end < 8:
                history.append((time.monotonic(), received["normal"].bytes, received["low"].bytes))
                past = [x for x in history if x[0] <= history[-1][0] - 1.0]
                if past:
                    t0, n0, l0 = past[-1]
                    dt = history[-1][0] - t0
                    n_rate, l_rate = (history[-1][1] - n0) / dt, (history[-1][2] - l0) / dt
                    if n_rate >= 0.9 * 18 * M and l_rate >= 0.9 * 12 * M:
                        took = history[-1][0] - t_end
                        break
                await asyncio.sleep(0.1)
            print(f"the others took up the critical copy's share {took} s after it ended")
            assert took is not None and took <= 5.0, took
        finally:
            stop.set()
            await asyncio.gather(*copies, return_exceptions=True)
            with contextlib.suppress(RPCError):
                await h.terminate()


async def test_a_copy_with_a_slow_source_leaves_its_unused_share_to_the_others(server: Client) -> None:
    """critical and normal on 30 MB/s, the normal copy's source giving 3 MB/s: by weight critical would
    get 18.75 MB/s and normal 11.25 it cannot use; work-conserving, critical gets 30 - 1.25 x 3."""
    queue, name = f"gov-{uuid.uuid4().hex[:8]}", f"l{uuid.uuid4().hex[:8]}"
    async with Worker(server, task_queue=queue, workflows=[LinkGovernorWorkflow]):
        h = await server.start_workflow(
            LinkGovernorWorkflow.run,
            GovernorInput(spec={"name": name, "rate": BUDGET}),
            id=f"link-{name}",
            task_queue=queue,
        )
        governors = Governors(server, asyncio.get_running_loop())
        stop = threading.Event()
        received = {"critical": Received(), "normal": Received()}

        def run(p: str) -> None:
            throttle = link_throttle()
            keeper = LeaseKeeper(name, f"job-{p}", p, None, f"job-{p}/1", throttle, governors)
            keeper.start()
            try:
                copy(10_000 * M, received[p], throttle, stop, SlowReader if p == "normal" else Reader)
            finally:
                keeper.stop()

        copies = [asyncio.create_task(asyncio.to_thread(run, p)) for p in received]
        try:
            await asyncio.sleep(5)  # judged from 2 s after its first lease, on 1 s reports
            t1, b1 = time.monotonic(), {p: r.bytes for p, r in received.items()}
            await asyncio.sleep(4)
            t2, b2 = time.monotonic(), {p: r.bytes for p, r in received.items()}
            rates = {p: (b2[p] - b1[p]) / (t2 - t1) for p in received}
            print(f"\nrates MB/s { ({p: round(r / M, 2) for p, r in rates.items()}) }")
            assert 2.7 * M <= rates["normal"] <= 3.3 * M, rates  # its source's speed: not held back
            assert rates["critical"] >= 0.9 * (BUDGET - 1.25 * 3 * M), rates  # not 18.75
            assert sum(rates.values()) <= 1.05 * BUDGET, rates
        finally:
            stop.set()
            await asyncio.gather(*copies, return_exceptions=True)
            with contextlib.suppress(RPCError):
                await h.terminate()
