"""Growing a VM disk in the vSphere lab (labs/vsphere, vcsim-lab; lab_extend.go): ReconfigVM_Task with a
deviceChange "edit" of a VirtualDisk whose capacity is larger.

vSphere's semantics: refused while the VM has snapshots (InvalidDeviceOperation, "Disks with parents cannot
be expanded"), a smaller capacity refused (InvalidDeviceSpec); otherwise the disk grows, the bytes before
the old end stay, the new region reads zeros, and change tracking goes on (changeIds from before the grow
stay valid; the grown region is no change). Everything goes through pyvmomi except the "guest" (qemu-io on
the file the lab's /sendense-lab/disk endpoint names) and the reads (qemu-img on the endpoint's paths).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers_vsphere_lab import apply_writes as _apply
from helpers_vsphere_lab import chain as _chain
from helpers_vsphere_lab import disk_by_key as _disk
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
GROWN = 6 * MIB


@pytest.fixture(scope="module")
def lab():
    with VsphereLab() as lab:
        yield lab


def _disks(devices) -> list[Any]:
    return sorted(
        (d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)), key=lambda d: d.unitNumber or 0
    )


def _path(lab: VsphereLab, moref: str, vm, key: int, snap=None) -> str:
    devices = (vm if snap is None else snap).config.hardware.device
    file = _disk(devices, key).backing.fileName
    return lab.disk_info(moref, file, snapshot=None if snap is None else snap._moId)["path"]


def _virtual_size(path: str, alone: bool = False) -> int:
    """qemu-img's virtual size of a VMDK (alone: without opening its backing file)."""
    spec = path
    if alone:
        spec = "json:" + json.dumps(
            {"driver": "vmdk", "backing": None, "file": {"driver": "file", "filename": path}}
        )
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", spec], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)["virtual-size"]


def _query(vm, snap, key: int, change_id: str, capacity: int) -> list[tuple[int, int]]:
    """Page QueryChangedDiskAreas over the whole disk; the areas, merged."""
    areas, offset = [], 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id)
        assert info.startOffset == offset and info.length > 0
        areas += [(a.start, a.length) for a in info.changedArea]
        offset = info.startOffset + info.length
    assert offset == capacity
    merged: list[list[int]] = []
    for s, n in sorted(areas):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s + n)
        else:
            merged.append([s, s + n])
    return [(s, e - s) for s, e in merged]


def _grow_spec(disk, capacity: int, by: str = "bytes") -> vim.vm.ConfigSpec:
    """pyvmomi's usual form: the config's own device, one capacity field changed, operation edit."""
    if by == "bytes":
        disk.capacityInBytes = capacity
    else:
        disk.capacityInKB = capacity // 1024
    return vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)])


def _listing(lab: VsphereLab, name: str) -> list[str]:
    return [f for f in lab.datastore_listing(f"[LocalDS_0] {name}") if f.endswith(".vmdk")]


A = [(0, 4096, 0x11), (1 * MIB, BLOCK, 0x12), (3 * MIB + BLOCK, 100, 0x13)]
B = [(2 * MIB, 4096, 0x21), (CAP - 512, 512, 0x22)]  # B's last write ends at the old end
C = [(512 << 10, 4096, 0x31), (1 * MIB, 4096, 0x12)]  # the second rewrites identical bytes
D = [(CAP + BLOCK, 4096, 0x41)]  # into the grown region


def test_grow_after_a_backup_cycle_keeps_bytes_and_tracking(lab: VsphereLab, tmp_path: Path):
    """Two 4 MiB disks. A, snapshot s1 (the "backup"), remove it (the VM runs on a fresh delta over the
    base), B, grow disk 0 to 6 MiB (by capacityInBytes) and disk 1 to 6 MiB (by capacityInKB); the
    capacity in the config, every file of each chain is 6 MiB, the bytes before the old end unchanged,
    zeros after; C; snapshot s2: changed areas since s1's changeId = B + C (written before and after the
    grow), "*" = A + B + C; the endpoint's capacity; D into the grown region, s3: since s2 = D."""
    name = "grow2"
    moref = lab.make_vm(name, [CAP, CAP])
    vm = lab.vm(moref)
    keys = [d.key for d in _disks(vm.config.hardware.device)]
    images = {k: bytearray(CAP) for k in keys}
    for k in keys:
        _write(_path(lab, moref, vm, k), A)
        _apply(images[k], A)
    s1 = _snap(lab, vm, "s1")
    ids1 = {k: _disk(s1.config.hardware.device, k).backing.changeId for k in keys}
    _remove(lab, s1)
    assert vm.snapshot is None
    for k in keys:
        assert len(_chain(_disk(vm.config.hardware.device, k).backing)) == 2  # base + fresh delta
        _write(_path(lab, moref, vm, k), B)
        _apply(images[k], B)

    for k, by in zip(keys, ["bytes", "kb"], strict=True):
        lab.wait(vm.ReconfigVM_Task(spec=_grow_spec(_disk(vm.config.hardware.device, k), GROWN, by)))
    for k in keys:
        disk = _disk(vm.config.hardware.device, k)
        assert (disk.capacityInBytes, disk.capacityInKB) == (GROWN, GROWN // 1024)
        chain = _chain(disk.backing)
        assert len(chain) == 2, chain  # base + a fresh delta, as after a consolidation
        info = lab.disk_info(moref, chain[0])
        assert info["capacity"] == GROWN and info["writable"] is True
        top = Path(info["path"])
        base = top.parent / chain[1].split("/")[-1]
        assert _virtual_size(str(top)) == GROWN
        assert _virtual_size(str(top), alone=True) == GROWN
        assert _virtual_size(str(base), alone=True) == GROWN
        got = _read(str(top), tmp_path)
        assert len(got) == GROWN
        assert got[:CAP] == bytes(images[k]), "the bytes before the old end changed"
        assert got[CAP:] == bytes(GROWN - CAP), "the grown region is not zeros"
        images[k].extend(bytes(GROWN - CAP))
    stems = (name, f"{name}-000001", f"{name}_1", f"{name}_1-000001")
    assert _listing(lab, name) == sorted(f"{n}.vmdk" for n in stems)

    for k in keys:
        _write(_path(lab, moref, vm, k), C)
        _apply(images[k], C)
    s2 = _snap(lab, vm, "s2")
    for k in keys:
        sdisk = _disk(s2.config.hardware.device, k)
        assert sdisk.capacityInBytes == GROWN
        assert _query(vm, s2, k, ids1[k], GROWN) == _rounded(B + C)
        assert _query(vm, s2, k, "*", GROWN) == _rounded(A + B + C)
        assert _read(_path(lab, moref, vm, k, snap=s2), tmp_path) == bytes(images[k])
        assert lab.disk_info(moref, sdisk.backing.fileName, snapshot=s2._moId)["capacity"] == GROWN
    ids2 = {k: _disk(s2.config.hardware.device, k).backing.changeId for k in keys}
    for k in keys:
        _write(_path(lab, moref, vm, k), D)
        _apply(images[k], D)
    s3 = _snap(lab, vm, "s3")
    for k in keys:
        assert _query(vm, s3, k, ids2[k], GROWN) == _rounded(D)
        assert _query(vm, s3, k, ids1[k], GROWN) == _rounded(B + C + D)
        assert _read(_path(lab, moref, vm, k, snap=s3), tmp_path) == bytes(images[k])
    lab.wait(vm.RemoveAllSnapshots_Task())
    for k in keys:
        assert _read(_path(lab, moref, vm, k), tmp_path) == bytes(images[k])


def test_grow_of_a_never_snapshotted_disk(lab: VsphereLab, tmp_path: Path):
    """A VM that never had a snapshot runs on its base file: it grows in place (no delta), bytes kept,
    and the first snapshot's "*" lists what was written before and after the grow."""
    moref = lab.make_vm("grow-fresh", [CAP])
    vm = lab.vm(moref)
    key = _disks(vm.config.hardware.device)[0].key
    image = bytearray(CAP)
    _write(_path(lab, moref, vm, key), A)
    _apply(image, A)
    lab.wait(vm.ReconfigVM_Task(spec=_grow_spec(_disk(vm.config.hardware.device, key), GROWN)))
    disk = _disk(vm.config.hardware.device, key)
    assert _chain(disk.backing) == ["[LocalDS_0] grow-fresh/grow-fresh.vmdk"]
    image.extend(bytes(GROWN - CAP))
    path = _path(lab, moref, vm, key)
    assert _read(path, tmp_path) == bytes(image)
    _write(path, D)
    _apply(image, D)
    s1 = _snap(lab, vm, "s1")
    assert _query(vm, s1, key, "*", GROWN) == _rounded(A + D)
    assert _read(_path(lab, moref, vm, key, snap=s1), tmp_path) == bytes(image)


def test_grow_is_refused_with_snapshots_and_shrink_always(lab: VsphereLab, tmp_path: Path):
    """With a snapshot: InvalidDeviceOperation, nothing changes (capacity, chain, files, bytes). A smaller
    capacity: InvalidDeviceSpec, with or without snapshots. After removing the snapshot the grow works.
    The same capacity again is no change."""
    name = "grow-refused"
    moref = lab.make_vm(name, [CAP])
    vm = lab.vm(moref)
    key = _disks(vm.config.hardware.device)[0].key
    image = bytearray(CAP)
    _write(_path(lab, moref, vm, key), A)
    _apply(image, A)
    s1 = _snap(lab, vm, "s1")
    before = (_chain(_disk(vm.config.hardware.device, key).backing), _listing(lab, name))
    with pytest.raises(vim.fault.InvalidDeviceOperation) as err:
        lab.wait(vm.ReconfigVM_Task(spec=_grow_spec(_disk(vm.config.hardware.device, key), GROWN)))
    assert "Disks with parents cannot be expanded" in str(err.value)
    with pytest.raises(vim.fault.InvalidDeviceSpec) as err:
        lab.wait(vm.ReconfigVM_Task(spec=_grow_spec(_disk(vm.config.hardware.device, key), 2 * MIB)))
    assert not isinstance(err.value, vim.fault.InvalidDeviceOperation)
    disk = _disk(vm.config.hardware.device, key)
    assert (disk.capacityInBytes, disk.capacityInKB) == (CAP, CAP // 1024)
    assert (_chain(disk.backing), _listing(lab, name)) == before
    assert _virtual_size(_path(lab, moref, vm, key)) == CAP
    assert _read(_path(lab, moref, vm, key, snap=s1), tmp_path) == bytes(image)

    _remove(lab, s1)
    with pytest.raises(vim.fault.InvalidDeviceSpec):
        lab.wait(vm.ReconfigVM_Task(spec=_grow_spec(_disk(vm.config.hardware.device, key), CAP - MIB, "kb")))
    assert _disk(vm.config.hardware.device, key).capacityInBytes == CAP
    lab.wait(vm.ReconfigVM_Task(spec=_grow_spec(_disk(vm.config.hardware.device, key), CAP)))  # no change
    assert _virtual_size(_path(lab, moref, vm, key)) == CAP
    lab.wait(vm.ReconfigVM_Task(spec=_grow_spec(_disk(vm.config.hardware.device, key), GROWN)))
    assert _disk(vm.config.hardware.device, key).capacityInBytes == GROWN
    assert _read(_path(lab, moref, vm, key), tmp_path) == bytes(image) + bytes(GROWN - CAP)


def test_grow_of_a_running_vm_is_refused_by_the_lab(lab: VsphereLab):
    """vSphere hot-extends a SCSI disk without snapshots; QEMU cannot resize a VMDK, so the lab refuses
    with NotSupported while the VM runs (power off first). Nothing changes."""
    moref = lab.make_vm("grow-on", [CAP])
    vm = lab.vm(moref)
    key = _disks(vm.config.hardware.device)[0].key
    lab.wait(vm.PowerOnVM_Task())
    try:
        with pytest.raises(vmodl.fault.NotSupported) as err:
            lab.wait(vm.ReconfigVM_Task(spec=_grow_spec(_disk(vm.config.hardware.device, key), GROWN)))
        assert "power it off" in str(err.value)
        assert _disk(vm.config.hardware.device, key).capacityInBytes == CAP
    finally:
        lab.wait(vm.PowerOffVM_Task())
    lab.wait(vm.ReconfigVM_Task(spec=_grow_spec(_disk(vm.config.hardware.device, key), GROWN)))
    assert _virtual_size(_path(lab, moref, vm, key)) == GROWN


def test_linked_clones_and_their_source_are_not_grown_while_they_share_files(lab: VsphereLab, tmp_path: Path):
    """A linked clone's disk is a delta over its source's files: growing it is refused (vSphere: "Disks with
    parents cannot be expanded"). The source, once its snapshot is removed, still shares its base with the
    living clone: refused too (the lab's choice; nothing is changed). After the clone is destroyed the
    source grows, its bytes kept."""
    moref = lab.make_vm("grow-src", [CAP])
    vm = lab.vm(moref)
    key = _disks(vm.config.hardware.device)[0].key
    image = bytearray(CAP)
    _write(_path(lab, moref, vm, key), A)
    _apply(image, A)
    s1 = _snap(lab, vm, "s1")
    clone = lab.vm(lab.linked_clone(moref, s1, "grow-clone"))
    ckey = _disks(clone.config.hardware.device)[0].key
    with pytest.raises(vim.fault.InvalidDeviceOperation):
        lab.wait(clone.ReconfigVM_Task(spec=_grow_spec(_disk(clone.config.hardware.device, ckey), GROWN)))
    assert _disk(clone.config.hardware.device, ckey).capacityInBytes == CAP
    _remove(lab, s1)
    with pytest.raises(vim.fault.InvalidDeviceOperation) as err:
        lab.wait(vm.ReconfigVM_Task(spec=_grow_spec(_disk(vm.config.hardware.device, key), GROWN)))
    assert "linked clone" in str(err.value)
    assert _read(_path(lab, clone._moId, clone, ckey), tmp_path) == bytes(image)
    lab.wait(clone.Destroy_Task())
    lab.wait(vm.ReconfigVM_Task(spec=_grow_spec(_disk(vm.config.hardware.device, key), GROWN)))
    assert _read(_path(lab, moref, vm, key), tmp_path) == bytes(image) + bytes(GROWN - CAP)
    assert len(_chain(_disk(vm.config.hardware.device, key).backing)) == 2
