"""CloudStack as a replication target: replicas and recovery points as qcow2 files on a primary storage
pool of the zone, written by the agent of a KVM host that mounts the pool (`target.host`).

The points are the KVM target's (connectors.kvm.target: a backing chain of qcow2 files, immutable once
committed, pruned by merging, never while held), in a directory of the job's own on the pool:
`<pool's directory>/sendense/<job id>/<job>/`. CloudStack does not know these files: they are not
volumes (a volume with a backing file cannot be imported: VolumeImportUnmanageManagerImpl), so they
never show in its volume lists nor count against its allocation; a VM made from a point gets flat
copies imported as volumes (vms.py).

The API says where the pool is and whether it can take the job: listStoragePools by name or id in
the zone; its type decides its directory on a KVM host (Filesystem and SharedMountPoint: the pool's
`path`; NetworkFilesystem: /mnt/<pool id>, where CloudStack's KVM agent mounts NFS pools); it must be
Up, and the sync's new disks must fit in what its capacity leaves free (the larger of what CloudStack
allocated and what the filesystem uses). This agent's policy must let it write there
(`target_roots`): the spec cannot say the directory, so it is checked once the API has said it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from connectors.cloudstack import api as csapi
from connectors.cloudstack.spec import UUID, CloudStackTarget
from connectors.kvm.target import KvmTarget, PendingDisk
from sendense import config
from sendense.errors import InvalidSpec, ResourceNotFound, ResourceUnavailable
from sendense.models import DiskInfo, PointInfo
from sendense.policy import require_target_path

log = logging.getLogger(__name__)

PLATFORM = "cloudstack"


def _gib(n: int) -> str:
    return f"{n / csapi.GIB:.1f} GiB"


def find_pool(api: Any, spec: CloudStackTarget) -> dict[str, Any]:
    """The spec's pool (by id or name) in its zone, or a one-line error naming target.storage."""
    z = csapi.zone(api, spec, "target")
    by: dict[str, Any] = {"id": spec.storage} if UUID.match(spec.storage) else {"name": spec.storage}
    try:
        found = api.list(
            "listStoragePools", "storagepool", f"listStoragePools {spec.storage}", zoneid=z["id"], **by
        )
    except ResourceNotFound:
        found = []
    found = [p for p in found if p.get("id") == spec.storage or p.get("name") == spec.storage]
    if not found:
        raise InvalidSpec(f"target.storage: no primary storage pool {spec.storage!r} in zone {spec.zone}")
    if len(found) > 1:
        raise InvalidSpec(
            f"target.storage: {len(found)} pools are named {spec.storage!r} in zone {spec.zone}: "
            f"name it by id ({', '.join(p['id'] for p in found)})"
        )
    return found[0]


def pool_dir(spec: CloudStackTarget, pool: dict[str, Any]) -> Path:
    """Where a KVM host of the zone finds the pool's files."""
    found = csapi.pool_dir(pool)
    if found is None:
        kind = str(pool.get("type", ""))
        raise InvalidSpec(
            f"target.storage: pool {spec.storage} is of type {kind or 'unknown'}: sendense keeps points as "
            f"files on a file pool ({', '.join(csapi.FILE_POOLS + csapi.NFS_POOLS)})"
        )
    return found


def free_bytes(pool: dict[str, Any]) -> int:
    total = int(pool.get("disksizetotal") or 0)
    taken = max(int(pool.get("disksizeallocated") or 0), int(pool.get("disksizeused") or 0))
    return total - taken


class CloudStackTargetConnector:
    """TargetConnector: the KVM target's points in a directory of the job's own on the pool."""

    platform = PLATFORM

    def __init__(self, job: str, spec: CloudStackTarget, job_id: str = "") -> None:
        self.job, self.spec, self.job_id = job, spec, job_id
        self.api = csapi.client_for(spec)
        self._pool: dict[str, Any] | None = None
        self._kvm: KvmTarget | None = None

    # ------------------------------------------------------------------ the pool

    def pool(self, fresh: bool = False) -> dict[str, Any]:
        if self._pool is None or fresh:
            self._pool = find_pool(self.api, self.spec)
        return self._pool

    def check_pool(self, needed: int = 0) -> dict[str, Any]:
        """The pool, Up and with room for `needed` more bytes (one-line errors naming target.storage)."""
        pool = self.pool(fresh=True)
        state = pool.get("state")
        if state != "Up":
            raise ResourceUnavailable(
                f"target.storage: primary storage {self.spec.storage} is {state}, not Up", retryable=False
            )
        free = free_bytes(pool)
        if free <= 0 or needed > free:
            total = int(pool.get("disksizetotal") or 0)
            raise ResourceUnavailable(
                f"target.storage: primary storage {self.spec.storage} has {_gib(max(free, 0))} free of "
                f"{_gib(total)}" + (f"; the replicas need {_gib(needed)}" if needed else ""),
                retryable=False,
            )
        return pool

    def directory(self) -> Path:
        """The pool's directory on this agent's host (it must mount the pool)."""
        if not self.spec.host:
            raise InvalidSpec(
                f"target.host: name the agent of a KVM host that mounts primary storage {self.spec.storage}"
            )
        d = pool_dir(self.spec, self.pool())
        if not d.is_dir():
            raise ResourceUnavailable(
                f"target.storage: primary storage {self.spec.storage} is not mounted on this agent's "
                f"host {config.host_id()} (target.host {self.spec.host} must be a KVM host that mounts it)",
                retryable=False,
            )
        return d

    def root(self) -> Path:
        return self.directory() / "sendense" / (self.job_id or self.job)

    def kvm(self) -> KvmTarget:
        """The KVM target on the job's directory in the pool, once this agent's policy allows it."""
        if self._kvm is None:
            root = self.root()
            require_target_path(root, f"target.storage: primary storage {self.spec.storage}'s directory")
            self._kvm = KvmTarget(self.job, root, job_id=self.job_id)
        return self._kvm

    # ------------------------------------------------------------------ protocol

    def validate(self) -> None:
        """The pool (Up, with room, mounted here, this agent's to write) and the job's directory on it;
        and what VMs from points will be made of, where the spec names it (a template, offerings,
        networks that do not exist are said when the job is made, not at its first drill)."""
        self.check_pool()
        self.kvm().validate()
        from connectors.cloudstack import catalog

        z = str(csapi.zone(self.api, self.spec, "target")["id"])
        if self.spec.template:
            catalog.template(self.api, self.spec, z)
        if self.spec.service_offering:
            catalog.named_offering(self.api, self.spec)
        catalog.disk_offering(self.api, self.spec)
        if self.spec.drill_network:
            catalog.drill_network(self.api, self.spec, z)
        for m in self.spec.networks:
            catalog.network(self.api, m.target, "target.networks", z)

    def prepare(self, sync_id: str, disks: list[DiskInfo]) -> None:
        kvm = self.kvm()
        points = kvm.list_points()
        have = {d.key for d in points[0].disks} if points else set()
        self.check_pool(sum(d.size for d in disks if d.key not in have))  # a new disk's full replica
        kvm.prepare(sync_id, disks)

    @contextmanager
    def open_disk(self, sync_id: str, key: str) -> Iterator[PendingDisk]:
        with self.kvm().open_disk(sync_id, key) as disk:
            yield disk

    def commit(self, sync_id: str, point: PointInfo) -> PointInfo:
        return self.kvm().commit(sync_id, point)

    def abort(self, sync_id: str) -> None:
        self.kvm().abort(sync_id)

    def list_points(self) -> list[PointInfo]:
        return self.kvm().list_points()

    def get_point(self, point_id: str | None) -> PointInfo:
        return self.kvm().get_point(point_id)

    def prune(self, keep: int) -> list[str]:
        return self.kvm().prune(keep)

    def export(self, point_id: str, fmt: str, out_dir: Path) -> list[tuple[str, Path]]:
        return self.kvm().export(point_id, fmt, out_dir)

    def hold(self, point_id: str, hold_id: str, reason: str) -> None:
        self.kvm().hold(point_id, hold_id, reason)

    def release(self, point_id: str, hold_id: str) -> None:
        self.kvm().release(point_id, hold_id)

    def point_path(self, point_id: str, key: str) -> Path:
        return self.kvm().point_path(point_id, key)

    def destroy(self) -> None:
        """The KVM target's destroy (refused while a point is held or a VM made from one exists), then
        the job's directory on the pool."""
        kvm = self.kvm()
        kvm.destroy()
        try:
            kvm.root.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("job %s: %s stays (%s)", self.job, kvm.root, e.strerror)
