"""The KVM source VM's power (connectors/kvm/power.py), default tier: a stopped VM's images (their QEMU
image locks decide stopped or running) and a real QEMU over QMP (the lab VM, no guest: its vCPUs'
state is QEMU's run state). The guest-writes-stop proofs with a real guest, and libvirt, are in
test_kvm_power_guest.py (slow tier)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_kvm import MiB, all_bitmap_names, make_qcow2

from connectors.kvm.power import DisksPower, QmpPower
from connectors.kvm.spec import KvmSource
from connectors.memory.spec import MemoryTarget
from labs.kvm.vm import LabVm
from sendense.errors import ResourceUnavailable, VmNotStartable
from sendense.models import JobSpec
from sendense.platforms import source_power_for
from sendense.protocols import SourcePower
from tools.qemu import qemu_nbd
from tools.qmp import QmpClient


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sdp-", dir="/tmp"))  # unix socket paths: < 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def power_for(source: KvmSource, work: Path) -> SourcePower:
    return source_power_for(JobSpec(name="j", source=source, target=MemoryTarget(platform="memory")), work)


def status(vm: LabVm) -> str:
    with QmpClient(vm.qmp_path) as c:
        return str(c.execute("query-status")["status"])


def one_line(text: str) -> str:
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------- stopped VM


def test_a_stopped_vms_disks_are_stopped_until_a_process_writes_them(tmp_path: Path, short_dir: Path) -> None:
    disks = [make_qcow2(tmp_path / f"d{i}.qcow2", 4 * MiB) for i in range(2)]
    p = power_for(KvmSource(platform="kvm", disks=disks), tmp_path / "work")
    assert isinstance(p, DisksPower) and not p.can_power_on and not p.pause_stops
    assert p.power_state() == "stopped"
    p.pause_vm()  # nothing writes them: nothing to do, no error, twice
    p.pause_vm()
    p.resume_vm()
    p.power_off_vm()
    p.power_off_vm()
    with pytest.raises(VmNotStartable) as e:
        p.power_on_vm()
    assert "the disks are current" in one_line(e.value.message) and "operator's" in e.value.message
    assert e.value.kind == "VmNotStartable" and not e.value.retryable

    with qemu_nbd(disks[0], readonly=True):  # a sync reading the images (qemu-nbd --read-only)
        assert p.power_state() == "stopped"

    vm = LabVm(short_dir / "vm", [4 * MiB, 4 * MiB])
    vm.dir.mkdir()  # a VM started by hand on copies of the images writes them
    for i, d in enumerate(disks):
        shutil.copy(d, vm.disk_path(i))
    q = power_for(KvmSource(platform="kvm", disks=[vm.disk_path(0), vm.disk_path(1)]), tmp_path / "w2")
    with vm.start():
        assert q.power_state() == "running"
        for verb in (q.pause_vm, q.power_off_vm):
            with pytest.raises(ResourceUnavailable) as u:
                verb()
            assert "in use by a running process" in one_line(u.value.message) and not u.value.retryable
    assert q.power_state() == "stopped"

    disks[1].unlink()
    assert p.power_state() == "gone"
    p.pause_vm()
    p.power_off_vm()


# ------------------------------------------------------------------------------------- QMP


def test_qmp_pause_resume_and_power_off_of_a_real_qemu_each_idempotent(
    short_dir: Path, tmp_path: Path
) -> None:
    vm = LabVm(short_dir / "vm", [4 * MiB]).start()  # started with -S: never run (prelaunch)
    try:
        p = power_for(KvmSource(platform="kvm", qmp=vm.qmp_path), tmp_path / "work")
        assert isinstance(p, QmpPower) and not p.can_power_on
        assert p.power_state() == "paused" and status(vm) == "prelaunch"
        p.resume_vm()
        assert p.power_state() == "running" and status(vm) == "running"
        p.resume_vm()  # running already
        assert status(vm) == "running"

        t0 = time.monotonic()
        p.pause_vm()
        print(f"qmp pause_vm (stop): {time.monotonic() - t0:.3f} s")
        assert p.power_state() == "paused" and status(vm) == "paused"
        p.pause_vm()
        assert status(vm) == "paused"
        t0 = time.monotonic()
        p.resume_vm()
        print(f"qmp resume_vm (cont): {time.monotonic() - t0:.3f} s")
        assert status(vm) == "running"
        p.pause_vm()

        with pytest.raises(VmNotStartable) as e:
            p.power_on_vm()
        assert str(vm.qmp_path) in one_line(e.value.message) and "operator's" in e.value.message

        with QmpClient(vm.qmp_path) as c:  # a persistent bitmap, as a job's checkpoint is
            c.execute("block-dirty-bitmap-add", node="disk0", name="kept", persistent=True)
        pid = vm.proc.pid if vm.proc else None
        t0 = time.monotonic()
        p.power_off_vm()
        print(f"qmp power_off_vm (quit, process exit): {time.monotonic() - t0:.3f} s")
        assert vm.proc is not None and vm.proc.poll() is not None, f"QEMU {pid} still runs"
        assert "kept" in all_bitmap_names(vm.disk_path(0))  # quit stored it: a clean exit for QEMU
        assert p.power_state() == "stopped"
        p.power_off_vm()  # off already
        p.pause_vm()
        p.resume_vm()
        assert p.power_state() == "stopped"
    finally:
        vm.kill()


def test_qmp_power_state_is_unreachable_while_the_monitor_does_not_answer(
    short_dir: Path, tmp_path: Path
) -> None:
    vm = LabVm(short_dir / "vm", [4 * MiB]).start()
    try:
        p = QmpPower(vm.qmp_path, tmp_path / "work")
        p.state_seconds = 0.5
        with QmpClient(vm.qmp_path):  # a monitor serves one client at a time: this one holds it
            assert p.power_state() == "unreachable"
        assert p.power_state() == "paused"
    finally:
        vm.kill()
    assert p.power_state() == "stopped"  # the socket is there, nothing listens
    (short_dir / "vm" / "qmp.sock").unlink(missing_ok=True)
    assert p.power_state() == "stopped"  # no socket and no record of its images
