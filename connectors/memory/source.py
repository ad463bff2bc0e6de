"""The memory platform as a replication source: a VM in a memory store (`store.Store`).

Semantics (exact; the source contract in tests/contract checks them):
- A snapshot is a frozen copy of every disk taken in one locked step: it reads the disks exactly as
  they were at that instant, whatever the guest writes after it. Its change id (one for all its disks,
  `memory.<job>.<snapshot id>.<nonce>`) is registered on every disk and from then on records every
  guest write, zero write, discard and resize (`store.Guest`).
- With a base change id for a disk, the snapshot also freezes the ranges recorded by that change id
  up to the instant: `extents(base)` lists exactly the `block_size` blocks those ranges touch (within
  the disk's size at the instant), each tagged zero when the block reads all zeros in the snapshot and
  data otherwise. `extents(None)` lists every block: data where a block holds a non-zero byte, zero
  elsewhere. Any other change id raises ChangeTrackingLost.
- A base the disk no longer records (dropped by a committed release, `forget`, or a test's
  `Store.lose_tracking`), or any base while `change_tracking` is off, comes back as `tracking_lost`
  with the reason: the sync is a digest-compare resync, never a silent full or incremental.
- A retried `create_snapshot` under the same snapshot id takes a new snapshot; the earlier attempt's
  copy and change id go (a reader still holding it fails, one line).
- `release_snapshot(committed=True)`: the snapshot's change ids become the base, and the job's older
  ones go; `committed=False`: its change ids go and the previous base records on. The frozen copy goes
  either way; releasing twice is no error.
- `forget`: every change id and snapshot of this job goes from the VM (other jobs' stay); idempotent;
  a VM that is gone is no error.
Resizes are tracked (`tracks_resize`): a shrink and a grow both mark the range between the sizes.
Every verb first asks the store's faults (`faults.py`) whether a test made it fail.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.memory.backend import Backend, BlobMissing, check_name
from connectors.memory.handles import MemoryDisk, MemorySnapshot
from connectors.memory.ranges import Ranges, as_json, blocks, from_json
from connectors.memory.spec import MemorySource
from connectors.memory.store import Store
from sendense.datapath.extents import Extent, coalesce
from sendense.errors import (
    ChangeTrackingLost,
    DataPathError,
    InvalidSpec,
    ResourceNotFound,
    ResourceUnavailable,
)
from sendense.models import DiskInfo, DiskSnapshot, NicInfo, SnapshotRef, VmInfo


class MemoryReader:
    """A BlockReader over a snapshot's frozen copy of one disk."""

    def __init__(self, store: Store, blob: str, size: int, label: str, verb: str = "source.read") -> None:
        self.store, self.blob, self.size, self.label, self.verb = store, blob, size, label, verb

    def read(self, offset: int, length: int) -> bytes:
        self.store.faults.check(self.verb, length)
        if offset < 0 or offset + length > self.size:
            raise DataPathError(
                f"{self.label}: read of {length} bytes at {offset} is beyond its end ({self.size})"
            )
        try:
            return self.store.backend.read(self.blob, offset, length)
        except BlobMissing:
            raise ResourceNotFound(f"{self.label}: the snapshot was released") from None

    def wire(self) -> None:
        """Bytes come from this process's memory or a file: nothing to splice."""
        return None

    def close(self) -> None:
        pass


class MemorySourceDisk:
    """One disk of a snapshot (SourceDisk)."""

    tracks_resize = True  # a resize marks the range between the sizes as changed

    def __init__(
        self,
        store: Store,
        blob: str,
        size: int,
        block: int,
        base: str | None,
        changed: Ranges | None,
        label: str,
    ) -> None:
        self.store, self.blob, self.size, self.block = store, blob, size, block
        self.base, self.changed, self.label = base, changed, label

    def _is_zero(self, b: Backend, index: int) -> bool:
        lo = index * self.block
        data = b.read(self.blob, lo, min(self.block, self.size - lo))
        return data.count(0) == len(data)

    def _tagged(self, indexes: Iterable[int], start: int) -> Iterator[Extent]:
        b = self.store.backend
        for i in indexes:
            lo, hi = max(i * self.block, start), min((i + 1) * self.block, self.size)
            if hi > lo:
                yield Extent(lo, hi - lo, self._is_zero(b, i))

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        if since is None:
            return coalesce(self._every_block(start))
        if since != self.base or self.changed is None:
            raise ChangeTrackingLost(f"{self.label}: change id {since} is not the base of this snapshot")
        return coalesce(self._tagged(blocks(self.changed, self.block, start, self.size), start))

    def _every_block(self, start: int) -> Iterator[Extent]:
        """Data blocks (read to tell) where the copy may hold data; zero ranges everywhere else."""
        pos, bs = start, self.block
        for s, e in self.store.backend.data_ranges(self.blob, start // bs * bs, self.size):  # whole blocks
            first, last = max(s // bs, pos // bs), (e - 1) // bs
            if (last + 1) * bs <= pos:
                continue  # its blocks were listed with the previous range's
            if first * bs > pos:
                yield Extent(pos, first * bs - pos, True)
            yield from self._tagged(range(first, last + 1), pos)
            pos = min((last + 1) * bs, self.size)
        if pos < self.size:
            yield Extent(pos, self.size - pos, True)

    def connect(self) -> MemoryReader:
        return MemoryReader(self.store, self.blob, self.size, self.label)


class MemorySourceConnector:
    """SourceConnector for a VM in a memory store."""

    platform = "memory"

    def __init__(self, job: str, spec: MemorySource, work_dir: Path | None = None) -> None:
        self.job, self.spec = job, spec
        self.store = Store.of(spec)
        self.vm = spec.vm
        self.prefix = f"memory.{job}."  # this job's change ids (job names have no dots)

    def _what(self) -> str:
        return f"VM {self.vm} in memory store {self.spec.where}"

    def _record(self) -> dict[str, Any]:
        rec = self.store.vm(self.vm)
        if rec is None:
            raise ResourceNotFound(f"source.vm: no {self._what()}")
        if rec.get("reachable") is False:
            raise ResourceUnavailable(f"source.vm: {self._what()} is unreachable")
        return rec

    def _snap_name(self, snapshot_id: str) -> str:
        try:
            return check_name(f"snap/{self.vm}/{self.job}/{snapshot_id}")
        except ValueError:
            raise InvalidSpec(f"snapshot id {snapshot_id!r} cannot name a memory snapshot") from None

    def validate(self) -> None:
        self.store.faults.check("source.validate")
        if not self._record().get("disks"):
            raise ResourceNotFound(f"source.vm: {self._what()} has no disk")

    def discover(self) -> VmInfo:
        self.store.faults.check("source.discover")
        rec = self._record()
        with self.store.locked() as b:
            disks = [
                DiskInfo(
                    key=k,
                    size=b.size(f"vm/{self.vm}/{k}"),
                    ref=f"memory:{self.spec.where}/{self.vm}/{k}",
                    bus="virtio",
                    boot_order=1 if i == 0 else None,
                )
                for i, k in enumerate(rec["disks"])
            ]
        return VmInfo(
            name=self.vm,
            platform="memory",
            disks=disks,
            cpus=rec.get("cpus", 0),
            memory_mib=rec.get("memory_mib", 0),
            firmware=rec.get("firmware", ""),
            nics=[NicInfo.model_validate(n) for n in rec.get("nics", [])],
            os_hint=rec.get("os_hint", ""),
        )

    # ------------------------------------------------------------------ snapshots

    def _drop_snapshot(self, b: Backend, name: str, *, change_id: bool) -> None:
        """The snapshot under this name: its frozen copies go, and with `change_id` its change id."""
        old = b.get(name)
        if old is None:
            return
        for blob in b.blobs(f"{name}.{old['nonce']}/"):
            b.delete(blob)
        for key in old["disks"] if change_id else ():
            track = self.store.tracking(self.vm, key)
            if track.pop(old["change_id"], None) is not None:
                self.store.set_tracking(self.vm, key, track)
        b.drop(name)

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        self.store.faults.check("source.create_snapshot")
        name = self._snap_name(snapshot_id)
        nonce = secrets.token_hex(4)
        cid = f"{self.prefix}{snapshot_id}.{nonce}"
        disks: list[DiskSnapshot] = []
        frozen: dict[str, Any] = {}
        with self.store.locked() as b:
            rec = self._record()
            self._drop_snapshot(b, name, change_id=True)  # a retried snapshot step: that instant is gone
            for key in rec["disks"]:
                track = self.store.tracking(self.vm, key)
                since = base.get(key)
                lost, changed = self._base(key, since, track)
                if self.spec.change_tracking:
                    track[cid] = []
                    self.store.set_tracking(self.vm, key, track)
                blob = f"{name}.{nonce}/{key}"
                b.copy(f"vm/{self.vm}/{key}", blob)
                size = b.size(blob)
                frozen[key] = {"blob": blob, "size": size, "base": since, "changed": changed}
                disks.append(
                    DiskSnapshot(
                        key=key,
                        size=size,
                        change_id=cid,
                        base_change_id=since,
                        tracking_lost=lost,
                        handle=MemoryDisk(copy_of=blob).dump(),
                    )
                )
            b.put(name, {"nonce": nonce, "change_id": cid, "disks": frozen})
        return SnapshotRef(
            snapshot_id=snapshot_id,
            created_at=datetime.now(UTC),
            disks=disks,
            handle=MemorySnapshot(nonce=nonce).dump(),
        )

    def _base(
        self, key: str, since: str | None, track: dict[str, Ranges]
    ) -> tuple[str | None, list[list[int]] | None]:
        """(why tracking is lost, the ranges changed since the base as JSON) for one disk."""
        if not since:
            return None, None
        if not self.spec.change_tracking:
            return f"change tracking is off for {self._what()} (source.change_tracking)", None
        if since not in track:
            return (
                f"disk {key} of {self._what()} does not track change id {since} "
                "(lost, or released after a newer point)",
                None,
            )
        return None, as_json(track[since])

    @contextmanager
    def open_disk(self, snap: SnapshotRef, key: str) -> Iterator[MemorySourceDisk]:
        self.store.faults.check("source.open_disk")
        d = snap.disk(key)
        label = f"disk {key} of snapshot {snap.snapshot_id} of {self._what()}"
        with self.store.locked() as b:
            rec = b.get(self._snap_name(snap.snapshot_id))
        copy_of = MemoryDisk.parse(d.handle).copy_of
        if rec is None or rec["change_id"] != d.change_id or rec["disks"].get(key, {}).get("blob") != copy_of:
            raise ResourceNotFound(f"{label}: gone (released, or taken again)")
        fz = rec["disks"][key]
        changed = None if d.tracking_lost or fz["changed"] is None else from_json(fz["changed"])
        yield MemorySourceDisk(
            self.store, fz["blob"], fz["size"], self.spec.block_size, fz["base"], changed, label
        )

    def release_snapshot(self, snap: SnapshotRef, committed: bool) -> None:
        self.store.faults.check("source.release_snapshot")
        with self.store.locked() as b:
            name = self._snap_name(snap.snapshot_id)
            rec = b.get(name)
            mine = {d.change_id for d in snap.disks}
            if rec is not None and rec["change_id"] in mine:
                self._drop_snapshot(b, name, change_id=False)  # the change ids: below
            if self.store.vm(self.vm) is None:
                return
            for d in snap.disks:
                track = self.store.tracking(self.vm, d.key)
                if committed:
                    drop = [c for c in track if c.startswith(self.prefix) and c != d.change_id]
                else:
                    drop = [d.change_id]
                if any(c in track for c in drop):
                    self.store.set_tracking(self.vm, d.key, {c: r for c, r in track.items() if c not in drop})

    def forget(self) -> None:
        self.store.faults.check("source.forget")
        with self.store.locked() as b:
            for name in b.records(f"snap/{self.vm}/{self.job}/"):
                b.drop(name)
            for blob in b.blobs(f"snap/{self.vm}/{self.job}/"):
                b.delete(blob)
            for key in (self.store.vm(self.vm) or {}).get("disks", []):
                track = self.store.tracking(self.vm, key)
                if any(c.startswith(self.prefix) for c in track):
                    self.store.set_tracking(
                        self.vm, key, {c: r for c, r in track.items() if not c.startswith(self.prefix)}
                    )
