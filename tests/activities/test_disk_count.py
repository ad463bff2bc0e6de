"""A VM whose disks are discovered (a running VM's, an instance's) with more of them than a spec may
list is refused in one line by the activities, and a snapshot already taken of it is released."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.replication import create_snapshot, validate_job
from connectors.memory.spec import MemorySource, MemoryTarget
from connectors.memory.store import Store
from sendense.models import MAX_DISKS, JobRequest, JobSpec, SnapshotRequest


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))
    s = Store.named(f"act-{uuid.uuid4().hex[:8]}")
    yield s
    Store.discard(s)


def job(store: Store, disks: int) -> JobSpec:
    store.create_vm("web", {f"disk{i}": 4096 for i in range(disks)})
    return JobSpec(
        name="many",
        source=MemorySource(platform="memory", vm="web", store=store.name),
        target=MemoryTarget(platform="memory", store=store.name),
    )


def refused(fn: object, arg: object) -> ApplicationError:
    with pytest.raises(ApplicationError) as ei:
        ActivityEnvironment().run(fn, arg)  # type: ignore[arg-type]
    assert ei.value.non_retryable and ei.value.type == "InvalidSpec" and "\n" not in str(ei.value)
    return ei.value


def test_a_vm_with_more_disks_than_the_cap_is_refused(store: Store) -> None:
    spec = job(store, MAX_DISKS + 1)
    expected = f"source memory:{store.name}:web: the VM has {MAX_DISKS + 1} disks; at most {MAX_DISKS} per VM"
    assert refused(validate_job, JobRequest(spec=spec)).message == expected
    assert refused(create_snapshot, SnapshotRequest(spec=spec, snapshot_id="s1")).message == expected
    assert all(ids == [] for ids in store.change_ids("web").values()), "the refused snapshot was kept"


def test_a_vm_at_the_cap_is_accepted(store: Store) -> None:
    spec = job(store, MAX_DISKS)
    assert len(ActivityEnvironment().run(validate_job, JobRequest(spec=spec)).disks) == MAX_DISKS
