"""The KVM platform's part of a job spec: a VM given as stopped disk images, a QMP socket or a libvirt
domain (source), and a directory of qcow2 replicas (target)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, Field, field_validator, model_validator

from sendense.models import (
    MAX_DISKS,
    MAX_NICS,
    Reach,
    SourceSpec,
    SpecPath,
    Strict,
    TargetSpec,
    capped,
    check_path_length,
    check_url_secrets,
    resolve_path,
)
from tools.qemu import UNIX_PATH_MAX

KVM_CREDENTIALS = "the agent reaches QEMU and libvirt as its own user (for libvirt over ssh: its ssh keys)"

# Trees of the running system: never a place for replicas (a job's purge deletes what it made there)
# nor for source images (a source disk is a qcow2 image file: not a device node, not a kernel file).
TARGET_REFUSED = ("/proc", "/sys", "/dev", "/boot", "/etc", "/run", "/var/run")
SOURCE_REFUSED = ("/proc", "/sys", "/dev")


def system_tree(path: Path | str, trees: tuple[str, ...], *, root: bool = False) -> str | None:
    """The system tree (of `trees`, and `/` itself if `root`) that `path` is or is under, by its text:
    the caller resolves symlinks first where the file system is at hand."""
    text = os.path.normpath(path)
    if text.startswith("//"):  # (POSIX keeps two leading slashes; Linux reads them as one)
        text = "/" + text.lstrip("/")
    if root and text == "/":
        return "/"
    return next((t for t in trees if text == t or text.startswith(t + "/")), None)


def refuse_system_tree(path: Path, trees: tuple[str, ...], what: str, *, root: bool = False) -> None:
    """Raises ValueError if `path`, as written or with its symlinks resolved, is in a system tree."""
    tree = system_tree(path, trees, root=root) or system_tree(os.path.realpath(path), trees, root=root)
    if tree is not None:
        raise ValueError(
            f"{what}: {path} is {'/, the root' if tree == '/' else f'under {tree}'}, a system tree"
        )


def _libvirt_uri(uri: str) -> str:
    scheme, sep, _ = uri.partition("://")
    if not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ValueError("not a libvirt URI (driver[+transport]://[user@][host]/path, e.g. qemu:///system)")
    return check_url_secrets(uri, "give the agent ssh keys instead", noun="URI")


# A libvirt URI, as a source's or a target's: never a password (it would be stored in workflow history).
LibvirtUri = Annotated[str, AfterValidator(_libvirt_uri)]


class LibvirtDomain(Strict):
    uri: LibvirtUri = Field(description="libvirt connection URI, e.g. qemu:///system")
    domain: str = Field(description="domain name")
    uuid: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        description="the domain's UUID, recorded at job creation: another VM under the name is refused",
    )


class LibvirtConnection(Strict):
    """The libvirt a KVM target makes its VMs on: they are libvirt domains there, not bare QEMU."""

    uri: LibvirtUri = Field(description="libvirt connection URI, e.g. qemu:///system")


class KvmNic(Strict):
    mac: str = Field(pattern=r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$", description="e.g. 52:54:00:12:34:56")
    network: str = Field(
        default="", max_length=255, description="what it is on, e.g. bridge:br0 or network:default"
    )
    model: str = Field(default="virtio", pattern=r"^[a-z0-9_-]{1,32}$")


class KvmHardware(Strict):
    """A stopped VM's hardware, which its images do not say: what a VM made from its points looks like
    (a running VM's is asked of QEMU or libvirt)."""

    cpus: int = Field(default=0, ge=0, le=1024, description="vCPUs (0: unknown)")
    memory_mib: int = Field(default=0, ge=0, le=16 << 20, description="memory in MiB (0: unknown)")
    firmware: Literal["bios", "uefi", ""] = ""
    bus: Literal["virtio", "scsi", "sata", "ide", "nvme", ""] = Field(
        default="", description="the disks' bus"
    )
    nics: Annotated[list[KvmNic], capped("NICs per VM", MAX_NICS)] = Field(default_factory=list)


class KvmSource(SourceSpec):
    """A KVM VM, given in exactly one of three forms."""

    platform: Literal["kvm"]
    disks: Annotated[list[SpecPath], capped("disks per VM", MAX_DISKS)] | None = Field(
        default=None, description="stopped VM: its qcow2 disk images"
    )
    qmp: SpecPath | None = Field(default=None, description="running VM: its QMP unix socket")
    libvirt: LibvirtDomain | None = Field(default=None, description="running VM managed by libvirt")
    hardware: KvmHardware | None = Field(default=None, description="stopped VM: its CPUs, memory, NICs...")

    credentials_hint = KVM_CREDENTIALS

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        forms = [n for n in ("disks", "qmp", "libvirt") if getattr(self, n) is not None]
        if len(forms) != 1:
            raise ValueError("give exactly one of disks, qmp or libvirt")
        if self.disks is not None and not self.disks:
            raise ValueError("disks must list at least one qcow2 image")
        if self.disks is not None and len(set(self.disks)) != len(self.disks):
            raise ValueError("disks lists the same image twice")
        if self.hardware is not None and self.disks is None:
            raise ValueError("hardware is given for a stopped VM (disks); a running VM's is asked of it")
        return self

    @field_validator("disks")
    @classmethod
    def _no_system_disk(cls, disks: list[Path] | None) -> list[Path] | None:
        for i, d in enumerate(disks or []):  # by their text here; resolved() follows symlinks
            if tree := system_tree(d, SOURCE_REFUSED):
                raise ValueError(
                    f"disks[{i}] is under {tree}, a system tree: a source disk is a qcow2 image file"
                )
        return disks

    @field_validator("qmp")
    @classmethod
    def _qmp(cls, qmp: Path | None) -> Path | None:
        if qmp is not None and len(os.fsencode(qmp)) > UNIX_PATH_MAX:
            raise ValueError(f"a unix socket path is at most {UNIX_PATH_MAX} bytes")
        return qmp

    @property
    def mode(self) -> str:
        return "offline" if self.disks is not None else "qmp" if self.qmp is not None else "libvirt"

    def describe(self) -> str:
        if self.disks is not None:
            return f"kvm:disks({len(self.disks)})"
        if self.qmp is not None:
            return f"kvm:qmp:{self.qmp}"
        assert self.libvirt is not None
        return f"kvm:libvirt:{self.libvirt.domain}"

    def pinned(self, vm_id: str) -> Self:
        if self.libvirt is None or not vm_id or self.libvirt.uuid:
            return self
        return self.model_copy(update={"libvirt": self.libvirt.model_copy(update={"uuid": vm_id})})

    def locator(self) -> tuple[str, str] | None:
        """A libvirt domain pinned by UUID moves between hosts (live migration, or a restart on another
        host of shared storage): its host's agent announces it (connectors.kvm.inventory)."""
        if self.libvirt is None or self.libvirt.uuid is None:
            return None
        return ("kvm", self.libvirt.uuid)

    def moved(self, host: str, where: str) -> Self:
        assert self.libvirt is not None
        libvirt = LibvirtDomain.model_validate({**self.libvirt.model_dump(), "uri": where})  # (checked)
        return self.model_copy(update={"host": host, "libvirt": libvirt})

    def reach(self) -> Reach:
        return Reach(
            reads=[(f"source.disks[{i}]", d) for i, d in enumerate(self.disks or [])]
            + ([("source.qmp", self.qmp)] if self.qmp is not None else []),
            endpoints=[("source.libvirt.uri", self.libvirt.uri)] if self.libvirt is not None else [],
        )

    def resolved(self, base: Path) -> Self:
        update: dict[str, object] = {}
        if self.disks is not None:
            disks = [resolve_path(d, base) for d in self.disks]
            for i, d in enumerate(disks):
                check_path_length(d, f"source.disks[{i}]")
                refuse_system_tree(d, SOURCE_REFUSED, f"source.disks[{i}]")
            if same := same_files(disks):
                raise ValueError(f"source: disks lists the same image twice ({same[0]} and {same[1]})")
            update["disks"] = disks
        if self.qmp is not None:
            qmp = resolve_path(self.qmp, base)
            if len(os.fsencode(qmp)) > UNIX_PATH_MAX:
                raise ValueError(
                    f"source.qmp: {qmp} is longer than a unix socket path ({UNIX_PATH_MAX} bytes)"
                )
            update["qmp"] = qmp
        return self.model_copy(update=update)


def file_identity(p: Path) -> tuple[int, int] | str:
    """What names one file whatever path reaches it: device and inode of an existing file (a hard
    link, a bind mount, a symlink or `..` are the same file), else the path with symlinks resolved."""
    try:
        st = os.stat(p)
    except OSError:
        return os.path.realpath(p)
    return (st.st_dev, st.st_ino)


def same_files(paths: list[Path]) -> tuple[Path, Path] | None:
    """The first two of `paths` that are one file, if any."""
    seen: dict[tuple[int, int] | str, Path] = {}
    for p in paths:
        ident = file_identity(p)
        if ident in seen:
            return seen[ident], p
        seen[ident] = p
    return None


class KvmTarget(TargetSpec):
    """Replica volumes as qcow2 files in a directory, as on a KVM host's primary storage."""

    platform: Literal["kvm"]
    path: SpecPath = Field(description="directory that holds the replicas and recovery points")
    libvirt: LibvirtConnection | None = Field(
        default=None, description="VMs from points as domains of this libvirt (default: bare QEMU processes)"
    )

    credentials_hint = KVM_CREDENTIALS

    def describe(self) -> str:
        return f"kvm:{self.path}"

    def reach(self) -> Reach:
        return Reach(
            writes=[("target.path", self.path)],
            endpoints=[("target.libvirt.uri", self.libvirt.uri)] if self.libvirt is not None else [],
        )

    @field_validator("path")
    @classmethod
    def _not_a_system_tree(cls, path: Path) -> Path:  # by its text; resolved() and the agent follow symlinks
        if tree := system_tree(path, TARGET_REFUSED, root=True):
            raise ValueError(f"{'/, the root' if tree == '/' else f'under {tree}'}, a system tree")
        return path

    def resolved(self, base: Path) -> Self:
        path = check_path_length(resolve_path(self.path, base), "target.path")
        refuse_system_tree(path, TARGET_REFUSED, "target.path", root=True)
        return self.model_copy(update={"path": path})
