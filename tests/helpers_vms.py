"""Helpers for the tests of VMs made from KVM target points (tests/connectors/kvm/test_kvm_vms*.py):
the bootable guest replicated into a point, plans, and the checks that a VM left nothing behind.

A plain module (not a conftest), as helpers_kvm is; the fixtures are in tests/connectors/kvm/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
from helpers_kvm import sync_point

from connectors.kvm.offline import OfflineQcow2Source
from connectors.kvm.target import KvmTarget
from connectors.kvm.vms import KvmVms
from sendense.models import VmPlan

JOB = "vmjob"
READY = "SENDENSE-GUEST-READY"
BOOT_TIMEOUT = 120.0  # a boot takes 3-5 s under TCG; the machine is shared
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Site:
    """A stopped VM's disk (the source), its replicas with point p1 (the target), and the target's VMs."""

    tmp: Path
    src: OfflineQcow2Source
    tgt: KvmTarget
    vms: KvmVms
    run: Path  # the provisioner's runtime directory (sockets)

    def point_file(self, point_id: str = "p1") -> Path:
        return self.tgt.point_path(point_id, "disk0")


def make_site(tmp: Path, image: Path) -> Site:
    src_img = tmp / "source.qcow2"
    shutil.copyfile(image, src_img)  # the stopped VM's disk (the source adds its bitmaps to it)
    src = OfflineQcow2Source(JOB, [src_img])
    tgt = KvmTarget(JOB, tmp / "replicas", job_id="j1")
    sync_point(src, tgt, "p1")
    run = Path(tempfile.mkdtemp(prefix="sdvm-"))  # short: unix socket paths
    return Site(tmp, src, tgt, KvmVms(JOB, tmp / "replicas", "j1", runtime_dir=run), run)


def plan(name: str, point_id: str = "p1", **kw: object) -> VmPlan:
    kw.setdefault("memory_mib", 256)
    return VmPlan(name=name, point_id=point_id, **kw)  # type: ignore[arg-type]


def qemu_processes(under: Path) -> list[psutil.Process]:
    """Live QEMU processes whose command line names a path under `under` (zombies have exited: here
    pid 1 does not reap daemonized processes)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] != psutil.STATUS_ZOMBIE and cmd and "qemu-system" in os.path.basename(cmd[0]):
            if any(str(under) in a for a in cmd):
                found.append(p)
    return found


def assert_gone(vms: KvmVms, name: str) -> None:
    """Nothing of the VM is left: process, state directory (overlays, console, pid file, record),
    runtime directory (sockets), taps; and the target lists no such VM."""
    paths = vms.files(name)
    assert qemu_processes(paths.state) == []
    assert not paths.state.exists(), sorted(paths.state.iterdir())
    assert not paths.run.exists()
    taps = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"sd{paths.vid}n" not in taps
    assert name not in [r.name for r in vms.list_vms()]
