"""VMs from recovery points on the AWS target (`VmProvisioner`): EC2 instances booted from a point's
EBS snapshots.

- create_vm(plan): the point's snapshots registered as an image (the boot disk at the root device,
  launch.py), then RunInstances of it with the target's instance settings (type, key; plan.cpus and
  plan.memory_mib choose nothing on EC2: the instance type does) and the plan's network (vm_network.py:
  test mode isolated in a security group of its own with no rule, production mode on the mapped
  subnets). The image, the instance, its volumes and the test VM's group are tagged with the VM's name
  (`sendense:vm`), the job's name and identity (`sendense:job`, `sendense:job-id`), the point and the
  mode; that is how every later verb, and a retried create, finds them. RunInstances carries a
  ClientToken derived from the job's identity, the VM's name and the image: a create retried after its
  answer was lost gets the same instance from EC2, never a second one; a VM of that name found already
  is returned as it is. EC2 starts an instance at RunInstances: a created VM is running (power_on has
  nothing to do then).
- Nothing is undone inside create_vm: a create killed half-way leaves what it made, tagged, and
  `destroy_vm(name)` (the saga's undo, registered before the create) removes it; a retried create
  takes it over.
- destroy_vm(name): terminate (and wait), then the volumes left, the image, the isolated group. What
  belongs to the VM is only what carries its name and this job's identity. Gone already: no error.
- boot_check: running, the pattern on the console (GetConsoleOutput, Latest where EC2 offers it) and
  the instance status not impaired; a console that shows the guest cannot boot, an impaired status or
  an instance that stopped decide a failure, with that evidence.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.aws import vm_network
from connectors.aws.client import Aws, aws_call
from connectors.aws.launch import image_request
from connectors.aws.source import delete_snapshot
from connectors.aws.spec import AwsTarget
from connectors.aws.tags import TAG_JOB, TAG_JOB_ID, TAG_MODE, TAG_POINT, TAG_VM, tags_of
from connectors.aws.target import AwsTargetConnector
from sendense import config
from sendense.errors import InvalidSpec, ResourceNotFound, SendenseError, TargetError
from sendense.models import BootCheck, NetworkInfo, VmPlan, VmRef, boot_disks
from tools.boot import BOOT_FAILURE, console_lines

log = logging.getLogger(__name__)

LIVE = ["pending", "running", "stopping", "stopped", "shutting-down"]  # every state but terminated


def failback_state(job: str, name: str) -> Path:
    """Where a failback keeps its local record of VM `name`'s reverse snapshots (vm_changes.py)."""
    return config.home() / "aws-failback" / job / f"vm-{name}"


class AwsVmProvisioner:
    """VmProvisioner: EC2 instances from the job's points, in the target's region."""

    platform = "aws"
    poll_seconds = 1.0  # between looks at an instance's state or console
    wait_seconds = 900.0  # for an instance to stop or terminate

    def __init__(self, job: str, spec: AwsTarget, job_id: str = "", state_dir: Path | None = None) -> None:
        self.job, self.spec, self.job_id = job, spec, job_id
        self.aws = Aws(spec.region, spec.endpoint_url)
        self.target = AwsTargetConnector(job, spec, state_dir, job_id)
        self._ec2: Any = None
        self._latest = True  # GetConsoleOutput Latest=true, until EC2 says the instance type has none

    @property
    def ec2(self) -> Any:
        if self._ec2 is None:
            self._ec2 = self.aws.client("ec2")
        return self._ec2

    # ------------------------------------------------------------------ what is whose

    def _label(self, name: str) -> str:
        return f"sendense-{self.job}-{self.job_id or 'job'}-{name}"

    def _tags(self, plan: VmPlan) -> dict[str, str]:
        return {
            TAG_JOB: self.job,
            TAG_JOB_ID: self.job_id,
            TAG_VM: plan.name,
            TAG_POINT: plan.point_id,
            TAG_MODE: plan.mode,
            "Name": plan.name,
        }

    def _filters(self, name: str | None) -> list[dict[str, Any]]:
        f = [{"Name": f"tag:{TAG_JOB}", "Values": [self.job]}]
        return f + ([{"Name": f"tag:{TAG_VM}", "Values": [name]}] if name is not None else [])

    def _mine(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [i for i in items if tags_of(i).get(TAG_JOB_ID, "") == self.job_id and TAG_VM in tags_of(i)]

    def _instances(self, name: str | None) -> list[dict[str, Any]]:
        f = [*self._filters(name), {"Name": "instance-state-name", "Values": LIVE}]
        out: list[dict[str, Any]] = []
        with aws_call(self.aws, f"ec2 DescribeInstances of job {self.job}"):
            for page in self.ec2.get_paginator("describe_instances").paginate(Filters=f):
                out += [i for r in page["Reservations"] for i in r["Instances"]]
        return self._mine(out)

    def _images(self, name: str | None) -> list[dict[str, Any]]:
        with aws_call(self.aws, f"ec2 DescribeImages of job {self.job}"):
            return self._mine(
                self.ec2.describe_images(Owners=["self"], Filters=self._filters(name))["Images"]
            )

    def _volumes(self, name: str | None) -> list[dict[str, Any]]:
        with aws_call(self.aws, f"ec2 DescribeVolumes of job {self.job}"):
            return self._mine(self.ec2.describe_volumes(Filters=self._filters(name))["Volumes"])

    def _snapshots(self, name: str | None) -> list[dict[str, Any]]:
        """A failback's reverse snapshots of the VM (vm_changes.py): they carry its name too."""
        with aws_call(self.aws, f"ec2 DescribeSnapshots of job {self.job}"):
            return self._mine(
                self.ec2.describe_snapshots(OwnerIds=["self"], Filters=self._filters(name))["Snapshots"]
            )

    def _groups(self, name: str | None) -> list[dict[str, Any]]:
        return self._mine(vm_network.find_groups(self.aws, self.ec2, self._filters(name)))

    def _ref(self, inst: dict[str, Any]) -> VmRef:
        t = tags_of(inst)
        return VmRef(
            name=t[TAG_VM],
            platform=self.platform,
            point_id=t.get(TAG_POINT, ""),
            mode="production" if t.get(TAG_MODE) == "production" else "test",
            vm_id=inst.get("InstanceId", ""),
            state=inst.get("State", {}).get("Name", "incomplete"),
        )

    def _instance(self, name: str) -> dict[str, Any]:
        found = self._instances(name)
        if not found:
            raise ResourceNotFound(f"vm {name}: no instance of job {self.job} in {self.aws.where()}")
        return found[0]

    def _describe(self, instance_id: str) -> dict[str, Any]:
        with aws_call(self.aws, f"ec2 DescribeInstances {instance_id}"):
            return dict(
                self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
            )

    def _wait(self, instance_id: str, states: set[str], vm: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.wait_seconds
        while True:
            inst = self._describe(instance_id)
            if inst["State"]["Name"] in states:
                return inst
            if time.monotonic() > deadline:
                raise TargetError(
                    f"vm {vm}: instance {instance_id} is still {inst['State']['Name']} after "
                    f"{self.wait_seconds:.0f} s (waiting for {' or '.join(sorted(states))})",
                    retryable=True,
                )
            time.sleep(self.poll_seconds)

    # ------------------------------------------------------------------ create

    def create_vm(self, plan: VmPlan) -> VmRef:
        found = self._instances(plan.name)
        if found:
            ref = self._ref(found[0])
            if (ref.point_id, ref.mode) != (plan.point_id, plan.mode):
                raise TargetError(
                    f"vm {plan.name}: exists already from point {ref.point_id} ({ref.mode}, {ref.vm_id}); "
                    "destroy it first"
                )
            return ref
        point = self.target.get_point(plan.point_id)
        disks = boot_disks(point, plan.disks)
        tags = self._tags(plan)
        image_id = self._image(plan, [d.path for d in disks], tags, point.point_id, disks)
        nics = vm_network.interfaces(
            self.aws,
            self.ec2,
            self.spec,
            plan,
            lambda vpc: vm_network.isolated_group(
                self.aws, self.ec2, f"{self._label(plan.name)}-isolated", vpc, tags, plan.name
            ),
        )
        token = hashlib.sha256(f"{self.job_id}\0{self.job}\0{plan.name}\0{image_id}".encode()).hexdigest()
        settings = self.spec.instance
        run: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": settings.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": token[:64],
            "NetworkInterfaces": nics,
            "InstanceInitiatedShutdownBehavior": "stop",
            "TagSpecifications": [
                {"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
                for kind in ("instance", "volume")
            ],
        }
        if settings.key_name:
            run["KeyName"] = settings.key_name
        log.info("vm %s: launching %s from point %s (image %s)", plan.name, settings.instance_type,
                 plan.point_id, image_id)  # fmt: skip
        with aws_call(self.aws, f"vm {plan.name}: ec2 RunInstances of {image_id} (point {plan.point_id})"):
            inst = self.ec2.run_instances(**run)["Instances"][0]
        return self._ref({**inst, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]})

    def _image(
        self, plan: VmPlan, snapshots: list[str], tags: dict[str, str], point_id: str, disks: Any
    ) -> str:
        """The VM's image: one an earlier attempt registered (from this point's snapshots), or a new one."""
        for image in self._images(plan.name):
            mapped = [m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings", []) if "Ebs" in m]
            if tags_of(image).get(TAG_POINT) == point_id and sorted(mapped) == sorted(snapshots):
                return str(image["ImageId"])
            raise TargetError(
                f"vm {plan.name}: image {image['ImageId']} of an earlier create from point "
                f"{tags_of(image).get(TAG_POINT, '?')} stays; destroy the VM first"
            )
        name = self._label(plan.name)
        args = image_request(
            name, f"sendense job {self.job} VM {plan.name} from point {point_id}", disks,
            self.spec.instance, plan.firmware, tags,
        )  # fmt: skip
        try:
            with aws_call(self.aws, f"vm {plan.name}: ec2 RegisterImage {name} (point {point_id})"):
                return str(self.ec2.register_image(**args)["ImageId"])
        except SendenseError as e:
            if "InvalidAMIName.Duplicate" in e.message:  # a concurrent attempt of this create
                for image in self._images(plan.name):
                    return str(image["ImageId"])
                raise TargetError(
                    f"vm {plan.name}: an image named {name} exists and is not this job's"
                ) from None
            raise

    # ------------------------------------------------------------------ power

    def power_on(self, name: str) -> VmRef:
        inst = self._instance(name)
        iid, state = inst["InstanceId"], inst["State"]["Name"]
        if state == "shutting-down":
            raise TargetError(f"vm {name}: instance {iid} is shutting down (being destroyed)")
        if state == "stopping":
            inst = self._wait(iid, {"stopped"}, name)
            state = "stopped"
        if state == "stopped":
            with aws_call(self.aws, f"vm {name}: ec2 StartInstances {iid}"):
                self.ec2.start_instances(InstanceIds=[iid])
            inst = self._describe(iid)
        return self._ref(inst)

    def power_off(self, name: str) -> VmRef:
        found = self._instances(name)
        if not found:
            return VmRef(name=name, platform=self.platform, point_id="", mode="test", state="gone")
        iid = found[0]["InstanceId"]
        if found[0]["State"]["Name"] in ("pending", "running"):
            with aws_call(self.aws, f"vm {name}: ec2 StopInstances {iid}"):
                self.ec2.stop_instances(InstanceIds=[iid], Force=True)
        return self._ref(self._wait(iid, {"stopped", "terminated"}, name))

    # ------------------------------------------------------------------ console and boot check

    def _console_text(self, instance_id: str) -> str:
        kw: dict[str, Any] = {"InstanceId": instance_id}
        if self._latest:
            kw["Latest"] = True
        try:
            with aws_call(self.aws, f"ec2 GetConsoleOutput {instance_id}"):
                return str(self.ec2.get_console_output(**kw).get("Output") or "")  # botocore decodes base64
        except SendenseError as e:
            if self._latest and ("UnsupportedOperation" in e.message or "InvalidParameter" in e.message):
                self._latest = False  # not a Nitro instance: the console EC2 captures at state changes
                return self._console_text(instance_id)
            raise

    def console(self, name: str) -> str:
        return "\n".join(console_lines(self._console_text(self._instance(name)["InstanceId"])))

    def boot_check(
        self, name: str, pattern: str, timeout: float, guest_agent: bool = False, status_checks: bool = False
    ) -> BootCheck:
        """Until `pattern` shows on the console (GetConsoleOutput), the instance fails (a state other
        than pending/running, an impaired status, a boot failure on the console) or `timeout`. With
        `status_checks`, the instance's own status checks must also say ok (DescribeInstanceStatus:
        instance status and system status, both `ok`; `initializing` waits). EC2 has no guest agent
        channel: `guest_agent` is refused in one line."""
        if guest_agent:
            raise InvalidSpec(
                f"VM {name}: recovery.boot_check.guest_agent: EC2 has no guest agent channel; "
                "use status_checks (instance and system status checks) and console_contains"
            )
        try:
            wanted = re.compile(pattern)
        except re.error as e:
            raise InvalidSpec(f"boot check pattern {pattern!r}: {e}") from None
        iid = self._instance(name)["InstanceId"]
        deadline = time.monotonic() + timeout
        while True:
            inst = self._describe(iid)
            state = inst["State"]["Name"]
            status = self._status(iid) if state == "running" else {}
            impaired = "impaired" in status.values()
            text = self._console_text(iid)  # read after the status: it holds what the status judged
            lines = console_lines(text[: text.rfind("\n") + 1])  # whole lines decide, never one half-written
            seconds = round(max(0.0, (datetime.now(UTC) - inst["LaunchTime"]).total_seconds()), 1)
            last = (console_lines(text) or ["no console output"])[-1]
            failure = next((m.group(0).strip() for ln in lines if (m := BOOT_FAILURE.search(ln))), None)
            hit = next((ln for ln in lines if wanted.search(ln)), None)
            if state not in ("pending", "running"):
                reason = inst.get("StateReason", {}).get("Message", "")
                why = f"instance {iid} is {state}" + (f" ({reason})" if reason else "")
                return BootCheck(
                    ok=False, seconds=seconds, evidence=f"{why}; console: {failure or last}", via="status"
                )
            if failure is not None:
                return BootCheck(ok=False, seconds=seconds, evidence=failure, via="console")
            if impaired:
                evidence = f"instance status impaired; console: {last}"
                return BootCheck(ok=False, seconds=seconds, evidence=evidence, via="status")
            checked = not status_checks or (status.get("instance") == status.get("system") == "ok")
            if hit is not None and state == "running" and checked:
                evidence = hit + ("; instance and system status checks ok" if status_checks else "")
                return BootCheck(ok=True, seconds=seconds, evidence=evidence, via="console")
            if time.monotonic() >= deadline:
                if hit is not None:  # the console says up, the status checks do not
                    inst_st, sys_st = status.get("instance") or "none", status.get("system") or "none"
                    why = (
                        f"{iid}'s status checks not ok after {timeout:.0f} s (instance {inst_st}, "
                        f"system {sys_st}); console: {hit}"
                    )
                    return BootCheck(ok=False, seconds=seconds, evidence=why, via="status")
                return BootCheck(
                    ok=False,
                    seconds=seconds,
                    evidence=f"no /{pattern}/ on {iid}'s console after {timeout:.0f} s; last line: {last}",
                    via="console",
                )
            time.sleep(self.poll_seconds)

    def _status(self, instance_id: str) -> dict[str, str]:
        """The instance's status checks: {"instance": ..., "system": ...} (ok, impaired, initializing,
        insufficient-data, not-applicable); empty while EC2 reports none."""
        with aws_call(self.aws, f"ec2 DescribeInstanceStatus {instance_id}"):
            found = self.ec2.describe_instance_status(InstanceIds=[instance_id])["InstanceStatuses"]
        out: dict[str, str] = {}
        for s in found:
            out["instance"] = s.get("InstanceStatus", {}).get("Status", "")
            out["system"] = s.get("SystemStatus", {}).get("Status", "")
        return out

    # ------------------------------------------------------------------ listings

    def list_vms(self) -> list[VmRef]:
        """This job's VMs: instances, and what a create killed half-way left (state `incomplete`)."""
        refs = {r.name: r for r in map(self._ref, self._instances(None))}
        for item in [*self._images(None), *self._groups(None), *self._volumes(None), *self._snapshots(None)]:
            refs.setdefault(tags_of(item)[TAG_VM], self._ref({"Tags": item.get("Tags", [])}))
        return sorted(refs.values(), key=lambda r: r.name)

    def list_networks(self) -> list[NetworkInfo]:
        """The region's subnets (what `network_map` maps source networks to), each with its VPC."""
        out: list[NetworkInfo] = []
        with aws_call(self.aws, "ec2 DescribeSubnets"):
            for page in self.ec2.get_paginator("describe_subnets").paginate():
                out += [
                    NetworkInfo(name=s["SubnetId"], kind=f"subnet in {s['VpcId']}") for s in page["Subnets"]
                ]
        return sorted(out, key=lambda n: (n.kind, n.name))

    # ------------------------------------------------------------------ destroy

    def destroy_vm(self, name: str) -> None:
        stays: list[str] = []
        ids = [i["InstanceId"] for i in self._instances(name)]
        if ids:
            try:
                with aws_call(self.aws, f"ec2 TerminateInstances {' '.join(ids)}"):
                    self.ec2.terminate_instances(InstanceIds=ids)
                for iid in ids:
                    self._wait(iid, {"terminated"}, name)
            except SendenseError as e:
                stays.append(f"instance {' '.join(ids)} ({_why(e)})")
        for vol in self._volumes(name):  # DeleteOnTermination took the launch's own; others (attached later)
            vid = vol["VolumeId"]
            try:
                with aws_call(self.aws, f"ec2 DeleteVolume {vid}"):
                    self.ec2.delete_volume(VolumeId=vid)
            except ResourceNotFound:
                pass
            except SendenseError as e:
                stays.append(f"volume {vid} ({_why(e)})")
        for image in self._images(name):
            try:
                with aws_call(self.aws, f"ec2 DeregisterImage {image['ImageId']}"):
                    self.ec2.deregister_image(ImageId=image["ImageId"])
            except ResourceNotFound:
                pass
            except SendenseError as e:
                stays.append(f"image {image['ImageId']} ({_why(e)})")
        for snap in self._snapshots(name):  # a failback's reverse snapshots of it
            why = delete_snapshot(self.aws, self.ec2, snap["SnapshotId"])
            if why is not None:
                stays.append(f"snapshot {snap['SnapshotId']} ({why})")
        if not any(s.startswith("snapshot") for s in stays):
            shutil.rmtree(failback_state(self.job, name), ignore_errors=True)
        for group in self._groups(name):
            why = vm_network.delete_group(self.aws, self.ec2, group["GroupId"], 30, self.poll_seconds)
            if why is not None:
                stays.append(f"security group {group['GroupId']} ({why})")
        if stays:
            raise TargetError(f"vm {name}: what was made for it stays: {'; '.join(stays)}")
        log.info(
            "vm %s of job %s: destroyed%s", name, self.job, f" (instance {' '.join(ids)})" if ids else ""
        )


def _why(e: SendenseError) -> str:
    """The AWS part of a mapped error (after the call it names)."""
    return e.message.split(": ", 1)[-1]
