"""Whose snapshots are whose in one region: the source and target sides of one AWS -> AWS job, two
jobs, a source job beside a target job, a job re-created under a deleted job's name (issue 9, items 1
and 10). Each side lists, prunes and deletes only what it made; nothing is judged by a name alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_aws import Backend
from helpers_kvm import MiB, make_qcow2, qemu_io, sync_point

from connectors.aws.blocks import BLOCK
from connectors.aws.source import AwsSourceConnector
from connectors.aws.spec import AwsSource, AwsTarget
from connectors.aws.target import AwsTargetConnector
from connectors.kvm.source import make_kvm_source
from connectors.kvm.spec import KvmSource
from sendense.errors import ResourceNotFound, TargetError


def aws_source(b: Backend, job: str, work: Path) -> AwsSourceConnector:
    spec = AwsSource(platform="aws", instance_id=b.instance_id, region=b.region, endpoint_url=b.endpoint_url)
    return AwsSourceConnector(job, spec, work)


def aws_target(b: Backend, job: str, state: Path, job_id: str = "") -> AwsTargetConnector:
    spec = AwsTarget(platform="aws", region=b.region, endpoint_url=b.endpoint_url)
    return AwsTargetConnector(job, spec, state, job_id=job_id)


def ids(snaps: list[dict]) -> set[str]:  # type: ignore[type-arg]
    return {s["SnapshotId"] for s in snaps}


def test_aws_to_aws_in_one_region_keeps_both_sides_snapshots(
    backend: Backend, job: str, tmp_path: Path
) -> None:
    """Issue 9 item 1: the seed full, then incrementals of exactly the written block; every point stays;
    the source keeps only its newest snapshots."""
    lab = backend.need_lab()
    (_, vol0, _), (_, vol1, _) = backend.volumes
    lab.write(vol0, 0, b"\x11" * (3 * MiB))
    src, tgt = aws_source(backend, job, tmp_path / "work"), aws_target(backend, job, tmp_path / "t", "j1")
    tgt.validate()
    try:
        s1 = sync_point(src, tgt, "p1")
        assert {r.kind for r in s1.results.values()} == {"full"}
        assert sum(r.stats.bytes_written for r in s1.results.values()) == 3 * MiB
        syncs = [s1]
        for i, (vol, at) in enumerate(((vol0, 5 * MiB), (vol1, 700 * MiB)), start=2):
            lab.write(vol, at, bytes([0x20 + i]) * BLOCK)
            s = sync_point(src, tgt, f"p{i}", syncs[-1].base)
            assert {r.kind for r in s.results.values()} == {"incremental"}, i
            assert sum(r.stats.bytes_read for r in s.results.values()) == BLOCK, i
            assert sum(r.stats.bytes_written for r in s.results.values()) == BLOCK, i
            syncs.append(s)
        points = tgt.list_points()
        assert [p.point_id for p in points] == ["p3", "p2", "p1"]
        point_snaps = {d.path for p in points for d in p.disks}
        newest_source = {d.change_id for d in syncs[-1].snap.disks}
        assert ids(backend.tagged(job)) == point_snaps | newest_source  # 6 + 2, nothing else
        assert len(point_snaps) == 6 and src.recorded() == sorted(newest_source)
        files = dict(tgt.export("p3", "raw", tmp_path / "x"))
        with open(files["xvda"], "rb") as f:
            assert f.read(3 * MiB) == b"\x11" * (3 * MiB)
            f.seek(5 * MiB)
            assert f.read(BLOCK) == b"\x22" * BLOCK
        src.forget()  # the source side goes: the points stay
        assert ids(backend.tagged(job)) == point_snaps
        assert [p.point_id for p in tgt.list_points()] == ["p3", "p2", "p1"]
    finally:
        tgt.destroy()
    assert backend.tagged(job) == []


def test_a_source_job_and_a_target_job_and_two_target_jobs_in_one_region(
    backend: Backend, tmp_path: Path
) -> None:
    """Job "a" replicates the lab instance (its source side is in the region); jobs "b" and "c" replicate
    KVM disks into the region. Each one's syncs, retention and delete leave the others whole."""
    backend.need_lab()
    disk = make_qcow2(tmp_path / "d.qcow2", 4 * MiB)
    qemu_io(disk, "write -P 0x51 0 1M")
    kvm = make_kvm_source("b", KvmSource(platform="kvm", disks=[disk]), tmp_path / "kw")
    kvm_c = make_kvm_source("c", KvmSource(platform="kvm", disks=[disk]), tmp_path / "kwc")
    a = aws_source(backend, "a", tmp_path / "wa")
    b, c = aws_target(backend, "b", tmp_path / "tb", "jb"), aws_target(backend, "c", tmp_path / "tc", "jc")
    try:
        a1 = a.create_snapshot("s1", {})
        b1 = sync_point(kvm, b, "s1")
        c1 = sync_point(kvm_c, c, "s1")  # the same sync id in all three
        a.release_snapshot(a1, committed=True)
        qemu_io(disk, "write -P 0x52 0 512k")
        sync_point(kvm, b, "s2", b1.base)
        sync_point(kvm_c, c, "s2", c1.base)
        a2 = a.create_snapshot("s2", {d.key: d.change_id for d in a1.disks})
        a.release_snapshot(a2, committed=True)
        assert b.prune(1) == ["s1"]
        assert [p.point_id for p in c.list_points()] == ["s2", "s1"]
        assert ids(backend.tagged("a")) == {d.change_id for d in a2.disks}
        b.destroy()
        assert backend.tagged("b") == [] and len(backend.tagged("c")) == 2
        assert ids(backend.tagged("a")) == {d.change_id for d in a2.disks}
        a.forget()
        assert backend.tagged("a") == [] and [p.point_id for p in c.list_points()] == ["s2", "s1"]
    finally:
        for t in (b, c):
            t.destroy()
        a.forget()


def test_a_job_recreated_under_a_deleted_jobs_name_does_not_adopt_its_points(
    backend: Backend, job: str, tmp_path: Path
) -> None:
    """Issue 9 item 10: the old job's kept points are refused at validate, and invisible to the new
    job's list, prune, export and destroy."""
    disk = make_qcow2(tmp_path / "d.qcow2", 4 * MiB)
    qemu_io(disk, "write -P 0x61 0 1M")
    kvm = make_kvm_source(job, KvmSource(platform="kvm", disks=[disk]), tmp_path / "kw")
    old = aws_target(backend, job, tmp_path / "t", "old0001")
    sync_point(kvm, old, "p1")  # the job is then deleted without --purge: its point is kept
    kept = {d.path for d in old.get_point("p1").disks}
    new = aws_target(backend, job, tmp_path / "t", "new0002")
    try:
        with pytest.raises(TargetError) as ei:
            new.validate()
        (sid,) = kept
        assert ei.value.message == (
            f"target: region {backend.region} holds 1 recovery point of an earlier job {job} ({sid}); "
            "delete them or use another job name"
        )
        assert new.list_points() == [] and new.prune(0) == []
        with pytest.raises(ResourceNotFound):
            new.export("p1", "raw", tmp_path / "x")
        new.destroy()
        assert ids(backend.tagged(job)) == kept
        # a job created before job ids ('') owns the points made without one, and only those
        legacy = aws_target(backend, job, tmp_path / "t2")
        with pytest.raises(TargetError, match="holds 1 recovery point of an earlier job"):
            legacy.validate()
        assert legacy.list_points() == []
        old.validate()  # its own points are no earlier job's
        assert [p.point_id for p in old.list_points()] == ["p1"]
    finally:
        old.destroy()
    assert backend.tagged(job) == []
