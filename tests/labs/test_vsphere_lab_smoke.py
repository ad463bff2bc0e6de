"""Smoke test of the vSphere lab's extended vcsim (labs/vsphere): pyvmomi over real SOAP/TLS.

The tests after the first prove the lab's fixes of stock vcsim bugs
(labs/vsphere/overlay/simulator/lab_fixes.go);
each fails against stock vcsim (SENDENSE_VCSIM_BIN=/path/to/stock-build runs them against another binary).

Builds (or finds cached) vcsim-lab with labs/vsphere/build.sh, starts it on a free loopback port (VsphereLab),
logs in, finds a VM, enables change tracking, writes into the VM's disk file with qemu-io, takes a snapshot
and pages QueryChangedDiskAreas("*") the way vSphere pages (2 extents per reply by default).
Skipped when pyvmomi or the Debian Go packages are missing. Not wired into CI yet.
"""

from __future__ import annotations

import ssl
import subprocess
import time
import urllib.request

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from labs.vsphere import VsphereLab


def _wait_task(task, timeout=30.0):
    deadline = time.monotonic() + timeout
    while task.info.state not in (vim.TaskInfo.State.success, vim.TaskInfo.State.error):
        assert time.monotonic() < deadline, f"task {task} still {task.info.state}"
        time.sleep(0.05)
    if task.info.state == vim.TaskInfo.State.error:
        raise task.info.error
    return task.info.result


@pytest.fixture(scope="module")
def lab():
    # SENDENSE_VCSIM_BIN: another build (e.g. stock vcsim, to check a test bites)
    with VsphereLab() as lab:
        yield lab


def test_query_changed_disk_areas_star_is_paged(lab):
    si = SmartConnect(
        host=lab.host, port=lab.port, user=lab.user, pwd=lab.password, disableSslCertValidation=True
    )
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        vm = sorted(view.view, key=lambda v: v.name)[0]
        view.Destroy()
        disk = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
        capacity = disk.capacityInBytes or disk.capacityInKB * 1024

        # Before tracking is on, a snapshot has no changeId and the query is refused with FileFault.
        snap0 = _wait_task(
            vm.CreateSnapshot_Task(name="before-cbt", description="", memory=False, quiesce=False)
        )
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(snapshot=snap0, deviceKey=disk.key, startOffset=0, changeId="*")

        _wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
        assert vm.config.changeTrackingEnabled

        # guest writes into the VM's current disk file (qemu-io on the file the lab's endpoint names):
        # five areas once rounded out to the 64 KiB tracking block (two writes share one block)
        writes = [(0, 4096), (131072, 8192), (135168, 8192), (262144, 4096), (524288, 65536), (900000, 1000)]
        current = next(d for d in vm.config.hardware.device if d.key == disk.key)  # the delta since snap0
        path = lab.disk_info(vm._moId, current.backing.fileName)["path"]
        subprocess.run(
            ["qemu-io", "-f", "vmdk", *(a for off, n in writes for a in ("-c", f"write {off} {n}")), path],
            check=True,
            capture_output=True,
        )
        expected = [(0, 65536), (131072, 65536), (262144, 65536), (524288, 65536), (851968, 65536)]

        snap = _wait_task(vm.CreateSnapshot_Task(name="s1", description="", memory=False, quiesce=False))
        sdisk = next(d for d in snap.config.hardware.device if d.key == disk.key)
        change_id = sdisk.backing.changeId
        assert change_id and change_id.endswith("/2"), change_id  # s0 sealed epoch 1, s1 epoch 2
        assert not next(d for d in vm.config.hardware.device if d.key == disk.key).backing.changeId

        pages, areas, offset = [], [], 0
        while offset < capacity:
            info = vm.QueryChangedDiskAreas(
                snapshot=snap, deviceKey=disk.key, startOffset=offset, changeId="*"
            )
            assert info.startOffset == offset and info.length > 0
            pages.append(len(info.changedArea))
            areas += [(a.start, a.length) for a in info.changedArea]
            offset = info.startOffset + info.length
        assert pages == [2, 2, 1], pages  # paged: the lab's per-reply extent limit is 2
        assert areas == expected, areas

        # incremental from s1's changeId: nothing changed since -> one empty page covering the disk
        snap2 = _wait_task(vm.CreateSnapshot_Task(name="s2", description="", memory=False, quiesce=False))
        info = vm.QueryChangedDiskAreas(snapshot=snap2, deviceKey=disk.key, startOffset=0, changeId=change_id)
        assert info.changedArea == [] and info.length == capacity

        with pytest.raises(vim.fault.FileFault):  # a changeId of another tracking session
            vm.QueryChangedDiskAreas(
                snapshot=snap2,
                deviceKey=disk.key,
                startOffset=0,
                changeId="52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/1",
            )
    finally:
        Disconnect(si)


@pytest.fixture
def si(lab):
    si = SmartConnect(
        host=lab.host, port=lab.port, user=lab.user, pwd=lab.password, disableSslCertValidation=True
    )
    yield si
    Disconnect(si)


def _vm(si, name):
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return next(v for v in view.view if v.name == name)
    finally:
        view.Destroy()


def _wait_task_state(si, task, timeout=30.0):
    """Poll only info.state/info.error (not the whole TaskInfo): no dependence on the task-entity fix."""
    pc = si.content.propertyCollector
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task)],
        propSet=[
            vmodl.query.PropertyCollector.PropertySpec(type=vim.Task, pathSet=["info.state", "info.error"])
        ],
    )
    deadline = time.monotonic() + timeout
    while True:
        props = {p.name: p.val for p in pc.RetrieveContents([spec])[0].propSet}
        if props["info.state"] == vim.TaskInfo.State.error:
            raise props["info.error"]
        if props["info.state"] == vim.TaskInfo.State.success:
            return
        assert time.monotonic() < deadline, f"task {task} still {props['info.state']}"
        time.sleep(0.05)


def _snap(vm, name):
    return _wait_task(vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False))


def test_snapshot_tasks_work_with_pyvim_wait_for_task(si):
    """Stock vcsim: Revert/RemoveSnapshot tasks name the snapshot as TaskInfo.entity; pyvmomi refuses to
    deserialize it (not a ManagedEntity) and WaitForTask raises TypeError. vSphere names the VM."""
    vm = _vm(si, "DC0_H0_VM0")
    s1 = _snap(vm, "s1")
    s2 = _snap(vm, "s2")
    for start in (s1.RevertToSnapshot_Task, lambda: s2.RemoveSnapshot_Task(removeChildren=False)):
        task = start()
        assert WaitForTask(task) == vim.TaskInfo.State.success
        assert task.info.entity == vm and task.info.entityName == vm.name
    assert vm.snapshot.currentSnapshot == s1
    assert [(s.name, s.childSnapshotList) for s in vm.snapshot.rootSnapshotList] == [("s1", [])]


def test_remove_s2_then_s1_keeps_base_disk(si, lab):
    """Stock vcsim: RefreshStorageInfo renumbered every layoutEx file key, so s1's dataKey came to name the
    base disk and removing s1 (after s2) deleted it. The base disk must stay (nothing to consolidate: vcsim
    makes no delta disks)."""
    vm = _vm(si, "DC0_H0_VM1")
    disk = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
    vm_dir = disk.backing.fileName.rsplit("/", 1)[0] + "/"  # "[LocalDS_0] DC0_H0_VM1/"

    def disk_files():
        return sorted(
            f.name
            for f in vm.layoutEx.file
            if f.type in ("diskDescriptor", "diskExtent") and f.name.startswith(vm_dir)
        )

    base = disk_files()
    assert len(base) == 1, base  # disk1.vmdk (one monolithicSparse file)
    s1 = _snap(vm, "s1")
    s2 = _snap(vm, "s2")
    _wait_task_state(si, s2.RemoveSnapshot_Task(removeChildren=False, consolidate=True))
    _wait_task_state(si, s1.RemoveSnapshot_Task(removeChildren=False, consolidate=True))

    ctx = ssl._create_unverified_context()
    for name in base:  # "[LocalDS_0] DC0_H0_VM1/disk1.vmdk": the bytes on the datastore, via /folder
        ds, rel = name[1:].split("] ", 1)
        url = f"https://{lab.host}:{lab.port}/folder/{rel}?dcPath=DC0&dsName={ds}"
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), context=ctx) as r:
            assert r.status == 200, (name, r.status)  # stock vcsim: 404, the base disk was deleted

    assert vm.snapshot is None
    assert not vm.runtime.consolidationNeeded
    assert not any(f.type in ("snapshotData", "snapshotMemory") for f in vm.layoutEx.file)
    # the running delta was committed into the base disk and the VM put on a fresh empty delta of it (so
    # that change tracking sees every later write: labs/vsphere/NOTES.md)
    fresh = vm_dir + "disk1-000001.vmdk"
    assert disk_files() == sorted(base + [fresh])
    now = next(d for d in vm.config.hardware.device if d.key == disk.key)
    assert now.backing.fileName == fresh and now.backing.parent.fileName == disk.backing.fileName
    assert now.backing.parent.parent is None


def test_disk_capacity_in_bytes_is_set_and_agrees_with_kb(si):
    """Stock vcsim: default disks have capacityInKB 1024 and capacityInBytes unset; a disk added with only
    capacityInBytes gets capacityInKB 0. vSphere sets both, consistently."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    vms = list(view.view)
    view.Destroy()
    disks = [d for v in vms for d in v.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    assert disks
    for d in disks:
        assert d.capacityInBytes and d.capacityInBytes == d.capacityInKB * 1024, (
            d.capacityInKB,
            d.capacityInBytes,
        )

    vm = _vm(si, "DC0_C0_RP0_VM1")
    ctrl = next(
        d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.ParaVirtualSCSIController)
    )
    new = vim.vm.device.VirtualDisk(
        key=-1,
        controllerKey=ctrl.key,
        unitNumber=1,
        capacityInBytes=4 << 20,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            diskMode="persistent", thinProvisioned=True, fileName=""
        ),
    )
    spec = vim.vm.ConfigSpec(
        deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=new)]
    )
    _wait_task(vm.ReconfigVM_Task(spec=spec))
    added = [
        d
        for d in vm.config.hardware.device
        if isinstance(d, vim.vm.device.VirtualDisk) and d.controllerKey == ctrl.key and d.unitNumber == 1
    ]
    assert [(d.capacityInKB, d.capacityInBytes) for d in added] == [(4096, 4 << 20)]


def test_nfc_lease_complete_keeps_lease_done(si):
    """Stock vcsim: HttpNfcLeaseComplete deletes the lease, so reading lease.state afterwards faults
    ManagedObjectNotFound. vSphere keeps it with state "done"; completing it again is InvalidState."""
    template = _vm(si, "DC0_C0_RP0_VM0")
    cfg = vim.vm.ConfigSpec(
        name="imported-vm0",
        guestId="otherGuest",
        numCPUs=1,
        memoryMB=32,
        files=vim.vm.FileInfo(vmPathName="[LocalDS_0]"),
    )
    lease = template.resourcePool.ImportVApp(spec=vim.vm.VmImportSpec(configSpec=cfg), folder=template.parent)
    deadline = time.monotonic() + 10
    while lease.state == vim.HttpNfcLease.State.initializing:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert lease.state == vim.HttpNfcLease.State.ready
    imported = lease.info.entity
    lease.HttpNfcLeaseComplete()
    assert lease.state == vim.HttpNfcLease.State.done
    assert lease.info.entity == imported and imported.name == "imported-vm0"
    with pytest.raises(vim.fault.InvalidState):
        lease.HttpNfcLeaseComplete()


def test_a_file_manager_task_is_readable_through_pyvmomi(lab):
    """DeleteDatastoreFile_Task's TaskInfo: stock vcsim set its entity to the FileManager, which is no
    ManagedEntity, and pyvmomi refused to read the task (TypeError) -- a connector could not wait for it."""
    si = lab.si()
    content = si.RetrieveContent()
    dc = content.rootFolder.childEntity[0]
    ds_dir = lab.datastores["LocalDS_0"]
    (ds_dir / "smoke-delete.txt").write_text("x")
    task = content.fileManager.DeleteDatastoreFile_Task(name="[LocalDS_0] smoke-delete.txt", datacenter=dc)
    _wait_task(task)
    assert task.info.entity is None and not (ds_dir / "smoke-delete.txt").exists()
    with pytest.raises(vim.fault.FileNotFound):
        _wait_task(
            content.fileManager.DeleteDatastoreFile_Task(name="[LocalDS_0] smoke-delete.txt", datacenter=dc)
        )
