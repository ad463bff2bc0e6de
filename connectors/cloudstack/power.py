"""The power of a CloudStack source VM (sendense.protocols.SourcePower), through the API only: it runs
on any agent (the control queue), never on the VM's host.

CloudStack has no pause: `pause_vm` is stopVirtualMachine (`pause_stops`), and `resume_vm` starts the
VM again (its guest boots afresh).

- pause_vm: stopVirtualMachine NOT forced first, waited until listVirtualMachines says Stopped. Why
  not forced: in a failover the pause comes BEFORE the final sync ("nothing lands on its disks after
  the next snapshot"), so what a guest shutdown writes (its flushed caches, its journal, its unmounts)
  lands before the final point and is in it: the failed-over VM starts from a cleanly stopped guest,
  not from a power cut. CloudStack's KVM agent asks the guest (ACPI) and destroys the domain itself
  when the guest does not stop in time; a stop still not done after `force_after` seconds (a hung
  guest, an agent that gave up) is repeated with forced=true. The pause returns only once the API says
  Stopped: a stopping guest still writes.
- power_off_vm: stopVirtualMachine forced=true (the domain destroyed at once): at power-off the final
  sync has been taken, so the guest gets no chance to write after the final point (a guest shutdown
  would run it and land writes after it). CloudStack's forced stop destroys the QEMU process, which
  drains its I/O and stores its persistent dirty bitmaps on SIGTERM.
- resume_vm / power_on_vm: startVirtualMachine, whose async job ends once the VM is Running (waited
  for, then checked). A VM stopping is waited for until Stopped first; one starting, until Running.
- power_state: one listVirtualMachines (two with the zone when the VM is named by name) with a short
  timeout and no retry: Running, Starting, Stopping, Migrating (and states CloudStack adds later):
  running (it may write); Stopped, Shutdown, Error: stopped; Destroyed, Expunging, or no such VM:
  gone; a connection error, a timeout, 429 or 5xx: unreachable. A refused key (401), an unknown zone
  or a parameter CloudStack refuses raise their one-line error: a configuration fault, never a VM down.

Every verb is idempotent: it acts on the state it finds (a stop of a Stopped VM, a start of a Running
one, do nothing). Errors are one line naming the VM as the spec names it, never a key.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from connectors.cloudstack import api as csapi
from connectors.cloudstack.client import CloudStackApiError, CloudStackClient
from connectors.cloudstack.spec import CloudStackSource
from sendense.errors import ResourceNotFound, ResourceUnavailable, SendenseError
from sendense.protocols import PowerState

log = logging.getLogger(__name__)

STATES: dict[str, PowerState] = {
    "Running": "running",
    "Starting": "running",
    "Stopping": "running",
    "Migrating": "running",
    "Stopped": "stopped",
    "Shutdown": "stopped",  # (stopped from inside the guest, as CloudStack 4.19+ says it)
    "Error": "stopped",  # (a start that failed: no process runs it)
    "Destroyed": "gone",
    "Expunging": "gone",
}
INTERNAL_ERROR = 530  # CloudStack's "internal error": the management server failing, not an answer


class CloudStackSourcePower:
    platform = "cloudstack"
    can_power_on = True
    pause_stops = True
    state_seconds = 5.0  # power_state answers within about this (two calls at most)
    poll_seconds = 1.0  # between looks at the VM's state, and at a job's
    force_after = 120.0  # a stop not forced still under way after this is forced
    wait_seconds = 900.0  # for a stop or a start to end

    def __init__(self, job: str, spec: CloudStackSource) -> None:
        self.job, self.spec = job, spec
        self._api: CloudStackClient | None = None

    def _where(self) -> str:
        return f"CloudStack VM {self.spec.vm}"

    def _client(self, **kw: Any) -> CloudStackClient:
        return csapi.client_for(self.spec, **kw)

    @property
    def api(self) -> CloudStackClient:
        if self._api is None:
            self._api = self._client(poll_interval=self.poll_seconds, job_timeout=self.wait_seconds)
        return self._api

    def _vm(self, api: CloudStackClient | None = None) -> dict[str, Any] | None:
        """The VM as the API lists it now, None when it is not there (any more)."""
        try:
            return csapi.find_vm(api or self.api, self.spec)
        except ResourceNotFound:
            return None

    @staticmethod
    def _state(vm: dict[str, Any] | None) -> str:
        return "Destroyed" if vm is None else str(vm.get("state"))

    def power_state(self) -> PowerState:
        api = self._client(timeout=self.state_seconds / 2, retries=0)
        try:
            vm = self._vm(api)
        except ResourceUnavailable as e:
            log.warning("%s: no answer: %s", self._where(), e)
            return "unreachable"
        except CloudStackApiError as e:
            if e.errorcode != INTERNAL_ERROR:
                raise
            log.warning("%s: CloudStack fails: %s", self._where(), e)
            return "unreachable"
        return STATES.get(self._state(vm), "running")  # (a state CloudStack adds later: not proven off)

    # ------------------------------------------------------------------ waits

    def _settled(self, verb: str, vm: dict[str, Any] | None) -> dict[str, Any] | None:
        """The VM once it is not Starting, Stopping or Migrating (a step under way is let end)."""
        t0 = time.monotonic()
        while vm is not None and self._state(vm) in ("Starting", "Stopping", "Migrating"):
            if time.monotonic() - t0 > self.wait_seconds:
                raise ResourceUnavailable(
                    f"{self._where()}: still {self._state(vm)} after {self.wait_seconds:.0f} s ({verb})"
                )
            time.sleep(self.poll_seconds)
            vm = self._vm()
        return vm

    def _stop(self, verb: str, vm: dict[str, Any], forced: bool) -> None:
        what = f"stopVirtualMachine {self.spec.vm}" + (" (forced)" if forced else "")
        limit = self.wait_seconds if forced else self.force_after
        api = self._client(poll_interval=self.poll_seconds, job_timeout=limit)
        try:
            api.job("stopVirtualMachine", what, id=vm["id"], forced=forced)
        except (CloudStackApiError, ResourceUnavailable) as e:
            if forced:
                raise
            now = self._vm()
            if STATES.get(self._state(now)) in ("stopped", "gone"):
                return
            log.warning("%s: the stop did not end (%s): forcing it", self._where(), e)
            self._stop(verb, now or vm, forced=True)

    def _stopped(self, verb: str, forced: bool) -> None:
        t0 = time.monotonic()
        vm = self._settled(verb, self._vm())
        if STATES.get(self._state(vm)) in ("stopped", "gone"):
            return
        assert vm is not None
        self._stop(verb, vm, forced)
        vm = self._settled(verb, self._vm())
        state = self._state(vm)
        if STATES.get(state) not in ("stopped", "gone"):
            raise ResourceUnavailable(f"{self._where()}: still {state} after its stop ({verb})")
        log.info("%s: stopped (%s) in %.1f s", self._where(), verb, time.monotonic() - t0)

    def pause_vm(self) -> None:
        """stopVirtualMachine, a guest shutdown first (see the module), waited until Stopped."""
        self._stopped("pause", forced=False)

    def power_off_vm(self) -> None:
        """stopVirtualMachine forced, waited until Stopped (see the module)."""
        self._stopped("power off", forced=True)

    # ------------------------------------------------------------------ start

    def _started(self, verb: str, found: dict[str, Any]) -> None:
        t0 = time.monotonic()
        vm = self._settled(verb, found)
        if vm is None or STATES.get(self._state(vm)) == "gone":
            raise ResourceNotFound(f"{self._where()} is {self._state(vm)}: nothing to start ({verb})")
        if self._state(vm) == "Running":
            return
        self.api.job("startVirtualMachine", f"startVirtualMachine {self.spec.vm}", id=vm["id"])
        vm = self._settled(verb, self._vm())
        state = self._state(vm)
        if state != "Running":
            raise SendenseError(f"{self._where()} is {state} after its start ({verb})")
        log.info("%s: running (%s) in %.1f s", self._where(), verb, time.monotonic() - t0)

    def resume_vm(self) -> None:
        """startVirtualMachine of the stopped VM, waited until Running; gone: nothing to do."""
        vm = self._vm()
        if vm is not None and STATES.get(self._state(vm)) != "gone":
            self._started("resume", vm)

    def power_on_vm(self) -> None:
        vm = self._vm()
        if vm is None:
            raise ResourceNotFound(
                f"source.vm: {self._where()} is not in zone {self.spec.zone} any more: nothing to start"
            )
        self._started("power on", vm)
