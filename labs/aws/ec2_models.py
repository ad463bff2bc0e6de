"""moto EC2 model classes whose data and state come from the lab: snapshots and registered images.

`LabSnapshot` is a moto `Snapshot` whose State, Progress, StateMessage, VolumeSize, CompletionTime and
FullSnapshotSizeInBytes are read from the lab's `Snapshot` (moto's are always "completed", 100%).
`LabImage` is a moto `Ami` built from RegisterImage's own parameters (moto's keeps only the name and
invents a 15 GiB snapshot); its block device mappings name lab snapshots and drive RunInstances.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any

from moto.core.utils import utcnow
from moto.ec2.models.amis import Ami
from moto.ec2.models.elastic_block_store import Snapshot as MotoSnapshot

from labs.aws.blockstore import BLOCK_SIZE
from labs.aws.state import LabState, Snapshot

DIRECT_VOLUME_ID = "vol-ffffffff"  # what EC2 shows as the volume of a StartSnapshot snapshot


class DirectVolume:
    """The volume EC2 reports for a snapshot that was written through the EBS direct APIs."""

    def __init__(self, size_gib: int) -> None:
        self.id = DIRECT_VOLUME_ID
        self.size = size_gib
        self.encrypted = False


class LabSnapshot(MotoSnapshot):
    def __init__(
        self, ec2_backend: Any, snapshot_id: str, volume: Any, description: str, lab: LabState
    ) -> None:
        self._lab = lab
        super().__init__(ec2_backend, snapshot_id, volume, description, encrypted=False)

    def _data(self) -> Snapshot | None:
        return self._lab.find_snapshot(self.id)

    @property  # type: ignore[override]
    def status(self) -> str:
        snap = self._data()
        return self._lab.status(snap)[0] if snap is not None else "error"

    @status.setter
    def status(self, value: str) -> None:
        pass  # moto's constructor says "completed"; the lab's state decides

    @property
    def state_message(self) -> str | None:
        snap = self._data()
        return self._lab.status(snap)[1] if snap is not None else None

    @property
    def progress(self) -> str:
        return "100%" if self.status == "completed" else "0%"

    @property
    def volume_size(self) -> int:
        snap = self._data()
        return snap.size_gib if snap is not None else int(self.volume.size)

    @property
    def completion_time(self) -> datetime.datetime | None:
        snap = self._data()
        when = self._lab.completion_time(snap) if snap is not None else None
        return (
            None if when is None else datetime.datetime.fromtimestamp(when, datetime.UTC).replace(tzinfo=None)
        )

    @property
    def full_snapshot_size_in_bytes(self) -> int | None:
        snap = self._data()
        if snap is None or self.status != "completed":
            return None
        return len(snap.blocks) * BLOCK_SIZE

    def get_filter_value(self, filter_name: str, method_name: str | None = None) -> Any:
        if filter_name == "volume-size":
            return self.volume_size
        return super().get_filter_value(filter_name, method_name)


class LabImage(Ami):
    """An EBS-backed AMI registered from lab snapshots."""

    def __init__(
        self,
        ec2_backend: Any,
        ami_id: str,
        *,
        name: str,
        description: str | None,
        root_device_name: str,
        mappings: list[dict[str, Any]],
        architecture: str = "x86_64",
        virtualization_type: str = "hvm",
        boot_mode: str | None = None,
        ena_support: bool = True,
    ) -> None:
        # Ami.__init__ is not called: it would create a volume and a snapshot the image does not have
        self.ec2_backend = ec2_backend
        self.id = ami_id
        self.state = "available"
        self.name = name
        self.description = description  # type: ignore[assignment]  # AWS omits an absent description
        self.image_type = "machine"
        self.owner_id = ec2_backend.account_id
        self.image_location = f"{self.owner_id}/{name}"
        self.owner_alias = None
        self.virtualization_type = virtualization_type
        self.architecture = architecture
        self.kernel_id = None
        self.platform = None
        self.hypervisor = "xen"
        self.root_device_name = root_device_name
        self.root_device_type = "ebs"
        self.sriov = "simple"
        self.ena_support = ena_support
        self.creation_date = utcnow()
        self.product_codes: set[str] = set()
        self.boot_mode = boot_mode  # type: ignore[assignment]  # AWS omits an unset boot mode
        self.instance_id = None
        self.launch_permissions: list[dict[str, str]] = []
        self.mappings = mappings

    @property
    def block_device_mappings(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self.mappings)

    @property
    def snapshot_ids(self) -> set[str]:
        return {m["Ebs"]["SnapshotId"] for m in self.mappings if m.get("Ebs", {}).get("SnapshotId")}

    def launch_mappings(self, requested: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """The image's mappings with RunInstances' own applied on top, device by device."""
        merged = {m["DeviceName"]: copy.deepcopy(m) for m in self.mappings}
        for req in requested or []:
            device = req["DeviceName"]
            if req.get("NoDevice") == "":
                merged.pop(device, None)
                continue
            ebs = {k: v for k, v in (req.get("Ebs") or {}).items() if v is not None}
            if device in merged:
                merged[device]["Ebs"].update(ebs)
            else:
                merged[device] = {"DeviceName": device, "Ebs": ebs}
        if self.root_device_name not in merged:
            merged[self.root_device_name] = {
                "DeviceName": self.root_device_name,
                "Ebs": {"VolumeSize": 8, "DeleteOnTermination": True, "VolumeType": "gp3"},
            }
        return list(merged.values())
