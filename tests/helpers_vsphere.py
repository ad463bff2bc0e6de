"""What the vSphere connector's tests run against: the vSphere lab (vcsim-lab), with the agent's
environment for it (the lab's login and its VDDK stand-in, as `sendense lab up` registers them)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import labs.vsphere
from connectors.vsphere.spec import VsphereSource, VsphereTarget
from labs.vsphere import VsphereLab

STANDIN = Path(labs.vsphere.__file__).with_name("vddk_standin.py")


@contextmanager
def vsphere_agent_env(lab: VsphereLab) -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    mp.setenv("SENDENSE_VSPHERE_USER", lab.user)
    mp.setenv("SENDENSE_VSPHERE_PASSWORD", lab.password)
    mp.setenv("SENDENSE_VDDK_PLUGIN", str(STANDIN))
    try:
        yield
    finally:
        mp.undo()


def snapshot_names(vm: object) -> list[str]:
    """The names of every snapshot of a VM (pyvmomi object), sorted."""
    from connectors.vsphere.session import snapshot_nodes

    return sorted(n.name for n in snapshot_nodes(vm))


def current_disk(lab: VsphereLab, moref: str, index: int) -> tuple[str, str]:
    """(local file, format) of the VM's index-th disk (by unit number) as it is now: its guest writes
    go there (the delta on top of its snapshots)."""
    from pyVmomi import vim

    vm = lab.vm(moref)
    disks = sorted(
        (d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)),
        key=lambda d: (d.controllerKey, d.unitNumber),
    )
    info = lab.disk_info(moref, str(getattr(disks[index].backing, "fileName", "")))
    return info["path"], info["format"]


def guest_io(lab: VsphereLab, moref: str, index: int, *cmds: str) -> None:
    """qemu-io commands on the VM's disk, as its guest would write (the VM is powered off)."""
    path, fmt = current_disk(lab, moref, index)
    args = [a for c in cmds for a in ("-c", c)]
    subprocess.run(["qemu-io", "-f", fmt, *args, path], check=True, capture_output=True)


def disk_image(lab: VsphereLab, moref: str, index: int, out: Path) -> Path:
    """The VM's disk as it reads now, as a raw file (the reference a point is compared with)."""
    path, fmt = current_disk(lab, moref, index)
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, str(out)], check=True)
    return out


def source_spec(lab: VsphereLab, vm: str, **over: object) -> VsphereSource:
    doc: dict[str, object] = {
        "platform": "vsphere",
        "server": f"{lab.host}:{lab.port}",
        "thumbprint": lab.thumbprint,
        "vm": vm,
    }
    return VsphereSource.model_validate(doc | over)


def target_spec(lab: VsphereLab, **over: object) -> VsphereTarget:
    doc: dict[str, object] = {
        "platform": "vsphere",
        "server": f"{lab.host}:{lab.port}",
        "thumbprint": lab.thumbprint,
        "datacenter": "DC0",
        "datastore": "LocalDS_0",
    }
    return VsphereTarget.model_validate(doc | over)


def name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
