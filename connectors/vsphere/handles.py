"""The vSphere source's snapshot handles: which VM snapshot, and per disk which device and file."""

from __future__ import annotations

from sendense.models import Handle


class VsphereSnapshot(Handle):
    """A sync's VM snapshot: the VM's and the snapshot's managed object ids."""

    vm: str
    snapshot: str
    name: str = ""


class VsphereDisk(Handle):
    """One disk of it: the device key, the snapshot's file of the disk (what VDDK opens with
    `snapshot=`), and its size at the base point (a disk grown since: the grown part is copied whole)."""

    device_key: int
    file: str
    base_size: int = 0
