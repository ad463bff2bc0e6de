"""An EC2 instance from a recovery point (what failover and test failover use): the point's snapshots
registered as an image (`RegisterImage` with their block device mapping), then `RunInstances` of it
with the instance type, subnet, security groups and key of the job's target settings."""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from typing import Any

from connectors.aws.client import Aws, aws_call
from connectors.aws.source import GIB
from connectors.aws.spec import AwsInstanceSettings
from connectors.aws.tags import TAG_JOB, TAG_POINT
from sendense.errors import SendenseError, TargetError
from sendense.models import PointInfo

log = logging.getLogger(__name__)

DATA_DEVICES = [f"/dev/sd{c}" for c in string.ascii_lowercase[5:16]]  # sdf..sdp, as AWS recommends
ROOT_DEVICE = "/dev/xvda"


@dataclass(frozen=True)
class Launched:
    image_id: str
    instance_id: str
    devices: dict[str, str]  # disk key -> device name


def device_names(point: PointInfo) -> dict[str, str]:
    """Disk key -> device: keys that are device names (from an EC2 source: xvda, sdf) keep them; other
    keys (disk0, vda) take the root device for the first disk and sdf, sdg, ... for the rest."""
    keys = [d.key for d in point.disks]
    if all(k.startswith(("xvd", "sd", "hd")) for k in keys):
        return {k: f"/dev/{k}" for k in keys}
    if len(keys) - 1 > len(DATA_DEVICES):
        raise ValueError(f"point {point.point_id} has {len(keys)} disks; at most {len(DATA_DEVICES) + 1}")
    return {k: ROOT_DEVICE if i == 0 else DATA_DEVICES[i - 1] for i, k in enumerate(keys)}


def launch_from_point(
    aws: Aws,
    job: str,
    point: PointInfo,
    settings: AwsInstanceSettings,
    *,
    name: str,
    availability_zone: str | None = None,
) -> Launched:
    ec2 = aws.client("ec2")
    devices = device_names(point)
    root = devices[point.disks[0].key]
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
        for d in point.disks
    ]
    image_args = {
        "Name": f"sendense-{job}-{point.point_id}-{name}"[:128],
        "Description": f"sendense job {job} point {point.point_id}",
        "Architecture": settings.architecture,
        "RootDeviceName": root,
        "BlockDeviceMappings": mappings,
        "VirtualizationType": "hvm",
        "EnaSupport": True,
    }
    if settings.boot_mode:
        image_args["BootMode"] = settings.boot_mode
    image_id = _register(aws, ec2, image_args)
    try:
        inst = _run(aws, ec2, image_id, job, point, settings, name, availability_zone)
    except BaseException:
        try:  # the image holds the point's snapshots (prune and destroy could not remove them)
            with aws_call(aws, f"ec2 DeregisterImage {image_id}"):
                ec2.deregister_image(ImageId=image_id)
        except SendenseError as e:
            log.warning("image %s of point %s stays after a failed launch: %s", image_id, point.point_id, e)
        raise
    log.info(
        "job %s: instance %s launched from point %s (image %s)",
        job,
        inst["InstanceId"],
        point.point_id,
        image_id,
    )
    return Launched(image_id=image_id, instance_id=inst["InstanceId"], devices=devices)


def _register(aws: Aws, ec2: Any, image_args: dict[str, Any]) -> str:
    """Register the point's image; one of that name already there (a launch of this name whose worker
    died before its cleanup, or someone else's) is named, never taken over or removed by its name."""
    name = image_args["Name"]
    with aws_call(aws, f"ec2 DescribeImages {name}"):
        found = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"]
    if found:
        raise TargetError(
            f"target: an image named {name} exists already ({found[0]['ImageId']}); deregister it "
            "or launch under another name"
        )
    with aws_call(aws, f"ec2 RegisterImage {name}"):
        return str(ec2.register_image(**image_args)["ImageId"])


def _run(
    aws: Aws,
    ec2: Any,
    image_id: str,
    job: str,
    point: PointInfo,
    settings: AwsInstanceSettings,
    name: str,
    availability_zone: str | None,
) -> dict[str, Any]:
    tags = [
        {"Key": TAG_JOB, "Value": job},
        {"Key": TAG_POINT, "Value": point.point_id},
        {"Key": "Name", "Value": name},
    ]
    with aws_call(aws, f"ec2 CreateTags {image_id}"):
        ec2.create_tags(Resources=[image_id], Tags=tags)
    run_args: dict[str, object] = {
        "ImageId": image_id,
        "InstanceType": settings.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tags},
            {"ResourceType": "volume", "Tags": tags},
        ],
    }
    if settings.subnet_id:
        run_args["SubnetId"] = settings.subnet_id
    if settings.security_group_ids:
        run_args["SecurityGroupIds"] = settings.security_group_ids
    if settings.key_name:
        run_args["KeyName"] = settings.key_name
    if availability_zone and not settings.subnet_id:
        run_args["Placement"] = {"AvailabilityZone": availability_zone}
    with aws_call(aws, f"ec2 RunInstances of {image_id}"):
        return dict(ec2.run_instances(**run_args)["Instances"][0])
