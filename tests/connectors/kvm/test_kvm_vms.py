"""VMs from recovery points on a KVM target (KvmVms), with real QEMU and the bootable guest.

The guest's disk (a copy of the cached image, a stopped VM's qcow2) is replicated into a KVM target
point by the stopped-VM source; VMs are made from that point, booted to the guest's ready marker on
their serial console, and destroyed. Every test ends with no QEMU of its own left running (the
`no_vm_leaks` fixture kills and reports any: a daemonized VM would otherwise outlive the test run).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_kvm import MiB, file_digest, make_qcow2, qemu_io, same_content, sync_point
from helpers_vms import BOOT_TIMEOUT, JOB, READY, REPO, Site, assert_gone, make_site, plan, qemu_processes

from connectors.kvm import vm_qemu
from connectors.kvm.spec import KvmSource
from connectors.kvm.spec import KvmTarget as KvmTargetSpec
from connectors.kvm.vms import KvmVms
from sendense.models import JobSpec
from sendense.platforms import vms_for
from sendense.protocols import VmProvisioner

pytestmark = pytest.mark.usefixtures("no_vm_leaks")


# ---------------------------------------------------------------------------------------- lifecycle


def test_a_test_vm_from_a_point_boots_and_destroy_leaves_nothing(vm_site: Site) -> None:
    vms, point = vm_site.vms, vm_site.point_file()
    assert isinstance(vms, VmProvisioner)
    assert same_content(point, vm_site.src.paths[0])  # the point is the guest's disk
    before = file_digest(point)
    vm_site.tgt.hold("p1", "drill-1", "test failover")

    ref = vms.create_vm(plan("drill"))
    assert (ref.point_id, ref.mode, ref.state) == ("p1", "test", "stopped")
    assert vms.create_vm(plan("drill")) == ref  # the same plan again: the same VM
    assert qemu_processes(vm_site.tmp) == []  # nothing runs yet

    on = vms.power_on("drill")
    assert on.state == "running" and on.vm_id == ref.vm_id
    [proc] = qemu_processes(vms.files("drill").state)
    assert vms.power_on("drill").state == "running"
    assert [p.pid for p in qemu_processes(vm_site.tmp)] == [proc.pid]  # running already: no second QEMU

    check = vms.boot_check("drill", READY, BOOT_TIMEOUT)
    print(f"boot check: {check.seconds} s, {check.evidence!r}")
    assert check.ok, check.evidence
    assert check.evidence == READY and 0 < check.seconds < BOOT_TIMEOUT
    text = vms.console("drill")
    assert READY in text and "SENDENSE-GUEST-BOOTED mode=boot" in text and "\x1b" not in text
    assert file_digest(point) == before  # the point's file never changes, not even while the VM runs

    off = vms.power_off("drill")
    assert off.state == "stopped" and qemu_processes(vm_site.tmp) == []
    assert vms.power_off("drill").state == "stopped"  # stopped already: no error
    vms.destroy_vm("drill")
    assert_gone(vms, "drill")
    vms.destroy_vm("drill")  # gone already: no error
    assert file_digest(point) == before and same_content(point, vm_site.src.paths[0])
    vm_site.tgt.release("p1", "drill-1")


def test_a_create_or_power_on_cut_short_is_undone_by_destroy(
    vm_site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    vms = vm_site.vms
    real_overlay, real_start = KvmVms._overlay, vm_qemu.start

    def overlay_then_die(self: KvmVms, *a: object) -> None:
        real_overlay(self, *a)  # type: ignore[arg-type]
        raise RuntimeError("agent killed after the overlay was made")

    monkeypatch.setattr(KvmVms, "_overlay", overlay_then_die)
    with pytest.raises(RuntimeError):
        vms.create_vm(plan("cut"))
    state = vms.files("cut").state
    assert (state / "disk0.qcow2").exists() and (state / "vm.json").exists()
    assert [r.name for r in vms.list_vms()] == ["cut"]  # a leak check sees the half-made VM
    vms.destroy_vm("cut")
    assert_gone(vms, "cut")

    monkeypatch.setattr(KvmVms, "_overlay", real_overlay)
    vms.create_vm(plan("cut"))

    def start_then_die(*a: object) -> None:
        real_start(*a)  # type: ignore[arg-type]
        raise RuntimeError("agent killed after QEMU started")

    monkeypatch.setattr(vm_qemu, "start", start_then_die)
    with pytest.raises(RuntimeError):
        vms.power_on("cut")
    assert [r.state for r in vms.list_vms()] == ["running"]
    assert len(qemu_processes(vms.files("cut").state)) == 1
    vms.destroy_vm("cut")
    assert_gone(vms, "cut")


AGENT = """
import sys, time
from pathlib import Path
from connectors.kvm.vms import KvmVms
from sendense.models import VmPlan
vms = KvmVms(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
vms.create_vm(VmPlan(name="failover", point_id="p1", memory_mib=256, mode="production"))
print(vms.power_on("failover").state, flush=True)
time.sleep(600)
"""


def test_a_vm_outlives_the_agent_that_started_it_and_a_new_agent_finds_and_destroys_it(vm_site: Site) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, JOB, str(vm_site.tgt.root), "j1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert agent.stdout is not None
        assert agent.stdout.readline().strip() == "running"
    finally:
        os.killpg(agent.pid, signal.SIGKILL)  # the agent and its whole process group die
        agent.wait(10)
        agent.stdout.close()  # type: ignore[union-attr]

    spec = JobSpec(  # a new agent makes its provisioner from the job's spec (default runtime base)
        name=JOB,
        job_id="j1",
        source=KvmSource(platform="kvm", disks=vm_site.src.paths),
        target=KvmTargetSpec(platform="kvm", path=vm_site.tgt.root),
    )
    again = vms_for(spec)
    assert isinstance(again, KvmVms)
    [ref] = again.list_vms()
    assert (ref.name, ref.state, ref.mode) == ("failover", "running", "production")
    check = again.boot_check("failover", READY, BOOT_TIMEOUT)
    assert check.ok, check.evidence
    again.destroy_vm("failover")
    assert_gone(again, "failover")


def test_two_vms_from_one_point_run_at_once(vm_site: Site) -> None:
    vms, before = vm_site.vms, file_digest(vm_site.point_file())
    for name in ("one", "two"):
        vms.create_vm(plan(name))
        vms.power_on(name)
    assert [(r.name, r.state) for r in vms.list_vms()] == [("one", "running"), ("two", "running")]
    checks = {name: vms.boot_check(name, READY, BOOT_TIMEOUT) for name in ("one", "two")}
    assert all(c.ok for c in checks.values()), checks
    print("two VMs at once: " + ", ".join(f"{n} {c.seconds} s" for n, c in checks.items()))
    assert len(qemu_processes(vm_site.tmp)) == 2
    for name in ("one", "two"):
        vms.destroy_vm(name)
        assert_gone(vms, name)
    assert file_digest(vm_site.point_file()) == before


def test_a_point_that_cannot_boot_fails_the_boot_check_with_the_consoles_reason(
    tmp_path: Path, guest_image: Path
) -> None:
    zeroed = make_qcow2(tmp_path / "zeroed.qcow2", 64 * MiB)  # no MBR, no bootloader: nothing to boot
    site = make_site(tmp_path, zeroed)
    try:
        site.vms.create_vm(plan("blank"))
        site.vms.power_on("blank")
        check = site.vms.boot_check("blank", READY, BOOT_TIMEOUT)
        assert not check.ok
        # decided by the console (SeaBIOS), long before the timeout
        assert check.evidence == "No bootable device. (Boot failed: not a bootable disk)", check.evidence
        assert check.seconds < BOOT_TIMEOUT / 2
        site.vms.destroy_vm("blank")
        assert_gone(site.vms, "blank")
    finally:
        shutil.rmtree(site.run, ignore_errors=True)


# ---------------------------------------------------------------------------------- points and prune


def test_prune_keeps_a_held_point_a_vm_runs_on_and_the_vm_still_reads_it(vm_site: Site) -> None:
    vms, tgt = vm_site.vms, vm_site.tgt
    tgt.hold("p1", "drill-2", "drill")
    vms.create_vm(plan("old"))
    vms.power_on("old")
    assert vms.boot_check("old", READY, BOOT_TIMEOUT).ok
    before = file_digest(vm_site.point_file("p1"))

    src_img, base = vm_site.src.paths[0], {"disk0": tgt.get_point("p1").disks[0].change_id}
    for n in (2, 3):  # the source keeps changing: two more points
        qemu_io(src_img, f"write -P 0x{n}{n} {200 * MiB} {MiB}")
        base = sync_point(vm_site.src, tgt, f"p{n}", base).base
    assert tgt.prune(1) == ["p2"]  # retention 1: p1 is held (and in use), p2 merges into p3
    assert [p.point_id for p in tgt.list_points()] == ["p3", "p1"]
    assert file_digest(vm_site.point_file("p1")) == before

    with vms.monitor("old") as qmp:  # reboot: the guest reads its boot sectors, kernel and root again
        qmp.execute("system_reset")
    again = vms.boot_check("old", f"{READY}[\\s\\S]*{READY}", BOOT_TIMEOUT)
    assert again.ok, again.evidence
    assert vms.console("old").count(READY) == 2
    vms.destroy_vm("old")
    assert_gone(vms, "old")
    tgt.release("p1", "drill-2")
    assert tgt.prune(1) == ["p1"]
