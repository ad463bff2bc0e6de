"""The vSphere platform's part of a job spec: a VM on a vCenter or ESXi host (source), and a datastore
where a placeholder VM's snapshots are the recovery points (target).

Credentials never go in a spec: the spec names a login (`login`, default `default`) and the agent finds
its user and password in its environment (`SENDENSE_VSPHERE_USER` / `SENDENSE_VSPHERE_PASSWORD`, or
`SENDENSE_VSPHERE_<LOGIN>_USER` / `..._PASSWORD` for another login) or in a file it names
(`SENDENSE_VSPHERE_<LOGIN>_FILE`: two lines, user then password). The server is pinned by the SHA-1 or
SHA-256 thumbprint of its certificate; `insecure: true` trusts any certificate (warned on every connect).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from sendense.models import (
    PlatformSpec,
    Reach,
    SourceSpec,
    SpecPath,
    Strict,
    TargetSpec,
    check_path_length,
    resolve_path,
)

VSPHERE_CREDENTIALS = (
    "the agent reads the login's user and password from SENDENSE_VSPHERE_USER/SENDENSE_VSPHERE_PASSWORD "
    "(or SENDENSE_VSPHERE_<LOGIN>_USER/_PASSWORD, or the file SENDENSE_VSPHERE_<LOGIN>_FILE)"
)

Transport = Literal["nbdssl", "nbd", "hotadd", "san"]

_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(:\d{1,5})?\Z")
_THUMB = re.compile(r"^([0-9A-Fa-f]{2}:?){19}[0-9A-Fa-f]{2}\Z|^([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}\Z")
_MOREF = re.compile(r"^vm-\d+\Z")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_LOGIN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}\Z")


def normal_thumbprint(v: str) -> str:
    """A thumbprint as lowercase hex without colons (40 digits SHA-1, 64 SHA-256)."""
    return v.replace(":", "").lower()


def vm_form(vm: str) -> Literal["moref", "uuid", "path", "name"]:
    """How the spec names its VM: a managed object id (vm-42), an instance UUID, an inventory path
    (/Datacenter/vm/folder/name) or a name."""
    if _MOREF.match(vm):
        return "moref"
    if _UUID.match(vm):
        return "uuid"
    return "path" if vm.startswith("/") else "name"


class VddkSettings(Strict):
    """How disk bytes are read: nbdkit's `vddk` plugin (VMware's VDDK). Which plugin the agent runs is
    the agent's own setting (SENDENSE_VDDK_PLUGIN; the lab's stand-in there), never the spec's."""

    libdir: SpecPath | None = Field(
        default=None, description="VDDK's directory (vmware-vix-disklib-distrib); default: the agent's"
    )
    transports: list[Transport] = Field(
        default_factory=lambda: list[Transport](["nbdssl", "nbd"]),
        min_length=1,
        max_length=4,
        description="VDDK transports in the order tried (nbdssl, nbd, hotadd, san)",
    )

    @field_validator("transports")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each transport at most once")
        return v


class VspherePlace(PlatformSpec):
    """Where a vSphere end is reached: the server, its pinned certificate, the agent's login for it,
    the datacenter, and how disk bytes travel (VDDK)."""

    server: str = Field(description="vCenter or ESXi host, host[:port] (port 443 by default)")
    thumbprint: str | None = Field(
        default=None, description="SHA-1 or SHA-256 thumbprint of the server's certificate (xx:xx:...)"
    )
    insecure: bool = Field(default=False, description="trust any certificate (not for production)")
    login: str = Field(default="default", description="which of the agent's vSphere logins to use")
    datacenter: str | None = Field(default=None, description="the datacenter (default: the only one, or all)")
    vddk: VddkSettings = Field(default_factory=VddkSettings)

    credentials_hint = VSPHERE_CREDENTIALS

    @field_validator("server")
    @classmethod
    def _server(cls, v: str) -> str:
        if not _HOST.match(v):
            raise ValueError("not a host name or address with an optional :port (e.g. vcenter.example.com)")
        port = v.rpartition(":")[2] if not v.endswith("]") and ":" in v else None
        if port is not None and not 0 < int(port) < 65536:
            raise ValueError("the port is 1 to 65535")
        return v

    @field_validator("thumbprint")
    @classmethod
    def _thumbprint(cls, v: str | None) -> str | None:
        if v is not None and not _THUMB.match(v):
            raise ValueError("not a SHA-1 or SHA-256 thumbprint (20 or 32 hex bytes, e.g. AA:BB:...)")
        return v

    @field_validator("login")
    @classmethod
    def _login(cls, v: str) -> str:
        if not _LOGIN.match(v):
            raise ValueError("a login name: a letter, then letters, digits or _ (at most 32)")
        return v

    @model_validator(mode="after")
    def _pinned(self) -> Self:
        if self.thumbprint is None and not self.insecure:
            end = "source" if isinstance(self, SourceSpec) else "target"
            raise ValueError(
                f"{end}.thumbprint: the server's certificate thumbprint is required "
                "(openssl s_client -connect HOST:443 | openssl x509 -noout -fingerprint -sha1), "
                "or insecure: true to trust any certificate"
            )
        return self

    def address(self) -> tuple[str, int]:
        """(host, port) of the server."""
        if self.server.startswith("["):
            h, _, rest = self.server[1:].partition("]")
            return h, int(rest[1:]) if rest.startswith(":") else 443
        h, sep, p = self.server.partition(":")
        return h, int(p) if sep else 443

    def reach(self) -> Reach:
        end = "source" if isinstance(self, SourceSpec) else "target"
        h, p = self.address()
        reads = [(f"{end}.vddk.libdir", self.vddk.libdir)] if self.vddk.libdir is not None else []
        return Reach(reads=reads, endpoints=[(f"{end}.server", f"vsphere:{h}:{p}")])

    def resolved(self, base: Path) -> Self:
        if self.vddk.libdir is None:
            return self
        end = "source" if isinstance(self, SourceSpec) else "target"
        libdir = resolve_path(self.vddk.libdir, base)
        check_path_length(libdir, f"{end}.vddk.libdir")
        return self.model_copy(update={"vddk": self.vddk.model_copy(update={"libdir": libdir})})


class VsphereSource(VspherePlace, SourceSpec):
    """A vSphere VM: one VM snapshot per sync, changed areas from Changed Block Tracking
    (QueryChangedDiskAreas), bytes read through nbdkit's vddk plugin from the snapshot."""

    platform: Literal["vsphere"]
    vm: str = Field(
        min_length=1,
        description="the VM: its name, inventory path (/DC/vm/folder/name), instance UUID or moref (vm-42)",
    )
    instance_uuid: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        description="set when the job is made: later syncs refuse another VM under the same name or path",
    )
    quiesce: bool = Field(default=False, description="quiesce the guest file systems (VMware Tools)")

    @field_validator("vm")
    @classmethod
    def _vm(cls, v: str) -> str:
        if any(ord(c) < 32 for c in v):
            raise ValueError("a VM name has no control characters")
        return v

    def describe(self) -> str:
        return f"vsphere:{self.server}:{self.vm}"

    def pinned(self, vm_id: str) -> Self:
        """Named by name, path or moref, the job keeps to the VM found when it was made (its instance
        UUID): a later sync refuses another VM under that name."""
        if not vm_id or self.instance_uuid or vm_form(self.vm) == "uuid":
            return self
        return self.model_copy(update={"instance_uuid": vm_id})


class VsphereTarget(VspherePlace, TargetSpec):
    """Recovery points as snapshots of a powered-off placeholder VM whose disks each sync writes
    (through nbdkit's vddk plugin); VMs from points are linked clones of a point's snapshot."""

    platform: Literal["vsphere"]
    datastore: str = Field(
        min_length=1, max_length=80, description="the datastore of the placeholder's disks"
    )
    cluster: str | None = Field(default=None, max_length=80, description="the cluster to place it in")
    esx_host: str | None = Field(default=None, max_length=255, description="or the ESXi host (default: any)")
    folder: str | None = Field(
        default=None, max_length=255, description="VM folder, as an inventory path under the datacenter's vm/"
    )
    vm_name: str | None = Field(
        default=None,
        max_length=80,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the placeholder VM's name (default: sendense-<job>)",
    )

    def describe(self) -> str:
        return f"vsphere:{self.server}:{self.datastore}"
