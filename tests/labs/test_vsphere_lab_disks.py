"""Semantics of the vSphere lab's disks (labs/vsphere, vcsim-lab): real bytes, a delta per snapshot, change
tracking derived from the data, consolidation, revert, and the lab's disk endpoint.

Everything goes through pyvmomi (SOAP/TLS) except the "guest": it writes with qemu-io into the file the
lab's endpoint (GET /sendense-lab/disk) names for the VM's current disk, and bytes are read back with
qemu-img from the files the endpoint names for a snapshot or the current disk. Expected disk images are
kept in Python (bytearrays) and compared byte for byte; expected changed areas are the written ranges
rounded out to the 64 KiB tracking block. Paging: the lab returns at most 2 extents per reply.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
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
from pyVmomi import vim

from labs.vsphere import VsphereLab

MIB = 1 << 20
BLOCK = 64 << 10
CAP = 4 * MIB


@pytest.fixture(scope="module")
def lab():
    with VsphereLab() as lab:
        yield lab


# --- helpers ---------------------------------------------------------------------------------------
def _disks(devices) -> list[Any]:
    return [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]


def _query(
    vm, snap, key: int, change_id: str, capacity: int = CAP
) -> tuple[list[int], list[tuple[int, int]]]:
    """Page QueryChangedDiskAreas over the whole disk as a client must: (extents per page, areas)."""
    pages, areas, offset = [], [], 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id)
        assert info.startOffset == offset and info.length > 0, (offset, info.startOffset, info.length)
        got = [(a.start, a.length) for a in info.changedArea]
        for s, n in got:
            assert offset <= s and s + n <= offset + info.length, (offset, info.length, got)
        pages.append(len(got))
        areas += got
        offset = info.startOffset + info.length
    assert offset == capacity
    return pages, areas


def _change_id(snap, key: int) -> str:
    return _disk(snap.config.hardware.device, key).backing.changeId


# Writes of the scenario: (offset, length, pattern byte). B is unaligned on purpose (rounding).
A = [(0, 4096, 0x11), (1 * MIB, BLOCK, 0x12)]
B = [(4096, 4096, 0x21), (2 * MIB + 100, 10, 0x22), (3 * MIB, 2 * BLOCK + 1, 0x23)]
C = [(512 << 10, 4096, 0x31)]


@dataclass
class Scenario:
    """A VM with one 4 MiB disk: writes A, snapshot s1, writes B, snapshot s2, writes C (current)."""

    lab: VsphereLab
    moref: str
    vm: Any
    key: int
    s1: Any
    s2: Any
    images: dict[str, bytearray] = field(default_factory=dict)  # "s1", "s2", "current"

    def current_file(self) -> str:
        return _disk(self.vm.config.hardware.device, self.key).backing.fileName

    def snap_file(self, snap) -> str:
        return _disk(snap.config.hardware.device, self.key).backing.fileName

    def path(self, snap=None) -> str:
        file = self.current_file() if snap is None else self.snap_file(snap)
        return self.lab.disk_info(self.moref, file, snapshot=None if snap is None else snap._moId)["path"]

    def disk_dir(self) -> Path:
        return Path(self.path()).parent

    def vmdks(self) -> list[str]:
        return sorted(p.name for p in self.disk_dir().glob("*.vmdk"))


def _scenario(lab: VsphereLab, name: str) -> Scenario:
    moref = lab.make_vm(name, [CAP])
    vm = lab.vm(moref)
    key = _disks(vm.config.hardware.device)[0].key
    image = bytearray(CAP)
    sc = Scenario(lab, moref, vm, key, None, None)
    _write(sc.path(), A)
    _apply(image, A)
    sc.s1 = _snap(lab, vm, "s1")
    sc.images["s1"] = bytearray(image)
    _write(sc.path(), B)
    _apply(image, B)
    sc.s2 = _snap(lab, vm, "s2")
    sc.images["s2"] = bytearray(image)
    _write(sc.path(), C)
    _apply(image, C)
    sc.images["current"] = image
    return sc


def _assert_bytes(sc: Scenario, tmp: Path, **which) -> None:
    for label, snap in which.items():
        assert _read(sc.path(snap), tmp) == bytes(sc.images[label]), label


# --- tests -----------------------------------------------------------------------------------------
def test_disks_are_real_thin_vmdks_of_their_capacity(lab):
    moref = lab.make_vm("files", [CAP, 2 * MIB])
    vm = lab.vm(moref)
    disks = _disks(vm.config.hardware.device)
    assert [d.backing.fileName for d in disks] == [
        "[LocalDS_0] files/files.vmdk",
        "[LocalDS_0] files/files_1.vmdk",
    ]
    for d, size in zip(disks, [CAP, 2 * MIB], strict=True):
        assert (d.capacityInBytes, d.capacityInKB) == (size, size // 1024)
        path = lab.disk_info(moref, d.backing.fileName)["path"]
        assert Path(path).parent == lab.datastores["LocalDS_0"] / "files"
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", path], check=True, capture_output=True, text=True
            ).stdout
        )
        assert info["format"] == "vmdk" and info["virtual-size"] == size
        assert info["format-specific"]["data"]["create-type"] == "monolithicSparse"
        assert os.stat(path).st_blocks * 512 < size // 4  # thin
    assert {f.name for f in vm.layoutEx.file if f.type == "diskDescriptor"} == {
        "[LocalDS_0] files/files.vmdk",
        "[LocalDS_0] files/files_1.vmdk",
    }

    # the default inventory's VMs too (1 MiB: vcsim-lab -disk-mib)
    content = lab.si().RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    inventory = [v for v in view.view if v.name.startswith("DC0_")]
    view.Destroy()
    assert inventory
    for v in inventory:
        d = _disks(v.config.hardware.device)[0]
        path = lab.disk_info(v._moId, d.backing.fileName)["path"]
        out = subprocess.run(["qemu-img", "info", "--output=json", path], check=True, capture_output=True)
        assert json.loads(out.stdout)["virtual-size"] == MIB == d.capacityInBytes


def test_default_disk_size_is_a_lab_flag():
    with VsphereLab(disk_mib=3, vms=1) as small:
        content = small.si().RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        vm = view.view[0]
        view.Destroy()
        d = _disks(vm.config.hardware.device)[0]
        assert d.capacityInBytes == 3 * MIB
        path = small.disk_info(vm._moId, d.backing.fileName)["path"]
        out = subprocess.run(["qemu-img", "info", "--output=json", path], check=True, capture_output=True)
        assert json.loads(out.stdout)["virtual-size"] == 3 * MIB
    assert not any(p.exists() for p in small.datastores.values())  # stop removed the datastore dirs


def test_snapshot_freezes_the_file_and_a_delta_becomes_current(lab):
    moref = lab.make_vm("chain", [CAP])
    vm = lab.vm(moref)
    key = _disks(vm.config.hardware.device)[0].key
    s1 = _snap(lab, vm, "s1")
    cur = _disk(vm.config.hardware.device, key)
    assert _chain(cur.backing) == ["[LocalDS_0] chain/chain-000001.vmdk", "[LocalDS_0] chain/chain.vmdk"]
    s1disk = _disk(s1.config.hardware.device, key)
    assert _chain(s1disk.backing) == ["[LocalDS_0] chain/chain.vmdk"]
    assert re.fullmatch(r"52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/1", s1disk.backing.changeId)
    s2 = _snap(lab, vm, "s2")
    cur = _disk(vm.config.hardware.device, key)
    assert _chain(cur.backing) == [
        "[LocalDS_0] chain/chain-000002.vmdk",
        "[LocalDS_0] chain/chain-000001.vmdk",
        "[LocalDS_0] chain/chain.vmdk",
    ]
    assert _chain(_disk(s2.config.hardware.device, key).backing) == [
        "[LocalDS_0] chain/chain-000001.vmdk",
        "[LocalDS_0] chain/chain.vmdk",
    ]
    assert (
        _change_id(s2, key).endswith("/2")
        and _change_id(s2, key).split("/")[0] == s1disk.backing.changeId[:-2]
    )

    names = {f.key: f.name for f in vm.layoutEx.file}
    assert {"[LocalDS_0] chain/chain-000001.vmdk", "[LocalDS_0] chain/chain-000002.vmdk"} <= set(
        names.values()
    )
    layout = next(d for d in vm.layoutEx.disk if d.key == key)
    assert [names[u.fileKey[0]] for u in layout.chain] == list(reversed(_chain(cur.backing)))  # base first
    s2layout = next(s for s in vm.layoutEx.snapshot if s.key == s2)
    assert [names[u.fileKey[0]] for u in s2layout.disk[0].chain] == [
        "[LocalDS_0] chain/chain.vmdk",
        "[LocalDS_0] chain/chain-000001.vmdk",
    ]

    top = lab.disk_info(moref, cur.backing.fileName)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", top["path"]], check=True, capture_output=True, text=True
        ).stdout
    )
    assert info["backing-filename"] == "chain-000001.vmdk" and info["virtual-size"] == CAP


def test_two_disks_each_get_their_delta_record_and_bytes(lab, tmp_path):
    moref = lab.make_vm("two", [CAP, 2 * MIB])
    vm = lab.vm(moref)
    keys = [d.key for d in _disks(vm.config.hardware.device)]
    writes = {keys[0]: [(0, 100, 0xA1)], keys[1]: [(MIB, BLOCK + 1, 0xB1)]}

    def path(key: int, snap=None) -> str:
        devices = (snap or vm).config.hardware.device
        file = _disk(devices, key).backing.fileName
        return lab.disk_info(moref, file, snapshot=snap._moId if snap else None)["path"]

    for key, w in writes.items():
        _write(path(key), w)
    s1 = _snap(lab, vm, "s1")
    assert [_chain(_disk(vm.config.hardware.device, k).backing) for k in keys] == [
        ["[LocalDS_0] two/two-000001.vmdk", "[LocalDS_0] two/two.vmdk"],
        ["[LocalDS_0] two/two_1-000001.vmdk", "[LocalDS_0] two/two_1.vmdk"],
    ]
    _write(path(keys[1]), [(0, 1, 0xB2)])
    s2 = _snap(lab, vm, "s2")
    assert _query(vm, s2, keys[0], _change_id(s1, keys[0]))[1] == []
    assert _query(vm, s2, keys[1], _change_id(s1, keys[1]), 2 * MIB)[1] == [(0, BLOCK)]
    assert _query(vm, s1, keys[1], "*", 2 * MIB)[1] == _rounded(writes[keys[1]])
    lab.wait(vm.RemoveAllSnapshots_Task())
    for key, size in zip(keys, [CAP, 2 * MIB], strict=True):
        image = bytearray(size)
        _apply(image, writes[key] + ([(0, 1, 0xB2)] if key == keys[1] else []))
        assert _read(path(key), tmp_path) == bytes(image)


def test_bytes_of_each_snapshot_and_the_current_disk_are_exact(lab, tmp_path):
    sc = _scenario(lab, "bytes")
    _assert_bytes(sc, tmp_path, s1=sc.s1, s2=sc.s2, current=None)


def test_changed_areas_are_the_written_blocks_paged(lab):
    sc = _scenario(lab, "cbt")
    vm, key = sc.vm, sc.key
    pages, areas = _query(vm, sc.s2, key, _change_id(sc.s1, key))
    assert areas == _rounded(B) == [(0, BLOCK), (2 * MIB, BLOCK), (3 * MIB, 3 * BLOCK)]
    assert pages == [2, 1]
    pages, areas = _query(vm, sc.s2, key, "*")  # '*' = allocated areas = everything written up to s2
    assert areas == _rounded(A + B) and pages == [2, 2]
    assert _query(vm, sc.s1, key, "*")[1] == _rounded(A)
    assert _query(vm, sc.s2, key, _change_id(sc.s2, key)) == ([0], [])

    # a start offset inside an extent clips it; at or beyond the capacity is refused
    info = vm.QueryChangedDiskAreas(
        snapshot=sc.s2, deviceKey=key, startOffset=3 * MIB + BLOCK, changeId=_change_id(sc.s1, key)
    )
    assert [(a.start, a.length) for a in info.changedArea] == [(3 * MIB + BLOCK, 2 * BLOCK)]
    with pytest.raises(vmodl_fault("InvalidArgument")):
        vm.QueryChangedDiskAreas(snapshot=sc.s2, deviceKey=key, startOffset=CAP, changeId="*")
    with pytest.raises(vim.fault.FileFault):  # a changeId newer than the snapshot
        vm.QueryChangedDiskAreas(
            snapshot=sc.s1, deviceKey=key, startOffset=0, changeId=_change_id(sc.s2, key)
        )


def vmodl_fault(name: str):
    from pyVmomi import vmodl

    return getattr(vmodl.fault, name)


def test_change_tracking_reset_gives_a_new_ctk_and_old_change_ids_fault(lab):
    sc = _scenario(lab, "reset")
    vm, key = sc.vm, sc.key
    old = _change_id(sc.s1, key)
    for on in (False, True):
        sc.lab.wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=on)))
    s3 = _snap(sc.lab, vm, "s3")
    new = _change_id(s3, key)
    assert new.split("/")[0] != old.split("/")[0]
    for snap in (s3, sc.s2):
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=0, changeId=old)
    assert _query(vm, s3, key, "*")[1] == _rounded(A + B + C)
    _write(sc.path(), [(MIB, 1, 0x41)])
    s4 = _snap(sc.lab, vm, "s4")
    assert _query(vm, s4, key, new)[1] == [(MIB, BLOCK)]


def test_remove_s1_then_s2_consolidates_and_keeps_bytes_and_change_ids(lab, tmp_path):
    sc = _scenario(lab, "consol")
    vm, key = sc.vm, sc.key
    cid1 = _change_id(sc.s1, key)
    sc.lab.wait(sc.s1.RemoveSnapshot_Task(removeChildren=False, consolidate=True))
    assert sc.snap_file(sc.s2) == "[LocalDS_0] consol/consol.vmdk"  # s2's delta merged into the base
    assert _chain(_disk(vm.config.hardware.device, key).backing) == [
        "[LocalDS_0] consol/consol-000002.vmdk",
        "[LocalDS_0] consol/consol.vmdk",
    ]
    assert sc.vmdks() == ["consol-000002.vmdk", "consol.vmdk"]
    _assert_bytes(sc, tmp_path, s2=sc.s2, current=None)
    assert _query(vm, sc.s2, key, cid1)[1] == _rounded(B)  # changeIds stay valid
    assert _query(vm, sc.s2, key, "*")[1] == _rounded(A + B)

    sc.lab.wait(sc.s2.RemoveSnapshot_Task(removeChildren=False, consolidate=True))
    # the running delta is committed into the base disk, the VM goes on a fresh empty delta of it
    assert _chain(_disk(vm.config.hardware.device, key).backing) == [
        "[LocalDS_0] consol/consol-000001.vmdk",
        "[LocalDS_0] consol/consol.vmdk",
    ]
    assert sc.vmdks() == ["consol-000001.vmdk", "consol.vmdk"]
    assert vm.snapshot is None
    assert [f.name for f in vm.layoutEx.file if "-00000" in f.name] == [
        "[LocalDS_0] consol/consol-000001.vmdk"
    ]
    _assert_bytes(sc, tmp_path, current=None)
    assert sc.lab.disk_info(sc.moref, sc.current_file())["writable"]


def test_remove_s2_first_keeps_s1_and_current_bytes(lab, tmp_path):
    sc = _scenario(lab, "mid")
    vm, key = sc.vm, sc.key
    cid1 = _change_id(sc.s1, key)
    sc.lab.wait(sc.s2.RemoveSnapshot_Task(removeChildren=False, consolidate=True))
    assert _chain(_disk(vm.config.hardware.device, key).backing) == [
        "[LocalDS_0] mid/mid-000002.vmdk",  # a fresh delta of s2's file, which got the running delta
        "[LocalDS_0] mid/mid-000001.vmdk",
        "[LocalDS_0] mid/mid.vmdk",
    ]
    assert sc.vmdks() == ["mid-000001.vmdk", "mid-000002.vmdk", "mid.vmdk"]
    _assert_bytes(sc, tmp_path, s1=sc.s1, current=None)
    s3 = _snap(sc.lab, vm, "s3")
    assert _query(vm, s3, key, cid1)[1] == _rounded(B + C)


def test_backup_pattern_snapshot_then_remove_keeps_incrementals_exact(lab, tmp_path):
    """A backup's cycle: snapshot, read, remove the snapshot (the running delta is committed into the
    base), the guest writes on, next snapshot: the incremental is exactly the new writes, also where they
    overwrite blocks the merged file already had."""
    moref = lab.make_vm("cycle", [CAP])
    vm = lab.vm(moref)
    key = _disks(vm.config.hardware.device)[0].key
    image = bytearray(CAP)

    def current_path() -> str:
        file = _disk(vm.config.hardware.device, key).backing.fileName
        return lab.disk_info(moref, file)["path"]

    _write(current_path(), A)
    _apply(image, A)
    s1 = _snap(lab, vm, "s1")
    cid = _change_id(s1, key)
    rounds = [
        [(0, 512, 0x61), (2 * MIB, 4096, 0x62)],  # overwrites A's first block, and a new block
        [(1 * MIB + 100, 1, 0x71)],  # overwrites A's second block
        [(3 * MIB, BLOCK, 0x81)],
    ]
    prev = s1
    for i, writes in enumerate(rounds, start=2):
        lab.wait(prev.RemoveSnapshot_Task(removeChildren=False, consolidate=True))
        assert _chain(_disk(vm.config.hardware.device, key).backing) == [
            "[LocalDS_0] cycle/cycle-000001.vmdk",  # fresh, empty: the running delta went into the base
            "[LocalDS_0] cycle/cycle.vmdk",
        ]
        _write(current_path(), writes)
        _apply(image, writes)
        snap = _snap(lab, vm, f"s{i}")
        assert _query(vm, snap, key, cid)[1] == _rounded(writes), i
        assert _query(vm, snap, key, "*")[1] == _rounded(A + [w for r in rounds[: i - 1] for w in r]), i
        assert _read(
            lab.disk_info(
                moref, _disk(snap.config.hardware.device, key).backing.fileName, snapshot=snap._moId
            )["path"],
            tmp_path,
        ) == bytes(image)
        cid, prev = _change_id(snap, key), snap


def test_remove_all_snapshots_merges_into_the_base_disk(lab, tmp_path):
    sc = _scenario(lab, "all")
    sc.lab.wait(sc.vm.RemoveAllSnapshots_Task())
    assert _chain(_disk(sc.vm.config.hardware.device, sc.key).backing) == [
        "[LocalDS_0] all/all-000001.vmdk",  # fresh, empty: everything else went into the base
        "[LocalDS_0] all/all.vmdk",
    ]
    assert sc.vmdks() == ["all-000001.vmdk", "all.vmdk"]
    _assert_bytes(sc, tmp_path, current=None)


def test_revert_discards_the_current_delta(lab, tmp_path):
    sc = _scenario(lab, "rev")
    vm, key = sc.vm, sc.key
    sc.lab.wait(sc.s1.RevertToSnapshot_Task())
    chain = _chain(_disk(vm.config.hardware.device, key).backing)
    assert chain[1:] == ["[LocalDS_0] rev/rev.vmdk"]
    assert re.fullmatch(r"\[LocalDS_0\] rev/rev-00000\d\.vmdk", chain[0])
    # the old delta was deleted before the new one was made (a revert frees its space first, so it
    # works on a full datastore): the new one may take its name, never its data
    files = sorted(p.name for p in sc.disk_dir().glob("rev*.vmdk"))
    assert files == sorted({"rev.vmdk", sc.snap_file(sc.s2).rsplit("/", 1)[1], chain[0].rsplit("/", 1)[1]}), (
        files
    )
    # (its bytes are s1's: checked below)
    sc.images["current"] = bytearray(sc.images["s1"])
    _assert_bytes(sc, tmp_path, s1=sc.s1, s2=sc.s2, current=None)

    D = [(MIB + 5, 5, 0x51)]
    _write(sc.path(), D)
    s3 = _snap(sc.lab, vm, "s3")
    assert _query(vm, s3, key, _change_id(sc.s1, key))[1] == _rounded(D)
    # from s2 (another branch) to s3: what s2 had since s1 plus what s3 has since s1
    assert _query(vm, s3, key, _change_id(sc.s2, key))[1] == _rounded(B + D)


def test_disk_endpoint_contract(lab):
    sc = _scenario(lab, "ep")
    other = lab.make_vm("ep-other", [MIB])
    other_s = _snap(lab, lab.vm(other), "o1")
    cur, frozen = sc.current_file(), sc.snap_file(sc.s1)

    assert lab.disk_request(auth=False, vm=sc.moref, file=cur)[0] == 401
    assert lab.disk_request(auth=(lab.user, "wrong"), vm=sc.moref, file=cur)[0] == 401
    assert lab.disk_request(auth=("someone", lab.password), vm=sc.moref, file=cur)[0] == 401
    with pytest.raises(vim.fault.InvalidLogin):  # the same credentials as SOAP Login, and only those
        from pyVim.connect import SmartConnect

        SmartConnect(host=lab.host, port=lab.port, user=lab.user, pwd="wrong", disableSslCertValidation=True)
    assert re.fullmatch(r"([0-9A-F]{2}:){19}[0-9A-F]{2}", lab.thumbprint)  # VDDK's form of the SHA-1
    assert lab.disk_request(vm=sc.moref)[0] == 400
    assert lab.disk_request(file=cur)[0] == 400

    for params in (
        {"vm": "vm-999999", "file": cur},
        {"vm": sc.moref, "file": cur, "snapshot": other_s._moId},
        {"vm": sc.moref, "file": cur, "snapshot": "snapshot-999999"},
        {"vm": sc.moref, "file": frozen},  # s1's file is not a disk of the current config
        {"vm": sc.moref, "file": cur, "snapshot": sc.s1._moId},
        {"vm": sc.moref, "file": "[LocalDS_0] ep/nothing.vmdk"},
    ):
        status, body = lab.disk_request(**params)
        assert status == 404 and isinstance(body.get("error"), str) and "\n" not in body["error"], (
            params,
            body,
        )

    snap = lab.disk_info(sc.moref, frozen, snapshot=sc.s1._moId)
    assert snap == {
        "path": str(sc.disk_dir() / "ep.vmdk"),
        "format": "vmdk",
        "capacity": CAP,
        "writable": False,
        "disk_key": sc.key,
        "power_state": "poweredOff",
    }
    now = lab.disk_info(sc.moref, cur)
    assert now["path"] == str(sc.disk_dir() / cur.rsplit("/", 1)[1]) and os.path.isabs(now["path"])
    assert now["writable"] is True and now["disk_key"] == sc.key

    lab.wait(sc.vm.PowerOnVM_Task())
    try:
        now = lab.disk_info(sc.moref, cur)
        assert (now["writable"], now["power_state"]) == (False, "poweredOn")
    finally:
        lab.wait(sc.vm.PowerOffVM_Task())


# --- identical rewrites (vSphere's CBT reports every written block, whatever the bytes) ------------------
X = [(MIB, BLOCK, 0x42)]  # one whole 64 KiB block
Y = [(2 * MIB + 10, 20, 0x43)]


@pytest.mark.parametrize(
    "steps",
    [
        # the backup cycle of the brief: s1, remove s1, the same bytes again, s2
        ["w:X", "snap", "rm:0", "w:X", "snap"],
        # twice round the cycle, the rewrite only in the second round
        ["w:X", "snap", "rm:0", "w:Y", "snap", "rm:1", "w:X", "snap"],
        # removing the newest snapshot while an older one stays (its running delta merged into its file)
        ["w:X", "snap", "w:Y", "snap", "rm:1", "w:Y", "snap"],
        # RemoveAllSnapshots, then the same bytes again
        ["w:X", "snap", "w:Y", "snap", "rmall", "w:X", "w:Y", "snap"],
        # a removal between two rewrites within one epoch, and one right after a snapshot
        ["w:X", "snap", "w:X", "snap", "rm:0", "w:X", "rm:1", "w:X", "snap"],
        # no removal at all (a rewrite into a delta)
        ["w:X", "snap", "w:X", "snap"],
    ],
    ids=["cycle", "two-cycles", "keep-older", "remove-all", "rewrite-remove-rewrite", "no-removal"],
)
def test_identical_rewrites_are_tracked_in_every_sequence(lab, tmp_path, request, steps):
    """Each incremental (from the previous snapshot's changeId, whether that snapshot was removed or not)
    is exactly the blocks written in between, identical bytes included; the bytes of the current disk and
    of every remaining snapshot stay exact."""
    moref = lab.make_vm("same-" + request.node.callspec.id, [CAP])
    vm = lab.vm(moref)
    key = _disks(vm.config.hardware.device)[0].key
    image = bytearray(CAP)
    snaps: list[tuple[Any, bytes, str]] = []  # (snapshot, its bytes, its changeId); removed ones stay here
    removed: set[int] = set()
    written: list[tuple[int, int, int]] = []

    def current_path() -> str:
        return lab.disk_info(moref, _disk(vm.config.hardware.device, key).backing.fileName)["path"]

    for step in steps:
        if step.startswith("w:"):
            writes = {"X": X, "Y": Y}[step[2:]]
            _write(current_path(), writes)
            _apply(image, writes)
            written += writes
        elif step == "snap":
            snap = _snap(lab, vm, f"s{len(snaps)}")
            if snaps:
                assert _query(vm, snap, key, snaps[-1][2])[1] == _rounded(written), step
            snaps.append((snap, bytes(image), _change_id(snap, key)))
            written = []
        elif step == "rmall":
            lab.wait(vm.RemoveAllSnapshots_Task())
            removed |= set(range(len(snaps)))
        else:
            i = int(step[3:])
            _remove(lab, snaps[i][0])
            removed.add(i)
        assert _read(current_path(), tmp_path) == bytes(image), step
        for i, (snap, data, _) in enumerate(snaps):
            if i not in removed:
                file = _disk(snap.config.hardware.device, key).backing.fileName
                path = lab.disk_info(moref, file, snapshot=snap._moId)["path"]
                assert _read(path, tmp_path) == data, (step, i)
    last = snaps[-1][0]
    assert _query(vm, last, key, "*")[1] == _rounded(X + Y if "w:Y" in steps else X)
    # every changeId handed out still answers (removal keeps the record): from the first, all writes
    assert _query(vm, last, key, snaps[0][2])[1] == _rounded(
        [w for s in steps[steps.index("snap") + 1 :] if s.startswith("w:") for w in {"X": X, "Y": Y}[s[2:]]]
    )


# --- per-disk tracking reset (a lost or corrupted -ctk.vmdk) ----------------------------------------
def test_ctk_reset_of_one_disk_keeps_the_others(lab):
    moref = lab.make_vm("ctk1", [CAP, 2 * MIB])
    vm = lab.vm(moref)
    k0, k1 = (d.key for d in _disks(vm.config.hardware.device))

    def path(key: int) -> str:
        return lab.disk_info(moref, _disk(vm.config.hardware.device, key).backing.fileName)["path"]

    _write(path(k0), [(0, 10, 0x11)])
    _write(path(k1), [(0, 10, 0x12)])
    s1 = _snap(lab, vm, "s1")
    old0, old1 = _change_id(s1, k0), _change_id(s1, k1)
    lab.reset_tracking(moref, k0)
    _write(path(k0), [(MIB, 10, 0x21)])
    _write(path(k1), [(MIB, 10, 0x22)])
    s2 = _snap(lab, vm, "s2")
    new0, new1 = _change_id(s2, k0), _change_id(s2, k1)
    assert new0.split("/")[0] != old0.split("/")[0]  # disk 0: a new ctk
    assert new1.split("/")[0] == old1.split("/")[0]  # disk 1: the same
    for snap in (s1, s2):
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=k0, startOffset=0, changeId=old0)
    assert _query(vm, s2, k1, old1, 2 * MIB)[1] == [(MIB, BLOCK)]  # the other disk's changeIds stay valid
    assert _query(vm, s2, k0, "*")[1] == [(0, BLOCK), (MIB, BLOCK)]  # a full read still works
    _write(path(k0), [(3 * MIB, 1, 0x31)])
    s3 = _snap(lab, vm, "s3")
    assert _query(vm, s3, k0, new0)[1] == [(3 * MIB, BLOCK)]  # tracking goes on with the new ctk
    assert _query(vm, s3, k1, old1, 2 * MIB)[1] == [(MIB, BLOCK)]

    # disabling then enabling change tracking resets every disk
    for on in (False, True):
        lab.wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=on)))
    s4 = _snap(lab, vm, "s4")
    for key, cid, cap in ((k0, new0, CAP), (k1, old1, 2 * MIB)):
        assert _change_id(s4, key).split("/")[0] != cid.split("/")[0]
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(snapshot=s4, deviceKey=key, startOffset=0, changeId=cid)
        assert _query(vm, s4, key, _change_id(s4, key), cap)[1] == []


def test_ctk_reset_endpoint_contract(lab):
    moref = lab.make_vm("ctk2", [CAP])
    vm = lab.vm(moref)
    key = _disks(vm.config.hardware.device)[0].key
    ep = "/sendense-lab/ctk-reset"
    assert lab.lab_request("POST", ep, auth=False, vm=moref, key=str(key))[0] == 401
    assert lab.lab_request("POST", ep, auth=(lab.user, "wrong"), vm=moref, key=str(key))[0] == 401
    assert lab.lab_request("GET", ep, vm=moref, key=str(key))[0] == 405
    assert lab.lab_request("POST", ep, vm=moref, key="x")[0] == 400
    assert lab.lab_request("POST", ep, key=str(key))[0] == 400
    assert lab.lab_request("POST", ep, vm="vm-99999", key=str(key))[0] == 404
    assert lab.lab_request("POST", ep, vm=moref, key="99999")[0] == 404
    ctrl = next(
        d.key for d in vm.config.hardware.device if isinstance(d, vim.vm.device.ParaVirtualSCSIController)
    )
    assert lab.lab_request("POST", ep, vm=moref, key=str(ctrl))[0] == 404  # not a disk
    assert lab.lab_request("POST", ep, vm=moref, key=str(key)) == (204, {})
    with pytest.raises(Exception, match="404"):
        lab.reset_tracking("vm-99999", key)
