"""Failback from a CloudStack target (sendense.protocols.VmChanges): what a failed-over VM (made from a
point over imported flat copies, connectors.cloudstack.vms) changed, read back for the reverse sync.

Each flat copy carries a persistent dirty bitmap from the moment it was made (`vms.point_bitmap`), so
QEMU records in the volume's own file every write of the VM since its point, on whichever host it
runs and across stops, starts and migrations. The bitmap is named in failback's change tracking of
the job (`sendense.Failback-<job>.`, `vms.tracker`): the readers below treat it as
that tracker's checkpoint `point-<point>`, and the change ids are the CloudStack source's
(`<checkpoint>@<identity>`, identity by the VM's id, the disk's libvirt target and its file). So:

- Running: the agent of the VM's host (the API says which; another agent refuses in one line,
  NotWhileRunning, so a failback cuts over at once and reads the stopped VM)
  takes a libvirt pull backup of the VM's transient domain (`instancename`) with checkpoints, as the
  CloudStack source does (FollowsMigrations). Its first base is the point bitmap, which that libvirt
  does not know as a checkpoint: LibvirtSource._adopt_carried redefines it from the images, since it
  has the tracker's prefix; later bases are the previous reverse snapshots' checkpoints.
- Stopped (a failback's final reverse sync: the VM is powered off first): the volumes are read at rest
  on primary storage, as connectors.cloudstack.stopped reads a stopped source VM, in the same change
  ids: the snapshot's bitmaps are recording when the VM starts again.

The point's bitmap is never released: a committed reverse snapshot drops the older reverse
checkpoints, never the point's, so what the VM changed since its point stays known (`forget` keeps it
too: it is the failover's, and goes with the VM's volumes). A base that cannot be used (its bitmap
missing or not stored cleanly) falls back to the point; when the point's bitmap itself is lost (a
host crash killed QEMU), the disk is read whole and the sink compares it (`tracking_lost` says why).
`changed_since_point` of a running VM's snapshot from a later base: libvirt exports one bitmap a disk
and backup (the base's), so just before the snapshot a backup from the point that makes no checkpoint
says what changed since the point (block status only, kept on the agent until release); united with
what the snapshot says changed since its base, that is exactly what changed since the point at the
snapshot (the base is older than that moment). At rest the point's bitmap is exported with the others.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import libvirt

from connectors.cloudstack import api as csapi
from connectors.cloudstack.source import domain_uri
from connectors.cloudstack.spec import CloudStackTarget
from connectors.cloudstack.stopped import StoppedVolumes
from connectors.cloudstack.vms import CloudStackVms, point_bitmap, tracker
from connectors.kvm import handles
from connectors.kvm.identity import bitmap_prefix, libvirt_identity, split_change_id
from connectors.kvm.libvirt_source import PER_DISK_INCREMENTAL
from connectors.kvm.migrated_checkpoints import FollowsMigrations
from connectors.kvm.offline import NbdSourceDisk
from sendense import config
from sendense.datapath.extents import Extent, coalesce
from sendense.datapath.nbd import ALLOCATION, NbdConnection, dirty_context, unix_uri
from sendense.errors import (
    ChangeTrackingLost,
    NotWhileRunning,
    ResourceNotFound,
    ResourceUnavailable,
    SendenseError,
    SnapshotInconsistent,
)
from sendense.models import DiskSnapshot, SnapshotRef
from sendense.private import private_dir, work_dir, write_atomic
from sendense.protocols import POINT_BASE, point_base

log = logging.getLogger(__name__)

RUNNING, STOPPED = "libvirt", "stopped"


class _Domain(FollowsMigrations):
    """The VM's libvirt domain under failback's tracker; its errors name the VM, and the point's
    checkpoint is kept by every release and forget."""

    platform = "cloudstack"

    def __init__(self, *args: Any, label: str, point: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.label, self.point = label, point

    def _where(self) -> str:
        return self.label

    def _our_ancestors(self, dom: libvirt.virDomain, name: str) -> list[str]:
        return [n for n in super()._our_ancestors(dom, name) if n != self.point]

    def _ours_newest_first(self, dom: libvirt.virDomain) -> list[str]:
        return [n for n in super()._ours_newest_first(dom) if n != self.point]

    def _clear_stale(self, dom: libvirt.virDomain, base: dict[str, str | None], new: str) -> None:
        super()._clear_stale(dom, {**base, "": self.point}, new)

    def changed_since(self, checkpoint: str) -> dict[str, list[Extent]]:
        """What each disk changed since `checkpoint`, now: a pull backup from it that makes no
        checkpoint, of which only the exported bitmap's block status is read, ended at once. {}: the
        checkpoint is not there (its bitmap lost)."""
        probe = f"{checkpoint}.probe"
        with self._dom() as dom:
            self._running(dom)
            disks, others = self._disks(dom)
            self._adopt_carried(dom, disks)
            if checkpoint not in self._checkpoint_names(dom):
                return {}
            self._end_job(dom, None)  # (a leftover of ours: a retried snapshot)
            private_dir(self.work_dir, "work directory")
            sock = self._socket_path()
            scratch = {d.target: self._scratch_path(probe, d.target) for d in disks}
            for p in [sock, *scratch.values()]:
                p.unlink(missing_ok=True)
            per_disk = self._lib_version(dom) >= PER_DISK_INCREMENTAL
            xml = self._backup_xml(
                disks, others, {d.target: checkpoint for d in disks}, sock, scratch, per_disk
            )
            try:
                dom.backupBegin(xml, None, 0)
            except libvirt.libvirtError as e:
                raise self._error(e, "backupBegin") from None
            try:
                job = self._backup(dom)
                out: dict[str, list[Extent]] = {}
                for d in disks:
                    bd = job.disks.get(d.target) if job is not None else None
                    if job is None or bd is None or not bd.bitmap:
                        raise SendenseError(
                            f"{self._where()}: no changes since {checkpoint} exported for {d.target}"
                        )
                    uri = unix_uri(job.socket or str(sock), bd.export)
                    ctx = (ALLOCATION, dirty_context(bd.bitmap))
                    with NbdConnection(uri, contexts=ctx, label=f"disk {d.target} of {self._where()}") as c:
                        out[d.target] = list(coalesce(c.changed_extents(bd.bitmap)))
            finally:
                self._end_job(dom, None)
                for p in scratch.values():
                    p.unlink(missing_ok=True)
        return out


class _Stopped(StoppedVolumes):
    """The stopped VM's volumes under failback's tracker."""


class VmDisk:
    """A reverse snapshot's disk (sendense.protocols.SourceDisk): `extents(point_base(...))` is what
    the point bitmap says, other change ids are the reader's own."""

    def __init__(self, inner: NbdSourceDisk, aliases: dict[str, str]) -> None:
        self.inner, self.aliases = inner, aliases
        self.size = inner.size
        self.tracks_resize = inner.tracks_resize

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        return self.inner.extents(self.aliases.get(since, since) if since else None, start)

    def connect(self) -> NbdConnection:
        return self.inner.connect()


def united(earlier: list[Extent], now: list[Extent]) -> list[Extent]:
    """`now` (what changed since a later base, at the snapshot) and what of `earlier` (what changed
    since the point, a moment before) it does not cover: what changed since the point at the snapshot.
    Outside `now` nothing was written since, so `earlier`'s data/zero kind still holds there."""
    out: list[Extent] = list(now)
    for e in earlier:
        start = e.offset
        for n in now:
            if n.end <= start or n.offset >= e.end:
                continue
            if n.offset > start:
                out.append(Extent(start, n.offset - start, e.zero))
            start = max(start, n.end)
        if start < e.end:
            out.append(Extent(start, e.end - start, e.zero))
    return list(coalesce(sorted(out, key=lambda x: x.offset)))


class _Vm(NamedTuple):
    """A failed-over VM as it is now, and how its changes are read."""

    form: str  # RUNNING / STOPPED
    reader: _Domain | _Stopped
    disks: list[tuple[str, str, Path]]  # (point key, libvirt target, flat copy)
    point_id: str
    vm_id: str


class CloudStackVmChanges:
    platform = "cloudstack"

    def __init__(
        self, job: str, spec: CloudStackTarget, job_id: str = "", *, vms: CloudStackVms | None = None
    ):
        self.vms = vms or CloudStackVms(job, spec, job_id)
        self.job, self.spec = job, spec
        self.tracker = tracker(job)

    # ------------------------------------------------------------------ the VM

    def _label(self, name: str, vm: dict[str, Any]) -> str:
        return f"VM {name} (CloudStack VM {vm.get('name')} of job {self.job})"

    def _disks(self, name: str, rec: dict[str, Any], vm: dict[str, Any]) -> list[tuple[str, str, Path]]:
        """The VM's disks as (point key, libvirt target, flat copy on this agent's view of the pool)."""
        by_id = {str(v["id"]): v for v in csapi.vm_volumes(self.vms.api, vm)}
        pool_dir = self.vms.target.directory()
        out = []
        for key in rec["keys"]:
            v = by_id.get(str(rec["volumes"].get(key)))
            if v is None:
                raise ResourceNotFound(f"{self._label(name, vm)}: disk {key}'s volume is not attached to it")
            out.append((key, csapi.disk_key(int(v.get("deviceid") or 0)), pool_dir / rec["files"][key]))
        return out

    def _domain(self, name: str, vm: dict[str, Any], point: str) -> _Domain:
        """The running VM's domain: on this agent's host only."""
        host, me = vm.get("hostname"), config.host_id()
        label = f"{self._label(name, vm)}, domain {vm.get('instancename')} on host {host}"
        if host != me:  # (a failback then cuts over at once: the stopped VM is read at rest, anywhere)
            raise NotWhileRunning(
                f"VM {name} of job {self.job} runs on CloudStack host {host}, not on this agent's host {me}: "
                "its changes are read by the agent of its host, or once it is stopped"
            )
        uri = domain_uri(str(vm["id"]), label)
        return _Domain(self.tracker, uri, str(vm["instancename"]), work_dir(self.job), uuid=str(vm["id"]),
                       label=label, point=point)  # fmt: skip

    def _stopped(self, name: str, vm: dict[str, Any], images: dict[str, Path], point: str) -> _Stopped:
        s = _Stopped(self.tracker, f"{self._label(name, vm)} (Stopped)", str(vm["id"]), images)
        s.keep = frozenset({point})
        return s

    def _reader(self, name: str, form: str | None = None) -> _Vm:
        """(form, reader, disks, point id) of VM `name` as it is now (or in `form`, refused if not)."""
        rec, vm = self.vms._load(name)
        point_id = str(rec["plan"]["point_id"])
        point = point_bitmap(self.job, point_id)
        disks = self._disks(name, rec, vm)
        state = vm.get("state")
        now = RUNNING if state == "Running" else STOPPED if state == "Stopped" else None
        if now is None:
            raise ResourceUnavailable(
                f"VM {name} of job {self.job} is {state}: retried until Running or Stopped"
            )
        if form is not None and form != now:  # (its backup job ended with its QEMU, or it was started)
            raise SnapshotInconsistent(
                f"VM {name} of job {self.job} is {state} now, not as at its reverse snapshot: take another"
            )
        if now == RUNNING:
            reader: _Domain | _Stopped = self._domain(name, vm, point)
        else:
            reader = self._stopped(name, vm, {t: p for _, t, p in disks}, point)
        return _Vm(now, reader, disks, point_id, str(vm["id"]))

    @staticmethod
    def _inner(ref: SnapshotRef, point_base_of: dict[str, str] | None = None) -> SnapshotRef:
        """The reader's own snapshot, under its own keys (libvirt targets); `point_base_of` puts the point's
        change id as some disks' base (a stopped VM's changes since the point)."""
        disks = []
        for d in ref.disks:
            dh = handles.VmChangesDisk.parse(d.handle)
            base = (point_base_of or {}).get(dh.node) or dh.base or None
            lost = None if point_base_of and dh.node in point_base_of else dh.lost or None
            disks.append(DiskSnapshot(key=dh.node, size=d.size, change_id=d.change_id, base_change_id=base,
                                      tracking_lost=lost, handle=dh.inner))  # fmt: skip
        h = handles.VmChangesSnapshot.parse(ref.handle)
        return SnapshotRef(
            snapshot_id=ref.snapshot_id, created_at=ref.created_at, disks=disks, handle=h.inner
        )

    # ------------------------------------------------------------------ protocol

    def snapshot_vm(self, name: str, snapshot_id: str, base: dict[str, str] | None = None) -> SnapshotRef:
        form, reader, disks, point_id, vm_id = self._reader(name)
        point = point_bitmap(self.job, point_id)
        from_point = {t: f"{point}@{libvirt_identity(vm_id, t, str(p))}" for _, t, p in disks}
        inner_base: dict[str, str | None] = {}
        for key, target, _ in disks:
            since = (base or {}).get(key)
            inner_base[target] = since if since and not since.startswith(POINT_BASE) else from_point[target]
        since_point: dict[str, list[Extent]] = {}
        if isinstance(reader, _Domain) and any(inner_base[t] != from_point[t] for t in inner_base):
            # libvirt exports one bitmap a disk: what changed since the point, just before (exact with
            # what the snapshot says changed since its base: see `united`)
            try:
                since_point = reader.changed_since(point)
            except SendenseError as e:  # (only changed_since_point needs it: the snapshot goes on)
                log.warning("VM %s: what changed since point %s is not known at %s: %s", name, point_id,
                            snapshot_id, e.message)  # fmt: skip
        inner = reader.create_snapshot(snapshot_id, inner_base)
        fall_back = [d.key for d in inner.disks if d.tracking_lost and inner_base[d.key] != from_point[d.key]]
        if fall_back:  # a later base is lost: from the point, which always says what changed
            for k in fall_back:
                log.warning("VM %s disk %s: %s; reading what changed since point %s", name, k,
                            inner.disk(k).tracking_lost, point_id)  # fmt: skip
                inner_base[k] = from_point[k]
            reader.release_snapshot(inner, committed=False)
            inner = reader.create_snapshot(snapshot_id, inner_base)
        out = []
        for key, target, image in disks:
            d = inner.disk(target)
            usable = bool(d.base_change_id) and not d.tracking_lost
            if d.tracking_lost:
                log.warning("VM %s disk %s is read whole: %s", name, key, d.tracking_lost)
            was_point = d.base_change_id == from_point[target]
            outer_base = (point_base(point_id) if was_point else d.base_change_id) if usable else None
            dh = handles.VmChangesDisk(node=target, image=str(image), base=d.base_change_id or "",
                                       lost=d.tracking_lost or "", inner=d.handle)  # fmt: skip
            out.append(
                DiskSnapshot(
                    key=key,
                    size=d.size,
                    change_id=d.change_id,
                    base_change_id=outer_base,
                    tracking_lost=None if usable else d.tracking_lost,
                    handle=dh.dump(),
                )
            )
        keep = self._since_point_file(snapshot_id)
        keep.unlink(missing_ok=True)
        if since_point:
            spans = {t: [[e.offset, e.length, e.zero] for e in ex] for t, ex in since_point.items()}
            write_atomic(keep, json.dumps(spans))
        sh = handles.VmChangesSnapshot(vm=name, form=form, point_id=point_id, inner=inner.handle)
        log.info("job %s: reverse snapshot %s of VM %s (%s)", self.job, snapshot_id, name, form)
        return SnapshotRef(snapshot_id=snapshot_id, created_at=inner.created_at, disks=out, handle=sh.dump())

    @contextmanager
    def _open(self, ref: SnapshotRef, key: str, since_point: bool = False) -> Iterator[VmDisk]:
        h = handles.VmChangesSnapshot.parse(ref.handle)
        dh = handles.VmChangesDisk.parse(ref.disk(key).handle)
        point = point_bitmap(self.job, h.point_id)
        point_cid = f"{point}@{split_change_id(dh.base or ref.disk(key).change_id)[1]}"
        form, reader = self._reader(h.vm, h.form)[:2]
        inner_ref = self._inner(ref)
        if since_point and form == STOPPED and split_change_id(dh.base)[0] != point:
            inner_ref = self._inner(ref, {dh.node: point_cid})  # the point's bitmap exported too
        with reader.open_disk(inner_ref, dh.node) as inner:
            yield VmDisk(inner, {point_base(h.point_id): point_cid})

    def open_disk(self, ref: SnapshotRef, key: str) -> AbstractContextManager[VmDisk]:
        return self._open(ref, key)

    def _since_point_file(self, snapshot_id: str) -> Path:
        """Where a running VM's snapshot from a later base keeps what changed since the point before it."""
        return work_dir(self.job) / f"{bitmap_prefix(self.tracker)}{snapshot_id}.since-point.json"

    def changed_since_point(self, ref: SnapshotRef, key: str) -> Iterator[Extent]:
        h = handles.VmChangesSnapshot.parse(ref.handle)
        d = ref.disk(key)
        dh = handles.VmChangesDisk.parse(d.handle)
        if dh.lost:
            raise ChangeTrackingLost(f"VM {h.vm} of job {self.job}: disk {key}: {dh.lost}")
        point = point_base(h.point_id)
        if h.form == RUNNING and d.base_change_id != point:
            path = self._since_point_file(ref.snapshot_id)
            try:
                earlier = [Extent(o, n, z) for o, n, z in json.loads(path.read_text())[dh.node]]
            except (OSError, KeyError, ValueError):
                raise ChangeTrackingLost(
                    f"VM {h.vm} of job {self.job}: reverse snapshot {ref.snapshot_id} does not know what "
                    f"disk {key} changed since point {h.point_id} (taken by another agent, or released)"
                ) from None
            with self._open(ref, key) as disk:
                yield from united(earlier, list(coalesce(disk.extents(d.base_change_id))))
            return
        with self._open(ref, key, since_point=True) as disk:
            yield from coalesce(disk.extents(point))

    def release(self, ref: SnapshotRef, committed: bool) -> None:
        h = handles.VmChangesSnapshot.parse(ref.handle)
        try:
            reader = self._reader(h.vm, h.form).reader
        except (ResourceNotFound, ResourceUnavailable, NotWhileRunning, SnapshotInconsistent) as e:
            log.info("release of reverse snapshot %s: nothing to release here: %s", ref.snapshot_id, e)
            return
        finally:
            self._since_point_file(ref.snapshot_id).unlink(missing_ok=True)
        reader.release_snapshot(self._inner(ref), committed)

    def forget(self, name: str) -> None:
        for f in work_dir(self.job).glob(f"{bitmap_prefix(self.tracker)}*.since-point.json"):
            f.unlink(missing_ok=True)
        try:
            reader = self._reader(name).reader
        except ResourceNotFound as e:
            log.info("forget failback of VM %s: %s", name, e)
            return
        reader.forget()
