"""What an EC2 instance made from a recovery point boots: the point's snapshots registered as an
EBS-backed image (`RegisterImage`, a block device mapping per disk, the boot disk at the root device).
Registering an image copies nothing: its mappings name the point's own snapshots, which stay as they
are (an instance gets new volumes made from them), and a snapshot an image maps cannot be deleted
until the image is deregistered (prune skips such points)."""

from __future__ import annotations

import string
from typing import Any

from connectors.aws.source import GIB
from connectors.aws.spec import AwsInstanceSettings
from sendense.errors import InvalidSpec
from sendense.models import PointDisk

DATA_DEVICES = [f"/dev/sd{c}" for c in string.ascii_lowercase[5:16]]  # sdf..sdp, as AWS recommends
ROOT_DEVICE = "/dev/xvda"
BOOT_MODES = {"bios": "legacy-bios", "uefi": "uefi"}


def device_names(keys: list[str]) -> dict[str, str]:
    """Disk key -> device, for keys in boot order (the first boots). Keys that are device names (from an
    EC2 source: xvda, sdf) keep them; other keys (disk0, vda) take the root device for the first disk
    and sdf, sdg, ... for the rest."""
    if all(k.startswith(("xvd", "sd", "hd")) for k in keys):
        return {k: f"/dev/{k}" for k in keys}
    if len(keys) - 1 > len(DATA_DEVICES):
        raise InvalidSpec(f"{len(keys)} disks: an instance takes at most {len(DATA_DEVICES) + 1}")
    return {k: ROOT_DEVICE if i == 0 else DATA_DEVICES[i - 1] for i, k in enumerate(keys)}


def image_request(
    name: str,
    description: str,
    disks: list[PointDisk],
    settings: AwsInstanceSettings,
    firmware: str,
    tags: dict[str, str],
) -> dict[str, Any]:
    """RegisterImage's arguments: the disks' snapshots mapped in boot order, the image tagged at birth."""
    devices = device_names([d.key for d in disks])
    mappings = [
        {
            "DeviceName": devices[d.key],
            "Ebs": {
                "SnapshotId": d.path,
                "VolumeSize": max(1, -(-d.size // GIB)),
                "DeleteOnTermination": True,
                "VolumeType": "gp3",
            },
        }
        for d in disks
    ]
    return {
        "Name": name[:128],
        "Description": description[:255],
        "Architecture": settings.architecture,
        "RootDeviceName": devices[disks[0].key],
        "BlockDeviceMappings": mappings,
        "VirtualizationType": "hvm",
        "EnaSupport": True,
        "BootMode": settings.boot_mode or BOOT_MODES.get(firmware, "legacy-bios"),
        "TagSpecifications": [
            {"ResourceType": "image", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ],
    }
