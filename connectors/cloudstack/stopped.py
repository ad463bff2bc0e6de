"""A stopped CloudStack VM's volumes, read at rest on primary storage, in the same change tracking as its
running domain's libvirt checkpoints: what a planned failover's final sync reads (CloudStack has no
pause: the failover stops the VM, then takes its last point), and any sync of a VM that is off.

The change ids are the libvirt source's (`<checkpoint>@<identity>`, connectors.kvm.libvirt_source):
when the VM stopped, QEMU stored the job's checkpoint bitmap in each volume's qcow2 file, so the base
is that bitmap, read at rest through `qemu-nbd --read-only` with the bitmap exported. A snapshot adds
the new checkpoint's bitmap to each volume (`qemu-img bitmap --add --enable`, the name libvirt would
have given it): when the VM starts again, on any host, QEMU loads it recording, the host's libvirt
adopts it as a checkpoint (LibvirtSource._adopt_carried) and the next sync is incremental there too.
Reads hold qemu-nbd's shared lock: the VM cannot be started while a read runs (CloudStack's start
fails, as it would for a volume being copied), nor can a volume be read that something writes.

A volume whose base bitmap is missing, not recording, or in use (a QEMU that did not store it: the
host crashed) is resynced by digests, with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from connectors.kvm import handles
from connectors.kvm.identity import bitmap_prefix, libvirt_identity, libvirt_identity_problem, split_change_id
from connectors.kvm.offline import NbdSourceDisk
from sendense.errors import ResourceNotFound, ResourceUnavailable, SnapshotInconsistent
from sendense.models import DiskSnapshot, SnapshotRef
from tools.qemu import image_info, qcow2_bitmaps, qemu_img, qemu_nbd, remove_bitmaps

log = logging.getLogger(__name__)


class StoppedVolumes:
    """The volumes (key -> file on this host's view of primary storage) of stopped VM `vm_id`."""

    keep: frozenset[str] = frozenset()  # bitmaps of the job that release and forget leave (failback's point)

    def __init__(self, job: str, label: str, vm_id: str, volumes: dict[str, Path]) -> None:
        self.job, self.label, self.vm_id, self.volumes = job, label, vm_id, volumes
        self.prefix = bitmap_prefix(job)

    def _path(self, key: str) -> Path:
        path = self.volumes.get(key)
        if path is None:
            raise ResourceNotFound(f"{self.label}: volume {key} is not attached to it any more")
        if not path.is_file():
            raise ResourceUnavailable(
                f"{self.label}: volume {key} is not on this agent's primary storage ({path.parent} "
                "is not mounted here?)",
                retryable=False,
            )
        return path

    def _bitmaps(self, path: Path) -> dict[str, list[str]]:
        return qcow2_bitmaps(image_info(path))

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        new = self.prefix + snapshot_id
        disks = []
        for key in sorted(self.volumes):
            path = self._path(key)
            ident = libvirt_identity(self.vm_id, key, str(path))
            bitmaps = self._bitmaps(path)
            since = base.get(key)
            lost = None
            if since:
                lost = libvirt_identity_problem(since, ident, self.label, key, str(path))
                cp = split_change_id(since)[0]
                flags = bitmaps.get(cp)
                if lost:
                    pass
                elif flags is None:
                    lost = f"dirty bitmap {cp} of volume {key} is missing from it"
                elif "in-use" in flags:
                    lost = f"dirty bitmap {cp} of volume {key} was not stored cleanly (its QEMU crashed?)"
                elif "auto" not in flags:
                    lost = f"dirty bitmap {cp} of volume {key} is not recording (disabled)"
            try:
                if new in bitmaps:  # an earlier attempt's, whose instant is gone: start afresh
                    qemu_img("bitmap", "--remove", str(path), new)
                qemu_img("bitmap", "--add", "--enable", str(path), new)
            except ResourceUnavailable:
                raise ResourceUnavailable(
                    f"{self.label} was started while its stopped volumes were being snapshotted: the "
                    "next sync reads it running",
                    retryable=False,
                ) from None
            if lost:
                log.warning("%s: volume %s is resynced: %s", self.label, key, lost)
            disks.append(
                DiskSnapshot(
                    key=key,
                    size=int(image_info(path)["virtual-size"]),
                    change_id=f"{new}@{ident}",
                    base_change_id=since,
                    tracking_lost=lost,
                    handle=handles.OfflineDisk(path=str(path)).dump(),
                )
            )
        return SnapshotRef(snapshot_id=snapshot_id, created_at=datetime.now(UTC), disks=disks)

    @contextmanager
    def open_disk(self, snap: SnapshotRef, key: str) -> Iterator[NbdSourceDisk]:
        d = snap.disk(key)
        path = Path(handles.OfflineDisk.parse(d.handle).path)
        new = split_change_id(d.change_id)[0]
        base = split_change_id(d.base_change_id)[0] if d.base_change_id and not d.tracking_lost else None
        exported = [b for b in (base, new) if b]
        with ExitStack() as stack:
            try:
                srv = stack.enter_context(qemu_nbd(path, readonly=True, bitmaps=exported))
            except ResourceUnavailable as e:  # (locked: the VM was started)
                raise ResourceUnavailable(f"{self.label}: volume {key} cannot be read at rest: {e}") from None
            disk = stack.enter_context(
                NbdSourceDisk(
                    srv.uri,
                    d.size,
                    {d.base_change_id: base} if base and d.base_change_id else {},
                    bitmaps=[new],
                    label=f"volume {key} of {self.label}",
                )
            )
            if disk.status().size != d.size:
                raise SnapshotInconsistent(f"{self.label}: volume {key} was resized after the snapshot")
            if next(iter(disk.status().changed_extents(new)), None) is not None:
                raise SnapshotInconsistent(
                    f"{self.label} was started and wrote volume {key} after snapshot {snap.snapshot_id}"
                )
            yield disk

    def release_snapshot(self, snap: SnapshotRef, committed: bool) -> None:
        """Committed: the job's older bitmaps go (the new one is the next base, recording when the VM
        starts). Not committed: the new one goes and the base stays."""
        for d in snap.disks:
            path = Path(handles.OfflineDisk.parse(d.handle).path)
            if not path.is_file():
                continue
            new = split_change_id(d.change_id)[0]
            names = self._bitmaps(path)
            drop = [n for n in names if n.startswith(self.prefix) and n != new] if committed else [new]
            drop = [n for n in drop if n not in self.keep]
            drop = [n for n in drop if n in names]
            try:
                remove_bitmaps(path, drop, f"{self.label} was started: bitmaps {', '.join(drop)} stay")
            except ResourceUnavailable as e:  # its libvirt deletes them as checkpoints later
                log.warning("%s", e)

    def forget(self) -> None:
        for key, path in sorted(self.volumes.items()):
            if not path.is_file():
                log.info("%s: volume %s is not here, nothing to remove", self.label, key)
                continue
            mine = [n for n in self._bitmaps(path) if n.startswith(self.prefix) and n not in self.keep]
            remove_bitmaps(
                path,
                mine,
                f"{self.label} was started: the dirty bitmaps {self.prefix}* of job {self.job} stay in "
                f"volume {key} (the next deletion of the job on its host removes them)",
            )
