"""A VM from a recovery point as a libvirt domain (vm_state.Backend), for KVM targets whose spec names a
libvirt connection: libvirt owns the VM, so it outlives the agent, and a new agent finds it by name.

The domain is persistent, named `sendense-<job>-<vm>`, its uuid the VM record's, and it carries the
job, the point and the VM's state directory in its metadata: a domain of that name that is not this
VM's (another target's, or made by hand) is never started, stopped or undefined, only named in an
error. Its hardware follows the plan as a bare QEMU's does (`vm_qemu`): vCPUs, memory, BIOS or UEFI
(libvirt's firmware='efi' auto-selection, when the host has OVMF), the overlays on the plan's buses in
boot order, the serial console logged to the VM's console file (the boot check reads it), a guest
agent channel. Networks: a test VM has no interface at all (libvirt's user network cannot be
restricted, so it would reach out); a production VM's NICs are bridge interfaces on the mapped
bridges with the plan's MACs.

The overlays and the point files are plain files named by absolute path: the libvirt must run on the
host that holds the target directory (qemu:///system, or a remote URI naming this host).
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TypeAlias

import libvirt
import libvirt_qemu

from connectors.kvm import guest_agent
from connectors.kvm.libvirt_job import error_code, error_text, safe_uri
from connectors.kvm.vm_state import Disk, Nic, VmPaths, VmRecord
from sendense.errors import InvalidSpec, ResourceUnavailable, TargetError
from sendense.models import NicInfo
from tools.boot import accelerator

NS = "https://sendense.io/xmlns/vm/1"  # the domain's <metadata> element
PREFIXES = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}  # nvme: not in this libvirt's XML
NIC_MODELS = {"": "virtio", "virtio": "virtio", "e1000": "e1000", "e1000e": "e1000e",
              "rtl8139": "rtl8139", "vmxnet3": "vmxnet3"}  # fmt: skip
GONE = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)  # no such domain / not running
UNDEFINE = (
    libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
)

STATES = {libvirt.VIR_DOMAIN_NOSTATE: "no state", libvirt.VIR_DOMAIN_RUNNING: "running",
          libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_PAUSED: "paused",
          libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down", libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
          libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended"}  # fmt: skip

Domain: TypeAlias = libvirt.virDomain
ET.register_namespace("sendense", NS)


def target_dev(prefix: str, index: int) -> str:
    """vda, ..., vdz, vdaa, ... (sd*, hd* alike)."""
    letters, n = "", index + 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return prefix + letters


class LibvirtBackend:
    def __init__(self, uri: str, job: str, job_id: str, stop_timeout: float) -> None:
        self.uri, self.job, self.job_id = uri, job, job_id
        self.stop_timeout = stop_timeout  # shutdown, then destroy

    def domain_name(self, paths: VmPaths) -> str:
        return f"sendense-{self.job}-{paths.name}"

    # ------------------------------------------------------------------ connection

    @contextmanager
    def _conn(self) -> Iterator[libvirt.virConnect]:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors come as exceptions
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            where = safe_uri(self.uri)
            raise ResourceUnavailable(f"libvirt {where} is unreachable: {error_text(e)}") from None
        try:
            yield conn
        finally:
            with suppress(libvirt.libvirtError):
                conn.close()

    def _fail(self, paths: VmPaths, what: str, e: libvirt.libvirtError) -> TargetError:
        return TargetError(
            f"VM {paths.name}: libvirt domain {self.domain_name(paths)} on {safe_uri(self.uri)}: "
            f"{what} failed: {error_text(e)}"
        )

    def _lookup(self, conn: libvirt.virConnect, paths: VmPaths, mine: bool = False) -> Domain | None:
        """This VM's domain; None if there is none. A domain of its name that is not this VM's: None too
        (nothing of this VM to stop or remove), or a one-line error naming it when `mine` (to be made)."""
        name = self.domain_name(paths)
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if error_code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise self._fail(paths, "lookup", e) from None
        try:
            meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0))
            state = meta.get("state")
        except (libvirt.libvirtError, ET.ParseError):
            state = None
        if state != str(paths.state):
            if not mine:
                return None
            raise TargetError(
                f"VM {paths.name}: libvirt domain {name} on {safe_uri(self.uri)} is not this VM's "
                "(another target's, or made by hand); remove or rename it"
            )
        return dom

    # ------------------------------------------------------------------ Backend

    def check(self, paths: VmPaths, name: str, mode: str, nics: list[NicInfo], disks: list[Disk]) -> None:
        for d in disks:
            if d.bus not in PREFIXES:
                raise InvalidSpec(
                    f"VM {name}: disk {d.key}: bus {d.bus!r} is not offered for libvirt domains "
                    f"(one of {', '.join(PREFIXES)})"
                )
        with self._conn() as conn:
            self._lookup(conn, paths, mine=True)  # the name is free, or this VM's already

    def define(self, paths: VmPaths, record: VmRecord, disks: list[Disk], nics: list[Nic]) -> None:
        with self._conn() as conn:
            dom = self._lookup(conn, paths, mine=True)
            if dom is not None:
                if dom.UUIDString() != record.uuid:
                    raise TargetError(
                        f"VM {paths.name}: libvirt domain {self.domain_name(paths)} is left from an earlier "
                        f"VM of this name; destroy_vm {paths.name} first"
                    )
                return
            try:
                conn.defineXML(self.domain_xml(paths, record, disks, nics))
            except libvirt.libvirtError as e:
                raise self._fail(paths, "define", e) from None

    def running(self, paths: VmPaths, uuid: str | None) -> bool:
        with self._conn() as conn:
            dom = self._lookup(conn, paths)
            try:
                return dom is not None and bool(dom.isActive())
            except libvirt.libvirtError as e:
                if error_code(e) in GONE:
                    return False
                raise self._fail(paths, "state", e) from None

    def started_at(self, paths: VmPaths) -> float | None:
        try:
            return (paths.state / "power-on").stat().st_mtime
        except FileNotFoundError:
            return None

    def start(self, paths: VmPaths, record: VmRecord, disks: list[Disk], nics: list[Nic]) -> None:
        self.define(paths, record, disks, nics)  # undefined by hand since create_vm: defined again
        with self._conn() as conn:
            dom = self._lookup(conn, paths, mine=True)
            assert dom is not None
            if dom.isActive():
                return
            (paths.state / "power-on").touch()
            try:
                dom.create()
            except libvirt.libvirtError as e:
                raise self._fail(paths, "start", e) from None

    def stop(self, paths: VmPaths, uuid: str | None) -> None:
        """ACPI shutdown; destroy (hard) when it has not finished within `stop_timeout`."""
        with self._conn() as conn:
            dom = self._lookup(conn, paths)
            if dom is not None:
                self._stop(paths, dom, self.stop_timeout)
        (paths.state / "power-on").unlink(missing_ok=True)

    def _stop(self, paths: VmPaths, dom: libvirt.virDomain, timeout: float) -> None:
        try:
            if not dom.isActive():
                return
            if timeout > 0:
                with suppress(libvirt.libvirtError):
                    dom.shutdown()
                deadline = time.monotonic() + timeout
                while dom.isActive() and time.monotonic() < deadline:
                    time.sleep(0.2)
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as e:
            if error_code(e) not in GONE:
                raise self._fail(paths, "stop", e) from None

    def remove(self, paths: VmPaths, uuid: str | None) -> None:
        with self._conn() as conn:
            dom = self._lookup(conn, paths)
            if dom is None:
                return
            self._stop(paths, dom, 0)
            try:
                dom.undefineFlags(UNDEFINE)
            except libvirt.libvirtError as e:
                if error_code(e) not in GONE:
                    raise TargetError(
                        f"destroy of VM {paths.name}: could not undefine libvirt domain "
                        f"{self.domain_name(paths)} on {safe_uri(self.uri)}: {error_text(e)}"
                    ) from None

    def status(self, paths: VmPaths, uuid: str | None) -> str:
        """libvirt's state of the domain (running, paused, shut off, ...)."""
        with self._conn() as conn:
            dom = self._lookup(conn, paths)
            if dom is None:
                return "not defined (no libvirt domain)"
            try:
                state, reason = dom.state()
            except libvirt.libvirtError as e:
                return f"unknown (libvirt: {error_text(e)})"
            name = STATES.get(state, f"state {state}")
            return name if state == libvirt.VIR_DOMAIN_RUNNING else f"{name} (reason {reason})"

    def agent_sync(self, paths: VmPaths, timeout: float) -> bool:
        """`guest-sync` through libvirt, which holds the agent's socket (libvirt_qemu.qemuAgentCommand);
        tried again until `timeout` while libvirt says the agent is not connected yet."""
        deadline = time.monotonic() + timeout
        with self._conn() as conn:
            dom = self._lookup(conn, paths)
            while dom is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                ident = guest_agent.new_id()
                cmd = json.dumps({"execute": "guest-sync", "arguments": {"id": ident}})
                try:
                    out = libvirt_qemu.qemuAgentCommand(dom, cmd, max(1, min(5, int(left))), 0)
                    if guest_agent.answered(str(out).encode(), {ident}):
                        return True
                except libvirt.libvirtError:
                    pass  # not connected yet, or no answer within this try
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        return False

    # ------------------------------------------------------------------ XML

    def domain_xml(self, paths: VmPaths, record: VmRecord, disks: list[Disk], nics: list[Nic]) -> str:
        plan, kvm = record.plan, accelerator() == "kvm"
        dom = ET.Element("domain", type="kvm" if kvm else "qemu")
        ET.SubElement(dom, "name").text = self.domain_name(paths)
        ET.SubElement(dom, "uuid").text = record.uuid
        ET.SubElement(dom, "title").text = f"sendense {plan.mode} VM {plan.name} of job {self.job}"
        meta = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{NS}}}vm")
        for k, v in (("job", self.job), ("job_id", self.job_id), ("vm", plan.name),
                     ("point", plan.point_id), ("mode", plan.mode), ("state", str(paths.state))):  # fmt: skip
            meta.set(k, v)
        ET.SubElement(dom, "memory", unit="MiB").text = str(plan.memory_mib)
        ET.SubElement(dom, "vcpu").text = str(plan.cpus)
        os_el = ET.SubElement(dom, "os")
        if plan.firmware == "uefi":
            os_el.set("firmware", "efi")  # libvirt picks OVMF (create_vm checked the host has it)
        ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
        ET.SubElement(ET.SubElement(dom, "features"), "acpi")
        ET.SubElement(dom, "cpu", mode="host-passthrough" if kvm else "maximum")
        for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
            ET.SubElement(dom, event).text = action
        devs = ET.SubElement(dom, "devices")
        if any(d.bus == "scsi" for d in disks):
            ET.SubElement(devs, "controller", type="scsi", index="0", model="virtio-scsi")
        count: dict[str, int] = {}
        for d in sorted(disks, key=lambda d: d.boot):
            prefix = PREFIXES[d.bus]
            n = count[prefix] = count.get(prefix, -1) + 1
            el = ET.SubElement(devs, "disk", type="file", device="disk")
            ET.SubElement(el, "driver", name="qemu", type="qcow2")
            ET.SubElement(el, "source", file=str(d.overlay))
            ET.SubElement(el, "target", dev=target_dev(prefix, n), bus=d.bus)
            ET.SubElement(el, "boot", order=str(d.boot))
        if plan.mode == "production":
            for nic in nics:
                if nic.bridge is None:
                    continue  # mapped to the isolated network: no interface (nothing would isolate it)
                el = ET.SubElement(devs, "interface", type="bridge")
                ET.SubElement(el, "source", bridge=nic.bridge)
                ET.SubElement(el, "mac", address=nic.mac)
                ET.SubElement(el, "model", type=NIC_MODELS.get(_model(plan.nics, nic.mac), "virtio"))
        serial = ET.SubElement(devs, "serial", type="file")
        ET.SubElement(serial, "source", path=str(paths.console), append="off")
        ET.SubElement(serial, "target", port="0")
        chan = ET.SubElement(devs, "channel", type="unix")
        ET.SubElement(chan, "source", mode="bind")  # libvirt names the socket and connects to it
        ET.SubElement(chan, "target", type="virtio", name="org.qemu.guest_agent.0")
        ET.SubElement(ET.SubElement(devs, "video"), "model", type="none")
        ET.SubElement(devs, "memballoon", model="none")
        return ET.tostring(dom, encoding="unicode")


def _model(plan_nics: list[NicInfo], mac: str) -> str:
    return next((n.model for n in plan_nics if n.mac.lower() == mac), "")


__all__ = ["LibvirtBackend"]
