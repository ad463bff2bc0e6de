"""Where a KVM target keeps the VMs it made from its points, and what it records about them.

Layout under the job's directory (`<path>/<job>/`, next to `points/` and `disks/`):

    vms/<name>/vm.json         the VM's record: its plan, its uuid, its runtime directory
    vms/<name>/<disk>.qcow2     an overlay per disk, backed by the point's file (a relative path, so the
                                job directory may move); the point's file is only ever read
    vms/<name>/console.log      the serial console of the VM's current run
    vms/<name>/qemu.pid         written by QEMU while the VM runs (QEMU's own -pidfile)
    vms/<name>/efivars.fd       a UEFI VM's variable store (its own copy)
    vms/<name>/qemu.log         what QEMU said on its way up (why it did not start)

Sockets (QMP, guest agent) live in a short runtime directory, `<runtime>/<vid>/`, where `vid` is a hash
of the VM's state directory: unix socket paths are limited to 107 bytes and a job directory may be
deep. The runtime directory is named in the record and can be derived again without it, so a VM whose
record was never written (a create killed early) is still found and removed.

How a VM runs is its backend's (`Backend`): a bare daemonized QEMU (`vm_qemu.QemuBackend`) or a libvirt
domain (`vm_libvirt.LibvirtBackend`); the files above are the same for both (a libvirt domain has no
qemu.pid or sockets of ours: libvirt keeps its own).

`backed_files` is what the target's prune asks: which point files a VM's overlay backs, whether the VM
runs or not (a running VM also holds QEMU's image lock on them; a stopped one holds nothing).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from sendense.errors import SendenseError
from sendense.models import NicInfo, VmPlan
from tools.qemu import is_qcow2, read_qcow2_header

RECORD = "vm.json"


class VmRecord(BaseModel):
    """What `create_vm` wrote: the plan as asked, and the names it chose."""

    model_config = ConfigDict(extra="ignore")

    plan: VmPlan
    uuid: str
    run_dir: str
    disks: list[str] = Field(description="the point's disk keys, in boot order")
    overlays: dict[str, str] = Field(description="disk key -> overlay file name in the state directory")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def vms_dir(job_dir: Path) -> Path:
    return job_dir / "vms"


def default_runtime_base() -> Path:
    """Short, per-user and not swept while a VM runs: /run for root, $XDG_RUNTIME_DIR, else the temp dir."""
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return Path("/run/sendense/vms")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "sendense-vms"
    return Path(tempfile.gettempdir()) / f"sendense-vms-{os.getuid()}"


@dataclass(frozen=True)
class VmPaths:
    """Every file a VM has, from its state directory (resolved: one VM, one set of names)."""

    name: str
    state: Path
    run: Path
    vid: str  # a short id of the state directory: runtime directory and tap names

    @classmethod
    def of(cls, job_dir: Path, name: str, runtime_base: Path, run_dir: str | None = None) -> VmPaths:
        state = (vms_dir(job_dir) / name).resolve()
        vid = hashlib.sha256(str(state).encode()).hexdigest()[:10]
        return cls(name, state, Path(run_dir) if run_dir else runtime_base / vid, vid)

    @property
    def record(self) -> Path:
        return self.state / RECORD

    @property
    def console(self) -> Path:
        return self.state / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.state / "qemu.pid"

    @property
    def log(self) -> Path:
        return self.state / "qemu.log"

    @property
    def efivars(self) -> Path:
        return self.state / "efivars.fd"

    @property
    def qmp(self) -> Path:
        return self.run / "qmp.sock"

    @property
    def qga(self) -> Path:
        return self.run / "qga.sock"

    def tap(self, index: int) -> str:
        return f"sd{self.vid}n{index}"  # 15 bytes at most (IFNAMSIZ - 1) for up to 100 NICs


def read_record(paths: VmPaths) -> VmRecord | None:
    try:
        return VmRecord.model_validate_json(paths.record.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable: the VM is incomplete (create_vm again, or destroy_vm)


def write_record(paths: VmPaths, record: VmRecord) -> None:
    tmp = paths.record.with_suffix(".json.tmp")
    tmp.write_text(record.model_dump_json(indent=2) + "\n")
    os.replace(tmp, paths.record)


def backing_path(overlay: Path) -> Path | None:
    """The file an overlay is backed by, resolved as QEMU resolves it (relative to the overlay)."""
    try:
        if not is_qcow2(overlay):
            return None
        backing = read_qcow2_header(overlay).backing
    except (OSError, SendenseError):
        return None
    return (overlay.parent / backing).resolve() if backing else None


def backed_files(job_dir: Path) -> dict[Path, list[str]]:
    """Point file (resolved) -> the VMs whose overlays it backs, running or not."""
    out: dict[Path, list[str]] = {}
    root = vms_dir(job_dir)
    if not root.is_dir():
        return out
    for vm in sorted(root.iterdir()):
        if not vm.is_dir():
            continue
        for f in vm.iterdir():
            b = backing_path(f) if f.is_file() else None
            if b is not None:
                out.setdefault(b, []).append(vm.name)
    return out


def vm_names(job_dir: Path) -> list[str]:
    root = vms_dir(job_dir)
    return sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []


@dataclass(frozen=True)
class Disk:
    key: str
    overlay: Path
    bus: str  # virtio, scsi, sata, ide, nvme
    boot: int  # boot order, 1 first


@dataclass(frozen=True)
class Nic:
    mac: str
    model: str  # a QEMU device
    bridge: str | None  # None: the isolated test network


class Backend(Protocol):
    """What runs a VM from its overlays. Every method is idempotent; `uuid` is None when the VM's record
    is gone (a create cut short): the backend then finds what it made by the VM's paths alone."""

    def check(self, paths: VmPaths, name: str, mode: str, nics: list[NicInfo], disks: list[Disk]) -> None:
        """Refuse (one line) what this backend cannot make, before anything is written."""
        ...

    def define(self, paths: VmPaths, record: VmRecord, disks: list[Disk], nics: list[Nic]) -> None:
        """Make the VM known to whatever runs it (nothing for a bare QEMU). Undo: `remove`."""
        ...

    def running(self, paths: VmPaths, uuid: str | None) -> bool: ...

    def started_at(self, paths: VmPaths) -> float | None:
        """When the VM's current run started (epoch seconds), if it is known."""
        ...

    def start(self, paths: VmPaths, record: VmRecord, disks: list[Disk], nics: list[Nic]) -> None: ...

    def stop(self, paths: VmPaths, uuid: str | None) -> None:
        """Hard stop; stopped already: nothing."""
        ...

    def remove(self, paths: VmPaths, uuid: str | None) -> None:
        """Stop, and remove whatever is outside the VM's state directory (taps, the libvirt domain)."""
        ...

    def status(self, paths: VmPaths, uuid: str | None) -> str:
        """What runs the VM says of it: `running`, or another state (`paused`, `shutdown`, ...)."""
        ...

    def agent_sync(self, paths: VmPaths, timeout: float) -> bool:
        """Whether the guest's agent answers `guest-sync` with this call's id within `timeout` seconds."""
        ...
