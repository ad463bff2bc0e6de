"""begin_and_copy, the real activity (temporalio's ActivityEnvironment), on real qcow2 images: the
disks whose changes fit are copied inside the task, the rest are left to copy_disk, and a failure
inside leaves no snapshot behind."""

from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers_kvm import MiB, bitmap_names, make_qcow2, qemu_io, same_content, to_raw
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import replication
from activities.replication import begin_and_copy, copy_disk, finish_sync
from connectors.kvm import offline
from connectors.kvm.identity import bitmap_name, disk_tag
from connectors.kvm.spec import KvmSource, KvmTarget
from connectors.kvm.target import KvmTarget as Replicas
from sendense.errors import DataPathError
from sendense.models import (
    CommitRequest,
    CopyRequest,
    CopyToken,
    FinishResult,
    JobSpec,
    SnapshotRequest,
    Tuning,
)

JOB = "inline"


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[JobSpec, list[Path], Path]:
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path / "home"))
    disks = [make_qcow2(tmp_path / "d0.qcow2", 32 * MiB), make_qcow2(tmp_path / "d1.qcow2", 32 * MiB)]
    qemu_io(disks[0], "write -P 0x11 0 2M")
    qemu_io(disks[1], "write -P 0x22 0 8M")
    spec = JobSpec(
        name=JOB,
        source=KvmSource(platform="kvm", disks=disks),
        target=KvmTarget(platform="kvm", path=tmp_path / "rep"),
        tuning=Tuning(chunk_size=1 * MiB, connections=2),
    )
    return spec, disks, tmp_path


def test_the_disks_that_fit_are_copied_inline_and_the_rest_by_copy_disk(rig) -> None:
    spec, disks, tmp = rig
    env = ActivityEnvironment()
    sid = "s1"
    refs = [to_raw(d, tmp / f"{d.stem}.raw") for d in disks]  # the source at the snapshot instant
    begun = env.run(begin_and_copy, SnapshotRequest(spec=spec, snapshot_id=sid, copy_up_to=4 * MiB))
    assert [r.key for r in begun.copied] == ["disk0"]  # 2 MiB fits in 4 MiB; disk1's 8 MiB does not
    assert begun.copied[0].kind == "full" and begun.copied[0].stats.bytes_written == 2 * MiB
    rest = env.run(copy_disk, CopyRequest(spec=spec, sync_id=sid, snapshot=begun.snapshot, disk="disk1"))
    done = env.run(
        finish_sync,
        CommitRequest(spec=spec, sync_id=sid, snapshot=begun.snapshot, results=[*begun.copied, rest]),
    )
    assert done.release_error is None and done.point.stats.bytes_written == 10 * MiB
    replicas = Replicas(JOB, spec.target.path)
    for key, ref in zip(("disk0", "disk1"), refs, strict=True):
        assert same_content(replicas.point_path(sid, key), ref), key

    # the next sync: both disks' changes fit, both are copied inline, incrementally
    qemu_io(disks[0], "write -P 0x33 1M 64k")
    qemu_io(disks[1], "write -P 0x44 20M 64k")
    base = {d.key: d.change_id for d in begun.snapshot.disks}
    nxt = env.run(begin_and_copy, SnapshotRequest(spec=spec, snapshot_id="s2", base=base, copy_up_to=4 * MiB))
    assert [(r.key, r.kind) for r in nxt.copied] == [("disk0", "incremental"), ("disk1", "incremental")]
    assert [r.stats.bytes_written for r in nxt.copied] == [64 * 1024, 64 * 1024]


def test_a_failed_inline_copy_releases_the_snapshot(rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy step fails (an I/O error, injected there: snapshot and prepare are real): the error
    goes up, and the snapshot's bitmaps are removed again, as after a failed prepare."""
    spec, disks, _ = rig
    env = ActivityEnvironment()

    def broken_copy(*args: object, **kw: object) -> None:
        raise DataPathError("write at 0 to the replica: Input/output error")

    monkeypatch.setattr(replication, "run_copy_disk", broken_copy)
    with pytest.raises(ApplicationError) as ei:
        env.run(begin_and_copy, SnapshotRequest(spec=spec, snapshot_id="s1", copy_up_to=64 * MiB))
    assert "Input/output error" in ei.value.message and "\n" not in ei.value.message
    assert ei.value.type == "DataPathError" and not ei.value.non_retryable
    assert [bitmap_names(d) for d in disks] == [[], []]  # released, uncommitted


def test_a_long_begin_heartbeats_from_a_side_thread_and_stops_with_the_block() -> None:
    """begin_and_copy has no checkpoints of its own: a side thread heartbeats while it runs, so a dead
    worker is noticed after the heartbeat timeout; the thread ends with the block."""
    beats: list[tuple[object, ...]] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)

    def long_step() -> int:
        with replication.heartbeating(0.05):
            time.sleep(0.5)
        n = len(beats)
        time.sleep(0.2)
        return n

    during = env.run(long_step)
    assert during >= 5  # every 0.05 s
    assert len(beats) == during  # none after the block
    assert not [t for t in threading.enumerate() if t.name == "heartbeat"]


def test_side_thread_heartbeats_come_three_times_per_heartbeat_timeout() -> None:
    """A job's heartbeat timeout may be 1 s: a step that heartbeats every 5 s by default would time out
    whenever it ran longer (found by a throttled resync inside begin_and_copy with a 5 s timeout)."""
    from datetime import timedelta

    beats: list[float] = []
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, heartbeat_timeout=timedelta(seconds=0.3))
    env.on_heartbeat = lambda *details: beats.append(time.monotonic())

    def long_step() -> None:
        with replication.heartbeating(5.0):
            time.sleep(0.65)

    env.run(long_step)
    assert len(beats) >= 5  # every 0.1 s, not every 5 s


def test_a_small_sync_asked_to_finish_is_committed_in_the_task_and_a_retry_never_copies_again(
    rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finish=True and every disk fits: the point is committed and the base released in the task. A
    retry whose earlier attempt died after the copy (before or after the commit) commits what that
    attempt copied, from its local record, and copies nothing."""
    spec, disks, tmp = rig
    env = ActivityEnvironment()
    seed = env.run(
        begin_and_copy, SnapshotRequest(spec=spec, snapshot_id="s1", copy_up_to=64 * MiB, finish=True)
    )
    assert seed.finished is not None and seed.finished.point.point_id == "s1"
    assert seed.finished.point.kind == "full" and seed.finished.release_error is None
    assert [bitmap_names(d) for d in disks] == [
        [bitmap_name(JOB, "s1", disk_tag(f"disk{i}", str(d)))] for i, d in enumerate(disks)
    ]

    qemu_io(disks[0], "write -P 0x55 3M 64k")
    refs = [to_raw(d, tmp / f"{d.stem}-s2.raw") for d in disks]
    base = {d.key: d.change_id for d in seed.snapshot.disks}
    req = SnapshotRequest(spec=spec, snapshot_id="s2", base=base, copy_up_to=64 * MiB, finish=True)
    real_finish = replication._finish

    def dies_while_committing(commit: CommitRequest) -> FinishResult:
        raise DataPathError("worker lost")  # stands for the process dying here

    monkeypatch.setattr(replication, "_finish", dies_while_committing)
    with pytest.raises(ApplicationError):
        env.run(begin_and_copy, req)
    replicas = Replicas(JOB, spec.target.path)
    assert [p.point_id for p in replicas.list_points()] == ["s1"]

    def no_copy(*args: object, **kw: object) -> None:
        raise AssertionError("a retry copied again")

    monkeypatch.setattr(replication, "_finish", real_finish)
    monkeypatch.setattr(replication, "run_copy_disk", no_copy)
    first = env.run(begin_and_copy, req)  # the retry: commits what the first attempt copied
    assert first.finished is not None and first.finished.point.point_id == "s2"
    assert [(r.key, r.stats.bytes_written) for r in first.copied] == [("disk0", 64 * 1024), ("disk1", 0)]
    for key, ref in zip(("disk0", "disk1"), refs, strict=True):
        assert same_content(replicas.point_path("s2", key), ref), key
    s2 = [[bitmap_name(JOB, "s2", disk_tag(f"disk{i}", str(d)))] for i, d in enumerate(disks)]
    assert [bitmap_names(d) for d in disks] == s2  # the base is released

    again = env.run(begin_and_copy, req)  # a retry after the commit (the result was lost)
    assert again.finished is not None and again.finished.point == first.finished.point
    assert [p.point_id for p in replicas.list_points()] == ["s2", "s1"]


def test_a_sync_that_does_not_fit_is_not_finished_in_the_task(rig) -> None:
    spec, _, _ = rig
    env = ActivityEnvironment()
    begun = env.run(
        begin_and_copy, SnapshotRequest(spec=spec, snapshot_id="s1", copy_up_to=4 * MiB, finish=True)
    )
    assert [r.key for r in begun.copied] == ["disk0"] and begun.finished is None
    assert Replicas(JOB, spec.target.path).list_points() == []


def test_a_retried_begin_never_keeps_what_the_failed_attempt_wrote(
    rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9 item 2: the first attempt copies disk0 in full, then fails on disk1 (the disk was
    written after the snapshot instant); disk0 is zeroed at the source; the retry of the task (same
    sync id, a new snapshot) must commit zeros for disk0, not the first attempt's bytes: a full
    copy skips zero ranges, so it must start from a fresh replica."""
    spec, disks, tmp = rig
    env = ActivityEnvironment()
    real_copy = replication.run_copy_disk
    calls = [0]

    def copy_then_disk1_written(sd, td, d, *args, **kw):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if d.key == "disk1" and calls[0] == 2:
            raise DataPathError("source disk d1.qcow2: read failed")  # the first attempt ends here
        return real_copy(sd, td, d, *args, **kw)

    monkeypatch.setattr(replication, "run_copy_disk", copy_then_disk1_written)
    req = SnapshotRequest(spec=spec, snapshot_id="s1", copy_up_to=64 * MiB, finish=True)
    with pytest.raises(ApplicationError):
        env.run(begin_and_copy, req)
    qemu_io(disks[0], "write -z 0 2M")  # the source changes before the retry: disk0 is all zero now
    refs = [to_raw(d, tmp / f"{d.stem}-retry.raw") for d in disks]
    done = env.run(begin_and_copy, req)
    assert done.finished is not None and done.finished.point.kind == "full"
    replicas = Replicas(JOB, spec.target.path)
    for key, ref in zip(("disk0", "disk1"), refs, strict=True):
        assert same_content(replicas.point_path("s1", key), ref), key


def test_a_resume_token_of_another_snapshot_of_the_same_sync_is_not_used(rig) -> None:
    """A token file left by a copy of an earlier snapshot of the same sync id (a retried begin) must
    not make the copy of the new snapshot skip what lies below its offset."""
    spec, disks, tmp = rig
    env = ActivityEnvironment()
    first = env.run(begin_and_copy, SnapshotRequest(spec=spec, snapshot_id="s1", copy_up_to=0))
    store = Path(tmp / "home" / "work" / JOB / "tokens")
    store.mkdir(parents=True, exist_ok=True)
    stale = CopyToken(
        sync_id="s1", disk="disk1", offset=32 * MiB, snapshot_at=datetime(2020, 1, 1, tzinfo=UTC)
    )
    (store / "s1-disk1.json").write_text(stale.model_dump_json())
    res = env.run(copy_disk, CopyRequest(spec=spec, sync_id="s1", snapshot=first.snapshot, disk="disk1"))
    assert res.resumed_from == 0 and res.stats.bytes_written == 8 * MiB


@pytest.mark.parametrize(("dedupe", "markers"), [(True, True), (True, False), (False, False)])
def test_a_disk_shrunk_and_grown_back_between_syncs_reads_zeros_beyond_the_shrink(
    rig, monkeypatch: pytest.MonkeyPatch, dedupe: bool, markers: bool
) -> None:
    """Found by the scenario runner: qemu-img resize marks nothing dirty, so after a shrink and a grow
    back to the same size the bitmap is clean where the disk now reads zeros; the incremental must
    still bring the replica to zeros there (and, with dedupe, write nothing where it already is).
    The stopped-VM form's shrink markers catch it; without them (markers=False: as a source with no
    markers, e.g. libvirt) the data path's own check (sync.untracked_ranges) must."""
    spec, disks, tmp = rig
    if not markers:

        class NoMarkers(offline.NbdSourceDisk):
            def __init__(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
                kw.update(regrown=None, tracks_resize=False)
                super().__init__(*a, **kw)

        monkeypatch.setattr(offline, "NbdSourceDisk", NoMarkers)
    spec = spec.model_copy(update={"tuning": spec.tuning.model_copy(update={"dedupe_incremental": dedupe})})
    env = ActivityEnvironment()
    qemu_io(disks[0], "write -P 0x66 8M 16M")
    seed = env.run(
        begin_and_copy, SnapshotRequest(spec=spec, snapshot_id="s1", copy_up_to=64 * MiB, finish=True)
    )
    assert seed.finished is not None
    subprocess.run(["qemu-img", "resize", "-q", "--shrink", str(disks[0]), "12M"], check=True)
    subprocess.run(["qemu-img", "resize", "-q", str(disks[0]), "32M"], check=True)
    refs = [to_raw(d, tmp / f"{d.stem}-s2.raw") for d in disks]
    base = {d.key: d.change_id for d in seed.snapshot.disks}
    req = SnapshotRequest(spec=spec, snapshot_id="s2", base=base, copy_up_to=64 * MiB, finish=True)
    done = env.run(begin_and_copy, req)
    assert done.finished is not None and done.finished.point.kind == "incremental"
    replicas = Replicas(JOB, spec.target.path)
    for key, ref in zip(("disk0", "disk1"), refs, strict=True):
        assert same_content(replicas.point_path("s2", key), ref), key
    # a third sync with nothing changed writes nothing, even where it checked again
    s2 = {d.key: d.change_id for d in done.snapshot.disks}
    again = env.run(
        begin_and_copy,
        SnapshotRequest(spec=spec, snapshot_id="s3", base=s2, copy_up_to=64 * MiB, finish=True),
    )
    assert again.finished is not None
    assert again.finished.point.stats.bytes_written == 0
