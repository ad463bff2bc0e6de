"""VMs from points on the CloudStack target really boot (root: the lab's hosts are private libvirtds): the
bootable guest replicated into a point on the pool, a drill's test VM made from it over imported flat
copies on the isolated network, started by CloudStack on a lab host, its ready marker on the console,
destroyed leaving no VM, no volume, no file; a failover's VM on the mapped network with the platform's
status check too."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cs_target_rig import api, job_spec, leftovers, point, use_lab

from labs.cloudstack.server import LabServer
from labs.cloudstack.state import LabConfig
from labs.guest.build import build
from sendense.errors import InvalidSpec
from sendense.models import VmPlan
from sendense.platforms import vms_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

READY = "SENDENSE-GUEST-READY"


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[LabServer]:
    cache = getattr(request.config, "cache", None)
    caps = Path(cache.mkdir("sendense-libvirt-qemu-caps")) if cache is not None else None
    caps = caps or Path.home() / ".cache" / "sendense" / "libvirt-qemu-caps"
    root = Path(tempfile.mkdtemp(prefix="cstvm-", dir="/tmp"))  # short: libvirt socket paths
    server = LabServer(root, LabConfig(pool_capacity_gib=8, libvirt_cache=str(caps), stop_timeout=2)).start()
    yield server
    server.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _env(lab: LabServer, monkeypatch: pytest.MonkeyPatch) -> None:
    use_lab(lab, monkeypatch)


def test_a_drill_vm_from_a_point_boots_the_guest_and_leaves_nothing(lab: LabServer, tmp_path: Path) -> None:
    disk = tmp_path / "guest.qcow2"
    shutil.copyfile(build(), disk)
    spec = job_spec(lab, disk)
    tgt = point(spec, tmp_path / "work")
    vms = vms_for(spec)
    before = leftovers(lab)
    tgt.hold("p1", "drill-1", "drill")
    vms.create_vm(VmPlan(name="drill-1", point_id="p1", memory_mib=256))
    ref = vms.power_on("drill-1")
    assert ref.state == "running" and vms.power_on("drill-1").vm_id == ref.vm_id  # running already
    with pytest.raises(InvalidSpec, match="no guest agent channel"):
        vms.boot_check("drill-1", READY, timeout=5, guest_agent=True)
    check = vms.boot_check("drill-1", READY, timeout=180)
    assert check.ok, check.evidence
    assert READY in check.evidence and check.seconds > 0 and check.via == "console"
    assert READY in vms.console("drill-1")
    [vm] = api(lab).call("listVirtualMachines", id=ref.vm_id)["virtualmachine"]
    assert vm["state"] == "Running" and vm["hostname"] in ("cs-lab-host-1", "cs-lab-host-2")
    assert [n["networkname"] for n in vm["nic"]] == ["lab-isolated"]
    assert vms.power_off("drill-1").state == "stopped"
    vms.destroy_vm("drill-1")
    tgt.release("p1", "drill-1")
    assert vms.list_vms() == [] and leftovers(lab) == before
    assert [h.domains() for h in lab.cloud.hosts.values()] == [[], []]  # no domain on any host
    tgt.destroy()


def test_a_failover_vm_runs_on_the_mapped_network_and_passes_the_status_check(
    lab: LabServer, tmp_path: Path
) -> None:
    disk = tmp_path / "guest.qcow2"
    shutil.copyfile(build(), disk)
    spec = job_spec(lab, disk, vm_name="web")
    tgt = point(spec, tmp_path / "work")
    vms = vms_for(spec)
    before = leftovers(lab)
    plan = VmPlan(name="failover-1", point_id="p1", mode="production", cpus=2, memory_mib=512)
    vms.create_vm(plan)
    vms.power_on("failover-1")
    check = vms.boot_check("failover-1", READY, timeout=180, status_checks=True)
    assert check.ok and check.evidence.endswith("; CloudStack says Running"), check.evidence
    [vm] = api(lab).call("listVirtualMachines", name="web-failover-1")["virtualmachine"]
    assert vm["serviceofferingname"] == "lab-medium" and [n["networkname"] for n in vm["nic"]] == [
        "lab-shared"
    ]
    vms.destroy_vm("failover-1")
    assert leftovers(lab) == before
    tgt.destroy()
