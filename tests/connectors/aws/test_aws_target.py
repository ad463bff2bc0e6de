"""The EBS snapshot target against the AWS lab (and real AWS when configured), fed by the real KVM
source through the real copy engine: points read back bit-exact through GetSnapshotBlock,
incrementals send only changed blocks, a resumed copy still completes its snapshot, points are
immutable, pruned and launched as instances (the VM verbs: test_aws_vms.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers_aws import Backend
from helpers_kvm import MiB, fast_tuning, qemu_io, same_content, sync_point, to_raw

from connectors.aws.blocks import BLOCK
from connectors.aws.spec import AwsInstanceSettings, AwsTarget
from connectors.aws.target import AwsTargetConnector
from connectors.aws.vms import AwsVmProvisioner
from connectors.kvm.source import make_kvm_source
from connectors.kvm.spec import KvmSource
from sendense.datapath.sync import copy_disk
from sendense.errors import DataPathError, InvalidSpec, ResourceNotFound, TargetError
from sendense.models import DiskInfo, VmPlan

GIB = 1 << 30


def target(b: Backend, job: str, state: Path, **kw: object) -> AwsTargetConnector:
    spec = AwsTarget(platform="aws", region=b.region, endpoint_url=b.endpoint_url).model_copy(update=kw)
    return AwsTargetConnector(job, spec, state)


def kvm_source(job: str, disks: list[Path], tmp: Path) -> Any:
    return make_kvm_source(job, KvmSource(platform="kvm", disks=disks), tmp / "work")


def exported(tgt: AwsTargetConnector, point: str, out: Path) -> dict[str, Path]:
    return dict(tgt.export(point, "raw", out))


def test_full_then_incremental_points_are_bit_exact_and_send_only_changed_blocks(
    backend: Backend, job: str, state_dir: Path, vm: list[Path], tmp_path: Path
) -> None:
    src, tgt = kvm_source(job, vm, tmp_path), target(backend, job, state_dir)
    tgt.validate()
    try:
        s1 = sync_point(src, tgt, "p1")
        assert s1.results["disk0"].kind == "full"
        # data blocks: 6 (3 MiB) + 2 (10M..11M); the written-zero MiB and holes are not sent
        assert s1.results["disk0"].stats.bytes_written == 8 * BLOCK
        refs = {k: to_raw(p, tmp_path / f"{k}-p1.raw") for k, p in zip(("disk0", "disk1"), vm, strict=True)}
        files = exported(tgt, "p1", tmp_path / "x1")
        for k in refs:
            assert same_content(files[k], refs[k]), k
        # the snapshot sizes: whole GiB volumes, the disk's own size kept in the point
        p1 = tgt.get_point("p1")
        assert [(d.key, d.size) for d in p1.disks] == [("disk0", 24 * MiB), ("disk1", 5 * MiB + 4096)]

        qemu_io(vm[0], "write -P 0x44 1M 4k", "write -z 10M 512k", "write -P 0x55 20M 64k")
        qemu_io(vm[1], "write -P 0x66 5M 4096")  # the last, short block of a disk that is no multiple
        calls = backend.lab.stats() if backend.lab else {}
        s2 = sync_point(src, tgt, "p2", s1.base)
        assert s2.results["disk0"].kind == "incremental"
        if backend.lab:
            puts = backend.lab.stats().get("PutSnapshotBlock", 0) - calls.get("PutSnapshotBlock", 0)
            assert puts == 4  # disk0: 1M's block, 10M zeroed over data, 20M's block; disk1: its last block
        refs2 = {k: to_raw(p, tmp_path / f"{k}-p2.raw") for k, p in zip(("disk0", "disk1"), vm, strict=True)}
        files2 = exported(tgt, "p2", tmp_path / "x2")
        for k in refs2:
            assert same_content(files2[k], refs2[k]), k
        files1 = exported(tgt, "p1", tmp_path / "x1b")  # the older point did not change
        for k in refs:
            assert same_content(files1[k], refs[k]), k
        assert [p.point_id for p in tgt.list_points()] == ["p2", "p1"]
    finally:
        tgt.destroy()


def test_a_resumed_copy_completes_its_snapshot_with_the_exact_block_count(
    backend: Backend, job: str, state_dir: Path, vm: list[Path], tmp_path: Path
) -> None:
    """The copy dies mid-way (an I/O error after some blocks); the retry resumes from its token in a
    new process's connector (same state dir) and CompleteSnapshot accepts the union of both."""
    src, tgt = kvm_source(job, vm, tmp_path), target(backend, job, state_dir)
    try:
        snap = src.create_snapshot("p1", {})
        tgt.prepare("p1", [DiskInfo(key=d.key, size=d.size) for d in snap.disks])
        tgt.prepare("p1", [DiskInfo(key=d.key, size=d.size) for d in snap.disks])  # idempotent
        d0 = snap.disk("disk0")
        tokens: list[int] = []

        def dies(offset: int, done: int, total: int, stats: object) -> None:
            tokens.append(offset)
            if len(tokens) == 2:
                raise DataPathError("worker lost")

        with (
            src.open_disk(snap, "disk0") as sd,
            tgt.open_disk("p1", "disk0") as td,
            pytest.raises(DataPathError),
        ):
            copy_disk(sd, td, d0, fast_tuning(), on_checkpoint=dies)
        again = target(backend, job, state_dir)  # a fresh connector, as after a worker restart
        results = {}
        with src.open_disk(snap, "disk0") as sd, again.open_disk("p1", "disk0") as td:
            results["disk0"] = copy_disk(sd, td, d0, fast_tuning(), start=tokens[-1])
        with src.open_disk(snap, "disk1") as sd, again.open_disk("p1", "disk1") as td:
            results["disk1"] = copy_disk(sd, td, snap.disk("disk1"), fast_tuning())
        point = again.commit("p1", _point(snap, results))
        assert point.point_id == "p1" and again.commit("p1", _point(snap, results)).point_id == "p1"
        files = exported(again, "p1", tmp_path / "x")
        assert same_content(files["disk0"], to_raw(vm[0], tmp_path / "d0.raw"))
    finally:
        tgt.destroy()


def _point(snap, results):  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    from sendense.models import PointDisk, PointInfo

    return PointInfo(
        point_id=snap.snapshot_id,
        job="job",
        created_at=snap.created_at,
        committed_at=datetime.now(UTC),
        kind="full",
        disks=[PointDisk(key=d.key, size=d.size, change_id=d.change_id) for d in snap.disks],
    )


def test_prune_keeps_newer_points_whole_and_abort_leaves_nothing(
    backend: Backend, job: str, state_dir: Path, vm: list[Path], tmp_path: Path
) -> None:
    src, tgt = kvm_source(job, vm, tmp_path), target(backend, job, state_dir)
    try:
        s1 = sync_point(src, tgt, "p1")
        qemu_io(vm[0], "write -P 0x77 0 1M")
        s2 = sync_point(src, tgt, "p2", s1.base)
        ref = to_raw(vm[0], tmp_path / "p2.raw")
        assert tgt.prune(1) == ["p1"]  # p2's snapshot had p1 as parent: still whole
        assert [p.point_id for p in tgt.list_points()] == ["p2"]
        assert same_content(exported(tgt, "p2", tmp_path / "x")["disk0"], ref)
        # an abandoned sync: prepared, partly written, aborted
        snap = src.create_snapshot("p3", s2.base)
        tgt.prepare("p3", [DiskInfo(key=d.key, size=d.size) for d in snap.disks])
        tgt.abort("p3")
        src.release_snapshot(snap, committed=False)
        with pytest.raises(ResourceNotFound):
            with tgt.open_disk("p3", "disk0"):
                pass
        left = tgt._snapshots()
        assert {s["SnapshotId"] for s in left} == {d.path for d in tgt.get_point("p2").disks}
    finally:
        tgt.destroy()
    assert tgt._snapshots() == []


def test_a_held_point_survives_any_retention_and_blocks_purge_until_released(
    backend: Backend, job: str, state_dir: Path, vm: list[Path], tmp_path: Path
) -> None:
    """Issue 10 item 3: a drill holds the point its VM runs on. Prune skips it (newer and older
    points go as retention says), destroy refuses while it stands, holds are idempotent by id."""
    src, tgt = kvm_source(job, vm, tmp_path), target(backend, job, state_dir)
    try:
        s1 = sync_point(src, tgt, "p1")
        ref = to_raw(vm[0], tmp_path / "p1.raw")
        qemu_io(vm[0], "write -P 0x78 0 1M")
        s2 = sync_point(src, tgt, "p2", s1.base)
        qemu_io(vm[0], "write -P 0x79 1M 1M")
        sync_point(src, tgt, "p3", s2.base)
        tgt.hold("p1", "drill-1", "drill of web01")
        tgt.hold("p1", "drill-1", "drill of web01")  # a retried saga step: one hold
        assert [(p.point_id, p.holds) for p in tgt.list_points()] == [
            ("p3", []),
            ("p2", []),
            ("p1", ["drill-1"]),
        ]
        assert tgt.prune(1) == ["p2"]  # p1 is held: kept, whatever the retention
        assert [p.point_id for p in tgt.list_points()] == ["p3", "p1"]
        assert same_content(exported(tgt, "p1", tmp_path / "x")["disk0"], ref)
        with pytest.raises(TargetError, match=r"refused while points are held .*p1 \(drill-1\)"):
            tgt.destroy()
        assert [p.point_id for p in tgt.list_points()] == ["p3", "p1"]  # nothing deleted
        with pytest.raises(InvalidSpec, match="hold id '../x'"):
            tgt.hold("p1", "../x", "drill")
        tgt.release("p1", "drill-1")
        tgt.release("p1", "drill-1")  # gone already: no error
        assert tgt.prune(1) == ["p1"]
    finally:
        for p in tgt.list_points():
            for h in p.holds:
                tgt.release(p.point_id, h)
        tgt.destroy()
    assert tgt._snapshots() == []


def test_an_instance_launched_from_a_point_has_the_point_on_its_volumes(
    backend: Backend, job: str, state_dir: Path, vm: list[Path], tmp_path: Path
) -> None:
    lab = backend.need_lab()
    src, tgt = kvm_source(job, vm, tmp_path), target(backend, job, state_dir)
    vms = AwsVmProvisioner(
        job, tgt.spec.model_copy(update={"instance": AwsInstanceSettings(instance_type="t3.micro")})
    )
    try:
        sync_point(src, tgt, "p1")
        ref = vms.create_vm(VmPlan(name="t1", point_id="p1"))
        inst = backend.ec2().describe_instances(InstanceIds=[ref.vm_id])["Reservations"][0]["Instances"][0]
        assert inst["InstanceType"] == "t3.micro" and inst["RootDeviceName"] == "/dev/xvda"
        vols = {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in inst["BlockDeviceMappings"]}
        assert set(vols) == {"/dev/xvda", "/dev/sdf"}  # disk0 boots, disk1 follows
        for device, path in zip(("/dev/xvda", "/dev/sdf"), vm, strict=True):
            raw = to_raw(path, tmp_path / f"{path.stem}.raw").read_bytes()
            assert lab.read(vols[device], 0, len(raw)) == raw, device
        vms.destroy_vm("t1")
    finally:
        tgt.destroy()


def test_a_zone_of_another_region_is_refused_naming_the_field(
    backend: Backend, job: str, state_dir: Path
) -> None:
    tgt = target(backend, job, state_dir, availability_zone=f"{backend.region}zz")
    with pytest.raises(ResourceNotFound) as ei:
        tgt.validate()
    assert ei.value.message.startswith("target.availability_zone: ")
