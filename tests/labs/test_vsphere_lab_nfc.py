"""NFC uploads into the vSphere lab (labs/vsphere, vcsim-lab; lab_nfc.go): OvfManager.CreateImportSpec +
ResourcePool.ImportVApp give an HttpNfcLease; each disk's streamOptimized VMDK is PUT to its
lease.info.deviceUrl[].url ("*" = the server's host) and becomes the VM's disk (the lab's thin
monolithicSparse VMDK, the OVF's capacity, exactly the uploaded image's bytes). HttpNfcLeaseComplete keeps
the VM (lease "done", its URLs 404); HttpNfcLeaseAbort removes the VM being imported and its files (lease
"error"). pyvmomi for the API, requests for the uploads (with the session cookie, as a client sends it),
qemu-img for the images and for reading the disks from the paths the lab's /sendense-lab/disk names.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers_vsphere_lab import read_raw as _read
from helpers_vsphere_lab import rounded as _rounded
from pyVmomi import vim

from labs.vsphere import VsphereLab

MIB = 1 << 20
BLOCK = 64 << 10

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


@pytest.fixture(scope="module")
def lab():
    with VsphereLab() as lab:
        yield lab


def _ovf(name: str, disks: list[tuple[str, int, int]]) -> str:
    """An OVF descriptor: one VM, an LSI Logic controller, one disk per (file name, file size, capacity)."""
    refs = "".join(
        f'<File ovf:id="file{i}" ovf:href="{href}" ovf:size="{size}"/>'
        for i, (href, size, _) in enumerate(disks)
    )
    descs = "".join(
        f'<Disk ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" ovf:capacity="{cap}"'
        ' ovf:capacityAllocationUnits="byte" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>'
        for i, (_, _, cap) in enumerate(disks)
    )
    items = "".join(
        f"<Item><rasd:AddressOnParent>{i}</rasd:AddressOnParent><rasd:ElementName>Hard disk {i + 1}"
        f"</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource><rasd:InstanceID>"
        f"{10 + i}</rasd:InstanceID><rasd:Parent>3</rasd:Parent>"
        "<rasd:ResourceType>17</rasd:ResourceType></Item>"
        for i in range(len(disks))
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
 xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
 <References>{refs}</References>
 <DiskSection><Info>Virtual disks</Info>{descs}</DiskSection>
 <VirtualSystem ovf:id="{name}">
  <Info>A virtual machine</Info><Name>{name}</Name>
  <VirtualHardwareSection>
   <Info>Virtual hardware</Info>
   <System><vssd:ElementName>Virtual Hardware Family</vssd:ElementName><vssd:InstanceID>0</vssd:InstanceID>
    <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
    <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType></System>
   <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:ElementName>1 CPU</rasd:ElementName>
    <rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
    <rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
   <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>64 MB</rasd:ElementName>
    <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
    <rasd:VirtualQuantity>64</rasd:VirtualQuantity></Item>
   <Item><rasd:ElementName>SCSI controller 0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID>
    <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
   {items}
  </VirtualHardwareSection>
 </VirtualSystem>
</Envelope>"""


def _image(tmp: Path, name: str, size: int, writes: list[tuple[int, int, int]]) -> tuple[Path, bytes]:
    """A streamOptimized VMDK of a raw image of `size` bytes with the pattern writes; (vmdk, raw bytes)."""
    raw = bytearray(size)
    for off, n, pat in writes:
        raw[off : off + n] = bytes([pat]) * n
    raw_path = tmp / f"{name}.raw"
    raw_path.write_bytes(bytes(raw))
    vmdk = tmp / f"{name}.vmdk"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            str(raw_path),
            str(vmdk),
        ],
        check=True,
        capture_output=True,
    )
    raw_path.unlink()
    return vmdk, bytes(raw)


def _qemu_info(path: str) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def _allocated(path: str) -> list[tuple[int, int]]:
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", path], check=True, capture_output=True, text=True
    ).stdout
    return [(e["start"], e["length"]) for e in json.loads(out) if e["data"]]


class Import:
    """ImportVApp of an OVF with the given disks; the lease ready, the deviceUrls by the OVF's file path."""

    def __init__(self, lab: VsphereLab, name: str, disks: list[tuple[Path, int]]):
        self.lab, self.name = lab, name
        si = lab.si()
        content = si.RetrieveContent()
        dc = content.rootFolder.childEntity[0]
        host = dc.hostFolder.childEntity[0]
        pool = host.resourcePool
        ds = next(d for d in dc.datastore if d.name == "LocalDS_0")
        self.ovf = _ovf(name, [(p.name, p.stat().st_size, cap) for p, cap in disks])
        res = content.ovfManager.CreateImportSpec(
            ovfDescriptor=self.ovf,
            resourcePool=pool,
            datastore=ds,
            cisp=vim.OvfManager.CreateImportSpecParams(entityName=name),
        )
        assert not res.error, res.error
        self.files = {item.deviceId: item.path for item in res.fileItem}
        self.lease = pool.ImportVApp(spec=res.importSpec, folder=dc.vmFolder)
        deadline = time.monotonic() + 10
        while self.lease.state == vim.HttpNfcLease.State.initializing:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert self.lease.state == vim.HttpNfcLease.State.ready, self.lease.error
        self.vm = self.lease.info.entity
        self.moref = self.vm._moId
        self.urls = {
            self.files[u.importKey]: u.url.replace("*", f"{lab.host}:{lab.port}")
            for u in self.lease.info.deviceUrl
            if u.importKey in self.files
        }
        self.cookie = si._stub.cookie

    def put(self, file: Path, target: str | None = None, method: str = "PUT") -> requests.Response:
        """Upload a file to the deviceUrl of the OVF file `target` (default: its own name)."""
        url = self.urls[target or file.name]
        with file.open("rb") as body:
            return requests.request(
                method,
                url,
                data=body,
                headers={
                    "Content-Type": "application/x-vnd.vmware-streamVmdk",
                    "Content-Length": str(file.stat().st_size),
                    "Cookie": self.cookie,
                },
                verify=False,
                timeout=60,
            )

    def disks(self) -> list[Any]:
        return sorted(
            (d for d in self.vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)),
            key=lambda d: d.unitNumber or 0,
        )


A = [(0, 4096, 0x11), (1 * MIB + 512, 100, 0x12), (5 * MIB, 3 * BLOCK, 0x13), (8 * MIB - 512, 512, 0x14)]
B = [(BLOCK, 4096, 0x21), (3 * MIB, BLOCK + 1, 0x22)]


def test_upload_becomes_the_disk_byte_for_byte(lab: VsphereLab, tmp_path: Path):
    """Two disks (8 MiB and 6 MiB, different patterns), uploaded in reverse order (disk 1 first) with PUT
    and POST; after HttpNfcLeaseComplete each disk reads exactly its image's bytes, the config's capacity
    is the OVF's, the file is a thin monolithicSparse VMDK without parent (only the data grains
    allocated), the endpoint's capacity agrees; a second upload to the completed lease is refused (404)
    and changes nothing; change tracking then sees the uploaded data as the first epoch ("*")."""
    a, raw_a = _image(tmp_path, "nfc-a-disk0", 8 * MIB, A)
    b, raw_b = _image(tmp_path, "nfc-a-disk1", 6 * MIB, B)
    imp = Import(lab, "nfc-a", [(a, 8 * MIB), (b, 6 * MIB)])
    assert sorted(imp.urls) == [a.name, b.name]
    r = imp.put(b, method="POST")
    assert r.status_code == 200, r.text
    imp.lease.HttpNfcLeaseProgress(percent=50)
    r = imp.put(a)
    assert r.status_code == 200, r.text
    imp.lease.HttpNfcLeaseComplete()
    assert imp.lease.state == vim.HttpNfcLease.State.done

    disks = imp.disks()
    assert [d.capacityInBytes for d in disks] == [8 * MIB, 6 * MIB]
    for disk, raw, writes in ((disks[0], raw_a, A), (disks[1], raw_b, B)):
        info = lab.disk_info(imp.moref, disk.backing.fileName)
        assert info["capacity"] == len(raw) and info["writable"] is True
        assert disk.backing.parent is None
        q = _qemu_info(info["path"])
        assert q["virtual-size"] == len(raw) and q["format"] == "vmdk"
        assert q["format-specific"]["data"]["create-type"] == "monolithicSparse"
        assert "backing-filename" not in q
        assert _read(info["path"], tmp_path) == raw, disk.backing.fileName
        assert _allocated(info["path"]) == _rounded(writes)

    r = imp.put(a, target=b.name)  # a's image to disk 1's URL: refused, disk 1 unchanged
    assert r.status_code == 404
    assert _read(lab.disk_info(imp.moref, disks[1].backing.fileName)["path"], tmp_path) == raw_b

    vm = imp.vm
    lab.wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    snap = lab.wait(vm.CreateSnapshot_Task(name="s1", description="", memory=False, quiesce=False))
    for disk, writes in ((disks[0], A), (disks[1], B)):
        areas, offset = [], 0
        while offset < disk.capacityInBytes:
            info = vm.QueryChangedDiskAreas(
                snapshot=snap, deviceKey=disk.key, startOffset=offset, changeId="*"
            )
            areas += [(x.start, x.length) for x in info.changedArea]
            offset = info.startOffset + info.length
        merged: list[list[int]] = []
        for s, n in sorted(areas):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], s + n)
            else:
                merged.append([s, s + n])
        assert [(s, e - s) for s, e in merged] == _rounded(writes)
    lab.wait(vm.RemoveAllSnapshots_Task())


def test_abort_removes_the_vm_and_its_files(lab: VsphereLab, tmp_path: Path):
    """One disk uploaded of two, then HttpNfcLeaseAbort: the VM is gone from the inventory, its directory
    from the datastore, the lease is "error", its URLs answer 404; completing it then is InvalidState."""
    a, _ = _image(tmp_path, "nfc-b-disk0", 8 * MIB, A)
    b, _ = _image(tmp_path, "nfc-b-disk1", 6 * MIB, B)
    imp = Import(lab, "nfc-b", [(a, 8 * MIB), (b, 6 * MIB)])
    assert lab.datastore_listing("[LocalDS_0] nfc-b")  # the VM's files exist while importing
    assert imp.put(a).status_code == 200
    imp.lease.HttpNfcLeaseAbort()
    assert imp.lease.state == vim.HttpNfcLease.State.error
    assert lab.datastore_listing("[LocalDS_0] nfc-b") == []
    content = lab.si().RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        assert "nfc-b" not in [vm.name for vm in view.view]
    finally:
        view.Destroy()
    assert imp.put(b).status_code == 404
    with pytest.raises(vim.fault.InvalidState):
        imp.lease.HttpNfcLeaseComplete()


def test_a_bad_upload_is_refused_and_the_disk_stays(lab: VsphereLab, tmp_path: Path):
    """Not a VMDK (raw bytes) and an image larger than the OVF's capacity: 400, the disk stays as it was
    (empty, the OVF's capacity); then an image smaller than the OVF's capacity: the disk keeps the OVF's
    capacity and reads the image's bytes, zeros after its end."""
    a, raw_a = _image(tmp_path, "nfc-c-disk0", 8 * MIB, A)
    imp = Import(lab, "nfc-c", [(a, 6 * MIB)])  # the OVF says 6 MiB, the image is 8 MiB
    bad = tmp_path / "nfc-c-disk0.raw"
    bad.write_bytes(b"\x55" * MIB)
    r = imp.put(bad, target=a.name)
    assert r.status_code == 400, r.text
    r = imp.put(a)
    assert r.status_code == 400 and "capacity" in r.text, r.text
    path = lab.disk_info(imp.moref, imp.disks()[0].backing.fileName)["path"]
    assert _qemu_info(path)["virtual-size"] == 6 * MIB and _allocated(path) == []
    small, raw_small = _image(tmp_path, "small", 4 * MIB, B)
    assert imp.put(small, target=a.name).status_code == 200
    imp.lease.HttpNfcLeaseComplete()
    assert imp.disks()[0].capacityInBytes == 6 * MIB
    assert _qemu_info(path)["virtual-size"] == 6 * MIB
    assert _read(path, tmp_path) == raw_small + bytes(2 * MIB)
