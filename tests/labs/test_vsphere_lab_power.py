"""The vSphere lab's VMs really run (labs/vsphere/overlay/simulator/lab_power.go), through pyvmomi only:
PowerOnVM_Task boots QEMU (TCG) on the VM's disk chain, the serial port's datastore file shows the
bootable guest's console, the VMware Tools stand-in goes green on its ready marker, a snapshot of a running
VM switches QEMU to the new delta live (the frozen chain's bytes never change again, CBT lists what the
guest wrote), power off kills QEMU, Destroy of a running VM faults. Slow-ish: each boot is a real Linux
boot under TCG (~5-20 s here)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim  # installed by scripts/install.sh (the vsphere extra): missing fails here

from labs.vsphere import VsphereLab

# qemu-system-x86_64 and go are installed by scripts/install.sh: a missing one fails these tests

READY = "SENDENSE-GUEST-READY"
BOOT_TIMEOUT = 120.0
GUEST_DISK = 256 << 20
BLOCK = 64 << 10


@pytest.fixture(scope="module")
def lab() -> Any:
    with VsphereLab(vms=1) as lab:
        yield lab


def _guest_vm(lab: VsphereLab, name: str, mode: str | None = None, extra: list[int] | None = None) -> str:
    vm = lab.make_vm(name, [GUEST_DISK, *(extra or [])])
    lab.write_guest(vm, mode=mode)
    lab.add_serial_file(vm, f"[LocalDS_0] {name}/serial.log")
    return vm


def _console(lab: VsphereLab, name: str) -> str:
    try:
        return lab.datastore_file(f"[LocalDS_0] {name}/serial.log").decode(errors="replace")
    except OSError:
        return ""


def _wait_console(lab: VsphereLab, name: str, text: str, timeout: float = BOOT_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = _console(lab, name)
        if text in out:
            return out
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not on {name}'s console in {timeout} s: {_console(lab, name)[-800:]}")


def _tools(v: Any) -> tuple[str, str]:
    return str(v.guest.toolsRunningStatus), str(v.guestHeartbeatStatus)


def _wait_tools(v: Any, want: tuple[str, str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _tools(v) != want:
        assert time.monotonic() < deadline, f"tools {_tools(v)}, want {want}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


RUNNING = ("guestToolsRunning", "green")
NOT_RUNNING = ("guestToolsNotRunning", "gray")


def test_power_on_boots_the_guest_tools_follow_the_console_power_off_kills_qemu(lab: VsphereLab) -> None:
    vm = _guest_vm(lab, "boot1")
    v = lab.vm(vm)
    assert v.runtime.powerState == "poweredOff"
    assert lab.qemu_pids(vm) == []
    assert _tools(v)[0] == "guestToolsNotRunning"
    t0 = time.monotonic()
    lab.wait(v.PowerOnVM_Task())
    assert v.runtime.powerState == "poweredOn"
    pids = lab.qemu_pids(vm)
    assert len(pids) == 1, pids
    cmdline = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")
    assert b"-m" in cmdline and cmdline[cmdline.index(b"-m") + 1] == b"256"
    # heartbeat green only once the console has the marker (the console is read after the status)
    seen_green_before_marker = False
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        status = _tools(v)
        console = _console(lab, "boot1")
        if status == RUNNING and READY not in console:
            seen_green_before_marker = True
        if READY in console:
            break
        assert time.monotonic() < deadline, f"no {READY} in {BOOT_TIMEOUT} s: {console[-800:]}"
        time.sleep(0.2)
    boot_s = time.monotonic() - t0
    assert not seen_green_before_marker
    assert "SENDENSE-GUEST-BOOTED mode=boot" in console
    _wait_tools(v, RUNNING)
    assert v.summary.quickStats.guestHeartbeatStatus == "green"
    print(f"boot to {READY}: {boot_s:.1f} s")

    # suspend pauses (tools gray), power on resumes the same QEMU (tools green again, no new boot)
    lab.wait(v.SuspendVM_Task())
    assert v.runtime.powerState == "suspended"
    assert lab.qemu_pids(vm) == pids
    assert _alive(pids[0])
    _wait_tools(v, NOT_RUNNING, 1)
    lab.wait(v.PowerOnVM_Task())
    assert v.runtime.powerState == "poweredOn"
    assert lab.qemu_pids(vm) == pids
    _wait_tools(v, RUNNING)
    assert _console(lab, "boot1").count("SENDENSE-GUEST-BOOTED") == 1

    # reset: the same QEMU boots again; tools gray until the new boot's marker
    lab.wait(v.ResetVM_Task())
    assert v.runtime.powerState == "poweredOn"
    assert lab.qemu_pids(vm) == pids
    assert _tools(v) == NOT_RUNNING
    deadline = time.monotonic() + BOOT_TIMEOUT
    while _console(lab, "boot1").count(READY) < 2:
        assert _tools(v) != RUNNING or _console(lab, "boot1").count(READY) >= 2
        assert time.monotonic() < deadline
        time.sleep(0.2)
    _wait_tools(v, RUNNING)

    # Destroy of a running VM faults as on vSphere, the VM stays
    with pytest.raises(vim.fault.InvalidPowerState):
        lab.wait(v.Destroy_Task())
    assert v.runtime.powerState == "poweredOn" and lab.qemu_pids(vm) == pids

    lab.wait(v.PowerOffVM_Task())
    assert v.runtime.powerState == "poweredOff"
    assert lab.qemu_pids(vm) == []
    assert not _alive(pids[0])
    assert _tools(v) == NOT_RUNNING
    lab.wait(v.Destroy_Task())


def _raw(path: str, out: Path) -> bytes:
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", "vmdk", "-O", "raw", path, str(out)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


def _alone_map(path: str) -> list[tuple[int, int]]:
    import json

    spec = json.dumps({"driver": "vmdk", "backing": None, "file": {"driver": "file", "filename": path}})
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", f"json:{spec}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [(e["start"], e["length"]) for e in json.loads(out) if e["present"]]


def _changed(lab: VsphereLab, v: Any, snap: Any, key: int, change_id: str) -> list[tuple[int, int]]:
    got, start = [], 0
    while start < GUEST_DISK:
        r = v.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=start, changeId=change_id)
        got += [(a.start, a.length) for a in r.changedArea]
        start = r.startOffset + r.length
    return got


def _assert_consolidated(lab: VsphereLab, vm: str, v: Any, folder: Path, running: bool = False) -> None:
    """Per disk the base and one fresh delta on it (empty unless the guest runs), nothing else on the
    datastore."""
    left = set()
    for d in v.config.hardware.device:
        if isinstance(d, vim.vm.device.VirtualDisk):
            top = d.backing
            assert top.parent is not None and top.parent.parent is None
            assert running or _alone_map(lab.disk_info(vm, top.fileName)["path"]) == []
            left |= {top.fileName.split("/")[-1], top.parent.fileName.split("/")[-1]}
    assert sorted(p.name for p in folder.glob("*.vmdk")) == sorted(left)


def _snap_disk(snap: Any) -> Any:
    cfg = snap.config
    return next(d for d in cfg.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))


def test_snapshot_of_a_running_vm_freezes_its_bytes_and_tracks_the_guests_writes(
    lab: VsphereLab, tmp_path: Path
) -> None:
    vm = _guest_vm(lab, "work1", mode="workload", extra=[16 << 20])  # two disks: one QMP transaction
    v = lab.vm(vm)
    lab.wait(v.PowerOnVM_Task())
    _wait_console(lab, "work1", "SENDENSE-GUEST-SEQ")  # the guest writes now
    s1 = lab.wait(v.CreateSnapshot_Task(name="s1", memory=False, quiesce=False))
    d1 = _snap_disk(s1)
    key, s1_file, s1_change = d1.key, d1.backing.fileName, d1.backing.changeId
    s1_path = lab.disk_info(vm, s1_file, s1._moId)["path"]
    current = lab.first_disk(vm).backing.fileName
    assert current != s1_file and current.endswith("-000001.vmdk")
    assert lab.disk_info(vm, current)["writable"] is False
    second = [
        d for d in s1.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk) and d.key != key
    ][0]
    now_second = next(d for d in v.config.hardware.device if d.key == second.key)
    assert now_second.backing.parent.fileName == second.backing.fileName
    second_mtime = os.stat(lab.disk_info(vm, second.backing.fileName, s1._moId)["path"]).st_mtime_ns
    before = _raw(s1_path, tmp_path / "s1-before.raw")
    seq_at_s1 = _console(lab, "work1").count("SENDENSE-GUEST-SEQ")
    mtime = os.stat(s1_path).st_mtime_ns
    deadline = time.monotonic() + 60
    while _console(lab, "work1").count("SENDENSE-GUEST-SEQ") < seq_at_s1 + 3:
        assert time.monotonic() < deadline, "the guest stopped writing after the snapshot"
        time.sleep(0.5)
    # the frozen file is never written again, the chain's bytes are the same
    assert os.stat(s1_path).st_mtime_ns == mtime
    assert os.stat(lab.disk_info(vm, second.backing.fileName, s1._moId)["path"]).st_mtime_ns == second_mtime
    assert _raw(s1_path, tmp_path / "s1-after.raw") == before
    running = lab.disk_info(vm, current)["path"]
    assert _alone_map(running), "the guest's writes are not in the running delta"

    s2 = lab.wait(v.CreateSnapshot_Task(name="s2", memory=False, quiesce=False))
    d2 = _snap_disk(s2)
    s2_path = lab.disk_info(vm, d2.backing.fileName, s2._moId)["path"]
    assert d2.backing.fileName == current
    after = _raw(s2_path, tmp_path / "s2.raw")
    changed = _changed(lab, v, s2, key, s1_change)
    assert changed, "CBT lists nothing the guest wrote"
    # every block whose bytes differ between s1 and s2 is in the changed areas
    inside = set()
    for start, length in changed:
        inside.update(range(start // BLOCK, (start + length + BLOCK - 1) // BLOCK))
    differing = {
        i // BLOCK for i in range(0, GUEST_DISK, BLOCK) if before[i : i + BLOCK] != after[i : i + BLOCK]
    }
    assert differing, "the guest wrote nothing between s1 and s2"
    assert differing <= inside, sorted(differing - inside)[:10]
    # and they are the frozen delta's own grains (what QEMU wrote between the snapshots)
    assert {b for s, n in _alone_map(s2_path) for b in range(s // BLOCK, (s + n) // BLOCK)} == inside

    # no I/O error in the guest after the live switches, and it goes on writing
    text = _console(lab, "work1")
    assert "I/O error" not in text and "EXT4-fs error" not in text, text[-800:]

    # removal while running: the running delta is merged live (QMP block-commit into the base), the VM goes
    # on a fresh delta, the open epoch is carried
    lab.wait(v.RemoveAllSnapshots_Task())
    assert v.snapshot is None
    assert not v.runtime.consolidationNeeded
    _assert_consolidated(lab, vm, v, Path(s1_path).parent, running=True)
    seq = _console(lab, "work1").count("SENDENSE-GUEST-SEQ")
    deadline = time.monotonic() + 60
    while _console(lab, "work1").count("SENDENSE-GUEST-SEQ") < seq + 2:
        assert time.monotonic() < deadline, "the guest stopped writing after the live consolidation"
        time.sleep(0.5)
    s3 = lab.wait(v.CreateSnapshot_Task(name="s3", memory=False, quiesce=False))
    d3 = _snap_disk(s3)
    s3_path = lab.disk_info(vm, d3.backing.fileName, s3._moId)["path"]
    latest = _raw(s3_path, tmp_path / "s3.raw")
    changed3 = _changed(lab, v, s3, key, d2.backing.changeId)
    inside3 = {b for s, n in changed3 for b in range(s // BLOCK, (s + n + BLOCK - 1) // BLOCK)}
    differing3 = {
        i // BLOCK for i in range(0, GUEST_DISK, BLOCK) if after[i : i + BLOCK] != latest[i : i + BLOCK]
    }
    assert differing3 and differing3 <= inside3, sorted(differing3 - inside3)[:10]
    text = _console(lab, "work1")
    assert "I/O error" not in text and "EXT4-fs error" not in text, text[-800:]

    # a removal that needs a file QEMU only reads merged (the older snapshot) is left for power-off
    s4 = lab.wait(v.CreateSnapshot_Task(name="s4", memory=False, quiesce=False))
    lab.wait(s3.RemoveSnapshot_Task(removeChildren=False))
    assert v.runtime.consolidationNeeded is True
    assert [s.name for s in v.snapshot.rootSnapshotList] == ["s4"]
    s4_disk = _snap_disk(s4)
    assert s4_disk.backing.parent.fileName == d3.backing.fileName  # s3's frozen file still under s4's
    s4_file = s4_disk.backing.fileName
    s4_bytes = _raw(lab.disk_info(vm, s4_file, s4._moId)["path"], tmp_path / "s4.raw")
    lab.wait(v.PowerOffVM_Task())
    assert lab.qemu_pids(vm) == []
    assert v.runtime.consolidationNeeded is False
    # power-off merged s4's and s3's files into the base (s4 now names it), s4's bytes the same
    s4_disk = _snap_disk(s4)
    assert s4_disk.backing.parent is None
    assert (
        _raw(lab.disk_info(vm, s4_disk.backing.fileName, s4._moId)["path"], tmp_path / "s4b.raw") == s4_bytes
    )
    lab.wait(v.RemoveAllSnapshots_Task())
    _assert_consolidated(lab, vm, v, Path(s1_path).parent)
    subprocess.run(
        ["qemu-img", "check", lab.disk_info(vm, lab.first_disk(vm).backing.fileName)["path"]],
        check=True,
        capture_output=True,
    )
    lab.wait(v.Destroy_Task())


def test_revert_of_a_running_vm_powers_it_off(lab: VsphereLab) -> None:
    vm = lab.make_vm("rev1", [16 << 20])
    v = lab.vm(vm)
    lab.wait(v.PowerOnVM_Task())
    s1 = lab.wait(v.CreateSnapshot_Task(name="s1", memory=False, quiesce=False))
    assert len(lab.qemu_pids(vm)) == 1
    lab.wait(s1.RevertToSnapshot_Task())
    assert v.runtime.powerState == "poweredOff"
    assert lab.qemu_pids(vm) == []
    lab.wait(v.Destroy_Task())


def test_power_on_fails_when_qemu_cannot_start(lab: VsphereLab) -> None:
    vm = lab.make_vm("broken1", [16 << 20])
    v = lab.vm(vm)
    path = lab.disk_info(vm, lab.first_disk(vm).backing.fileName)["path"]
    Path(path).unlink()
    with pytest.raises(vim.fault.GenericVmConfigFault):
        lab.wait(v.PowerOnVM_Task())
    assert v.runtime.powerState == "poweredOff"
    assert lab.qemu_pids(vm) == []


def test_qemu_dies_with_the_lab() -> None:
    with VsphereLab(vms=1) as lab:
        vm = lab.make_vm("die1", [16 << 20])
        lab.wait(lab.vm(vm).PowerOnVM_Task())
        pids = lab.qemu_pids(vm)
        assert len(pids) == 1
        os.kill(lab.pid(), signal.SIGKILL)
        deadline = time.monotonic() + 10
        try:
            while _alive(pids[0]):
                assert time.monotonic() < deadline, "QEMU outlived vcsim-lab"
                time.sleep(0.1)
        finally:  # a QEMU that outlived it (a planted bug) is ended here, not left to run
            if _alive(pids[0]):
                os.kill(pids[0], signal.SIGKILL)


def test_qemu_follows_cpus_memory_firmware_and_disk_order(lab: VsphereLab) -> None:
    vm = lab.make_vm("efi1", [16 << 20, 8 << 20])
    v = lab.vm(vm)
    lab.wait(v.ReconfigVM_Task(spec=vim.vm.ConfigSpec(numCPUs=2, memoryMB=128, firmware="efi")))
    lab.wait(v.PowerOnVM_Task())
    try:
        (pid,) = lab.qemu_pids(vm)
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        assert argv[argv.index("-smp") + 1] == "2" and argv[argv.index("-m") + 1] == "128"
        assert any("OVMF_CODE_4M.fd" in a for a in argv)
        drives = [a for a in argv if a.startswith("if=none,id=disk")]
        files = [lab.disk_info(vm, d.backing.fileName)["path"] for d in _disks(v)]
        assert [d.split("file=", 1)[1] for d in drives] == files
        assert "-netdev" not in argv and "-net" not in argv and "-nic" not in argv
    finally:
        lab.wait(v.PowerOffVM_Task())
    lab.wait(v.Destroy_Task())


def _disks(v: Any) -> list[Any]:
    disks = [d for d in v.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    return sorted(disks, key=lambda d: (d.controllerKey, d.unitNumber))
