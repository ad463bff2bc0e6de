"""The memory platform as a replication target: a job's replicas and recovery points in a memory store.

Semantics (exact; the target contract in tests/contract checks them):
- `prepare` starts afresh: whatever is pending for the job (this sync's earlier attempt, an abandoned
  sync) goes, and each disk's replica starts as a frozen copy of that disk in the newest point, cut or
  grown (zeros) to the size given (`has_base`), or empty when no point has the disk. Every prepare
  names its replicas anew, so a writer left from an earlier attempt fails instead of writing into them.
- Writes go to the pending replica only. With `block_size` > 1 the target takes whole blocks only,
  as a snapshot API does: a write or zero range that is not whole blocks (but for a last, short one
  at the disk's end) is refused.
- `commit` turns the pending replicas into a point at once (renamed, then the point's record written);
  a point's bytes never change after. Committing a committed point returns it.
- `abort` removes what the sync has pending (nothing of a committed point).
- `prune(keep)` removes the oldest points beyond the newest `keep`, except held ones, whatever the
  retention; `hold`/`release` pin and unpin a point, idempotent by hold id.
- `export` writes a point's disks as raw images (sparse; other formats through qemu-img).
- `destroy` removes every replica, point and record of the job; refused while a hold stands or a VM
  made from its points (`vms.py`) exists.
- The job's identity (JobSpec.job_id) is recorded at the first prepare: another job of the same name
  is refused by `validate` rather than adopting or pruning those points.
Every verb first asks the store's faults (`faults.py`) whether a test made it fail; `hold` and
`release` can also fail after their effect.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.memory.backend import Backend, BlobMissing, check_name
from connectors.memory.spec import MemoryTarget
from connectors.memory.store import Store
from connectors.memory.vm_state import vm_names
from sendense.datapath.extents import Extent
from sendense.errors import InvalidSpec, ResourceNotFound, TargetError
from sendense.models import DiskInfo, PointInfo, check_hold_id
from sendense.protocols import pick_point
from tools.exports import EXPORT_FORMATS, export_name, finish_export, safe_key, staging


class MemoryWriter:
    """A BlockWriter into one pending replica."""

    def __init__(self, disk: MemoryTargetDisk) -> None:
        self.disk = disk
        self.store, self.blob, self.size, self.block = disk.store, disk.blob, disk.size, disk.block_size

    def _check(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or offset + length > self.size:
            raise TargetError(
                f"{self.disk.label}: {what} of {length} bytes at {offset} is beyond its end ({self.size})"
            )
        end = offset + length
        if self.block > 1 and (offset % self.block or (end % self.block and end != self.size)):
            raise TargetError(
                f"{self.disk.label}: {what} of {length} bytes at {offset} "
                f"is not whole {self.block}-byte blocks"
            )

    def _gone(self) -> TargetError:
        return TargetError(f"{self.disk.label}: the replica is gone (the sync was aborted or prepared again)")

    def read(self, offset: int, length: int) -> bytes:
        self.store.faults.check("target.read", length)
        if offset < 0 or offset + length > self.size:
            raise TargetError(f"{self.disk.label}: read of {length} bytes at {offset} is beyond its end")
        try:
            return self.store.backend.read(self.blob, offset, length)
        except BlobMissing:
            raise self._gone() from None

    def write(self, offset: int, data: bytes) -> None:
        self.store.faults.check("target.write", len(data))
        self._check(offset, len(data), "write")
        try:
            self.store.backend.write(self.blob, offset, bytes(data))
        except BlobMissing:
            raise self._gone() from None

    def zero(self, offset: int, length: int) -> None:
        self.store.faults.check("target.write")
        self._check(offset, length, "zero write")
        try:
            self.store.backend.zero(self.blob, offset, length)
        except BlobMissing:
            raise self._gone() from None

    def flush(self) -> None:
        pass  # every write is in the store when it returns

    def wire(self) -> None:
        """Bytes go into this process's memory or a file: nothing to splice."""
        return None

    def close(self) -> None:
        pass


class MemoryTargetDisk:
    """One pending replica (TargetDisk)."""

    def __init__(
        self, store: Store, blob: str, size: int, has_base: bool, block_size: int, label: str
    ) -> None:
        self.store, self.blob, self.size, self.has_base = store, blob, size, has_base
        self.block_size, self.label = block_size, label

    def connect(self) -> MemoryWriter:
        return MemoryWriter(self)

    def data_extents(self, start: int, end: int) -> Iterator[Extent]:
        for s, e in self.store.backend.data_ranges(self.blob, start, end):
            yield Extent(s, e - s)


class MemoryTargetConnector:
    """TargetConnector: a job's replicas and points in a memory store."""

    platform = "memory"

    def __init__(self, job: str, spec: MemoryTarget, job_id: str = "") -> None:
        self.job, self.spec, self.job_id = job, spec, job_id
        self.store = Store.of(spec)
        self.top = f"target/{job}"

    def _where(self) -> str:
        return f"memory store {self.spec.where}"

    def _points(self, b: Backend) -> list[PointInfo]:
        """Committed points, newest first, with their holds."""
        holds = b.get(f"{self.top}/holds") or {}
        pts = [PointInfo.model_validate(b.get(n)) for n in b.records(f"{self.top}/points/")]
        pts = [p.model_copy(update={"holds": sorted(holds.get(p.point_id, {}))}) for p in pts]
        return sorted(pts, key=lambda p: (p.committed_at, p.point_id), reverse=True)

    def _drop_pending(self, b: Backend, sync_id: str | None = None) -> None:
        """What is pending goes: every sync's (None), or only `sync_id`'s."""
        rec = b.get(f"{self.top}/pending")
        if rec is not None and sync_id in (None, rec["sync_id"]):
            b.drop(f"{self.top}/pending")
        for blob in b.blobs(f"{self.top}/pending/"):
            if sync_id is None or blob.split("/")[3].rpartition(".")[0] == sync_id:
                b.delete(blob)

    def validate(self) -> None:
        self.store.faults.check("target.validate")
        with self.store.locked() as b:
            self.check_owner(b)

    def check_owner(self, b: Backend) -> None:
        """Refuse a store that holds the points of another job of this name (another job_id)."""
        owner = b.get(f"{self.top}/owner")
        if owner is not None and owner.get("job_id", "") != self.job_id:
            raise TargetError(
                f"target: {self._where()} holds the points of an earlier job {self.job}; "
                "delete them or use another job name"
            )

    def point_in(self, b: Backend, point_id: str) -> PointInfo:
        """The committed point (without its holds), read under the caller's lock."""
        try:
            rec = b.get(check_name(f"{self.top}/points/{point_id}")) if "/" not in point_id else None
        except ValueError:  # not a name a point could have
            rec = None
        if rec is None:
            raise ResourceNotFound(f"job {self.job}: no recovery point {point_id}")
        return PointInfo.model_validate(rec)

    # ------------------------------------------------------------------ sync lifecycle

    def prepare(self, sync_id: str, disks: list[DiskInfo]) -> None:
        self.store.faults.check("target.prepare")
        nonce = secrets.token_hex(4)
        with self.store.locked() as b:
            if b.get(f"{self.top}/owner") is None:
                b.put(f"{self.top}/owner", {"job_id": self.job_id})
            self._drop_pending(b)
            latest = self._points(b)[:1]
            have = {d.key: d for d in latest[0].disks} if latest else {}
            pending: dict[str, Any] = {}
            for d in disks:
                blob = f"{self.top}/pending/{sync_id}.{nonce}/{safe_key(d.key)}"
                base = have.get(d.key)
                if base is not None:
                    b.copy(base.path, blob)
                    b.resize(blob, d.size)
                else:
                    b.create(blob, d.size)
                pending[d.key] = {"blob": blob, "size": d.size, "has_base": base is not None}
            b.put(f"{self.top}/pending", {"sync_id": sync_id, "disks": pending})

    @contextmanager
    def open_disk(self, sync_id: str, key: str) -> Iterator[MemoryTargetDisk]:
        self.store.faults.check("target.open_disk")
        with self.store.locked() as b:
            rec = b.get(f"{self.top}/pending")
        if rec is None or rec["sync_id"] != sync_id or key not in rec["disks"]:
            raise ResourceNotFound(f"target: disk {key} of sync {sync_id} is not prepared in {self._where()}")
        d = rec["disks"][key]
        label = f"replica of disk {key} (job {self.job}, {self._where()})"
        yield MemoryTargetDisk(self.store, d["blob"], d["size"], d["has_base"], self.spec.block_size, label)

    def commit(self, sync_id: str, point: PointInfo) -> PointInfo:
        self.store.faults.check("target.commit")
        with self.store.locked() as b:
            done = b.get(f"{self.top}/points/{point.point_id}")
            if done is not None:
                return next(p for p in self._points(b) if p.point_id == point.point_id)
            rec = b.get(f"{self.top}/pending")
            if rec is None or rec["sync_id"] != sync_id:
                raise TargetError(
                    f"target: sync {sync_id} has nothing pending in {self._where()} (not prepared)"
                )
            missing = [d.key for d in point.disks if d.key not in rec["disks"]]
            if missing:
                raise TargetError(f"target: sync {sync_id} has no replica of disk {', '.join(missing)}")
            disks = []
            for d in point.disks:
                blob = f"{self.top}/point/{point.point_id}/{safe_key(d.key)}"
                b.rename(rec["disks"][d.key]["blob"], blob)
                disks.append(d.model_copy(update={"path": blob}))
            committed = point.model_copy(
                update={"disks": disks, "committed_at": datetime.now(UTC), "holds": []}
            )
            b.put(f"{self.top}/points/{point.point_id}", committed.model_dump(mode="json"))
            self._drop_pending(b, sync_id)
            return committed

    def abort(self, sync_id: str) -> None:
        self.store.faults.check("target.abort")
        with self.store.locked() as b:
            self._drop_pending(b, sync_id)

    # ------------------------------------------------------------------ points

    def list_points(self) -> list[PointInfo]:
        self.store.faults.check("target.list_points")
        with self.store.locked() as b:
            return self._points(b)

    def get_point(self, point_id: str | None) -> PointInfo:
        return pick_point(self.job, self.list_points(), point_id)

    def prune(self, keep: int) -> list[str]:
        self.store.faults.check("target.prune")
        removed = []
        with self.store.locked() as b:
            for p in self._points(b)[keep:]:
                if p.holds:  # a drill's or failover's VM runs on it: kept whatever the retention
                    continue
                b.drop(f"{self.top}/points/{p.point_id}")  # no point from here on, then its bytes go
                for d in p.disks:
                    b.delete(d.path)
                removed.append(p.point_id)
        return removed

    def hold(self, point_id: str, hold_id: str, reason: str) -> None:
        with self.store.faults.effect("target.hold"):
            hid = _hold_id(hold_id)
            with self.store.locked() as b:
                if b.get(f"{self.top}/points/{point_id}") is None:
                    raise ResourceNotFound(f"job {self.job}: no recovery point {point_id}")
                holds = b.get(f"{self.top}/holds") or {}
                holds.setdefault(point_id, {}).setdefault(hid, reason)
                b.put(f"{self.top}/holds", holds)

    def release(self, point_id: str, hold_id: str) -> None:
        with self.store.faults.effect("target.release"):
            hid = _hold_id(hold_id)
            with self.store.locked() as b:
                holds = b.get(f"{self.top}/holds") or {}
                if hid not in holds.get(point_id, {}):
                    return
                del holds[point_id][hid]
                holds = {p: h for p, h in holds.items() if h}
                if holds:
                    b.put(f"{self.top}/holds", holds)
                else:
                    b.drop(f"{self.top}/holds")

    def export(self, point_id: str, fmt: str, out_dir: Path) -> list[tuple[str, Path]]:
        """Every disk of the point as a standalone image, or nothing (partial files are removed)."""
        self.store.faults.check("target.export")
        if fmt not in EXPORT_FORMATS:
            raise InvalidSpec(f"--format: {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
        files: list[tuple[str, Path]] = []
        try:
            with self.store.locked() as b, staging(out_dir) as stage:  # a prune waits: the point as committed
                point = next((p for p in self._points(b) if p.point_id == point_id), None)
                if point is None:
                    raise ResourceNotFound(f"job {self.job}: no recovery point {point_id}")
                for d in point.disks:
                    dst = export_name(out_dir, self.job, point.point_id, d.key, fmt)
                    raw = stage / f"{dst.name}.raw"
                    _write_raw(b, d.path, raw)
                    finish_export(raw, dst, fmt)
                    files.append((d.key, dst))
        except BaseException:
            for _, f in files:
                f.unlink(missing_ok=True)
            raise
        return files

    def destroy(self) -> None:
        self.store.faults.check("target.destroy")
        with self.store.locked() as b:
            held = [p for p in self._points(b) if p.holds]
            if held:
                names = ", ".join(f"{p.point_id} ({', '.join(p.holds)})" for p in held)
                raise TargetError(f"purge of job {self.job}: nothing deleted: points are held: {names}")
            if vms := vm_names(b, self.top):
                raise TargetError(
                    f"purge of job {self.job}: nothing deleted: VMs made from its points exist: "
                    f"{', '.join(vms)} (destroy them first)"
                )
            for n in b.records(f"{self.top}/"):
                b.drop(n)
            for blob in b.blobs(f"{self.top}/"):
                b.delete(blob)


def _write_raw(b: Backend, blob: str, path: Path) -> None:
    """The blob as a sparse raw file: only its data ranges are written."""
    size = b.size(blob)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for s, e in b.data_ranges(blob, 0, size):
            for pos in range(s, e, 4 << 20):
                os.pwrite(fd, b.read(blob, pos, min(4 << 20, e - pos)), pos)
        os.fsync(fd)
    finally:
        os.close(fd)


def _hold_id(hold_id: str) -> str:
    try:
        return check_hold_id(hold_id)
    except ValueError as e:
        raise InvalidSpec(str(e)) from None
