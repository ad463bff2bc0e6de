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

Shrink markers: a shrink truncates every bitmap and a grow extends them clean, so a disk shrunk and
grown back between two points reads zeros in the regrown area that no bitmap shows as changed (the
point kept the old bytes there). Each snapshot's bitmap therefore has two disabled markers,
`sendense-shrink.<job>.<snapshot>.<tag>.span|tail` (`image_bitmaps.add_shrink_markers`): a clean tail
means the disk was shrunk since, and where the span turns clean says to where (within one 64 KiB granule), so
the next incremental from that base also copies everything from there on (`NbdSourceDisk.regrown`).
A shrink between a snapshot and its copy makes that snapshot inconsistent.

Two jobs on one image: their bitmap changes and reads are ordered by `image_lock` (a reader holds it
shared, a bitmap change exclusively), so one job waits for the other's read instead of failing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from connectors.kvm import handles
from connectors.kvm.identity import (
    base_problem,
    bitmap_name,
    bitmap_prefix,
    disk_tag,
    marker_prefix,
    shrink_markers,
)
from connectors.kvm.image_bitmaps import (
    SPAN_GRANULARITY,
    add_shrink_markers,
    bitmap_dirty_end,
    bitmap_is_clean,
    image_lock,
)
from connectors.kvm.spec import SOURCE_REFUSED, KvmHardware, refuse_system_tree, same_files
from sendense.datapath.extents import Extent
from sendense.datapath.nbd import ALLOCATION, NbdConnection, dirty_context
from sendense.errors import (
    InvalidSpec,
    ResourceNotFound,
    ResourceUnavailable,
    SnapshotInconsistent,
)
from sendense.models import DiskInfo, DiskSnapshot, NicInfo, SnapshotRef, VmInfo
from sendense.policy import require_source_path
from tools.image_chain import Level, image_json, walk_chain
from tools.qcow2 import BadImage, NotQcow2, sniff_format
from tools.qemu import (
    Qcow2Header,
    qemu_img,
    qemu_nbd,
    read_qcow2_header,
    remove_bitmaps,
)

log = logging.getLogger(__name__)

BUSY_WAIT = 300.0  # seconds a bitmap change waits for another job's read of the same image


class NbdSourceDisk:
    """A source disk exported over NBD with `base:allocation` and optional dirty bitmaps.

    Every block status query of the disk (the snapshot check, the copy's size pass and its plan) goes
    through one connection that asks for `base:allocation` and every exported bitmap, opened at first
    use and closed with the disk: one handshake instead of one per query.
    """

    def __init__(
        self,
        uri: str,
        size: int,
        bitmap_for: dict[str, str] | None = None,
        *,
        bitmaps: Sequence[str] = (),
        regrown: int | None = None,
        tracks_resize: bool = False,
        label: str | None = None,
    ) -> None:
        self.uri, self.size = uri, size
        self.label = label  # what errors call the disk (its image, its VM): never the internal socket
        # the form's shrink markers catch a shrink (datapath.sync skips its own check then); libvirt
        # owns its bitmaps and has none
        self.tracks_resize = tracks_resize
        self.bitmap_for = bitmap_for or {}  # change id -> exported bitmap name
        self.regrown = regrown  # changed since the base from here on, whatever the bitmap says (a shrink)
        self.bitmaps = tuple(dict.fromkeys([*self.bitmap_for.values(), *bitmaps]))  # exported names
        self._status: NbdConnection | None = None

    def status(self) -> NbdConnection:
        if self._status is None:
            contexts = (ALLOCATION, *(dirty_context(b) for b in self.bitmaps))
            self._status = NbdConnection(self.uri, contexts=contexts, label=self.label)
        return self._status

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        bitmap = None if since is None else self.bitmap_for.get(since, since)
        cut = self.regrown if bitmap is not None and self.regrown is not None else self.size
        if start < cut:
            yield from self.status().changed_extents(bitmap, start=start, end=cut)
        if cut < self.size:
            yield from self.status().changed_extents(None, start=max(start, cut))

    def connect(self) -> NbdConnection:
        return NbdConnection(self.uri, label=self.label)

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
    nbd_options: tuple[str, ...] = ()  # more qemu-nbd options for reads (vm_changes: --allocation-depth)

    def __init__(
        self,
        job: str,
        disks: list[Path],
        hardware: KvmHardware | None = None,
        *,
        keys: list[str] | None = None,
    ) -> None:
        self.job = job
        self.paths = [Path(p) for p in disks]
        self.hardware = hardware or KvmHardware()  # the spec's word: the images say nothing of it
        # the disks' keys: disk<i> for a stopped VM's spec; another form's keys for its images at rest
        # (a QMP VM's node names, when a failback writes them back or reads a stopped VM's overlays)
        self.keys = keys or [f"disk{i}" for i in range(len(self.paths))]

    def _keys(self) -> list[tuple[str, Path]]:
        return list(zip(self.keys, self.paths, strict=True))

    def _path(self, key: str) -> Path:
        for k, p in self._keys():
            if k == key:
                return p
        raise ResourceNotFound(f"source disk {key}: not part of job {self.job}")

    def _index(self, key: str) -> int:
        for i, (k, _) in enumerate(self._keys()):
            if k == key:
                return i
        raise ResourceNotFound(f"source disk {key}: not part of job {self.job}")

    def _chain(self, i: int, path: Path, *, backing: bool = True) -> list[Level]:
        """The files QEMU would open for disk `i` (its backing chain and data files, or the image
        alone for a bitmap change), each checked against the agent's allowed source roots before
        anything reads it (tools.image_chain)."""
        return walk_chain(path, require_source_path, f"source.disks[{i}]: {path}", backing=backing)

    def _spec(self, i: int, path: Path, *, backing: bool = True) -> str:
        """What QEMU is given to open disk `i`: exactly the checked files, with explicit formats."""
        return image_json(self._chain(i, path, backing=backing))

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
        except NotQcow2:
            fmt = sniff_format(path)  # not qemu-img info: some formats name other files, which it opens
            raise InvalidSpec(
                f"{field} is {fmt}, not qcow2: convert it with the VM stopped "
                f"(qemu-img convert -O qcow2 {path} NEW.qcow2) and list the new image"
            ) from None
        except BadImage as e:
            raise InvalidSpec(f"{field}: qcow2 header: {e.reason}") from None
        if info.version < 3:
            raise InvalidSpec(
                f"{field} is qcow2 v2 (compat=0.10), which cannot hold dirty bitmaps: upgrade it with "
                f"the VM stopped: qemu-img amend -o compat=1.1 {path}"
            )
        if info.size == 0:
            raise InvalidSpec(f"{field} has a virtual size of 0 bytes: leave it out of source.disks")
        self._chain(i, path)  # backing and data files only inside the allowed roots
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
        # as the spec's loader checks them, again here: a job given through the SDK skips the loader
        try:
            for i, p in enumerate(self.paths):
                refuse_system_tree(p, SOURCE_REFUSED, f"source.disks[{i}]")
        except ValueError as e:
            raise InvalidSpec(str(e)) from None
        if same := same_files(self.paths):
            raise InvalidSpec(f"source: disks lists the same image twice ({same[0]} and {same[1]})")
        for i, p in enumerate(self.paths):
            self._info(i, p)

    def discover(self) -> VmInfo:
        hw = self.hardware
        disks = [
            DiskInfo(
                key=k, size=self._info(i, p).size, ref=str(p), bus=hw.bus, boot_order=1 if i == 0 else None
            )
            for i, (k, p) in enumerate(self._keys())
        ]
        return VmInfo(
            name=self.paths[0].stem,
            platform="kvm",
            disks=disks,
            cpus=hw.cpus,
            memory_mib=hw.memory_mib,
            firmware=hw.firmware,
            nics=[NicInfo(mac=n.mac.lower(), network=n.network, model=n.model) for n in hw.nics],
        )

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        disks = []
        for i, (key, path) in enumerate(self._keys()):
            new = bitmap_name(self.job, snapshot_id, disk_tag(key, str(path)))
            with self._lock(path, exclusive=True):
                info = self._info(i, path)
                bitmaps = info.bitmaps
                since = base.get(key)
                lost = base_problem(self.job, since, key, str(path), bitmaps, str(path)) if since else None
                regrown = None
                if since and not lost:
                    lost, regrown = self._shrunk(path, info, since)
                spec = self._spec(i, path, backing=False)
                try:
                    for n in (new, *shrink_markers(new, self.job)):
                        if n in bitmaps:  # an earlier attempt's, whose instant is gone: start afresh
                            qemu_img("bitmap", "--remove", spec, n)
                    qemu_img("bitmap", "--add", "--enable", spec, new)
                    add_shrink_markers(path, *shrink_markers(new, self.job), info.size, spec=spec)
                except ResourceUnavailable:
                    raise ResourceUnavailable(
                        f"source disk {path} is in use by a running process; use the qmp or libvirt "
                        "form of source for a running VM"
                    ) from None
            if regrown is not None:
                log.info(
                    "source disk %s was shrunk since %s: everything from %d is copied", path, since, regrown
                )
            handle = handles.OfflineDisk(path=str(path), regrown=regrown).dump()
            disks.append(
                DiskSnapshot(
                    key=key,
                    size=info.size,
                    change_id=new,
                    base_change_id=since,
                    tracking_lost=lost,
                    handle=handle,
                )
            )
        return SnapshotRef(snapshot_id=snapshot_id, created_at=datetime.now(UTC), disks=disks)

    def _shrunk(self, path: Path, info: Qcow2Header, since: str) -> tuple[str | None, int | None]:
        """(why tracking is lost, None) if base `since`'s shrink markers are gone or unusable; else
        (None, the offset from which the disk may have been shrunk and grown back since the base, or
        None if it was not shrunk)."""
        span, tail = shrink_markers(since, self.job)
        for m in (span, tail):
            if m not in info.bitmaps:
                return f"the shrink marker {m} of dirty bitmap {since} is missing from {path}", None
            if info.bitmaps[m]:  # in-use: the image was not closed cleanly
                return f"the shrink marker {m} of dirty bitmap {since} in {path} is inconsistent", None
        if not bitmap_is_clean(path, info, tail):
            return None, None
        end = bitmap_dirty_end(path, info, span, SPAN_GRANULARITY)  # the shrunk size is within a granule
        return None, max(0, end - SPAN_GRANULARITY)

    @contextmanager
    def open_disk(self, snap: SnapshotRef, key: str) -> Iterator[NbdSourceDisk]:
        d = snap.disk(key)
        path = self._path(key)
        bitmaps = [d.change_id]
        if d.base_change_id and not d.tracking_lost:
            bitmaps.insert(0, d.base_change_id)
        regrown = handles.OfflineDisk.parse(d.handle).regrown
        with (
            self._lock(path, exclusive=False),
            qemu_nbd(
                path,
                readonly=True,
                bitmaps=bitmaps,
                extra=self.nbd_options,
                spec=self._spec(self._index(key), path),
            ) as srv,
            NbdSourceDisk(
                srv.uri,
                d.size,
                bitmaps=bitmaps,
                regrown=regrown,
                tracks_resize=True,
                label=f"source disk {path}",
            ) as disk,
        ):
            info = read_qcow2_header(path)
            tail = shrink_markers(d.change_id, self.job)[1]
            if disk.status().size != d.size or tail not in info.bitmaps or bitmap_is_clean(path, info, tail):
                raise SnapshotInconsistent(
                    f"source disk {path} was resized after snapshot {snap.snapshot_id}"
                )
            if next(iter(disk.status().changed_extents(d.change_id)), None) is not None:
                raise SnapshotInconsistent(
                    f"source disk {path} was written after snapshot {snap.snapshot_id}"
                )
            yield disk

    def release_snapshot(self, snap: SnapshotRef, committed: bool) -> None:
        prefix, markers = bitmap_prefix(self.job), marker_prefix(self.job)
        for d in snap.disks:
            path = self._path(d.key)
            if not path.exists():
                continue
            try:
                with self._lock(path, exclusive=True):
                    spec = self._spec(self._index(d.key), path, backing=False)
                    names = read_qcow2_header(path).bitmaps.keys()
                    keep = {d.change_id, *shrink_markers(d.change_id, self.job)}
                    if committed:
                        drop = [n for n in names if n.startswith((prefix, markers)) and n not in keep]
                    else:
                        drop = [n for n in names if n in keep]
                    for n in drop:
                        qemu_img("bitmap", "--remove", spec, n)
            except ResourceUnavailable as e:  # the next commit removes what stays
                log.warning("release of %s: bitmaps stay in %s: %s", snap.snapshot_id, path, e)

    def forget(self) -> None:
        """Remove every bitmap of this job from every disk; a disk that no longer exists is skipped."""
        prefix, markers = bitmap_prefix(self.job), marker_prefix(self.job)
        for i, path in enumerate(self.paths):
            if not path.is_file():
                log.info("forget job %s: source disk %s is gone, nothing to remove", self.job, path)
                continue
            with self._lock(path, exclusive=True):
                remove_bitmaps(
                    path,
                    [n for n in read_qcow2_header(path).bitmaps if n.startswith((prefix, markers))],
                    f"source disk {path} is in use by a running process: the dirty bitmaps {prefix}* of "
                    f"job {self.job} stay (remove them with qemu-img bitmap --remove once it is stopped)",
                    spec=self._spec(i, path, backing=False),
                )
