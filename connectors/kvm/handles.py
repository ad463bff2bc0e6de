"""The KVM sources' snapshot handles: what each form needs to find its snapshot again in a later
activity (names, paths, node and export ids). Stored in workflow history: never a secret."""

from __future__ import annotations

import json
from typing import Any

from pydantic import field_validator

from sendense.models import Handle


class OfflineDisk(Handle):
    """Stopped VM: the image, and where a disk shrunk since the base grew back from."""

    path: str = ""
    regrown: int | None = None


class QmpDisk(Handle):
    """Running VM over QMP: the node, its fleece node and file, the NBD export, the backup job."""

    qmp: str = ""
    node: str = ""
    socket: str = ""
    export: str = ""
    export_id: str = ""
    job_id: str = ""
    fleece_node: str = ""
    fleece_file: str = ""
    temp_bitmap: str = ""
    regrown: int | None = None
    prev_bitmaps: list[str] = []

    @field_validator("prev_bitmaps", mode="before")
    @classmethod
    def _json_list(cls, v: Any) -> Any:
        return json.loads(v) if isinstance(v, str) else v  # (histories before typed handles: a JSON string)


class QmpSnapshot(Handle):
    qmp: str = ""
    socket: str = ""
    job: str = ""


class LibvirtDisk(Handle):
    """libvirt domain: the pull backup's NBD export and scratch file, the checkpoint and its bitmap."""

    socket: str = ""
    export: str = ""
    scratch: str = ""
    checkpoint: str = ""
    source: str = ""
    bitmap: str = ""


class LibvirtSnapshot(Handle):
    domain: str = ""
    checkpoint: str = ""
    socket: str = ""


class VmChangesSnapshot(Handle):
    """A failed-over VM's reverse snapshot (vm_changes): the VM, how it was taken (`qmp`: the running
    VM's QEMU; `stopped`: its overlays through qemu-nbd) and the handle of that form's snapshot."""

    vm: str = ""
    form: str = ""
    point_id: str = ""
    inner: dict[str, Any] = {}


class VmChangesDisk(Handle):
    """One disk of it: its key in the form's snapshot (the VM's QEMU node name), its overlay, and
    that snapshot's own base and handle."""

    node: str = ""
    image: str = ""
    base: str = ""
    lost: str = ""
    inner: dict[str, Any] = {}
