"""The libvirt source's dealings with libvirt apart from the protocol: the connection and its errors,
this job's checkpoints (lookup, ancestry, deletion, leftovers), and the pull backup job (which one is
ours, ending it, its XML, its socket and scratch files). See `libvirt_source` for the flow.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import libvirt

from connectors.kvm.identity import bitmap_prefix
from connectors.kvm.offline import BUSY_WAIT
from sendense.errors import InvalidSpec, ResourceNotFound, ResourceUnavailable, SendenseError
from sendense.private import private_dir
from tools.qemu import fits_unix_socket

log = logging.getLogger(__name__)

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


def error_text(e: libvirt.libvirtError) -> str:
    return (str(e.get_error_message() or e).strip().splitlines() or ["error"])[0]


def error_code(e: libvirt.libvirtError) -> int:
    return int(e.get_error_code() or 0)


@dataclass(frozen=True)
class DomainDisk:
    target: str
    source: str


@dataclass(frozen=True)
class BackupDisk:
    name: str
    mode: str  # full / incremental
    export: str
    bitmap: str | None
    scratch: str | None


@dataclass(frozen=True)
class Backup:
    socket: str | None
    disks: dict[str, BackupDisk]


def parse_backup(xml: str) -> Backup:
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
        disks[name] = BackupDisk(
            name=name,
            mode=mode,
            export=d.get("exportname") or name,
            bitmap=d.get("exportbitmap"),
            scratch=scratch.get("file") if scratch is not None else None,
        )
    return Backup(socket=sock, disks=disks)


class LibvirtJob:
    """One job's view of one libvirt domain. `LibvirtSource` adds the protocol."""

    busy_wait = BUSY_WAIT  # for another job's backup of the same domain to end

    def __init__(self, job: str, uri: str, domain: str, work_dir: Path, uuid: str | None = None) -> None:
        self.job = job
        self.uri = uri
        self.domain = domain
        self.uuid = uuid  # the domain the job was created for (None: any domain of this name)
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
            raise ResourceUnavailable(
                f"libvirt {safe_uri(self.uri)} is unreachable: {error_text(e)}"
            ) from None
        try:
            try:
                dom = conn.lookupByName(self.domain)
            except libvirt.libvirtError as e:
                if error_code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                    raise ResourceNotFound(
                        f"libvirt domain {self.domain} not found on {safe_uri(self.uri)}"
                    ) from None
                raise self._error(e, "lookup") from None
            if self.uuid is not None and (now := dom.UUIDString()) != self.uuid:
                raise ResourceNotFound(
                    f"{self._where()} is another VM now (UUID {now}; the job replicates {self.uuid}): "
                    "delete the job and create it again to replicate the new one"
                )
            yield dom
        finally:
            with suppress(libvirt.libvirtError):
                conn.close()

    def _error(self, e: libvirt.libvirtError, what: str) -> SendenseError:
        code, msg = error_code(e), error_text(e)
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
                if error_code(e) == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
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
                    log.info("checkpoint %s: sizes unavailable (%s)", since, error_text(e))
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

    def _legacy_lost(
        self, disks: list[DomainDisk], base: dict[str, str | None], lost: dict[str, str]
    ) -> None:
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
            if error_code(e) == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
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
            if error_code(e) == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                return
            err = error_text(e)
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
                err = error_text(e)
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

    def _backup(self, dom: libvirt.virDomain) -> Backup | None:
        try:
            return parse_backup(dom.backupGetXMLDesc(0))
        except libvirt.libvirtError as e:
            if error_code(e) in (libvirt.VIR_ERR_NO_DOMAIN_BACKUP, libvirt.VIR_ERR_OPERATION_INVALID):
                return None  # no backup job, or domain not running
            raise self._error(e, "backupGetXMLDesc") from None

    def _ours(self, job: Backup, checkpoint: str | None = None) -> bool:
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
            if error_code(e) != libvirt.VIR_ERR_OPERATION_INVALID:  # "no job is active on the domain"
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
        socks = private_dir(
            Path(tempfile.gettempdir()) / f"sendense-sockets-{os.geteuid()}", "socket directory"
        )
        return socks / f"{digest}.sock"

    def _scratch_path(self, checkpoint: str, key: str) -> Path:
        return self.work_dir / f"{checkpoint}.{key}.scratch"

    @staticmethod
    def _backup_xml(
        disks: list[DomainDisk],
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
    def _checkpoint_xml(name: str, disks: list[DomainDisk], others: list[str]) -> str:
        root = ET.Element("domaincheckpoint")
        ET.SubElement(root, "name").text = name
        el = ET.SubElement(root, "disks")
        for d in disks:
            ET.SubElement(el, "disk", name=d.target, checkpoint="bitmap")
        for t in others:
            ET.SubElement(el, "disk", name=t, checkpoint="no")
        return ET.tostring(root, encoding="unicode")
