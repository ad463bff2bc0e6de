"""Failback onto a vSphere source (sendense.protocols.FailbackSink): the original VM's disks written in
place through nbdkit's vddk plugin (no `snapshot=`: the VM's current disk, writable while it is off).

- The VM must be powered off (`SourcePower.power_off_vm`): `open_disk` refuses a VM that runs, is
  suspended or is being powered on, in one line naming it.
- The job's change tracking goes on through the reverse writes: vSphere's CBT records every block
  written to the VM's disks, whoever writes them. `diverged(key, since)` asks it, from the failover
  point's change id, at a snapshot taken for the question (`sendense-<job>-failback-diverged`, removed
  right after; change ids of a removed snapshot stay valid): what the source wrote after its last
  point (an unplanned failover) and what reverse syncs wrote since. A change id vSphere refuses (a CBT
  reset, another epoch, a disk replaced) is ChangeTrackingLost: the reverse sync compares the whole
  disk. After failback the job's next forward sync is an incremental from its last change id: the
  reverse writes are in it.
- `rebase(snapshot_id)` takes the snapshot a sync `snapshot_id` would and removes it at once, keeping
  its change ids as the next sync's base.
- Disks are written in place: cut_over, undo_cut_over and cleanup have nothing to swap; cleanup removes
  a question snapshot a killed call left.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from connectors.vsphere.session import calling
from connectors.vsphere.source import (
    VsphereSourceConnector,
    capacity,
    changed_areas,
    disks_of,
    epoch,
    parse_change_id,
    snapshot_name,
)
from connectors.vsphere.spec import VsphereSource
from connectors.vsphere.target import PlaceholderDisk
from connectors.vsphere.vddk import serving
from sendense.datapath.extents import Extent, coalesce
from sendense.errors import ChangeTrackingLost, ResourceNotFound, ResourceUnavailable
from sendense.models import DiskInfo, SnapshotRef

log = logging.getLogger(__name__)

QUESTION = "failback-diverged"  # the snapshot diverged() asks CBT at


class VsphereFailbackSink:
    platform = "vsphere"

    def __init__(self, job: str, spec: VsphereSource, work_dir: Path) -> None:
        self.job, self.spec = job, spec
        self.source = VsphereSourceConnector(job, spec, work_dir)
        self.session = self.source.session

    def _disk(self, vm: Any, key: str) -> Any:
        for k, d, _bus in disks_of(list(vm.config.hardware.device)):
            if k == key:
                return d
        raise ResourceNotFound(f"source.vm {self.spec.vm}: has no disk {key} (the job's points have it)")

    def disks(self) -> list[DiskInfo]:
        return list(self.source.discover().disks)

    @contextmanager
    def open_disk(self, key: str) -> Iterator[PlaceholderDisk]:
        vm = self.source._vm()
        state = str(vm.runtime.powerState)
        if state != "poweredOff":
            raise ResourceUnavailable(
                f"source.vm {self.spec.vm} is {state}: failback writes its disks only while it is off "
                "(failback --stop-source powers it off)"
            )
        d = self._disk(vm, key)
        label = f"source.vm {self.spec.vm} disk {key}"
        t = self.session.vddk(vm._moId, str(d.backing.fileName), None)
        with serving(t, label, readonly=False) as srv:
            disk = PlaceholderDisk(srv.uri, capacity(d), True, label)
            try:
                yield disk
            finally:
                disk.close()

    def diverged(self, key: str, since: str) -> Iterator[Extent]:
        cid, base_size = parse_change_id(since)
        label = f"source.vm {self.spec.vm} disk {key}"
        if not cid or cid == "-":
            raise ChangeTrackingLost(f"{label}: the failover point has no change id")
        vm = self.source._vm()
        snap = self._question(vm)
        try:
            d = next((x for k, x, _ in disks_of(list(snap.config.hardware.device)) if k == key), None)
            if d is None:
                raise ResourceNotFound(
                    f"source.vm {self.spec.vm}: has no disk {key} (the job's points have it)"
                )
            now = str(getattr(d.backing, "changeId", "") or "")
            if not now:
                raise ChangeTrackingLost(f"{label}: change tracking is not active on the disk")
            if epoch(now) != epoch(cid):
                raise ChangeTrackingLost(f"{label}: change tracking was reset since the failover point")
            size = capacity(d)
            if base_size and size < base_size:
                raise ChangeTrackingLost(f"{label}: the disk is smaller than at the failover point")
            old = min(base_size or size, size)
            areas = list(changed_areas(vm, snap, d.key, cid, 0, old, label))
            if old < size:  # grown since: all of the grown part
                areas.append(Extent(old, size - old))
        finally:
            self._drop_question(vm)
        yield from coalesce(areas)

    def _question(self, vm: Any) -> Any:
        """A fresh snapshot of the VM to ask CBT at (one of an earlier, killed call goes first)."""
        self._drop_question(vm)
        name = snapshot_name(self.job, QUESTION)
        what = f"source.vm {self.spec.vm}: snapshot {name}"
        with calling(what):
            task = vm.CreateSnapshot_Task(
                name=name,
                description=f"sendense job {self.job}: failback asks change tracking",
                memory=False,
                quiesce=False,
            )
        return self.session.wait(task, what)

    def _drop_question(self, vm: Any) -> None:
        name = snapshot_name(self.job, QUESTION)
        for n in list(self.source._snapshots(vm)):
            if n.name == name:
                self.source._remove(n.snapshot, f"snapshot {name}")

    def rebase(self, snapshot_id: str) -> SnapshotRef:
        ref = self.source.create_snapshot(snapshot_id, {})
        self.source.release_snapshot(ref, committed=True)  # (its change ids stay valid)
        return ref

    def drop_base(self, ref: SnapshotRef) -> None:
        self.source.release_snapshot(ref, committed=False)  # removed already: nothing to do

    def cut_over(self) -> None:
        return None  # written in place

    def undo_cut_over(self) -> None:
        return None

    def cleanup(self) -> None:
        try:
            vm = self.source._vm()
        except ResourceNotFound:
            return
        self._drop_question(vm)
