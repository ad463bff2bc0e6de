"""What an EC2 instance looks like, for VMs made from its points (VmInfo): vCPUs and memory of its
instance type (DescribeInstanceTypes), boot mode, its network interfaces (MAC, subnet), an OS hint."""

from __future__ import annotations

from typing import Any

from connectors.aws.client import Aws, aws_call
from sendense.errors import SendenseError
from sendense.models import DiskInfo, NicInfo


def instance_hardware(aws: Aws, ec2: Any, inst: dict[str, Any], disks: list[DiskInfo]) -> dict[str, Any]:
    """VmInfo's hardware fields of instance `inst` (a DescribeInstances entry), and `disks` (root first)
    with the root device's boot order."""
    itype = str(inst.get("InstanceType", ""))
    cpus, memory_mib = 0, 0
    if itype:
        try:
            with aws_call(aws, f"ec2 DescribeInstanceTypes {itype}"):
                types = ec2.describe_instance_types(InstanceTypes=[itype]).get("InstanceTypes", [])
        except SendenseError:  # an unknown type or no permission: the hardware stays unknown, said as 0
            types = []
        if types:
            cpus = int(types[0].get("VCpuInfo", {}).get("DefaultVCpus", 0))
            memory_mib = int(types[0].get("MemoryInfo", {}).get("SizeInMiB", 0))
    cpu_opts = inst.get("CpuOptions") or {}
    if cpu_opts.get("CoreCount") and cpu_opts.get("ThreadsPerCore"):  # an instance's own CPU options win
        cpus = int(cpu_opts["CoreCount"]) * int(cpu_opts["ThreadsPerCore"])
    boot = str(inst.get("CurrentInstanceBootMode") or inst.get("BootMode") or "")
    firmware = "uefi" if boot.startswith("uefi") else "bios" if boot == "legacy-bios" else ""
    nics = [
        NicInfo(
            mac=str(n.get("MacAddress", "")), network=f"subnet:{n['SubnetId']}" if n.get("SubnetId") else ""
        )
        for n in sorted(
            inst.get("NetworkInterfaces", []), key=lambda n: n.get("Attachment", {}).get("DeviceIndex", 0)
        )
    ]
    details = str(inst.get("PlatformDetails") or inst.get("Platform") or "").lower()
    os_hint = (
        "windows" if "windows" in details else "linux" if ("linux" in details or "unix" in details) else ""
    )
    out = [d.model_copy(update={"boot_order": 1 if i == 0 else None}) for i, d in enumerate(disks)]
    return {
        "cpus": cpus,
        "memory_mib": memory_mib,
        "firmware": firmware,
        "nics": nics,
        "os_hint": os_hint,
        "disks": out,
    }
