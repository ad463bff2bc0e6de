"""Failback's building blocks on AWS, against the AWS lab over boto3: a failed-over instance's changes
since its point (connectors.aws.vm_changes) copied by the copy engine into snapshots written on the
original instance's volume (connectors.aws.failback_sink), then cut over, undone, and cleaned up.

The source is a lab instance with one 1 GiB volume, replicated by the AWS source to the AWS target
(p1 full, p2 incremental); the instance is stopped (a failover) after writing once more (unplanned:
those writes never reached a point); the failed-over instance is made from p2 by `AwsVmProvisioner`.
The test writes into its volume as its guest would (the lab's control API).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers_kvm import MiB, fast_tuning, sync_point

from connectors.aws.blocks import list_changed
from connectors.aws.changed_blocks import changed_between
from connectors.aws.failback_sink import AwsFailbackSink
from connectors.aws.power import AwsSourcePower
from connectors.aws.source import AwsSourceConnector
from connectors.aws.spec import AwsInstanceSettings, AwsSource, AwsTarget
from connectors.aws.target import AwsTargetConnector
from connectors.aws.vm_changes import AwsVmChanges
from connectors.aws.vms import AwsVmProvisioner
from labs.aws import AwsLab
from sendense import platforms
from sendense.datapath.extents import Extent
from sendense.datapath.reverse import WithDiverged
from sendense.datapath.sync import copy_disk
from sendense.errors import ChangeTrackingLost, TargetError
from sendense.models import DiskCopyResult, SnapshotRef, VmPlan
from sendense.protocols import FailbackSink, VmChanges, point_base

BLOCK = 512 * 1024
KEY = "xvda"
VM = "fo"


@dataclass
class Site:
    lab: AwsLab
    job: str
    src_volume: str  # the original instance's volume (before the cutover)
    source: AwsSourceConnector
    target: AwsTargetConnector
    vms: AwsVmProvisioner
    changes: AwsVmChanges
    sink: AwsFailbackSink
    p2_base: str  # the job's change id of the disk at the failover point
    vm_volume: str

    def ec2(self) -> Any:
        return self.lab.client("ec2")

    def attached(self) -> str:
        inst = self.ec2().describe_instances(InstanceIds=[self.source.spec.instance_id])
        maps = inst["Reservations"][0]["Instances"][0]["BlockDeviceMappings"]
        return str(next(m["Ebs"]["VolumeId"] for m in maps if m["DeviceName"] == f"/dev/{KEY}"))


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


@pytest.fixture
def site(aws_lab: AwsLab, tmp_path: Path) -> Iterator[Site]:
    lab = aws_lab
    job, job_id = f"f{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:12]
    inst = lab.make_instance(f"src-{job}", [1])
    vol = inst.volumes[0][1]
    lab.write(vol, 0, pattern(0x11, 3 * MiB))
    lab.write(vol, 10 * MiB, pattern(0x12, 2 * MiB))
    spec = AwsSource(
        platform="aws", region=lab.region, endpoint_url=lab.endpoint_url, instance_id=inst.instance_id
    )
    source = AwsSourceConnector(job, spec, tmp_path / "work")
    tspec = AwsTarget(platform="aws", region=lab.region, endpoint_url=lab.endpoint_url,
                      instance=AwsInstanceSettings(instance_type="t3.micro"))  # fmt: skip
    target = AwsTargetConnector(job, tspec, tmp_path / "tstate", job_id)
    p1 = sync_point(source, target, "p1", tuning=fast_tuning())
    lab.write(vol, 6 * MiB, pattern(0x13, MiB))
    p2 = sync_point(source, target, "p2", p1.base, tuning=fast_tuning())
    # unplanned failover: the source wrote after its last point, then went down
    lab.write(vol, 20 * MiB + 4096, pattern(0x55, 4096))
    power = AwsSourcePower(job, spec)
    power.power_off_vm()
    vms = AwsVmProvisioner(job, tspec, job_id, tmp_path / "tstate")
    vms.poll_seconds = 0.2
    target.hold("p2", VM, "failover")
    ref = vms.create_vm(VmPlan(name=VM, point_id="p2"))
    desc = lab.client("ec2").describe_instances(InstanceIds=[ref.vm_id])["Reservations"][0]["Instances"][0]
    vm_volume = desc["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    changes = AwsVmChanges(job, tspec, job_id, tmp_path / "tstate")
    sink = AwsFailbackSink(job, spec, tmp_path / "work")
    s = Site(lab, job, vol, source, target, vms, changes, sink, p2.snap.disk(KEY).change_id, vm_volume)
    try:
        yield s
    finally:
        vms.destroy_vm(VM)
        sink.cleanup()
        target.release("p2", VM)
        target.destroy()
        source.forget()
        ec2 = lab.client("ec2")
        ec2.terminate_instances(InstanceIds=[inst.instance_id])
        f = [{"Name": "tag:sendense:job", "Values": [job]}, {"Name": "status", "Values": ["available"]}]
        for v in ec2.describe_volumes(Filters=f)["Volumes"]:  # a cutover's volume: attached, kept
            ec2.delete_volume(VolumeId=v["VolumeId"])


def reverse_sync(s: Site, snap: SnapshotRef, diverged: list[Extent]) -> DiskCopyResult:
    with s.changes.open_disk(snap, KEY) as vm_disk, s.sink.open_disk(KEY) as original:
        return copy_disk(WithDiverged(vm_disk, diverged), original, snap.disk(KEY), fast_tuning())


def written(r: DiskCopyResult) -> int:
    return r.stats.bytes_written + r.stats.bytes_zeroed


def digests(lab: AwsLab, volume: str, blocks: set[int]) -> dict[int, str]:
    return {i: hashlib.sha256(lab.read(volume, i * BLOCK, BLOCK)).hexdigest() for i in sorted(blocks)}


def same_volumes(lab: AwsLab, a: str, b: str) -> bool:
    """Equal by a digest of every block either volume ever had written (the rest reads zero in both)."""
    blocks = set(lab.written_blocks(a)) | set(lab.written_blocks(b))
    return digests(lab, a, blocks) == digests(lab, b, blocks)


def failback_left(s: Site) -> dict[str, list[str]]:
    """What the region holds of this job's failback: its snapshots (either side) and volumes."""
    ec2 = s.ec2()
    snaps = ec2.describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag:sendense:job", "Values": [s.job]}]
    )
    vols = ec2.describe_volumes(Filters=[{"Name": "tag:sendense:role", "Values": ["failback"]},
                                         {"Name": "tag:sendense:job", "Values": [s.job]}])  # fmt: skip
    return {
        "snapshots": sorted(
            x["SnapshotId"]
            for x in snaps["Snapshots"]
            if {"Key": "sendense:role", "Value": "failback"} in x["Tags"]
            or {"Key": "sendense:role", "Value": "failback-vm"} in x["Tags"]
        ),
        "volumes": sorted(v["VolumeId"] for v in vols["Volumes"] if v["State"] != "in-use"),
    }


def test_protocols() -> None:
    aws = platforms.get("aws")
    assert aws is not None and aws.vm_changes is not None and aws.failback_sink is not None
    tspec = AwsTarget(
        platform="aws", region="us-east-1", instance=AwsInstanceSettings(instance_type="t3.micro")
    )
    assert isinstance(AwsVmChanges("j", tspec), VmChanges)
    spec = AwsSource(platform="aws", region="us-east-1", instance_id="i-0123456789abcdef0")
    assert isinstance(AwsFailbackSink("j", spec, Path("/nonexistent")), FailbackSink)


def test_reverse_syncs_cutover_undo_and_cleanup(site: Site) -> None:
    s, lab = site, site.lab
    # the failed-over instance writes as its guest would
    lab.write(s.vm_volume, 1 * MiB + 100, pattern(0xA1, 64 * 1024))  # over the point's data, in block 2
    lab.write(s.vm_volume, 40 * MiB, pattern(0xA3, MiB))  # where the point reads zero: blocks 80, 81
    lab.write(s.vm_volume, 10 * MiB, bytes(BLOCK))  # zeroes a block of the point's data
    guest = 64 * 1024 + MiB + BLOCK

    r1 = s.changes.snapshot_vm(VM, "r1")
    assert r1.disk(KEY).base_change_id == point_base("p2") and r1.disk(KEY).tracking_lost is None
    changed = list(s.changes.changed_since_point(r1, KEY))
    assert changed == [Extent(2 * BLOCK, BLOCK), Extent(20 * BLOCK, BLOCK), Extent(80 * BLOCK, 2 * BLOCK)]
    # the source's own writes after p2, by the job's change tracking: one block
    diverged = list(s.sink.diverged(KEY, s.p2_base))
    assert diverged == [Extent(40 * BLOCK, BLOCK)]

    lab.write(s.vm_volume, 30 * MiB, b"after the snapshot")  # not in r1
    res = reverse_sync(s, r1, diverged)
    changed_bytes = sum(e.length for e in changed)
    assert res.kind == "incremental"
    # whole 512 KiB blocks: the VM's changed blocks and the diverged block put back, nothing more
    assert written(res) == changed_bytes + BLOCK
    print(f"\naws failback r1: VM wrote {guest} B in {changed_bytes} B of blocks (+{BLOCK} B diverged); "
          f"read {res.stats.bytes_read} B, written {written(res)} B "
          f"({written(res) / (changed_bytes + BLOCK):.2f}x the changed and diverged blocks)")  # fmt: skip
    s.changes.release(r1, committed=True)

    # the next reverse sync copies only what the VM wrote since r1
    lab.write(s.vm_volume, 60 * MiB, pattern(0xB1, 4096))
    r2 = s.changes.snapshot_vm(VM, "r2", {KEY: r1.disk(KEY).change_id})
    assert r2.disk(KEY).base_change_id == r1.disk(KEY).change_id
    with s.changes.open_disk(r2, KEY) as d:
        assert list(d.extents(r1.disk(KEY).change_id)) == [
            Extent(60 * BLOCK, BLOCK),
            Extent(120 * BLOCK, BLOCK),
        ]
    diverged = list(s.sink.diverged(KEY, s.p2_base))  # now also every block the reverse sync wrote
    assert diverged == [Extent(2 * BLOCK, BLOCK), Extent(20 * BLOCK, BLOCK), Extent(40 * BLOCK, BLOCK),
                        Extent(80 * BLOCK, 2 * BLOCK)]  # fmt: skip
    res = reverse_sync(s, r2, diverged)
    assert written(res) == 2 * BLOCK  # the two new blocks; the diverged ones hold the VM's content already
    s.changes.release(r2, committed=True)
    assert s.changes.tagged(VM) and r1.disk(KEY).change_id not in {
        x["SnapshotId"] for x in s.changes.tagged(VM)
    }

    # cutover: the VM stops, its last writes go in the final reverse sync
    lab.write(s.vm_volume, 70 * MiB, pattern(0xC1, BLOCK))
    s.vms.power_off(VM)
    r3 = s.changes.snapshot_vm(VM, "r3", {KEY: r2.disk(KEY).change_id})
    res = reverse_sync(s, r3, list(s.sink.diverged(KEY, s.p2_base)))
    assert written(res) == BLOCK
    s.changes.release(r3, committed=True)
    with pytest.raises(TargetError, match="power it off"):
        AwsSourcePower(s.job, s.source.spec).power_on_vm()
        try:
            s.sink.cut_over()
        finally:
            AwsSourcePower(s.job, s.source.spec).power_off_vm()
    s.sink.cut_over()
    s.sink.cut_over()  # idempotent
    new = s.attached()
    assert new != s.src_volume and same_volumes(lab, new, s.vm_volume)  # the original is the VM's disk
    assert s.ec2().describe_volumes(VolumeIds=[s.src_volume])["Volumes"][0]["State"] == "available"  # kept

    # undo swaps back: the original volume as it was (its own diverged write there), the new one kept
    s.sink.undo_cut_over()
    assert s.attached() == s.src_volume
    assert lab.read(s.src_volume, 20 * MiB + 4096, 4096) == pattern(0x55, 4096)
    s.sink.undo_cut_over()  # nothing cut over: no error
    s.sink.cut_over()
    assert same_volumes(lab, s.attached(), s.vm_volume)

    # the job's failover-point base still diffs against the new volume (it continues the old one's
    # lineage and says which it replaced): a forward sync from it is incremental
    fwd = s.source.create_snapshot("p3", {KEY: s.p2_base})
    assert fwd.disk(KEY).tracking_lost is None and fwd.disk(KEY).base_change_id == s.p2_base
    with s.source.open_disk(fwd, KEY) as d:
        listed = list(d.extents(s.p2_base))
    assert [e.offset // BLOCK for e in listed] == [2, 20, 40, 60, 80, 81, 120, 140]
    s.source.release_snapshot(fwd, committed=False)
    base = s.sink.rebase("fb1")
    assert base.disk(KEY).change_id.startswith("snap-") and base.disk(KEY).base_change_id is None
    s.sink.drop_base(base)

    # nothing orphaned: the reverse snapshots go with forget, the failback's own with cleanup
    s.changes.forget(VM)
    s.sink.cleanup()
    s.sink.cleanup()  # idempotent
    assert failback_left(s) == {"snapshots": [], "volumes": []}
    assert (
        s.ec2().describe_volumes(Filters=[{"Name": "volume-id", "Values": [s.src_volume]}])["Volumes"] == []
    )
    # the replaced volume is gone: the job's failover-point base still diffs (the new volume's tag
    # names it; found by the e2e, where cleanup ran before the job's next sync)
    fwd = s.source.create_snapshot("p3", {KEY: s.p2_base})
    assert fwd.disk(KEY).tracking_lost is None
    s.source.release_snapshot(fwd, committed=False)


def test_changes_listed_by_checksums_when_ebs_refuses_the_pair(site: Site) -> None:
    """Snapshots of different lineages: the source's snapshot at p2 and the target's point p2 hold the
    same data; the failed-over VM's snapshot differs from the source's where the VM wrote."""
    s = site
    aws, ebs = s.source.aws, s.source.aws.client("ebs")
    p2 = next(d.path for d in s.target.get_point("p2").disks if d.key == KEY)
    with pytest.raises(ChangeTrackingLost, match="different volumes"):
        list(list_changed(aws, ebs, s.p2_base, p2))
    assert list(changed_between(aws, ebs, s.p2_base, p2)) == []
    s.lab.write(s.vm_volume, 5 * BLOCK, pattern(0x11, BLOCK))  # the same bytes as the point's: no change
    s.lab.write(s.vm_volume, 5 * MiB, pattern(0xEE, 100))
    r1 = s.changes.snapshot_vm(VM, "r1")
    vm_snap = r1.disk(KEY).change_id
    assert [e.offset // BLOCK for e in s.changes.changed_since_point(r1, KEY)] == [5, 10]  # (by writes)
    assert list(changed_between(aws, ebs, s.p2_base, vm_snap)) == [Extent(10 * BLOCK, BLOCK)]
    s.changes.release(r1, committed=False)
    assert s.changes.tagged(VM) == []
