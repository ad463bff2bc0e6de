"""The lab's KVM hosts: each its own private libvirtd (labs/kvm/libvirtd.py, root), as a CloudStack KVM
host runs its own. A VM runs as a transient libvirt domain (as CloudStack's KVM agent starts them)
named by its `instancename`, with the VM's uuid, on its volumes' qcow2 files (virtio disk vd<a+N> for
deviceid N), a virtio NIC with the MAC of each CloudStack NIC (QEMU user networking: the lab has no
real guest networks, and the bootable guest configures none), a guest-agent channel, and its serial
console written to DIR/h<N>/console/<instancename>.log (host N of the lab's list).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from contextlib import suppress
from pathlib import Path
from typing import Any

from labs.kvm.libvirtd import disk_target

log = logging.getLogger(__name__)


class HostError(Exception):
    """The host's libvirtd could not do what was asked (the message names the host and the domain)."""


class LabHost:
    def __init__(self, host_id: str, name: str, base: Path, cpus: int, memory_mib: int) -> None:
        self.id, self.name, self.base = host_id, name, base
        self.cpus, self.memory_mib = cpus, memory_mib
        self.libvirtd: Any = None
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self.libvirtd is not None

    def start(self, cache_dir: Path | None) -> None:
        from labs.kvm.libvirtd import start_libvirtd

        (self.base / "console").mkdir(parents=True, exist_ok=True)
        # the libvirt host UUID is the CloudStack host's id: two lab hosts on one machine are two hosts to
        # libvirt, so a domain can live-migrate between them
        self.libvirtd = start_libvirtd(self.base / "lv", cache_dir=cache_dir, host_uuid=self.id)

    def stop(self) -> None:
        if self.libvirtd is not None:
            self.libvirtd.stop()
            self.libvirtd = None

    def console(self, instancename: str) -> Path:
        return self.base / "console" / f"{instancename}.log"

    def _conn(self) -> Any:
        if self.libvirtd is None:
            raise HostError(f"host {self.name} is not connected (its libvirtd is not running)")
        return self.libvirtd.connect()

    def domain_xml(
        self,
        name: str,
        vm_id: str,
        cpus: int,
        memory_mib: int,
        disks: list[tuple[int, Path]],
        macs: list[str],
    ) -> str:
        """The domain: disk `deviceid` N is virtio target vd<a+N> (deviceid 0, the ROOT, boots)."""
        dom = ET.Element("domain", type="qemu")
        ET.SubElement(dom, "name").text = name
        ET.SubElement(dom, "uuid").text = vm_id
        ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
        ET.SubElement(dom, "vcpu").text = str(cpus)
        os_el = ET.SubElement(dom, "os")
        ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
        ET.SubElement(os_el, "boot", dev="hd")
        ET.SubElement(ET.SubElement(dom, "features"), "acpi")
        for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
            ET.SubElement(dom, event).text = action
        devs = ET.SubElement(dom, "devices")
        ET.SubElement(devs, "emulator").text = (
            shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
        )
        for deviceid, path in sorted(disks):
            devs.append(ET.fromstring(disk_xml(deviceid, path)))
        for mac in macs:
            nic = ET.SubElement(devs, "interface", type="user")
            ET.SubElement(nic, "mac", address=mac)
            ET.SubElement(nic, "model", type="virtio")
        serial = ET.SubElement(devs, "serial", type="file")
        ET.SubElement(serial, "source", path=str(self.console(name)), append="off")
        ET.SubElement(serial, "target", port="0")
        chan = ET.SubElement(devs, "channel", type="unix")
        ET.SubElement(chan, "source", mode="bind")  # libvirt names the socket and connects to it
        ET.SubElement(chan, "target", type="virtio", name="org.qemu.guest_agent.0")
        ET.SubElement(ET.SubElement(devs, "video"), "model", type="none")
        ET.SubElement(devs, "memballoon", model="none")
        return ET.tostring(dom, encoding="unicode")

    def start_domain(self, xml: str, name: str) -> None:
        conn = self._conn()
        try:
            conn.createXML(xml, 0)
        except Exception as e:  # libvirt.libvirtError
            raise HostError(f"host {self.name}: cannot start {name}: {e}") from e
        finally:
            conn.close()

    def running(self, name: str) -> bool:
        if self.libvirtd is None:
            return False
        conn = self._conn()
        try:
            return bool(conn.lookupByName(name).isActive())
        except Exception:  # no such domain
            return False
        finally:
            conn.close()

    def domains(self) -> list[str]:
        if self.libvirtd is None:
            return []
        conn = self._conn()
        try:
            return sorted(d.name() for d in conn.listAllDomains(0) if d.isActive())
        finally:
            conn.close()

    def stop_domain(self, name: str, forced: bool, timeout: float) -> None:
        """ACPI shutdown, waiting up to `timeout` for the guest, then destroy (at once when forced)."""
        conn = self._conn()
        try:
            try:
                dom = conn.lookupByName(name)
            except Exception:
                return  # already gone
            if not forced:
                with suppress(Exception):
                    dom.shutdown()
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    with suppress(Exception):
                        if not dom.isActive():
                            return
                    time.sleep(0.1)
            with suppress(Exception):
                dom.destroy()
        finally:
            conn.close()

    def migrate_to(self, name: str, dest: LabHost) -> None:
        """Live-migrate the running domain to `dest`'s libvirtd (QEMU's migration stream over loopback,
        the disks shared: the same files); its console continues in `dest`'s console directory."""
        import libvirt

        conn, dconn = self._conn(), dest._conn()
        try:
            dom = conn.lookupByName(name)
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
            dest_xml = xml.replace(str(self.console(name)), str(dest.console(name)))
            params = {
                libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://127.0.0.1:{_free_port()}",
                libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1",
                libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml,
            }
            # UNSAFE: the disks are not cache=none (the lab's directories may not take O_DIRECT); both
            # sides see the same files on one machine, so nothing is cached apart
            dom.migrate3(dconn, params, libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_UNSAFE)
        except libvirt.libvirtError as e:
            raise HostError(f"host {self.name}: cannot migrate {name} to {dest.name}: {e}") from e
        finally:
            dconn.close()
            conn.close()

    def attach_disk(self, name: str, deviceid: int, path: Path) -> None:
        self._device(name, "attach", deviceid, path)

    def detach_disk(self, name: str, deviceid: int, path: Path, timeout: float = 10) -> None:
        """Hot-unplug (the guest acknowledges it); waits until the disk is gone from the live domain."""
        self._device(name, "detach", deviceid, path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conn = self._conn()
            try:
                live = conn.lookupByName(name).XMLDesc(0)
            finally:
                conn.close()
            if str(path) not in live:
                return
            time.sleep(0.1)
        raise HostError(f"host {self.name}: {name} did not release its disk {deviceid} in {timeout:.0f} s")

    def _device(self, name: str, verb: str, deviceid: int, path: Path) -> None:
        conn = self._conn()
        try:
            dom = conn.lookupByName(name)
            xml = disk_xml(deviceid, path)
            if verb == "attach":
                dom.attachDeviceFlags(xml, 1)  # VIR_DOMAIN_AFFECT_LIVE
            else:
                dom.detachDeviceFlags(xml, 1)
        except Exception as e:
            raise HostError(f"host {self.name}: cannot {verb} disk {deviceid} of {name}: {e}") from e
        finally:
            conn.close()

    def resize_disk(self, name: str, index: int, size: int) -> None:
        conn = self._conn()
        try:
            dom = conn.lookupByName(name)
            dom.blockResize(disk_target(index), size, 1)  # VIR_DOMAIN_BLOCK_RESIZE_BYTES
        except Exception as e:
            raise HostError(f"host {self.name}: cannot resize {name}'s disk {index}: {e}") from e
        finally:
            conn.close()


def disk_xml(deviceid: int, path: Path) -> str:
    d = ET.Element("disk", type="file", device="disk")
    ET.SubElement(d, "driver", name="qemu", type="qcow2")
    ET.SubElement(d, "source", file=str(path))
    ET.SubElement(d, "target", dev=disk_target(deviceid), bus="virtio")
    return ET.tostring(d, encoding="unicode")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
