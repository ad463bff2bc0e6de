"""A VM of 60 disks (the largest real VMs have about that many) through the real workflow and the real
activities on the memory platform: a seed and incremental syncs, every point exact, and the history's
payloads small: no payload near Temporal's 2 MB limit, and a disk's copy carries that disk's snapshot
only (with every disk's, a sync's history grew with the square of the disk count)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from contract.shadow import Shadow
from temporalio.api.common.v1 import Payloads
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from connectors.memory.store import Store
from sendense.models import CopyRequest
from tests.workflows.test_memory_platform_workflow import BLOCK, Job, KiB, make_spec, running

DISKS = 60
SIZE = 256 * KiB
KEYS = [f"disk{i}" for i in range(DISKS)]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))  # the activities' work files
    s = Store.named(f"wf-{uuid.uuid4().hex[:8]}")
    yield s
    Store.discard(s)


def payloads_of(event: object) -> list[tuple[str, Payloads]]:
    """The payload groups an event carries (activity inputs and results, workflow input, queries...)."""
    found = []
    for attr in ("input", "result", "details", "last_completion_result"):
        for desc, value in event.ListFields():  # type: ignore[attr-defined]
            if hasattr(value, "ListFields"):
                for d2, v2 in value.ListFields():
                    if d2.name == attr and isinstance(v2, Payloads):
                        found.append((f"{desc.name}.{attr}", v2))
    return found


async def test_a_vm_of_60_disks_syncs_with_small_payloads(
    env: WorkflowEnvironment, store: Store, tmp_path: Path
) -> None:
    store.create_vm("web", dict.fromkeys(KEYS, SIZE))
    job = Job(env, make_spec(store, inline_copy_bytes=0, connections=1), store, tmp_path)
    job.shadows = {k: Shadow(SIZE) for k in KEYS}
    for i, k in enumerate(KEYS):
        job.write(k, 0, 4 * KiB, i + 1)
    shadows = {}
    async with running(env, job):
        st = await job.settled(1)
        assert st.last_sync is not None and st.last_sync.kind == "full"
        shadows[st.last_sync.point_id] = job.now()
        for k in KEYS[::7]:
            job.write(k, BLOCK, BLOCK, 0xA5)
        r = await job.sync_now()
        assert (r.kind, r.bytes_read) == ("incremental", len(KEYS[::7]) * BLOCK)
        shadows[r.point_id] = job.now()
        await job.settled(2)
        for pid, sh in shadows.items():
            assert job.differs(pid, sh) == []
        assert job.handle is not None
        history = await job.handle.fetch_history()

    largest, total = (0, ""), 0
    copies = 0
    for event in history.events:
        for where, group in payloads_of(event):
            for p in group.payloads:
                largest = max(largest, (p.ByteSize(), f"event {event.event_id} {where}"))
                total += p.ByteSize()
        attrs = event.activity_task_scheduled_event_attributes
        if attrs.activity_type.name == "copy_disk":
            [req] = pydantic_data_converter.payload_converter.from_payloads(
                attrs.input.payloads, [CopyRequest]
            )
            assert [d.key for d in req.snapshot.disks] == [req.disk], "a copy carries its own disk only"
            copies += 1
    assert copies == 2 * DISKS  # each sync copied each disk in a task of its own (inline copy off)
    assert largest[0] < 64 * KiB, f"largest payload: {largest[0] // KiB} KiB at {largest[1]}"
    # the history's payloads, both syncs: 1.9 MB when each copy carried every disk's snapshot, 0.26 MB now
    assert total < 512 * KiB, f"{total // KiB} KiB of payloads in the history of two syncs"
