"""The power of a memory source VM (sendense.protocols.SourcePower): its state lives in its store record
(`Store.set_power`), so a test sees at once what a failover did to the source, and a guest write to a
paused or stopped VM fails (`store.GuestHalted`), as a guest whose vCPUs stopped writes nothing.

- power_state: running / paused / stopped from the record; no record: gone; `reachable: false`, or a
  fault due at `source.power_state`: unreachable (never an error).
- pause_vm: running -> paused; resume_vm: paused -> running; power_off_vm: running or paused ->
  stopped; power_on_vm: stopped or paused -> running. Each is idempotent (in its end state already,
  or gone where the verb allows it: no error). `startable: false`: power_on_vm raises VmNotStartable.
- Unreachable: every verb but power_state raises ResourceUnavailable (retryable).
Every verb first asks the store's faults (`source.<verb>`), the mutating ones also after their effect
(`faults.fail("source.pause_vm", after_effect=True)`: the VM is paused, the call fails).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from connectors.memory.spec import MemorySource
from connectors.memory.store import Store
from sendense.errors import ResourceNotFound, ResourceUnavailable, SendenseError, VmNotStartable
from sendense.protocols import PowerState

log = logging.getLogger(__name__)


class MemorySourcePower:
    platform = "memory"
    pause_stops = False

    def __init__(self, job: str, spec: MemorySource, work_dir: Path | None = None) -> None:
        self.job, self.spec = job, spec
        self.store = Store.of(spec)
        self.vm = spec.vm

    @property
    def can_power_on(self) -> bool:
        rec = self.store.vm(self.vm)
        return rec is None or rec.get("startable", True) is not False

    def _what(self) -> str:
        return f"VM {self.vm} in memory store {self.spec.where}"

    def _record(self) -> dict[str, Any] | None:
        rec = self.store.vm(self.vm)
        if rec is not None and rec.get("reachable") is False:
            raise ResourceUnavailable(f"source.vm: {self._what()} is unreachable")
        return rec

    def power_state(self) -> PowerState:
        try:
            self.store.faults.check("source.power_state")
            rec = self._record()
        except SendenseError as e:
            log.warning("source %s: no answer: %s", self._what(), e.message)
            return "unreachable"
        if rec is None:
            return "gone"
        power: PowerState = rec.get("power", "running")
        return power

    def _change(self, verb: str, start: tuple[str, ...], end: str) -> None:
        """In the VM's record, power `end` if it is one of `start`; nothing else."""
        with self.store.faults.effect(f"source.{verb}"):
            rec = self._record()
            if rec is None or rec.get("power", "running") not in start:
                return
            self.store.set_power(self.vm, end)
            log.info("source %s: %s -> %s (%s)", self._what(), rec.get("power", "running"), end, verb)

    def pause_vm(self) -> None:
        self._change("pause_vm", ("running",), "paused")

    def resume_vm(self) -> None:
        self._change("resume_vm", ("paused",), "running")

    def power_off_vm(self) -> None:
        self._change("power_off_vm", ("running", "paused"), "stopped")

    def power_on_vm(self) -> None:
        with self.store.faults.effect("source.power_on_vm"):
            rec = self._record()
            if rec is None:
                raise ResourceNotFound(f"source.vm: no {self._what()}: nothing to start")
            if rec.get("startable", True) is False:
                raise VmNotStartable(
                    f"source.vm: the disks of {self._what()} are current; the VM is the operator's to start"
                )
            if rec.get("power", "running") != "running":
                self.store.set_power(self.vm, "running")
