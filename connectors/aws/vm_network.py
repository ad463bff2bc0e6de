"""Where an instance made from a recovery point is plugged in (RunInstances' NetworkInterfaces).

- test mode: one interface in the target's subnet (`instance.subnet_id`, else the default subnet of the
  target's zone or region), no public address, in a security group made for this VM alone with no
  ingress and no egress rule: it reaches nothing and nothing reaches it. The target's own (production)
  groups are never used. The group is tagged like the VM and goes with it (`destroy_vm`).
- production mode: one interface per source NIC (`plan.nics`), in the subnet `plan.network_map` maps the
  NIC's network to; no NICs listed: one interface in the subnet the map names (when it names one), else
  `instance.subnet_id`, else the default subnet. The target's `instance.security_group_ids` (none: the
  VPC's default group, as EC2 does).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from connectors.aws.client import Aws, aws_call
from connectors.aws.spec import AwsTarget
from connectors.aws.tags import TAG_JOB_ID, as_list, tags_of
from sendense.errors import InvalidSpec, ResourceNotFound, SendenseError, TargetError
from sendense.models import VmPlan

log = logging.getLogger(__name__)


def subnets(aws: Aws, ec2: Any, ids: list[str], what: str) -> dict[str, dict[str, Any]]:
    """subnet id -> DescribeSubnets entry; one that does not exist is named (with `what` asked for it)."""
    try:
        with aws_call(aws, f"{what}: ec2 DescribeSubnets {' '.join(ids)}"):
            found = ec2.describe_subnets(SubnetIds=ids)["Subnets"]
    except ResourceNotFound as e:
        raise ResourceNotFound(f"{what}: subnet {' or '.join(ids)} not found in {aws.where()}") from e
    return {s["SubnetId"]: s for s in found}


def default_subnet(aws: Aws, ec2: Any, zone: str | None, what: str) -> dict[str, Any]:
    f = [{"Name": "default-for-az", "Values": ["true"]}]
    if zone:
        f.append({"Name": "availability-zone", "Values": [zone]})
    with aws_call(aws, f"{what}: ec2 DescribeSubnets (default)"):
        found = sorted(ec2.describe_subnets(Filters=f)["Subnets"], key=lambda s: s["AvailabilityZone"])
    if not found:
        raise InvalidSpec(f"{what}: no default subnet in {aws.where()}; set target.instance.subnet_id")
    return dict(found[0])


def interfaces(
    aws: Aws, ec2: Any, spec: AwsTarget, plan: VmPlan, isolated_group: Any
) -> list[dict[str, Any]]:
    """RunInstances' NetworkInterfaces for the plan; `isolated_group(vpc_id)` gives the test VM's group."""
    what = f"vm {plan.name}"
    settings = spec.instance
    if plan.mode == "test":
        if settings.subnet_id:
            subnet = subnets(aws, ec2, [settings.subnet_id], what)[settings.subnet_id]
        else:
            subnet = default_subnet(aws, ec2, spec.availability_zone, what)
        group = isolated_group(subnet["VpcId"])
        return [_nic(0, subnet["SubnetId"], [group], public=False)]
    if plan.nics:
        missing = sorted({n.network for n in plan.nics if n.network not in plan.network_map})
        if missing:
            raise InvalidSpec(
                f"{what}: network_map has no subnet for source network {', '.join(map(repr, missing))}"
            )
        wanted = [plan.network_map[n.network] for n in plan.nics]
    elif len(set(plan.network_map.values())) == 1:
        wanted = list(set(plan.network_map.values()))
    elif plan.network_map:
        raise InvalidSpec(f"{what}: network_map names several subnets but the plan lists no NICs")
    else:
        wanted = [settings.subnet_id or default_subnet(aws, ec2, spec.availability_zone, what)["SubnetId"]]
    subnets(aws, ec2, sorted(set(wanted)), what)
    groups = list(settings.security_group_ids)
    return [_nic(i, s, groups, public=None) for i, s in enumerate(wanted)]


def _nic(index: int, subnet_id: str, groups: list[str], public: bool | None) -> dict[str, Any]:
    nic: dict[str, Any] = {"DeviceIndex": index, "SubnetId": subnet_id, "DeleteOnTermination": True}
    if groups:
        nic["Groups"] = groups
    if public is not None:
        nic["AssociatePublicIpAddress"] = public
    return nic


def isolated_group(aws: Aws, ec2: Any, name: str, vpc_id: str, tags: dict[str, str], vm: str) -> str:
    """The VM's own security group in `vpc_id` (found, or created), with every rule revoked."""
    found = find_groups(
        aws, ec2, [{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}]
    )
    if found and tags_of(found[0]).get(TAG_JOB_ID) != tags[TAG_JOB_ID]:
        raise TargetError(f"vm {vm}: security group {found[0]['GroupId']} named {name} is not this job's")
    if not found:
        try:
            with aws_call(aws, f"vm {vm}: ec2 CreateSecurityGroup {name}"):
                ec2.create_security_group(
                    GroupName=name,
                    Description=f"sendense test VM {vm}: isolated (no rules)",
                    VpcId=vpc_id,
                    TagSpecifications=[{"ResourceType": "security-group", "Tags": as_list(tags)}],
                )
        except SendenseError as e:
            if "InvalidGroup.Duplicate" not in e.message:  # made meanwhile by a retry: taken below
                raise
        found = find_groups(
            aws, ec2, [{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}]
        )
    group = found[0]
    gid = str(group["GroupId"])
    if group.get("IpPermissions"):
        with aws_call(aws, f"vm {vm}: ec2 RevokeSecurityGroupIngress {gid}"):
            ec2.revoke_security_group_ingress(GroupId=gid, IpPermissions=group["IpPermissions"])
    if group.get("IpPermissionsEgress"):  # EC2 gives a new group an allow-all egress rule
        with aws_call(aws, f"vm {vm}: ec2 RevokeSecurityGroupEgress {gid}"):
            ec2.revoke_security_group_egress(GroupId=gid, IpPermissions=group["IpPermissionsEgress"])
    return gid


def find_groups(aws: Aws, ec2: Any, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with aws_call(aws, "ec2 DescribeSecurityGroups"):
        return list(ec2.describe_security_groups(Filters=filters)["SecurityGroups"])


def delete_group(aws: Aws, ec2: Any, gid: str, tries: int, pause: float) -> str | None:
    """Delete a security group; None when gone, else why it stays. An interface of a terminated instance
    may hold it a little longer (DependencyViolation): tried again `tries` times."""
    for attempt in range(tries):
        try:
            with aws_call(aws, f"ec2 DeleteSecurityGroup {gid}"):
                ec2.delete_security_group(GroupId=gid)
            return None
        except ResourceNotFound:
            return None
        except SendenseError as e:
            if "DependencyViolation" not in e.message or attempt == tries - 1:
                return e.message.split(": ", 1)[-1]
        time.sleep(pause)
    return None
