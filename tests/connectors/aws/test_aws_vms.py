"""VMs from recovery points on the AWS target, against the AWS lab (whose instances really boot).

The bootable guest's disk is replicated from a stopped KVM VM (a copy of the guest image) to EBS
snapshots through the real copy engine: point p1 boots; p2, the same disk with its MBR wiped, does not.
A drill's test VM from the held point boots to the guest's ready marker in an isolated security group,
and its destroy leaves nothing and the point's blocks as they were; creates cut half-way are destroyed
by name or taken over by a retry, never doubled.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers_kvm import qemu_io, sync_point

from connectors.aws.blocks import get_block, list_blocks
from connectors.aws.spec import AwsInstanceSettings, AwsTarget
from connectors.aws.target import AwsTargetConnector
from connectors.aws.vms import AwsVmProvisioner
from connectors.kvm.source import make_kvm_source
from connectors.kvm.spec import KvmSource
from labs.aws import AwsLab
from labs.guest.build import build
from sendense.errors import InvalidSpec, ResourceNotFound, SendenseError, TargetError
from sendense.models import JobSpec, NicInfo, VmPlan
from sendense.platforms import vms_for
from sendense.protocols import VmProvisioner

READY = "SENDENSE-GUEST-READY"


@dataclass
class Replica:
    lab: AwsLab
    job: str
    job_id: str
    spec: AwsTarget
    target: AwsTargetConnector
    prod_group: str
    disk: Path  # the stopped source VM's disk

    def vms(self, job_id: str | None = None) -> AwsVmProvisioner:
        vms = AwsVmProvisioner(self.job, self.spec, self.job_id if job_id is None else job_id)
        vms.poll_seconds = 0.2
        return vms

    def ec2(self) -> Any:
        return self.lab.client("ec2")


@pytest.fixture(scope="module")
def replica(aws_lab: AwsLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """p1: the bootable guest's disk; p2: the same disk with its boot sector zeroed (an incremental)."""
    work = tmp_path_factory.mktemp("vms")
    disk = work / "guest.qcow2"
    shutil.copyfile(build(), disk)
    job, job_id = f"v{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:12]
    ec2 = aws_lab.client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    prod = ec2.create_security_group(GroupName=f"prod-{job}", Description="production", VpcId=vpc)["GroupId"]
    settings = AwsInstanceSettings(instance_type="t3.micro", security_group_ids=[prod])
    spec = AwsTarget(
        platform="aws", region=aws_lab.region, endpoint_url=aws_lab.endpoint_url, instance=settings
    )
    target = AwsTargetConnector(job, spec, work / "state", job_id)
    src = make_kvm_source(job, KvmSource(platform="kvm", disks=[disk]), work / "src")
    p1 = sync_point(src, target, "p1")
    qemu_io(disk, "write -z 0 512")
    sync_point(src, target, "p2", p1.base)
    replica = Replica(aws_lab, job, job_id, spec, target, prod, disk)
    yield replica
    vms = replica.vms()
    for left in vms.list_vms():  # a failed test's VM: its image would keep the points' snapshots
        vms.destroy_vm(left.name)
    target.destroy()
    ec2.delete_security_group(GroupId=prod)


def point_digests(r: Replica, point_id: str) -> dict[str, list[tuple[int, str]]]:
    """Every block of the point's snapshots, as (index, sha256), read through the EBS direct APIs."""
    ebs = r.target.aws.client("ebs")
    return {
        d.path: [
            (i, hashlib.sha256(get_block(r.target.aws, ebs, d.path, i, tok)).hexdigest())
            for i, tok in list_blocks(r.target.aws, ebs, d.path)
        ]
        for d in r.target.get_point(point_id).disks
    }


def made_for(r: Replica, name: str) -> dict[str, list[str]]:
    """What the region holds tagged with the VM's name (instances that are not terminated)."""
    ec2 = r.ec2()
    f = [{"Name": "tag:sendense:vm", "Values": [name]}, {"Name": "tag:sendense:job", "Values": [r.job]}]
    reservations = ec2.describe_instances(Filters=f)["Reservations"]
    return {
        "instances": [
            i["InstanceId"]
            for res in reservations
            for i in res["Instances"]
            if i["State"]["Name"] != "terminated"
        ],
        "images": [i["ImageId"] for i in ec2.describe_images(Owners=["self"], Filters=f)["Images"]],
        "volumes": [v["VolumeId"] for v in ec2.describe_volumes(Filters=f)["Volumes"]],
        "groups": [g["GroupId"] for g in ec2.describe_security_groups(Filters=f)["SecurityGroups"]],
    }


NOTHING: dict[str, list[str]] = {"instances": [], "images": [], "volumes": [], "groups": []}


def instance(r: Replica, instance_id: str) -> dict[str, Any]:
    return dict(r.ec2().describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0])


def test_a_test_vm_from_a_held_point_boots_isolated_and_destroy_leaves_nothing(replica: Replica) -> None:
    r, name = replica, "drill-1"
    job = JobSpec(
        name=r.job, job_id=r.job_id, source=KvmSource(platform="kvm", disks=[r.disk]), target=r.spec
    )
    vms = vms_for(job)  # as an agent makes it, from the job's spec
    assert isinstance(vms, AwsVmProvisioner) and isinstance(vms, VmProvisioner)
    vms.poll_seconds = 0.2
    before = point_digests(r, "p1")
    r.target.hold("p1", name, "drill")
    try:
        # cpus and memory choose nothing on EC2: the target's instance type does
        ref = vms.create_vm(VmPlan(name=name, point_id="p1", cpus=4, memory_mib=8192))
        assert (ref.name, ref.platform, ref.point_id, ref.mode) == (name, "aws", "p1", "test")
        inst = instance(r, ref.vm_id)
        assert inst["InstanceType"] == "t3.micro"
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert tags["sendense:vm"] == name and tags["sendense:job-id"] == r.job_id
        [nic] = inst["NetworkInterfaces"]
        [group] = [g["GroupId"] for g in nic["Groups"]]
        assert group != r.prod_group and "PublicIpAddress" not in inst
        [sg] = r.ec2().describe_security_groups(GroupIds=[group])["SecurityGroups"]
        assert sg["IpPermissions"] == [] and sg["IpPermissionsEgress"] == []  # reaches nothing
        assert made_for(r, name) == {
            "instances": [ref.vm_id],
            "images": [inst["ImageId"]],
            "volumes": [m["Ebs"]["VolumeId"] for m in inst["BlockDeviceMappings"]],
            "groups": [group],
        }

        assert vms.power_on(name).state == "running"  # EC2 started it at RunInstances
        check = vms.boot_check(name, r"SENDENSE-GUEST-READY$", timeout=240)
        assert check.ok, check.evidence
        assert check.evidence == READY and check.via == "console" and 0 < check.seconds < 240
        assert READY in vms.console(name).splitlines()
        checked = vms.boot_check(name, r"SENDENSE-GUEST-READY$", timeout=60, status_checks=True)
        assert checked.ok and checked.evidence == f"{READY}; instance and system status checks ok", checked
        with pytest.raises(
            InvalidSpec, match=r"guest_agent: EC2 has no guest agent channel; use status_checks"
        ):
            vms.boot_check(name, READY, timeout=60, guest_agent=True)
        assert [(v.name, v.vm_id, v.state) for v in vms.list_vms()] == [(name, ref.vm_id, "running")]

        assert vms.power_off(name).state == "stopped"
        assert vms.power_off(name).state == "stopped"  # stopped already: no error
        assert vms.power_on(name).state == "running"
        again = vms.boot_check(name, "GUEST-READY", timeout=240)
        assert again.ok, again.evidence

        vms.destroy_vm(name)
        assert made_for(r, name) == NOTHING
        assert instance(r, ref.vm_id)["State"]["Name"] == "terminated"
        assert vms.list_vms() == []
        assert point_digests(r, "p1") == before  # the point never changed
        assert r.target.get_point("p1").holds == [name]
        vms.destroy_vm(name)  # gone already: no error
    finally:
        r.target.release("p1", name)
    assert r.target.get_point("p1").holds == []


def test_a_non_bootable_points_boot_check_fails_with_the_consoles_reason(replica: Replica) -> None:
    vms = replica.vms()
    vms.create_vm(VmPlan(name="broken", point_id="p2"))
    try:
        check = vms.boot_check("broken", READY, timeout=120)
        assert not check.ok
        assert check.evidence == "No bootable device." and check.via == "console"
        assert check.seconds < 120
        assert "Boot failed: not a bootable disk" in vms.console("broken")
    finally:
        vms.destroy_vm("broken")
    assert made_for(replica, "broken") == NOTHING


@pytest.mark.parametrize("cut", ["before RunInstances", "RunInstances answer lost"])
def test_a_create_cut_half_way_is_destroyed_by_name_and_a_retry_takes_it_over(
    replica: Replica, cut: str
) -> None:
    r, vms, plan = replica, replica.vms(), VmPlan(name=f"half-{cut[:6].lower()}", point_id="p2")
    r.lab.inject("RunInstances", "InvalidParameterValue", lost=cut.endswith("lost"))
    try:
        with pytest.raises(SendenseError, match=f"vm {plan.name}: ec2 RunInstances .*point p2"):
            vms.create_vm(plan)
    finally:
        r.lab.clear_faults()
    left = made_for(r, plan.name)
    assert len(left["images"]) == 1 and len(left["groups"]) == 1
    assert len(left["instances"]) == (1 if cut.endswith("lost") else 0)
    assert [(v.name, v.point_id) for v in vms.list_vms()] == [(plan.name, "p2")]  # a leak check sees it
    other = r.vms(job_id="another")  # a job of the same name but another identity: not its VM
    assert other.list_vms() == []
    other.destroy_vm(plan.name)
    assert made_for(r, plan.name) == left

    vms.destroy_vm(plan.name)  # the saga's undo, by name
    assert made_for(r, plan.name) == NOTHING

    r.lab.inject("RunInstances", "InvalidParameterValue", lost=cut.endswith("lost"))
    try:
        with pytest.raises(SendenseError):
            vms.create_vm(plan)
    finally:
        r.lab.clear_faults()
    ref = vms.create_vm(plan)  # the retry: the image (and instance) made before, no second of either
    assert vms.create_vm(plan).model_copy(update={"state": ref.state}) == ref
    now = made_for(r, plan.name)
    assert now["instances"] == [ref.vm_id] and len(now["images"]) == 1 and len(now["groups"]) == 1
    with pytest.raises(TargetError, match=f"vm {plan.name}: exists already from point p2"):
        vms.create_vm(plan.model_copy(update={"point_id": "p1"}))
    vms.destroy_vm(plan.name)
    assert made_for(r, plan.name) == NOTHING


def test_a_retried_create_that_does_not_see_its_instance_yet_gets_it_again_by_client_token(
    replica: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EC2's listings lag: a retry whose DescribeInstances does not show the instance the lost answer
    made calls RunInstances again, with the same token, and EC2 answers that same instance."""
    r, vms, plan = replica, replica.vms(), VmPlan(name="token", point_id="p2")
    r.lab.inject("RunInstances", "InvalidParameterValue", lost=True)
    try:
        with pytest.raises(SendenseError):
            vms.create_vm(plan)
    finally:
        r.lab.clear_faults()
    [made] = made_for(r, plan.name)["instances"]
    listed = vms._instances
    monkeypatch.setattr(vms, "_instances", lambda name: [] if name == plan.name else listed(name))
    calls = r.lab.stats().get("RunInstances", 0)
    assert vms.create_vm(plan).vm_id == made
    assert r.lab.stats()["RunInstances"] == calls + 1
    monkeypatch.undo()
    assert made_for(r, plan.name)["instances"] == [made]
    vms.destroy_vm(plan.name)
    assert made_for(r, plan.name) == NOTHING


def test_a_production_vm_goes_on_the_mapped_subnet_with_the_targets_groups(replica: Replica) -> None:
    r, vms, ec2 = replica, replica.vms(), replica.ec2()
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    cidr = f"172.31.{200 + int(r.job_id[:2], 16) % 50}.0/24"
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=f"{r.lab.region}b")["Subnet"][
        "SubnetId"
    ]
    try:
        nets = {n.name: n for n in vms.list_networks()}
        assert nets[subnet].kind == f"subnet in {vpc}" and not nets[subnet].isolated
        plan = VmPlan(
            name="prod",
            point_id="p2",
            mode="production",
            nics=[NicInfo(mac="52:54:00:00:00:01", network="lan")],
        )
        with pytest.raises(InvalidSpec, match="vm prod: network_map has no subnet for source network 'lan'"):
            vms.create_vm(plan)
        ref = vms.create_vm(plan.model_copy(update={"network_map": {"lan": subnet}}))
        assert ref.mode == "production"
        [nic] = instance(r, ref.vm_id)["NetworkInterfaces"]
        assert nic["SubnetId"] == subnet and [g["GroupId"] for g in nic["Groups"]] == [r.prod_group]
        assert made_for(r, "prod")["groups"] == []  # no group of its own
        vms.destroy_vm("prod")
        assert made_for(r, "prod") == NOTHING
    finally:
        ec2.delete_subnet(SubnetId=subnet)


def test_errors_name_the_vm_the_point_and_what_stays(replica: Replica) -> None:
    r, vms = replica, replica.vms()
    with pytest.raises(ResourceNotFound, match=f"job {r.job}: no recovery point p9"):
        vms.create_vm(VmPlan(name="x", point_id="p9"))
    for verb in (vms.power_on, vms.console, lambda n: vms.boot_check(n, READY, 1)):
        with pytest.raises(ResourceNotFound, match=f"vm nope: no instance of job {r.job}"):
            verb("nope")
    assert vms.power_off("nope").state == "gone"
    vms.destroy_vm("nope")
    with pytest.raises(InvalidSpec, match="point p2 has no disk disk9"):
        vms.create_vm(VmPlan(name="x", point_id="p2", disks=[{"key": "disk9"}]))  # type: ignore[list-item]

    ref = vms.create_vm(VmPlan(name="stuck", point_id="p2"))
    image = instance(r, ref.vm_id)["ImageId"]
    r.lab.inject("DeregisterImage", "UnauthorizedOperation")
    try:
        with pytest.raises(TargetError) as ei:
            vms.destroy_vm("stuck")
    finally:
        r.lab.clear_faults()
    msg = ei.value.message
    assert msg.startswith(f"vm stuck: what was made for it stays: image {image} (") and "\n" not in msg
    assert "UnauthorizedOperation" in msg and r.lab.secret_access_key not in msg
    assert made_for(r, "stuck") == {**NOTHING, "images": [image]}
    vms.destroy_vm("stuck")
    assert made_for(r, "stuck") == NOTHING
