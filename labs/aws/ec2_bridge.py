"""EC2 through moto, in-process, with the lab's data tied in.

moto's EC2 Flask app answers every EC2 action (serialized by one lock: moto is not thread-safe). The lab
replaces some methods on the region's moto backend so volumes and snapshots carry data:

- create_volume: every volume gets lab data (zeros, or exactly its snapshot's blocks); a snapshot that is
  not completed is refused (IncorrectState), as is a size below the snapshot's.
- create_snapshot / create_snapshots / copy_snapshot: the snapshot is a `LabSnapshot` holding the volume's
  blocks as they are at the call (CreateSnapshots: all the instance's volumes at one instant), pending for
  the lab's snapshot delay.
- delete_volume / delete_snapshot / modify_volume: the data follows; a snapshot an image uses is refused
  (InvalidSnapshot.InUse); volumes only grow.
- RegisterImage (moto's keeps only the name): a `LabImage` from the request's BlockDeviceMappings.
- run_instances: an image's mappings become the instance's volumes (moto ignores them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from moto.core.responses import ActionResult
from moto.ec2.exceptions import EC2ClientError, InvalidSnapshotInUse
from moto.ec2.models import ec2_backends
from moto.ec2.responses.amis import AmisResponse
from moto.ec2.utils import random_ami_id, random_snapshot_id
from moto.moto_server.werkzeug_app import create_backend_app

from labs.aws.ec2_models import DirectVolume, LabImage, LabSnapshot
from labs.aws.state import LabState, Snapshot
from labs.aws.wire import Response

log = logging.getLogger(__name__)

ROOT_DEVICE = "/dev/xvda"
DATA_DEVICES = [f"/dev/sd{c}" for c in "fghijklmnop"]
_HOP_BY_HOP = {"content-length", "connection", "transfer-encoding", "keep-alive", "server", "date"}


class Ec2Bridge:
    def __init__(self, state: LabState, region: str, account_id: str) -> None:
        self.state = state
        self.region = region
        self.owner_id = account_id
        self.lock = threading.RLock()
        self.app = create_backend_app("ec2")
        self.backend = ec2_backends[account_id][region]
        self._install()
        with self.lock:
            self.base_image_id = random_ami_id()
            self.backend.amis[self.base_image_id] = LabImage(
                self.backend,
                self.base_image_id,
                name="aws-lab-base",
                description="The AWS lab's base image: an empty root volume at /dev/xvda",
                root_device_name=ROOT_DEVICE,
                mappings=[],
            )

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, environ: dict[str, Any]) -> Response:
        captured: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
            captured["status"], captured["headers"] = status, headers

        with self.lock:
            result = self.app(environ, start_response)  # type: ignore[arg-type]
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        headers = [(k, v) for k, v in captured["headers"] if k.lower() not in _HOP_BY_HOP]
        return Response(int(captured["status"].split()[0]), body, headers)

    # ------------------------------------------------------------------ hooks

    def hook(self, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        setattr(self.backend, name, make(getattr(self.backend, name)))

    def _install(self) -> None:
        self.hook("create_volume", self._create_volume)
        self.hook("delete_volume", self._delete_volume)
        self.hook("modify_volume", self._modify_volume)
        self.hook("create_snapshot", lambda orig: self._create_snapshot)
        self.hook("create_snapshots", self._create_snapshots)
        self.hook("copy_snapshot", lambda orig: self._copy_snapshot)
        self.hook("delete_snapshot", self._delete_snapshot)
        self.hook("run_instances", self._run_instances)
        bridge = self

        def register_image(response: AmisResponse) -> ActionResult:
            tags = response._parse_tag_specification().get("image", {})
            response.error_on_dryrun()
            image = bridge.register_image(
                name=response._get_param("Name"),
                description=response._get_param("Description"),
                root_device_name=response._get_param("RootDeviceName"),
                mappings=response._get_param("BlockDeviceMappings", []),
                architecture=response._get_param("Architecture") or "x86_64",
                virtualization_type=response._get_param("VirtualizationType") or "hvm",
                boot_mode=response._get_param("BootMode"),
            )
            image.add_tags(tags)
            return ActionResult({"ImageId": image.id})

        AmisResponse.register_image = register_image  # type: ignore[method-assign,assignment]

    def completed_snapshot(self, snapshot_id: str) -> Snapshot:
        snap = self.state.find_snapshot(snapshot_id)
        if snap is None:
            raise EC2ClientError("InvalidSnapshot.NotFound", f"The snapshot '{snapshot_id}' does not exist.")
        state, _ = self.state.status(snap)
        if state != "completed":
            raise EC2ClientError("IncorrectState", f"Snapshot is in invalid state - {state}")
        return snap

    def _checked_size(self, snapshot_id: str, size: Any) -> int:
        snap = self.completed_snapshot(snapshot_id)
        if size is None:
            return snap.size_gib
        if int(size) < snap.size_gib:
            raise EC2ClientError(
                "InvalidParameterValue",
                f"Volume of {size}GiB is smaller than snapshot '{snapshot_id}', "
                f"expect size >= {snap.size_gib}GiB",
            )
        return int(size)

    def _create_volume(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def create_volume(size: Any, zone_name: str, snapshot_id: str | None = None, **kw: Any) -> Any:
            if snapshot_id:
                size = self._checked_size(snapshot_id, size)
            volume = orig(size, zone_name, snapshot_id=snapshot_id, **kw)
            self.state.add_volume(volume.id, int(volume.size), snapshot_id or None)
            log.info("volume %s: %s GiB from %s", volume.id, volume.size, snapshot_id or "nothing (zeros)")
            return volume

        return create_volume

    def _delete_volume(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def delete_volume(volume_id: str) -> Any:
            volume = orig(volume_id)
            self.state.remove_volume(volume_id)
            return volume

        return delete_volume

    def _modify_volume(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def modify_volume(volume_id: str, target_size: Any = None, *args: Any, **kw: Any) -> Any:
            current = self.backend.get_volume(volume_id)
            if target_size is not None and int(target_size) < int(current.size):
                raise EC2ClientError(
                    "InvalidParameterValue",
                    f"New size {target_size} cannot be smaller than existing size {current.size}",
                )
            volume = orig(volume_id, int(target_size) if target_size else None, *args, **kw)
            self.state.resize_volume(volume_id, int(volume.size))
            return volume

        return modify_volume

    def _create_snapshot(
        self, volume_id: str, description: str, owner_id: str | None = None, from_ami: str | None = None
    ) -> LabSnapshot:
        volume = self.backend.get_volume(volume_id)
        snapshot_id = random_snapshot_id()
        with self.state.write_lock:
            self.state.capture_volume(snapshot_id, volume_id)
            snapshot = LabSnapshot(self.backend, snapshot_id, volume, description, self.state)
            self.backend.snapshots[snapshot_id] = snapshot
        if self.state.capture_pause:  # the window between two volumes of one CreateSnapshots
            time.sleep(self.state.capture_pause)
        log.info("snapshot %s of %s", snapshot_id, volume_id)
        return snapshot

    def _create_snapshots(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def create_snapshots(*args: Any, **kw: Any) -> Any:
            with self.state.write_lock:  # all the instance's volumes at one instant
                return orig(*args, **kw)

        return create_snapshots

    def _copy_snapshot(
        self, source_snapshot_id: str, source_region: str, description: str, kms_key_id: str | None
    ) -> LabSnapshot:
        if source_region != self.region:
            raise EC2ClientError("InvalidParameterValue", f"the AWS lab serves {self.region} only")
        source = self.completed_snapshot(source_snapshot_id)
        snapshot_id = random_snapshot_id()
        with self.state.lock:
            self.state.snapshots[snapshot_id] = Snapshot(
                snapshot_id,
                direct=False,
                size_gib=source.size_gib,
                lineage=source.lineage,
                blocks=dict(source.blocks),
                created=self.state.now(),
            )
        volume = self.backend.snapshots[source_snapshot_id].volume
        snapshot = LabSnapshot(self.backend, snapshot_id, volume, description, self.state)
        self.backend.snapshots[snapshot_id] = snapshot
        return snapshot

    def _delete_snapshot(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def delete_snapshot(snapshot_id: str) -> Any:
            for image in self.backend.amis.values():
                if isinstance(image, LabImage) and snapshot_id in image.snapshot_ids:
                    raise InvalidSnapshotInUse(snapshot_id, image.id)
            snapshot = orig(snapshot_id)
            self.state.remove_snapshot(snapshot_id)
            return snapshot

        return delete_snapshot

    def _run_instances(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def run_instances(
            image_id: str, count: int, user_data: Any, security_group_names: Any, **kw: Any
        ) -> Any:
            image = self.backend.amis.get(image_id)
            if isinstance(image, LabImage):
                kw["block_device_mappings"] = image.launch_mappings(kw.get("block_device_mappings"))
            for mapping in kw.get("block_device_mappings") or []:
                ebs = mapping.get("Ebs") or {}
                if ebs.get("SnapshotId"):
                    ebs["VolumeSize"] = self._checked_size(ebs["SnapshotId"], ebs.get("VolumeSize"))
            return orig(image_id, count, user_data, security_group_names, **kw)

        return run_instances

    # ------------------------------------------------------------------ images, instances, direct snapshots

    def register_image(
        self,
        *,
        name: str | None,
        description: str | None,
        root_device_name: str | None,
        mappings: list[dict[str, Any]],
        architecture: str,
        virtualization_type: str,
        boot_mode: str | None,
    ) -> LabImage:
        if not name:
            raise EC2ClientError("MissingParameter", "The request must contain the parameter name")
        for other in self.backend.amis.values():
            if other.name == name and other.owner_id == self.owner_id:
                raise EC2ClientError(
                    "InvalidAMIName.Duplicate", f"AMI name {name} is already in use by AMI {other.id}"
                )
        if not root_device_name:
            raise EC2ClientError("MissingParameter", "The request must contain the parameter rootDeviceName")
        kept = []
        for m in mappings:
            if m.get("NoDevice") == "" or not m.get("Ebs"):
                continue
            ebs = {k: v for k, v in m["Ebs"].items() if v is not None}
            if ebs.get("SnapshotId"):
                ebs["VolumeSize"] = self._checked_size(ebs["SnapshotId"], ebs.get("VolumeSize"))
            elif not ebs.get("VolumeSize"):
                raise EC2ClientError(
                    "InvalidParameterValue", f"device {m['DeviceName']} needs a SnapshotId or VolumeSize"
                )
            ebs.setdefault("DeleteOnTermination", True)
            ebs.setdefault("VolumeType", "gp3")
            ebs.setdefault("Encrypted", False)
            kept.append({"DeviceName": m["DeviceName"], "Ebs": ebs})
        if not any(m["DeviceName"] == root_device_name and m["Ebs"].get("SnapshotId") for m in kept):
            raise EC2ClientError(
                "InvalidBlockDeviceMapping",
                f"the root device {root_device_name} must map a snapshot (an EBS-backed AMI)",
            )
        image = LabImage(
            self.backend,
            random_ami_id(),
            name=name,
            description=description,
            root_device_name=root_device_name,
            mappings=kept,
            architecture=architecture,
            virtualization_type=virtualization_type,
            boot_mode=boot_mode,
        )
        self.backend.amis[image.id] = image
        log.info("image %s (%s) from %s", image.id, name, sorted(image.snapshot_ids))
        return image

    def make_instance(self, name: str, disks_gib: list[int], image_id: str | None = None) -> dict[str, Any]:
        """An instance of the base image (empty volumes), or of `image_id` (its root snapshot on the root
        volume, grown to disks_gib[0] if that is larger)."""
        if not 1 <= len(disks_gib) <= 1 + len(DATA_DEVICES) or any(int(s) < 1 for s in disks_gib):
            raise ValueError(f"disks_gib must list 1 to {1 + len(DATA_DEVICES)} sizes of at least 1 GiB")
        devices = [ROOT_DEVICE, *DATA_DEVICES][: len(disks_gib)]
        if image_id is not None:
            image = self.backend.amis[image_id]
            assert isinstance(image, LabImage), f"{image_id} is not an image of the lab's snapshots"
            root = next(m["Ebs"]["SnapshotId"] for m in image.mappings if m["DeviceName"] == ROOT_DEVICE)
            disks_gib = [max(int(disks_gib[0]), self.state.snapshot(root).size_gib), *disks_gib[1:]]
        mappings = [
            {"DeviceName": d, "Ebs": {"VolumeSize": int(s), "DeleteOnTermination": True, "VolumeType": "gp3"}}
            for d, s in zip(devices, disks_gib, strict=True)
        ]
        with self.lock:
            reservation = self.backend.run_instances(
                image_id or self.base_image_id,
                1,
                None,
                [],
                instance_type="t3.micro",
                is_instance_type_default=False,
                region_name=self.region,
                tags={"instance": {"Name": name}},
                block_device_mappings=mappings,
            )
            instance = reservation.instances[0]
            volumes = [
                {"device": d, "volume_id": instance.block_device_mapping[d].volume_id, "size_gib": int(s)}
                for d, s in zip(devices, disks_gib, strict=True)
            ]
        return {"instance_id": instance.id, "volumes": volumes}

    def create_direct_snapshot(
        self,
        size_gib: int,
        description: str | None,
        tags: list[dict[str, str]],
        parent: Snapshot | None,
        timeout: int,
    ) -> Snapshot:
        with self.lock:
            snapshot_id = random_snapshot_id()
            snap = self.state.start_direct(snapshot_id, size_gib, parent, timeout)
            moto_snapshot = LabSnapshot(
                self.backend, snapshot_id, DirectVolume(size_gib), description or "", self.state
            )
            self.backend.snapshots[snapshot_id] = moto_snapshot
            moto_snapshot.add_tags({t["Key"]: t.get("Value", "") for t in tags})
        return snap
