"""The KVM source VM's power with the bootable guest running its workload (files written and synced in a
loop, a sequence counter on the console), slow tier: a pause really stops the guest's writes (the disk
file and the console do not change while paused), a resume lets them go on, a power-off ends the QEMU
process and leaves a filesystem that passes e2fsck after journal replay; over QMP (a QEMU started by
hand) and as a libvirt domain on the lab libvirtd (which power-on starts again, and the guest boots
and counts on from where it was)."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
from helpers_kvm import file_digest

from connectors.kvm.power import QmpPower
from connectors.kvm.power_libvirt import LibvirtPower
from labs.guest.build import build
from labs.guest.fscheck import check
from labs.kvm.libvirtd import LabLibvirtd, start_libvirtd
from sendense.errors import ResourceNotFound
from tools.boot import GuestVm, overlay

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

SEQ = re.compile(r"SENDENSE-GUEST-SEQ (\d+)")
BOOTED = re.compile(r"SENDENSE-GUEST-BOOTED mode=workload seq=(\d+)")
QUIET = 2.0  # seconds watched while paused: the workload writes ~45 times a second under TCG


def last_seq(text: str) -> int:
    found = SEQ.findall(text)
    return int(found[-1]) if found else 0


def wait(cond: Callable[[], bool], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] not in "ZX"
    except FileNotFoundError:
        return False


def assert_pause_holds_writes(disk: Path, console: Callable[[], str], pause: Callable[[], None]) -> None:
    """Paused: neither the disk nor the console changes while the workload would have written."""
    pause()
    before, text = file_digest(disk), console()
    time.sleep(QUIET)
    assert file_digest(disk) == before, "the disk changed while the VM was paused"
    assert console() == text, "the guest printed while paused"


# ---------------------------------------------------------------------------------------------- QMP


def test_qmp_pause_stops_a_real_guests_writes_resume_goes_on_power_off_ends_qemu(tmp_path: Path) -> None:
    short = Path(tempfile.mkdtemp(prefix="sdpg-"))
    disk = overlay(build(), tmp_path / "vm.qcow2")
    try:
        with GuestVm(disk, tmp_path / "vm", mode="workload", qmp=short / "qmp.sock") as vm:
            assert vm.wait_for("SENDENSE-GUEST-SEQ 25", timeout=240).ok, vm.text()[-300:]
            p = QmpPower(short / "qmp.sock", tmp_path / "work")
            assert p.power_state() == "running"
            t0 = time.monotonic()
            assert_pause_holds_writes(disk, vm.text, p.pause_vm)
            log.warning("qmp pause_vm with a writing guest: %.3f s", time.monotonic() - t0 - QUIET)
            assert p.power_state() == "paused"
            p.pause_vm()

            paused_at, digest = last_seq(vm.text()), file_digest(disk)
            p.resume_vm()
            assert p.power_state() == "running"
            wait(lambda: last_seq(vm.text()) >= paused_at + 25, "the workload did not go on after resume")
            assert file_digest(disk) != digest

            t0 = time.monotonic()
            p.power_off_vm()
            log.warning("qmp power_off_vm (quit): %.3f s", time.monotonic() - t0)
            assert not vm.running() and p.power_state() == "stopped"
            p.power_off_vm()
        fs = check(disk)  # a power cut for the guest: consistent after journal replay
        assert fs.ok, fs.detail
        assert fs.seq is not None and fs.seq >= paused_at + 25
    finally:
        shutil.rmtree(short, ignore_errors=True)


# ------------------------------------------------------------------------------------------ libvirt


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LabLibvirtd]:
    cache = getattr(request.config, "cache", None)
    cache_dir = Path(cache.mkdir("sendense-libvirt-qemu-caps")) if cache is not None else None
    with start_libvirtd(tmp_path_factory.mktemp("lvpw"), cache_dir=cache_dir) as lab:
        yield lab


def guest_domain_xml(name: str, disk: Path, console: Path) -> str:
    """A persistent TCG domain booting the guest in its workload mode (fw_cfg, found through ACPI),
    serial to a file."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "256"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")  # the guest's kernel finds fw_cfg through ACPI
    sysinfo = ET.SubElement(dom, "sysinfo", type="fwcfg")
    ET.SubElement(sysinfo, "entry", name="opt/sendense/mode").text = "workload"
    for event in ("on_poweroff", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devs = ET.SubElement(dom, "devices")
    d = ET.SubElement(devs, "disk", type="file", device="disk")
    ET.SubElement(d, "driver", name="qemu", type="qcow2")
    ET.SubElement(d, "source", file=str(disk))
    ET.SubElement(d, "target", dev="vda", bus="virtio")
    serial = ET.SubElement(devs, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console), append="off")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devs, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


@pytest.mark.root
def test_libvirt_suspend_stops_a_real_guests_writes_destroy_ends_it_create_boots_it_again(
    lab: LabLibvirtd, tmp_path: Path
) -> None:
    name = f"pw-{uuid.uuid4().hex[:8]}"
    disk = overlay(build(), tmp_path / "vm.qcow2")
    console = tmp_path / "console.log"
    conn = lab.connect()
    dom = conn.defineXML(guest_domain_xml(name, disk, console))
    try:
        p = LibvirtPower(lab.uri, name, uuid=dom.UUIDString())
        assert p.can_power_on and not p.pause_stops
        assert p.power_state() == "stopped"  # defined, not started
        t0 = time.monotonic()
        p.power_on_vm()
        log.warning("libvirt power_on_vm (create): %.3f s", time.monotonic() - t0)
        assert p.power_state() == "running"

        def text() -> str:
            return console.read_text(errors="replace") if console.exists() else ""

        wait(lambda: last_seq(text()) >= 25, f"the guest's workload did not start: {text()[-300:]}")
        t0 = time.monotonic()
        assert_pause_holds_writes(disk, text, p.pause_vm)
        log.warning("libvirt pause_vm (suspend): %.3f s", time.monotonic() - t0 - QUIET)
        assert p.power_state() == "paused" and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        p.pause_vm()
        paused_at = last_seq(text())
        p.resume_vm()
        p.resume_vm()
        assert p.power_state() == "running"
        wait(lambda: last_seq(text()) >= paused_at + 25, "the workload did not go on after resume")

        pidfile = lab.base / "run" / "qemu" / f"{name}.pid"  # the domain's QEMU
        pid = int(pidfile.read_text().strip())
        assert pid_alive(pid)
        t0 = time.monotonic()
        p.power_off_vm()
        log.warning("libvirt power_off_vm (destroy): %.3f s", time.monotonic() - t0)
        assert p.power_state() == "stopped" and not pid_alive(pid) and not pidfile.exists()
        p.power_off_vm()
        p.pause_vm()  # off: nothing writes
        p.resume_vm()  # off, not paused: stays off
        assert p.power_state() == "stopped"
        fs = check(disk)
        assert fs.ok, fs.detail
        assert fs.seq is not None and fs.seq >= paused_at + 25

        p.power_on_vm()  # the failback's cutover: the original VM on its current disks
        p.power_on_vm()
        again = int(pidfile.read_text().strip())
        assert again != pid and pid_alive(again)
        wait(lambda: BOOTED.search(text()) is not None, f"the guest did not boot again: {text()[-300:]}")
        booted = BOOTED.search(text())
        assert booted is not None and int(booted.group(1)) == fs.seq  # it counts on from its disk
        p.power_off_vm()
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        conn.close()
    gone = LibvirtPower(lab.uri, name)
    assert gone.power_state() == "gone"
    gone.pause_vm()
    gone.power_off_vm()
    with pytest.raises(ResourceNotFound, match="is not defined"):
        gone.power_on_vm()
    dead = LibvirtPower(f"qemu+unix:///system?socket={tmp_path}/no-such-sock", name)
    assert dead.power_state() == "unreachable"
