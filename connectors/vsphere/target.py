"""vSphere as a replication target: a powered-off placeholder VM whose snapshots are the recovery points.

- The placeholder (`target.vm_name`, default `sendense-<job>`) is made on the first sync in the spec's
  datacenter, cluster or host, folder and datastore, with thin disks of the source's sizes on a
  paravirtual SCSI controller, and marked as the job's in its extraConfig (`sendense.job_id`; a VM
  of that name that is not this job's is refused, never written). Which disk holds which source disk
  is its extraConfig too (`sendense.disk.<key>` = the disk's device key).
- A sync writes the changed ranges into the placeholder's current disks through nbdkit's vddk plugin
  (no `snapshot=`: the VM's current disk, writable while the VM is off). Commit takes a snapshot
  named `sendense-point-<point>` whose description holds the point's record (JSON): the point exists
  iff its snapshot does, and its bytes are the snapshot's, which nothing writes again.
- A sync that does not commit is undone by reverting to the newest point (its partial writes go with
  the discarded delta); before the first point the placeholder is made again.
- Retention removes the oldest points' snapshots (vSphere consolidates their deltas into the next);
  a held point (a custom attribute per hold: reverting keeps it) is never removed, nor the point
  before it (removing that one would rewrite the files the held point's VM runs on). `export` reads a
  point's snapshot through the vddk plugin with `snapshot=`.
- Disks: a disk added to the source is added to the placeholder; a disk removed stays (older points
  hold it); a grown disk is grown while the placeholder has no points; vSphere cannot extend a disk
  of a VM that has snapshots, which is said in one line.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from connectors.vsphere.session import (
    Session,
    calling,
    config_options,
    credentials,
    extra_config,
    fault_text,
    snapshot_nodes,
)
from connectors.vsphere.source import capacity
from connectors.vsphere.spec import VsphereTarget
from connectors.vsphere.vddk import serving
from sendense.datapath.extents import Extent
from sendense.datapath.nbd import NbdConnection
from sendense.errors import InvalidSpec, ResourceNotFound, SendenseError, TargetError
from sendense.models import DiskInfo, PointInfo, check_hold_id
from sendense.protocols import pick_point
from tools.exports import EXPORT_FORMATS, export_name, staging
from tools.qemu import qemu_img

log = logging.getLogger(__name__)

POINT_PREFIX = "sendense-point-"
KEY_JOB = "sendense.job_id"
KEY_DISK = "sendense.disk."
EXPORT_HOLD = timedelta(hours=12)  # an export's hold outlives no exporter by more than this
EXPORT_REASON = "point export until "
KEY_SYNC = "sendense.sync"  # the sync whose writes the placeholder's current disks hold
SCSI_KEY = 1000  # the placeholder's controller; its disks are units 0-6 and 8-15 (7 is the controller's)


def _hold_id(hold_id: str) -> str:
    try:
        return check_hold_id(hold_id)
    except ValueError as e:
        raise InvalidSpec(str(e)) from None


class _SharedWriter:
    """One of the copy's writers over the disk's one VDDK connection (see PlaceholderDisk)."""

    def __init__(self, conn: NbdConnection) -> None:
        self.conn = conn

    def read(self, offset: int, length: int) -> bytes:
        return self.conn.read(offset, length)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.conn.write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        self.conn.zero(offset, length)

    def flush(self) -> None:
        self.conn.flush()

    def wire(self) -> None:
        return None  # (several writers share the socket: no splicing into it)

    def close(self) -> None:
        pass  # the disk closes the connection


class PlaceholderDisk:
    """A placeholder disk being written through the vddk plugin (the copy engine's TargetDisk).

    VDDK opens a disk for writing once (the host locks it): every writer of the copy shares one NBD
    connection (libnbd handles are thread-safe), however many connections the tuning asks for."""

    block_size = 1

    def __init__(self, uri: str, size: int, has_base: bool, label: str) -> None:
        self.uri, self.size, self.has_base, self.label = uri, size, has_base, label
        self._conn: NbdConnection | None = None
        self._lock = threading.Lock()

    def connect(self) -> _SharedWriter:
        with self._lock:
            if self._conn is None:
                self._conn = NbdConnection(self.uri, writable=True, label=self.label)
            return _SharedWriter(self._conn)

    def data_extents(self, start: int, end: int) -> Iterator[Extent]:
        """Where the disk may hold data: the whole range (a second open of a disk VDDK holds for
        writing is refused, and a replica's holes are no promise on a real datastore)."""
        if end > start:
            yield Extent(start, end - start)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class VsphereTargetConnector:
    platform = "vsphere"

    def __init__(self, job: str, spec: VsphereTarget, job_id: str = "") -> None:
        self.job, self.spec, self.job_id = job, spec, job_id
        self.session = Session(spec)
        self.name = spec.vm_name or f"sendense-{job}"
        self.label = f"placeholder VM {self.name}"

    def _owner(self) -> str:
        """What the placeholder's KEY_JOB holds: the job's id (its name for a job made before ids)."""
        return self.job_id or f"name:{self.job}"

    # ---------------------------------------------------------------- inventory

    def _datacenter(self) -> Any:
        from pyVmomi import vim

        dcs = [e for e in self.session.content.rootFolder.childEntity if isinstance(e, vim.Datacenter)]
        if self.spec.datacenter is not None:
            for dc in dcs:
                if dc.name == self.spec.datacenter:
                    return dc
            raise ResourceNotFound(
                f"target.datacenter {self.spec.datacenter}: no such datacenter on {self.spec.server}"
            )
        if len(dcs) != 1:
            raise InvalidSpec(f"target.datacenter: {self.spec.server} has {len(dcs)} datacenters: name one")
        return dcs[0]

    def _placeholder(self) -> Any | None:
        """The job's placeholder VM, None if there is none; another VM of its name is refused."""
        from pyVmomi import vim

        dc = self._datacenter()
        vm = self.session.content.searchIndex.FindChild(self._folder(dc), self.name)
        if vm is None:
            return None
        if not isinstance(vm, vim.VirtualMachine):
            raise InvalidSpec(f"target.vm_name {self.name}: that name is taken by something that is not a VM")
        if extra_config(vm).get(KEY_JOB) != self._owner():
            raise InvalidSpec(
                f"target.vm_name {self.name}: a VM of that name exists and is not this job's placeholder"
            )
        return vm

    def _folder(self, dc: Any) -> Any:
        if self.spec.folder is None:
            return dc.vmFolder
        path = f"{dc.name}/vm/{self.spec.folder.strip('/')}"
        f = self.session.content.searchIndex.FindByInventoryPath(path)
        if f is None:
            raise ResourceNotFound(f"target.folder {self.spec.folder}: no such VM folder in {dc.name}")
        return f

    def _pool_and_host(self, dc: Any) -> tuple[Any, Any]:
        from pyVmomi import vim

        computes = [c for c in dc.hostFolder.childEntity if isinstance(c, vim.ComputeResource)]
        if self.spec.cluster is not None:
            for c in computes:
                if isinstance(c, vim.ClusterComputeResource) and c.name == self.spec.cluster:
                    return c.resourcePool, None
            raise ResourceNotFound(f"target.cluster {self.spec.cluster}: no such cluster in {dc.name}")
        for c in computes:
            for h in c.host:
                if self.spec.esx_host is None or h.name == self.spec.esx_host:
                    return c.resourcePool, h
        what = (
            f"target.esx_host {self.spec.esx_host}: no such host" if self.spec.esx_host else "target: no host"
        )
        raise ResourceNotFound(f"{what} in {dc.name}")

    def _datastore(self, dc: Any) -> Any:
        for ds in dc.datastore:
            if ds.name == self.spec.datastore:
                return ds
        raise ResourceNotFound(f"target.datastore {self.spec.datastore}: no such datastore in {dc.name}")

    def _disks(self, vm: Any) -> dict[str, Any]:
        """Source disk key -> the placeholder's VirtualDisk."""
        from pyVmomi import vim

        by_key = {d.key: d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)}
        return {k: by_key[dk] for k, dk in disk_keys(vm.config).items() if dk in by_key}

    # ---------------------------------------------------------------- checks

    def validate(self) -> None:
        credentials(self.spec, "target")
        dc = self._datacenter()
        self._folder(dc)
        self._pool_and_host(dc)
        ds = self._datastore(dc)
        if ds.summary is not None and ds.summary.accessible is False:
            raise TargetError(f"target.datastore {self.spec.datastore}: not accessible")
        self._placeholder()

    # ---------------------------------------------------------------- the placeholder

    def _disk_spec(self, key: str, size: int, unit: int, new_key: int) -> Any:
        from pyVmomi import vim

        disk = vim.vm.device.VirtualDisk(
            key=new_key,
            controllerKey=SCSI_KEY,
            unitNumber=unit,
            capacityInBytes=_kib(size),
            capacityInKB=_kib(size) // 1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                diskMode="persistent", thinProvisioned=True, fileName=f"[{self.spec.datastore}]"
            ),
        )
        return vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk)

    def _create(self, disks: list[DiskInfo]) -> Any:
        from pyVmomi import vim

        if len(disks) > 15:
            raise InvalidSpec(f"target: the placeholder takes at most 15 disks (the source has {len(disks)})")
        dc = self._datacenter()
        folder, (pool, host), ds = self._folder(dc), self._pool_and_host(dc), self._datastore(dc)
        ctrl = vim.vm.device.VirtualDeviceSpec(
            operation="add",
            device=vim.vm.device.ParaVirtualSCSIController(key=SCSI_KEY, busNumber=0, sharedBus="noSharing"),
        )
        changes = [ctrl]
        for i, d in enumerate(disks):
            changes.append(self._disk_spec(d.key, d.size, _unit(i), -(101 + i)))
        config = vim.vm.ConfigSpec(
            name=self.name,
            guestId="otherGuest64",
            numCPUs=1,
            memoryMB=256,
            annotation=f"Sendense replica of job {self.job}: its snapshots are the recovery points. "
            "Do not power it on.",
            files=vim.vm.FileInfo(vmPathName=f"[{ds.name}]"),
            deviceChange=changes,
            extraConfig=[vim.option.OptionValue(key=KEY_JOB, value=self._owner())],
            changeTrackingEnabled=True,  # each point's changeIds: what a failed-over VM changed (failback)
        )
        what = f"target: creating {self.label}"
        with calling(what):
            task = folder.CreateVM_Task(config=config, pool=pool, host=host)
        vm = self.session.wait(task, what)
        # which device holds which source disk, by unit number (device keys are given by vSphere)
        by_unit = {
            d.unitNumber: d.key for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
        }
        mapping = [
            vim.option.OptionValue(key=KEY_DISK + d.key, value=str(by_unit[_unit(i)]))
            for i, d in enumerate(disks)
        ]
        self._reconfigure(vm, vim.vm.ConfigSpec(extraConfig=mapping), "recording its disks")
        return vm

    def _reconfigure(self, vm: Any, spec: Any, what: str) -> None:
        what = f"target: {self.label}: {what}"
        with calling(what):
            task = vm.ReconfigVM_Task(spec=spec)
        self.session.wait(task, what)

    def _destroy(self, vm: Any) -> None:
        if vm.runtime.powerState != "poweredOff":
            with calling(f"target: powering off {self.label}"):
                task = vm.PowerOffVM_Task()
            self.session.wait(task, f"target: powering off {self.label}")
        what = f"target: removing {self.label}"
        with calling(what):
            task = vm.Destroy_Task()
        self.session.wait(task, what)

    def prepare(self, sync_id: str, disks: list[DiskInfo]) -> None:
        from pyVmomi import vim

        vm = self._placeholder()
        points = self._points(vm) if vm is not None else []
        if vm is not None and not points:
            self._destroy(vm)  # an abandoned first sync: start empty
            vm = None
        if vm is None:
            self._mark(self._create(disks), sync_id)
            return
        self._revert(vm, points[0][1])  # whatever an unfinished sync wrote goes
        if not vm.config.changeTrackingEnabled:  # (a placeholder made before points had changeIds)
            self._reconfigure(vm, vim.vm.ConfigSpec(changeTrackingEnabled=True), "enabling change tracking")
        have = self._disks(vm)
        in_point = {d.key for d in points[0][0].disks}
        changes: list[Any] = []
        mapping: list[tuple[str, int]] = []  # (source disk key, the new disk's unit)
        used = {d.unitNumber for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)}
        for i, d in enumerate(disks):
            cur = have.get(d.key)
            if cur is not None and d.key not in in_point:
                # a disk the newest point does not have (removed from the source, now back under the
                # same key): its device holds older points' bytes; a fresh one takes the key (the old
                # file stays for those points)
                changes.append(vim.vm.device.VirtualDeviceSpec(operation="remove", device=cur))
                used.discard(cur.unitNumber)
                cur = None
            if cur is None:
                unit = next(u for u in range(16) if u != 7 and u not in used)
                used.add(unit)
                changes.append(self._disk_spec(d.key, d.size, unit, -(201 + i)))
                mapping.append((d.key, unit))
            elif capacity(cur) < d.size:
                raise TargetError(
                    f"target: disk {d.key} grew to {d.size} bytes; vSphere cannot extend a disk of a VM "
                    f"with snapshots ({self.label} keeps its points as snapshots): resize it by hand after "
                    "removing the points, or start a new job"
                )
        if changes:
            self._reconfigure(vm, vim.vm.ConfigSpec(deviceChange=changes), "adding disks")  # (fresh ones)
            vm = self._placeholder()
            assert vm is not None
            by_unit = {
                d.unitNumber: d.key
                for d in vm.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualDisk)
            }
            opts = [vim.option.OptionValue(key=KEY_DISK + k, value=str(by_unit[u])) for k, u in mapping]
            self._reconfigure(vm, vim.vm.ConfigSpec(extraConfig=opts), "recording its disks")
        self._mark(vm, sync_id)

    def _mark(self, vm: Any, sync_id: str) -> None:
        """Record whose writes the current disks take ('': nobody's; vSphere drops an empty value)."""
        from pyVmomi import vim

        opt = vim.option.OptionValue(key=KEY_SYNC, value=sync_id)
        self._reconfigure(vm, vim.vm.ConfigSpec(extraConfig=[opt]), f"sync {sync_id or 'done'}")

    def _revert(self, vm: Any, snap: Any) -> None:
        what = f"target: {self.label}: reverting to the newest point"
        with calling(what):
            task = snap.RevertToSnapshot_Task()
        self.session.wait(task, what)

    @contextmanager
    def open_disk(self, sync_id: str, key: str) -> Iterator[PlaceholderDisk]:
        vm = self._placeholder()
        if vm is None:
            raise ResourceNotFound(f"target: {self.label} is gone (prepare the sync again)")
        if extra_config(vm).get(KEY_SYNC) != sync_id:
            raise ResourceNotFound(f"target: {self.label}: no sync {sync_id} in progress (prepare it first)")
        d = self._disks(vm).get(key)
        if d is None:
            raise ResourceNotFound(f"target: {self.label} has no disk for {key}")
        points = self._points(vm)
        before = next((x.size for x in points[0][0].disks if x.key == key), None) if points else None
        has_base = before is not None  # (a disk new in this sync: no)
        with self._vddk(vm, d.backing.fileName, None, readonly=False, key=key) as srv:
            # (a write refused for space is the datastore's: "target datastore X (...) is full")
            where = f"datastore {self.spec.datastore} ({self.label} disk {key})"
            disk = PlaceholderDisk(srv.uri, capacity(d), has_base, where)
            try:
                if before is not None and before < disk.size:
                    # the source disk shrank at the newest point: beyond that size the placeholder still
                    # holds older bytes, and a disk grown back must read zeros there (idempotent)
                    w = disk.connect()
                    w.zero(before, disk.size - before)
                    w.flush()
                yield disk
            finally:
                disk.close()

    @contextmanager
    def _vddk(self, vm: Any, file: str, snapshot: str | None, *, readonly: bool, key: str) -> Iterator[Any]:
        t = self.session.vddk(vm._moId, file, snapshot)
        with serving(t, f"{self.label} disk {key}", readonly=readonly) as srv:
            yield srv

    # ---------------------------------------------------------------- points

    def _points(self, vm: Any) -> list[tuple[PointInfo, Any, Any]]:
        """(point, snapshot, tree node) of every point, newest first."""
        out = []
        for n in snapshot_nodes(vm):
            if not n.name.startswith(POINT_PREFIX):
                continue
            try:
                p = PointInfo.model_validate_json(n.description or "")
            except ValueError:
                log.warning("%s: snapshot %s has no point record: ignored", self.label, n.name)
                continue
            out.append((p, n.snapshot, n))
        out.sort(key=lambda x: (x[0].committed_at, x[2].id), reverse=True)
        holds = self._holds(vm)
        return [(p.model_copy(update={"holds": holds.get(p.point_id, [])}), s, n) for p, s, n in out]

    def _holds(self, vm: Any) -> dict[str, list[str]]:
        fields, prefix = self._hold_fields(), self._hold_prefix()
        out: dict[str, list[str]] = {}
        for v in vm.customValue or []:
            name = fields.get(v.key)
            if name is not None and str(getattr(v, "value", None) or ""):
                point, _, hold = name[len(prefix) :].partition("/")
                out.setdefault(point, []).append(hold)
        return {p: sorted(set(h)) for p, h in out.items()}

    def commit(self, sync_id: str, point: PointInfo) -> PointInfo:
        vm = self._placeholder()
        if vm is None:
            raise ResourceNotFound(f"target: {self.label} is gone: the sync cannot commit")
        for p, _, _ in self._points(vm):
            if p.point_id == point.point_id:
                return p  # a retried commit
        name = POINT_PREFIX + point.point_id
        where = f"{self.name}@{name}"  # the VM and its snapshot (files move when older points go)
        record = point.model_copy(
            update={"holds": [], "disks": [d.model_copy(update={"path": where}) for d in point.disks]}
        )
        if extra_config(vm).get(KEY_SYNC):
            self._mark(vm, "")  # first: the point's configuration names no sync in progress
        what = f"target: {self.label}: snapshot {name}"
        with calling(what):
            task = vm.CreateSnapshot_Task(
                name=name, description=record.model_dump_json(), memory=False, quiesce=False
            )
        self.session.wait(task, what)
        return record

    def abort(self, sync_id: str) -> None:
        vm = self._placeholder()
        if vm is None or extra_config(vm).get(KEY_SYNC, sync_id) != sync_id:
            return  # nothing of this sync (another one is in progress)
        points = self._points(vm)
        if points:
            self._revert(vm, points[0][1])
            if extra_config(vm).get(KEY_SYNC):
                self._mark(vm, "")
        else:
            self._destroy(vm)

    def list_points(self) -> list[PointInfo]:
        vm = self._placeholder()
        return [] if vm is None else [p for p, _, _ in self._points(vm)]

    def get_point(self, point_id: str | None) -> PointInfo:
        return pick_point(self.job, self.list_points(), point_id)

    def prune(self, keep: int) -> list[str]:
        vm = self._placeholder()
        if vm is None:
            return []
        self._drop_expired_export_holds(vm)
        removed = []
        points = self._points(vm)
        for i in range(len(points) - 1, max(keep, 1) - 1, -1):  # oldest first
            p, snap, _ = points[i]
            newer = points[i - 1][0]
            if p.holds or newer.holds:
                # removing a point consolidates the next point's delta with its own: the files a held
                # point's VM runs on would be rewritten
                continue
            what = f"target: {self.label}: removing point {p.point_id}"
            with calling(what):
                task = snap.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
            self.session.wait(task, what)
            removed.append(p.point_id)
        return removed

    # Holds are custom attributes, one field per hold (`sendense.hold.<job id>.<point>/<hold>`): they
    # are not part of the VM's configuration, so reverting the placeholder to a point (abort, prepare)
    # keeps them, and no two holds write the same field.

    def _hold_prefix(self) -> str:
        return f"sendense.hold.{self._owner()}."

    def _hold_fields(self) -> dict[int, str]:
        """Key -> name of this job's hold fields."""
        prefix = self._hold_prefix()
        cfm = self.session.content.customFieldsManager
        return {f.key: f.name for f in cfm.field or [] if f.name.startswith(prefix)}

    def _drop_expired_export_holds(self, vm: Any) -> None:
        """An export's hold whose exporter died (its `until` passed) goes: it must not keep a point
        forever."""
        fields, prefix, now = self._hold_fields(), self._hold_prefix(), datetime.now(UTC)
        for v in vm.customValue or []:
            name, value = fields.get(v.key), str(getattr(v, "value", None) or "")
            if name is None or not value.startswith(EXPORT_REASON):
                continue
            try:
                expired = datetime.fromisoformat(value.removeprefix(EXPORT_REASON)) < now
            except ValueError:
                expired = True
            if expired:
                point, _, hold = name[len(prefix) :].partition("/")
                log.warning("%s: export hold %s on point %s expired: released", self.label, hold, point)
                self.release(point, hold)

    def hold(self, point_id: str, hold_id: str, reason: str) -> None:
        from pyVmomi import vim

        _hold_id(hold_id)
        vm = self._vm_with_point(point_id)
        name = f"{self._hold_prefix()}{point_id}/{hold_id}"
        cfm = self.session.content.customFieldsManager
        key = next((k for k, n in self._hold_fields().items() if n == name), None)
        if key is None:
            try:
                key = cfm.AddCustomFieldDef(name=name, moType=vim.VirtualMachine).key
            except vim.fault.DuplicateName:  # another activity made it at the same time
                key = next(k for k, n in self._hold_fields().items() if n == name)
        with calling(f"target: {self.label}: holding point {point_id}"):
            cfm.SetField(entity=vm, key=key, value=" ".join(reason.split())[:512] or "held")

    def release(self, point_id: str, hold_id: str) -> None:
        from pyVmomi import vim

        _hold_id(hold_id)
        name = f"{self._hold_prefix()}{point_id}/{hold_id}"
        cfm = self.session.content.customFieldsManager
        for key in [k for k, n in self._hold_fields().items() if n == name]:
            try:
                cfm.RemoveCustomFieldDef(key=key)
            except vim.fault.NotFound:
                pass  # released at the same time

    def _vm_with_point(self, point_id: str) -> Any:
        vm = self._placeholder()
        if vm is None or all(p.point_id != point_id for p, _, _ in self._points(vm)):
            raise ResourceNotFound(f"job {self.job}: no recovery point {point_id}")
        return vm

    def export(self, point_id: str, fmt: str, out_dir: Path) -> list[tuple[str, Path]]:
        """Standalone images of a point, read from its snapshot through VDDK. The point is held while it
        is read (a prune elsewhere leaves it), and a point removed meanwhile all the same (the hold
        came too late) fails the export in one line: nothing of it reaches `out_dir`."""
        if fmt not in EXPORT_FORMATS:
            raise InvalidSpec(f"export format {fmt!r}: one of {', '.join(EXPORT_FORMATS)}")
        vm = self._vm_with_point(point_id)
        hold = f"export-{uuid.uuid4().hex[:12]}"
        until = (datetime.now(UTC) + EXPORT_HOLD).isoformat(timespec="seconds")
        self.hold(point_id, hold, f"{EXPORT_REASON}{until}")
        try:
            return self._export(vm, point_id, fmt, out_dir)
        except vmodl_fault() as e:
            raise TargetError(f"export of point {point_id}: {fault_text(e)}") from None
        finally:
            self.release(point_id, hold)

    def _export(self, vm: Any, point_id: str, fmt: str, out_dir: Path) -> list[tuple[str, Path]]:
        point, snap, _ = self._point(vm, point_id)
        qfmt = EXPORT_FORMATS[fmt][0]
        staged = []
        with staging(out_dir) as stage:  # (never written through a file planted in out_dir)
            for d in point.disks:
                dst = export_name(out_dir, self.job, point_id, d.key, fmt)
                tmp = stage / dst.name
                with self._snapshot_disk(vm, snap, d.key) as srv:
                    # exactly the point's size (a placeholder disk is a whole number of KiB)
                    src = {
                        "driver": "raw",
                        "size": d.size,
                        "file": {"driver": "nbd", "path": str(srv.socket)},
                    }
                    try:
                        qemu_img("convert", "-O", qfmt, "json:" + json.dumps(src), str(tmp))
                    except SendenseError as e:
                        reason = e.message.removeprefix("qemu-img convert: ").replace(str(tmp), str(dst))
                        raise TargetError(
                            f"export of point {point_id} disk {d.key} to {dst}: {reason}"
                        ) from None
                tmp.chmod(0o600)  # the VM's data: the owner's only
                staged.append((d.key, tmp, dst))
            again = next((x for x in self._points(vm) if x[0].point_id == point_id), None)
            if again is None or again[1]._moId != snap._moId:
                raise TargetError(
                    f"export of point {point_id}: the point was removed while it was read (a prune); "
                    "nothing was written"
                )
            for _, tmp, dst in staged:
                os.replace(tmp, dst)
        return [(k, dst) for k, _, dst in staged]

    def _point(self, vm: Any, point_id: str) -> tuple[PointInfo, Any, Any]:
        found = next((x for x in self._points(vm) if x[0].point_id == point_id), None)
        if found is None:
            raise ResourceNotFound(f"job {self.job}: no recovery point {point_id}")
        return found

    @contextmanager
    def _snapshot_disk(self, vm: Any, snap: Any, key: str) -> Iterator[Any]:
        """VDDK serving a point's disk read-only. A prune of older points renames the files of a chain
        while it consolidates: a file gone between asking the snapshot and opening it is asked again."""
        for attempt in range(6):
            file = self._snapshot_files(vm, snap).get(key)
            if file is None:
                raise ResourceNotFound(f"target: {self.label}: the point's snapshot has no disk {key}")
            with ExitStack() as stack:
                try:
                    srv = stack.enter_context(self._vddk(vm, file, snap._moId, readonly=True, key=key))
                except SendenseError as e:
                    if attempt < 5 and "find the file" in e.message:
                        time.sleep(0.1 * (attempt + 1))
                        continue
                    raise
                yield srv
                return

    def _snapshot_files(self, vm: Any, snap: Any) -> dict[str, str]:
        """Source disk key -> the snapshot's file of it (consolidating older points moves data between
        files, so the file is asked when it is read, never remembered)."""
        from pyVmomi import vim

        keys = {d.key: k for k, d in self._disks(vm).items()}
        return {
            keys[d.key]: str(getattr(d.backing, "fileName", ""))
            for d in snap.config.hardware.device
            if isinstance(d, vim.vm.device.VirtualDisk) and d.key in keys
        }

    def destroy(self) -> None:
        vm = self._placeholder()
        if vm is None:
            return
        held = [f"{p.point_id} ({', '.join(p.holds)})" for p, _, _ in self._points(vm) if p.holds]
        if held:
            raise TargetError(
                f"purge of job {self.job}: refused while points are held by a drill or failover: "
                f"{'; '.join(held)}; end those first"
            )
        self._destroy(vm)


def disk_keys(config: Any) -> dict[str, int]:
    """Source disk key -> device key, as a placeholder's configuration (or a point snapshot's, or a
    clone's copy of it) records them in extraConfig (`sendense.disk.<key>`)."""
    return {
        k[len(KEY_DISK) :]: int(v)
        for k, v in config_options(config).items()
        if k.startswith(KEY_DISK) and v.isdigit()
    }


def _unit(i: int) -> int:
    """The i-th disk's SCSI unit: 0-6, then 8-15 (7 is the controller's own)."""
    return i if i < 7 else i + 1


def _kib(size: int) -> int:
    """vSphere sizes disks in KiB: a source of another size gets the next KiB (its point says its size)."""
    return -(-size // 1024) * 1024


def vmodl_fault() -> type[BaseException]:
    from pyVmomi import vmodl

    return vmodl.MethodFault  # type: ignore[no-any-return]
