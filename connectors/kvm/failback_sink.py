"""Failback on a KVM source (sendense.protocols.FailbackSink): the original VM's images written in
place, through `qemu-nbd` (writable), with the VM off.

Which images: the stopped-VM form's `disks` (keys disk<i>); the QMP form's images as its last
snapshot recorded them (`live_disks.record`, keys the VM's node names), so this runs on the agent that
synced the job; the libvirt form's qcow2 file disks as the libvirt source keys them (vda...), with
the domain shut off (`failback_libvirt`: its change ids are checkpoints, their bitmaps read offline).
The VM must be off (`SourcePower.power_off_vm`): a disk a VM runs on is refused in one line (QEMU's
image lock refuses it too).

The job's change tracking and failback:

- the job's bitmaps stay in the images while the VM is off, and those that were recording still record
  whatever is written through qemu-nbd: the failover point's bitmap (the job's last committed change
  id) covers what the source wrote after the point (an unplanned failover) and every reverse write
  since. `diverged(key, since)` reads it, so a reverse sync also puts back the VM's content where the
  source went its own way; and a forward sync from that change id, after failback, copies everything
  that differs from the failover point (a superset, never less);
- `rebase(snapshot_id)` adds the bitmaps (and shrink markers) a snapshot `snapshot_id` of the job
  would add, through the stopped-VM source itself (`offline.OfflineQcow2Source` under the form's
  keys), so the QMP source takes them as its base once the VM runs again: names
  `sendense.<job>.<snapshot>.<disk tag>` (`identity`). A forward sync from them copies only what is
  written after the rebase, which is right only if the job's newest point on the target reads what
  the images hold at the rebase (the target adopted the failed-over VM's final state as a point).
  Older bitmaps stay until the job's next commit removes them. A raw disk (QMP form) cannot hold a
  bitmap: it is left out, and its next forward sync is a resync. The libvirt form refuses it (libvirt
  makes checkpoints only in a running domain's backup job); the workflow does not rebase.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from connectors.kvm.identity import tracking_problem
from connectors.kvm.image_bitmaps import image_lock
from connectors.kvm.live_disks import recorded
from connectors.kvm.offline import BUSY_WAIT, OfflineQcow2Source
from connectors.kvm.power import make_kvm_power
from connectors.kvm.spec import KvmSource
from connectors.kvm.target import PendingDisk
from sendense.datapath.extents import Extent, coalesce
from sendense.datapath.nbd import ALLOCATION, NbdConnection, dirty_context
from sendense.errors import (
    ChangeTrackingLost,
    InvalidSpec,
    ResourceNotFound,
    ResourceUnavailable,
    TargetError,
)
from sendense.models import DiskInfo, SnapshotRef
from sendense.policy import require_source_path
from tools.image_chain import image_json, walk_chain
from tools.qemu import qemu_nbd, read_qcow2_header

if TYPE_CHECKING:
    from connectors.kvm.failback_libvirt import LibvirtDomainImages

log = logging.getLogger(__name__)


class KvmFailbackSink:
    platform = "kvm"

    def __init__(self, job: str, spec: KvmSource, work_dir: Path) -> None:
        self.job, self.spec, self.work_dir = job, spec, Path(work_dir)

    # ------------------------------------------------------------------ images

    def _images(self) -> list[tuple[str, Path, str]]:
        """(key, image, format) of every disk of the source VM."""
        if self.spec.disks is not None:
            return [(f"disk{i}", Path(p), "qcow2") for i, p in enumerate(self.spec.disks)]
        if self.spec.qmp is not None:
            disks = recorded(self.work_dir)
            if not disks:
                raise ResourceNotFound(
                    f"source.qmp: job {self.job} has no record of the VM's images on this agent "
                    f"({self.work_dir}): a failback writes them where the job's syncs ran"
                )
            return [(d.key, Path(d.image), "qcow2" if d.persistent else "raw") for d in disks]
        return [(k, p, "qcow2") for k, p in self._libvirt().images()]

    def _libvirt(self) -> LibvirtDomainImages:
        from connectors.kvm.failback_libvirt import LibvirtDomainImages

        assert self.spec.libvirt is not None
        return LibvirtDomainImages(self.job, self.spec.libvirt, self.work_dir)

    def _image(self, key: str) -> tuple[Path, str]:
        for k, path, fmt in self._images():
            if k == key:
                return path, fmt
        raise ResourceNotFound(f"source disk {key}: not part of job {self.job}")

    def _tracked(self) -> OfflineQcow2Source:
        """The stopped-VM source on the qcow2 images, under the form's keys (raw ones cannot be tracked)."""
        if self.spec.libvirt is not None:
            raise InvalidSpec(
                f"source.libvirt: job {self.job} cannot rebase a shut-off domain's change tracking "
                "(libvirt makes checkpoints only in a running domain's backup job)"
            )
        pairs = [(k, p) for k, p, fmt in self._images() if fmt == "qcow2"]
        return OfflineQcow2Source(self.job, [p for _, p in pairs], keys=[k for k, _ in pairs])

    def _spec(self, path: Path, fmt: str) -> str | None:
        """What qemu-nbd opens: exactly the image's checked chain (tools.image_chain)."""
        if fmt != "qcow2":
            require_source_path(path, "source disk")
            return None
        return image_json(walk_chain(path, require_source_path, f"source disk {path}"))

    def _check_off(self) -> None:
        state = make_kvm_power(self.job, self.spec, self.work_dir).power_state()
        if state in ("running", "paused"):
            raise TargetError(
                f"source VM of job {self.job} is {state}: power it off before a failback writes its disks"
            )
        if state == "unreachable":
            raise ResourceUnavailable(f"source VM of job {self.job} does not answer: is it off?")

    # ------------------------------------------------------------------ protocol

    def disks(self) -> list[DiskInfo]:
        out = []
        for key, path, fmt in self._images():
            if not path.exists():
                raise ResourceNotFound(f"source disk {key}: {path} not found")
            size = read_qcow2_header(path).size if fmt == "qcow2" else path.stat().st_size
            out.append(DiskInfo(key=key, size=size, ref=str(path)))
        return out

    @contextmanager
    def open_disk(self, key: str) -> Iterator[PendingDisk]:
        path, fmt = self._image(key)
        self._check_off()
        label = f"source disk {path} (failback of job {self.job})"
        with (
            image_lock(path, exclusive=True, wait=BUSY_WAIT, busy=self._busy(path)),
            qemu_nbd(path, fmt=fmt, readonly=False, spec=self._spec(path, fmt)) as srv,
        ):
            with NbdConnection(srv.uri, label=label) as probe:
                size = probe.size
            yield PendingDisk(srv.uri, size, has_base=True, label=label)

    def diverged(self, key: str, since: str) -> Iterator[Extent]:
        path, fmt = self._image(key)
        if fmt != "qcow2":
            raise ChangeTrackingLost(f"source disk {key} ({path}) is raw: no change tracking at rest")
        bitmap = since
        if self.spec.libvirt is not None:
            self._check_off()  # a running domain's bitmaps are QEMU's, in use
            bitmap = self._libvirt().bitmap(key, path, since)  # checked, or ChangeTrackingLost
        elif problem := tracking_problem(read_qcow2_header(path).bitmaps, since, str(path)):
            raise ChangeTrackingLost(problem)
        with (
            image_lock(path, exclusive=False, wait=BUSY_WAIT, busy=self._busy(path)),
            qemu_nbd(path, readonly=True, bitmaps=[bitmap], spec=self._spec(path, fmt)) as srv,
            NbdConnection(srv.uri, contexts=(ALLOCATION, dirty_context(bitmap)), label=str(path)) as c,
        ):
            yield from coalesce(c.changed_extents(bitmap))

    def rebase(self, snapshot_id: str) -> SnapshotRef:
        ref = self._tracked().create_snapshot(snapshot_id, {})
        log.info("job %s: failback rebased the source's change tracking at %s", self.job, snapshot_id)
        return ref

    def drop_base(self, ref: SnapshotRef) -> None:
        if self.spec.libvirt is not None:
            return None  # rebase never adds a base there
        self._tracked().release_snapshot(ref, committed=False)

    # The images are written in place: no cutover, nothing kept beside them.

    def cut_over(self) -> None:
        return None

    def undo_cut_over(self) -> None:
        return None

    def cleanup(self) -> None:
        return None

    def _busy(self, path: Path) -> str:
        return f"source disk {path} is in use by another job's step; the failback of job {self.job} retries"
