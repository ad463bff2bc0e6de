"""The boot check's `guest_agent` and `status_checks` on KVM VMs (KvmVms, bare QEMU), with real QEMU and
the bootable guest, whose init starts a tiny guest agent on the VM's org.qemu.guest_agent.0 port.

guest_agent: after the console's pattern, the agent answers `guest-sync` with our id; a guest without
its agent fails with "did not answer". status_checks: QEMU's `query-status` says running; a VM
paused through its QMP socket fails naming the state.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers_vms import BOOT_TIMEOUT, READY, Site, assert_gone, make_site, plan

from labs.guest.build import PART_OFFSET

pytestmark = pytest.mark.usefixtures("no_vm_leaks")


def test_the_guest_agent_answers_and_qemu_says_running_until_the_vm_is_paused(vm_site: Site) -> None:
    vms = vm_site.vms
    vms.create_vm(plan("drill"))
    vms.power_on("drill")
    check = vms.boot_check("drill", READY, BOOT_TIMEOUT, guest_agent=True, status_checks=True)
    print(f"boot check: {check.seconds} s, {check.evidence!r}")
    assert check.ok, check.evidence
    assert check.evidence.startswith(f"{READY}; VM running; guest agent answered (")
    assert 0 < check.seconds < BOOT_TIMEOUT
    again = vms.boot_check("drill", READY, 30, guest_agent=True)  # a second client: stale output passed over
    assert again.ok and "guest agent answered" in again.evidence, again.evidence

    with vms.monitor("drill") as qmp:
        qmp.execute("stop")
    paused = vms.boot_check("drill", READY, 30, status_checks=True)
    assert not paused.ok
    assert paused.evidence == f"{READY}; but the VM is not running: paused", paused.evidence
    silent = vms.boot_check("drill", READY, 3, guest_agent=True)  # a paused guest's agent is silent
    assert not silent.ok
    assert silent.evidence == f"guest agent did not answer within 3s; last line: {READY}", silent.evidence

    with vms.monitor("drill") as qmp:
        qmp.execute("cont")
    back = vms.boot_check("drill", READY, 30, guest_agent=True, status_checks=True)
    assert back.ok, back.evidence
    vms.destroy_vm("drill")
    assert_gone(vms, "drill")


def without_agent(image: Path, out: Path) -> Path:
    """The guest with its agent removed (/sbin/sendense-qga): it boots the same, and nothing answers."""
    raw = out.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-q", "-O", "raw", str(image), str(raw)], check=True)
    rm = subprocess.run(["debugfs", "-w", "-R", "rm /sbin/sendense-qga", f"{raw}?offset={PART_OFFSET}"],
                        capture_output=True, text=True, check=True)  # fmt: skip
    assert "not found" not in rm.stderr, rm.stderr
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True)
    raw.unlink()
    return out


def test_a_guest_without_an_agent_boots_but_fails_the_agent_check(tmp_path: Path, guest_image: Path) -> None:
    site = make_site(tmp_path, without_agent(guest_image, tmp_path / "noagent.qcow2"))
    try:
        site.vms.create_vm(plan("drill"))
        site.vms.power_on("drill")
        plain = site.vms.boot_check("drill", READY, BOOT_TIMEOUT)
        assert plain.ok, plain.evidence  # boots as before
        check = site.vms.boot_check("drill", READY, 8, guest_agent=True, status_checks=True)
        assert not check.ok
        assert check.evidence == f"guest agent did not answer within 8s; last line: {READY}", check.evidence
        site.vms.destroy_vm("drill")
        assert_gone(site.vms, "drill")
    finally:
        shutil.rmtree(site.run, ignore_errors=True)
