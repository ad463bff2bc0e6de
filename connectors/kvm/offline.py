"""KVM source, stopped VM: qcow2 images tracked by persistent qcow2 dirty bitmaps.

Change id = the name of a persistent bitmap in one disk, `sendense.<job>.<snapshot>.<tag>`, where the
tag is the disk's identity (its key and image path, hashed: `disk_tag`). A snapshot adds a new bitmap
to each disk; reads go through `qemu-nbd --read-only`, which locks out writers, exporting the base
bitmap (what changed since the last point) and the new one (which must still be empty: if the image
was written after the snapshot instant, the read would not be that instant, and the sync takes a new
snapshot). After a commit the older bitmaps of the job are removed; `forget` (the job is deleted)
removes all of them.

Why the tag: with one bitmap name on every disk, disks swapped behind their keys (image files renamed,
a VM restarted with its disks in another order) still "had" the base bitmap, and the sync ran as an
incremental against the other disk's changes. With the tag, a base is used only on the disk it was
made on; anything else is a resync with the reason (`identity.base_problem`).

Two jobs on one image: their bitmap changes and reads are ordered by `image_lock` (a reader holds it
shared, a bitmap change exclusively), so one job waits for the other's read instead of failing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from connectors.kvm.identity import base_problem, bitmap_name, bitmap_prefix, disk_tag
from connectors.kvm.qemu import (
    Qcow2Header,
    image_info,
    image_lock,
    is_qcow2,
    qemu_img,
    qemu_nbd,
    read_qcow2_header,
    remove_bitmaps,
)
from sendense.datapath.extents import Extent
from sendense.datapath.nbd import ALLOCATION, NbdConnection, dirty_context
from sendense.errors import (
    InvalidSpec,
    ResourceNotFound,
    ResourceUnavailable,
    SendenseError,
    SnapshotInconsistent,
)
from sendense.models import DiskInfo, DiskSnapshot, SnapshotRef, VmInfo

log = logging.getLogger(__name__)

BUSY_WAIT = 300.0  # seconds a bitmap change waits for another job's read of the same image


class NbdSourceDisk:
    """A source disk exported over NBD with `base:allocation` and optional dirty bitmaps.

    Every block status query of the disk (the snapshot check, the copy's size pass and its plan) goes
    through one connection that asks for `base:allocation` and every exported bitmap, opened at first
    use and closed with the disk: one handshake instead of one per query.
    """

    def __init__(
        self, uri: str, size: int, bitmap_for: dict[str, str] | None = None, *, bitmaps: Sequence[str] = ()
    ) -> None:
        self.uri, self.size = uri, size
        self.bitmap_for = bitmap_for or {}  # change id -> exported bitmap name
        self.bitmaps = tuple(dict.fromkeys([*self.bitmap_for.values(), *bitmaps]))  # exported names
        self._status: NbdConnection | None = None

    def status(self) -> NbdConnection:
        if self._status is None:
            contexts = (ALLOCATION, *(dirty_context(b) for b in self.bitmaps))
            self._status = NbdConnection(self.uri, contexts=contexts)
        return self._status

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        bitmap = None if since is None else self.bitmap_for.get(since, since)
        yield from self.status().changed_extents(bitmap, start=start)

    def connect(self) -> NbdConnection:
        return NbdConnection(self.uri)

    def close(self) -> None:
        if self._status is not None:
            self._status.close()
            self._status = None

    def __enter__(self) -> NbdSourceDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OfflineQcow2Source:
    platform = "kvm"
    busy_wait = BUSY_WAIT

    def __init__(self, job: str, disks: list[Path]) -> None:
        self.job = job
        self.paths = [Path(p) for p in disks]

    def _keys(self) -> list[tuple[str, Path]]:
        return [(f"disk{i}", p) for i, p in enumerate(self.paths)]

    def _path(self, key: str) -> Path:
        for k, p in self._keys():
            if k == key:
                return p
        raise ResourceNotFound(f"source disk {key}: not part of job {self.job}")

    def _info(self, i: int, path: Path) -> Qcow2Header:
        """The image's header, refusing what can never sync (raw, qcow2 v2, empty) with what to do."""
        field = f"source.disks[{i}]: {path}"
        if not path.exists():
            raise ResourceNotFound(f"{field} not found")
        if not path.is_file():
            raise InvalidSpec(f"{field} is not a file")
        if path.stat().st_size == 0:
            raise InvalidSpec(f"{field} is an empty file, not a qcow2 image: leave it out of source.disks")
        try:
            info = read_qcow2_header(path)  # one open and read of the header: this runs every sync
        except SendenseError:
            if is_qcow2(path):
                raise
            fmt = image_info(path).get("format")
            raise InvalidSpec(
                f"{field} is {fmt}, not qcow2: convert it with the VM stopped "
                f"(qemu-img convert -O qcow2 {path} NEW.qcow2) and list the new image"
            ) from None
        if info.version < 3:
            raise InvalidSpec(
                f"{field} is qcow2 v2 (compat=0.10), which cannot hold dirty bitmaps: upgrade it with "
                f"the VM stopped: qemu-img amend -o compat=1.1 {path}"
            )
        if info.size == 0:
            raise InvalidSpec(f"{field} has a virtual size of 0 bytes: leave it out of source.disks")
        return info

    def _lock(self, path: Path, *, exclusive: bool) -> AbstractContextManager[None]:
        return image_lock(
            path,
            exclusive=exclusive,
            wait=self.busy_wait,
            busy=f"source disk {path} is still being read by another job's sync after "
            f"{self.busy_wait:g}s; job {self.job} retries",
        )

    def validate(self) -> None:
        for i, p in enumerate(self.paths):
            self._info(i, p)

    def discover(self) -> VmInfo:
        disks = [
            DiskInfo(key=k, size=self._info(i, p).size, ref=str(p)) for i, (k, p) in enumerate(self._keys())
        ]
        return VmInfo(name=self.paths[0].stem, platform="kvm", disks=disks)

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        disks = []
        for i, (key, path) in enumerate(self._keys()):
            new = bitmap_name(self.job, snapshot_id, disk_tag(key, str(path)))
            with self._lock(path, exclusive=True):
                info = self._info(i, path)
                bitmaps = info.bitmaps
                since = base.get(key)
                lost = base_problem(self.job, since, key, str(path), bitmaps, str(path)) if since else None
                try:
                    if new in bitmaps:  # an earlier attempt's, whose instant is gone: start afresh
                        qemu_img("bitmap", "--remove", str(path), new)
                    qemu_img("bitmap", "--add", "--enable", str(path), new)
                except ResourceUnavailable:
                    raise ResourceUnavailable(
                        f"source disk {path} is in use by a running process; use the qmp or libvirt "
                        "form of source for a running VM"
                    ) from None
            disks.append(
                DiskSnapshot(
                    key=key,
                    size=info.size,
                    change_id=new,
                    base_change_id=since,
                    tracking_lost=lost,
                    handle={"path": str(path)},
                )
            )
        return SnapshotRef(snapshot_id=snapshot_id, created_at=datetime.now(UTC), disks=disks)

    @contextmanager
    def open_disk(self, snap: SnapshotRef, key: str) -> Iterator[NbdSourceDisk]:
        d = snap.disk(key)
        path = self._path(key)
        bitmaps = [d.change_id]
        if d.base_change_id and not d.tracking_lost:
            bitmaps.insert(0, d.base_change_id)
        with (
            self._lock(path, exclusive=False),
            qemu_nbd(path, readonly=True, bitmaps=bitmaps) as srv,
            NbdSourceDisk(srv.uri, d.size, bitmaps=bitmaps) as disk,
        ):
            if disk.status().size != d.size:
                raise SnapshotInconsistent(
                    f"source disk {path} was resized after snapshot {snap.snapshot_id}"
                )
            if next(iter(disk.status().changed_extents(d.change_id)), None) is not None:
                raise SnapshotInconsistent(
                    f"source disk {path} was written after snapshot {snap.snapshot_id}"
                )
            yield disk

    def release_snapshot(self, snap: SnapshotRef, committed: bool) -> None:
        prefix = bitmap_prefix(self.job)
        for d in snap.disks:
            path = self._path(d.key)
            if not path.exists():
                continue
            try:
                with self._lock(path, exclusive=True):
                    names = read_qcow2_header(path).bitmaps.keys()
                    if committed:
                        drop = [n for n in names if n.startswith(prefix) and n != d.change_id]
                    else:
                        drop = [d.change_id] if d.change_id in names else []
                    for n in drop:
                        qemu_img("bitmap", "--remove", str(path), n)
            except ResourceUnavailable as e:  # the next commit removes what stays
                log.warning("release of %s: bitmaps stay in %s: %s", snap.snapshot_id, path, e)

    def forget(self) -> None:
        """Remove every bitmap of this job from every disk; a disk that no longer exists is skipped."""
        prefix = bitmap_prefix(self.job)
        for path in self.paths:
            if not path.is_file():
                log.info("forget job %s: source disk %s is gone, nothing to remove", self.job, path)
                continue
            with self._lock(path, exclusive=True):
                remove_bitmaps(
                    path,
                    [n for n in read_qcow2_header(path).bitmaps if n.startswith(prefix)],
                    f"source disk {path} is in use by a running process: the dirty bitmaps {prefix}* of "
                    f"job {self.job} stay (remove them with qemu-img bitmap --remove once it is stopped)",
                )
