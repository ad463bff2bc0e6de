"""The KVM platform's part of a job spec: a VM given as stopped disk images, a QMP socket or a libvirt
domain (source), and a directory of qcow2 replicas (target)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from sendense.models import Reach, SourceSpec, Strict, TargetSpec, resolve_path

KVM_CREDENTIALS = "the agent reaches QEMU and libvirt as its own user (for libvirt over ssh: its ssh keys)"


class LibvirtDomain(Strict):
    uri: str = Field(description="libvirt connection URI, e.g. qemu:///system")
    domain: str = Field(description="domain name")


class LibvirtConnection(Strict):
    """The libvirt a KVM target makes its VMs on: they are libvirt domains there, not bare QEMU."""

    uri: str = Field(description="libvirt connection URI, e.g. qemu:///system")

    @field_validator("uri")
    @classmethod
    def _no_secrets(cls, uri: str) -> str:
        scheme, sep, rest = uri.partition("://")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
            raise ValueError(
                "not a libvirt URI (driver[+transport]://[user@][host]/path, e.g. qemu:///system)"
            )
        if ":" in rest.partition("/")[0].rpartition("@")[0]:  # user:password@host
            raise ValueError("the URI carries a password: give the agent ssh keys instead")
        return uri


class KvmNic(Strict):
    mac: str = Field(pattern=r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$", description="e.g. 52:54:00:12:34:56")
    network: str = Field(default="", description="what it is on, e.g. bridge:br0 or network:default")
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
    nics: list[KvmNic] = Field(default_factory=list)


class KvmSource(SourceSpec):
    """A KVM VM, given in exactly one of three forms."""

    platform: Literal["kvm"]
    disks: list[Path] | None = Field(default=None, description="stopped VM: its qcow2 disk images")
    qmp: Path | None = Field(default=None, description="running VM: its QMP unix socket")
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
            seen: dict[str, Path] = {}
            for d in disks:
                real = os.path.realpath(d)  # /a/../b and a symlink to b name one image
                if real in seen:
                    raise ValueError(f"source: disks lists the same image twice ({seen[real]} and {d})")
                seen[real] = d
            update["disks"] = disks
        if self.qmp is not None:
            update["qmp"] = resolve_path(self.qmp, base)
        return self.model_copy(update=update)


class KvmTarget(TargetSpec):
    """Replica volumes as qcow2 files in a directory, as on a KVM host's primary storage."""

    platform: Literal["kvm"]
    path: Path = Field(description="directory that holds the replicas and recovery points")
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

    def resolved(self, base: Path) -> Self:
        return self.model_copy(update={"path": resolve_path(self.path, base)})
