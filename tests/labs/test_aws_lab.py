"""The AWS lab against AWS's documented (and observed) EC2 and EBS direct API semantics, through boto3."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from labs.aws import AwsLab, AwsLabError

BLOCK = 524288
REPO = Path(__file__).resolve().parents[2]
DELAY = 0.15  # seconds a snapshot of the module's lab stays pending


@pytest.fixture(scope="module")
def lab() -> Iterator[AwsLab]:
    root = Path(tempfile.mkdtemp(prefix="awslab-"))
    with AwsLab(root, snapshot_delay=DELAY) as running:
        yield running
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def ec2(lab: AwsLab) -> Any:
    return lab.client("ec2")


@pytest.fixture(scope="module")
def ebs(lab: AwsLab) -> Any:
    return lab.client("ebs")


def block(seed: str) -> bytes:
    unit = hashlib.sha256(seed.encode()).digest()
    return unit * (BLOCK // len(unit))


def checksum(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def linear(blocks: dict[int, bytes]) -> str:
    """CompleteSnapshot's LINEAR aggregate: SHA-256 over the blocks' raw SHA-256 digests in index order."""
    return checksum(b"".join(hashlib.sha256(blocks[i]).digest() for i in sorted(blocks)))


def code(err: pytest.ExceptionInfo[ClientError]) -> tuple[str, int, str | None]:
    resp = err.value.response
    return resp["Error"]["Code"], resp["ResponseMetadata"]["HTTPStatusCode"], resp.get("Reason")


def put(ebs: Any, sid: str, index: int, data: bytes, **over: Any) -> Any:
    args = dict(
        SnapshotId=sid, BlockIndex=index, BlockData=data, DataLength=len(data), Checksum=checksum(data)
    )
    return ebs.put_snapshot_block(**{**args, "ChecksumAlgorithm": "SHA256", **over})


def wait_state(ec2: Any, sid: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        snap: dict[str, Any] = ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]
        if snap["State"] != "pending" or time.monotonic() > deadline:
            return snap
        time.sleep(0.05)


def direct(ebs: Any, ec2: Any, blocks: dict[int, bytes], parent: str | None = None, size: int = 1) -> str:
    extra = {"ParentSnapshotId": parent} if parent else {}
    sid: str = ebs.start_snapshot(VolumeSize=size, **extra)["SnapshotId"]
    for index, data in blocks.items():
        put(ebs, sid, index, data)
    ebs.complete_snapshot(
        SnapshotId=sid,
        ChangedBlocksCount=len(blocks),
        Checksum=linear(blocks),
        ChecksumAlgorithm="SHA256",
        ChecksumAggregationMethod="LINEAR",
    )
    assert wait_state(ec2, sid)["State"] == "completed"
    return sid


def all_pages(ebs: Any, operation: str, key: str, **kw: Any) -> tuple[list[dict[str, Any]], int]:
    rows: list[dict[str, Any]] = []
    pages = 0
    while True:
        page = getattr(ebs, operation)(**kw)
        pages += 1
        rows += page[key]
        if "NextToken" not in page:
            return rows, pages
        kw = {**kw, "NextToken": page["NextToken"]}


def read_block(ebs: Any, sid: str, index: int, token: str) -> bytes:
    got = ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=index, BlockToken=token)
    data: bytes = got["BlockData"].read()
    assert got["DataLength"] == BLOCK == len(data)
    assert got["Checksum"] == checksum(data) and got["ChecksumAlgorithm"] == "SHA256"
    return data


def snapshot_blocks(ebs: Any, sid: str) -> dict[int, bytes]:
    rows, _ = all_pages(ebs, "list_snapshot_blocks", "Blocks", SnapshotId=sid)
    return {b["BlockIndex"]: read_block(ebs, sid, b["BlockIndex"], b["BlockToken"]) for b in rows}


def gone(pid: int) -> bool:
    """The process exited (a zombie nobody reaps counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] == "Z"
    except FileNotFoundError:
        return True


def volume_snapshot(ec2: Any, volume_id: str) -> str:
    sid: str = ec2.create_snapshot(VolumeId=volume_id)["SnapshotId"]
    assert wait_state(ec2, sid)["State"] == "completed"
    return sid


# ---------------------------------------------------------------------- EBS direct writes


def test_block_size_is_512_kib_everywhere(lab: AwsLab, ebs: Any, ec2: Any) -> None:
    started = ebs.start_snapshot(VolumeSize=1)
    assert started["BlockSize"] == BLOCK and started["Status"] == "pending" and started["VolumeSize"] == 1
    ebs.complete_snapshot(SnapshotId=started["SnapshotId"], ChangedBlocksCount=0)
    first = direct(ebs, ec2, {0: block("a")})
    second = direct(ebs, ec2, {1: block("b")}, parent=first)
    listed = ebs.list_snapshot_blocks(SnapshotId=second)
    changed = ebs.list_changed_blocks(FirstSnapshotId=first, SecondSnapshotId=second)
    assert listed["BlockSize"] == changed["BlockSize"] == BLOCK
    assert snapshot_blocks(ebs, second) == {0: block("a"), 1: block("b")}


def test_put_snapshot_block_refuses_malformed_blocks(ebs: Any) -> None:
    sid = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    good = block("good")
    with pytest.raises(ClientError) as err:  # AWS answers a checksum mismatch as a signature failure
        put(ebs, sid, 0, good, Checksum=checksum(block("other")))
    assert code(err)[:2] == ("InvalidSignatureException", 403) and "x-amz-Checksum" in str(err.value)
    with pytest.raises(ClientError) as err:
        put(ebs, sid, 0, good[:4096])
    assert code(err) == ("ValidationException", 400, "INVALID_PARAMETER_VALUE")
    with pytest.raises(ClientError) as err:
        put(ebs, sid, 0, good, DataLength=4096)
    assert code(err) == ("ValidationException", 400, "INVALID_BLOCK")
    with pytest.raises(ClientError) as err:
        put(ebs, sid, 2048, good)  # 1 GiB holds blocks 0..2047
    assert code(err) == ("ValidationException", 400, "INVALID_BLOCK")
    with pytest.raises(ClientError) as err:
        put(ebs, sid, 0, good, ChecksumAlgorithm="SHA1")
    assert code(err)[0] == "ValidationException"
    put(ebs, sid, 2047, good)
    ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=1)
    with pytest.raises(ClientError) as err:  # sealed: no more writes, pending or completed
        put(ebs, sid, 1, good)
    assert code(err) == ("ValidationException", 400, "INVALID_SNAPSHOT_ID")


def test_parent_blocks_are_inherited_and_overwrites_change(ebs: Any, ec2: Any) -> None:
    parent = direct(ebs, ec2, {0: block("p0"), 1: block("p1"), 5: block("p5")})
    started = ebs.start_snapshot(VolumeSize=2, ParentSnapshotId=parent)
    assert started["ParentSnapshotId"] == parent and started["VolumeSize"] == 2
    child = started["SnapshotId"]
    put(ebs, child, 1, block("c1"))
    put(ebs, child, 3000, block("c3000"))
    ebs.complete_snapshot(SnapshotId=child, ChangedBlocksCount=2)
    assert wait_state(ec2, child)["State"] == "completed"
    want = {0: block("p0"), 1: block("c1"), 5: block("p5"), 3000: block("c3000")}
    assert snapshot_blocks(ebs, child) == want
    rows, _ = all_pages(
        ebs, "list_changed_blocks", "ChangedBlocks", FirstSnapshotId=parent, SecondSnapshotId=child
    )
    assert [r["BlockIndex"] for r in rows] == [1, 3000]
    assert "FirstBlockToken" not in rows[1]
    assert read_block(ebs, parent, 1, rows[0]["FirstBlockToken"]) == block("p1")
    assert read_block(ebs, child, 1, rows[0]["SecondBlockToken"]) == block("c1")
    with pytest.raises(ClientError) as err:  # a smaller volume than its parent
        ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=child)
    assert code(err)[0] == "ValidationException"


def test_start_snapshot_client_token_is_idempotent(ebs: Any) -> None:
    first = ebs.start_snapshot(VolumeSize=1, Description="one", ClientToken="token-1")
    again = ebs.start_snapshot(VolumeSize=1, Description="one", ClientToken="token-1")
    assert again["SnapshotId"] == first["SnapshotId"]
    with pytest.raises(ClientError) as err:
        ebs.start_snapshot(VolumeSize=1, Description="two", ClientToken="token-1")
    assert code(err)[:2] == ("ConflictException", 409)
    assert ebs.start_snapshot(VolumeSize=1, Description="one")["SnapshotId"] != first["SnapshotId"]


def test_complete_snapshot_checks_count_and_linear_checksum(lab: AwsLab, ebs: Any, ec2: Any) -> None:
    blocks = {0: block("x0"), 9: block("x9")}
    ok = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    put(ebs, ok, 0, block("first try"))
    for index, data in blocks.items():  # a rewrite of index 0 counts once
        put(ebs, ok, index, data)
    done = ebs.complete_snapshot(
        SnapshotId=ok, ChangedBlocksCount=2, Checksum=linear(blocks), ChecksumAlgorithm="SHA256",
        ChecksumAggregationMethod="LINEAR",
    )  # fmt: skip
    assert done["Status"] == "pending"  # sealing is asynchronous, as on AWS
    assert wait_state(ec2, ok)["State"] == "completed"
    assert ebs.complete_snapshot(SnapshotId=ok, ChangedBlocksCount=7)["Status"] == "completed"
    assert snapshot_blocks(ebs, ok) == blocks

    counted = ebs.start_snapshot(VolumeSize=1, Timeout=10)["SnapshotId"]
    for index, data in blocks.items():
        put(ebs, counted, index, data)
    ebs.complete_snapshot(SnapshotId=counted, ChangedBlocksCount=3)
    time.sleep(0.5)  # AWS keeps waiting for the missing block: pending until the snapshot's timeout
    assert wait_state(ec2, counted, timeout=0)["State"] == "pending"
    lab.advance_clock(601)
    assert wait_state(ec2, counted)["State"] == "error"


def aws_payload(name: str) -> bytes:
    """The blocks of published captures of real EBS (radkawar/stackd testdata/aws/ebs/blocks*.json)."""
    seed = f"stackd-ebs-synthetic-{name}\n".encode()
    return bytes(BLOCK) if name == "zero" else (seed * (BLOCK // len(seed) + 1))[:BLOCK]


@pytest.mark.parametrize(
    ("blocks", "aggregate", "state"),
    [  # what AWS answered: LINEAR hashes the raw digests; hashing their base64 text fails the snapshot
        ({0: "b", 3: "a", 7: "zero", 2047: "c"}, "Pq34jf4xh07iqiQpo/morRl/xL06mqy1ERimH+Hypi8=", "completed"),
        ({0: "a", 2: "b"}, "xKsCRmgUxD/XwebcOgEG4QQ7TRElxCfHnSnsGQDz4pU=", "error"),
    ],
)
def test_linear_checksum_as_aws_judged_it(
    ebs: Any, ec2: Any, blocks: dict[int, str], aggregate: str, state: str
) -> None:
    sid = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    for index, name in blocks.items():
        put(ebs, sid, index, aws_payload(name))
    ebs.complete_snapshot(
        SnapshotId=sid, ChangedBlocksCount=len(blocks), Checksum=aggregate, ChecksumAlgorithm="SHA256",
        ChecksumAggregationMethod="LINEAR",
    )  # fmt: skip
    final = wait_state(ec2, sid)
    assert final["State"] == state
    if state == "error":
        assert final["StateMessage"] == "Checksum mismatch for snapshot"
        with pytest.raises(ClientError) as err:
            ebs.list_snapshot_blocks(SnapshotId=sid)
        assert code(err)[0] == "ResourceNotFoundException"


def test_idle_pending_snapshot_times_out_and_pending_is_unreadable(lab: AwsLab, ebs: Any, ec2: Any) -> None:
    idle = ebs.start_snapshot(VolumeSize=1, Timeout=10)["SnapshotId"]
    with pytest.raises(ClientError) as err:
        ebs.list_snapshot_blocks(SnapshotId=idle)
    assert code(err) == ("ResourceNotFoundException", 404, "SNAPSHOT_NOT_FOUND")
    lab.advance_clock(601)
    assert wait_state(ec2, idle)["State"] == "error"
    with pytest.raises(ClientError) as err:
        put(ebs, idle, 0, block("late"))
    assert code(err)[0] == "ValidationException"


def test_start_snapshot_validation(lab: AwsLab, ebs: Any, ec2: Any) -> None:
    unchecked = lab.client("ebs", config=Config(parameter_validation=False))  # the server's own checks
    for bad in [{"VolumeSize": 1, "Timeout": 5}, {"VolumeSize": 0}, {"VolumeSize": 65537}]:
        with pytest.raises(ClientError) as err:
            unchecked.start_snapshot(**bad)
        assert code(err)[:2] == ("ValidationException", 400)
    with pytest.raises(ClientError) as err:
        ebs.start_snapshot(VolumeSize=1, ParentSnapshotId="snap-0123456789abcdef0")
    assert code(err) == ("ResourceNotFoundException", 404, "SNAPSHOT_NOT_FOUND")
    pending = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    with pytest.raises(ClientError) as err:
        ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=pending)
    assert code(err) == ("ValidationException", 400, "INVALID_SNAPSHOT_ID")
    snap = ec2.describe_snapshots(SnapshotIds=[pending])["Snapshots"][0]
    assert (snap["VolumeId"], snap["State"], snap["Progress"]) == ("vol-ffffffff", "pending", "0%")


# ---------------------------------------------------------------------- volumes and their snapshots


def test_volume_snapshot_is_the_volume_at_the_call(lab: AwsLab, ec2: Any, ebs: Any) -> None:
    vol = lab.make_instance("at-call", [1]).volumes[0][1]
    lab.write(vol, 3 * BLOCK + 100, b"before")
    expected = lab.read(vol, 3 * BLOCK, BLOCK)
    created = ec2.create_snapshot(VolumeId=vol)
    assert created["State"] == "pending" and created["VolumeSize"] == 1
    lab.write(vol, 3 * BLOCK + 100, b"AFTER!")  # lands before the snapshot completes: not in it
    lab.write(vol, 7 * BLOCK, b"new block")
    assert wait_state(ec2, created["SnapshotId"])["State"] == "completed"
    assert snapshot_blocks(ebs, created["SnapshotId"]) == {3: expected}
    assert lab.read(vol, 3 * BLOCK + 100, 6) == b"AFTER!"
    with pytest.raises(AwsLabError, match="outside volume"):
        lab.write(vol, (1 << 30) - 2, b"four")
    with pytest.raises(AwsLabError, match="404"):
        lab.write("vol-00000000000000000", 0, b"x")


def test_a_pending_volume_snapshot_can_fail(lab: AwsLab, ec2: Any, ebs: Any) -> None:
    """AWS sometimes fails a snapshot: state error, with a message; EBS answers it as not found."""
    vol = lab.make_instance("fails", [1]).volumes[0][1]
    lab.write(vol, 0, b"data")
    lab.set_snapshot_delay(60)
    try:
        sid = ec2.create_snapshot(VolumeId=vol)["SnapshotId"]
        lab.fail_snapshot(sid, "the lab failed it")
    finally:
        lab.set_snapshot_delay(DELAY)
    snap = ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]
    assert (snap["State"], snap["StateMessage"]) == ("error", "the lab failed it")
    with pytest.raises(ClientError) as err:
        ebs.list_snapshot_blocks(SnapshotId=sid)
    assert code(err)[:2] == ("ResourceNotFoundException", 404)
    with pytest.raises(AwsLabError, match="not a pending snapshot"):
        lab.fail_snapshot(sid)
    ec2.delete_snapshot(SnapshotId=sid)


def test_written_blocks_count_zero_writes(lab: AwsLab, ec2: Any, ebs: Any) -> None:
    vol = lab.make_instance("zeros", [1]).volumes[0][1]
    assert lab.written_blocks(vol) == []
    lab.write(vol, 5 * BLOCK, bytes(BLOCK))  # zeros, but written: AWS tracks writes
    lab.write(vol, 9 * BLOCK + 17, b"\x01")
    assert lab.written_blocks(vol) == [5, 9]
    assert snapshot_blocks(ebs, volume_snapshot(ec2, vol)) == {
        5: bytes(BLOCK),
        9: lab.read(vol, 9 * BLOCK, BLOCK),
    }


def test_create_snapshots_takes_all_volumes_at_one_instant(lab: AwsLab, ec2: Any, ebs: Any) -> None:
    inst = lab.make_instance("consistent", [1, 1])
    (_, root, _), (_, data, _) = inst.volumes
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            lab.write(root, 0, n.to_bytes(8, "big"))
            lab.write(data, 0, n.to_bytes(8, "big"))

    thread = threading.Thread(target=writer)
    thread.start()
    lab.set_capture_pause(0.2)  # writes would land between the two volumes if the lab let them
    try:
        time.sleep(0.1)
        snaps = ec2.create_snapshots(InstanceSpecification={"InstanceId": inst.instance_id})["Snapshots"]
    finally:
        lab.set_capture_pause(0)
        stop.set()
        thread.join()
    by_volume = {s["VolumeId"]: wait_state(ec2, s["SnapshotId"])["SnapshotId"] for s in snaps}
    assert set(by_volume) == {root, data}
    counters = {v: int.from_bytes(snapshot_blocks(ebs, sid)[0][:8], "big") for v, sid in by_volume.items()}
    assert counters[root] - counters[data] in (0, 1)  # the data write of a round may not have landed yet


def test_list_changed_blocks_between_volume_snapshots(lab: AwsLab, ec2: Any, ebs: Any) -> None:
    vol = lab.make_instance("changes", [1]).volumes[0][1]
    for i in range(150):
        lab.write(vol, i * BLOCK, block(f"v{i}"))
    first = volume_snapshot(ec2, vol)
    lab.write(vol, 3 * BLOCK, block("v3"))  # identical bytes: still a write, so a change
    lab.write(vol, 10 * BLOCK + 4096, b"partial")
    for i in range(200, 320):
        lab.write(vol, i * BLOCK, block(f"n{i}"))
    second = volume_snapshot(ec2, vol)
    want = [3, 10, *range(200, 320)]
    rows, pages = all_pages(
        ebs,
        "list_changed_blocks",
        "ChangedBlocks",
        FirstSnapshotId=first,
        SecondSnapshotId=second,
        MaxResults=100,
    )
    assert [r["BlockIndex"] for r in rows] == want and pages >= 3
    assert all("FirstBlockToken" in r for r in rows[:2]) and not any("FirstBlockToken" in r for r in rows[2:])
    assert read_block(ebs, second, 10, rows[1]["SecondBlockToken"]) == lab.read(vol, 10 * BLOCK, BLOCK)
    later, _ = all_pages(
        ebs, "list_changed_blocks", "ChangedBlocks", FirstSnapshotId=first, SecondSnapshotId=second,
        StartingBlockIndex=250, MaxResults=100,
    )  # fmt: skip
    assert [r["BlockIndex"] for r in later] == list(range(250, 320))
    listed, pages = all_pages(ebs, "list_snapshot_blocks", "Blocks", SnapshotId=first, MaxResults=100)
    assert [b["BlockIndex"] for b in listed] == list(range(150)) and pages == 2
    assert read_block(ebs, first, 149, listed[149]["BlockToken"]) == block("v149")
    with pytest.raises(ClientError) as err:
        ebs.list_changed_blocks(SecondSnapshotId=second)  # AWS requires both snapshots
    assert code(err) == ("ValidationException", 400, "INVALID_SNAPSHOT_ID")
    with pytest.raises(ClientError) as err:
        ebs.list_snapshot_blocks(SnapshotId=first, MaxResults=10001)
    assert code(err)[0] == "ValidationException"
    with pytest.raises(ClientError) as err:
        ebs.list_snapshot_blocks(SnapshotId=first, NextToken="AAAA")
    assert code(err) == ("ValidationException", 400, "INVALID_PAGE_TOKEN")
    other = volume_snapshot(ec2, lab.make_instance("unrelated", [1]).volumes[0][1])
    with pytest.raises(ClientError) as err:
        ebs.list_changed_blocks(FirstSnapshotId=first, SecondSnapshotId=other)
    assert code(err) == ("ValidationException", 400, "UNRELATED_SNAPSHOTS")


def test_get_snapshot_block_checks_its_token(ebs: Any, ec2: Any) -> None:
    one = direct(ebs, ec2, {0: block("t0"), 1: block("t1")})
    two = direct(ebs, ec2, {0: block("t0")})
    tokens = {b["BlockIndex"]: b["BlockToken"] for b in ebs.list_snapshot_blocks(SnapshotId=one)["Blocks"]}
    for sid, index, token in [(one, 1, tokens[0]), (one, 0, "AlMBbm90LWEtdG9rZW4"), (two, 0, tokens[0])]:
        with pytest.raises(ClientError) as err:
            ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=index, BlockToken=token)
        assert code(err) == ("ValidationException", 400, "INVALID_BLOCK_TOKEN")
    ebs.list_snapshot_blocks(SnapshotId=one)  # a later listing does not void earlier tokens
    assert read_block(ebs, one, 0, tokens[0]) == block("t0")


def test_deleting_a_parent_leaves_the_child_readable(ebs: Any, ec2: Any) -> None:
    parent = direct(ebs, ec2, {0: block("d0"), 2: block("d2")})
    child = direct(ebs, ec2, {2: block("c2")}, parent=parent)
    ec2.delete_snapshot(SnapshotId=parent)
    with pytest.raises(ClientError) as err:
        ec2.describe_snapshots(SnapshotIds=[parent])
    assert code(err)[0] == "InvalidSnapshot.NotFound"
    with pytest.raises(ClientError) as err:
        ebs.list_snapshot_blocks(SnapshotId=parent)
    assert code(err)[0] == "ResourceNotFoundException"
    assert snapshot_blocks(ebs, child) == {0: block("d0"), 2: block("c2")}


def test_create_volume_from_a_snapshot_has_its_data(lab: AwsLab, ebs: Any, ec2: Any) -> None:
    sid = direct(ebs, ec2, {1: block("vol1")}, size=2)
    vol = ec2.create_volume(SnapshotId=sid, AvailabilityZone="us-east-1a")
    assert vol["Size"] == 2 and vol["SnapshotId"] == sid
    assert lab.read(vol["VolumeId"], BLOCK, BLOCK) == block("vol1")
    assert lab.read(vol["VolumeId"], 0, BLOCK) == bytes(BLOCK)
    assert lab.read(vol["VolumeId"], (2 << 30) - 10, 10) == bytes(10)
    with pytest.raises(ClientError) as err:
        ec2.create_volume(SnapshotId=sid, AvailabilityZone="us-east-1a", Size=1)
    assert code(err)[0] == "InvalidParameterValue"
    pending = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    with pytest.raises(ClientError) as err:
        ec2.create_volume(SnapshotId=pending, AvailabilityZone="us-east-1a")
    assert code(err)[0] == "IncorrectState"
    # a volume continues its snapshot's lineage: its next snapshot diffs against the source
    lab.write(vol["VolumeId"], 0, b"changed")
    later = volume_snapshot(ec2, vol["VolumeId"])
    changed = ebs.list_changed_blocks(FirstSnapshotId=sid, SecondSnapshotId=later)["ChangedBlocks"]
    assert [r["BlockIndex"] for r in changed] == [0]


def test_register_image_and_run_instances_gives_the_snapshots_data(lab: AwsLab, ebs: Any, ec2: Any) -> None:
    root = direct(ebs, ec2, {0: block("boot")})
    data = direct(ebs, ec2, {4: block("data")}, size=2)
    image = ec2.register_image(
        Name="lab-image", RootDeviceName="/dev/xvda", VirtualizationType="hvm", Architecture="x86_64",
        BlockDeviceMappings=[
            {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": root}},
            {"DeviceName": "/dev/sdf", "Ebs": {"SnapshotId": data, "VolumeSize": 3}},
        ],
    )["ImageId"]  # fmt: skip
    mappings = ec2.describe_images(ImageIds=[image])["Images"][0]["BlockDeviceMappings"]
    assert {m["DeviceName"]: m["Ebs"]["SnapshotId"] for m in mappings} == {
        "/dev/xvda": root,
        "/dev/sdf": data,
    }
    inst = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro")["Instances"][0]
    desc = ec2.describe_instances(InstanceIds=[inst["InstanceId"]])["Reservations"][0]["Instances"][0]
    assert desc["RootDeviceName"] == "/dev/xvda"
    vols = {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in desc["BlockDeviceMappings"]}
    assert set(vols) == {"/dev/xvda", "/dev/sdf"}
    sizes = {v["VolumeId"]: v["Size"] for v in ec2.describe_volumes(VolumeIds=list(vols.values()))["Volumes"]}
    assert sizes == {vols["/dev/xvda"]: 1, vols["/dev/sdf"]: 3}
    assert lab.read(vols["/dev/xvda"], 0, BLOCK) == block("boot")
    assert lab.read(vols["/dev/sdf"], 4 * BLOCK, BLOCK) == block("data")
    with pytest.raises(ClientError) as err:
        ec2.delete_snapshot(SnapshotId=root)
    assert code(err)[0] == "InvalidSnapshot.InUse"


def test_make_instance_has_root_and_data_disks(lab: AwsLab, ec2: Any) -> None:
    inst = lab.make_instance("web", [2, 1, 1])
    assert [(d, s) for d, _, s in inst.volumes] == [("/dev/xvda", 2), ("/dev/sdf", 1), ("/dev/sdg", 1)]
    desc = ec2.describe_instances(InstanceIds=[inst.instance_id])["Reservations"][0]["Instances"][0]
    assert (
        {"Key": "Name", "Value": "web"} in desc["Tags"] and desc["SubnetId"] and desc["SecurityGroups"] == []
    )
    assert {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in desc["BlockDeviceMappings"]} == {
        d: v for d, v, _ in inst.volumes
    }
    assert lab.read(inst.volumes[0][1], (2 << 30) - BLOCK, BLOCK) == bytes(BLOCK)


def changed(ebs: Any, first: str, second: str) -> list[int]:
    rows = ebs.list_changed_blocks(FirstSnapshotId=first, SecondSnapshotId=second)["ChangedBlocks"]
    return [r["BlockIndex"] for r in rows]


def stopped(ec2: Any, instance_id: str) -> None:
    ec2.stop_instances(InstanceIds=[instance_id], Force=True)
    for _ in range(200):
        desc = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        if desc["State"]["Name"] == "stopped":
            return
        time.sleep(0.05)
    raise AssertionError(f"{instance_id} did not stop")


def test_an_instance_from_a_snapshot_continues_its_lineage(lab: AwsLab, ebs: Any, ec2: Any) -> None:
    """AWS (EBS user guide, "Write snapshots"): snapshot A made volume 1, snapshot D of volume 1 is an
    incremental snapshot of A. So ListChangedBlocks(A, D) lists what the volume's writes changed, for a
    volume RunInstances made from an image of A as for one CreateVolume made."""
    point = direct(ebs, ec2, {0: block("p0"), 3: block("p3")})
    image = ec2.register_image(
        Name="lineage-image", RootDeviceName="/dev/xvda", VirtualizationType="hvm", Architecture="x86_64",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": point}}],
    )["ImageId"]  # fmt: skip
    inst = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro")["Instances"][0]
    desc = ec2.describe_instances(InstanceIds=[inst["InstanceId"]])["Reservations"][0]["Instances"][0]
    vol = desc["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    assert ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["SnapshotId"] == point
    lab.write(vol, 3 * BLOCK + 7, b"guest")
    lab.write(vol, 9 * BLOCK, b"new")
    later = volume_snapshot(ec2, vol)
    assert changed(ebs, point, later) == [3, 9]
    ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])
    ec2.deregister_image(ImageId=image)


def test_swapping_an_instances_root_volume(lab: AwsLab, ebs: Any, ec2: Any) -> None:
    """A failback's cutover: a volume made from a snapshot written with the direct APIs (parent: a
    snapshot of the instance's volume) replaces the root volume of the stopped instance, at its device;
    its snapshots stay in the lineage of the old volume's."""
    inst = lab.make_instance("swap", [1])
    iid, old = inst.instance_id, inst.volumes[0][1]
    lab.write(old, 0, b"before")
    base = volume_snapshot(ec2, old)
    lab.write(old, 2 * BLOCK, b"diverged")
    head = volume_snapshot(ec2, old)
    written = direct(ebs, ec2, {5: block("reverse")}, parent=head)
    new = ec2.create_volume(SnapshotId=written, AvailabilityZone="us-east-1a")["VolumeId"]
    with pytest.raises(ClientError) as err:
        ec2.detach_volume(VolumeId=old, InstanceId=iid)
    assert code(err)[0] == "IncorrectState" and "root volume" in str(err.value)
    stopped(ec2, iid)
    with pytest.raises(ClientError) as err:  # the device is the old volume's still
        ec2.attach_volume(VolumeId=new, InstanceId=iid, Device="/dev/xvda")
    assert code(err)[0] == "InvalidParameterValue" and "already in use" in str(err.value)
    ec2.detach_volume(VolumeId=old, InstanceId=iid)
    ec2.attach_volume(VolumeId=new, InstanceId=iid, Device="/dev/xvda")
    with pytest.raises(ClientError) as err:
        ec2.attach_volume(VolumeId=new, InstanceId=iid, Device="/dev/sdf")
    assert code(err)[0] == "VolumeInUse"
    desc = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in desc["BlockDeviceMappings"]} == {"/dev/xvda": new}
    assert lab.read(new, 2 * BLOCK, 8) == b"diverged" and lab.read(new, 5 * BLOCK, BLOCK) == block("reverse")
    lab.write(new, 7 * BLOCK, b"after")
    now = volume_snapshot(ec2, new)
    assert changed(ebs, base, now) == [2, 5, 7]  # the old volume's, the written snapshot's, the new volume's
    ec2.terminate_instances(InstanceIds=[iid])


# ---------------------------------------------------------------------- credentials, faults, processes


def test_wrong_credentials_are_refused(lab: AwsLab) -> None:
    for key, secret, ec2_code, ebs_code in [
        ("AKIAIOSFODNN7EXAMPLE", lab.secret_access_key, "AuthFailure", "UnrecognizedClientException"),
        (lab.access_key_id, "x" * 40, "AuthFailure", "InvalidSignatureException"),
    ]:
        creds = {
            "aws_access_key_id": key,
            "aws_secret_access_key": secret,
            "config": Config(retries={"total_max_attempts": 1}),
        }
        with pytest.raises(ClientError) as err:
            lab.client("ec2", **creds).describe_snapshots()
        assert code(err)[:2] == (ec2_code, 401)
        with pytest.raises(ClientError) as err:
            lab.client("ebs", **creds).start_snapshot(VolumeSize=1)
        assert code(err)[:2] == (ebs_code, 403)


def test_injected_faults_are_retried_and_calls_counted(lab: AwsLab, ebs: Any, ec2: Any) -> None:
    sid = direct(ebs, ec2, {0: block("f0")})
    token = ebs.list_snapshot_blocks(SnapshotId=sid)["Blocks"][0]["BlockToken"]
    lab.reset_stats()
    lab.inject("GetSnapshotBlock", "RequestThrottledException", count=2)
    retrying = lab.client("ebs", config=Config(retries={"mode": "standard", "total_max_attempts": 3}))
    got = retrying.get_snapshot_block(SnapshotId=sid, BlockIndex=0, BlockToken=token)
    assert got["ResponseMetadata"]["RetryAttempts"] == 2 and got["BlockData"].read() == block("f0")
    assert lab.stats()["GetSnapshotBlock"] == 3
    once = Config(retries={"mode": "standard", "total_max_attempts": 1})
    lab.inject("DescribeSnapshots", "RequestLimitExceeded")
    with pytest.raises(ClientError) as err:
        lab.client("ec2", config=once).describe_snapshots(SnapshotIds=[sid])
    assert code(err)[:2] == ("RequestLimitExceeded", 503)
    lab.reset_stats()
    lab.inject("DescribeSnapshots", "InvalidParameterValue", after=2)  # the third call fails, once
    plain = lab.client("ec2", config=once)
    for _ in range(2):
        plain.describe_snapshots(SnapshotIds=[sid])
    with pytest.raises(ClientError) as err:
        plain.describe_snapshots(SnapshotIds=[sid])
    assert code(err)[:2] == ("InvalidParameterValue", 400)
    plain.describe_snapshots(SnapshotIds=[sid])
    assert lab.stats()["DescribeSnapshots"] == 4
    lab.inject("PutSnapshotBlock", "InternalServerException", count=5)
    lab.clear_faults()
    lab.reset_stats()
    pending = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    for i in range(3):
        put(ebs, pending, i, block(f"s{i}"))
    assert lab.stats() == {"StartSnapshot": 1, "PutSnapshotBlock": 3}


def test_detached_lab_survives_its_starter_and_stops_from_its_dir(tmp_path: Path) -> None:
    root = tmp_path / "detached"
    starter = f"from labs.aws import AwsLab; AwsLab({str(root)!r}).start(detached=True)"
    subprocess.run([sys.executable, "-c", starter], check=True, cwd=REPO, timeout=30)
    lab = AwsLab.attach(root)
    pid = json.loads((root / "lab.json").read_text())["pid"]
    assert lab.running and (root / "lab.json").stat().st_mode & 0o777 == 0o600
    assert lab.client("ec2").describe_vpcs()["Vpcs"]
    AwsLab(root).stop()
    assert not (root / "lab.json").exists() and gone(pid)
    with pytest.raises(AwsLabError):
        AwsLab.attach(root)


def test_start_reports_why_the_server_did_not_come_up(tmp_path: Path) -> None:
    with pytest.raises(AwsLabError, match="loopback only"):
        AwsLab(tmp_path / "bad", host="0.0.0.0").start()


def test_write_and_read_cli_round_trip(lab: AwsLab, tmp_path: Path) -> None:
    vol = lab.make_instance("cli", [1]).volumes[0][1]
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    payload = os.urandom(3 * BLOCK + 1234)
    src.write_bytes(payload)
    cli = [sys.executable, "-m", "labs.aws"]
    run = {"cwd": REPO, "capture_output": True, "text": True, "timeout": 60}
    subprocess.run([*cli, "write", "--dir", str(lab.root), vol, "777", "--file", str(src)], check=True, **run)
    subprocess.run(
        [*cli, "write", "--dir", str(lab.root), vol, "0", "--pattern", "0xab", "--length", "10"],
        check=True,
        **run,
    )
    subprocess.run(
        [*cli, "read", "--dir", str(lab.root), vol, "0", str(777 + len(payload)), "--out", str(out)],
        check=True,
        **run,
    )
    assert out.read_bytes() == b"\xab" * 10 + bytes(767) + payload
    bad = subprocess.run(
        [*cli, "read", "--dir", str(lab.root), "vol-00000000000000000", "0", "1", "--out", str(out)], **run
    )
    assert bad.returncode != 0 and "does not exist" in bad.stderr


def _raw_request(lab: AwsLab, path: str, length: str, send: int) -> tuple[int, dict[str, Any]]:
    """POST with the given Content-Length, streaming `send` bytes of body from a thread (ignoring the
    lab hanging up); the status and JSON body of the lab's answer."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(lab.endpoint_url)
    s = socket.create_connection((url.hostname, url.port), timeout=120)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: lab\r\nContent-Length: {length}\r\n\r\n".encode())

    def stream() -> None:
        chunk = b"[" * (1 << 20)
        try:
            for _ in range(send >> 20):
                s.sendall(chunk)
        except OSError:
            pass

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    f = s.makefile("rb")
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline().strip()) != b"":
        k, v = line.decode().split(":", 1)
        headers[k.lower()] = v.strip()
    body = json.loads(f.read(int(headers["content-length"])))
    s.close()
    t.join(timeout=120)
    return status, body


@pytest.mark.parametrize("path", ["/_lab/faults", "/"])
def test_a_huge_request_body_is_refused_before_it_is_read(lab: AwsLab, path: str) -> None:
    """A control or AWS request announcing 300 MiB (and sending it) is answered 413 from its headers:
    the lab's memory does not grow by the body (it read it whole before, then parsed it)."""
    import psutil

    proc = psutil.Process(int(lab._get("pid")))
    before = proc.memory_info().rss
    status, body = _raw_request(lab, path, str(300 << 20), 300 << 20)
    assert status == 413, body
    assert "too large" in body.get("error", "") and "\n" not in body["error"]
    assert proc.memory_info().rss - before < 200 << 20


@pytest.mark.parametrize("length", ["-1", "12abc"])
def test_a_content_length_that_is_not_a_byte_count_is_refused(lab: AwsLab, length: str) -> None:
    for path in ("/_lab/faults", "/"):
        status, body = _raw_request(lab, path, length, 0)
        assert (status, body) == (400, {"error": "the request's Content-Length is not a byte count"})


def test_a_control_body_nested_too_deep_is_a_bad_request(lab: AwsLab) -> None:
    status, body = _raw_request(lab, "/_lab/settings", str(1 << 20), 1 << 20)
    assert (status, body) == (400, {"error": "the request body must be JSON"})
