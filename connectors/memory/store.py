"""Memory stores: where the memory platform's VMs, snapshots, replicas and points live.

A store is named (`Store.named("lab")`: process memory, shared by every connector of this process, so
the activities of one worker see the same disks) or a directory (`Store.at(path)`: plain files, shared
by every process that names it). A spec names one or the other; tests reach the same store object to
set up VMs, write as a guest would, inject faults and look inside.

A VM is a record `vm/<vm>` (hardware: CPUs, memory, firmware, NICs; its disks in order with their
sizes) and one blob per disk `vm/<vm>/<key>`. `Guest` writes to the disks as the VM's guest would:
`write`, `zero` (a zero write), `discard` (the range reads zeros after it: a thin disk that unmaps),
`resize` (shrinking cuts, growing reads zeros). Every one of them, in the same locked step, adds the
range it touched to every change id recorded for that disk (`tracking/<vm>/<key>`: change id ->
byte ranges written since), a resize the range between the old and the new size. Change ids are
made and dropped by the source connector (`source.py`); `lose_tracking` drops them as a lost bitmap
or a CBT reset would.

Power (`set_power`, fields of the VM's record): `power` is running (the default), paused or stopped, as
the source's power verbs (`power.py`) leave it; a guest of a VM that is not running cannot write
(`GuestHalted`: its vCPUs do not run). `reachable: false` makes the VM's platform unreachable (every
source verb fails, retryable; `power_state` says unreachable), `startable: false` makes it a VM the
product cannot start (`power_on_vm` raises VmNotStartable), as a stopped KVM VM given by its disks.

Networks (`add_network`, records `networks/<name>`) are what production VMs made from points on a
memory target can be mapped to (`vms.py`); those VMs live under the job's target (`vm_state.py`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from connectors.memory.backend import Backend, FileBackend, MemoryBackend
from connectors.memory.faults import Faults
from connectors.memory.ranges import Ranges, add, as_json, from_json
from sendense.errors import SendenseError
from sendense.models import NetworkInfo

POWER = ("running", "paused", "stopped")


class GuestHalted(SendenseError):
    """A guest write to a VM that is paused or stopped: no vCPU of it runs to write."""

    kind = "GuestHalted"


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # store, VM and disk names

_stores: dict[str, Store] = {}
_registry_lock = threading.Lock()


def check(what: str, name: str) -> str:
    if not NAME.match(name):
        raise ValueError(f"{what} {name!r}: 1-64 chars of A-Z a-z 0-9 . _ - starting with a letter or digit")
    return name


class Store:
    def __init__(self, name: str, backend: Backend) -> None:
        self.name, self.backend = name, backend
        self.faults = Faults()

    def __repr__(self) -> str:
        return f"Store({self.name})"

    # ------------------------------------------------------------------ which store

    @classmethod
    def named(cls, name: str) -> Store:
        """The process's store of this name, made empty on first use."""
        check("memory store", name)
        with _registry_lock:
            if name not in _stores:
                _stores[name] = cls(name, MemoryBackend())
            return _stores[name]

    @classmethod
    def at(cls, directory: Path) -> Store:
        """The store in `directory` (plain files); one object per directory in a process."""
        key = str(Path(directory).resolve())
        with _registry_lock:
            if key not in _stores:
                _stores[key] = cls(key, FileBackend(Path(key)))
            return _stores[key]

    @classmethod
    def of(cls, spec: Any) -> Store:
        """The store a memory spec names (its `directory`, else its `store`)."""
        return cls.at(spec.directory) if spec.directory is not None else cls.named(spec.store)

    @staticmethod
    def discard(store: Store) -> None:
        """Forget a store object (a test's teardown): a named store's content is gone with it."""
        with _registry_lock:
            for k in [k for k, s in _stores.items() if s is store]:
                del _stores[k]

    @contextmanager
    def locked(self) -> Iterator[Backend]:
        with self.backend.locked():
            yield self.backend

    def contents(self, prefix: str = "") -> list[str]:
        """Every blob and record under `prefix` (`blob:` / `record:` names): what a leak check reads."""
        with self.locked() as b:
            return [f"blob:{n}" for n in b.blobs(prefix)] + [f"record:{n}" for n in b.records(prefix)]

    # ------------------------------------------------------------------ VMs

    def create_vm(
        self,
        vm: str,
        disks: dict[str, int],
        *,
        cpus: int = 1,
        memory_mib: int = 512,
        firmware: str = "bios",
        os_hint: str = "linux",
        nics: list[dict[str, str]] | None = None,
    ) -> Guest:
        """A VM with empty (all zero) disks of the given sizes, in order (the first one boots)."""
        check("VM", vm)
        if not disks:
            raise ValueError(f"VM {vm}: give at least one disk")
        with self.locked() as b:
            if b.get(f"vm/{vm}") is not None:
                raise ValueError(f"VM {vm} exists already in memory store {self.name}")
            for key, size in disks.items():
                check("disk", key)
                if size <= 0:
                    raise ValueError(f"VM {vm} disk {key}: size must be positive")
                b.create(f"vm/{vm}/{key}", size)
                b.put(f"tracking/{vm}/{key}", {})
            b.put(
                f"vm/{vm}",
                {
                    "disks": list(disks),
                    "cpus": cpus,
                    "memory_mib": memory_mib,
                    "firmware": firmware,
                    "os_hint": os_hint,
                    "nics": nics or [],
                },
            )
        return Guest(self, vm)

    def vm(self, vm: str) -> dict[str, Any] | None:
        """The VM's record (hardware and disk keys), None if there is no such VM."""
        with self.locked() as b:
            rec: dict[str, Any] | None = b.get(f"vm/{vm}")
            return rec

    def set_power(
        self,
        vm: str,
        power: str | None = None,
        *,
        reachable: bool | None = None,
        startable: bool | None = None,
    ) -> dict[str, Any]:
        """Set the VM's power state (running, paused, stopped), whether its platform answers and
        whether the product can start it (what is None stays); returns the VM's record."""
        if power is not None and power not in POWER:
            raise ValueError(f"VM {vm}: power is one of {', '.join(POWER)}, not {power!r}")
        with self.locked() as b:
            rec: dict[str, Any] | None = b.get(f"vm/{vm}")
            if rec is None:
                raise KeyError(f"no VM {vm} in memory store {self.name}")
            for k, v in (("power", power), ("reachable", reachable), ("startable", startable)):
                if v is not None:
                    rec[k] = v
            b.put(f"vm/{vm}", rec)
            return rec

    def guest(self, vm: str) -> Guest:
        if self.vm(vm) is None:
            raise KeyError(f"no VM {vm} in memory store {self.name}")
        return Guest(self, vm)

    def delete_vm(self, vm: str) -> None:
        with self.locked() as b:
            for n in b.blobs(f"vm/{vm}/"):
                b.delete(n)
            for n in b.records(f"tracking/{vm}/"):
                b.drop(n)
            b.drop(f"vm/{vm}")

    # ------------------------------------------------------------------ networks

    def add_network(self, name: str, *, kind: str = "bridge") -> None:
        """A network production VMs made from points can be mapped to (`network_map`), as a target
        platform's bridges or subnets are. Test VMs never use these: each gets an isolated one."""
        check("network", name)
        with self.locked() as b:
            b.put(f"networks/{name}", {"kind": kind})

    def remove_network(self, name: str) -> None:
        with self.locked() as b:
            b.drop(f"networks/{check('network', name)}")

    def networks(self) -> list[NetworkInfo]:
        """The store's networks (those of add_network), by name."""
        with self.locked() as b:
            out = []
            for n in b.records("networks/"):
                rec = b.get(n) or {}
                out.append(NetworkInfo(name=n.removeprefix("networks/"), kind=rec.get("kind", "")))
            return out

    # ------------------------------------------------------------------ change tracking

    def tracking(self, vm: str, key: str) -> dict[str, Ranges]:
        """The disk's change ids, each with the byte ranges written since it was made."""
        with self.locked() as b:
            rec = b.get(f"tracking/{vm}/{key}") or {}
            return {cid: from_json(r) for cid, r in rec.items()}

    def set_tracking(self, vm: str, key: str, tracking: dict[str, Ranges]) -> None:
        with self.locked() as b:
            if b.get(f"vm/{vm}") is not None:
                b.put(f"tracking/{vm}/{key}", {cid: as_json(r) for cid, r in tracking.items()})

    def change_ids(self, vm: str) -> dict[str, list[str]]:
        """disk key -> its change ids (any job's), for tests."""
        rec = self.vm(vm)
        return {k: sorted(self.tracking(vm, k)) for k in (rec or {}).get("disks", [])}

    def lose_tracking(self, vm: str, key: str | None = None) -> None:
        """Drop every change id of the disk (all disks with None), as a lost bitmap or CBT reset would."""
        rec = self.vm(vm)
        for k in (rec or {}).get("disks", []):
            if key is None or k == key:
                self.set_tracking(vm, k, {})


class Guest:
    """A VM's disks as its guest reads and writes them."""

    def __init__(self, store: Store, vm: str) -> None:
        self.store, self.vm = store, vm

    def blob(self, key: str) -> str:
        return f"vm/{self.vm}/{key}"

    def keys(self) -> list[str]:
        return list((self.store.vm(self.vm) or {}).get("disks", []))

    def size(self, key: str) -> int:
        with self.store.locked() as b:
            return b.size(self.blob(key))

    def read(self, key: str, offset: int, length: int) -> bytes:
        with self.store.locked() as b:
            return b.read(self.blob(key), offset, length)

    def _running(self, b: Backend) -> None:
        power = (b.get(f"vm/{self.vm}") or {}).get("power", "running")
        if power != "running":
            where = f"VM {self.vm} in memory store {self.store.name}"
            raise GuestHalted(f"{where} is {power}: its guest cannot write")

    def _changed(self, b: Backend, key: str, start: int, end: int) -> None:
        rec = b.get(f"tracking/{self.vm}/{key}") or {}
        b.put(
            f"tracking/{self.vm}/{key}",
            {cid: as_json(add(from_json(r), start, end)) for cid, r in rec.items()},
        )

    def write(self, key: str, offset: int, data: bytes) -> None:
        with self.store.locked() as b:
            self._running(b)
            b.write(self.blob(key), offset, data)
            self._changed(b, key, offset, offset + len(data))

    def zero(self, key: str, offset: int, length: int) -> None:
        """A zero write (WRITE ZEROES): the range reads zeros, and counts as written."""
        with self.store.locked() as b:
            self._running(b)
            b.zero(self.blob(key), offset, length)
            self._changed(b, key, offset, offset + length)

    def discard(self, key: str, offset: int, length: int) -> None:
        """A discard (TRIM/UNMAP) on a thin disk that unmaps: the range reads zeros after it."""
        self.zero(key, offset, length)

    def resize(self, key: str, size: int) -> None:
        """Grow (zeros) or shrink (cut) the disk; the range between the two sizes counts as written."""
        if size <= 0:
            raise ValueError(f"VM {self.vm} disk {key}: size must be positive")
        with self.store.locked() as b:
            self._running(b)
            old = b.size(self.blob(key))
            b.resize(self.blob(key), size)
            self._changed(b, key, min(old, size), max(old, size))
