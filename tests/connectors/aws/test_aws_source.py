"""The EC2 source connector against the AWS lab (and real AWS when configured): what it lists and reads
is exactly the volume at the snapshot instant; incrementals list exactly the blocks written since;
tracking loss is detected; errors are one line, typed, without secrets."""

from __future__ import annotations

import threading
import time

import pytest
from helpers_aws import Backend

from connectors.aws import client
from connectors.aws.blocks import BLOCK
from connectors.aws.client import AccessDenied
from connectors.aws.source import AwsSourceConnector, disk_key
from connectors.aws.spec import AwsSource
from sendense.datapath.extents import Extent, coalesce
from sendense.errors import ResourceNotFound, ResourceUnavailable, SendenseError

GIB = 1 << 30


def source(b: Backend, job: str, **kw: object) -> AwsSourceConnector:
    spec = AwsSource(platform="aws", instance_id=b.instance_id, region=b.region, endpoint_url=b.endpoint_url)
    return AwsSourceConnector(job, spec.model_copy(update=kw))


def data_blocks(extents: list[Extent]) -> list[int]:
    return [e.offset // BLOCK + i for e in extents if not e.zero for i in range(e.length // BLOCK)]


def read_range(src: AwsSourceConnector, snap, key: str, start: int, end: int) -> bytes:  # type: ignore[no-untyped-def]
    """Through the connector's reader, in unaligned pieces (a whole block is the fast path)."""
    with src.open_disk(snap, key) as d:
        r = d.connect()
        step = 3 * BLOCK + 4096
        return b"".join(r.read(off, min(step, end - off)) for off in range(start, end, step))


def test_discover_lists_the_volumes_root_first(backend: Backend, job: str) -> None:
    vm = source(backend, job).discover()
    assert vm.platform == "aws" and vm.disks
    if backend.lab is not None:
        assert [(d.key, d.size, d.ref) for d in vm.disks] == [
            (disk_key(dev), gib * GIB, vol) for dev, vol, gib in backend.volumes
        ]
        assert vm.disks[0].key == "xvda"
    # hardware (issue 10 item 4): the instance type's vCPUs and memory, its ENIs, the root disk boots
    ec2 = source(backend, job).ec2
    inst = ec2.describe_instances(InstanceIds=[backend.instance_id])["Reservations"][0]["Instances"][0]
    itype = ec2.describe_instance_types(InstanceTypes=[inst["InstanceType"]])["InstanceTypes"][0]
    assert (vm.cpus, vm.memory_mib) == (itype["VCpuInfo"]["DefaultVCpus"], itype["MemoryInfo"]["SizeInMiB"])
    assert vm.cpus > 0 and vm.memory_mib > 0
    assert [n.mac for n in vm.nics] == [n["MacAddress"] for n in inst["NetworkInterfaces"]] and vm.nics
    assert all(n.network.startswith("subnet:subnet-") for n in vm.nics)
    assert [d.boot_order for d in vm.disks] == [1] + [None] * (len(vm.disks) - 1)


def test_a_full_snapshot_reads_the_volume_as_it_was_at_the_snapshot(backend: Backend, job: str) -> None:
    lab = backend.need_lab()
    (dev0, vol0, _), (dev1, vol1, _) = backend.volumes
    lab.write(vol0, 0, b"\x11" * 4096)
    lab.write(vol0, 3 * BLOCK + 100, b"\x22" * (BLOCK + 5))  # unaligned: touches blocks 3 and 4
    lab.write(vol1, 700 * BLOCK, bytes(BLOCK))  # zeros written still make a written block
    src = source(backend, job)
    snap = src.create_snapshot("s1", {})
    regions = [(0, 16 * BLOCK), (690 * BLOCK, 710 * BLOCK)]  # every written block and zeros around
    before = [[lab.read(v, a, b - a) for a, b in regions] for v in (vol0, vol1)]
    lab.write(vol0, 0, b"\x99" * BLOCK)  # after the snapshot: not in it
    assert [d.key for d in snap.disks] == [disk_key(dev0), disk_key(dev1)]
    assert all(d.base_change_id is None and d.tracking_lost is None for d in snap.disks)
    assert all(d.change_id.startswith("snap-") for d in snap.disks)
    with src.open_disk(snap, snap.disks[0].key) as d:
        ext = list(d.extents(None))
    assert data_blocks(ext) == [0, 3, 4]
    assert sum(e.length for e in coalesce(ext)) == GIB and ext[-1].end == GIB  # zero ranges fill the rest
    assert all(a.end == b.offset for a, b in zip(ext, ext[1:], strict=False))
    with src.open_disk(snap, snap.disks[1].key) as d:
        assert data_blocks(list(d.extents(None))) == [700]
        assert data_blocks(list(d.extents(None, start=701 * BLOCK))) == []
    for ds, want in zip(snap.disks, before, strict=True):
        for (a, b), w in zip(regions, want, strict=True):
            assert read_range(src, snap, ds.key, a, b) == w, (ds.key, a)


def test_an_incremental_lists_exactly_the_blocks_written_since(backend: Backend, job: str) -> None:
    lab = backend.need_lab()
    (_, vol0, _), (_, vol1, _) = backend.volumes
    lab.write(vol0, 0, b"\x11" * (8 * BLOCK))
    src = source(backend, job)
    s1 = src.create_snapshot("s1", {})
    base = {d.key: d.change_id for d in s1.disks}
    src.release_snapshot(s1, committed=True)
    lab.write(vol0, 2 * BLOCK, b"\x11" * BLOCK)  # the same bytes again: still a write
    lab.write(vol0, 5 * BLOCK + 7, b"\x33")
    for i in range(250):  # more than a listing page of the lab's smallest size
        lab.write(vol1, (1000 + 2 * i) * BLOCK, b"\x44" * 10)
    s2 = src.create_snapshot("s2", base)
    assert [d.base_change_id for d in s2.disks] == [base[d.key] for d in s2.disks]
    assert all(d.tracking_lost is None for d in s2.disks)
    with src.open_disk(s2, s2.disks[0].key) as d:
        assert data_blocks(list(d.extents(s2.disks[0].base_change_id))) == [2, 5]
    with src.open_disk(s2, s2.disks[1].key) as d:
        changed = list(d.extents(s2.disks[1].base_change_id))
        assert data_blocks(changed) == [1000 + 2 * i for i in range(250)]
        assert data_blocks(list(d.extents(s2.disks[1].base_change_id, start=1400 * BLOCK))) == [
            1000 + 2 * i for i in range(200, 250)
        ]
        r = d.connect()
        assert r.read(1002 * BLOCK, 16) == b"\x44" * 10 + bytes(6)
        assert r.read(1001 * BLOCK, BLOCK) == bytes(BLOCK)  # not in the snapshot: zero, no request


def test_a_retried_snapshot_step_reuses_the_sync_snapshots(backend: Backend, job: str) -> None:
    src = source(backend, job)
    a = src.create_snapshot("s1", {})
    b = src.create_snapshot("s1", {})
    try:
        assert [d.change_id for d in a.disks] == [d.change_id for d in b.disks]
        assert len(backend.tagged(job)) == len(a.disks)
    finally:
        src.forget()


def test_release_keeps_only_the_committed_snapshots_and_forget_removes_all(
    backend: Backend, job: str
) -> None:
    src = source(backend, job)
    s1 = src.create_snapshot("s1", {})
    src.release_snapshot(s1, committed=True)
    s2 = src.create_snapshot("s2", {d.key: d.change_id for d in s1.disks})
    src.release_snapshot(s2, committed=False)  # an abandoned sync: its snapshots go, the base stays
    assert {s["SnapshotId"] for s in backend.tagged(job)} == {d.change_id for d in s1.disks}
    s3 = src.create_snapshot("s3", {d.key: d.change_id for d in s1.disks})
    src.release_snapshot(s3, committed=True)
    assert {s["SnapshotId"] for s in backend.tagged(job)} == {d.change_id for d in s3.disks}
    src.forget()
    assert backend.tagged(job) == []


def test_a_gone_base_snapshot_is_tracking_lost(backend: Backend, job: str) -> None:
    src = source(backend, job)
    s1 = src.create_snapshot("s1", {})
    base = {d.key: d.change_id for d in s1.disks}
    backend.ec2().delete_snapshot(SnapshotId=s1.disks[1].change_id)
    try:
        s2 = src.create_snapshot("s2", base)
        assert s2.disks[0].tracking_lost is None
        lost = s2.disks[1].tracking_lost
        assert lost is not None and s1.disks[1].change_id in lost and "gone" in lost
    finally:
        src.forget()


def test_a_replaced_volume_is_tracking_lost(backend: Backend, job: str) -> None:
    backend.need_lab()
    ec2 = backend.ec2()
    src = source(backend, job)
    s1 = src.create_snapshot("s1", {})
    dev, old, gib = backend.volumes[1]
    ec2.detach_volume(VolumeId=old, InstanceId=backend.instance_id, Device=dev)
    zone = ec2.describe_volumes(VolumeIds=[old])["Volumes"][0]["AvailabilityZone"]
    new = ec2.create_volume(Size=gib, AvailabilityZone=zone)["VolumeId"]
    ec2.attach_volume(VolumeId=new, InstanceId=backend.instance_id, Device=dev)
    s2 = src.create_snapshot("s2", {d.key: d.change_id for d in s1.disks})
    lost = s2.disks[1].tracking_lost
    assert lost is not None and old in lost and new in lost
    with src.open_disk(s2, s2.disks[1].key) as d, pytest.raises(Exception) as ei:
        list(d.extents(s1.disks[1].change_id))  # and the API says so too: unrelated snapshots
    assert "different volumes" in str(ei.value) or "UNRELATED" in str(ei.value).upper()


def test_an_unknown_instance_is_a_one_line_not_found(backend: Backend, job: str) -> None:
    src = source(backend, job, instance_id="i-0000000000deadbee")
    with pytest.raises(ResourceNotFound) as ei:
        src.validate()
    assert ei.value.message.startswith("source.instance_id: no instance i-0000000000deadbee")
    assert "\n" not in ei.value.message and not ei.value.retryable


def test_wrong_credentials_are_refused_and_never_echoed(
    backend: Backend, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.need_lab()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-that-must-not-leak")
    with pytest.raises(AccessDenied) as ei:
        source(backend, job).validate()
    msg = ei.value.message
    assert "credentials" in msg and "AuthFailure" in msg and not ei.value.retryable
    assert "s3cr3t" not in msg and "AKIAWRONG" not in msg


def test_an_unreachable_endpoint_is_retryable(job: str) -> None:
    spec = AwsSource(
        platform="aws",
        instance_id="i-0123456789abcdef0",
        region="us-east-1",
        endpoint_url="http://127.0.0.1:9",
    )
    src = AwsSourceConnector(job, spec)
    with pytest.raises(ResourceUnavailable) as ei:
        src.validate()
    assert "cannot reach AWS" in ei.value.message and ei.value.retryable


def test_throttling_is_retried_with_backoff(
    backend: Backend, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = backend.need_lab()
    (_, vol0, _), _ = backend.volumes
    lab.write(vol0, 0, b"\x55" * BLOCK)
    src = source(backend, job)
    snap = src.create_snapshot("s1", {})
    try:
        before = lab.stats().get("GetSnapshotBlock", 0)
        lab.inject("GetSnapshotBlock", "RequestThrottledException", 2)
        lab.inject("DescribeInstances", "RequestLimitExceeded", 1)
        src.validate()
        with src.open_disk(snap, snap.disks[0].key) as d:
            assert d.connect().read(0, BLOCK) == b"\x55" * BLOCK
        assert lab.stats()["GetSnapshotBlock"] - before == 3  # two throttled, then the read
        lab.inject("GetSnapshotBlock", "InternalServerException", 50)  # beyond the retries
        monkeypatch.setattr(client, "RETRIES", {"mode": "standard", "max_attempts": 2})  # keep it short
        with src.open_disk(snap, snap.disks[0].key) as d, pytest.raises(ResourceUnavailable) as ei:
            d.connect().read(0, BLOCK)
        assert ei.value.retryable and "retries exhausted" in ei.value.message
    finally:
        lab.clear_faults()
        src.forget()


def test_a_missing_permission_fails_at_once_naming_the_call(backend: Backend, job: str) -> None:
    lab = backend.need_lab()
    lab.inject("CreateSnapshots", "UnauthorizedOperation", 1)
    try:
        with pytest.raises(AccessDenied) as ei:
            source(backend, job).create_snapshot("s1", {})
    finally:
        lab.clear_faults()
    msg = ei.value.message
    assert msg.startswith("ec2 CreateSnapshots ") and "lacks a permission (UnauthorizedOperation" in msg
    assert not ei.value.retryable and "\n" not in msg


def test_forget_names_a_snapshot_an_image_uses(backend: Backend, job: str) -> None:
    """The job's source snapshots go, except one an image was registered from: named in one line."""
    backend.need_lab()
    src = source(backend, job)
    s1 = src.create_snapshot("s1", {})
    root = s1.disks[0].change_id
    ec2 = backend.ec2()
    image = ec2.register_image(
        Name=f"from-{job}",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": root}}],
    )["ImageId"]
    try:
        with pytest.raises(SendenseError) as ei:
            src.forget()
        assert ei.value.message == (
            f"source {src.aws.where()}: snapshots of job {job} stay: {root} (in use by image {image})"
        )
        assert [s["SnapshotId"] for s in backend.tagged(job)] == [root] and src.recorded() == [root]
    finally:
        ec2.deregister_image(ImageId=image)
    src.forget()
    assert backend.tagged(job) == [] and src.recorded() == []


def test_a_retried_snapshot_step_retakes_a_failed_snapshot(backend: Backend, job: str) -> None:
    """A snapshot of the sync fails (state error) while the step waits: the step fails retryable, and
    its retry takes new snapshots (the failed one goes) instead of waiting on it again, every retry."""
    lab = backend.need_lab()
    src = source(backend, job)
    errors: list[SendenseError] = []

    def attempt() -> None:
        try:
            src.create_snapshot("s1", {})
        except SendenseError as e:
            errors.append(e)

    lab.set_snapshot_delay(60)
    try:
        t = threading.Thread(target=attempt)
        t.start()
        deadline = time.monotonic() + 30
        while len(backend.tagged(job)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        first = {s["VolumeId"]: s["SnapshotId"] for s in backend.tagged(job)}
        failed = first[backend.volumes[1][1]]
        lab.fail_snapshot(failed, "EBS could not take it")
        t.join(30)
    finally:
        lab.set_snapshot_delay(0.2)
    try:
        (err,) = errors
        assert err.retryable and f"snapshot {failed} failed: EBS could not take it" in err.message
        snap = src.create_snapshot("s1", {})
        taken = {d.change_id for d in snap.disks}
        assert not taken & set(first.values())
        assert {s["SnapshotId"] for s in backend.tagged(job)} == taken and src.recorded() == sorted(taken)
    finally:
        src.forget()
