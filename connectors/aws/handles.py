"""The AWS source's snapshot handle: which volume and device a disk's EBS snapshot was taken of."""

from __future__ import annotations

from sendense.models import Handle


class AwsDisk(Handle):
    volume_id: str
    device: str = ""


class AwsVmSnapshot(Handle):
    """A failed-over instance's reverse snapshot (vm_changes): the VM's name, its instance and point."""

    vm: str
    instance_id: str = ""
    point_id: str = ""


class AwsVmDisk(AwsDisk):
    """One disk of it: the volume, its device, and the point's snapshot the volume was made from."""

    point_snapshot: str = ""
