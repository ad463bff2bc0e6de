"""VMs from points on the vSphere target (connectors/vsphere/vms.py) against the vSphere lab, whose VMs
really boot (QEMU on the VM's disk chain; the serial port's datastore file and the VMware Tools stand-in
report the boot): the bootable guest replicated into a placeholder's point, then

- a failover: the placeholder reverted to the point, its NICs on the mapped portgroup, powered on, booted
  (console through /folder + Tools heartbeat), and undone by destroy_vm: the placeholder is the
  replica again (its configuration as of the newest point) and the next sync is an incremental;
- a drill: a linked clone of the point's snapshot on a vSwitch of its own, booted while the placeholder
  takes another sync, destroyed with its network; the point's bytes never change;
- bad input in one line, nothing changed."""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers_kvm import sync_point
from helpers_vsphere import guest_io, snapshot_names, target_spec

from connectors.kvm.source import make_kvm_source
from connectors.kvm.spec import KvmSource
from connectors.vsphere.target import VsphereTargetConnector
from connectors.vsphere.vms import CONSOLE_FILE, MARK, VsphereVmProvisioner
from labs.guest.build import build
from labs.vsphere import VsphereLab
from sendense.errors import InvalidSpec, ResourceNotFound, TargetError
from sendense.models import NicInfo, VmPlan

READY = "SENDENSE-GUEST-READY"
BOOT_TIMEOUT = 120.0  # a boot takes 4-6 s under TCG; the machine is shared


class Site:
    def __init__(self, lab: VsphereLab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.job, self.job_id = f"vv{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:12]
        self.disk = tmp / "guest.qcow2"
        shutil.copyfile(build(), self.disk)
        self.src = make_kvm_source(self.job, KvmSource(platform="kvm", disks=[self.disk]), tmp / "work")
        self.tgt = VsphereTargetConnector(self.job, target_spec(lab), self.job_id)
        self.vms = VsphereVmProvisioner(self.job, target_spec(lab), self.job_id)
        self.synced = sync_point(self.src, self.tgt, "p1")

    def digest(self, point: str) -> str:
        out = self.tmp / f"x-{uuid.uuid4().hex[:6]}"
        [(_, f)] = self.tgt.export(point, "raw", out)
        h = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.rmtree(out)
        return h

    def placeholder(self) -> Any:
        vm = self.tgt._placeholder()
        assert vm is not None
        return vm

    def close(self) -> None:
        for v in self.vms.list_vms():
            self.vms.destroy_vm(v.name)
        for p in self.tgt.list_points():
            for h in p.holds:
                self.tgt.release(p.point_id, h)
        self.tgt.destroy()


@pytest.fixture
def site(vlab: VsphereLab, tmp_path: Path) -> Any:
    s = Site(vlab, tmp_path)
    try:
        yield s
    finally:
        s.close()


def _nics(vm: Any) -> list[tuple[str, str]]:
    from pyVmomi import vim

    return [
        (d.macAddress, d.backing.deviceName)
        for d in vm.config.hardware.device
        if isinstance(d, vim.vm.device.VirtualEthernetCard)
    ]


def _serial_files(vm: Any) -> list[str]:
    from pyVmomi import vim

    return [
        d.backing.fileName
        for d in vm.config.hardware.device
        if isinstance(d, vim.vm.device.VirtualSerialPort)
    ]


def _marks(vm: Any) -> dict[str, str]:
    return {o.key: o.value for o in vm.config.extraConfig or [] if o.key.startswith(MARK) and o.value}


def test_a_failover_boots_the_placeholder_at_the_point_and_destroy_makes_it_the_replica_again(
    site: Site,
) -> None:
    before = site.digest("p1")
    site.tgt.hold("p1", "failover-f1", "failover")
    mac = "00:50:56:01:02:03"
    plan = VmPlan(
        name=site.job,
        point_id="p1",
        mode="production",
        cpus=2,
        memory_mib=256,
        nics=[NicInfo(mac=mac, network="prod", model="vmxnet3")],
        network_map={"prod": "VM Network"},
    )
    ref = site.vms.create_vm(plan)
    assert (ref.name, ref.point_id, ref.mode, ref.state) == (site.job, "p1", "production", "stopped")
    assert site.vms.create_vm(plan) == ref  # a retried create: the same VM
    ph = site.placeholder()
    assert ref.vm_id == ph._moId  # the placeholder itself
    assert _nics(ph) == [(mac, "VM Network")]
    assert ph.config.hardware.numCPU == 2 and ph.config.hardware.memoryMB == 256
    assert [v.name for v in site.vms.list_vms()] == [site.job]
    assert site.vms.power_on(site.job).state == "running"
    check = site.vms.boot_check(site.job, READY, BOOT_TIMEOUT, guest_agent=True)
    assert check.ok, check.evidence
    assert READY in check.evidence and "heartbeat green" in check.evidence and check.via == "agent"
    assert READY in site.vms.console(site.job)
    [console] = _serial_files(ph)
    assert console.endswith(CONSOLE_FILE)
    with pytest.raises(TargetError, match="exists already from point p1"):
        site.vms.create_vm(plan.model_copy(update={"mode": "test"}))

    site.vms.destroy_vm(site.job)
    site.vms.destroy_vm(site.job)  # gone already: no error
    ph = site.placeholder()
    assert ph.runtime.powerState == "poweredOff"
    assert _nics(ph) == [] and _serial_files(ph) == [] and _marks(ph) == {}
    assert site.vms.list_vms() == []
    with pytest.raises(urllib.error.HTTPError, match="404"):  # the console file went too
        site.lab.datastore_file(console)
    site.tgt.release("p1", "failover-f1")
    assert site.digest("p1") == before  # the VM ran on a child of the point: p1 never changed
    # replication goes on from the replica: an incremental onto the newest point
    p2 = sync_point(site.src, site.tgt, "p2", site.synced.base)
    assert {r.kind for r in p2.results.values()} == {"incremental"}
    assert site.digest("p2") == before  # the source did not change


def test_a_failover_to_an_unmapped_network_is_one_line_and_changes_nothing(site: Site) -> None:
    ph = site.placeholder()
    snap_before = ph.snapshot.currentSnapshot._moId
    plan = VmPlan(
        name=site.job,
        point_id="p1",
        mode="production",
        nics=[NicInfo(mac="00:50:56:01:02:04", network="dmz")],
        network_map={"prod": "VM Network"},
    )
    with pytest.raises(InvalidSpec, match=r"source network 'dmz', which recovery.network_map does not map"):
        site.vms.create_vm(plan)
    with pytest.raises(InvalidSpec, match=r"names network 'nowhere', which .* does not have"):
        site.vms.create_vm(plan.model_copy(update={"network_map": {"dmz": "nowhere"}}))
    ph = site.placeholder()
    assert _marks(ph) == {} and _nics(ph) == [] and ph.snapshot.currentSnapshot._moId == snap_before
    assert site.vms.list_vms() == []
    with pytest.raises(ResourceNotFound, match="no recovery point p9"):
        site.vms.create_vm(plan.model_copy(update={"point_id": "p9"}))


def test_a_boot_check_that_never_sees_its_pattern_fails_with_the_last_console_line(site: Site) -> None:
    site.tgt.hold("p1", "failover-f2", "failover")
    site.vms.create_vm(VmPlan(name=site.job, point_id="p1", mode="production", memory_mib=256))
    site.vms.power_on(site.job)
    assert site.vms.boot_check(site.job, READY, BOOT_TIMEOUT).ok
    check = site.vms.boot_check(site.job, "NEVER-THERE", 2.0)
    assert not check.ok and "no /NEVER-THERE/ on the console" in check.evidence and READY in check.evidence
    site.vms.power_off(site.job)
    check = site.vms.boot_check(site.job, READY, 5.0)
    assert not check.ok and "the VM is poweredOff" in check.evidence
    site.vms.destroy_vm(site.job)
    site.tgt.release("p1", "failover-f2")


def test_destroying_a_vm_never_made_is_no_error_and_lists_nothing(site: Site) -> None:
    site.vms.destroy_vm("never-made")
    assert site.vms.list_vms() == []
    with pytest.raises(ResourceNotFound, match="vm never-made: job .* has no such VM"):
        site.vms.power_on("never-made")
    assert site.vms.power_off("never-made").state == "gone"


def _datastore_dirs(lab: VsphereLab) -> set[str]:
    return {p.name for p in lab.datastores["LocalDS_0"].iterdir() if p.is_dir()}


def _portgroups(lab: VsphereLab) -> list[str]:
    from pyVmomi import vim

    content = lab.si().RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True)
    try:
        return sorted(
            p.spec.name for h in view.view for p in h.configManager.networkSystem.networkInfo.portgroup or []
        )
    finally:
        view.Destroy()


def test_a_drill_vm_is_a_linked_clone_that_boots_isolated_while_the_placeholder_syncs(site: Site) -> None:
    before_dirs, before_pgs = _datastore_dirs(site.lab), _portgroups(site.lab)
    before = site.digest("p1")
    site.tgt.hold("p1", "drill-d1", "drill")
    plan = VmPlan(name="drill-d1", point_id="p1", memory_mib=256, cpus=2)
    ref = site.vms.create_vm(plan)
    assert (ref.name, ref.point_id, ref.mode, ref.state) == ("drill-d1", "p1", "test", "stopped")
    assert site.vms.create_vm(plan) == ref  # a retried create: the same VM
    assert [v.name for v in site.vms.list_vms()] == ["drill-d1"]
    clone = site.lab.vm(ref.vm_id)
    assert clone.name == site.vms.clone_name("drill-d1") == f"sendense-{site.job}-drill-d1"
    assert clone.config.hardware.numCPU == 2 and clone.config.hardware.memoryMB == 256
    [(_, pg)] = _nics(clone)
    assert pg == f"{clone.name}-isolated" and pg in _portgroups(site.lab)
    assert {n.name for n in site.vms.list_networks() if n.isolated} == {pg}
    assert "sendense.job_id" not in {
        o.key for o in clone.config.extraConfig or [] if o.value
    }  # no placeholder
    site.vms.power_on("drill-d1")
    # the placeholder takes another sync while the drill runs (its point p1 is the clone's parent)
    p2 = sync_point(site.src, site.tgt, "p2", site.synced.base)
    assert p2.point.point_id == "p2"
    check = site.vms.boot_check("drill-d1", READY, BOOT_TIMEOUT, status_checks=True)
    assert check.ok and "heartbeat green" in check.evidence, check.evidence
    assert READY in site.vms.console("drill-d1")
    assert site.placeholder().runtime.powerState == "poweredOff"  # the replica never ran
    site.vms.power_off("drill-d1")
    site.vms.destroy_vm("drill-d1")
    site.vms.destroy_vm("drill-d1")  # gone already: no error
    assert site.vms.list_vms() == []
    assert _portgroups(site.lab) == before_pgs and _datastore_dirs(site.lab) == before_dirs
    site.tgt.release("p1", "drill-d1")
    assert site.digest("p1") == before  # the clone wrote its own child disk, never the point
    assert site.tgt.prune(1) == ["p1"]


def test_a_drill_create_cut_short_is_undone_by_name(site: Site) -> None:
    """The saga's undo is destroy_vm(name): the isolated network a create made before it was killed
    is listed (state incomplete) and goes."""
    before = _portgroups(site.lab)
    host = site.placeholder().runtime.host
    site.vms._isolated_network(host, "drill-cut")  # what a create killed after its first step left
    assert [(v.name, v.state) for v in site.vms.list_vms()] == [("drill-cut", "incomplete")]
    site.vms.destroy_vm("drill-cut")
    assert site.vms.list_vms() == [] and _portgroups(site.lab) == before


def test_failback_reads_what_the_failed_over_vm_changed_by_change_tracking(site: Site) -> None:
    """VmChanges on the vSphere target: the placeholder has change tracking on, so the point's snapshot
    has changeIds; a reverse snapshot lists exactly the blocks written since the point, the next one
    those since the previous one; destroy_vm leaves no failback snapshot."""
    from pyVmomi import vim

    from connectors.vsphere.vm_changes import VsphereVmChanges
    from sendense.datapath.extents import Extent
    from sendense.protocols import VmChanges, point_base

    G = 64 * 1024
    site.tgt.hold("p1", "failover-f3", "failover")
    site.vms.create_vm(VmPlan(name=site.job, point_id="p1", mode="production", memory_mib=256))
    ph = site.placeholder()
    assert ph.config.changeTrackingEnabled
    guest_io(site.lab, ph._moId, 0, "write -P 0x77 2M 4k")  # the VM's writes (it is off: the lab's file)
    changes = VsphereVmChanges(site.job, target_spec(site.lab), site.job_id)
    assert isinstance(changes, VmChanges)
    r1 = changes.snapshot_vm(site.job, "r1")
    [d1] = r1.disks
    assert d1.key == "disk0" and d1.base_change_id == point_base("p1") and d1.tracking_lost is None
    assert list(changes.changed_since_point(r1, "disk0")) == [Extent(2 << 20, G)]
    with changes.open_disk(r1, "disk0") as disk:
        assert [(e.offset, e.length, e.zero) for e in disk.extents(point_base("p1"))] == [(2 << 20, G, False)]
        assert disk.connect().read(2 << 20, 4096) == b"\x77" * 4096
    changes.release(r1, committed=True)
    guest_io(site.lab, ph._moId, 0, "write -P 0x78 5M 4k")
    r2 = changes.snapshot_vm(site.job, "r2", {"disk0": d1.change_id})
    assert r2.disks[0].base_change_id == d1.change_id
    with changes.open_disk(r2, "disk0") as disk:
        assert [(e.offset, e.length) for e in disk.extents(d1.change_id) if not e.zero] == [(5 << 20, G)]
    assert list(changes.changed_since_point(r2, "disk0")) == [Extent(2 << 20, G), Extent(5 << 20, G)]
    r3 = changes.snapshot_vm(site.job, "r3", {"disk0": r2.disks[0].change_id})  # left unreleased
    assert r3.disks[0].base_change_id == r2.disks[0].change_id
    site.vms.destroy_vm(site.job)
    ph = site.placeholder()
    names = snapshot_names(ph)
    assert names == ["sendense-point-p1"], names  # the failback's snapshots went with the VM
    assert isinstance(ph.config.hardware.device[0], vim.vm.device.VirtualDevice)
    site.tgt.release("p1", "failover-f3")
