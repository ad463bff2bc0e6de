"""Failback on a KVM target (sendense.protocols.VmChanges): what a VM made from a point changed, read
back for the reverse sync.

What changed since the point: the VM's overlay itself. `vms.create_vm` makes one qcow2 overlay per
disk on the point's file, and QEMU writes only there, so the clusters the overlay holds (data, or
zeroed: a discard on an overlay with a backing file becomes a zero cluster) are exactly what the VM
changed, at the overlay's cluster size (64 KiB). This is the qcow2 allocation of the top layer, read
over NBD as `qemu:allocation-depth` (`NbdConnection.layer_extents`): no state to add at VM creation,
nothing to lose (a dirty bitmap added after power-on would miss the first writes, and one in QEMU
only would be gone after a crash), true across VM restarts and crashes. It grows with every write
since failover, though: repeated reverse syncs need what changed since the previous one, and that is
a dirty bitmap chain, which the QMP source (`live.QmpSource`) already keeps. So:

- running VM: a `QmpSource` of the VM's own QMP socket, under the tracker name `failback~<job>` (no
  job name has a `~`: its bitmaps never mix with a job's), its export also giving
  `qemu:allocation-depth`. Its fleece sits on the disk node: depth 1 is the fleece (blocks the VM
  overwrote since the snapshot, saved before the write: a false positive at worst), 2 the overlay,
  3 and more the point's chain; the top 2 layers are what changed;
- stopped VM: the stopped-disk source (`offline.OfflineQcow2Source`) on the overlays, under the same
  keys (the QEMU node names `disk<i>`, as `vm_qemu.command` names them) and tracker, with
  `qemu-nbd --allocation-depth`; the top layer is the overlay. QEMU's `quit` (`KvmVms.power_off`)
  stores the persistent bitmaps, so the chain continues from a running VM's snapshots into a stopped
  VM's (the cutover's final sync);
- a base that is lost (a VM killed with its bitmaps in use) falls back to the point, never to a
  full read.

The tracker's state (fleece files, its record) lives in the VM's state directory, which `destroy_vm`
removes with the VM: a failback leaves nothing behind on the target.
A libvirt VM (`KvmTarget.libvirt`) is read while stopped only (libvirt owns its QEMU's monitor and
exports nothing with allocation depth).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from connectors.kvm import handles
from connectors.kvm.live import QmpSource
from connectors.kvm.live_disks import QemuDisk, list_disks, record, refusal
from connectors.kvm.offline import NbdSourceDisk, OfflineQcow2Source
from connectors.kvm.vm_qemu import QemuBackend
from connectors.kvm.vm_state import VmPaths, VmRecord
from connectors.kvm.vms import KvmVms
from sendense.datapath.extents import Extent, coalesce
from sendense.datapath.nbd import ALLOCATION, ALLOCATION_DEPTH, NbdConnection
from sendense.errors import InvalidSpec, NotWhileRunning, ResourceNotFound
from sendense.models import DiskSnapshot, SnapshotRef
from sendense.policy import require_target_path
from sendense.protocols import POINT_BASE, point_base
from tools.image_chain import Level, walk_chain
from tools.qmp import QmpClient

log = logging.getLogger(__name__)

LIVE_LAYERS = 2  # fleece + overlay, above the point's chain
STOPPED_LAYERS = 1  # the overlay


def tracker(job: str) -> str:
    """The name failback's change tracking goes by on a failed-over VM of `job` (bitmap prefix
    `sendense.failback~<job>.`): '~' is in no job name, so no job's bitmaps or `forget` touch it."""
    return f"failback~{job}"


class _LiveVm(QmpSource):
    """The QMP source on a VM's own QEMU, its exports with allocation depth, its disks the VM's disk
    nodes only (a UEFI VM's firmware flash is no disk of the point)."""

    allocation_depth = True

    def __init__(self, job: str, qmp: Path, work_dir: Path, nodes: list[str]) -> None:
        super().__init__(job, qmp, work_dir)
        self.nodes = nodes

    def _disks(self, c: QmpClient) -> list[QemuDisk]:
        disks = [d for d in list_disks(c) if d.key in self.nodes]
        why = refusal(disks, self.qmp)
        if why:
            raise InvalidSpec(why)
        record(self.work_dir, self.qmp, disks)
        return disks


class _StoppedVm(OfflineQcow2Source):
    """The stopped-disk source on a VM's overlays, under the VM's QEMU node names."""

    nbd_options = ("--allocation-depth",)

    def _chain(self, i: int, path: Path, *, backing: bool = True) -> list[Level]:
        # the overlay and the point's chain are the target's files (its allowed roots, not the source's)
        return walk_chain(path, require_target_path, f"VM disk {path}", backing=backing)


class VmDisk:
    """A failed-over VM's disk at a reverse snapshot (sendense.protocols.SourceDisk): the form's disk,
    whose extents since the point are the overlay's own clusters."""

    def __init__(self, inner: NbdSourceDisk, point: str, layers: int) -> None:
        self.inner, self.point, self.layers = inner, point, layers
        self.size = inner.size
        self.tracks_resize = True  # the overlay keeps the point's size; bitmaps carry shrink markers
        self._depth: NbdConnection | None = None

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        if since != self.point:
            yield from self.inner.extents(since, start)
            return
        if self._depth is None:
            self._depth = NbdConnection(
                self.inner.uri, contexts=(ALLOCATION, ALLOCATION_DEPTH), label=self.inner.label
            )
        yield from self._depth.layer_extents(self.layers, start)

    def connect(self) -> NbdConnection:
        return self.inner.connect()

    def close(self) -> None:
        if self._depth is not None:
            self._depth.close()
            self._depth = None


class KvmVmChanges:
    platform = "kvm"

    def __init__(self, job: str, root: Path, job_id: str = "", *, vms: KvmVms | None = None) -> None:
        self.vms = vms or KvmVms(job, root, job_id)
        self.job = job
        self.tracker = tracker(job)

    # ------------------------------------------------------------------ forms

    def _vm(self, name: str) -> tuple[VmPaths, VmRecord, list[tuple[str, str, Path]]]:
        """The VM's files, record and disks as (point key, QEMU node name, overlay)."""
        paths, rec = self.vms._load(name)
        disks = [(k, f"disk{i}", paths.state / rec.overlays[k]) for i, k in enumerate(rec.disks)]
        return paths, rec, disks

    def _form(self, name: str) -> str:
        paths, rec, _ = self._vm(name)
        if not self.vms.backend.running(paths, rec.uuid):
            return "stopped"
        if not isinstance(self.vms.backend, QemuBackend):
            raise NotWhileRunning(
                f"VM {name} runs under libvirt, whose changes a failback reads only while it is stopped: "
                "power it off first"
            )
        return "qmp"

    def _source(self, name: str, form: str) -> _LiveVm | _StoppedVm:
        paths, _, disks = self._vm(name)
        if form == "qmp":
            return _LiveVm(self.tracker, paths.qmp, paths.state / "failback", [n for _, n, _ in disks])
        return _StoppedVm(self.tracker, [image for _, _, image in disks], keys=[n for _, n, _ in disks])

    @staticmethod
    def _inner(ref: SnapshotRef) -> SnapshotRef:
        """The form's own snapshot, under its own keys."""
        h = handles.VmChangesSnapshot.parse(ref.handle)
        disks = []
        for d in ref.disks:
            dh = handles.VmChangesDisk.parse(d.handle)
            disks.append(
                DiskSnapshot(
                    key=dh.node,
                    size=d.size,
                    change_id=d.change_id,
                    base_change_id=dh.base or None,
                    tracking_lost=dh.lost or None,
                    handle=dh.inner,
                )  # fmt: skip
            )
        return SnapshotRef(
            snapshot_id=ref.snapshot_id, created_at=ref.created_at, disks=disks, handle=h.inner
        )

    # ------------------------------------------------------------------ protocol

    def snapshot_vm(self, name: str, snapshot_id: str, base: dict[str, str] | None = None) -> SnapshotRef:
        paths, rec, disks = self._vm(name)
        point = point_base(rec.plan.point_id)
        form = self._form(name)
        base = base or {}
        bitmaps: dict[str, str | None] = {
            node: since
            for key, node, _ in disks
            if (since := base.get(key)) and not since.startswith(POINT_BASE)
        }
        inner = self._source(name, form).create_snapshot(snapshot_id, bitmaps)
        out = []
        for key, node, image in disks:
            d = inner.disk(node)
            usable = d.base_change_id is not None and not d.tracking_lost
            if d.tracking_lost:
                log.warning("VM %s disk %s: %s; copying what changed since point %s", name, key,
                            d.tracking_lost, rec.plan.point_id)  # fmt: skip
            dh = handles.VmChangesDisk(node=node, image=str(image), base=d.base_change_id or "",
                                       lost=d.tracking_lost or "", inner=d.handle)  # fmt: skip
            out.append(DiskSnapshot(key=key, size=d.size, change_id=d.change_id,
                                    base_change_id=d.base_change_id if usable else point,
                                    handle=dh.dump()))  # fmt: skip
        sh = handles.VmChangesSnapshot(vm=name, form=form, point_id=rec.plan.point_id, inner=inner.handle)
        log.info("job %s: reverse snapshot %s of VM %s (%s)", self.job, snapshot_id, name, form)
        return SnapshotRef(snapshot_id=snapshot_id, created_at=inner.created_at, disks=out, handle=sh.dump())

    @contextmanager
    def _open(self, ref: SnapshotRef, key: str) -> Iterator[VmDisk]:
        h = handles.VmChangesSnapshot.parse(ref.handle)
        dh = handles.VmChangesDisk.parse(ref.disk(key).handle)
        layers = LIVE_LAYERS if h.form == "qmp" else STOPPED_LAYERS
        with self._source(h.vm, h.form).open_disk(self._inner(ref), dh.node) as inner:
            disk = VmDisk(inner, point_base(h.point_id), layers)
            try:
                yield disk
            finally:
                disk.close()

    def open_disk(self, ref: SnapshotRef, key: str) -> AbstractContextManager[VmDisk]:
        return self._open(ref, key)

    def changed_since_point(self, ref: SnapshotRef, key: str) -> Iterator[Extent]:
        point = point_base(handles.VmChangesSnapshot.parse(ref.handle).point_id)
        with self._open(ref, key) as disk:
            yield from coalesce(disk.extents(point))

    def release(self, ref: SnapshotRef, committed: bool) -> None:
        h = handles.VmChangesSnapshot.parse(ref.handle)
        try:
            self._vm(h.vm)
        except ResourceNotFound as e:  # the VM is gone, and its state with it
            log.info("release of reverse snapshot %s: %s", ref.snapshot_id, e)
            return
        self._source(h.vm, h.form).release_snapshot(self._inner(ref), committed)

    def forget(self, name: str) -> None:
        try:
            form = self._form(name)
        except ResourceNotFound as e:
            log.info("forget failback of VM %s: %s", name, e)
            return
        self._source(name, form).forget()
