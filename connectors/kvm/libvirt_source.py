"""KVM source, running VM managed by libvirt: pull-mode backups with checkpoints (as virtnbdbackup does).

Change id = `<checkpoint>@<identity>`: a libvirt checkpoint `sendense.<job>.<snapshot>` (a persistent
dirty bitmap of that name in every qcow2 disk, recording since the checkpoint) and the disk's identity
(domain UUID, disk target and image path, the image file's inode: `identity.libvirt_identity`). The
checkpoint's bitmap has one name on every disk, so without the identity a disk swapped with another
(image files renamed, the domain's XML edited, the domain redefined) would diff against the other
disk's changes; a changed identity is a resync with the reason. libvirt runs one backup job per
domain: a second job's snapshot waits (bounded) for the first one's to end.

create_snapshot starts one pull-mode backup job (`virDomainBackupBegin`) that creates, atomically and
crash-consistently across all disks, both the point in time and the new checkpoint. QEMU then serves
that point over NBD on a unix socket in `work_dir`, one export per disk (named after the disk target,
vda, vdb...); writes the guest makes afterwards are first copied into per-disk scratch files in
`work_dir`, so reads always see the snapshot instant. A disk diffed against a usable base checkpoint
is exported incrementally, its changes since the base as the bitmap `backup-<target>`; a disk without
one is exported in full. libvirt >= 7.6 mixes both per disk (`backupmode`); an older one takes a single
`<incremental>` for the whole backup, so one disk without usable tracking makes every disk full (each
then marked `tracking_lost`). Everything needed to reopen an export (socket, export and bitmap names)
goes into the snapshot's handles, so another process can read it from the SnapshotRef alone.

release_snapshot ends the job (`virDomainAbortJob` is how a pull backup ends; libvirt removes the
scratch files). Committed: this job's checkpoints older than the new one are deleted. Not committed:
the new checkpoint is deleted and libvirt keeps its parent's bitmap covering every write since the
parent (merging the deleted bitmap into it where needed), so the next sync from the old base misses
nothing. `forget` (the job is deleted) ends our backup job and deletes every checkpoint of the job.

A base checkpoint that is gone, does not cover a disk, or whose bitmap QEMU lost or found inconsistent
(the VM crashed) sets `tracking_lost` on that disk with a one-line reason: it gets a full export and
the sync resyncs it. Leftovers of a crashed worker (our backup job still running, our checkpoints that
are no base) are cleared by the next create_snapshot; a backup job of someone else is never touched.
"""

from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

import libvirt

from connectors.kvm import handles
from connectors.kvm.hardware import libvirt_hardware
from connectors.kvm.identity import libvirt_identity, libvirt_identity_problem, split_change_id
from connectors.kvm.libvirt_job import DomainDisk, LibvirtJob, error_code, error_text
from connectors.kvm.offline import NbdSourceDisk
from sendense.datapath.nbd import unix_uri
from sendense.errors import (
    InvalidSpec,
    ResourceNotFound,
    ResourceUnavailable,
    SendenseError,
    SnapshotInconsistent,
)
from sendense.models import DiskInfo, DiskSnapshot, SnapshotRef, VmInfo
from sendense.private import private_dir
from tools.qemu import (
    image_info,
    is_qcow2,
    qcow2_bitmaps,
    read_qcow2_header,
    remove_bitmaps,
)

log = logging.getLogger(__name__)

PER_DISK_INCREMENTAL = 7_006_000  # libvirt 7.6.0: <disk backupmode=... incremental=...> in backup XML


class LibvirtSource(LibvirtJob):
    platform = "kvm"

    def _disks(self, dom: libvirt.virDomain) -> tuple[list[DomainDisk], list[str]]:
        """(qcow2 file disks, targets of every other disk/cdrom to leave out of backups)."""
        root = ET.fromstring(dom.XMLDesc(0))
        ours: list[DomainDisk] = []
        others: list[str] = []
        unsupported: list[str] = []
        for d in root.findall("./devices/disk"):
            t = d.find("target")
            target = t.get("dev") if t is not None else None
            if not target:
                continue
            drv = d.find("driver")
            src = d.find("source")
            fmt = drv.get("type") if drv is not None else None
            if d.get("device", "disk") != "disk":
                others.append(target)
            elif d.get("type") == "file" and fmt == "qcow2" and src is not None and src.get("file"):
                ours.append(DomainDisk(target=target, source=str(src.get("file"))))
            else:
                unsupported.append(f"{target} ({d.get('type')}/{fmt})")
        if unsupported:
            raise InvalidSpec(
                f"{self._where()}: disk {', '.join(unsupported)} cannot be replicated: only qcow2 file "
                "disks have checkpoints (convert it with the domain shut off: qemu-img convert -O qcow2)"
            )
        if not ours:
            raise InvalidSpec(f"{self._where()} has no qcow2 file disk to replicate")
        return ours, others

    def _refuse_unsyncable(self, dom: libvirt.virDomain, disks: list[DomainDisk]) -> None:
        """qcow2 v2 images cannot hold checkpoints and a 0-byte disk has nothing to copy: both would
        fail every sync, so they are refused up front, with what to do."""
        problems = []
        for d in disks:
            try:
                size = int(dom.blockInfo(d.target)[0])
            except libvirt.libvirtError as e:
                raise self._error(e, "blockInfo") from None
            image = Path(d.source)
            if image.is_file() and is_qcow2(image) and read_qcow2_header(image).version < 3:
                problems.append(
                    f"disk {d.target} ({image}) is qcow2 v2 (compat=0.10), which cannot hold checkpoints: "
                    f"shut the domain off and upgrade it: qemu-img amend -o compat=1.1 {image}"
                )
            elif size == 0:
                problems.append(
                    f"disk {d.target} ({image}) has a size of 0 bytes: detach it or give it a size"
                )
        if problems:
            raise InvalidSpec(f"{self._where()}: " + "; ".join(problems))

    # ------------------------------------------------------------------ protocol

    def validate(self) -> None:
        with self._dom() as dom:
            self._running(dom)
            self._refuse_unsyncable(dom, self._disks(dom)[0])

    def discover(self) -> VmInfo:
        with self._dom() as dom:
            self._running(dom)
            disks, _ = self._disks(dom)
            try:
                infos = [
                    DiskInfo(key=d.target, size=int(dom.blockInfo(d.target)[0]), ref=d.source) for d in disks
                ]
                hw = libvirt_hardware(dom.XMLDesc(0), infos)
                vm_id = dom.UUIDString()
            except libvirt.libvirtError as e:
                raise self._error(e, "blockInfo") from None
        return VmInfo(name=self.domain, platform="kvm", vm_id=vm_id, **hw)

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        new = self.prefix + snapshot_id
        with self._dom() as dom:
            self._running(dom)
            disks, others = self._disks(dom)
            self._refuse_unsyncable(dom, disks)
            uuid = dom.UUIDString()
            self._adopt_carried(dom, disks)
            ident = {d.target: libvirt_identity(uuid, d.target, d.source) for d in disks}
            lost: dict[str, str] = {}
            since_cp: dict[str, str | None] = {}  # the base checkpoint of each disk whose identity holds
            for d in disks:
                since = base.get(d.target)
                if since:
                    why = libvirt_identity_problem(since, ident[d.target], self.domain, d.target, d.source)
                    if why:
                        lost[d.target] = why
                    else:
                        since_cp[d.target] = split_change_id(since)[0]
            self._clear_stale(dom, since_cp, new)
            cp_cache: dict[str, ET.Element | str] = {}
            for d in disks:
                cp = since_cp.get(d.target)
                if cp:
                    why = self._tracking_problem(dom, cp, d.target, cp_cache)
                    if why:
                        lost[d.target] = why
            per_disk = self._lib_version(dom) >= PER_DISK_INCREMENTAL
            if not per_disk:
                self._legacy_lost(disks, since_cp, lost)
            private_dir(self.work_dir, "work directory")  # its NBD socket and scratch files: ours only
            sock = self._socket_path()
            scratch = {d.target: self._scratch_path(new, d.target) for d in disks}
            for p in [sock, *scratch.values()]:
                p.unlink(missing_ok=True)
            incr: dict[str, str] = {}
            for _attempt in range(len(disks) + 1):
                incr = {d.target: b for d in disks if (b := since_cp.get(d.target)) and d.target not in lost}
                bxml = self._backup_xml(disks, others, incr, sock, scratch, per_disk)
                cxml = self._checkpoint_xml(new, disks, others)
                try:
                    dom.backupBegin(bxml, cxml, 0)
                    instant = datetime.now(UTC)
                    break
                except libvirt.libvirtError as e:
                    if error_code(e) == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT and incr:
                        m = re.search(r"for disk '([^']+)'", error_text(e))
                        bad = [m.group(1)] if m and m.group(1) in incr else list(incr)
                        for k in bad:
                            lost[k] = f"libvirt refused checkpoint {incr[k]} of disk {k}: {error_text(e)}"
                        if not per_disk:
                            self._legacy_lost(disks, since_cp, lost)
                        continue
                    if error_code(e) == libvirt.VIR_ERR_OPERATION_INVALID and "job" in error_text(e).lower():
                        raise ResourceUnavailable(
                            f"{self._where()}: another job is running ({error_text(e)})"
                        ) from None
                    raise self._error(e, "backupBegin") from None
            else:  # pragma: no cover - every retry marks at least one disk
                raise ResourceUnavailable(f"{self._where()}: backupBegin kept refusing the checkpoints")
            try:
                job = self._backup(dom)
                if job is None:
                    raise ResourceUnavailable(f"{self._where()}: the backup job ended as soon as it began")
                with suppress(OSError):  # QEMU made it under its umask (0775 seen): the owner's only
                    os.chmod(job.socket or sock, 0o600)
                snap_disks = []
                for d in disks:
                    bd = job.disks.get(d.target)
                    if bd is None:
                        raise SendenseError(
                            f"{self._where()}: the backup job does not export disk {d.target}"
                        )
                    since = base.get(d.target)
                    why = lost.get(d.target)
                    if since and not why and not bd.bitmap:
                        cp = since_cp[d.target]
                        why = f"libvirt exported disk {d.target} in full, not since checkpoint {cp}"
                    handle = handles.LibvirtDisk(
                        socket=str(job.socket or sock),
                        export=bd.export,
                        scratch=str(bd.scratch or scratch[d.target]),
                        checkpoint=new,
                        source=d.source,
                        bitmap=bd.bitmap if bd.bitmap and since and not why else "",
                    ).dump()
                    snap_disks.append(
                        DiskSnapshot(
                            key=d.target,
                            size=int(dom.blockInfo(d.target)[0]),
                            change_id=f"{new}@{ident[d.target]}",
                            base_change_id=since,
                            tracking_lost=why,
                            handle=handle,
                        )
                    )
            except BaseException as e:
                try:  # do not leave a half-made snapshot behind
                    self._end_job(dom, new)
                    self._delete_checkpoint(dom, new)
                except Exception as cleanup:  # noqa: BLE001 - the original error matters more
                    log.warning("%s: cleanup after a failed snapshot: %s", self._where(), cleanup)
                if isinstance(e, libvirt.libvirtError):
                    raise self._error(e, "backup job inspection") from None
                raise
        for ds in snap_disks:
            if ds.tracking_lost:
                log.warning("%s: disk %s lost change tracking: %s", self._where(), ds.key, ds.tracking_lost)
        return SnapshotRef(
            snapshot_id=snapshot_id,
            created_at=instant,
            disks=snap_disks,
            handle=handles.LibvirtSnapshot(
                domain=self.domain,
                checkpoint=new,
                socket=handles.LibvirtDisk.parse(snap_disks[0].handle).socket,
            ).dump(),
        )

    @contextmanager
    def open_disk(self, snap: SnapshotRef, key: str) -> Iterator[NbdSourceDisk]:
        try:
            d = snap.disk(key)
        except KeyError:
            raise ResourceNotFound(f"source disk {key}: not part of snapshot {snap.snapshot_id}") from None
        h = handles.LibvirtDisk.parse(d.handle)
        sock, export = h.socket, h.export or key
        if not sock:
            raise SendenseError(f"snapshot {snap.snapshot_id} of disk {key} has no NBD socket")
        gone = SnapshotInconsistent(
            f"{self._where()}: the pull backup of snapshot {snap.snapshot_id} is gone "
            "(domain stopped or job ended)"
        )
        with self._dom() as dom:
            if not dom.isActive():
                raise gone
            job = self._backup(dom)
            bd = job.disks.get(key) if job is not None else None
            if job is None or bd is None or job.socket != sock or bd.scratch != h.scratch:
                raise gone
        bitmap = h.bitmap
        bitmap_for = {d.base_change_id: bitmap} if bitmap and d.base_change_id and not d.tracking_lost else {}
        label = f"disk {key} of domain {self.domain}"
        with NbdSourceDisk(unix_uri(sock, export), d.size, bitmap_for=bitmap_for, label=label) as disk:
            try:
                size = disk.status().size  # the connection the copy's block status queries use
            except ResourceUnavailable as err:  # the backup job was there: worth a retry in place
                raise ResourceUnavailable(
                    f"{self._where()}: snapshot {snap.snapshot_id} of disk {key}: {err}"
                ) from None
            if size != d.size:
                raise SnapshotInconsistent(
                    f"{self._where()}: disk {key} reads {size} bytes, snapshot {snap.snapshot_id} said "
                    f"{d.size} (resized)"
                )
            yield disk

    def release_snapshot(self, snap: SnapshotRef, committed: bool) -> None:
        new = handles.LibvirtSnapshot.parse(snap.handle).checkpoint or self.prefix + snap.snapshot_id
        scratch = [Path(s) for d in snap.disks if (s := handles.LibvirtDisk.parse(d.handle).scratch)]
        try:
            with self._dom() as dom:
                self._end_job(dom, new)
                if committed:
                    for name in self._our_ancestors(dom, new):
                        self._delete_checkpoint(dom, name, older=True)
                else:
                    self._delete_checkpoint(dom, new)
        except ResourceNotFound:
            log.warning("%s is gone: nothing to release for snapshot %s", self._where(), snap.snapshot_id)
        for p in scratch:
            with suppress(OSError):
                p.unlink(missing_ok=True)

    def forget(self) -> None:
        """End our backup job, delete every checkpoint of this job (newest first: libvirt merges a
        deleted bitmap into its parent where another checkpoint needs it), remove scratch files.

        A shut-off domain: libvirt deletes checkpoints of running domains only, so this job's bitmaps
        are removed from the images with qemu-img and the checkpoints' metadata alone is dropped. That
        skips the merge, so it is done only when no other checkpoint's bitmap of the images is disabled
        (one that would need it). A domain that is gone leaves nothing to do but local files.
        """
        try:
            with self._dom() as dom:
                if dom.isActive():
                    self._forget_running(dom)
                else:
                    self._forget_stopped(dom)
        except ResourceNotFound:
            log.warning("%s is gone: only local files of job %s are removed", self._where(), self.job)
        except libvirt.libvirtError as e:
            raise self._error(e, "forget") from None
        self._remove_local_files()

    def _ours_newest_first(self, dom: libvirt.virDomain) -> list[str]:
        try:  # topological: every parent before its children
            cps = dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
        except libvirt.libvirtError as e:
            raise self._error(e, "listAllCheckpoints") from None
        return [c.getName() for c in reversed(cps) if c.getName().startswith(self.prefix)]

    def _adopt_carried(self, dom: libvirt.virDomain, disks: list[DomainDisk]) -> None:
        """This job's dirty bitmaps that QEMU loaded from the images but this libvirt has no checkpoint
        for: the domain ran under another libvirt at its last sync (a live migration, or a restart on
        another host over the same images, carries the persistent bitmaps in the qcow2 files, never
        libvirt's records of them). Each is redefined as a checkpoint of this libvirt, oldest first,
        with libvirt validating that its bitmap is there and consistent on every disk it names
        (REDEFINE_VALIDATE: a bitmap of a QEMU that crashed, or one not recording, is refused: it is
        redefined unvalidated only to be deleted, and that disk resyncs). A redefined checkpoint that
        is this sync's base makes the sync incremental; any other is deleted by _clear_stale (or
        forget) through libvirt like any checkpoint of ours.

        Only bitmaps QEMU loaded at its start are in the images' bitmap directories while it runs
        (those it creates are written there when it lets go of the image), so this finds exactly the
        carried ones. A disabled bitmap (not recording: it missed writes) is never adopted as a base:
        its checkpoint is redefined to be deleted, and the disk resyncs."""
        known = set(self._checkpoint_names(dom))
        carried: dict[str, dict[str, bool]] = {}  # name -> disk target -> recording
        for d in disks:
            image = Path(d.source)
            if not image.is_file():
                continue
            try:
                bitmaps = qcow2_bitmaps(image_info(image))
            except Exception as e:  # noqa: BLE001 - adopting is an optimisation; the sync goes on
                log.info("%s: bitmaps of disk %s unreadable: %s", self._where(), d.target, e)
                continue
            for name, flags in bitmaps.items():
                if name.startswith(self.prefix) and name not in known:
                    carried.setdefault(name, {})[d.target] = "auto" in flags
        parent: str | None = None
        for name in sorted(carried):  # snapshot ids sort by time
            recording = carried[name]
            disks_xml = "".join(
                f"<disk name='{d.target}' checkpoint='bitmap' bitmap='{name}'/>"
                if d.target in recording
                else f"<disk name='{d.target}' checkpoint='no'/>"
                for d in disks
            )
            parent_xml = f"<parent><name>{parent}</name></parent>" if parent else ""
            xml = (
                f"<domaincheckpoint><name>{name}</name>{parent_xml}"
                f"<creationTime>{self._created(name)}</creationTime><disks>{disks_xml}</disks>"
                "</domaincheckpoint>"
            )
            flags = (
                libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
                | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
            )
            try:
                dom.checkpointCreateXML(xml, flags)
            except libvirt.libvirtError as e:
                log.warning(
                    "%s: bitmap %s came with the images from another host but cannot be a base (%s): "
                    "removing it",
                    self._where(),
                    name,
                    error_text(e),
                )
                try:  # its record alone, to delete it through libvirt like a checkpoint of ours
                    dom.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
                except libvirt.libvirtError as e2:
                    log.warning("%s: bitmap %s stays: %s", self._where(), name, error_text(e2))
                    continue
                self._delete_checkpoint(dom, name, older=True)
                continue
            log.info(
                "%s: adopted checkpoint %s, whose bitmaps came with the images (disks %s)",
                self._where(),
                name,
                ", ".join(sorted(recording)),
            )
            if not all(recording.values()):  # it missed writes: never a base
                self._delete_checkpoint(dom, name, older=True)
                continue
            parent = name

    @staticmethod
    def _created(name: str) -> int:
        """A checkpoint's creation time from its snapshot id (<job prefix><YYYYmmddTHHMMSSZ>-<seq>)."""
        m = re.search(r"(\d{8}T\d{6})Z", name)
        if m:
            with suppress(ValueError):
                return int(datetime.strptime(m.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC).timestamp())
        return int(datetime.now(UTC).timestamp())

    def _forget_running(self, dom: libvirt.virDomain) -> None:
        self._adopt_carried(dom, self._disks(dom)[0])
        job = self._backup(dom)
        if job is not None and self._ours(job):
            log.info("%s: ending a leftover backup job of %s", self._where(), self.job)
            self._end_job(dom, None)
        for name in self._ours_newest_first(dom):
            self._delete_checkpoint(dom, name, older=True)
        left = self._ours_newest_first(dom)
        if left:
            raise ResourceUnavailable(
                f"{self._where()}: could not delete checkpoints {', '.join(left)} of job {self.job} "
                "(see the worker log)"
            )

    def _forget_stopped(self, dom: libvirt.virDomain) -> None:
        names = self._ours_newest_first(dom)
        others = {n for n in self._checkpoint_names(dom) if not n.startswith(self.prefix)}
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        images = [
            Path(str(src.get("file")))
            for d in root.findall("./devices/disk")
            if d.get("type") == "file"
            and (drv := d.find("driver")) is not None
            and drv.get("type") == "qcow2"
            and (src := d.find("source")) is not None
            and src.get("file")
        ]
        plan: list[tuple[Path, list[str]]] = []
        for img in images:
            if not img.is_file():
                continue
            bitmaps = qcow2_bitmaps(image_info(img))
            needy = sorted(n for n, flags in bitmaps.items() if n in others and "auto" not in flags)
            mine = [n for n in bitmaps if n.startswith(self.prefix)]
            if mine and needy:
                raise ResourceUnavailable(
                    f"{self._where()} is shut off and checkpoint {needy[0]} of {img} relies on merges: "
                    f"start the domain to delete the checkpoints of job {self.job}"
                )
            plan.append((img, mine))
        for img, mine in plan:
            remove_bitmaps(
                img,
                mine,
                f"{self._where()}: disk image {img} is in use by another process: the dirty bitmaps "
                f"{self.prefix}* of job {self.job} stay",
            )
        for name in names:
            try:
                cp = dom.checkpointLookupByName(name, 0)
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            except libvirt.libvirtError as e:
                if error_code(e) != libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                    raise self._error(e, f"checkpoint delete {name}") from None

    def _remove_local_files(self) -> None:
        paths = list(self.work_dir.glob(f"{self.prefix}*.scratch"))  # job names hold no glob characters
        sock = self._socket_path()
        if sock.is_socket():
            paths.append(sock)
        for p in paths:
            with suppress(OSError):
                p.unlink(missing_ok=True)
