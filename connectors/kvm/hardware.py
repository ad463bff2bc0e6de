"""What a KVM VM looks like, for VMs made from its points (VmInfo: CPUs, memory, firmware, disks' bus
and boot order, NICs with MAC and network): asked of a running QEMU over QMP, read from a libvirt
domain's XML, or given in the spec for a stopped VM (whose images say nothing of it)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from sendense.models import DiskInfo, NicInfo, VmInfo
from tools.qmp import QmpClient, QmpError

# QEMU device type -> bus, for a disk's device (query-block's qdev path names it)
_BUS = {
    "virtio-blk-pci": "virtio",
    "virtio-blk-device": "virtio",
    "scsi-hd": "scsi",
    "scsi-disk": "scsi",
    "ide-hd": "ide",
    "ide-drive": "ide",
    "nvme": "nvme",
    "usb-storage": "usb",
}
# `info network` lines: "virtio-net-pci.0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:..."
# followed by " \ net0: index=0,type=user,..." (the netdev it is on)
_NIC = re.compile(r"^(?P<name>\S+): index=\d+,type=nic,model=(?P<model>[^,]+),macaddr=(?P<mac>[0-9a-f:]{17})")
_PEER = re.compile(r"^\s*\\\s*(?P<netdev>[^:]+): index=\d+,type=(?P<type>[^,\s]+)(?:,(?P<rest>.*))?")
_NIC_MODEL = {"virtio-net-pci": "virtio", "virtio-net-device": "virtio", "e1000": "e1000", "e1000e": "e1000e"}


def qmp_hardware(c: QmpClient, disks: list[DiskInfo]) -> dict[str, Any]:
    """VmInfo's hardware fields of the QEMU behind `c`, and `disks` with their bus and boot order."""
    cpus = len(c.execute("query-cpus-fast"))
    memory_mib = int(c.execute("query-memory-size-summary").get("base-memory", 0)) >> 20
    firmware = "uefi" if _has_pflash(c) else "bios"
    qdev = {}  # disk key -> its device's QOM path
    for dev in c.execute("query-block"):
        ins, path = dev.get("inserted") or {}, str(dev.get("qdev") or "")
        for key in (ins.get("node-name"), dev.get("device")):
            if key and path:
                qdev[str(key)] = path.removesuffix("/virtio-backend")
    found = []
    for d in disks:
        path = qdev.get(d.key, "")
        bus, index = "", None
        if path:
            bus = _BUS.get(_qom(c, path, "type") or "", "")
            got = _qom(c, path, "bootindex")  # any int, lower boots first; -1: not a boot device
            index = got if isinstance(got, int) and got >= 0 else None
        found.append((d.model_copy(update={"bus": bus}), index))
    ranked = sorted(i for _, i in found if i is not None)
    out = [
        d.model_copy(update={"boot_order": ranked.index(i) + 1 if i is not None else None}) for d, i in found
    ]
    return {
        "cpus": cpus,
        "memory_mib": memory_mib,
        "firmware": firmware,
        "nics": nics_of(c.execute("human-monitor-command", **{"command-line": "info network"})),
        "disks": _boot_order_default(out),
    }


def nics_of(info_network: str) -> list[NicInfo]:
    """NICs from HMP `info network`: MAC, model, and the network as `<type>:<netdev id>` (a bridge's
    name for a bridge or a tap on one, when QEMU says it)."""
    nics: list[NicInfo] = []
    for line in info_network.splitlines():
        m = _NIC.match(line.strip())
        if m:
            model = m.group("model")
            nics.append(NicInfo(mac=m.group("mac"), model=_NIC_MODEL.get(model, model)))
            continue
        p = _PEER.match(line)
        if p and nics and not nics[-1].network:
            rest = dict(kv.split("=", 1) for kv in (p.group("rest") or "").split(",") if "=" in kv)
            where = rest.get("br") or rest.get("ifname") or p.group("netdev").strip()
            nics[-1] = nics[-1].model_copy(update={"network": f"{p.group('type')}:{where}"})
    return nics


def libvirt_hardware(xml: str, disks: list[DiskInfo]) -> dict[str, Any]:
    """The same, from a libvirt domain's XML (`virDomainGetXMLDesc`)."""
    root = ET.fromstring(xml)
    cpus = int(root.findtext("vcpu") or 0)
    mem = root.find("memory")
    unit = (mem.get("unit") if mem is not None else None) or "KiB"
    memory_mib = (int(mem.text or 0) * _UNIT[unit]) >> 20 if mem is not None else 0
    os_el = root.find("os")
    firmware = "bios"
    if os_el is not None and (
        os_el.get("firmware") == "efi" or os_el.find("loader[@type='pflash']") is not None
    ):
        firmware = "uefi"
    by_target = {}
    os_boot = [b.get("dev") for b in (os_el.findall("boot") if os_el is not None else [])]
    for disk in root.findall("devices/disk[@device='disk']"):
        t = disk.find("target")
        if t is None:
            continue
        boot = disk.find("boot")
        order = int(boot.get("order", 0)) if boot is not None else None
        by_target[t.get("dev")] = (t.get("bus") or "", order)
    out = []
    for d in disks:
        bus, order = by_target.get(d.key, ("", None))
        out.append(d.model_copy(update={"bus": bus, "boot_order": order}))
    if not any(d.boot_order for d in out) and "hd" in os_boot:
        out = _boot_order_default(out)
    nics = []
    for iface in root.findall("devices/interface"):
        mac = iface.find("mac")
        src = iface.find("source")
        model = iface.find("model")
        net = ""
        if src is not None:
            name = src.get("network") or src.get("bridge") or src.get("dev") or ""
            net = f"{iface.get('type', '')}:{name}"
        nics.append(
            NicInfo(
                mac=mac.get("address", "") if mac is not None else "",
                network=net,
                model=model.get("type", "") if model is not None else "",
            )
        )
    return {"cpus": cpus, "memory_mib": memory_mib, "firmware": firmware, "nics": nics, "disks": out}


_UNIT = {
    "b": 1,
    "bytes": 1,
    "KiB": 1 << 10,
    "k": 1 << 10,
    "MiB": 1 << 20,
    "M": 1 << 20,
    "GiB": 1 << 30,
    "G": 1 << 30,
}


def with_hardware(vm: VmInfo, hw: dict[str, Any]) -> VmInfo:
    return vm.model_copy(update=hw)


def _boot_order_default(disks: list[DiskInfo]) -> list[DiskInfo]:
    """No disk says where it boots: the first disk boots (QEMU's and libvirt's default)."""
    if any(d.boot_order for d in disks) or not disks:
        return disks
    return [disks[0].model_copy(update={"boot_order": 1}), *disks[1:]]


def _qom(c: QmpClient, path: str, prop: str) -> Any:
    try:
        return c.execute("qom-get", path=path, property=prop)
    except QmpError:
        return None


def _has_pflash(c: QmpClient) -> bool:
    """UEFI firmware lives on pflash (OVMF's code and vars); SeaBIOS does not use it."""
    for prop in ("pflash0", "pflash1"):
        if _qom(c, "/machine", prop):
            return True
    return any(str(dev.get("device", "")).startswith("pflash") for dev in c.execute("query-block"))
