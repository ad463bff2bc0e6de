"""OfflineQcow2Source (a stopped VM's qcow2 images) replicating into KvmTarget."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers_kvm import (
    SHRINK_MARKER,
    KiB,
    MiB,
    Synced,
    all_bitmap_names,
    fast_tuning,
    make_qcow2,
    qemu_io,
    run,
    same_content,
    sync_point,
    to_raw,
)

from connectors.kvm.offline import OfflineQcow2Source, disk_tag
from connectors.kvm.target import KvmTarget
from sendense.datapath.sync import copy_disk
from sendense.errors import (
    DataPathError,
    InvalidSpec,
    ResourceNotFound,
    ResourceUnavailable,
    SendenseError,
    SnapshotInconsistent,
)
from sendense.models import PointDisk, PointInfo, SnapshotRef
from tools.qemu import qemu_nbd

JOB = "j"


def bm(snapshot_id: str, img: Path, job: str = JOB, key: str = "disk0") -> str:
    """The bitmap of snapshot `snapshot_id` on disk `key` of image `img` (its name carries the disk)."""
    return f"sendense.{job}.{snapshot_id}.{disk_tag(key, str(img))}"


class Rig:
    """A source with its images, a target, and raw copies of the source taken at each snapshot."""

    def __init__(self, tmp: Path, sizes: list[int], job: str = JOB, images: list[Path] | None = None) -> None:
        self.tmp = tmp
        self.images = images or [make_qcow2(tmp / f"vm-disk{i}.qcow2", s) for i, s in enumerate(sizes)]
        self.src = OfflineQcow2Source(job, self.images)
        self.tgt = KvmTarget(job, tmp / ("replicas" if job == JOB else f"replicas-{job}"))
        self.job = job
        self.raws: dict[tuple[str, str], Path] = {}

    def snapshot_raws(self, snap: SnapshotRef) -> None:
        """What the point must hold: the source right after create_snapshot."""
        for d in snap.disks:
            self.raws[(snap.snapshot_id, d.key)] = to_raw(
                Path(d.handle["path"]), self.tmp / f"{self.job}-{snap.snapshot_id}-{d.key}.raw"
            )

    def sync(self, sync_id: str, base: dict[str, str | None] | None = None, **kw: object) -> Synced:
        return sync_point(self.src, self.tgt, sync_id, base, before_copy=self.snapshot_raws, **kw)  # type: ignore[arg-type]

    def assert_point_exact(self, sync_id: str) -> None:
        for (sid, key), raw in self.raws.items():
            if sid == sync_id:
                assert same_content(self.tgt.point_path(sid, key), raw), f"point {sid} disk {key} differs"


def bitmap_names(path: Path) -> list[str]:
    """The image's bitmaps, each job bitmap with its shrink marker (checked, then left out), no marker
    without its bitmap."""
    names = all_bitmap_names(path)
    markers = {n for n in names if n.startswith(SHRINK_MARKER)}
    plain = [n for n in names if n not in markers]
    ours = [SHRINK_MARKER + n[len("sendense.") :] for n in plain if n.startswith("sendense.")]
    assert markers == {f"{m}.{kind}" for m in ours for kind in ("span", "tail")}, names
    return plain


def error_text(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# -------------------------------------------------------------------------------- validate, discover


def test_missing_image_is_resource_not_found_naming_the_field(tmp_path: Path) -> None:
    good = make_qcow2(tmp_path / "a.qcow2", 16 * MiB)
    with pytest.raises(ResourceNotFound) as ei:
        OfflineQcow2Source(JOB, [tmp_path / "gone.qcow2"]).validate()
    assert error_text(ei).startswith("source.disks[0]: ")
    assert "gone.qcow2" in str(ei.value)
    with pytest.raises(ResourceNotFound, match=r"^source\.disks\[1\]: .*gone\.qcow2"):
        OfflineQcow2Source(JOB, [good, tmp_path / "gone.qcow2"]).validate()


def test_raw_image_is_invalid_spec_not_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "vm.img"
    run("qemu-img", "create", "-q", "-f", "raw", raw, 16 * MiB)
    with pytest.raises(InvalidSpec) as ei:
        OfflineQcow2Source(JOB, [raw]).validate()
    assert error_text(ei).startswith("source.disks[0]: ")
    assert "not qcow2" in str(ei.value)


def test_a_directory_is_invalid_spec(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match=r"^source\.disks\[0\]: .* is not a file"):
        OfflineQcow2Source(JOB, [tmp_path]).validate()


def test_images_that_can_never_sync_are_refused_at_validate_saying_what_to_do(tmp_path: Path) -> None:
    """qcow2 v2 cannot hold bitmaps and a 0-byte image has nothing to copy: both used to be accepted at
    create and then failed every sync."""
    good = make_qcow2(tmp_path / "good.qcow2", 16 * MiB)
    v2 = tmp_path / "old.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, 16 * MiB)
    with pytest.raises(InvalidSpec) as ei:
        OfflineQcow2Source(JOB, [good, v2]).validate()
    assert error_text(ei).startswith("source.disks[1]: ")
    assert f"qemu-img amend -o compat=1.1 {v2}" in str(ei.value)

    zero = make_qcow2(tmp_path / "zero.qcow2", 0)
    with pytest.raises(InvalidSpec) as ei:
        OfflineQcow2Source(JOB, [zero]).validate()
    assert (
        error_text(ei)
        == f"source.disks[0]: {zero} has a virtual size of 0 bytes: leave it out of source.disks"
    )

    empty = tmp_path / "empty.img"
    empty.touch()
    with pytest.raises(InvalidSpec) as ei:
        OfflineQcow2Source(JOB, [good, empty]).validate()
    assert error_text(ei).startswith(f"source.disks[1]: {empty} is an empty file")
    raw = tmp_path / "vm.img"
    run("qemu-img", "create", "-q", "-f", "raw", raw, 16 * MiB)
    with pytest.raises(InvalidSpec) as ei:
        OfflineQcow2Source(JOB, [raw]).validate()
    assert f"qemu-img convert -O qcow2 {raw}" in error_text(ei)


def test_discover_reports_every_disk_with_its_size(tmp_path: Path) -> None:
    a = make_qcow2(tmp_path / "web1.qcow2", 32 * MiB)
    b = make_qcow2(tmp_path / "web1-data.qcow2", 16 * MiB + 512 * 1024)
    vm = OfflineQcow2Source(JOB, [a, b]).discover()
    assert vm.name == "web1" and vm.platform == "kvm"
    assert [(d.key, d.size, d.ref) for d in vm.disks] == [
        ("disk0", 32 * MiB, str(a)),
        ("disk1", 16 * MiB + 512 * 1024, str(b)),
    ]


# ------------------------------------------------------------------------------------- replication


def test_full_then_two_incrementals_are_bit_exact(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [64 * MiB])
    img = rig.images[0]
    qemu_io(img, "write -P 0x11 0 10M", "write -z 20M 1M", "write -P 0x22 50M 3M")
    p1 = rig.sync("p1")
    qemu_io(img, "write -P 0x33 5M 64k", "write -z 50M 1M", "write -P 0x44 40M 2M")
    p2 = rig.sync("p2", p1.base)
    qemu_io(img, "write -P 0x55 6M 4k", "write -P 0x66 63M 1M")
    p3 = rig.sync("p3", p2.base)

    assert [p1.results["disk0"].kind, p2.results["disk0"].kind, p3.results["disk0"].kind] == [
        "full",
        "incremental",
        "incremental",
    ]
    for sid in ("p1", "p2", "p3"):
        rig.assert_point_exact(sid)
    assert [p.point_id for p in rig.tgt.list_points()] == ["p3", "p2", "p1"]
    assert [p.kind for p in rig.tgt.list_points()] == ["incremental", "incremental", "full"]
    assert same_content(rig.tgt.point_path("p3", "disk0"), img)


def test_incremental_copies_exactly_the_changed_clusters(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [64 * MiB])
    img = rig.images[0]
    qemu_io(img, "write -P 0x01 0 16M")  # allocate the region first, so changed clusters are all data
    p1 = rig.sync("p1")
    assert p1.results["disk0"].stats.bytes_written == 16 * MiB

    qemu_io(
        img,
        "write -P 0x51 5M 4k",  # one 64 KiB cluster
        "write -P 0x52 7200k 1M",  # 7M+16K .. 8M+16K: clusters 7M .. 8M+64K = 1088 KiB
        "write -P 0x53 7300k 8k",  # inside the previous write: nothing more
        "write -z 12M 1M",  # a zeroed range: zeroed on the target, no payload
    )
    p2 = rig.sync("p2", p1.base)
    stats = p2.results["disk0"].stats
    assert stats.bytes_read == (64 + 1088) * 1024  # the dirty 64 KiB clusters are read
    assert stats.bytes_written == 4 * 1024 + 1 * MiB  # only the 4 KiB blocks that changed are sent
    assert stats.bytes_skipped == stats.bytes_read - stats.bytes_written
    assert stats.bytes_zeroed == 1 * MiB
    rig.assert_point_exact("p2")

    # without dedupe, the whole dirty clusters are written
    qemu_io(img, "write -P 0x54 5M 4k")
    raw = rig.sync("p2b", p2.base, tuning=fast_tuning(dedupe_incremental=False))
    assert raw.results["disk0"].stats.bytes_written == 64 * 1024
    rig.assert_point_exact("p2b")
    p2 = raw

    p3 = rig.sync("p3", p2.base)  # nothing changed
    assert (p3.results["disk0"].stats.bytes_read, p3.results["disk0"].stats.bytes_zeroed) == (0, 0)
    rig.assert_point_exact("p3")


def test_multi_disk(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [32 * MiB, 16 * MiB])
    a, b = rig.images
    qemu_io(a, "write -P 0x11 0 4M")
    qemu_io(b, "write -P 0x22 8M 4M")
    p1 = rig.sync("p1")
    assert sorted(p1.results) == ["disk0", "disk1"]
    qemu_io(a, "write -P 0x33 1M 64k")
    qemu_io(b, "write -P 0x44 15M 128k", "write -z 8M 1M")
    p2 = rig.sync("p2", p1.base)
    assert p2.results["disk0"].stats.bytes_written == 64 * 1024
    assert p2.results["disk1"].stats.bytes_written == 128 * 1024
    assert p2.results["disk1"].stats.bytes_zeroed == 1 * MiB
    for sid in ("p1", "p2"):
        rig.assert_point_exact(sid)
    assert {d.key: d.size for d in rig.tgt.list_points()[0].disks} == {"disk0": 32 * MiB, "disk1": 16 * MiB}


def test_a_disk_grown_between_syncs_replicates_correctly(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [32 * MiB])
    img = rig.images[0]
    qemu_io(img, "write -P 0x11 0 8M", "write -P 0x12 31M 1M")
    p1 = rig.sync("p1")
    run("qemu-img", "resize", "-q", img, 48 * MiB)
    qemu_io(img, "write -P 0x13 40M 2M", "write -P 0x14 1M 64k", "write -P 0x15 49088k 64k")
    p2 = rig.sync("p2", p1.base)
    assert p2.results["disk0"].kind == "incremental"
    assert p2.snap.disks[0].size == 48 * MiB
    rig.assert_point_exact("p1")
    rig.assert_point_exact("p2")
    assert {d.size for d in rig.tgt.list_points()[0].disks} == {48 * MiB}
    qemu_io(img, "write -P 0x16 33M 64k")  # the grown area, changed again
    p3 = rig.sync("p3", p2.base)
    assert p3.results["disk0"].stats.bytes_written == 64 * 1024
    rig.assert_point_exact("p3")


# ------------------------------------------------------------------------ consistency and locking


def test_a_write_after_the_snapshot_makes_open_disk_fail_and_the_retry_is_exact(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [32 * MiB])
    img = rig.images[0]
    qemu_io(img, "write -P 0x11 0 4M")
    p1 = rig.sync("p1")

    qemu_io(img, "write -P 0x22 1M 64k")
    snap = rig.src.create_snapshot("p2", p1.base)
    qemu_io(img, "write -P 0x33 20M 64k")  # the VM keeps writing: the snapshot instant is gone
    with pytest.raises(SnapshotInconsistent) as ei, rig.src.open_disk(snap, "disk0"):
        pass
    assert error_text(ei) and str(img) in str(ei.value)
    assert not ei.value.retryable  # retrying the copy cannot help: the workflow takes a new snapshot
    rig.src.release_snapshot(snap, committed=False)
    assert bitmap_names(img) == [bm("p1", img)]

    p2 = rig.sync("p2b", p1.base)  # the retried sync still diffs against p1 and sees both writes
    assert p2.results["disk0"].kind == "incremental"
    assert p2.results["disk0"].stats.bytes_written == 2 * 64 * 1024
    rig.assert_point_exact("p2b")


def test_a_resize_after_the_snapshot_makes_open_disk_fail(tmp_path: Path) -> None:
    """The snapshot recorded the size; an image grown after it cannot be read as that instant."""
    rig = Rig(tmp_path, [32 * MiB])
    img = rig.images[0]
    qemu_io(img, "write -P 0x11 0 4M")
    snap = rig.src.create_snapshot("p1", {})
    run("qemu-img", "resize", "-q", img, "48M")
    with pytest.raises(SnapshotInconsistent, match="resized") as ei, rig.src.open_disk(snap, "disk0"):
        pass
    assert error_text(ei) and str(img) in str(ei.value)
    rig.src.release_snapshot(snap, committed=False)


def test_an_image_in_use_by_a_writer_is_resource_unavailable(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [16 * MiB])
    img = rig.images[0]
    rig.src.validate()
    with qemu_nbd(img, readonly=False):  # e.g. the VM is running after all
        with pytest.raises(ResourceUnavailable) as ei:
            rig.src.create_snapshot("p1", {})
        assert str(img) in error_text(ei)
        assert ei.value.retryable
    assert bitmap_names(img) == []


def test_opening_a_disk_in_use_by_a_writer_is_resource_unavailable(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [16 * MiB])
    img = rig.images[0]
    snap = rig.src.create_snapshot("p1", {})
    with qemu_nbd(img, readonly=False), pytest.raises(ResourceUnavailable) as ei:
        with rig.src.open_disk(snap, "disk0"):
            pass
    assert str(img) in error_text(ei) and "in use" in str(ei.value)
    assert ei.value.retryable


# --------------------------------------------------------------------------- change tracking lost


def test_a_removed_bitmap_falls_back_to_a_resync_that_writes_only_differing_blocks(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [32 * MiB])
    img = rig.images[0]
    qemu_io(img, "write -P 0x11 0 8M", "write -P 0x12 16M 4M")
    p1 = rig.sync("p1")
    qemu_io(img, "write -P 0x21 3M 4k", "write -P 0x22 17M 64k", "write -z 18M 64k")
    run("qemu-img", "bitmap", "--remove", img, bm("p1", img))

    tuning = fast_tuning(chunk_size=1 * MiB)
    p2 = rig.sync("p2", p1.base, tuning=tuning)
    disk = p2.snap.disks[0]
    assert disk.tracking_lost is not None and bm("p1", img) in disk.tracking_lost
    result = p2.results["disk0"]
    assert result.kind == "resync"
    # every data block read and compared; only the changed 4 KiB blocks written (4k + 64k)
    assert result.stats.bytes_written == 4 * 1024 + 64 * 1024
    assert result.stats.bytes_read == 12 * MiB - 64 * 1024
    rig.assert_point_exact("p2")
    assert bitmap_names(img) == [bm("p2", img)]  # tracking is back for the next sync

    qemu_io(img, "write -P 0x31 5M 64k")
    p3 = rig.sync("p3", p2.base, tuning=tuning)
    assert p3.results["disk0"].kind == "incremental"
    assert p3.results["disk0"].stats.bytes_written == 64 * 1024
    rig.assert_point_exact("p3")


def test_a_bitmap_left_in_use_by_a_crash_falls_back_to_a_resync(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [16 * MiB])
    img = rig.images[0]
    qemu_io(img, "write -P 0x11 0 4M")
    p1 = rig.sync("p1")
    # a writer killed mid-way leaves the bitmap flagged in-use (its content cannot be trusted)
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 64k", "-c", "sleep 30000", str(img)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while "in-use" not in run("qemu-img", "info", "-U", img) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # let the write land
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "in-use" in run("qemu-img", "info", "-U", img)

    p2 = rig.sync("p2", p1.base)
    assert "inconsistent" in (p2.snap.disks[0].tracking_lost or "")
    assert p2.results["disk0"].kind == "resync"
    rig.assert_point_exact("p2")
    assert bitmap_names(img) == [bm("p2", img)]


# --------------------------------------------------------------------------------------- release


def test_release_keeps_only_the_newest_job_bitmap(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [16 * MiB])
    img = rig.images[0]
    run("qemu-img", "bitmap", "--add", "--enable", img, "backup.tool")  # someone else's
    p1 = rig.sync("p1")
    assert bitmap_names(img) == ["backup.tool", bm("p1", img)]

    snap = rig.src.create_snapshot("p2", p1.base)
    assert bitmap_names(img) == ["backup.tool", bm("p1", img), bm("p2", img)]
    rig.src.release_snapshot(snap, committed=False)  # the sync failed: the base must stay usable
    assert bitmap_names(img) == ["backup.tool", bm("p1", img)]

    snap = rig.src.create_snapshot("p3", p1.base)
    rig.src.release_snapshot(snap, committed=True)
    assert bitmap_names(img) == ["backup.tool", bm("p3", img)]
    rig.src.release_snapshot(snap, committed=True)  # idempotent
    assert bitmap_names(img) == ["backup.tool", bm("p3", img)]


def test_two_jobs_on_one_image_keep_each_others_bitmaps(tmp_path: Path) -> None:
    """Committing job `web` must not drop the bitmaps of job `web-db` on the same image (that job
    would lose change tracking and fall back to a resync)."""
    img = make_qcow2(tmp_path / "shared.qcow2", 16 * MiB)
    web = OfflineQcow2Source("web", [img])
    web_db = OfflineQcow2Source("web-db", [img])
    other = web_db.create_snapshot("s1", {})
    web_db.release_snapshot(other, committed=True)
    snap = web.create_snapshot("s1", {})
    web.release_snapshot(snap, committed=True)
    snap = web.create_snapshot("s2", {"disk0": bm("s1", img, "web")})
    web.release_snapshot(snap, committed=True)
    assert bitmap_names(img) == sorted([bm("s2", img, "web"), bm("s1", img, "web-db")])


def test_copy_disk_resumes_from_a_token_offset(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [32 * MiB])
    img = rig.images[0]
    qemu_io(img, "write -P 0x11 0 12M", "write -P 0x12 20M 4M")
    snap = rig.src.create_snapshot("p1", {})
    rig.snapshot_raws(snap)
    rig.tgt.prepare("p1", rig.src.discover().disks)
    ds = snap.disks[0]
    tokens: list[int] = []

    def cancel() -> bool:
        return any(t > 0 for t in tokens)

    with rig.src.open_disk(snap, "disk0") as sd, rig.tgt.open_disk("p1", "disk0") as td:
        with pytest.raises(DataPathError, match="cancelled"):
            copy_disk(
                sd,
                td,
                ds,
                fast_tuning(chunk_size=256 * 1024),
                on_checkpoint=lambda o, d, t, s: tokens.append(o),
                cancelled=cancel,
            )
    resume = next(t for t in tokens if t > 0)
    with rig.src.open_disk(snap, "disk0") as sd, rig.tgt.open_disk("p1", "disk0") as td:
        result = copy_disk(sd, td, ds, fast_tuning(), start=resume)
    assert result.resumed_from == resume
    assert result.stats.bytes_read == 16 * MiB - min(resume, 12 * MiB)
    rig.tgt.commit(
        "p1",
        PointInfo(
            point_id="p1",
            job=JOB,
            created_at=snap.created_at,
            committed_at=snap.created_at,
            kind="full",
            disks=[PointDisk(key="disk0", size=ds.size, change_id=ds.change_id)],
        ),
    )
    rig.assert_point_exact("p1")


# ---------------------------------------------------------------------------------------- forget


def test_forget_removes_every_bitmap_of_the_job_and_nothing_else(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [16 * MiB, 16 * MiB])
    a, b = rig.images
    other = OfflineQcow2Source("j-other", [a])  # another job on the same image: prefix sendense.j-other.
    other.release_snapshot(other.create_snapshot("s1", {}), committed=True)
    run("qemu-img", "bitmap", "--add", "--enable", b, "backup.tool")  # someone else's
    qemu_io(a, "write -P 0x11 0 1M")
    p1 = rig.sync("p1")
    qemu_io(a, "write -P 0x22 2M 64k")
    p2 = rig.sync("p2", p1.base)
    rig.src.create_snapshot("p3", p2.base)  # a crashed sync left its bitmap too
    assert bitmap_names(a) == sorted([bm("p2", a), bm("p3", a), bm("s1", a, "j-other")])
    assert bitmap_names(b) == sorted(["backup.tool", bm("p2", b, key="disk1"), bm("p3", b, key="disk1")])

    rig.src.forget()
    assert bitmap_names(a) == [bm("s1", a, "j-other")]
    assert bitmap_names(b) == ["backup.tool"]
    rig.src.forget()  # idempotent
    assert bitmap_names(a) == [bm("s1", a, "j-other")]
    assert bitmap_names(b) == ["backup.tool"]
    assert [p.point_id for p in rig.tgt.list_points()] == ["p2", "p1"]  # the replicas are not its business

    # a disk that is gone is skipped
    b.unlink()
    OfflineQcow2Source(JOB, [a, b]).forget()


def test_forget_on_an_image_in_use_by_a_writer_is_resource_unavailable(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [16 * MiB])
    img = rig.images[0]
    rig.sync("p1")
    with qemu_nbd(img, readonly=False):  # the VM was started again
        with pytest.raises(ResourceUnavailable) as ei:
            rig.src.forget()
        msg = error_text(ei)
        assert str(img) in msg and "in use" in msg and "sendense.j." in msg
        assert ei.value.retryable
    assert bitmap_names(img) == [bm("p1", img)]
    rig.src.forget()  # once the writer is gone
    assert bitmap_names(img) == []


# ---------------------------------------------------------------------------------- disk identity


def test_disks_swapped_behind_their_paths_resync_with_the_reason_and_both_points_are_exact(
    tmp_path: Path,
) -> None:
    """Image files renamed into each other's place: each still held a bitmap of the base's name, and
    the sync ran as an incremental against the other disk's changes (both replicas wrong)."""
    rig = Rig(tmp_path, [16 * MiB, 16 * MiB])
    a, b = rig.images
    qemu_io(a, "write -P 0x11 0 4M")
    qemu_io(b, "write -P 0x22 8M 4M")
    p1 = rig.sync("p1")
    qemu_io(a, "write -P 0x33 1M 64k")
    qemu_io(b, "write -P 0x44 9M 64k")
    tmp = tmp_path / "swap.qcow2"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)

    p2 = rig.sync("p2", p1.base)
    for d in p2.snap.disks:
        assert (
            d.tracking_lost is not None and "carries the change tracking of another disk" in d.tracking_lost
        )
        assert p2.results[d.key].kind == "resync"
    rig.assert_point_exact("p2")
    qemu_io(a, "write -P 0x55 2M 64k")
    p3 = rig.sync("p3", p2.base)
    assert [p3.results[k].kind for k in ("disk0", "disk1")] == ["incremental", "incremental"]
    assert p3.results["disk0"].stats.bytes_written == 64 * 1024
    rig.assert_point_exact("p3")


def test_a_change_id_without_a_disk_identity_is_a_resync_with_the_reason(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [16 * MiB])
    img = rig.images[0]
    qemu_io(img, "write -P 0x11 0 4M")
    p1 = rig.sync("p1")
    legacy = f"sendense.{JOB}.p1"  # the name every disk's bitmap had before the identity was recorded
    run("qemu-img", "bitmap", "--add", "--enable", img, legacy)
    p2 = rig.sync("p2", {"disk0": legacy})
    assert p2.snap.disks[0].tracking_lost == (
        f"change id {legacy} of disk disk0 is from before disk identities were recorded"
    )
    assert p2.results["disk0"].kind == "resync"
    rig.assert_point_exact("p2")
    assert bitmap_names(img) == [bm("p2", img)]
    assert p1.base == {"disk0": bm("p1", img)}


# ------------------------------------------------------------------------ two jobs on one disk


def test_two_jobs_on_one_stopped_disk_wait_for_each_other_and_both_points_are_exact(tmp_path: Path) -> None:
    """Job web-1 (its name extends web's) on the same image as web: its snapshot used to be refused as
    "in use by a running process" while web read the disk. Now it waits for the read to end."""
    img = make_qcow2(tmp_path / "shared.qcow2", 16 * MiB)
    qemu_io(img, "write -P 0x11 0 6M")
    web = Rig(tmp_path, [], job="web", images=[img])
    web1 = Rig(tmp_path, [], job="web-1", images=[img])

    # overlapping: web-1's whole sync starts while web reads the disk
    snap = web.src.create_snapshot("s1", {})
    web.snapshot_raws(snap)
    web.tgt.prepare("s1", web.src.discover().disks)
    done: dict[str, Synced] = {}
    errors: list[BaseException] = []

    def other() -> None:
        try:
            done["web-1"] = web1.sync("s1")
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    t = threading.Thread(target=other)
    with web.src.open_disk(snap, "disk0") as sd, web.tgt.open_disk("s1", "disk0") as td:
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and not errors  # web-1 waits for web's read
        result = copy_disk(sd, td, snap.disks[0], fast_tuning())
    t.join(60)
    assert not errors and "web-1" in done
    web.tgt.commit(
        "s1",
        PointInfo(
            point_id="s1",
            job="web",
            created_at=snap.created_at,
            committed_at=snap.created_at,
            kind=result.kind,
            disks=[PointDisk(key="disk0", size=16 * MiB, change_id=snap.disks[0].change_id)],
        ),
    )
    web.src.release_snapshot(snap, committed=True)
    web.assert_point_exact("s1")
    web1.assert_point_exact("s1")

    # interleaved: both snapshots, then both copies, commits in the other order
    qemu_io(img, "write -P 0x22 1M 64k", "write -P 0x33 10M 128k")
    s_web = web.src.create_snapshot("s2", {"disk0": snap.disks[0].change_id})
    web.snapshot_raws(s_web)
    base1 = done["web-1"].base
    s_web1 = web1.src.create_snapshot("s2", base1)
    web1.snapshot_raws(s_web1)
    for rig, s in ((web, s_web), (web1, s_web1)):
        rig.tgt.prepare("s2", rig.src.discover().disks)
        with rig.src.open_disk(s, "disk0") as sd, rig.tgt.open_disk("s2", "disk0") as td:
            r = copy_disk(sd, td, s.disks[0], fast_tuning())
        assert (r.kind, r.stats.bytes_written) == ("incremental", 192 * 1024)
    for rig, s in ((web1, s_web1), (web, s_web)):
        rig.tgt.commit(
            "s2",
            PointInfo(
                point_id="s2",
                job=rig.job,
                created_at=s.created_at,
                committed_at=s.created_at,
                kind="incremental",
                disks=[PointDisk(key="disk0", size=16 * MiB, change_id=s.disks[0].change_id)],
            ),
        )
        rig.src.release_snapshot(s, committed=True)
        rig.assert_point_exact("s2")
    assert bitmap_names(img) == sorted([bm("s2", img, "web"), bm("s2", img, "web-1")])


def test_a_snapshot_waits_for_another_jobs_read_only_so_long_then_is_retryable(tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "shared.qcow2", 16 * MiB)
    web = Rig(tmp_path, [], job="web", images=[img])
    web1 = Rig(tmp_path, [], job="web-1", images=[img])
    web1.src.busy_wait = 0.3
    snap = web.src.create_snapshot("s1", {})
    with web.src.open_disk(snap, "disk0"):
        t0 = time.monotonic()
        with pytest.raises(ResourceUnavailable) as ei:
            web1.src.create_snapshot("s1", {})
        assert 0.3 <= time.monotonic() - t0 < 5
    assert error_text(ei) == (
        f"source disk {img} is still being read by another job's sync after 0.3s; job web-1 retries"
    )
    assert ei.value.retryable
    web1.src.release_snapshot(web1.src.create_snapshot("s1", {}), committed=True)  # once the read ended
    assert bitmap_names(img) == sorted([bm("s1", img, "web"), bm("s1", img, "web-1")])


def test_a_snapshot_retried_after_a_crashed_attempt_starts_afresh(tmp_path: Path) -> None:
    """The retry of a snapshot (same id) whose attempt died unreleased reused that attempt's bitmap,
    which had recorded the writes since: every read of the retry was refused as "written after"."""
    rig = Rig(tmp_path, [16 * MiB])
    img = rig.images[0]
    qemu_io(img, "write -P 0x11 0 4M")
    p1 = rig.sync("p1")
    rig.src.create_snapshot("p2", p1.base)  # the worker died here: nothing released
    qemu_io(img, "write -P 0x22 1M 64k")  # the VM ran in between
    p2 = rig.sync("p2", p1.base)
    assert (p2.results["disk0"].kind, p2.results["disk0"].stats.bytes_written) == ("incremental", 64 * 1024)
    rig.assert_point_exact("p2")
    assert bitmap_names(img) == [bm("p2", img)]


def test_a_disk_shrunk_and_grown_back_is_copied_from_the_shrunk_size_and_the_points_are_exact(
    tmp_path: Path,
) -> None:
    """qemu-img resize truncates the bitmaps on a shrink and extends them clean on a grow: the regrown
    area read zeros but no bitmap called it changed, and the point kept the old bytes there (the
    scenario runner's grow_after_shrink). The shrink markers say from where to copy it all."""
    rig = Rig(tmp_path, [8 * MiB])
    img = rig.images[0]
    qemu_io(img, "write -P 0x11 0 8M")
    p1 = rig.sync("p1")
    run("qemu-img", "resize", "-q", "--shrink", img, 4 * MiB)
    run("qemu-img", "resize", "-q", img, 8 * MiB)
    p2 = rig.sync("p2", p1.base)
    r = p2.results["disk0"]
    assert p2.snap.disks[0].tracking_lost is None and r.kind == "incremental"
    # from one granule before the shrunk size on: its 64 KiB of data read again, then 4 MiB of zeros
    assert (r.stats.bytes_read, r.stats.bytes_zeroed) == (64 * KiB, 4 * MiB)
    rig.assert_point_exact("p2")

    # by one sector, between the snapshot and its copy: the snapshot can never pass
    qemu_io(img, f"write -P 0x22 {8 * MiB - 64 * KiB} 64k")
    snap = rig.src.create_snapshot("p3", p2.base)
    run("qemu-img", "resize", "-q", "--shrink", img, 8 * MiB - 512)
    run("qemu-img", "resize", "-q", img, 8 * MiB)
    with (
        pytest.raises(SnapshotInconsistent, match="resized after snapshot p3"),
        rig.src.open_disk(snap, "disk0"),
    ):
        pass
    rig.src.release_snapshot(snap, committed=False)
    p3 = rig.sync("p3", p2.base)  # the last granule again: its sector at the end is zero now
    r = p3.results["disk0"]
    assert (r.kind, r.stats.bytes_read, r.stats.bytes_written) == ("incremental", 64 * KiB, 64 * KiB)
    rig.assert_point_exact("p3")

    # a shrink alone: the point ends earlier, and the granule before the end is copied again (zeros)
    run("qemu-img", "resize", "-q", "--shrink", img, 6 * MiB)
    qemu_io(img, "write -P 0x33 1M 64k")
    p4 = rig.sync("p4", p3.base)
    r = p4.results["disk0"]
    assert (r.kind, r.stats.bytes_written, r.stats.bytes_zeroed) == ("incremental", 64 * KiB, 64 * KiB)
    rig.assert_point_exact("p4")
    qemu_io(img, "write -P 0x44 2M 64k")
    p5 = rig.sync("p5", p4.base)
    assert (p5.results["disk0"].kind, p5.results["disk0"].stats.bytes_written) == ("incremental", 64 * KiB)
    rig.assert_point_exact("p5")
    assert bitmap_names(img) == [bm("p5", img)]


def test_a_read_error_names_the_source_disk_not_an_internal_socket(tmp_path: Path) -> None:
    """Errors name what the user knows: the image, never qemu-nbd's socket in a temp dir."""
    rig = Rig(tmp_path, [16 * MiB])
    qemu_io(rig.images[0], "write -P 0x11 0 1M")
    snap = rig.src.create_snapshot("p1", {})
    with rig.src.open_disk(snap, "disk0") as disk:
        reader = disk.connect()
        [server] = [  # the qemu-nbd serving this image dies
            p
            for p in psutil.Process().children(recursive=True)
            if str(rig.images[0]) in " ".join(p.cmdline())
        ]
        os.kill(server.pid, signal.SIGKILL)
        time.sleep(0.2)
        with pytest.raises(SendenseError) as ei:
            reader.read(0, 65536)
    msg = str(ei.value)
    assert str(rig.images[0]) in msg and "socket" not in msg and "nbd+unix" not in msg, msg
    rig.src.release_snapshot(snap, committed=False)


def test_a_crafted_header_is_refused_at_validate_naming_the_disk_field(tmp_path: Path) -> None:
    """A backing file name of 4 GiB drove the worker to gigabytes; it is refused before any read."""
    from helpers_qcow2 import header, write_image

    good = make_qcow2(tmp_path / "good.qcow2", 16 * MiB)
    bad = write_image(tmp_path / "x.qcow2", header(backing_offset=512, backing_size=0xFFFFFFF0))
    with pytest.raises(InvalidSpec) as ei:
        OfflineQcow2Source(JOB, [good, bad]).validate()
    assert error_text(ei) == (
        f"source.disks[1]: {bad}: qcow2 header: backing file name of 4294967280 bytes (max 1023)"
    )
