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

import hashlib
import logging
import re
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import libvirt

from connectors.kvm.identity import bitmap_prefix, libvirt_identity, libvirt_identity_problem, split_change_id
from connectors.kvm.offline import BUSY_WAIT, NbdSourceDisk
from connectors.kvm.qemu import (
    fits_unix_socket,
    image_info,
    is_qcow2,
    qcow2_bitmaps,
    read_qcow2_header,
    remove_bitmaps,
)
from sendense.datapath.nbd import unix_uri
from sendense.errors import (
    InvalidSpec,
    ResourceNotFound,
    ResourceUnavailable,
    SendenseError,
    SnapshotInconsistent,
)
from sendense.models import DiskInfo, DiskSnapshot, SnapshotRef, VmInfo

log = logging.getLogger(__name__)

PER_DISK_INCREMENTAL = 7_006_000  # libvirt 7.6.0: <disk backupmode=... incremental=...> in backup XML
JOB_END_TIMEOUT = 30.0


def _quiet() -> None:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def safe_uri(uri: str) -> str:
    """The URI without user info (never a password in messages)."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        host, sep, path = rest.partition("/")
        if "@" in host:
            host = "***@" + host.rsplit("@", 1)[1]
        return f"{scheme}://{host}{sep}{path}"
    return uri


def _msg(e: libvirt.libvirtError) -> str:
    return (str(e.get_error_message() or e).strip().splitlines() or ["error"])[0]


def _code(e: libvirt.libvirtError) -> int:
    return int(e.get_error_code() or 0)


@dataclass(frozen=True)
class _Disk:
    target: str
    source: str


@dataclass(frozen=True)
class _BackupDisk:
    name: str
    mode: str  # full / incremental
    export: str
    bitmap: str | None
    scratch: str | None


@dataclass(frozen=True)
class _Backup:
    socket: str | None
    disks: dict[str, _BackupDisk]


def _parse_backup(xml: str) -> _Backup:
    root = ET.fromstring(xml)
    server = root.find("server")
    sock = server.get("socket") if server is not None else None
    top_incr = root.findtext("incremental")
    disks = {}
    for d in root.findall("./disks/disk"):
        if d.get("backup", "yes") != "yes":
            continue
        name = str(d.get("name"))
        scratch = d.find("scratch")
        mode = d.get("backupmode") or ("incremental" if (d.get("incremental") or top_incr) else "full")
        disks[name] = _BackupDisk(
            name=name,
            mode=mode,
            export=d.get("exportname") or name,
            bitmap=d.get("exportbitmap"),
            scratch=scratch.get("file") if scratch is not None else None,
        )
    return _Backup(socket=sock, disks=disks)


class LibvirtSource:
    platform = "kvm"
    busy_wait = BUSY_WAIT  # for another job's backup of the same domain to end

    def __init__(self, job: str, uri: str, domain: str, work_dir: Path) -> None:
        self.job = job
        self.uri = uri
        self.domain = domain
        self.work_dir = Path(work_dir)
        self.prefix = bitmap_prefix(job)

    # ------------------------------------------------------------------ connection

    def _where(self) -> str:
        return f"libvirt domain {self.domain} on {safe_uri(self.uri)}"

    @contextmanager
    def _dom(self) -> Iterator[libvirt.virDomain]:
        _quiet()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise ResourceUnavailable(f"libvirt {safe_uri(self.uri)} is unreachable: {_msg(e)}") from None
        try:
            try:
                dom = conn.lookupByName(self.domain)
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                    raise ResourceNotFound(
                        f"libvirt domain {self.domain} not found on {safe_uri(self.uri)}"
                    ) from None
                raise self._error(e, "lookup") from None
            yield dom
        finally:
            with suppress(libvirt.libvirtError):
                conn.close()

    def _error(self, e: libvirt.libvirtError, what: str) -> SendenseError:
        code, msg = _code(e), _msg(e)
        text = f"{self._where()}: {what} failed: {msg}"
        if "qcow2 v2" in msg:
            return InvalidSpec(f"{text} (upgrade the image: qemu-img amend -o compat=1.1, domain off)")
        if code in (
            libvirt.VIR_ERR_NO_SUPPORT,
            libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
            libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        ):
            return InvalidSpec(text)
        return ResourceUnavailable(text)

    def _running(self, dom: libvirt.virDomain) -> None:
        try:
            state = dom.state()[0]
        except libvirt.libvirtError as e:
            raise self._error(e, "state") from None
        if state not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
            names = {
                libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
                libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
                libvirt.VIR_DOMAIN_CRASHED: "crashed",
                libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
            }
            raise ResourceUnavailable(
                f"{self._where()} is not running ({names.get(state, f'state {state}')}); "
                "the libvirt source reads running domains only"
            )

    def _disks(self, dom: libvirt.virDomain) -> tuple[list[_Disk], list[str]]:
        """(qcow2 file disks, targets of every other disk/cdrom to leave out of backups)."""
        root = ET.fromstring(dom.XMLDesc(0))
        ours: list[_Disk] = []
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
                ours.append(_Disk(target=target, source=str(src.get("file"))))
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

    def _refuse_unsyncable(self, dom: libvirt.virDomain, disks: list[_Disk]) -> None:
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
            except libvirt.libvirtError as e:
                raise self._error(e, "blockInfo") from None
        return VmInfo(name=self.domain, platform="kvm", disks=infos)

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        new = self.prefix + snapshot_id
        with self._dom() as dom:
            self._running(dom)
            disks, others = self._disks(dom)
            self._refuse_unsyncable(dom, disks)
            uuid = dom.UUIDString()
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
            self.work_dir.mkdir(parents=True, exist_ok=True)
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
                    if _code(e) == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT and incr:
                        m = re.search(r"for disk '([^']+)'", _msg(e))
                        bad = [m.group(1)] if m and m.group(1) in incr else list(incr)
                        for k in bad:
                            lost[k] = f"libvirt refused checkpoint {incr[k]} of disk {k}: {_msg(e)}"
                        if not per_disk:
                            self._legacy_lost(disks, since_cp, lost)
                        continue
                    if _code(e) == libvirt.VIR_ERR_OPERATION_INVALID and "job" in _msg(e).lower():
                        raise ResourceUnavailable(
                            f"{self._where()}: another job is running ({_msg(e)})"
                        ) from None
                    raise self._error(e, "backupBegin") from None
            else:  # pragma: no cover - every retry marks at least one disk
                raise ResourceUnavailable(f"{self._where()}: backupBegin kept refusing the checkpoints")
            try:
                job = self._backup(dom)
                if job is None:
                    raise ResourceUnavailable(f"{self._where()}: the backup job ended as soon as it began")
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
                    handle = {
                        "socket": str(job.socket or sock),
                        "export": bd.export,
                        "scratch": str(bd.scratch or scratch[d.target]),
                        "checkpoint": new,
                        "source": d.source,
                    }
                    if bd.bitmap and since and not why:
                        handle["bitmap"] = bd.bitmap
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
            handle={"domain": self.domain, "checkpoint": new, "socket": snap_disks[0].handle["socket"]},
        )

    @contextmanager
    def open_disk(self, snap: SnapshotRef, key: str) -> Iterator[NbdSourceDisk]:
        try:
            d = snap.disk(key)
        except KeyError:
            raise ResourceNotFound(f"source disk {key}: not part of snapshot {snap.snapshot_id}") from None
        sock, export = d.handle.get("socket"), d.handle.get("export", key)
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
            if job is None or bd is None or job.socket != sock or bd.scratch != d.handle.get("scratch"):
                raise gone
        bitmap = d.handle.get("bitmap")
        bitmap_for = {d.base_change_id: bitmap} if bitmap and d.base_change_id and not d.tracking_lost else {}
        with NbdSourceDisk(unix_uri(sock, export), d.size, bitmap_for=bitmap_for) as disk:
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
        new = snap.handle.get("checkpoint") or self.prefix + snap.snapshot_id
        scratch = [Path(d.handle["scratch"]) for d in snap.disks if d.handle.get("scratch")]
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

    def _forget_running(self, dom: libvirt.virDomain) -> None:
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
                if _code(e) != libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                    raise self._error(e, f"checkpoint delete {name}") from None

    def _remove_local_files(self) -> None:
        paths = list(self.work_dir.glob(f"{self.prefix}*.scratch"))  # job names hold no glob characters
        sock = self._socket_path()
        if sock.is_socket():
            paths.append(sock)
        for p in paths:
            with suppress(OSError):
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ checkpoints

    def _tracking_problem(
        self, dom: libvirt.virDomain, since: str, key: str, cache: dict[str, ET.Element | str]
    ) -> str | None:
        """Why checkpoint `since` cannot serve as the base of disk `key`, or None if it can."""
        if not since.startswith(self.prefix):
            return f"change id {since} is not a checkpoint of job {self.job}"
        if since not in cache:
            try:
                cp = dom.checkpointLookupByName(since, 0)
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                    cache[since] = f"checkpoint {since} of domain {self.domain} is missing"
                else:
                    raise self._error(e, f"checkpoint lookup {since}") from None
            else:
                flags = libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN
                try:
                    # SIZE makes libvirt walk the bitmaps: a disk whose bitmap is missing or
                    # inconsistent comes back without a size.
                    cache[since] = ET.fromstring(
                        cp.getXMLDesc(flags | libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
                    )
                except libvirt.libvirtError as e:
                    log.info("checkpoint %s: sizes unavailable (%s)", since, _msg(e))
                    plain = ET.fromstring(cp.getXMLDesc(flags))
                    plain.set("nosize", "1")
                    cache[since] = plain
        cp_xml = cache[since]
        if isinstance(cp_xml, str):
            return cp_xml
        disk = next((d for d in cp_xml.findall("./disks/disk") if d.get("name") == key), None)
        if disk is None or disk.get("checkpoint", "bitmap") != "bitmap":
            return f"checkpoint {since} does not track disk {key}"
        if cp_xml.get("nosize") is None and disk.get("size") is None:
            bitmap = disk.get("bitmap") or since
            return f"dirty bitmap {bitmap} of disk {key} is missing or inconsistent (checkpoint {since})"
        return None

    def _legacy_lost(self, disks: list[_Disk], base: dict[str, str | None], lost: dict[str, str]) -> None:
        """libvirt < 7.6 takes one <incremental> for the whole backup: all disks from the same usable
        checkpoint, or a full backup of every disk."""
        with_base = [d.target for d in disks if base.get(d.target)]
        bases = {base[k] for k in with_base}
        broken = [k for k in with_base if k in lost]
        if not with_base or (not broken and len(bases) == 1 and len(with_base) == len(disks)):
            return
        why = (
            f"disk {', '.join(broken)} lost change tracking"
            if broken
            else "the disks do not share one base checkpoint"
        )
        for k in with_base:
            lost.setdefault(
                k, f"full backup of every disk: {why} and libvirt < 7.6 cannot mix full and incremental"
            )

    def _checkpoint_names(self, dom: libvirt.virDomain) -> list[str]:
        try:
            return [c.getName() for c in dom.listAllCheckpoints(0)]
        except libvirt.libvirtError as e:
            raise self._error(e, "listAllCheckpoints") from None

    def _our_ancestors(self, dom: libvirt.virDomain, name: str) -> list[str]:
        """This job's checkpoints older than `name` (its ancestors), nearest first."""
        try:
            cp = dom.checkpointLookupByName(name, 0)
        except libvirt.libvirtError as e:
            if _code(e) == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                return []
            raise self._error(e, f"checkpoint lookup {name}") from None
        out = []
        while True:
            try:
                cp = cp.getParent(0)
            except libvirt.libvirtError:
                break  # no parent
            n = cp.getName()
            if n.startswith(self.prefix):
                out.append(n)
        return out

    def _delete_checkpoint(self, dom: libvirt.virDomain, name: str, *, older: bool = False) -> None:
        """Delete one checkpoint (libvirt merges its bitmap into the parent's). Missing is fine.

        Leaving one behind is never a correctness problem (it only keeps one more bitmap recording),
        so failures are logged. libvirt refuses to delete a checkpoint whose bitmap is gone from one
        of the disks; for a checkpoint older than the committed one (`older`), nothing needs its
        bitmaps any more and its metadata alone is dropped. The new checkpoint of an uncommitted
        snapshot never is: with a libvirt that disables a bitmap when a newer checkpoint starts, the
        merge into the parent is what keeps the writes since the base.
        """
        try:
            dom.checkpointLookupByName(name, 0).delete(0)
            log.info("%s: deleted checkpoint %s", self._where(), name)
            return
        except libvirt.libvirtError as e:
            if _code(e) == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                return
            err = _msg(e)
        if older and "bitmap" in err:
            try:
                dom.checkpointLookupByName(name, 0).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
                log.warning(
                    "%s: checkpoint %s had a broken bitmap (%s); dropped its metadata only, bitmap %s may "
                    "remain in the other disks' qcow2 images (remove it with qemu-img bitmap --remove "
                    "when the domain is off)",
                    self._where(),
                    name,
                    err,
                    name,
                )
                return
            except libvirt.libvirtError as e:
                err = _msg(e)
        log.warning("%s: could not delete checkpoint %s: %s", self._where(), name, err)

    def _clear_stale(self, dom: libvirt.virDomain, base: dict[str, str | None], new: str) -> None:
        """Wait (bounded) for another job's backup to end, end one this job left running, drop this
        job's checkpoints that are not a base."""
        job = self._backup(dom)
        deadline = time.monotonic() + self.busy_wait
        while job is not None and not self._ours(job):  # another job's sync: libvirt runs one at a time
            if time.monotonic() > deadline:
                raise ResourceUnavailable(
                    f"{self._where()}: a backup job not of job {self.job} (another job's sync?) still runs "
                    f"after {self.busy_wait:g}s; job {self.job} retries"
                )
            time.sleep(0.1)
            job = self._backup(dom)
        if job is not None:
            log.info("%s: ending a leftover backup job of %s", self._where(), self.job)
            self._end_job(dom, None)
        keep = {b for b in base.values() if b}
        older = {a for b in keep for a in self._our_ancestors(dom, b)}
        for name in self._checkpoint_names(dom):
            if name.startswith(self.prefix) and name not in keep:
                self._delete_checkpoint(dom, name, older=name in older)
        if new in self._checkpoint_names(dom):
            raise ResourceUnavailable(f"{self._where()}: checkpoint {new} exists and cannot be removed")

    # ------------------------------------------------------------------ backup job

    def _lib_version(self, dom: libvirt.virDomain) -> int:
        try:
            return int(dom.connect().getLibVersion())
        except libvirt.libvirtError:
            return 0

    def _backup(self, dom: libvirt.virDomain) -> _Backup | None:
        try:
            return _parse_backup(dom.backupGetXMLDesc(0))
        except libvirt.libvirtError as e:
            if _code(e) in (libvirt.VIR_ERR_NO_DOMAIN_BACKUP, libvirt.VIR_ERR_OPERATION_INVALID):
                return None  # no backup job, or domain not running
            raise self._error(e, "backupGetXMLDesc") from None

    def _ours(self, job: _Backup, checkpoint: str | None = None) -> bool:
        """Our scratch files are named `<checkpoint>.<disk>.scratch` (checkpoint = sendense.<job>.<snap>)."""
        names = [Path(d.scratch).name for d in job.disks.values() if d.scratch]
        want = f"{checkpoint}." if checkpoint else self.prefix
        return bool(names) and all(n.startswith(want) and n.endswith(".scratch") for n in names)

    def _end_job(self, dom: libvirt.virDomain, checkpoint: str | None) -> None:
        """End our pull backup (the one of `checkpoint`, or any of this job's); no job is fine."""
        job = self._backup(dom)
        if job is None or not self._ours(job, checkpoint):
            return
        try:
            dom.abortJob()
        except libvirt.libvirtError as e:
            if _code(e) != libvirt.VIR_ERR_OPERATION_INVALID:  # "no job is active on the domain"
                raise self._error(e, "abortJob") from None
        deadline = time.monotonic() + JOB_END_TIMEOUT
        while self._backup(dom) is not None:
            if time.monotonic() > deadline:
                raise ResourceUnavailable(
                    f"{self._where()}: the backup job did not end within {JOB_END_TIMEOUT:.0f} s"
                )
            time.sleep(0.05)
        for d in job.disks.values():
            if d.scratch:
                with suppress(OSError):
                    Path(d.scratch).unlink(missing_ok=True)

    def _socket_path(self) -> Path:
        sock = self.work_dir / f"{self.prefix}sock"
        if fits_unix_socket(sock):
            return sock
        digest = hashlib.sha256(f"{self.work_dir}\0{self.job}".encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"sendense-{digest}.sock"

    def _scratch_path(self, checkpoint: str, key: str) -> Path:
        return self.work_dir / f"{checkpoint}.{key}.scratch"

    @staticmethod
    def _backup_xml(
        disks: list[_Disk],
        others: list[str],
        incr: dict[str, str],
        sock: Path,
        scratch: dict[str, Path],
        per_disk: bool,
    ) -> str:
        root = ET.Element("domainbackup", mode="pull")
        if incr and not per_disk:
            ET.SubElement(root, "incremental").text = next(iter(incr.values()))
        ET.SubElement(root, "server", transport="unix", socket=str(sock))
        el = ET.SubElement(root, "disks")
        for d in disks:
            attrs = {"name": d.target, "backup": "yes", "type": "file"}
            if per_disk:
                attrs["backupmode"] = "incremental" if d.target in incr else "full"
                if d.target in incr:
                    attrs["incremental"] = incr[d.target]
            de = ET.SubElement(el, "disk", attrs)
            ET.SubElement(de, "scratch", file=str(scratch[d.target]))
        for t in others:
            ET.SubElement(el, "disk", name=t, backup="no")
        return ET.tostring(root, encoding="unicode")

    @staticmethod
    def _checkpoint_xml(name: str, disks: list[_Disk], others: list[str]) -> str:
        root = ET.Element("domaincheckpoint")
        ET.SubElement(root, "name").text = name
        el = ET.SubElement(root, "disks")
        for d in disks:
            ET.SubElement(el, "disk", name=d.target, checkpoint="bitmap")
        for t in others:
            ET.SubElement(el, "disk", name=t, checkpoint="no")
        return ET.tostring(root, encoding="unicode")
