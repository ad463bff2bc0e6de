"""The EBS snapshot target when things go wrong (issue 9, items 4, 9 and 21): a sync retried after a
failed copy, a disk shrunk and grown again, a commit cut between its tag calls, points an image uses,
an export that fails. Every point reads exactly what the source held, and nothing is left behind
unnamed."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_aws import Backend
from helpers_kvm import MiB, fast_tuning, make_qcow2, qemu_io, run, same_content, sync_point, to_raw
from test_aws_target import exported, kvm_source, target

from connectors.aws.blocks import BLOCK, get_block, list_blocks
from connectors.aws.tags import TAG_COMMITTED, TAG_DISKS, TAG_POINT
from sendense.datapath.sync import copy_disk
from sendense.errors import ResourceNotFound, SendenseError, TargetError
from sendense.models import DiskInfo, PointDisk, PointInfo


def point_blocks(tgt, sid: str) -> dict[int, bytes]:  # type: ignore[no-untyped-def]
    """Every listed block of a snapshot, read with plain GetSnapshotBlock."""
    ebs = tgt.aws.client("ebs")
    return {i: get_block(tgt.aws, ebs, sid, i, tok) for i, tok in list_blocks(tgt.aws, ebs, sid)}


def info(snap, results, kind: str = "incremental") -> PointInfo:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return PointInfo(
        point_id=snap.snapshot_id,
        job="job",
        created_at=snap.created_at,
        committed_at=datetime.now(UTC),
        kind=kind,  # type: ignore[arg-type]
        disks=[PointDisk(key=d.key, size=d.size, change_id=d.change_id) for d in snap.disks],
    )


def test_a_retried_sync_starts_afresh_and_keeps_no_block_of_the_failed_attempt(
    backend: Backend, job: str, state_dir: Path, tmp_path: Path
) -> None:
    """Item 9: the first attempt of an incremental's copy fails after writing 0xEE at 40 MiB; the guest
    zeroes the range; the retry (a new snapshot under the same sync id, prepared again) zeroes it."""
    lab = backend.need_lab()
    d0 = make_qcow2(tmp_path / "d0.qcow2", 48 * MiB)
    qemu_io(d0, "write -P 0x11 0 1M")
    src, tgt = kvm_source(job, [d0], tmp_path), target(backend, job, state_dir)
    try:
        s1 = sync_point(src, tgt, "p1")
        qemu_io(d0, "write -P 0xee 40M 512k", "write -P 0x33 44M 2M")
        first = src.create_snapshot("p2", s1.base)
        tgt.prepare("p2", [DiskInfo(key="disk0", size=48 * MiB)])
        failed = tgt._sync_snapshots("p2")["disk0"]["SnapshotId"]
        lab.inject("PutSnapshotBlock", "ValidationException", count=50, status=400, after=1)
        try:
            with (
                src.open_disk(first, "disk0") as sd,
                tgt.open_disk("p2", "disk0") as td,
                pytest.raises(SendenseError),
            ):
                copy_disk(sd, td, first.disk("disk0"), fast_tuning(connections=1))
        finally:
            lab.clear_faults()
        src.release_snapshot(first, committed=False)
        qemu_io(d0, "write -z 40M 512k")
        again = src.create_snapshot("p2", s1.base)
        tgt.prepare("p2", [DiskInfo(key="disk0", size=48 * MiB)])
        fresh = tgt._sync_snapshots("p2")["disk0"]["SnapshotId"]
        assert fresh != failed and failed not in {s["SnapshotId"] for s in backend.tagged(job)}
        assert tgt.records.blocks(fresh).read_text() == ""  # a new record: nothing written yet
        with src.open_disk(again, "disk0") as sd, tgt.open_disk("p2", "disk0") as td:
            r = copy_disk(sd, td, again.disk("disk0"), fast_tuning(connections=1))
        assert r.kind == "incremental"
        assert r.stats.bytes_zeroed == BLOCK and r.stats.bytes_written == 4 * BLOCK
        p2 = tgt.commit("p2", info(again, [r]))
        src.release_snapshot(again, committed=True)
        assert same_content(exported(tgt, "p2", tmp_path / "x")["disk0"], to_raw(d0, tmp_path / "d0.raw"))
        blocks = point_blocks(tgt, p2.disks[0].path)
        assert blocks.get(40 * MiB // BLOCK, bytes(BLOCK)) == bytes(BLOCK)
        # nothing of the failed attempt is left: the points' snapshots only
        assert {s["SnapshotId"] for s in tgt._snapshots()} == {p.disks[0].path for p in tgt.list_points()}
        assert [p.name for p in state_dir.iterdir()] == [f"{failed}.deleted"]  # until EC2 lists it no more
    finally:
        tgt.destroy()


def test_a_zero_write_clears_a_block_the_pending_snapshot_wrote(
    backend: Backend, job: str, state_dir: Path, tmp_path: Path
) -> None:
    """Item 9 (b): within one pending snapshot, zeros over a block it wrote (none in the parent)."""
    d0 = make_qcow2(tmp_path / "d0.qcow2", 8 * MiB)
    qemu_io(d0, "write -P 0x11 0 512k")
    src, tgt = kvm_source(job, [d0], tmp_path), target(backend, job, state_dir)
    try:
        s1 = sync_point(src, tgt, "p1")
        snap = src.create_snapshot("p2", s1.base)
        tgt.prepare("p2", [DiskInfo(key="disk0", size=8 * MiB)])
        with tgt.open_disk("p2", "disk0") as td:
            w = td.connect()
            w.write(4 * MiB, b"\xee" * BLOCK)
            w.write(4 * MiB + BLOCK, b"\xef" * BLOCK)
            held = [(e.offset, e.length) for e in td.data_extents(0, 8 * MiB)]
            assert held == [(0, BLOCK), (4 * MiB, 2 * BLOCK)]  # the parent's block, then a run of two
            w.zero(4 * MiB, BLOCK)
            assert [(e.offset, e.length) for e in td.data_extents(0, 8 * MiB)] == [
                (0, BLOCK),
                (4 * MiB + BLOCK, BLOCK),
            ]
            assert w.read(4 * MiB, BLOCK) == bytes(BLOCK)  # a compare read sees the zeros it wrote
            w.flush()
        p2 = tgt.commit("p2", info(snap, []))
        assert point_blocks(tgt, p2.disks[0].path)[8] == bytes(BLOCK)
    finally:
        tgt.destroy()


def test_a_disk_shrunk_then_grown_reads_zeros_beyond_the_shrunk_size(
    backend: Backend, job: str, state_dir: Path, tmp_path: Path
) -> None:
    """Item 4: the parent's blocks beyond a shrunk size never come back (nor the tail of the block
    the new end falls in)."""
    d0 = make_qcow2(tmp_path / "d0.qcow2", 24 * MiB)
    qemu_io(d0, "write -P 0x11 0 1M", "write -P 0xcd 8M 1M", "write -P 0xab 20M 1M")
    src, tgt = kvm_source(job, [d0], tmp_path), target(backend, job, state_dir)
    try:
        s = sync_point(src, tgt, "p1")
        # 64 KiB into a block: a whole qcow2 cluster (qcow2 keeps a cut cluster's tail, and shows it
        # again when the image grows; that is the source's business, not this test's)
        run("qemu-img", "resize", "-q", "--shrink", d0, 8 * MiB + 64 * 1024)
        s = sync_point(src, tgt, "p2", s.base)
        shrunk = to_raw(d0, tmp_path / "p2.raw")
        run("qemu-img", "resize", "-q", d0, 24 * MiB)
        s = sync_point(src, tgt, "p3", s.base)
        assert same_content(exported(tgt, "p2", tmp_path / "x2")["disk0"], shrunk)
        grown = exported(tgt, "p3", tmp_path / "x3")["disk0"]
        data = grown.read_bytes()
        assert len(data) == 24 * MiB
        head = 8 * MiB + 64 * 1024
        assert data[8 * MiB : head] == b"\xcd" * (64 * 1024) and data[head:] == bytes(24 * MiB - head)
        assert same_content(grown, to_raw(d0, tmp_path / "p3.raw"))
        assert tgt.prune(1) == ["p2", "p1"]  # item 3 on AWS: the parents go, the point reads the same
        assert exported(tgt, "p3", tmp_path / "x4")["disk0"].read_bytes() == data
    finally:
        tgt.destroy()


def test_a_commit_cut_between_its_tag_calls_is_no_point_and_abort_removes_it(
    backend: Backend, job: str, state_dir: Path, vm: list[Path], tmp_path: Path
) -> None:
    """Item 21: a permanent error after disk 0's CreateTags: no half point is listed (nor pruned), and
    the abort removes every snapshot of the sync, also those an older commit tagged as committed."""
    lab = backend.need_lab()
    src, tgt = kvm_source(job, vm, tmp_path), target(backend, job, state_dir)
    try:
        s1 = sync_point(src, tgt, "p1")
        kept = {d.path for d in s1.point.disks}
        qemu_io(vm[0], "write -P 0x44 0 1M")
        lab.inject("CreateTags", "InvalidParameterValue", count=1, after=1)
        taken: list = []  # type: ignore[type-arg]
        with pytest.raises(SendenseError):
            sync_point(src, tgt, "p2", s1.base, before_copy=taken.append)
        lab.clear_faults()
        assert [p.point_id for p in tgt.list_points()] == ["p1"] and tgt.prune(1) == []
        tgt.abort("p2")  # as the workflow does after a permanent commit error
        src.release_snapshot(taken[0], committed=False)
        assert {s["SnapshotId"] for s in backend.tagged(job)} == kept
        # a commit of an older version tagged disk by disk: disk 0 looks committed, disk 1 is not
        snap = src.create_snapshot("p3", s1.base)
        tgt.prepare("p3", [DiskInfo(key=d.key, size=d.size) for d in snap.disks])
        for d in snap.disks:
            with src.open_disk(snap, d.key) as sd, tgt.open_disk("p3", d.key) as td:
                copy_disk(sd, td, d, fast_tuning())
        half = tgt._sync_snapshots("p3")["disk0"]["SnapshotId"]
        tgt._complete(tgt.aws.client("ebs"), half, "disk0")
        tags = {TAG_POINT: "p3", TAG_DISKS: "2", TAG_COMMITTED: "2026-01-01T00:00:00+00:00"}
        backend.ec2().create_tags(Resources=[half], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        tgt.records.blocks(half).unlink()  # that version dropped a disk's record once it was tagged
        assert [p.point_id for p in tgt.list_points()] == ["p1"]
        tgt.abort("p3")
        src.release_snapshot(snap, committed=False)
        assert {s["SnapshotId"] for s in tgt._snapshots()} == kept
    finally:
        tgt.destroy()


def test_points_an_image_uses_are_kept_whole_and_destroy_names_what_stays(
    backend: Backend, job: str, state_dir: Path, vm: list[Path], tmp_path: Path
) -> None:
    """Item 21: prune skips a point an image uses (both its snapshots stay, still a point); destroy
    raises one line naming the snapshots and the image; once the image is gone, destroy removes the
    rest and the target's state directory."""
    backend.need_lab()
    src, tgt = kvm_source(job, vm, tmp_path), target(backend, job, state_dir)
    s1 = sync_point(src, tgt, "p1")
    qemu_io(vm[0], "write -P 0x45 0 1M")
    sync_point(src, tgt, "p2", s1.base)
    ec2 = backend.ec2()
    held = sorted(d.path for d in s1.point.disks)
    image = ec2.register_image(
        Name=f"held-{job}",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[
            {"DeviceName": dev, "Ebs": {"SnapshotId": sid}}
            for dev, sid in zip(("/dev/xvda", "/dev/sdf"), [d.path for d in s1.point.disks], strict=True)
        ],
    )["ImageId"]
    try:
        assert tgt.prune(1) == []
        assert [p.point_id for p in tgt.list_points()] == ["p2", "p1"]
        with pytest.raises(TargetError) as ei:
            tgt.destroy()
        assert ei.value.message == (
            f"target {tgt.aws.where()}: 2 snapshots of job {job} stay: "
            f"{held[0]}, {held[1]} (in use by image {image})"
        )
        assert "\n" not in ei.value.message and not ei.value.retryable
        assert {s["SnapshotId"] for s in tgt._snapshots()} == set(held)
    finally:
        ec2.deregister_image(ImageId=image)
    tgt.destroy()
    assert tgt._snapshots() == [] and not state_dir.exists()


def test_a_failed_export_leaves_no_partial_file(
    backend: Backend, job: str, state_dir: Path, vm: list[Path], tmp_path: Path
) -> None:
    lab = backend.need_lab()
    src, tgt = kvm_source(job, vm, tmp_path), target(backend, job, state_dir)
    try:
        sync_point(src, tgt, "p1")
        out = tmp_path / "out"
        lab.inject("GetSnapshotBlock", "AccessDeniedException", count=1, status=403, after=3)
        try:
            with pytest.raises(SendenseError):
                tgt.export("p1", "qcow2", out)
        finally:
            lab.clear_faults()
        assert list(out.iterdir()) == []
    finally:
        tgt.destroy()


def test_a_copy_of_a_points_snapshot_with_its_tags_is_not_the_points(
    backend: Backend, job: str, state_dir: Path, vm: list[Path], tmp_path: Path
) -> None:
    """Someone copies a point's snapshot, tags and all: the point stays whole and the copy is not ours
    to delete."""
    backend.need_lab()
    src, tgt = kvm_source(job, vm, tmp_path), target(backend, job, state_dir)
    ec2 = backend.ec2()
    s1 = sync_point(src, tgt, "p1")
    orig = s1.point.disks[0].path
    tags = ec2.describe_snapshots(SnapshotIds=[orig])["Snapshots"][0]["Tags"]
    copy = ec2.copy_snapshot(SourceSnapshotId=orig, SourceRegion=backend.region)["SnapshotId"]
    ec2.create_tags(Resources=[copy], Tags=tags)
    try:
        assert [p.point_id for p in tgt.list_points()] == ["p1"]
        assert tgt.get_point("p1").disks[0].path == orig
        with pytest.raises(TargetError, match=f"{copy} \\(not started by this agent"):
            tgt.destroy()
        assert [s["SnapshotId"] for s in backend.tagged(job)] == [copy]
    finally:
        ec2.delete_snapshot(SnapshotId=copy)


def test_a_deleted_pending_snapshot_ec2_still_lists_is_still_the_targets(
    backend: Backend, job: str, state_dir: Path
) -> None:
    """AWS lets a snapshot in progress be deleted, the deletion taking effect when it completes: it may
    stay listed. The target's tombstone keeps it its own (deleted again, never named as foreign)."""
    tgt = target(backend, job, state_dir)
    tgt.prepare("p1", [DiskInfo(key="disk0", size=4 * MiB)])
    sid = tgt._sync_snapshots("p1")["disk0"]["SnapshotId"]
    tgt.records.deleted(sid)  # as after a deletion EC2 has not applied yet
    with pytest.raises(ResourceNotFound):
        with tgt.open_disk("p1", "disk0"):
            pass
    tgt.prepare("p1", [DiskInfo(key="disk0", size=4 * MiB)])  # deletes it again, starts afresh
    assert sid not in {s["SnapshotId"] for s in backend.tagged(job)}
    tgt.abort("p1")
    tgt.prepare("p2", [DiskInfo(key="disk0", size=4 * MiB)])  # EC2 lists it no more: the tombstone goes
    assert not tgt.records.tombstone(sid).exists()
    tgt.destroy()
    assert backend.tagged(job) == [] and not state_dir.exists()


def test_a_restarted_first_sync_keeps_nothing_of_the_first_attempt(
    backend: Backend, job: str, state_dir: Path, tmp_path: Path
) -> None:
    """Item 2 on an AWS target: a full copy skips zero ranges, so a retried first sync must not write
    into the first attempt's snapshot (it wrote 0xEE at 2 MiB; the guest zeroed it before the retry)."""
    lab = backend.need_lab()
    d0 = make_qcow2(tmp_path / "d0.qcow2", 8 * MiB)
    qemu_io(d0, "write -P 0xee 2M 512k", "write -P 0x12 4M 1M")
    src, tgt = kvm_source(job, [d0], tmp_path), target(backend, job, state_dir)
    try:
        first = src.create_snapshot("p1", {})
        tgt.prepare("p1", [DiskInfo(key="disk0", size=8 * MiB)])
        lab.inject("PutSnapshotBlock", "ValidationException", count=50, status=400, after=1)
        try:
            with (
                src.open_disk(first, "disk0") as sd,
                tgt.open_disk("p1", "disk0") as td,
                pytest.raises(SendenseError),
            ):
                copy_disk(sd, td, first.disk("disk0"), fast_tuning(connections=1))
        finally:
            lab.clear_faults()
        src.release_snapshot(first, committed=False)
        qemu_io(d0, "write -z 2M 512k")
        s = sync_point(src, tgt, "p1")
        assert s.results["disk0"].kind == "full" and s.results["disk0"].stats.bytes_written == 2 * BLOCK
        assert same_content(exported(tgt, "p1", tmp_path / "x")["disk0"], to_raw(d0, tmp_path / "d0.raw"))
    finally:
        tgt.destroy()


def test_a_prune_cut_between_its_deletes_leaves_no_half_point(
    backend: Backend, job: str, state_dir: Path, vm: list[Path], tmp_path: Path
) -> None:
    """The point is marked on all its snapshots at once before the deletes: cut after one, the rest is
    no point (not listed, not a parent) and the next prepare removes it."""
    lab = backend.need_lab()
    src, tgt = kvm_source(job, vm, tmp_path), target(backend, job, state_dir)
    try:
        s1 = sync_point(src, tgt, "p1")
        qemu_io(vm[0], "write -P 0x46 0 1M")
        s2 = sync_point(src, tgt, "p2", s1.base)
        lab.inject("DeleteSnapshot", "InvalidParameterValue", count=1, after=1)
        try:
            with pytest.raises(SendenseError, match="DeleteSnapshot"):
                tgt.prune(1)
        finally:
            lab.clear_faults()
        assert [p.point_id for p in tgt.list_points()] == ["p2"]
        assert len(backend.tagged(job)) == 3  # p2's two, one of p1's
        tgt.prepare("p3", [DiskInfo(key=d.key, size=d.size) for d in s2.snap.disks])
        tgt.abort("p3")
        assert {s["SnapshotId"] for s in backend.tagged(job)} == {d.path for d in s2.point.disks}
    finally:
        tgt.destroy()


def test_a_worker_dying_right_after_start_snapshot_leaves_no_orphan(
    backend: Backend, job: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The StartSnapshot was answered but the worker died before recording the snapshot: the next
    prepare (or destroy) asks again with the same ClientToken, gets that snapshot, and deletes it."""
    tgt = target(backend, job, state_dir)

    def dies(sid: str, intent: Path) -> None:
        raise KeyboardInterrupt  # the process is gone before the record is written

    monkeypatch.setattr(tgt.records, "started", dies)
    with pytest.raises(KeyboardInterrupt):
        tgt.prepare("p1", [DiskInfo(key="disk0", size=4 * MiB)])
    (orphan,) = backend.tagged(job)
    again = target(backend, job, state_dir)  # a new worker
    again.prepare("p1", [DiskInfo(key="disk0", size=4 * MiB)])
    fresh = again._sync_snapshots("p1")["disk0"]["SnapshotId"]
    assert fresh != orphan["SnapshotId"]
    assert [s["SnapshotId"] for s in backend.tagged(job)] == [fresh]
    again.destroy()
    assert backend.tagged(job) == [] and not state_dir.exists()
