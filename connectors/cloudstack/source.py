"""CloudStack source: the API says which KVM host runs the VM and what its volumes are; the agent of that
host takes each snapshot with libvirt checkpoints (QEMU dirty bitmaps in the volumes' qcow2 files), as
the KVM source does for a libvirt domain (connectors.kvm.libvirt_source), and reads it. A Stopped
VM's volumes are read at rest on primary storage, in the same change tracking (connectors.cloudstack.
stopped): a planned failover stops the VM (CloudStack has no pause) and then takes its last point.

CloudStack's KVM agent runs a VM as a transient libvirt domain named by its `instancename`, with the
VM's id as its UUID, ROOT as vda and data volumes as vd<b...> by device id. The job follows the VM to
the host the API names before each sync (connectors.cloudstack.placement); `validate` and `discover`
ask only the API, so they run anywhere.

A VM live-migrated between syncs brings its volumes' persistent bitmaps with it (QEMU stores them in
the qcow2 as the source lets go and the destination loads them), but not libvirt's checkpoint records,
which stay with the old host's libvirt. The new host's agent redefines the base checkpoint from those
bitmaps when every disk has it persistent, recording and consistent
(connectors.kvm.migrated_checkpoints), and the sync goes on incrementally; otherwise those disks are
resynced by digests (a full read, only differing blocks written), with the reason in the sync's status.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from connectors.cloudstack import api as csapi
from connectors.cloudstack.spec import CloudStackSource
from connectors.cloudstack.stopped import StoppedVolumes
from connectors.kvm import handles
from connectors.kvm.inventory import DEFAULT_URI, URIS_ENV
from connectors.kvm.migrated_checkpoints import FollowsMigrations
from sendense import config
from sendense.errors import ResourceNotFound, ResourceUnavailable
from sendense.models import DiskInfo, NicInfo, SnapshotRef, VmInfo
from sendense.protocols import SourceDisk

log = logging.getLogger(__name__)

PLATFORM = "cloudstack"


def local_libvirt_uris() -> list[str]:
    """The libvirts this agent's host runs (SENDENSE_KVM_LIBVIRT_URIS, default qemu:///system)."""
    configured = os.environ.get(URIS_ENV)
    return [u.strip() for u in (configured or DEFAULT_URI).split(",") if u.strip()]


def domain_uri(vm_id: str, where: str) -> str:
    """Which of this host's libvirts runs the domain of CloudStack VM `vm_id` (CloudStack's KVM agent
    uses one: the first that knows the UUID); `where` names the VM in the error."""
    import libvirt

    uris = local_libvirt_uris()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    for uri in uris:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError:
            continue
        try:
            conn.lookupByUUIDString(vm_id)
            return uri
        except libvirt.libvirtError:
            continue
        finally:
            conn.close()
    raise ResourceUnavailable(
        f"{where}: CloudStack says it runs on host {config.host_id()}, but no libvirt of this agent "
        f"({URIS_ENV}) runs it"
    )


def vm_hardware(api: Any, vm: dict[str, Any], volumes: list[dict[str, Any]]) -> dict[str, Any]:
    """What a VM from a point needs, from the API: CPUs and memory (the service offering), the OS
    type (the template's), the NICs with their networks, the volumes as disks by device id."""
    disks = [
        DiskInfo(
            key=csapi.disk_key(int(v.get("deviceid") or 0)),
            size=int(v["size"]),
            ref=str(v["id"]),
            bus="virtio",
            boot_order=1 if v.get("type") == "ROOT" else None,
        )
        for v in volumes
    ]
    nics = [
        NicInfo(mac=str(n.get("macaddress", "")), network=str(n.get("networkname", "")), model="virtio")
        for n in sorted(vm.get("nic") or [], key=lambda n: not n.get("isdefault"))
    ]
    os_hint = ""
    name = str(vm.get("ostypename") or vm.get("templatename") or vm.get("templatedisplaytext") or "").lower()
    if "windows" in name:
        os_hint = "windows"
    elif name:
        os_hint = "linux"
    return {
        "disks": disks,
        "cpus": int(vm.get("cpunumber") or 0),
        "memory_mib": int(vm.get("memory") or 0),
        "nics": nics,
        "os_hint": os_hint,
    }


class _Domain(FollowsMigrations):
    """The VM's libvirt domain; its errors name the VM as CloudStack knows it, never a socket."""

    platform = PLATFORM
    label = ""

    def _where(self) -> str:
        return self.label or super()._where()


class CloudStackSourceConnector:
    platform = PLATFORM

    def __init__(self, job: str, spec: CloudStackSource, work_dir: Path) -> None:
        self.job, self.spec, self.work_dir = job, spec, work_dir
        self.api = csapi.client_for(spec)
        self._vm: dict[str, Any] | None = None
        self._libvirt: Any = None

    def _where(self) -> str:
        return f"CloudStack VM {self.spec.vm}"

    def vm(self) -> dict[str, Any]:
        if self._vm is None:
            self._vm = csapi.find_vm(self.api, self.spec)
        return self._vm

    def _running_here(self) -> Any:
        """The KVM source of the VM's libvirt domain on this agent's host: the VM must run here."""
        if self._libvirt is not None:
            return self._libvirt
        vm = self.vm()
        state, host, me = vm.get("state"), vm.get("hostname"), config.host_id()
        if state != "Running":
            raise ResourceUnavailable(
                f"{self._where()} is {state}, not Running: a running VM is replicated (start it)",
                retryable=False,
            )
        if host != me:
            raise ResourceUnavailable(
                f"{self._where()} runs on host {host}, not on this agent's host {me}: "
                "the job's next sync follows it there",
                retryable=False,
            )
        uri = self._uri_of(str(vm["id"]))
        lv = _Domain(self.job, uri, str(vm["instancename"]), self.work_dir, uuid=str(vm["id"]))
        lv.label = f"CloudStack VM {self.spec.vm} ({vm['instancename']} on host {host})"
        self._libvirt = lv
        return lv

    def _uri_of(self, vm_id: str) -> str:
        return domain_uri(vm_id, self._where())

    # ------------------------------------------------------------------ protocol

    def validate(self) -> None:
        vm = self.vm()
        if vm.get("hypervisor") not in (None, "KVM"):
            raise ResourceUnavailable(
                f"{self._where()} runs on {vm.get('hypervisor')}: sendense replicates CloudStack VMs on KVM"
            )
        for v in csapi.vm_volumes(self.api, vm):
            if v.get("state") not in ("Ready", "Allocated"):
                raise ResourceUnavailable(
                    f"{self._where()}: volume {v.get('name')} is {v.get('state')}, not Ready"
                )

    def discover(self) -> VmInfo:
        vm = self.vm()
        volumes = [v for v in csapi.vm_volumes(self.api, vm) if v.get("state") == "Ready"]
        return VmInfo(
            name=str(vm.get("name")),
            platform=PLATFORM,
            vm_id=str(vm["id"]),
            firmware="uefi" if str(vm.get("boottype", "")).upper() == "UEFI" else "bios",
            **vm_hardware(self.api, vm, volumes),
        )

    def _stopped(self) -> StoppedVolumes:
        """The volumes of the VM, Stopped, read at rest on this agent's view of primary storage."""
        vm = self.vm()
        pools: dict[str, Path] = {}
        volumes: dict[str, Path] = {}
        for v in csapi.vm_volumes(self.api, vm):
            sid = str(v.get("storageid") or "")
            if not sid or not v.get("path"):
                continue  # (allocated: never written, no file yet)
            if sid not in pools:
                pool = csapi.pool(self.api, sid, f"volume {v.get('name')}")
                found = csapi.pool_dir(pool)
                if found is None:
                    raise ResourceUnavailable(
                        f"{self._where()} is Stopped and volume {v.get('name')} is on pool "
                        f"{pool.get('name')} of type {pool.get('type')}, whose volumes are not files: "
                        "start the VM to replicate it",
                        retryable=False,
                    )
                pools[sid] = found
            volumes[csapi.disk_key(int(v.get("deviceid") or 0))] = pools[sid] / str(v["path"])
        return StoppedVolumes(self.job, f"{self._where()} (Stopped)", str(vm["id"]), volumes)

    def _reader(self) -> Any:
        state = self.vm().get("state")
        if state == "Stopped":
            return self._stopped()
        if state != "Running":
            raise ResourceUnavailable(f"{self._where()} is {state}: retried until it is Running or Stopped")
        return self._running_here()

    @staticmethod
    def _at_rest(snap: SnapshotRef) -> bool:
        """Whether the snapshot was taken of the stopped VM's volumes (not of its running domain)."""
        return bool(snap.disks) and bool(handles.OfflineDisk.parse(snap.disks[0].handle).path)

    def create_snapshot(self, snapshot_id: str, base: dict[str, str | None]) -> SnapshotRef:
        snap: SnapshotRef = self._reader().create_snapshot(snapshot_id, base)
        for d in snap.disks:
            if d.tracking_lost and d.base_change_id:
                log.warning("%s: disk %s is resynced by digests: %s", self._where(), d.key, d.tracking_lost)
        return snap

    @contextmanager
    def open_disk(self, snap: SnapshotRef, key: str) -> Iterator[SourceDisk]:
        reader = self._stopped() if self._at_rest(snap) else self._running_here()
        cm: AbstractContextManager[SourceDisk] = reader.open_disk(snap, key)
        with cm as disk:
            yield disk

    def release_snapshot(self, snap: SnapshotRef, committed: bool) -> None:
        if self._at_rest(snap):
            self._stopped().release_snapshot(snap, committed)
            return
        try:
            lv = self._running_here()
        except (ResourceUnavailable, ResourceNotFound) as e:
            # (stopped or migrated since: its backup job ended with its QEMU; the checkpoints stay
            # in the image until the next sync there or the job's deletion)
            log.warning("%s: nothing to release for snapshot %s here: %s", self._where(), snap.snapshot_id, e)
            return
        lv.release_snapshot(snap, committed)

    def forget(self) -> None:
        try:
            reader = self._reader()
        except ResourceNotFound:
            log.warning("%s is gone: nothing of job %s to remove", self._where(), self.job)
            return
        reader.forget()
