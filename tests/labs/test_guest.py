"""The bootable guest: it boots through its own MBR and bootloader, its workload's crash copies are
consistent and hold their sequence number, and the checks discriminate (a disk without boot
sectors does not boot, a damaged filesystem fails the check)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from labs.guest.build import PART_OFFSET, build
from labs.guest.fscheck import check
from tools.boot import GuestVm, overlay

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image() -> Path:
    return build()  # cached by scripts/install.sh; built here if not


def test_the_guest_boots_through_its_boot_sectors_and_not_without_them(image: Path, tmp_path: Path) -> None:
    with GuestVm(overlay(image, tmp_path / "a.qcow2"), tmp_path / "a") as vm:
        ok = vm.wait_for(timeout=180)
    assert ok.ok, ok.evidence
    assert ok.evidence == "SENDENSE-GUEST-READY" and ok.seq == 0
    assert "SENDENSE-GUEST-BOOTED mode=boot" in vm.text()

    broken = overlay(image, tmp_path / "b.qcow2")  # the MBR gone: the BIOS finds nothing to boot
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -z 0 512", str(broken)], check=True, capture_output=True
    )
    with GuestVm(broken, tmp_path / "b") as vm:
        bad = vm.wait_for(timeout=60)
    assert not bad.ok and "SENDENSE-GUEST" not in vm.text()


def test_a_crash_copy_of_the_workload_is_consistent_and_boots_with_its_sequence(
    image: Path, tmp_path: Path
) -> None:
    disk = overlay(image, tmp_path / "w.qcow2")
    with GuestVm(disk, tmp_path / "w", mode="workload") as vm:
        progress = vm.wait_for("SENDENSE-GUEST-SEQ 25", timeout=240)
        assert progress.ok, progress.evidence
    # killed mid-loop: a crash copy. Consistent after journal replay, with a sequence of at least 25.
    fs = check(disk)
    assert fs.ok, fs.detail
    assert fs.seq is not None and fs.seq >= 25
    with GuestVm(overlay(disk, tmp_path / "again.qcow2"), tmp_path / "again") as vm:
        again = vm.wait_for(timeout=180)
    assert again.ok and again.seq == fs.seq

    # the check discriminates: the first inodes (the root directory's among them) overwritten
    damaged = overlay(disk, tmp_path / "damaged.qcow2")
    part = tmp_path / "p1.raw"
    opts = f"driver=raw,offset={PART_OFFSET},file.driver=qcow2,file.file.filename={disk}"
    subprocess.run(["qemu-img", "convert", "--image-opts", opts, "-O", "raw", str(part)], check=True)
    layout = subprocess.run(["dumpe2fs", str(part)], capture_output=True, text=True).stdout
    table = int(re.search(r"Inode table at (\d+)", layout).group(1))  # type: ignore[union-attr]
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0xa5 {PART_OFFSET + table * 4096} 4096", str(damaged)],
        check=True,
        capture_output=True,
    )
    bad = check(damaged)
    assert not bad.ok and "e2fsck" in bad.detail
