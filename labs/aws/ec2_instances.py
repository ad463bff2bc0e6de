"""EC2 instances that really run: moto's instance calls tied to the lab's VMs (`labs.aws.machines`).

- RunInstances: each new instance's VM starts on its volumes (those the image's mappings made, with
  their snapshots' data). `ClientToken` is honoured as EC2 does (moto ignores it): the same token with
  the same parameters answers the original reservation, whatever its instances' state since; other
  parameters are `IdempotentParameterMismatch`.
- StopInstances kills the VM (a power cut; the volumes keep what was written), StartInstances starts a
  new one (console afresh, LaunchTime now), RebootInstances restarts it, TerminateInstances kills it
  before the volumes go. With a state delay (`state_delay`, `AwsLab.set_instance_state_delay`; 0 by
  default: at once), the transitions take time as EC2's do: a stopped instance is `stopping` for that
  long with its VM still running (its guest still writes), then the VM is killed and the instance is
  `stopped`; a started one is `pending` (its VM already booting) until it turns `running`.
  StopInstances with Force=True ends a `stopping` at once. StartInstances of a `stopping` instance is
  `IncorrectInstanceState`, as on EC2. A stop or start of an instance already in that state changes
  nothing. A VM that exits by itself (the guest powered off or reset) leaves its instance
  stopped with `Client.InstanceInitiatedShutdown`.
- GetConsoleOutput: the VM's serial console, base64 (`Output`, absent while there is none), the most
  recent 64 KiB, with `Timestamp` (when it last changed) and `InstanceId`.
- AttachVolume of a volume attached already: `VolumeInUse`; at a device the instance uses already:
  `InvalidParameterValue` ("Attachment point ... is already in use"); DetachVolume of an instance's root
  device while the instance is not stopped: `IncorrectState` ("Unable to detach root volume ...": EC2
  detaches a root volume only from a stopped instance). moto allowed all three.
- DeleteSecurityGroup of a group a network interface or a live instance uses: `DependencyViolation`
  (moto deletes it).
- DescribeInstanceStatus: a running instance whose VM runs is `ok`/`ok` (reachability passed); when its
  console shows that it cannot boot (no bootable device, a kernel panic) its instance status is
  `impaired` (reachability failed, ImpairedSince), as EC2's check fails for a guest that never comes up.
  Stopped instances only with IncludeAllInstances (`not-applicable`).
"""

from __future__ import annotations

import base64
import datetime
import logging
import threading
from collections.abc import Callable
from typing import Any

from moto.core.responses import ActionResult
from moto.core.types import Base64EncodedString
from moto.core.utils import utcnow
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models.instances import Instance, StateReason
from moto.ec2.responses.general import General
from moto.ec2.responses.instances import InstanceResponse

from labs.aws.machines import Machine, Machines

log = logging.getLogger(__name__)

NO_TOKEN = "ABCDE"  # what moto passes when the request had no ClientToken
CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}


class InstanceHooks:
    def __init__(self, bridge: Any, machines: Machines) -> None:
        self.bridge = bridge
        self.backend = bridge.backend
        self.machines = machines
        self.tokens: dict[str, tuple[str, str]] = {}  # ClientToken -> (parameters, reservation id)
        self.state_delay = 0.0  # seconds an instance stays stopping / pending
        self._force = threading.local()  # the Force of the StopInstances being answered
        self._terminating = threading.local()  # moto detaches a terminated instance's volumes itself
        self._transition: dict[str, int] = {}  # instance id -> its latest transition (a settle is for it)

    def install(self) -> None:
        hook = self.bridge.hook
        hook("run_instances", self._run_instances)
        hook("start_instances", self._start_instances)
        hook("stop_instances", self._stop_instances)
        hook("terminate_instances", self._terminate_instances)
        hook("reboot_instances", self._reboot_instances)
        hook("delete_security_group", self._delete_security_group)
        hook("attach_volume", self._attach_volume)
        hook("detach_volume", self._detach_volume)
        hooks = self

        def get_console_output(response: General) -> ActionResult:
            return ActionResult(hooks.console_output(response._get_param("InstanceId")))

        stop = InstanceResponse.stop_instances

        def stop_instances(response: InstanceResponse) -> ActionResult:
            hooks._force.value = response._get_bool_param("Force", False)  # moto drops it
            try:
                return stop(response)
            finally:
                hooks._force.value = False

        def describe_instance_status(response: InstanceResponse) -> ActionResult:
            ids = response._get_param("InstanceIds", [])
            include_all = response._get_bool_param("IncludeAllInstances", False)
            instances = hooks.backend.describe_instance_status(ids, include_all, None)
            return ActionResult({"InstanceStatuses": [hooks.status(i) for i in instances]})

        InstanceResponse.stop_instances = stop_instances  # type: ignore[method-assign,assignment]
        General.get_console_output = get_console_output  # type: ignore[method-assign,assignment]
        InstanceResponse.describe_instance_status = describe_instance_status  # type: ignore[method-assign,assignment]

    # ------------------------------------------------------------------ VMs

    def disks(self, instance: Instance) -> list[str]:
        """The instance's volume ids: the root device's first, then by device name."""
        mapping = dict(instance.block_device_mapping)
        root = getattr(instance, "root_device_name", None)
        order = sorted(mapping, key=lambda d: (d != root, d))
        return [mapping[d].volume_id for d in order]

    def boot(self, instance: Instance) -> None:
        self.machines.start(instance.id, self.disks(instance))

    def guest_stopped(self, machine: Machine) -> None:
        """The VM exited by itself: the instance is stopped, by its guest (unless a newer VM runs)."""
        with self.bridge.lock:
            if self.machines.current(machine.instance_id) is not machine or machine.stopping:
                return
            try:
                instance = self.backend.get_instance(machine.instance_id)
            except EC2ClientError:
                return
            if instance.state in ("running", "pending"):
                self._next(instance.id)  # (a pending start ends here)
                instance.stop()
                instance._reason = f"Client.InstanceInitiatedShutdown ({utcnow():%Y-%m-%d %H:%M:%S} GMT)"
                instance.state_reason = StateReason(
                    "Client.InstanceInitiatedShutdown: Instance initiated shutdown",
                    "Client.InstanceInitiatedShutdown",
                )

    # ------------------------------------------------------------------ hooks

    def _run_instances(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def run_instances(
            image_id: str, count: int, user_data: Any, security_group_names: Any, **kw: Any
        ) -> Any:
            token = kw.get("client_token") or NO_TOKEN
            params = repr(
                (image_id, count, str(user_data), security_group_names,
                 sorted((k, repr(v)) for k, v in kw.items() if k != "client_token"))
            )  # fmt: skip
            if token != NO_TOKEN and token in self.tokens:
                seen, reservation_id = self.tokens[token]
                if seen != params:
                    raise EC2ClientError(
                        "IdempotentParameterMismatch",
                        f"The client token {token} was used with different parameters.",
                    )
                return self.backend.reservations[reservation_id]
            reservation = orig(image_id, count, user_data, security_group_names, **kw)
            if token != NO_TOKEN:
                self.tokens[token] = (params, reservation.id)
            for instance in reservation.instances:
                self.boot(instance)
            return reservation

        return run_instances

    def _set(self, instance: Instance, state: str) -> None:
        instance._state.name, instance._state.code = state, CODES[state]

    def _next(self, instance_id: str) -> int:
        """A new transition of the instance: the settle of an earlier one no longer applies."""
        self._transition[instance_id] = self._transition.get(instance_id, 0) + 1
        return self._transition[instance_id]

    def _later(self, instance_id: str, settle: Callable[[], None]) -> None:
        """Run `settle` after the state delay, under the lab's lock, if no newer transition came."""
        n = self._next(instance_id)

        def run() -> None:
            with self.bridge.lock:
                if self._transition.get(instance_id) == n:
                    settle()

        timer = threading.Timer(self.state_delay, run)
        timer.daemon = True
        timer.start()

    def _start_instances(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def start_instances(instance_ids: list[str]) -> Any:
            for instance in self.backend.get_multi_instances_by_id(instance_ids):
                if instance.state in ("terminated", "shutting-down", "stopping"):
                    raise EC2ClientError(
                        "IncorrectInstanceState",
                        f"The instance '{instance.id}' is not in a state from which it can be started.",
                    )
            started = orig(instance_ids)
            for instance, previous in started:
                if previous.name in ("running", "pending"):
                    self._set(instance, previous.name)  # (moto says running at once)
                    continue
                instance.launch_time = utcnow()
                self.boot(instance)
                if self.state_delay > 0:
                    self._set(instance, "pending")

                    def up(i: Instance = instance) -> None:
                        self._set(i, "running")

                    self._later(instance.id, up)
                else:
                    self._next(instance.id)
            return started

        return start_instances

    def _stop_instances(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def stop_instances(instance_ids: list[str]) -> Any:
            for instance in self.backend.get_multi_instances_by_id(instance_ids):
                if instance.state == "terminated":
                    raise EC2ClientError(
                        "IncorrectInstanceState",
                        f"This instance '{instance.id}' is not in a state from which it can be stopped.",
                    )
            force = bool(getattr(self._force, "value", False))
            stopped = orig(instance_ids)
            for instance, previous in stopped:
                if previous.name == "stopped":
                    continue
                if previous.name == "stopping" and not force:
                    self._set(instance, "stopping")  # (moto says stopped at once) its stop goes on
                    continue
                if self.state_delay > 0 and not force:
                    self._set(instance, "stopping")  # its VM runs on until the stop completes

                    def done(i: Instance = instance) -> None:
                        self.machines.stop(i.id)
                        self._set(i, "stopped")

                    self._later(instance.id, done)
                else:
                    self._next(instance.id)
                    self.machines.stop(instance.id)
            return stopped

        return stop_instances

    def _terminate_instances(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def terminate_instances(instance_ids: list[str]) -> Any:
            self.backend.get_multi_instances_by_id(instance_ids)  # unknown ids: nothing stops
            for instance_id in instance_ids:
                self._next(instance_id)  # a stop or start under way ends here
                self.machines.stop(instance_id)  # before its volumes go
            self._terminating.on = True
            try:
                return orig(instance_ids)
            finally:
                self._terminating.on = False

        return terminate_instances

    def _reboot_instances(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def reboot_instances(instance_ids: list[str]) -> Any:
            rebooted = orig(instance_ids)
            for instance in rebooted:
                if instance.state == "running":
                    self.machines.stop(instance.id)
                    self.boot(instance)
            return rebooted

        return reboot_instances

    def _attach_volume(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def attach_volume(volume_id: str, instance_id: str, device_path: str, *args: Any, **kw: Any) -> Any:
            volume = self.backend.get_volume(volume_id)
            instance = self.backend.get_instance(instance_id)
            if volume.attachment is not None:
                raise EC2ClientError("VolumeInUse", f"{volume_id} is already attached to an instance")
            if device_path in instance.block_device_mapping:
                raise EC2ClientError(
                    "InvalidParameterValue",
                    f"Invalid value '{device_path}' for unixDevice. Attachment point {device_path} is "
                    "already in use",
                )
            return orig(volume_id, instance_id, device_path, *args, **kw)

        return attach_volume

    def _detach_volume(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def detach_volume(volume_id: str, instance_id: str, device_path: str, *args: Any, **kw: Any) -> Any:
            volume = self.backend.get_volume(volume_id)
            attached = volume.attachment
            if attached is not None:
                instance = attached.instance
                root = getattr(instance, "root_device_name", None)
                inside = getattr(self._terminating, "on", False)
                if attached.device == root and instance.state != "stopped" and not inside:
                    raise EC2ClientError(
                        "IncorrectState",
                        f"Unable to detach root volume '{volume_id}' from instance '{instance.id}'",
                    )
            return orig(volume_id, instance_id, device_path, *args, **kw)

        return detach_volume

    def _delete_security_group(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def delete_security_group(name: str | None = None, group_id: str | None = None) -> Any:
            group = self.backend.get_security_group_by_name_or_id(group_id or name)
            users = [
                eni.id
                for eni in self.backend.enis.values()
                if group is not None and any(g.id == group.id for g in eni.group_set)
            ]
            users += [
                i.id
                for i in self.backend.all_instances()
                if i.state != "terminated"
                and group is not None
                and any(g.id == group.id for g in i.security_groups)
            ]
            if users:  # moto deletes a group in use; EC2 refuses
                raise EC2ClientError("DependencyViolation", f"resource {group.id} has a dependent object")
            return orig(name, group_id)

        return delete_security_group

    # ------------------------------------------------------------------ what EC2 shows

    def console_output(self, instance_id: str) -> dict[str, Any]:
        self.backend.get_instance(instance_id)  # InvalidInstanceID.NotFound
        text, changed = self.machines.console(instance_id)
        out: dict[str, Any] = {"InstanceId": instance_id}
        out["Timestamp"] = _utc(changed) if changed is not None else utcnow()
        if text:
            out["Output"] = Base64EncodedString(base64.b64encode(text).decode("ascii"))
        return out

    def status(self, instance: Instance) -> dict[str, Any]:
        out: dict[str, Any] = {
            "InstanceId": instance.id,
            "AvailabilityZone": instance.availability_zone,
            "InstanceState": {"Code": instance.state_code, "Name": instance.state},
        }
        if instance.state != "running":
            out["InstanceStatus"] = out["SystemStatus"] = {"Status": "not-applicable"}
            return out
        machine = self.machines.current(instance.id)
        passed = {"Status": "ok", "Details": [{"Name": "reachability", "Status": "passed"}]}
        if machine is None or not machine.alive:
            failed = {"Status": "impaired", "Details": [{"Name": "reachability", "Status": "failed"}]}
            out["InstanceStatus"], out["SystemStatus"] = failed, failed
            return out
        out["SystemStatus"] = passed
        if self.machines.boot_failure(instance.id) is not None:
            _, changed = self.machines.console(instance.id)
            detail: dict[str, Any] = {"Name": "reachability", "Status": "failed"}
            if changed is not None:
                detail["ImpairedSince"] = _utc(changed)
            out["InstanceStatus"] = {"Status": "impaired", "Details": [detail]}
        else:
            out["InstanceStatus"] = passed
        return out


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).replace(tzinfo=None)
