"""VMs from recovery points on a memory target (sendense.protocols.VmProvisioner), for the DR sagas'
tests: every verb can be made to fail before or after its effect (`faults.py`, verbs `vms.*`), and a
VM's "boot" is decided by its disk's content, at once, with no clock to wait for.

- `create_vm(plan)`: the point's disks (those the plan names, in its boot order) copied into the VM's
  own copy-on-write disks, a test VM's isolated network, and the VM's record (`vm_state.py`), all in
  one locked step; nothing runs. The same plan again returns the VM; another plan under that name, a
  point that does not exist, a disk the point has not, or (production mode) a NIC whose network
  `network_map` does not map, or maps to a network the store has not (`Store.add_network`): a
  one-line error, nothing made. Undo: `destroy_vm(plan.name)`.
- `power_on`: running; the console gets the boot's text (`vm_state.boot_text`: the strings of the
  first MiB of the first disk as the VM sees it). Running already: nothing changes. Undo: `power_off`.
- `power_off`: stopped, the console says so; stopped or gone: no error.
- `boot_check`: the pattern searched in the last boot's text: ok with the matching line, else not ok
  with the console's tail; a VM that is not running: not ok, saying so. Decided at once (`timeout`
  is never waited for: the text is whole at power-on). `guest_agent`: its agent answers when the boot
  text has `SENDENSE-GUEST-AGENT` (a disk that carries one), else not ok; `status_checks`: running.
- `destroy_vm`: its disks, console, network and record go; gone already: no error.
- A VM holds nothing: the point's hold is its caller's (`TargetConnector.hold`), and the VM's disks
  are its own, so a VM never changes its point and a prune of the point never changes the VM. The
  target's `destroy` is refused while a VM of its job exists, as a KVM target's is.
Tests reach a VM's disks as its guest would with `read_disk` / `write_disk` (no faults).
"""

from __future__ import annotations

import logging
import re
import secrets
import time

from connectors.memory.backend import Backend, BlobMissing
from connectors.memory.ranges import add, as_json, from_json
from connectors.memory.spec import MemoryTarget
from connectors.memory.target import MemoryTargetConnector
from connectors.memory.vm_state import (
    BOOT_SCAN,
    CONSOLE_KEEP,
    CONSOLE_TAIL,
    NETWORKS,
    POINT,
    VmPlace,
    VmRecord,
    boot_text,
    isolated_network,
    line_at,
    tail,
    vm_names,
)
from sendense.errors import InvalidSpec, ResourceNotFound, TargetError
from sendense.models import BootCheck, NetworkInfo, NicInfo, PointInfo, VmPlan, VmRef
from tools.exports import safe_key

log = logging.getLogger(__name__)

NAME = re.compile(VmPlan.model_fields["name"].metadata[0].pattern)
AGENT = "SENDENSE-GUEST-AGENT"  # a memory VM's "guest agent" answers when its first disk says so


class MemoryVms:
    """VmProvisioner: VMs made from a job's points in its memory target's store."""

    platform = "memory"

    def __init__(self, job: str, spec: MemoryTarget, job_id: str = "") -> None:
        self.job, self.spec, self.job_id = job, spec, job_id
        self.target = MemoryTargetConnector(job, spec, job_id)
        self.store, self.top = self.target.store, self.target.top

    # ------------------------------------------------------------------ helpers

    def _place(self, name: str) -> VmPlace:
        if not NAME.match(name):
            raise InvalidSpec(f"VM name {name!r}: lower-case letters, digits, '_', '.', '-' (at most 63)")
        return VmPlace(self.top, name)

    def _record(self, b: Backend, place: VmPlace) -> VmRecord | None:
        rec = b.get(place.record)
        return None if rec is None else VmRecord.model_validate(rec)

    def _load(self, b: Backend, name: str) -> tuple[VmPlace, VmRecord]:
        place = self._place(name)
        rec = self._record(b, place)
        if rec is None:
            raise ResourceNotFound(f"VM {name}: not found on job {self.job} (memory store {self.spec.where})")
        return place, rec

    def _save(self, b: Backend, place: VmPlace, rec: VmRecord) -> None:
        b.put(place.record, rec.model_dump(mode="json"))

    def _ref(self, rec: VmRecord) -> VmRef:
        plan = rec.plan
        return VmRef(name=plan.name, platform=self.platform, point_id=plan.point_id, mode=plan.mode,
                     vm_id=rec.vm_id, state=rec.state)  # fmt: skip

    @staticmethod
    def _layout(plan: VmPlan, point: PointInfo) -> list[str]:
        """The VM's disk keys in boot order: the plan's boot orders first, then the plan's (or the
        point's) order."""
        keys = [d.key for d in point.disks]
        if not plan.disks:
            return keys
        seen: set[str] = set()
        for d in plan.disks:
            if d.key not in keys:
                raise InvalidSpec(
                    f"VM {plan.name}: point {point.point_id} has no disk {d.key!r} "
                    f"(its disks: {', '.join(keys)})"
                )
            if d.key in seen:
                raise InvalidSpec(f"VM {plan.name}: disk {d.key} is listed twice")
            seen.add(d.key)
        ordered = sorted(plan.disks, key=lambda d: d.boot_order if d.boot_order is not None else 1 << 30)
        return [d.key for d in ordered]  # sorted() is stable: ties keep the plan's order

    def _nics(self, plan: VmPlan) -> list[NicInfo]:
        """The plan's NICs on their target networks: a test VM's on its isolated one; a production
        VM's as `network_map` says, every network it maps to one of the store's."""
        if plan.mode == "test":
            net = isolated_network(plan.name)
            return [n.model_copy(update={"network": net}) for n in plan.nics]
        have = [n.name for n in self.store.networks()]
        for src, dst in sorted(plan.network_map.items()):
            if dst not in have:
                raise InvalidSpec(
                    f"VM {plan.name}: network_map maps {src!r} to network {dst!r}, which memory store "
                    f"{self.spec.where} does not have (its networks: {', '.join(have) or 'none'})"
                )
        out = []
        for n in plan.nics:
            if (to := plan.network_map.get(n.network)) is None:
                raise InvalidSpec(
                    f"VM {plan.name}: NIC {n.mac or '(no MAC)'} is on source network {n.network!r}, "
                    "which network_map does not map"
                )
            out.append(n.model_copy(update={"network": to}))
        return out

    # ------------------------------------------------------------------ create / destroy

    def create_vm(self, plan: VmPlan) -> VmRef:
        with self.store.faults.effect("vms.create_vm"):
            place = self._place(plan.name)
            with self.store.locked() as b:
                self.target.check_owner(b)
                rec = self._record(b, place)
                if rec is not None:
                    if rec.plan != plan:
                        old, new = rec.plan.model_dump(), plan.model_dump()
                        diff = ", ".join(k for k in new if old.get(k) != new[k])
                        raise InvalidSpec(
                            f"VM {plan.name}: exists on job {self.job} from another plan "
                            f"(differs in {diff}); destroy it or choose another name"
                        )
                    return self._ref(rec)
                point = self.target.point_in(b, plan.point_id)
                keys, nics = self._layout(plan, point), self._nics(plan)  # refused: nothing made
                rec = VmRecord(plan=plan, job_id=self.job_id, vm_id=f"mem-{secrets.token_hex(6)}",
                               disks=keys, nics=nics, changes={k: {POINT: []} for k in keys})  # fmt: skip
                paths = {d.key: d.path for d in point.disks}
                for key in keys:
                    try:
                        b.copy(paths[key], place.disk(safe_key(key)))
                    except BlobMissing:
                        raise TargetError(
                            f"VM {plan.name}: point {point.point_id} disk {key}: its data is gone"
                        ) from None
                if plan.mode == "test":
                    rec.network = isolated_network(plan.name)
                    b.put(place.network, {"name": rec.network, "vm": plan.name})
                b.put(place.console, {"text": ""})
                self._save(b, place, rec)  # last: a record means a VM made whole
        log.info("job %s: VM %s made from point %s (%s)", self.job, plan.name, plan.point_id, plan.mode)
        return self._ref(rec)

    def destroy_vm(self, name: str) -> None:
        with self.store.faults.effect("vms.destroy_vm"):
            place = self._place(name)
            with self.store.locked() as b:
                self.target.check_owner(b)
                for blob in [*b.blobs(place.disks), *b.blobs(place.failback)]:
                    b.delete(blob)
                for rec_name in b.records(place.failback):  # failback's snapshots of it
                    b.drop(rec_name)
                b.drop(place.network)
                b.drop(place.console)
                b.drop(place.record)  # last: what a destroy cut short left is still found by name
        log.info("job %s: VM %s destroyed", self.job, name)

    # ------------------------------------------------------------------ power

    def power_on(self, name: str) -> VmRef:
        with self.store.faults.effect("vms.power_on"):
            with self.store.locked() as b:
                place, rec = self._load(b, name)
                if rec.state == "running":
                    return self._ref(rec)
                first = place.disk(safe_key(rec.disks[0]))
                data = b.read(first, 0, min(BOOT_SCAN, b.size(first)))
                text = self._console(b, place)[-CONSOLE_KEEP:]
                boot = boot_text(name, rec.plan.point_id, rec.plan.mode, rec.disks[0], data)
                b.put(place.console, {"text": text + boot})
                rec.state, rec.powered_on_at, rec.boot_from = "running", time.time(), len(text)
                self._save(b, place, rec)
        log.info("job %s: VM %s powered on", self.job, name)
        return self._ref(rec)

    def power_off(self, name: str) -> VmRef:
        with self.store.faults.effect("vms.power_off"):
            with self.store.locked() as b:
                place = self._place(name)
                rec = self._record(b, place)
                if rec is None:
                    return VmRef(name=name, platform=self.platform, point_id="", mode="test", state="absent")
                if rec.state == "running":
                    text = self._console(b, place) + f"memory VM {name}: powered off\n"
                    b.put(place.console, {"text": text})
                    rec.state = "stopped"
                    self._save(b, place, rec)
        return self._ref(rec)

    # ------------------------------------------------------------------ observe

    @staticmethod
    def _console(b: Backend, place: VmPlace) -> str:
        return str((b.get(place.console) or {}).get("text", ""))

    def boot_check(
        self, name: str, pattern: str, timeout: float, guest_agent: bool = False, status_checks: bool = False
    ) -> BootCheck:
        """Decided at once: the memory VM's console is whole from its power-on."""
        self.store.faults.check("vms.boot_check")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise InvalidSpec(f"boot check pattern {pattern!r}: {e}") from None
        with self.store.locked() as b:
            place, rec = self._load(b, name)
            text = self._console(b, place)
        started = rec.powered_on_at
        seconds = 0.0 if started is None else round(max(0.0, time.time() - started), 3)
        if rec.state != "running":
            why = f"memory VM {name} is not running ({rec.state}); console: {tail(text, 1)}"
            return BootCheck(ok=False, seconds=seconds, evidence=why, via="status")
        boot = text[rec.boot_from :]
        if m := rx.search(boot):
            line = line_at(boot, m.start())
            if guest_agent and AGENT not in boot:  # no agent on its disk: it never answers
                why = f"{line}; the guest agent of memory VM {name} did not answer"
                return BootCheck(ok=False, seconds=seconds, evidence=why, via="agent")
            extra = "; guest agent answered" if guest_agent else ""
            extra += "; status running" if status_checks else ""
            return BootCheck(ok=True, seconds=seconds, evidence=line + extra)
        why = f"no /{pattern}/ on the console of memory VM {name}; its tail: {tail(boot)}"
        return BootCheck(ok=False, seconds=seconds, evidence=why)

    def console(self, name: str) -> str:
        self.store.faults.check("vms.console")
        with self.store.locked() as b:
            place, _ = self._load(b, name)
            return self._console(b, place)[-CONSOLE_TAIL:]

    def list_vms(self) -> list[VmRef]:
        """Every VM of the job's target, those a create or destroy left half-made too (`incomplete`)."""
        self.store.faults.check("vms.list_vms")
        refs = []
        with self.store.locked() as b:
            for name in vm_names(b, self.top):
                rec = self._record(b, VmPlace(self.top, name))
                half = VmRef(name=name, platform=self.platform, point_id="", mode="test", state="incomplete")
                refs.append(half if rec is None else self._ref(rec))
        return refs

    def list_networks(self) -> list[NetworkInfo]:
        """The store's networks (`Store.add_network`), then the job's test VMs' isolated ones."""
        self.store.faults.check("vms.list_networks")
        with self.store.locked() as b:
            isolated = [
                NetworkInfo(name=str(rec["name"]), kind="isolated", isolated=True)
                for n in b.records(f"{self.top}/{NETWORKS}/")
                if (rec := b.get(n)) is not None
            ]
        return [*self.store.networks(), *isolated]

    # ------------------------------------------------------------------ the guest's view (tests)

    def read_disk(self, name: str, key: str, offset: int, length: int) -> bytes:
        """Disk `key` of the VM as its guest reads it."""
        with self.store.locked() as b:
            place, _ = self._load(b, name)
            return b.read(self._disk(b, place, key), offset, length)

    def write_disk(self, name: str, key: str, offset: int, data: bytes) -> None:
        """Write to disk `key` of the VM as its guest would (its point never sees it); every change
        id of the disk records the range (`VmRecord.changes`)."""
        with self.store.locked() as b:
            place, rec = self._load(b, name)
            b.write(self._disk(b, place, key), offset, data)
            self._changed(b, place, rec, key, offset, offset + len(data))

    def zero_disk(self, name: str, key: str, offset: int, length: int) -> None:
        """A zero write (or a discard) to disk `key` of the VM, as its guest would."""
        with self.store.locked() as b:
            place, rec = self._load(b, name)
            b.zero(self._disk(b, place, key), offset, length)
            self._changed(b, place, rec, key, offset, offset + length)

    def _changed(self, b: Backend, place: VmPlace, rec: VmRecord, key: str, start: int, end: int) -> None:
        track = rec.changes.setdefault(key, {POINT: []})
        for cid, ranges in track.items():
            track[cid] = as_json(add(from_json(ranges), start, end))
        self._save(b, place, rec)

    def _disk(self, b: Backend, place: VmPlace, key: str) -> str:
        blob = place.disk(safe_key(key))
        if not b.exists(blob):
            raise ResourceNotFound(f"VM {place.name}: no disk {key}")
        return blob


__all__ = ["MemoryVms"]
