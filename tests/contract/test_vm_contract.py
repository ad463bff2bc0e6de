"""The VM contract (issue 10 item 8), for every platform whose plug-in makes VMs from points
(sendense.platforms.vms_for): the bootable guest replicated into a point on the platform's target, then
hold the point -> create a test VM -> power on -> boot check finds the guest's ready marker, with its
evidence -> the point reads exactly as before -> destroy_vm leaves nothing (`list_vms()` empty, the
platform's own leftovers as before the VM) -> destroy_vm again is no error -> release the hold.
A VM whose create was cut short is undone by name the same way."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from contract.sides import cloudstack_lab
from helpers_kvm import sync_point

from connectors.kvm.source import make_kvm_source
from connectors.kvm.spec import KvmSource
from labs.aws import AwsLab
from labs.guest.build import build
from labs.vsphere import VsphereLab
from sendense.models import JobSpec, VmPlan
from sendense.platforms import target_for, vms_for
from sendense.protocols import TargetConnector, VmProvisioner

READY = "SENDENSE-GUEST-READY"
# CloudStack's VMs run on the lab's hosts, private libvirtds: root, and the slower tier
PLATFORMS = ["kvm", "aws", "vsphere", pytest.param("cloudstack", marks=[pytest.mark.root, pytest.mark.slow])]


@dataclass
class VmRig:
    spec: JobSpec
    target: TargetConnector
    vms: VmProvisioner
    leftovers: Any  # () -> what of the target's platform a VM could leave behind (processes, images...)


def _leftovers_kvm(root: Path) -> Any:
    def left() -> list[str]:
        import psutil

        qemu = [
            " ".join(p.info["cmdline"] or [])
            for p in psutil.process_iter(["cmdline", "status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE
            and (p.info["cmdline"] or [""])[0].endswith("qemu-system-x86_64")
            and any(str(root) in a for a in p.info["cmdline"] or [])
        ]
        files = sorted(
            str(f.relative_to(root)) for f in root.rglob("*") if "vms" in f.relative_to(root).parts
        )
        return qemu + files

    return left


def _leftovers_vsphere(lab: VsphereLab, placeholder: str) -> Any:
    """VMs other than the placeholder and the lab's own, portgroups, and datastore directories."""

    def left() -> list[str]:
        from pyVmomi import vim

        content = lab.si().RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        hosts = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True)
        try:
            vms = sorted(v.name for v in view.view if v.name.startswith(placeholder + "-"))
            pgs = sorted(
                p.spec.name
                for h in hosts.view
                for p in h.configManager.networkSystem.networkInfo.portgroup or []
            )
        finally:
            view.Destroy()
            hosts.Destroy()
        dirs = sorted(str(p.relative_to(d)) for d in lab.datastores.values() for p in d.rglob("*"))
        return vms + pgs + [f for f in dirs if not f.startswith(placeholder + "/")]

    return left


def _leftovers_aws(lab: AwsLab, job_id: str) -> Any:
    def left() -> list[str]:
        ec2 = lab.client("ec2")
        mine = [{"Name": "tag:sendense:job-id", "Values": [job_id]}]
        running = [
            i["InstanceId"]
            for r in ec2.describe_instances(Filters=mine)["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        ]
        images = [i["ImageId"] for i in ec2.describe_images(Owners=["self"], Filters=mine)["Images"]]
        groups = [g["GroupId"] for g in ec2.describe_security_groups(Filters=mine)["SecurityGroups"]]
        vols = [v["VolumeId"] for v in ec2.describe_volumes(Filters=mine)["Volumes"]]
        return running + images + groups + vols

    return left


def _leftovers_cloudstack(lab: Any) -> Any:
    """The lab's VMs and volumes, files of the pool that are no volume's, and what is at its top."""

    def left() -> list[str]:
        state = lab.cloud.state
        vms = sorted(f"vm {v.name}" for v in state.vms.values())
        vols = sorted(f"volume {v.name}" for v in state.volumes.values())
        files = sorted(f"file {f.name}" for f in state.pool.path.iterdir() if f.name != "sendense")
        domains = sorted(f"domain {d}" for h in lab.cloud.hosts.values() for d in h.domains())
        return vms + vols + files + domains

    return left


@pytest.fixture(scope="session")
def contract_cloudstack_vm_lab(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The CloudStack lab with its hosts' libvirtds (root): its VMs boot."""
    import tempfile

    cache = getattr(request.config, "cache", None)
    caps = Path(cache.mkdir("sendense-libvirt-qemu-caps")) if cache is not None else None
    root = Path(tempfile.mkdtemp(prefix="cslab-vmc-", dir="/tmp"))
    yield from cloudstack_lab(root, "contractvm", libvirt=True, caps=caps)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=PLATFORMS)
def vm_rig(request: pytest.FixtureRequest, tmp_path: Path, contract_aws_lab: AwsLab) -> Iterator[VmRig]:  # noqa: C901
    """A point p1 of the bootable guest on the platform's target, through the registry."""
    job, job_id = f"vmc{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:12]
    disk = tmp_path / "guest.qcow2"
    shutil.copyfile(build(), disk)  # the stopped VM's disk
    if request.param == "kvm":
        target = {"platform": "kvm", "path": str(tmp_path / "replicas")}
    elif request.param == "vsphere":
        vlab: VsphereLab = request.getfixturevalue("contract_vsphere_lab")
        target = {
            "platform": "vsphere",
            "server": f"{vlab.host}:{vlab.port}",
            "thumbprint": vlab.thumbprint,
            "datacenter": "DC0",
            "datastore": "LocalDS_0",
        }
    elif request.param == "cloudstack":
        cslab = request.getfixturevalue("contract_cloudstack_vm_lab")
        target = {
            "platform": "cloudstack",
            "url": cslab.url,
            "zone": cslab.info["zone"],
            "login": "contractvm",
            "storage": "lab-primary-1",
            "template": "sendense-guest",
            "drill_network": "lab-isolated",
            "host": "cs-lab-host-1",
        }
    else:
        lab = contract_aws_lab
        target = {"platform": "aws", "region": lab.region, "endpoint_url": lab.endpoint_url}
    spec = JobSpec.model_validate(
        {"name": job, "job_id": job_id, "source": {"platform": "kvm", "disks": [str(disk)]}, "target": target}
    )
    tgt = target_for(spec)
    src = make_kvm_source(job, KvmSource(platform="kvm", disks=[disk]), tmp_path / "work")
    sync_point(src, tgt, "p1")
    if request.param == "kvm":
        left = _leftovers_kvm(tmp_path / "replicas")
    elif request.param == "vsphere":
        left = _leftovers_vsphere(vlab, f"sendense-{job}")
    elif request.param == "cloudstack":
        left = _leftovers_cloudstack(cslab)
    else:
        left = _leftovers_aws(contract_aws_lab, job_id)
    rig = VmRig(spec, tgt, vms_for(spec), left)
    try:
        yield rig
    finally:
        for v in rig.vms.list_vms():  # a failed test's VM
            rig.vms.destroy_vm(v.name)
        for p in tgt.list_points():
            for h in p.holds:
                tgt.release(p.point_id, h)
        tgt.destroy()


def _digest(tgt: TargetConnector, point: str, out: Path) -> str:
    [(_, f)] = tgt.export(point, "raw", out)
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    f.unlink()
    return h.hexdigest()


def test_a_test_vm_from_a_point_boots_and_leaves_nothing(vm_rig: VmRig, tmp_path: Path) -> None:
    r = vm_rig
    before_left = r.leftovers()
    before = _digest(r.target, "p1", tmp_path / "x0")
    r.target.hold("p1", "drill-c1", "contract drill")
    ref = r.vms.create_vm(VmPlan(name="drill-c1", point_id="p1", memory_mib=256))
    assert ref.name == "drill-c1" and ref.point_id == "p1" and ref.mode == "test"
    assert r.vms.create_vm(VmPlan(name="drill-c1", point_id="p1", memory_mib=256)).name == "drill-c1"
    assert [v.name for v in r.vms.list_vms()] == ["drill-c1"]  # a retried create made one VM
    r.vms.power_on("drill-c1")
    check = r.vms.boot_check("drill-c1", READY, timeout=180)
    assert check.ok, check.evidence
    assert READY in check.evidence and check.seconds > 0
    assert READY in r.vms.console("drill-c1")
    r.vms.power_off("drill-c1")
    r.vms.destroy_vm("drill-c1")
    r.vms.destroy_vm("drill-c1")  # gone already: no error
    assert r.vms.list_vms() == []
    assert r.leftovers() == before_left
    r.target.release("p1", "drill-c1")
    assert _digest(r.target, "p1", tmp_path / "x1") == before  # the VM never changed its point


def test_a_create_cut_short_is_undone_by_name(vm_rig: VmRig) -> None:
    """The saga's undo is destroy_vm(name), registered before create_vm runs: whatever create left
    (here: all of it, the process never started) goes, and a VM that never existed is no error."""
    r = vm_rig
    before_left = r.leftovers()
    r.vms.destroy_vm("never-made")  # the undo of a create that failed before doing anything
    r.vms.create_vm(VmPlan(name="cut-short", point_id="p1", memory_mib=256))
    r.vms.destroy_vm("cut-short")
    assert r.vms.list_vms() == [] and r.leftovers() == before_left
