"""Linked clones from a snapshot and isolated portgroups in the vSphere lab (labs/vsphere/overlay/simulator/
lab_clone.go), as a DR drill uses them: CloneVM_Task(spec.snapshot, diskMoveType createNewChildDiskBacking)
makes a VM whose disks are deltas over the snapshot's frozen files; the source keeps being written,
snapshotted and consolidated without touching the files the clone uses; Destroy_Task of the clone deletes
only its own files. Through pyvmomi only, plus qemu-io/qemu-img on the files GET /sendense-lab/disk names.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
from helpers_vsphere_lab import apply_writes as _apply
from helpers_vsphere_lab import chain as _chain
from helpers_vsphere_lab import guest_write as _write
from helpers_vsphere_lab import read_raw as _read
from helpers_vsphere_lab import remove_snapshot as _remove
from helpers_vsphere_lab import rounded as _rounded
from helpers_vsphere_lab import snapshot as _snap
from pyVmomi import vim, vmodl

from labs.vsphere import VsphereLab

MIB = 1 << 20
BLOCK = 64 << 10
CAP = 4 * MIB
DS = "LocalDS_0"
READY = "SENDENSE-GUEST-READY"


@pytest.fixture(scope="module")
def lab():
    with VsphereLab(vms=1) as lab:
        yield lab


# --- helpers ---------------------------------------------------------------------------------------
def _disks(devices) -> list[Any]:
    return sorted(
        (d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)), key=lambda d: d.unitNumber or 0
    )


def _path(lab: VsphereLab, moref: str, disk, snap=None) -> str:
    return lab.disk_info(moref, disk.backing.fileName, snapshot=snap._moId if snap else None)["path"]


def _current(lab: VsphereLab, moref: str) -> list[str]:
    """The endpoint's path of each current disk (unit order)."""
    return [_path(lab, moref, d) for d in _disks(lab.vm(moref).config.hardware.device)]


def _snap_paths(lab: VsphereLab, moref: str, snap) -> list[str]:
    return [_path(lab, moref, d, snap) for d in _disks(snap.config.hardware.device)]


def _bytes(paths: list[str], tmp: Path) -> list[bytes]:
    return [_read(p, tmp) for p in paths]


def _changed(vm, snap, key: int, change_id: str, capacity: int = CAP) -> list[tuple[int, int]]:
    areas, offset = [], 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id)
        areas += [(a.start, a.length) for a in info.changedArea]
        offset = info.startOffset + info.length
    merged: list[list[int]] = []
    for s, n in areas:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s + n)
        else:
            merged.append([s, s + n])
    return [(s, e - s) for s, e in merged]


def _dir(lab: VsphereLab, name: str) -> Path:
    return lab.datastores[DS] / name


def _files_state(directory: Path) -> dict[str, tuple[int, str]]:
    """mtime_ns and sha256 of every file of a directory."""
    return {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(directory.iterdir())
    }


def _config_view(v) -> tuple:
    """What a clone must not change in its source's config."""
    c = v.config
    return (
        c.hardware.numCPU,
        c.hardware.memoryMB,
        c.uuid,
        c.instanceUuid,
        sorted((o.key, str(o.value)) for o in c.extraConfig),
        [
            (d.key, type(d).__name__, _chain(getattr(d.backing, "fileName", None) and d.backing))
            for d in c.hardware.device
            if isinstance(d, vim.vm.device.VirtualDisk)
        ],
        [
            (d.key, getattr(d.backing, "deviceName", None))
            for d in c.hardware.device
            if isinstance(d, vim.vm.device.VirtualEthernetCard)
        ],
        len(c.hardware.device),
    )


def _fault(name: str):
    return getattr(vim.fault, name, None) or getattr(vmodl.fault, name)


A = [(0, 4096, 0x11), (1 * MIB, BLOCK, 0x12)]
B = [(4096, 4096, 0x21), (2 * MIB + 100, 10, 0x22)]
C = [(3 * MIB, 2 * BLOCK + 1, 0x31)]
D = [(512 << 10, 4096, 0x41), (0, 512, 0x42)]
E = [(3 * MIB + BLOCK, 4096, 0x51)]


# --- tests -----------------------------------------------------------------------------------------
def test_linked_clone_has_the_snapshots_bytes_and_its_own_delta(lab, tmp_path):
    """Two disks: A, s1, B (current). The clone of s1: its config a copy of s1's, a delta per disk in its own
    directory over s1's frozen file, the bytes of s1 (not the current state); writes into the clone land in
    its delta only; the source's config, files and bytes are unchanged; the clone has its own ctk."""
    moref = lab.make_vm("lc-src", [CAP, CAP])
    src = lab.vm(moref)
    images = [bytearray(CAP), bytearray(CAP)]
    for path, img, shift in zip(_current(lab, moref), images, (0, 1), strict=True):
        w = [(o, n, p + shift) for o, n, p in A]
        _write(path, w)
        _apply(img, w)
    s1 = _snap(lab, src, "s1")
    s1_images = [bytes(i) for i in images]
    for path, img in zip(_current(lab, moref), images, strict=True):
        _write(path, B)
        _apply(img, B)
    before = _config_view(src)
    src_files = _files_state(_dir(lab, "lc-src"))

    clone_ref = lab.linked_clone(moref, s1, "lc-drill")
    clone = lab.vm(clone_ref)
    assert clone.name == "lc-drill" and clone.runtime.powerState == "poweredOff"
    assert clone.config.uuid != src.config.uuid and clone.config.instanceUuid != src.config.instanceUuid
    s1_disks = _disks(s1.config.hardware.device)
    for cd, sd in zip(_disks(clone.config.hardware.device), s1_disks, strict=True):
        assert cd.key == sd.key and cd.capacityInBytes == sd.capacityInBytes
        assert cd.backing.fileName.startswith(f"[{DS}] lc-drill/"), cd.backing.fileName
        assert _chain(cd.backing)[1:] == _chain(sd.backing), (_chain(cd.backing), _chain(sd.backing))
    assert lab.datastore_listing(f"[{DS}] lc-drill") == sorted(
        ["lc-drill.vmx", "lc-drill.nvram", "vmware.log", "lc-drill-000001.vmdk", "lc-drill_1-000001.vmdk"]
    )
    assert _bytes(_current(lab, clone_ref), tmp_path) == s1_images
    assert _config_view(src) == before
    assert _files_state(_dir(lab, "lc-src")) == src_files

    # the clone's own writes: its delta only
    clone_images = [bytearray(i) for i in s1_images]
    for path, img in zip(_current(lab, clone_ref), clone_images, strict=True):
        info = lab.disk_info(clone_ref, _disks(clone.config.hardware.device)[0].backing.fileName)
        assert info["writable"] is True
        _write(path, C)
        _apply(img, C)
    assert _bytes(_current(lab, clone_ref), tmp_path) == [bytes(i) for i in clone_images]
    assert _bytes(_current(lab, moref), tmp_path) == [bytes(i) for i in images]
    assert _bytes(_snap_paths(lab, moref, s1), tmp_path) == s1_images
    assert _files_state(_dir(lab, "lc-src")) == src_files

    # its own change record: a new ctk; "*" = what its chain has; its first incremental = its own writes
    cs1 = _snap(lab, clone, "cs1")
    key = _disks(clone.config.hardware.device)[0].key
    cid = _disks(cs1.config.hardware.device)[0].backing.changeId
    src_cid = _disks(s1.config.hardware.device)[0].backing.changeId
    assert cid and cid.split("/")[0] != src_cid.split("/")[0]
    assert _changed(clone, cs1, key, "*") == _rounded(A + C)
    cs2 = _snap(lab, clone, "cs2")
    assert _changed(clone, cs2, key, cid) == []
    assert _bytes(_snap_paths(lab, clone_ref, cs1), tmp_path) == [bytes(i) for i in clone_images]
    assert _files_state(_dir(lab, "lc-src")) == src_files


def test_source_consolidation_keeps_the_clones_files_and_bytes(lab, tmp_path):
    """A, s1, B, s2, C; clone of s2. Then on the source: D, s3, remove s1, remove s2 (the clone's own
    snapshot), E, s4, remove s3, RemoveAllSnapshots. After each step the clone's bytes are s2's, the source's
    current bytes and its remaining snapshots' bytes are exact, its changeIds answer as before; the clone's
    files (its delta's parents) stay. Destroy of the source while the clone lives: ResourceInUse. Destroy of
    the clone deletes only its directory; a later consolidation of the source cleans up."""
    moref = lab.make_vm("cs-src", [CAP])
    src = lab.vm(moref)
    key = _disks(src.config.hardware.device)[0].key
    img = bytearray(CAP)

    def write(w):
        _write(_current(lab, moref)[0], w)
        _apply(img, w)

    write(A)
    s1 = _snap(lab, src, "s1")
    write(B)
    s2 = _snap(lab, src, "s2")
    s2_img = bytes(img)
    write(C)
    clone_ref = lab.linked_clone(moref, s2, "cs-drill")
    clone = lab.vm(clone_ref)
    clone_img = bytearray(s2_img)
    _write(_current(lab, clone_ref)[0], [(2 * MIB, 4096, 0x77)])
    _apply(clone_img, [(2 * MIB, 4096, 0x77)])
    parents = _chain(_disks(clone.config.hardware.device)[0].backing)[1:]
    cid_s1 = _disks(s1.config.hardware.device)[0].backing.changeId
    cid_s2 = _disks(s2.config.hardware.device)[0].backing.changeId
    snaps = {"s1": (s1, bytes(_read(_snap_paths(lab, moref, s1)[0], tmp_path)))}
    snaps["s2"] = (s2, s2_img)

    def check(step: str) -> None:
        assert _read(_current(lab, clone_ref)[0], tmp_path) == bytes(clone_img), step
        assert _read(_current(lab, moref)[0], tmp_path) == bytes(img), step
        for name, (s, want) in snaps.items():
            assert _read(_snap_paths(lab, moref, s)[0], tmp_path) == want, (step, name)
        for f in parents:
            ds, _, rel = f.partition("] ")
            assert (lab.datastores[ds.lstrip("[")] / rel).exists(), (step, f)

    check("cloned")
    write(D)
    s3 = _snap(lab, src, "s3")
    snaps["s3"] = (s3, bytes(img))
    cid_s3 = _disks(s3.config.hardware.device)[0].backing.changeId
    _remove(lab, s1)
    del snaps["s1"]
    check("remove s1")
    _remove(lab, s2)  # the clone's snapshot: allowed, its files stay
    del snaps["s2"]
    check("remove s2")
    write(E)
    s4 = _snap(lab, src, "s4")
    snaps["s4"] = (s4, bytes(img))
    _remove(lab, s3)
    del snaps["s3"]
    check("remove s3")
    assert _changed(src, s4, key, cid_s3) == _rounded(E)
    assert _changed(src, s4, key, cid_s2) == _rounded(C + D + E)
    assert _changed(src, s4, key, cid_s1) == _rounded(B + C + D + E)
    assert _changed(src, s4, key, "*") == _rounded(A + B + C + D + E)
    lab.wait(src.RemoveAllSnapshots_Task())
    snaps.clear()
    check("remove all")
    write([(5 * BLOCK, 100, 0x61)])
    s5 = _snap(lab, src, "s5")
    assert _changed(src, s5, key, cid_s3) == _rounded(E + [(5 * BLOCK, 100, 0x61)])

    # the source's directory holds files the clone uses: Destroy of the source is refused
    with pytest.raises(vim.fault.ResourceInUse):
        lab.wait(src.Destroy_Task())
    assert src.name == "cs-src"
    check("destroy source refused")

    src_before = lab.datastore_listing(f"[{DS}] cs-src")
    assert lab.datastore_listing(f"[{DS}] cs-drill")
    lab.wait(clone.Destroy_Task())
    assert lab.datastore_listing(f"[{DS}] cs-drill") == []
    assert lab.datastore_listing(f"[{DS}] cs-src") == src_before
    assert _read(_current(lab, moref)[0], tmp_path) == bytes(img)

    # no clone any more: the next consolidation cleans up (only the source's own chain is left)
    lab.wait(src.RemoveAllSnapshots_Task())
    chain = _chain(_disks(src.config.hardware.device)[0].backing)
    vmdks = [f for f in lab.datastore_listing(f"[{DS}] cs-src") if f.endswith(".vmdk")]
    assert sorted(vmdks) == sorted(f.rsplit("/", 1)[1] for f in chain), (vmdks, chain)
    assert _read(_current(lab, moref)[0], tmp_path) == bytes(img)
    lab.wait(src.Destroy_Task())
    assert lab.datastore_listing(f"[{DS}] cs-src") == []


def test_clone_faults_and_full_clone(lab, tmp_path):
    """DuplicateName; a snapshot of another VM: InvalidArgument (nothing left on the datastore); without a
    snapshot: a full clone with the current bytes in independent disks."""
    moref = lab.make_vm("cf-src", [CAP])
    other = lab.make_vm("cf-other", [CAP])
    src = lab.vm(moref)
    _write(_current(lab, moref)[0], A)
    s1 = _snap(lab, src, "s1")
    o1 = _snap(lab, lab.vm(other), "o1")
    _write(_current(lab, moref)[0], B)
    with pytest.raises(vim.fault.DuplicateName):
        lab.linked_clone(moref, s1, "cf-other")
    with pytest.raises(vmodl.fault.InvalidArgument):
        lab.linked_clone(moref, o1, "cf-bad")
    assert lab.datastore_listing(f"[{DS}] cf-bad") == []

    full = lab.wait(
        src.CloneVM_Task(
            folder=src.parent,
            name="cf-full",
            spec=vim.vm.CloneSpec(location=vim.vm.RelocateSpec(), powerOn=False, template=False),
        )
    )
    disk = _disks(full.config.hardware.device)[0]
    assert disk.backing.fileName == f"[{DS}] cf-full/cf-full.vmdk" and disk.backing.parent is None
    want = bytearray(CAP)
    _apply(want, A)
    _apply(want, B)
    assert _read(_current(lab, full._moId)[0], tmp_path) == bytes(want)
    # a full clone of a snapshot (another diskMoveType): the snapshot's bytes, independent
    full_s1 = lab.linked_clone(
        moref, s1, "cf-full-s1", disk_move_type="moveAllDiskBackingsAndDisallowSharing"
    )
    d = _disks(lab.vm(full_s1).config.hardware.device)[0]
    assert d.backing.parent is None
    want = bytearray(CAP)
    _apply(want, A)
    assert _read(_current(lab, full_s1)[0], tmp_path) == bytes(want)


def _network_system(v) -> Any:
    return v.runtime.host.configManager.networkSystem


def _networks_named(lab: VsphereLab, name: str) -> list[Any]:
    content = lab.si().RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Network], True)
    try:
        return [n for n in view.view if n.name == name]
    finally:
        view.Destroy()


def test_config_overrides_and_an_isolated_portgroup(lab):
    """An isolated vSwitch (no uplink) and a portgroup: a Network object (host.network, the network folder,
    a container view). The clone's spec.config (CPUs, memory, extraConfig, the NIC edited onto the
    portgroup, a serial port added) reaches the clone's config, not the source's. RemovePortGroup while the
    clone's NIC uses it: ResourceInUse; after the clone is gone it is removed, the Network too."""
    moref = lab.make_vm("pg-src", [CAP], extra_config={"sendense.a": "src"})
    src = lab.vm(moref)
    nic = vim.vm.device.VirtualVmxnet3(
        key=-1,
        backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network"),
    )
    lab.wait(
        src.ReconfigVM_Task(
            spec=vim.vm.ConfigSpec(
                deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=nic)]
            )
        )
    )
    s1 = _snap(lab, src, "s1")
    before = _config_view(src)

    ns = _network_system(src)
    ns.AddVirtualSwitch(vswitchName="sendense-iso", spec=vim.host.VirtualSwitch.Specification(numPorts=16))
    pg_spec = vim.host.PortGroup.Specification(
        name="drill-pg", vlanId=0, vswitchName="sendense-iso", policy=vim.host.NetworkPolicy()
    )
    ns.AddPortGroup(portgrp=pg_spec)
    with pytest.raises(vim.fault.AlreadyExists):
        ns.AddPortGroup(portgrp=pg_spec)
    (net,) = _networks_named(lab, "drill-pg")
    host = src.runtime.host
    assert net in list(host.network)
    dc = src.parent.parent
    assert net in list(dc.networkFolder.childEntity) and net in list(dc.network)
    assert "drill-pg" in [p.spec.name for p in ns.networkInfo.portgroup]

    src_nic = next(d for d in s1.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard))
    edited = vim.vm.device.VirtualVmxnet3(
        key=src_nic.key,
        controllerKey=src_nic.controllerKey,
        unitNumber=src_nic.unitNumber,
        macAddress=src_nic.macAddress,
        addressType=src_nic.addressType,
        backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="drill-pg", network=net),
    )
    serial = vim.vm.device.VirtualSerialPort(
        key=-50,
        yieldOnPoll=True,
        backing=vim.vm.device.VirtualSerialPort.FileBackingInfo(fileName=f"[{DS}] pg-drill/serial.log"),
    )
    config = vim.vm.ConfigSpec(
        numCPUs=2,
        memoryMB=128,
        extraConfig=[
            vim.option.OptionValue(key="sendense.a", value="drill"),
            vim.option.OptionValue(key="sendense.drill", value="1"),
        ],
        deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="edit", device=edited),
            vim.vm.device.VirtualDeviceSpec(operation="add", device=serial),
        ],
    )
    clone_ref = lab.linked_clone(moref, s1, "pg-drill", config=config)
    clone = lab.vm(clone_ref)
    c = clone.config
    assert (c.hardware.numCPU, c.hardware.memoryMB) == (2, 128)
    extra = {o.key: str(o.value) for o in c.extraConfig}
    assert extra["sendense.a"] == "drill" and extra["sendense.drill"] == "1"
    nics = [d for d in c.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert [(n.key, n.backing.deviceName, n.backing.network) for n in nics] == [
        (src_nic.key, "drill-pg", net)
    ]
    assert list(clone.network) == [net]
    ports = [d for d in c.hardware.device if isinstance(d, vim.vm.device.VirtualSerialPort)]
    assert [p.backing.fileName for p in ports] == [f"[{DS}] pg-drill/serial.log"]
    assert _config_view(src) == before
    assert {o.key: str(o.value) for o in src.config.extraConfig}.get("sendense.drill") is None

    with pytest.raises(vim.fault.ResourceInUse):
        ns.RemovePortGroup(pgName="drill-pg")
    assert _networks_named(lab, "drill-pg") == [net]
    lab.wait(clone.Destroy_Task())
    ns.RemovePortGroup(pgName="drill-pg")
    assert _networks_named(lab, "drill-pg") == []
    assert "drill-pg" not in [p.spec.name for p in ns.networkInfo.portgroup]
    assert all(n.name != "drill-pg" for n in host.network)
    with pytest.raises(vim.fault.NotFound):
        ns.RemovePortGroup(pgName="drill-pg")
    ns.RemoveVirtualSwitch(vswitchName="sendense-iso")


def test_linked_clone_of_a_guest_boots_on_its_delta(lab, tmp_path):
    """A bootable guest VM, s1; its linked clone with a serial port added in the clone spec powers on (QEMU
    on the clone's delta chain), the console through /folder shows READY, the Tools heartbeat goes green;
    the source's files are untouched (mtime and bytes), the guest's writes are in the clone's delta."""
    moref = lab.make_vm("boot-src", [256 * MIB])
    lab.write_guest(moref)
    src = lab.vm(moref)
    s1 = _snap(lab, src, "s1")
    src_files = _files_state(_dir(lab, "boot-src"))
    serial = vim.vm.device.VirtualSerialPort(
        key=-50,
        yieldOnPoll=True,
        backing=vim.vm.device.VirtualSerialPort.FileBackingInfo(fileName=f"[{DS}] boot-drill/serial.log"),
    )
    config = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=serial)])
    clone_ref = lab.linked_clone(moref, s1, "boot-drill", config=config)
    clone = lab.vm(clone_ref)
    lab.wait(clone.PowerOnVM_Task())
    (pid,) = lab.qemu_pids(clone_ref)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    delta = _current(lab, clone_ref)[0]
    assert any(delta.encode() in a for a in argv), argv
    deadline = time.monotonic() + 120
    console = ""
    while time.monotonic() < deadline:
        try:
            console = lab.datastore_file(f"[{DS}] boot-drill/serial.log").decode(errors="replace")
        except OSError:
            console = ""
        if READY in console and str(clone.guestHeartbeatStatus) == "green":
            break
        time.sleep(0.5)
    assert READY in console, console[-800:]
    assert str(clone.guestHeartbeatStatus) == "green"
    assert str(clone.guest.toolsRunningStatus) == "guestToolsRunning"
    assert (
        lab.disk_info(clone_ref, _disks(clone.config.hardware.device)[0].backing.fileName)["writable"]
        is False
    )
    lab.wait(clone.PowerOffVM_Task())
    assert lab.qemu_pids(clone_ref) == []
    assert _files_state(_dir(lab, "boot-src")) == src_files
    assert src.runtime.powerState == "poweredOff"
    lab.wait(clone.Destroy_Task())
    assert lab.datastore_listing(f"[{DS}] boot-drill") == []
    assert _files_state(_dir(lab, "boot-src")) == src_files
