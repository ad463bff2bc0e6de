"""The AWS lab's instances really run, through boto3: a QEMU VM per running instance on its volumes' data,
its serial console through GetConsoleOutput (base64 on the wire), its status through
DescribeInstanceStatus, Stop/Start/Terminate killing and starting it, images' block device mappings
honoured, ClientToken honoured, and no VM outliving the lab."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from botocore.handlers import decode_console_output

from labs.aws import AwsLab
from labs.guest.build import PART_OFFSET, build

BLOCK = 524288
READY = "SENDENSE-GUEST-READY"
EXT4_MAGIC = PART_OFFSET + 1024 + 56  # s_magic of the guest's root filesystem
EXT4_LABEL = PART_OFFSET + 1024 + 120  # s_volume_name: the initramfs mounts the root by this label


@pytest.fixture(scope="module")
def lab() -> Iterator[AwsLab]:
    root = Path(tempfile.mkdtemp(prefix="awslab-vm-"))
    with AwsLab(root, snapshot_delay=0.1) as running:
        yield running
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def ec2(lab: AwsLab) -> Any:
    return lab.client("ec2")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def console(ec2: Any, instance_id: str) -> str:
    return str(ec2.get_console_output(InstanceId=instance_id).get("Output", ""))


def wait_console(ec2: Any, instance_id: str, pattern: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = console(ec2, instance_id)
        if re.search(pattern, text):
            return text
        assert time.monotonic() < deadline, f"no {pattern!r} on {instance_id}'s console: {text[-300:]!r}"
        time.sleep(0.3)


def wait_state(ec2: Any, instance_id: str, state: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        inst: dict[str, Any] = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0][
            "Instances"
        ][0]
        if inst["State"]["Name"] == state:
            return inst
        assert time.monotonic() < deadline, f"{instance_id} is {inst['State']['Name']}, not {state}"
        time.sleep(0.2)


def statuses(ec2: Any, instance_id: str, **kw: Any) -> list[dict[str, Any]]:
    return list(ec2.describe_instance_status(InstanceIds=[instance_id], **kw)["InstanceStatuses"])


def guest_raw(tmp: Path) -> bytes:
    raw = tmp / "guest.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(build()), str(raw)], check=True)
    return raw.read_bytes()


def test_a_guest_instance_boots_its_console_is_base64_on_the_wire_and_its_writes_land(
    lab: AwsLab, ec2: Any, tmp_path: Path
) -> None:
    inst = lab.make_guest_instance("guest", [1])
    root, data = inst.volumes[0][1], inst.volumes[1][1]
    vm = lab.vm(inst.instance_id)
    assert vm["running"] and alive(vm["pid"]) and vm["disks"] == [root, data]  # root first
    text = wait_console(ec2, inst.instance_id, READY)
    assert "SeaBIOS" in text and "SENDENSE-GUEST-BOOTED mode=boot" in text

    raw = lab.client("ec2")  # the answer as it crosses the wire: botocore decodes Output by default
    raw.meta.events.unregister("after-call.ec2.GetConsoleOutput", decode_console_output)
    out = raw.get_console_output(InstanceId=inst.instance_id)
    assert out["InstanceId"] == inst.instance_id and out["Timestamp"].year >= 2024
    assert base64.b64decode(out["Output"], validate=True).decode() == text

    [st] = statuses(ec2, inst.instance_id)
    assert st["InstanceState"]["Name"] == "running" and st["AvailabilityZone"].startswith(lab.region)
    assert st["InstanceStatus"]["Status"] == st["SystemStatus"]["Status"] == "ok"

    # the guest mounted its root filesystem read-write: the superblock it wrote is in the volume
    image = guest_raw(tmp_path)
    sb = slice(PART_OFFSET + 1024, PART_OFFSET + 2048)
    assert lab.read(root, sb.start, 1024) != image[sb]
    assert lab.read(root, EXT4_MAGIC, 2) == image[EXT4_MAGIC : EXT4_MAGIC + 2] == b"\x53\xef"


def test_stop_kills_the_vm_start_boots_again_and_a_guest_shutdown_stops_the_instance(
    lab: AwsLab, ec2: Any
) -> None:
    inst = lab.make_guest_instance("cycle")
    iid, root = inst.instance_id, inst.volumes[0][1]
    wait_console(ec2, iid, READY)
    first = lab.vm(iid)["pid"]
    launched = wait_state(ec2, iid, "running")["LaunchTime"]

    ec2.stop_instances(InstanceIds=[iid])
    wait_state(ec2, iid, "stopped")
    assert not alive(first) and not lab.vm(iid)["running"]
    assert statuses(ec2, iid) == []
    [st] = statuses(ec2, iid, IncludeAllInstances=True)
    assert st["InstanceStatus"]["Status"] == "not-applicable"

    time.sleep(1.1)  # LaunchTime has whole seconds
    ec2.start_instances(InstanceIds=[iid])
    second = lab.vm(iid)["pid"]
    assert second != first and alive(second)
    again = wait_console(ec2, iid, READY)
    assert again.count(READY) == 1  # a console afresh for the new boot
    assert wait_state(ec2, iid, "running")["LaunchTime"] > launched

    ec2.stop_instances(InstanceIds=[iid])  # the root filesystem's label changes: the initramfs gives up
    assert lab.read(root, EXT4_LABEL, 7) == b"sdroot\0"
    lab.write(root, EXT4_LABEL, b"xxroot")
    ec2.start_instances(InstanceIds=[iid])
    text = wait_console(ec2, iid, "SENDENSE-GUEST-ERROR")
    assert "no root filesystem LABEL=sdroot" in text
    stopped = wait_state(ec2, iid, "stopped", timeout=60)  # the guest powered off: stopped by it
    assert stopped["StateReason"]["Code"] == "Client.InstanceInitiatedShutdown"
    assert not alive(lab.vm(iid)["pid"])

    ec2.start_instances(InstanceIds=[iid])
    third = lab.vm(iid)["pid"]
    ec2.terminate_instances(InstanceIds=[iid])
    assert not alive(third)
    assert wait_state(ec2, iid, "terminated")
    assert ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [root]}])["Volumes"] == []
    with pytest.raises(ClientError, match="IncorrectInstanceState"):
        ec2.start_instances(InstanceIds=[iid])


def test_a_volume_that_does_not_boot_launches_and_its_console_and_status_say_why(
    lab: AwsLab, ec2: Any
) -> None:
    vol = ec2.create_volume(Size=1, AvailabilityZone=f"{lab.region}a")["VolumeId"]
    lab.write(vol, 0, b"not a boot sector" * 64)  # data, but no MBR signature
    snap = ec2.create_snapshot(VolumeId=vol)["SnapshotId"]
    ec2.get_waiter("snapshot_completed").wait(SnapshotIds=[snap], WaiterConfig={"Delay": 1})
    image = ec2.register_image(
        Name="not-bootable", RootDeviceName="/dev/xvda", VirtualizationType="hvm",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snap}}],
    )["ImageId"]  # fmt: skip
    iid = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro")["Instances"][0][
        "InstanceId"
    ]
    text = wait_console(ec2, iid, "No bootable device", timeout=60)
    assert "Boot failed: not a bootable disk" in text
    [st] = statuses(ec2, iid)
    assert st["InstanceState"]["Name"] == "running"  # it launched, and stays up waiting, as on EC2
    assert st["SystemStatus"]["Status"] == "ok"
    assert st["InstanceStatus"]["Status"] == "impaired"
    [detail] = st["InstanceStatus"]["Details"]
    assert detail["Name"] == "reachability" and detail["Status"] == "failed" and "ImpairedSince" in detail
    ec2.terminate_instances(InstanceIds=[iid])


def test_an_image_of_a_running_guests_snapshots_boots_with_its_mappings(lab: AwsLab, ec2: Any) -> None:
    """CreateSnapshots of a running guest (its writes included), RegisterImage of the snapshots with a
    data disk grown, RunInstances: the new VM gets the root from the image's mapping (moto would give an
    empty volume, which does not boot) and the data volume with the snapshot's data."""
    src = lab.make_guest_instance("src", [1])
    wait_console(ec2, src.instance_id, READY)
    lab.write(src.volumes[1][1], 3 * BLOCK + 100, b"data disk bytes")
    snaps = ec2.create_snapshots(InstanceSpecification={"InstanceId": src.instance_id})["Snapshots"]
    ids = {s["VolumeId"]: s["SnapshotId"] for s in snaps}
    ec2.get_waiter("snapshot_completed").wait(SnapshotIds=list(ids.values()), WaiterConfig={"Delay": 1})
    ec2.terminate_instances(InstanceIds=[src.instance_id])
    image = ec2.register_image(
        Name="from-a-running-guest", RootDeviceName="/dev/xvda", VirtualizationType="hvm",
        BlockDeviceMappings=[
            {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": ids[src.volumes[0][1]]}},
            {"DeviceName": "/dev/sdf", "Ebs": {"SnapshotId": ids[src.volumes[1][1]], "VolumeSize": 2}},
        ],
    )["ImageId"]  # fmt: skip
    iid = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro")["Instances"][0][
        "InstanceId"
    ]
    inst = wait_state(ec2, iid, "running")
    vols = {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in inst["BlockDeviceMappings"]}
    assert lab.vm(iid)["disks"] == [vols["/dev/xvda"], vols["/dev/sdf"]]
    assert wait_console(ec2, iid, READY)
    assert lab.read(vols["/dev/sdf"], 3 * BLOCK + 100, 15) == b"data disk bytes"
    sizes = {v["VolumeId"]: v["Size"] for v in ec2.describe_volumes(VolumeIds=list(vols.values()))["Volumes"]}
    assert sizes[vols["/dev/sdf"]] == 2
    ec2.terminate_instances(InstanceIds=[iid])
    ec2.deregister_image(ImageId=image)


def test_run_instances_honours_its_client_token(lab: AwsLab, ec2: Any) -> None:
    image = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": ["aws-lab-base"]}])[
        "Images"
    ][0]["ImageId"]
    args = dict(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro")
    token = hashlib.sha256(b"once").hexdigest()[:32]
    first = ec2.run_instances(ClientToken=token, **args)["Instances"][0]["InstanceId"]
    again = ec2.run_instances(ClientToken=token, **args)["Instances"][0]["InstanceId"]
    assert again == first
    with pytest.raises(ClientError, match="IdempotentParameterMismatch"):
        ec2.run_instances(ClientToken=token, **{**args, "InstanceType": "t3.small"})
    ec2.terminate_instances(InstanceIds=[first])
    assert ec2.run_instances(ClientToken=token, **args)["Instances"][0]["InstanceId"] == first  # terminated

    # an answer lost on the way back (a 500 after the call ran): botocore's retry, same token, same one
    before = {i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]}
    lab.inject("RunInstances", "InternalError", lost=True)
    got = ec2.run_instances(**args)["Instances"][0]["InstanceId"]
    after = {i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]}
    assert after - before == {got}
    assert lab.stats()["RunInstances"] >= 2
    ec2.terminate_instances(InstanceIds=[got])


def test_a_security_group_in_use_cannot_be_deleted(lab: AwsLab, ec2: Any) -> None:
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnet = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"][0]["SubnetId"]
    group = ec2.create_security_group(GroupName="in-use", Description="d", VpcId=vpc)["GroupId"]
    image = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": ["aws-lab-base"]}])[
        "Images"
    ][0]["ImageId"]
    nic = {"DeviceIndex": 0, "SubnetId": subnet, "Groups": [group], "DeleteOnTermination": True}
    iid = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, NetworkInterfaces=[nic])["Instances"][0][
        "InstanceId"
    ]
    with pytest.raises(ClientError, match="DependencyViolation"):
        ec2.delete_security_group(GroupId=group)
    ec2.terminate_instances(InstanceIds=[iid])
    ec2.delete_security_group(GroupId=group)
    assert (
        ec2.describe_security_groups(Filters=[{"Name": "group-id", "Values": [group]}])["SecurityGroups"]
        == []
    )


def test_the_vms_die_with_the_lab(tmp_path: Path) -> None:
    lab = AwsLab(tmp_path / "lab", snapshot_delay=0.1).start()
    try:
        inst = lab.make_instance("doomed", [1])
        wait_console(lab.client("ec2"), inst.instance_id, "No bootable device", timeout=60)  # up, and idle
        pid = lab.vm(inst.instance_id)["pid"]
        assert alive(pid)
        assert lab.proc is not None
        os.kill(lab.proc.pid, signal.SIGKILL)  # no cleanup runs: PDEATHSIG alone must take the VM
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid)
    finally:
        lab.stop()


def test_with_a_state_delay_stop_and_start_take_time_as_on_ec2_and_repeat_as_no_ops(
    lab: AwsLab, ec2: Any
) -> None:
    """stopping (the VM runs on) then stopped (the VM killed); pending (the VM booting) then running;
    a repeated stop or start changes nothing; a forced stop ends a stopping at once; a stopping
    instance cannot be started."""
    inst = lab.make_instance("transitions", [1])
    iid = inst.instance_id
    first = lab.vm(iid)["pid"]
    try:
        lab.set_instance_state_delay(600)  # far longer than the steps below: no race with the settle
        answer = ec2.stop_instances(InstanceIds=[iid])["StoppingInstances"][0]
        assert answer["CurrentState"]["Name"] == "stopping" and answer["PreviousState"]["Name"] == "running"
        assert wait_state(ec2, iid, "stopping")["State"]["Code"] == 64
        assert alive(first) and lab.vm(iid)["running"]  # its guest still runs (and writes) while stopping
        ec2.stop_instances(InstanceIds=[iid])  # again: the stop goes on, nothing more
        assert wait_state(ec2, iid, "stopping") and alive(first)
        with pytest.raises(ClientError, match="IncorrectInstanceState"):
            ec2.start_instances(InstanceIds=[iid])
        assert [s["InstanceState"]["Name"] for s in statuses(ec2, iid, IncludeAllInstances=True)] == [
            "stopping"
        ]

        ec2.stop_instances(InstanceIds=[iid], Force=True)  # a forced stop: at once
        assert wait_state(ec2, iid, "stopped", timeout=5)["State"]["Code"] == 80
        assert not alive(first) and not lab.vm(iid)["running"]
        ec2.stop_instances(InstanceIds=[iid])  # stopped already: stays so, no VM
        assert wait_state(ec2, iid, "stopped") and not lab.vm(iid)["running"]

        answer = ec2.start_instances(InstanceIds=[iid])["StartingInstances"][0]
        assert answer["CurrentState"]["Name"] == "pending"
        assert wait_state(ec2, iid, "pending")["State"]["Code"] == 0
        second = lab.vm(iid)["pid"]
        assert second != first and alive(second)  # the VM boots while pending
        ec2.start_instances(InstanceIds=[iid])  # again: no second VM
        assert wait_state(ec2, iid, "pending") and lab.vm(iid)["pid"] == second and alive(second)

        lab.set_instance_state_delay(0.3)  # transitions that settle by themselves
        ec2.stop_instances(InstanceIds=[iid])  # (a pending instance stops: its start ends there)
        assert wait_state(ec2, iid, "stopped", timeout=30) and not alive(second)
        ec2.start_instances(InstanceIds=[iid])
        running = wait_state(ec2, iid, "running", timeout=30)
        assert running["State"]["Code"] == 16 and alive(lab.vm(iid)["pid"])
        ec2.start_instances(InstanceIds=[iid])  # running already: the same VM runs on
        assert wait_state(ec2, iid, "running")
    finally:
        lab.set_instance_state_delay(0)
        ec2.terminate_instances(InstanceIds=[iid])
    assert not lab.vm(iid)["running"]
