"""VMware vSphere as a replication source: one VM snapshot per sync, Changed Block Tracking for what
changed, disk bytes read from the snapshot through nbdkit's vddk plugin.

- Change tracking: enabled when it is off (`ReconfigVM_Task` changeTrackingEnabled; it takes effect at
  the next stun, which the sync's snapshot is). A VM whose hardware cannot track changes (hardware
  version < 7, `capability.changeTrackingSupported` false) is refused in one line.
- A sync takes one VM snapshot `sendense-<job>-<sync>` (no memory; quiesced when the spec asks and
  VMware Tools run). A retried step finds the sync's snapshot by its name instead of taking another.
  Snapshots of this job left by a crashed sync are removed first; other snapshots are never touched.
- A disk's change id is `<vSphere changeId>@<size>` from the snapshot's device backing: the next sync
  asks `QueryChangedDiskAreas` from it, paged as vSphere pages (from the end of each reply until the
  disk's capacity; an empty page is legal). The first sync asks with `*` (allocated areas). Areas are
  split into data and zero by the export's `base:allocation`.
- Lost tracking: a changeId of another tracking epoch (CBT reset, disabled and enabled, a disk replaced)
  or one vSphere refuses (FileFault) -> `tracking_lost` with the reason: the disk is resynced by digest
  compare, never silently skipped. A disk grown since the last sync: changes below the old size from
  CBT, the grown part as allocated. vSphere disks never shrink (`tracks_resize`).
- Bytes: nbdkit's vddk plugin with `snapshot=` and the snapshot's file of the disk (connectors.vsphere.vddk).
- Release: the snapshot is removed (consolidated); change ids stay valid after removal, so a
  committed point's change ids are the next sync's base and an abandoned sync leaves the old base usable.
- The VM carries a mark of each job replicating it (extraConfig `sendense.job.<job>`): `forget` removes
  it with this job's snapshots, and a change id of a forgotten job is never a base again. Change
  tracking itself stays on (other backup tools may rely on it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.vsphere.handles import VsphereDisk, VsphereSnapshot
from connectors.vsphere.session import (
    Session,
    calling,
    credentials,
    extra_config,
    fault_text,
    is_fault,
    snapshot_nodes,
)
from connectors.vsphere.spec import VsphereSource
from connectors.vsphere.vddk import VddkServer, serving
from sendense.datapath.extents import Extent, coalesce
from sendense.datapath.nbd import NbdConnection
from sendense.errors import ChangeTrackingLost, InvalidSpec, ResourceNotFound, SendenseError
from sendense.models import DiskInfo, DiskSnapshot, NicInfo, SnapshotRef, VmInfo

log = logging.getLogger(__name__)

MIN_HW_VERSION = 7  # Changed Block Tracking needs virtual hardware 7 or later


def job_key(job: str) -> str:
    """The source VM's extraConfig key that marks it as replicated by `job`."""
    return f"sendense.job.{job}"


def snapshot_name(job: str, snapshot_id: str) -> str:
    return f"sendense-{job}-{snapshot_id}"


def change_id(cid: str, size: int) -> str:
    """Our change id of a disk: vSphere's changeId and the disk's size then."""
    return f"{cid}@{size}"


def parse_change_id(v: str) -> tuple[str, int]:
    cid, sep, size = v.rpartition("@")
    if not sep or not size.isdigit():
        return v, 0
    return cid, int(size)


def epoch(cid: str) -> str:
    """The tracking epoch of a vSphere changeId: its ctk uuid (before the '/')."""
    return cid.rpartition("/")[0]


# ------------------------------------------------------------------------------------- devices


def _bus(controller: Any) -> str:
    from pyVmomi import vim

    if isinstance(controller, vim.vm.device.VirtualSCSIController):
        return "scsi"
    if isinstance(controller, vim.vm.device.VirtualNVMEController):
        return "nvme"
    if isinstance(controller, vim.vm.device.VirtualSATAController):
        return "sata"
    if isinstance(controller, vim.vm.device.VirtualIDEController):
        return "ide"
    return "disk"


def disks_of(devices: list[Any]) -> list[tuple[str, Any, str]]:
    """(key, VirtualDisk, bus) of each disk, keyed by controller and unit (scsi0-1): stable while the
    disk stays where it is attached, as vSphere's own scsi0:1 names."""
    from pyVmomi import vim

    controllers = {d.key: d for d in devices if isinstance(d, vim.vm.device.VirtualController)}
    out = []
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        c = controllers.get(d.controllerKey) if d.controllerKey is not None else None
        bus = _bus(c) if c is not None else "disk"
        number = c.busNumber if c is not None else 0
        out.append((f"{bus}{number}-{d.unitNumber or 0}", d, bus))
    return sorted(out, key=lambda x: x[0])


def capacity(d: Any) -> int:
    return int(d.capacityInBytes or 0) or int(d.capacityInKB or 0) * 1024


def hw_version(vm: Any) -> int:
    v = (vm.config.version or "") if vm.config is not None else ""
    try:
        return int(v.removeprefix("vmx-"))
    except ValueError:
        return 0


# ------------------------------------------------------------------------------------- the disk


def changed_areas(
    vm: Any, snap: Any, device_key: int, cid: str, start: int, end: int, label: str
) -> Iterator[Extent]:
    """QueryChangedDiskAreas of disk `device_key` at `snap` from change id `cid` over [start, end),
    paged as vSphere pages (each reply covers [startOffset, startOffset + length); an empty page is
    legal). A change id vSphere refuses (FileFault, InvalidArgument) is ChangeTrackingLost."""
    from pyVmomi import vmodl

    offset = start
    while offset < end:
        try:
            info = vm.QueryChangedDiskAreas(
                snapshot=snap, deviceKey=device_key, startOffset=offset, changeId=cid
            )
        except vmodl.MethodFault as e:
            if is_fault(e, "FileFault", "InvalidArgument"):
                raise ChangeTrackingLost(
                    f"{label}: vSphere refused change id {cid!r}: {fault_text(e)}"
                ) from None
            raise SendenseError(f"{label}: QueryChangedDiskAreas: {fault_text(e)}") from None
        for a in info.changedArea or []:
            lo, hi = max(int(a.start), offset), min(int(a.start) + int(a.length), end)
            if hi > lo:
                yield Extent(lo, hi - lo)
        nxt = int(info.startOffset) + int(info.length)
        if nxt <= offset:
            raise SendenseError(f"{label}: QueryChangedDiskAreas made no progress at offset {offset}")
        offset = nxt


class VsphereSourceDisk:
    """One disk of a sync's snapshot: changed areas from CBT, bytes through nbdkit's vddk plugin."""

    tracks_resize = True  # vSphere disks only grow; the grown part is listed whole (extents)

    def __init__(
        self, session: Session, vm: Any, snap: Any, d: DiskSnapshot, srv: VddkServer, label: str
    ) -> None:
        self.session, self.vm, self.snap, self.label = session, vm, snap, label
        self.size = d.size
        self.handle = VsphereDisk.parse(d.handle)
        self.uri = srv.uri
        self._status: NbdConnection | None = None

    def connect(self) -> NbdConnection:
        return NbdConnection(self.uri, label=self.label)

    def status(self) -> NbdConnection:
        if self._status is None:
            self._status = NbdConnection(self.uri, contexts=("base:allocation",), label=self.label)
        return self._status

    def areas(self, cid: str, start: int, end: int) -> Iterator[Extent]:
        """QueryChangedDiskAreas from `cid` over [start, end), paged as vSphere pages."""
        return changed_areas(self.vm, self.snap, self.handle.device_key, cid, start, end, self.label)

    def _split(self, areas: Iterator[Extent]) -> Iterator[Extent]:
        """Areas split into data and zero by the export's allocation."""
        st = self.status()
        for a in coalesce(areas):
            yield from st.changed_extents(None, a.offset, a.end)

    def _with_gaps(self, areas: Iterator[Extent], start: int) -> Iterator[Extent]:
        pos = start
        for e in self._split(areas):
            if e.offset > pos:
                yield Extent(pos, e.offset - pos, zero=True)
            yield e
            pos = e.end
        if pos < self.size:
            yield Extent(pos, self.size - pos, zero=True)

    def extents(self, since: str | None, start: int = 0) -> Iterator[Extent]:
        if start >= self.size:
            return
        if since is None:
            yield from self._with_gaps(self.areas("*", start, self.size), start)
            return
        cid, base_size = parse_change_id(since)
        old = min(base_size or self.size, self.size)
        if start < old:
            yield from self._split(self.areas(cid, start, old))
        if old < self.size:  # grown since the base: what is allocated there
            yield from self._split(self.areas("*", max(start, old), self.size))

    def close(self) -> None:
        if self._status is not None:
            self._status.close()
            self._status = None


# ------------------------------------------------------------------------------------- the connector


class VsphereSourceConnector:
    platform = "vsphere"

    def __init__(self, job: str, spec: VsphereSource, work_dir: Path) -> None:
        self.job, self.spec, self.work_dir = job, spec, work_dir
        self.session = Session(spec)

    def _vm(self) -> Any:
        return self.session.find_vm(self.spec.vm, self.spec.datacenter, self.spec.instance_uuid)

    def _label(self, key: str) -> str:
        return f"VM {self.spec.vm} disk {key}"

    # ---------------------------------------------------------------- checks and inventory

    def validate(self) -> None:
        vm = self._vm()
        if vm.config is None:
            raise ResourceNotFound(f"source.vm {self.spec.vm}: the VM has no configuration (inaccessible?)")
        supported = getattr(vm.capability, "changeTrackingSupported", None) if vm.capability else None
        self.validate_hw(vm)
        if supported is False:
            raise InvalidSpec(
                f"source.vm {self.spec.vm}: vSphere says the VM cannot track changed blocks "
                "(capability.changeTrackingSupported is false: a VM with RDM or shared disks?)"
            )
        if not disks_of(list(vm.config.hardware.device)):
            raise InvalidSpec(f"source.vm {self.spec.vm}: the VM has no virtual disks")
        credentials(self.spec)

    def discover(self) -> VmInfo:
        from pyVmomi import vim

        vm = self._vm()
        cfg = vm.config
        devices = list(cfg.hardware.device)
        boot = [
            b.deviceKey
            for b in (cfg.bootOptions.bootOrder if cfg.bootOptions is not None else None) or []
            if isinstance(b, vim.vm.BootOptions.BootableDiskDevice)
        ]
        disks = []
        for i, (key, d, bus) in enumerate(disks_of(devices)):
            order = boot.index(d.key) + 1 if d.key in boot else (1 if not boot and i == 0 else None)
            disks.append(
                DiskInfo(key=key, size=capacity(d), ref=d.backing.fileName, bus=bus, boot_order=order)
            )
        portgroups = {  # distributed portgroups by key: a NIC's backing names its portgroup by key
            n.key: n.name for n in vm.network or [] if isinstance(n, vim.dvs.DistributedVirtualPortgroup)
        }
        nics = []
        for d in devices:
            if isinstance(d, vim.vm.device.VirtualEthernetCard):
                port = getattr(d.backing, "port", None)
                net = (
                    portgroups.get(port.portgroupKey, port.portgroupKey)
                    if port is not None
                    else getattr(d.backing, "deviceName", None) or ""
                )
                model = type(d).__name__.rpartition(".")[2].removeprefix("Virtual").lower()
                nics.append(NicInfo(mac=d.macAddress or "", network=net or "", model=model))
        guest = (cfg.guestId or "").lower()
        return VmInfo(
            name=vm.name,
            platform="vsphere",
            disks=disks,
            vm_id=cfg.instanceUuid or "",
            cpus=cfg.hardware.numCPU or 0,
            memory_mib=cfg.hardware.memoryMB or 0,
            firmware="uefi" if cfg.firmware == "efi" else ("bios" if cfg.firmware == "bios" else ""),
            nics=nics,
            os_hint="windows" if "windows" in guest else ("linux" if guest else ""),
        )

    # ---------------------------------------------------------------- snapshots

    def _snapshots(self, vm: Any) -> list[Any]:
        return snapshot_nodes(vm)

    def _ensure_tracking(self, vm: Any) -> bool:
        """Enable change tracking if it is off; True if it was enabled now."""
        from pyVmomi import vim

        if vm.config.changeTrackingEnabled:
            return False
        log.info("%s: change tracking was off: enabling it", self.spec.vm)
        with calling(f"source.vm {self.spec.vm}: enabling change tracking"):
            task = vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True))
        self.session.wait(task, f"source.vm {self.spec.vm}: enabling change tracking")
        return True

    def _remove(self, snap: Any, what: str) -> None:
        from pyVmomi import vmodl

        try:
            task = snap.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
        except vmodl.fault.ManagedObjectNotFound:
            return  # gone already
        self.session.wait(task, f"source.vm {self.spec.vm}: removing {what}")

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        from pyVmomi import vmodl

        vm = self._vm()
        self.validate_hw(vm)
        enabled_now = self._ensure_tracking(vm)
        registered = self._register(vm)
        name = snapshot_name(self.job, snapshot_id)
        mine = f"sendense-{self.job}-"
        notes = []
        if enabled_now:
            notes.append(
                f"change tracking (CBT) was off on VM {self.spec.vm}: enabled; it takes effect at this "
                "sync's snapshot"
            )
        node = None
        for n in self._snapshots(vm):
            if n.name == name:
                node = n  # a retried step: the sync's snapshot is an instant already taken
            elif n.name.startswith(mine):
                log.info("%s: removing snapshot %s left by an earlier sync", self.spec.vm, n.name)
                self._remove(n.snapshot, f"snapshot {n.name} left by an earlier sync")
        if node is not None:
            snap, created = node.snapshot, node.createTime
        else:
            tools_ok = (
                getattr(vm.guest, "toolsRunningStatus", "") == "guestToolsRunning" if vm.guest else False
            )
            quiesce = self.spec.quiesce and tools_ok
            if self.spec.quiesce and not tools_ok:
                log.warning("%s: VMware Tools not running: the snapshot is crash-consistent", self.spec.vm)
                notes.append(
                    f"source.quiesce: VMware Tools do not run on VM {self.spec.vm}: this point is "
                    "crash-consistent, not quiesced"
                )
            what = f"source.vm {self.spec.vm}: snapshot {name}"
            with calling(what):
                task = vm.CreateSnapshot_Task(
                    name=name,
                    description=f"sendense job {self.job} sync {snapshot_id}",
                    memory=False,
                    quiesce=quiesce,
                )
            snap = self.session.wait(task, what)
            node = next((n for n in self._snapshots(vm) if n.snapshot._moId == snap._moId), None)
            created = node.createTime if node is not None else datetime.now(UTC)
        try:
            disks = self._disk_snapshots(vm, snap, base, enabled_now, registered)
        except vmodl.MethodFault as e:
            self._remove(snap, f"snapshot {name}")
            raise SendenseError(
                f"source.vm {self.spec.vm}: reading snapshot {name}: {fault_text(e)}"
            ) from None
        except BaseException:
            self._remove(snap, f"snapshot {name}")
            raise
        handle = VsphereSnapshot(vm=vm._moId, snapshot=snap._moId, name=name)
        created_at = created.astimezone(UTC) if isinstance(created, datetime) else datetime.now(UTC)
        return SnapshotRef(
            snapshot_id=snapshot_id, created_at=created_at, disks=disks, handle=handle.dump(), notes=notes
        )

    def validate_hw(self, vm: Any) -> None:
        hw = hw_version(vm)
        if hw and hw < MIN_HW_VERSION:
            raise InvalidSpec(
                f"source.vm {self.spec.vm}: virtual hardware vmx-{hw:02d} cannot track changed blocks "
                f"(needs vmx-{MIN_HW_VERSION:02d} or later)"
            )

    def _disk_snapshots(
        self, vm: Any, snap: Any, base: dict[str, str | None], enabled_now: bool, registered: bool
    ) -> list[DiskSnapshot]:
        out = []
        for key, d, _bus in disks_of(list(snap.config.hardware.device)):
            size = capacity(d)
            cid = getattr(d.backing, "changeId", None) or ""
            prev = base.get(key)
            lost: str | None = None
            base_size = 0
            if prev is not None:
                prev_cid, base_size = parse_change_id(prev)
                lost = (
                    self._check_base(vm, snap, d.key, key, prev_cid, cid, size, base_size, enabled_now)
                    if registered
                    else "this job's change tracking on the VM was removed (the job was forgotten)"
                )
            if not cid:
                # tracking did not take effect at this snapshot: the next sync cannot diff against it
                cid = "-"
            out.append(
                DiskSnapshot(
                    key=key,
                    size=size,
                    change_id=change_id(cid, size),
                    base_change_id=prev,
                    tracking_lost=lost,
                    handle=VsphereDisk(device_key=d.key, file=d.backing.fileName, base_size=base_size).dump(),
                )
            )
        return out

    def _check_base(
        self,
        vm: Any,
        snap: Any,
        device_key: int,
        key: str,
        prev: str,
        cid: str,
        size: int,
        base_size: int,
        enabled_now: bool,
    ) -> str | None:
        """Why the base change id cannot be used, or None if it can."""
        from pyVmomi import vmodl

        if enabled_now:
            return "change tracking was off on the VM since the last sync (enabled again)"
        if prev == "-" or not prev:
            return "the last sync's snapshot had no change id (change tracking had not taken effect)"
        if not cid:
            return "the snapshot has no change id (change tracking is not active on the disk)"
        if epoch(prev) != epoch(cid):
            return f"change tracking was reset since the last sync (change id {prev} is of an earlier epoch)"
        if base_size and size < base_size:
            return f"the disk is smaller than at the last sync ({size} < {base_size} bytes): replaced?"
        try:  # vSphere's own word: a FileFault for a change id it no longer knows
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=device_key, startOffset=0, changeId=prev)
        except vmodl.MethodFault as e:
            if is_fault(e, "FileFault", "InvalidArgument"):
                return f"vSphere refused change id {prev}: {fault_text(e)}"
            raise
        return None

    @contextmanager
    def open_disk(self, snap: SnapshotRef, key: str) -> Iterator[VsphereSourceDisk]:
        from pyVmomi import vim

        h = VsphereSnapshot.parse(snap.handle)
        d = snap.disk(key)
        dh = VsphereDisk.parse(d.handle)
        vm = self._vm()
        if vm._moId != h.vm:
            raise SendenseError(f"source.vm {self.spec.vm}: not the VM the snapshot was taken of ({h.vm})")
        ref = vim.vm.Snapshot(h.snapshot, self.session.si._stub)
        label = self._label(key)
        for attempt in range(6):
            # the snapshot's file of the disk, asked now: removing another snapshot of the VM (another
            # job's, a user's) consolidates and renames the files of the chain
            target = self.session.vddk(h.vm, self._snapshot_file(ref, dh.device_key) or dh.file, h.snapshot)
            with ExitStack() as stack:
                try:
                    srv = stack.enter_context(serving(target, label))
                except SendenseError as e:
                    if attempt < 5 and "find the file" in e.message:  # renamed between asking and opening
                        time.sleep(0.1 * (attempt + 1))
                        continue
                    raise
                disk = VsphereSourceDisk(self.session, vm, ref, d, srv, label)
                try:
                    yield disk
                finally:
                    disk.close()
                return

    def _snapshot_file(self, ref: Any, device_key: int) -> str | None:
        from pyVmomi import vim, vmodl

        try:
            devices = ref.config.hardware.device
        except vmodl.fault.ManagedObjectNotFound:
            raise ResourceNotFound(f"source.vm {self.spec.vm}: the sync's snapshot is gone") from None
        for dev in devices:
            if isinstance(dev, vim.vm.device.VirtualDisk) and dev.key == device_key:
                return str(getattr(dev.backing, "fileName", "")) or None
        return None

    def release_snapshot(self, snap: SnapshotRef, committed: bool) -> None:
        from pyVmomi import vim, vmodl

        h = VsphereSnapshot.parse(snap.handle)
        try:
            vm = self._vm()
        except ResourceNotFound:
            return  # the VM is gone, and its snapshots with it
        node = next((n for n in self._snapshots(vm) if n.snapshot._moId == h.snapshot), None)
        if node is None:
            return  # removed already (a retried release)
        if h.name and node.name != h.name:
            raise SendenseError(
                f"source.vm {self.spec.vm}: snapshot {h.snapshot} is {node.name!r}, "
                "not this sync's: left alone"
            )
        try:
            self._remove(vim.vm.Snapshot(h.snapshot, self.session.si._stub), f"snapshot {h.name}")
        except vmodl.fault.ManagedObjectNotFound:
            return

    def forget(self) -> None:
        from pyVmomi import vim

        try:
            vm = self._vm()
        except ResourceNotFound:
            return
        mine = f"sendense-{self.job}-"
        for n in list(self._snapshots(vm)):
            if n.name.startswith(mine):
                self._remove(n.snapshot, f"snapshot {n.name}")
        if job_key(self.job) in extra_config(vm):
            opt = vim.option.OptionValue(key=job_key(self.job), value="")  # (an empty value removes it)
            self._reconfigure(vm, vim.vm.ConfigSpec(extraConfig=[opt]), "forgetting the job")

    def _register(self, vm: Any) -> bool:
        """Mark the VM as replicated by this job (its extraConfig); True if it was already. Change ids
        of a job that was forgotten (the mark removed) are never a base again."""
        from pyVmomi import vim

        if job_key(self.job) in extra_config(vm):
            return True
        opt = vim.option.OptionValue(
            key=job_key(self.job), value=datetime.now(UTC).isoformat(timespec="seconds")
        )
        self._reconfigure(vm, vim.vm.ConfigSpec(extraConfig=[opt]), "marking it replicated")
        return False

    def _reconfigure(self, vm: Any, spec: Any, what: str) -> None:
        what = f"source.vm {self.spec.vm}: {what}"
        with calling(what):
            task = vm.ReconfigVM_Task(spec=spec)
        self.session.wait(task, what)
