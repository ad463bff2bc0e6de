"""Failback from a vSphere target (sendense.protocols.VmChanges): what the failed-over VM (the
placeholder reverted to a point and running, vms.py) changed, read back for the reverse sync.

vSphere's own change tracking says it. The placeholder is made with change tracking on, so every point
snapshot carries a `changeId` per disk; the failed-over VM runs on a child of the point's files and
CBT records every block it writes. A reverse snapshot (`sendense-failback-<id>`, no memory, crash-
consistent) is asked `QueryChangedDiskAreas` from the point's changeId (the first reverse sync) or
from the previous reverse snapshot's (later ones), and its bytes are read through nbdkit's vddk plugin
with `snapshot=`. Releasing removes the snapshot (committed or not: vSphere keeps the changeIds of a
removed snapshot, so a committed one stays the next base).

A point taken before change tracking was on (a placeholder made by an older version) has no changeId:
that disk is read whole and compared (`tracking_lost` says why), never skipped. A VM made from a point
that is not the placeholder (a drill's linked clone) has change tracking of its own: refused in one
line (failback is of a failover's VM).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from typing import Any

from connectors.vsphere.handles import VsphereDisk, VsphereSnapshot
from connectors.vsphere.session import calling, snapshot_nodes
from connectors.vsphere.source import (
    VsphereSourceDisk,
    capacity,
    change_id,
    changed_areas,
    epoch,
    parse_change_id,
)
from connectors.vsphere.spec import VsphereTarget
from connectors.vsphere.target import disk_keys
from connectors.vsphere.vddk import serving
from connectors.vsphere.vms import FAILBACK_PREFIX, VsphereVmProvisioner
from sendense.datapath.extents import Extent, coalesce
from sendense.errors import InvalidSpec, ResourceNotFound
from sendense.models import DiskSnapshot, SnapshotRef
from sendense.protocols import POINT_BASE, point_base

log = logging.getLogger(__name__)

PREFIX = FAILBACK_PREFIX


class _VmDisk(VsphereSourceDisk):
    """A reverse snapshot's disk: `extents(point_base(...))` is what changed since the point."""

    def __init__(self, *args: Any, point_cid: str) -> None:
        super().__init__(*args)
        self.point_cid = point_cid

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        if since is not None and since.startswith(POINT_BASE):
            since = change_id(self.point_cid, self.size)
        return super().extents(since, start)


class VsphereVmChanges:
    platform = "vsphere"

    def __init__(self, job: str, spec: VsphereTarget, job_id: str = "") -> None:
        self.job, self.spec = job, spec
        self.vms = VsphereVmProvisioner(job, spec, job_id)
        self.target = self.vms.target
        self.session = self.target.session

    # ------------------------------------------------------------------ the VM and its point

    def _vm(self, name: str) -> tuple[Any, str]:
        """The production VM `name` (the placeholder) and the point it was made from."""
        vm = self.vms._production(name)
        if vm is None:
            if self.vms._clone(name) is not None:
                raise InvalidSpec(f"vm {name}: a drill's VM (a linked clone) cannot be failed back")
            raise ResourceNotFound(f"vm {name}: job {self.job} has no such VM on {self.spec.server}")
        marks = self.vms._marks(vm)
        assert marks is not None
        return vm, marks["point"]

    def _disks_at(self, snap: Any) -> dict[int, Any]:
        from pyVmomi import vim

        return {d.key: d for d in snap.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)}

    def _remove(self, vm: Any, name: str) -> None:
        from pyVmomi import vmodl

        for n in list(snapshot_nodes(vm)):
            if n.name == name:
                what = f"{self.target.label}: removing snapshot {name}"
                try:
                    with calling(what):
                        task = n.snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
                except vmodl.fault.ManagedObjectNotFound:
                    continue
                self.session.wait(task, what)

    # ------------------------------------------------------------------ VmChanges

    def snapshot_vm(self, name: str, snapshot_id: str, base: dict[str, str] | None = None) -> SnapshotRef:
        vm, point_id = self._vm(name)
        point, point_snap, _ = self.target._point(vm, point_id)
        snap_name = PREFIX + snapshot_id
        self._remove(vm, snap_name)  # a retried call: the snapshot is taken again
        what = f"vm {name}: snapshot {snap_name}"
        with calling(what):
            task = vm.CreateSnapshot_Task(
                name=snap_name, description=f"sendense job {self.job} failback", memory=False, quiesce=False
            )
        snap = self.session.wait(task, what)
        keys = disk_keys(snap.config)
        at_snap, at_point = self._disks_at(snap), self._disks_at(point_snap)
        disks = []
        for pd in point.disks:
            dk = keys.get(pd.key, -1)
            d = at_snap.get(dk)
            if d is None:
                self._remove(vm, snap_name)
                raise ResourceNotFound(f"vm {name}: has no disk {pd.key} of point {point_id}")
            size, now = capacity(d), str(getattr(d.backing, "changeId", "") or "")
            pcid = str(getattr(getattr(at_point.get(dk), "backing", None), "changeId", "") or "")
            prev = (base or {}).get(pd.key)
            lost = None
            if (
                now
                and prev
                and not prev.startswith(POINT_BASE)
                and epoch(parse_change_id(prev)[0]) == epoch(now)
            ):
                since: str | None = prev
            elif now and pcid and epoch(pcid) == epoch(now):
                since = point_base(point_id)
            else:
                since = None  # read whole and compared
                lost = (
                    f"point {point_id} has no change id for disk {pd.key} (change tracking was off when it "
                    "was taken)"
                    if not pcid
                    else f"change tracking of {self.target.label} was reset since point {point_id}"
                )
            disks.append(
                DiskSnapshot(
                    key=pd.key,
                    size=min(size, pd.size),
                    change_id=change_id(now or "-", min(size, pd.size)),
                    base_change_id=since,
                    tracking_lost=lost,
                    handle=VsphereDisk(device_key=d.key, file=str(d.backing.fileName), base_size=0).dump()
                    | {"point_cid": pcid},
                )
            )
        handle = VsphereSnapshot(vm=vm._moId, snapshot=snap._moId, name=snap_name)
        return SnapshotRef(
            snapshot_id=snapshot_id, created_at=datetime.now(UTC), disks=disks, handle=handle.dump()
        )

    def _snap(self, ref: SnapshotRef) -> tuple[Any, Any, VsphereSnapshot]:
        from pyVmomi import vim

        h = VsphereSnapshot.parse(ref.handle)
        vm = vim.VirtualMachine(h.vm, self.session.si._stub)
        snap = vim.vm.Snapshot(h.snapshot, self.session.si._stub)
        return vm, snap, h

    def changed_since_point(self, ref: SnapshotRef, key: str) -> Iterator[Extent]:
        d = ref.disk(key)
        vm, snap, _ = self._snap(ref)
        pcid = str(d.handle.get("point_cid") or "")
        dh = VsphereDisk.parse({k: v for k, v in d.handle.items() if k != "point_cid"})
        label = f"{self.target.label} disk {key}"
        if not pcid:
            yield Extent(0, d.size)  # (no change id at the point: all of it)
            return
        yield from coalesce(changed_areas(vm, snap, dh.device_key, pcid, 0, d.size, label))

    @contextmanager
    def open_disk(self, ref: SnapshotRef, key: str) -> Iterator[VsphereSourceDisk]:
        d = ref.disk(key)
        vm, snap, h = self._snap(ref)
        pcid = str(d.handle.get("point_cid") or "")
        plain = d.model_copy(update={"handle": {k: v for k, v in d.handle.items() if k != "point_cid"}})
        dh = VsphereDisk.parse(plain.handle)
        label = f"{self.target.label} disk {key} at {h.name}"
        with ExitStack() as stack:
            srv = stack.enter_context(serving(self.session.vddk(h.vm, dh.file, h.snapshot), label))
            disk = _VmDisk(self.session, vm, snap, plain, srv, label, point_cid=pcid)
            try:
                yield disk
            finally:
                disk.close()

    def release(self, ref: SnapshotRef, committed: bool) -> None:
        h = VsphereSnapshot.parse(ref.handle)
        ph = self.target._placeholder()
        if ph is None or ph._moId != h.vm:
            return  # the VM is gone, and its snapshots with it
        self._remove(ph, h.name)

    def forget(self, name: str) -> None:
        ph = self.vms._production(name)
        if ph is None:
            return
        for n in list(snapshot_nodes(ph)):
            if n.name.startswith(PREFIX):
                self._remove(ph, n.name)
