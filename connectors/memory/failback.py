"""Failback on the memory platform: a VM made from a point (`vms.py`) read back (`MemoryVmChanges`,
sendense.protocols.VmChanges) and its job's source VM written back in place (`MemoryFailbackSink`,
sendense.protocols.FailbackSink), exact to the byte, with every verb open to fault injection
(`faults.py`: `changes.*`, `sink.*`).

VmChanges: a memory VM records every guest write (`MemoryVms.write_disk` / `zero_disk`) under each of
its disk's change ids (`VmRecord.changes`): `point` from its creation on, and one per failback
snapshot. `snapshot_vm` freezes the disks (a copy, as the source's snapshot does) with the ranges
changed since the point and since the base, and registers its own change id; `open_disk` lists, by
`block_size` block (the target spec's, 64 KiB by default) those ranges touch, `point_base(...)`: what
changed since the point, the base's change id: since that snapshot, None: every block. A base the VM
no longer records falls back to the point, never to a full read. `release(committed)`: the frozen
copies go; committed, the snapshot's change id becomes the only base; not, its change id goes.

FailbackSink: the source VM's disks (`vm/<vm>/<key>`) written in place, only while the VM is stopped
(running or paused: refused in one line, at open and at every write). Every write is recorded under
every change id of the disk (the job's too), as a guest's would be, so the job's next forward sync
from its old base copies what failback wrote. `diverged(key, since)`: the ranges change id `since`
recorded; gone: ChangeTrackingLost. `rebase` registers a new change id of the job on every disk
(`memory.<job>.<snapshot id>.<nonce>`, as the source names its own); `drop_base` removes it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.memory.backend import Backend, BlobMissing, check_name
from connectors.memory.handles import MemoryDisk, MemorySnapshot
from connectors.memory.ranges import Ranges, add, as_json, blocks, from_json
from connectors.memory.source import MemoryReader, MemorySourceDisk
from connectors.memory.spec import MemorySource, MemoryTarget
from connectors.memory.store import Store
from connectors.memory.vm_state import POINT, VmPlace, VmRecord
from connectors.memory.vms import MemoryVms
from sendense.datapath.extents import Extent, coalesce
from sendense.errors import ChangeTrackingLost, InvalidSpec, ResourceNotFound, TargetError
from sendense.models import DiskInfo, DiskSnapshot, SnapshotRef
from sendense.protocols import point_base
from tools.exports import safe_key

CHANGE_PREFIX = "failback."  # a failback snapshot's change id on a VM's disk


class VmSnapshotDisk(MemorySourceDisk):
    """One disk of a failback snapshot of a VM: incremental from the point or from the base."""

    def __init__(self, store: Store, fz: dict[str, Any], block: int, point: str, label: str) -> None:
        changed = None if fz["changed"] is None else from_json(fz["changed"])
        super().__init__(store, fz["blob"], fz["size"], block, fz["base"], changed, label)
        self.point, self.since_point = point, from_json(fz["since_point"])

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        if since is not None and since == point_base(self.point):
            return coalesce(self._tagged(blocks(self.since_point, self.block, start, self.size), start))
        return super().extents(since, start)

    def connect(self) -> MemoryReader:
        return MemoryReader(self.store, self.blob, self.size, self.label, verb="changes.read")


class MemoryVmChanges:
    """VmChanges for the VMs of a job's memory target."""

    platform = "memory"

    def __init__(self, job: str, spec: MemoryTarget, job_id: str = "") -> None:
        self.job, self.spec = job, spec
        self.vms = MemoryVms(job, spec, job_id)
        self.store, self.block = self.vms.store, 64 << 10

    def _snap(self, place: VmPlace, snapshot_id: str) -> str:
        try:
            return check_name(f"{place.failback}snap/{snapshot_id}")
        except ValueError:
            raise InvalidSpec(f"snapshot id {snapshot_id!r} cannot name a memory snapshot") from None

    def _drop(self, b: Backend, place: VmPlace, rec: VmRecord | None, name: str, *, change_id: bool) -> None:
        old = b.get(name)
        if old is None:
            return
        for blob in b.blobs(f"{place.failback}{old['nonce']}/"):
            b.delete(blob)
        if change_id and rec is not None:
            for track in rec.changes.values():
                track.pop(old["change_id"], None)
            self.vms._save(b, place, rec)
        b.drop(name)

    def snapshot_vm(self, name: str, snapshot_id: str, base: dict[str, str] | None = None) -> SnapshotRef:
        with self.store.faults.effect("changes.snapshot_vm"):
            with self.store.locked() as b:
                place, rec = self.vms._load(b, name)
                snap = self._snap(place, snapshot_id)
                self._drop(b, place, rec, snap, change_id=True)  # a retried snapshot: that instant is gone
                nonce = secrets.token_hex(4)
                cid = f"{CHANGE_PREFIX}{snapshot_id}.{nonce}"
                point = rec.plan.point_id
                frozen: dict[str, Any] = {}
                disks: list[DiskSnapshot] = []
                for key in rec.disks:
                    track = rec.changes.setdefault(key, {POINT: []})
                    since = (base or {}).get(key)
                    usable = since is not None and since.startswith(CHANGE_PREFIX) and since in track
                    blob = f"{place.failback}{nonce}/{safe_key(key)}"
                    b.copy(place.disk(safe_key(key)), blob)
                    size = b.size(blob)
                    frozen[key] = {
                        "blob": blob,
                        "size": size,
                        "base": since if usable else None,
                        "changed": track[since] if usable and since is not None else None,
                        "since_point": track.get(POINT, []),
                    }
                    track[cid] = []
                    disks.append(
                        DiskSnapshot(
                            key=key,
                            size=size,
                            change_id=cid,
                            base_change_id=since if usable else point_base(point),
                            handle=MemoryDisk(copy_of=blob).dump(),
                        )
                    )
                self.vms._save(b, place, rec)
                b.put(snap, {"nonce": nonce, "change_id": cid, "point": point, "disks": frozen})
        return SnapshotRef(
            snapshot_id=snapshot_id,
            created_at=datetime.now(UTC),
            disks=disks,
            handle=MemorySnapshot(nonce=nonce).dump(),
        )

    def _frozen(self, name: str, ref: SnapshotRef, key: str) -> tuple[dict[str, Any], str, str]:
        d = ref.disk(key)
        label = f"disk {key} of failback snapshot {ref.snapshot_id} of memory VM {name}"
        with self.store.locked() as b:
            place = self.vms._place(name)
            rec = b.get(self._snap(place, ref.snapshot_id))
        copy_of = MemoryDisk.parse(d.handle).copy_of
        if rec is None or rec["change_id"] != d.change_id or rec["disks"].get(key, {}).get("blob") != copy_of:
            raise ResourceNotFound(f"{label}: gone (released, or taken again)")
        return rec["disks"][key], rec["point"], label

    def changed_since_point(self, ref: SnapshotRef, key: str) -> Iterator[Extent]:
        with self.open_disk(ref, key) as disk:
            yield from disk.extents(point_base(disk.point))

    @contextmanager
    def open_disk(self, ref: SnapshotRef, key: str) -> Iterator[VmSnapshotDisk]:
        self.store.faults.check("changes.open_disk")
        fz, point, label = self._frozen(self._vm_of(ref), ref, key)
        yield VmSnapshotDisk(self.store, fz, self.block, point, label)

    def _vm_of(self, ref: SnapshotRef) -> str:
        """The VM a snapshot is of: its frozen copies live under the VM's failback place."""
        copy_of = MemoryDisk.parse(ref.disks[0].handle).copy_of if ref.disks else ""
        parts = copy_of.split("/")
        if len(parts) < 5:
            raise ResourceNotFound(f"failback snapshot {ref.snapshot_id}: not a memory VM's snapshot")
        return parts[3]

    def release(self, ref: SnapshotRef, committed: bool) -> None:
        with self.store.faults.effect("changes.release"):
            if not ref.disks:
                return
            name = self._vm_of(ref)
            with self.store.locked() as b:
                place = self.vms._place(name)
                rec = self.vms._record(b, place)
                snap = self._snap(place, ref.snapshot_id)
                old = b.get(snap)
                mine = {d.change_id for d in ref.disks}
                if old is not None and old["change_id"] in mine:
                    self._drop(b, place, None, snap, change_id=False)  # the change ids: below
                if rec is None:
                    return
                for track in rec.changes.values():
                    for cid in list(track):
                        gone = cid != POINT and (cid not in mine if committed else cid in mine)
                        if gone and cid.startswith(CHANGE_PREFIX):
                            del track[cid]
                self.vms._save(b, place, rec)

    def forget(self, name: str) -> None:
        self.store.faults.check("changes.forget")
        with self.store.locked() as b:
            place = self.vms._place(name)
            for n in b.records(place.failback):
                b.drop(n)
            for blob in b.blobs(place.failback):
                b.delete(blob)
            rec = self.vms._record(b, place)
            if rec is not None:
                for track in rec.changes.values():
                    for cid in [c for c in track if c.startswith(CHANGE_PREFIX)]:
                        del track[cid]
                self.vms._save(b, place, rec)


class SinkWriter:
    """A BlockWriter into a stopped source VM's disk, recorded under every change id of the disk."""

    def __init__(self, disk: SinkDisk) -> None:
        self.disk, self.store = disk, disk.store

    def _check(self, b: Backend, offset: int, length: int, what: str) -> None:
        d = self.disk
        if offset < 0 or offset + length > d.size:
            raise TargetError(f"{d.label}: {what} of {length} bytes at {offset} is beyond its end ({d.size})")
        d.sink.refuse_running(b)

    def _changed(self, b: Backend, start: int, end: int) -> None:
        name = f"tracking/{self.disk.sink.vm}/{self.disk.key}"
        rec = b.get(name) or {}
        b.put(name, {cid: as_json(add(from_json(r), start, end)) for cid, r in rec.items()})

    def read(self, offset: int, length: int) -> bytes:
        with self.store.locked() as b:
            return b.read(self.disk.blob, offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.store.faults.check("sink.write", len(data))
        with self.store.locked() as b:
            self._check(b, offset, len(data), "write")
            try:
                b.write(self.disk.blob, offset, bytes(data))
            except BlobMissing:
                raise TargetError(f"{self.disk.label}: the disk is gone") from None
            self._changed(b, offset, offset + len(data))

    def zero(self, offset: int, length: int) -> None:
        self.store.faults.check("sink.write")
        with self.store.locked() as b:
            self._check(b, offset, length, "zero write")
            b.zero(self.disk.blob, offset, length)
            self._changed(b, offset, offset + length)

    def flush(self) -> None:
        pass

    def wire(self) -> None:
        return None

    def close(self) -> None:
        pass


class SinkDisk:
    """TargetDisk: one disk of the source VM, written in place (it holds the point's content or more)."""

    has_base = True
    block_size = 1

    def __init__(self, sink: MemoryFailbackSink, key: str, size: int) -> None:
        self.sink, self.store, self.key, self.size = sink, sink.store, key, size
        self.blob = f"vm/{sink.vm}/{key}"
        self.label = f"disk {key} of {sink._what()}"

    def connect(self) -> SinkWriter:
        return SinkWriter(self)

    def data_extents(self, start: int, end: int) -> Iterator[Extent]:
        for s, e in self.store.backend.data_ranges(self.blob, start, end):
            yield Extent(s, e - s)


class MemoryFailbackSink:
    """FailbackSink: the job's source VM in a memory store, its disks written back in place."""

    platform = "memory"

    def __init__(self, job: str, spec: MemorySource, work_dir: Path | None = None) -> None:
        self.job, self.spec = job, spec
        self.store = Store.of(spec)
        self.vm = spec.vm
        self.prefix = f"memory.{job}."

    def _what(self) -> str:
        return f"VM {self.vm} in memory store {self.spec.where}"

    def _record(self, b: Backend) -> dict[str, Any]:
        rec: dict[str, Any] | None = b.get(f"vm/{self.vm}")
        if rec is None:
            raise ResourceNotFound(f"source.vm: no {self._what()}: nothing to fail back to")
        return rec

    def refuse_running(self, b: Backend) -> None:
        power = self._record(b).get("power", "running")
        if power != "stopped":
            raise TargetError(
                f"source.vm: {self._what()} is {power}: power it off before failback writes its disks"
            )

    def disks(self) -> list[DiskInfo]:
        self.store.faults.check("sink.disks")
        with self.store.locked() as b:
            rec = self._record(b)
            return [
                DiskInfo(
                    key=k, size=b.size(f"vm/{self.vm}/{k}"), ref=f"memory:{self.spec.where}/{self.vm}/{k}"
                )
                for k in rec["disks"]
            ]

    @contextmanager
    def open_disk(self, key: str) -> Iterator[SinkDisk]:
        self.store.faults.check("sink.open_disk")
        with self.store.locked() as b:
            rec = self._record(b)
            if key not in rec["disks"]:
                raise ResourceNotFound(f"source.vm: {self._what()} has no disk {key}")
            self.refuse_running(b)
            size = b.size(f"vm/{self.vm}/{key}")
        yield SinkDisk(self, key, size)

    def diverged(self, key: str, since: str) -> Iterator[Extent]:
        self.store.faults.check("sink.diverged")
        track = self.store.tracking(self.vm, key)
        if since not in track:
            raise ChangeTrackingLost(f"disk {key} of {self._what()} does not track change id {since}")
        with self.store.locked() as b:
            size = b.size(f"vm/{self.vm}/{key}")
        ranges: Ranges = track[since]
        return iter([Extent(s, min(e, size) - s) for s, e in ranges if s < size])

    def rebase(self, snapshot_id: str) -> SnapshotRef:
        with self.store.faults.effect("sink.rebase"):
            cid = f"{self.prefix}{snapshot_id}.{secrets.token_hex(4)}"
            disks = []
            with self.store.locked() as b:
                rec = self._record(b)
                for key in rec["disks"]:
                    track = self.store.tracking(self.vm, key)
                    track[cid] = []
                    self.store.set_tracking(self.vm, key, track)
                    disks.append(DiskSnapshot(key=key, size=b.size(f"vm/{self.vm}/{key}"), change_id=cid))
        return SnapshotRef(snapshot_id=snapshot_id, created_at=datetime.now(UTC), disks=disks)

    def cut_over(self) -> None:
        """Written in place: nothing to swap (a fault can still be injected, for the undo's sake)."""
        with self.store.faults.effect("sink.cut_over"):
            with self.store.locked() as b:
                self.refuse_running(b)

    def undo_cut_over(self) -> None:
        self.store.faults.check("sink.undo_cut_over")

    def cleanup(self) -> None:
        self.store.faults.check("sink.cleanup")

    def drop_base(self, ref: SnapshotRef) -> None:
        self.store.faults.check("sink.drop_base")
        mine = {d.change_id for d in ref.disks}
        with self.store.locked() as b:
            for key in (b.get(f"vm/{self.vm}") or {}).get("disks", []):
                track = self.store.tracking(self.vm, key)
                if any(c in track for c in mine):
                    self.store.set_tracking(self.vm, key, {c: r for c, r in track.items() if c not in mine})
