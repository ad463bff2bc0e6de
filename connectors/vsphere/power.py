"""The power of a vSphere source VM (sendense.protocols.SourcePower), for failover and failback.

- `pause_vm` is `SuspendVM_Task` (vSphere's pause: the guest's memory goes to the datastore and its
  vCPUs stop; no write lands after it), `resume_vm` and `power_on_vm` are `PowerOnVM_Task` (a suspended
  VM continues where it was), `power_off_vm` is `PowerOffVM_Task` (hard: the guest gets no say).
- `power_state`: runtime.powerState in bounded time: poweredOn -> running, suspended -> paused,
  poweredOff -> stopped; the VM not found -> gone; the server not answering -> unreachable. A login
  refused or a certificate that does not match raise: a configuration fault, not a source down.
Needs VirtualMachine.Interact.PowerOn, PowerOff and Suspend.
"""

from __future__ import annotations

import logging
from typing import Any

from connectors.vsphere.session import CONNECT_TIMEOUT, Session, calling
from connectors.vsphere.spec import VsphereSource
from sendense.errors import ResourceNotFound, ServerUnreachable
from sendense.protocols import PowerState

log = logging.getLogger(__name__)

STATES: dict[str, PowerState] = {"poweredOn": "running", "suspended": "paused", "poweredOff": "stopped"}


class VsphereSourcePower:
    platform = "vsphere"
    can_power_on = True
    pause_stops = False

    def __init__(self, job: str, spec: VsphereSource) -> None:
        self.job, self.spec = job, spec
        self.session = Session(spec, connect_timeout=min(CONNECT_TIMEOUT, 5.0))

    def _vm(self) -> Any:
        return self.session.find_vm(self.spec.vm, self.spec.datacenter, self.spec.instance_uuid)

    def _state(self) -> tuple[Any, str]:
        vm = self._vm()
        return vm, str(vm.runtime.powerState)

    def power_state(self) -> PowerState:
        try:
            _, state = self._state()
        except ResourceNotFound:
            return "gone"
        except ServerUnreachable:
            return "unreachable"
        return STATES.get(state, "running")

    def _task(self, vm: Any, verb: str, what: str) -> None:
        what = f"source.vm {self.spec.vm}: {what}"
        with calling(what):
            task = getattr(vm, verb)()
        self.session.wait(task, what)

    def pause_vm(self) -> None:
        try:
            vm, state = self._state()
        except ResourceNotFound:
            return
        if state == "poweredOn":
            self._task(vm, "SuspendVM_Task", "suspending it")

    def resume_vm(self) -> None:
        try:
            vm, state = self._state()
        except ResourceNotFound:
            return
        if state == "suspended":
            self._task(vm, "PowerOnVM_Task", "resuming it")

    def power_off_vm(self) -> None:
        try:
            vm, state = self._state()
        except ResourceNotFound:
            return
        if state != "poweredOff":
            self._task(vm, "PowerOffVM_Task", "powering it off")

    def power_on_vm(self) -> None:
        vm, state = self._state()
        if state != "poweredOn":
            self._task(vm, "PowerOnVM_Task", "powering it on")
